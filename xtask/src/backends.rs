//! The fault backends `cargo xtask test` runs the tests on: signals (the
//! default), then userfaultfd where this user may use it. A pass on
//! a backend sets `BIGFILE_FAULTS` for every process it starts (tests that
//! choose a backend themselves still do); where userfaultfd is available,
//! `BIGFILE_REQUIRE_UFFD=1` too, so that the tests of it fail rather than
//! skip. A caller's own `BIGFILE_FAULTS` limits the passes to that backend.

use std::env;

/// The variable naming the fault backend of the RAMs a process makes.
const FAULTS: &str = "BIGFILE_FAULTS";
/// Makes the tests of the userfaultfd backend fail where it is missing.
const REQUIRE_UFFD: &str = "BIGFILE_REQUIRE_UFFD";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Userfaultfd,
    Signals,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Userfaultfd => "userfaultfd",
            Backend::Signals => "signals",
        }
    }
}

/// The backends to test on, the default one first; sets
/// `BIGFILE_REQUIRE_UFFD` when userfaultfd is among them.
pub(crate) fn to_test() -> Vec<Backend> {
    let chosen = match env::var(FAULTS).as_deref().map(str::trim) {
        Ok("signals") => vec![Backend::Signals],
        Ok("userfaultfd" | "uffd") => vec![Backend::Userfaultfd],
        _ => match uffd_unavailable() {
            None => vec![Backend::Signals, Backend::Userfaultfd],
            Some(why) => {
                eprintln!(
                    "xtask: the tests run on the signal fault backend only: userfaultfd is not \
                     available ({why}; README.md says how to enable it)"
                );
                vec![Backend::Signals]
            }
        },
    };
    if chosen.contains(&Backend::Userfaultfd) {
        env::set_var(REQUIRE_UFFD, "1");
    }
    chosen
}

/// Run `f` with every process it starts on `backend`.
pub(crate) fn on<T>(backend: Backend, f: impl FnOnce() -> T) -> T {
    eprintln!("xtask: on the {} fault backend", backend.name());
    let before = env::var_os(FAULTS);
    // xtask runs one thread: nothing reads the environment meanwhile.
    env::set_var(FAULTS, backend.name());
    let out = f();
    match before {
        Some(v) => env::set_var(FAULTS, v),
        None => env::remove_var(FAULTS),
    }
    out
}

/// Why this process may not use userfaultfd for faults of the kernel's own
/// accesses (the library's own test: opening one, with `UFFDIO_POISON`,
/// which bigfile-virtmem requires), or `None` if it may.
fn uffd_unavailable() -> Option<String> {
    match bigfile_uffd::Uffd::open() {
        Err(e) => Some(e.to_string()),
        Ok(u) if !u.features().poison => {
            Some("userfaultfd lacks UFFDIO_POISON (Linux 6.6+), which bigfile requires".into())
        }
        Ok(_) => None,
    }
}
