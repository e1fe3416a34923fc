//! How a RAM's mappings learn of their faults: the signal backend
//! (SIGSEGV on inaccessible slots) or the userfaultfd backend (the kernel
//! reports every fault of a registered mapping, its own accesses included).
//! Chosen per RAM when it is made: by the environment variable
//! `BIGFILE_FAULTS` (signals when unset: userfaultfd is opt-in for now),
//! or by [`Ram::with_fault_backend`]. The
//! mechanisms are in ARCHITECTURE.md.
//!
//! [`Ram::with_fault_backend`]: crate::Ram::with_fault_backend

use std::fmt;
use std::sync::OnceLock;

use bigfile_uffd::Uffd;

use crate::fork_generation::{self, PerGeneration};

/// A way of learning about page faults; see [`Ram::fault_backend`].
///
/// [`Ram::fault_backend`]: crate::Ram::fault_backend
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultBackend {
    /// SIGSEGV on inaccessible pages: works everywhere; the kernel's own
    /// accesses to pages not loaded (`read(2)` into a mapping) fail with
    /// EFAULT (call `Vma::prefault` first).
    Signals,
    /// userfaultfd(2): the kernel reports every fault, its own accesses
    /// included, so system calls work on mapped memory with no prefault.
    /// Needs root, CAP_SYS_PTRACE, `vm.unprivileged_userfaultfd=1` or
    /// access to `/dev/userfaultfd`.
    Userfaultfd,
}

impl FaultBackend {
    /// Its name, as `BIGFILE_FAULTS` and the stats spell it.
    pub fn name(self) -> &'static str {
        match self {
            FaultBackend::Signals => "signals",
            FaultBackend::Userfaultfd => "userfaultfd",
        }
    }
}

impl fmt::Display for FaultBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a RAM asked for: nothing (the default), one backend, or the best
/// available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wanted {
    Default,
    Auto,
    Exactly(FaultBackend),
}

/// Why a RAM that asked for nothing is on signals. The userfaultfd backend
/// is opt-in while it is slower than signals for faults of user code
/// (benches/README.md).
const DEFAULT_IS_SIGNALS: &str =
    "the default (userfaultfd is opt-in for now: BIGFILE_FAULTS=auto or \
     BIGFILE_FAULTS=userfaultfd, or a RAM's fault backend, asks for it)";

impl Wanted {
    /// `BIGFILE_FAULTS`: unset (the default), `auto`, `signals`,
    /// `userfaultfd`.
    pub(crate) fn from_env() -> Result<Wanted, String> {
        match std::env::var("BIGFILE_FAULTS") {
            Err(_) => Ok(Wanted::Default),
            Ok(v) => match v.trim() {
                "" => Ok(Wanted::Default),
                "auto" => Ok(Wanted::Auto),
                "signals" => Ok(Wanted::Exactly(FaultBackend::Signals)),
                "userfaultfd" | "uffd" => Ok(Wanted::Exactly(FaultBackend::Userfaultfd)),
                other => Err(format!(
                    "BIGFILE_FAULTS={other:?}: expected auto, signals or userfaultfd"
                )),
            },
        }
    }
}

/// The backend a RAM uses, and why not userfaultfd when it is signals.
#[derive(Clone)]
pub(crate) enum Backend {
    Signals {
        why_not_uffd: String,
    },
    /// The userfaultfd of the process that made the RAM ([`process_uffd`]),
    /// opened in fork generation `generation`.
    Uffd {
        uffd: &'static Uffd,
        generation: u64,
    },
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backend::Signals { why_not_uffd } => write!(f, "signals ({why_not_uffd})"),
            Backend::Uffd { .. } => f.write_str("userfaultfd"),
        }
    }
}

impl Backend {
    /// The backend for a RAM of `ram`'s kind, as `wanted`: userfaultfd when
    /// asked for or, with `Auto`, when the process may use it and the RAM
    /// is memory it serves (memfd, shmfs; hugetlbfs where the kernel reports
    /// minor faults on it); else
    /// signals, with the reason. Asking for userfaultfd where it cannot be
    /// had is an error.
    pub(crate) fn choose(wanted: Wanted, ram: &bigfile_ram::Ram) -> Result<Backend, String> {
        let signals = match wanted {
            Wanted::Exactly(FaultBackend::Signals) => Some("signals asked for"),
            Wanted::Default => Some(DEFAULT_IS_SIGNALS),
            _ => None,
        };
        if let Some(why) = signals {
            return Ok(Backend::Signals {
                why_not_uffd: why.into(),
            });
        }
        let uffd = process_uffd().and_then(|uffd| {
            let hugetlbfs = matches!(ram.spec().backend, bigfile_ram::Backend::Hugetlbfs { .. });
            if hugetlbfs && !uffd.features().minor_hugetlbfs {
                return Err(NO_MINOR_HUGETLBFS.into());
            }
            Ok(uffd)
        });
        match (uffd, wanted) {
            (Ok(uffd), _) => Ok(Backend::Uffd {
                uffd,
                generation: fork_generation::generation(),
            }),
            (Err(why), Wanted::Auto) => Ok(Backend::Signals { why_not_uffd: why }),
            (Err(why), _) => Err(format!("the userfaultfd backend is not available: {why}")),
        }
    }

    pub(crate) fn kind(&self) -> FaultBackend {
        match self.uffd() {
            Some(_) => FaultBackend::Userfaultfd,
            None => FaultBackend::Signals,
        }
    }

    /// Why this RAM does not use userfaultfd (None when it does).
    pub(crate) fn fallback_reason(&self) -> Option<&str> {
        match self {
            Backend::Signals { why_not_uffd } => Some(why_not_uffd),
            Backend::Uffd { .. } if self.forked() => Some(FORKED),
            Backend::Uffd { .. } => None,
        }
    }

    /// The userfaultfd, if the RAM's mappings use it: not in a forked child
    /// of the process that made the RAM, whose mappings, put back to
    /// reservations when it forked (`fork.rs`), are on the signal backend
    /// from then on (the child's new RAMs have a userfaultfd of the child's).
    pub(crate) fn uffd(&self) -> Option<&'static Uffd> {
        match self {
            Backend::Uffd { uffd, .. } if !self.forked() => Some(uffd),
            _ => None,
        }
    }

    /// Whether the RAM was made on the userfaultfd of a process this one is
    /// a forked child of (so it is on signals here).
    pub(crate) fn forked(&self) -> bool {
        matches!(self, Backend::Uffd { generation, .. } if *generation != fork_generation::generation())
    }
}

/// The process's userfaultfd, opened on first use in each fork generation
/// (a forked child opens its own: the descriptor it inherits acts on the
/// parent's address space), with the request signal's handler and the
/// fault handler installed (the backend's user-mode faults arrive through
/// them); or why it cannot be had.
pub(crate) fn process_uffd() -> Result<&'static Uffd, String> {
    static UFFD: PerGeneration<OnceLock<Result<Uffd, String>>> = PerGeneration::new();
    let uffd = UFFD.get().get_or_init(|| {
        let uffd = Uffd::open().map_err(|e| e.to_string())?;
        if !uffd.features().poison {
            return Err(NO_POISON.into());
        }
        // The reader tells a user-mode fault from a system call's by
        // /proc (`uffd.rs`); without it every fault would be served as a
        // system call's, away from the thread holding the host lock.
        // SAFETY: gettid has no arguments and cannot fail (called through
        // syscall(2): glibc's wrapper is newer than the wheels' glibc).
        let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t;
        if let Err(e) = bigfile_uffd::thread_mode(tid) {
            return Err(format!("{NO_PROC} ({e})"));
        }
        bigfile_fault::request_signal().map_err(|e| format!("the request signal: {e}"))?;
        bigfile_fault::install().map_err(|e| e.to_string())?;
        Ok(uffd)
    });
    uffd.as_ref().map_err(Clone::clone)
}

/// Why a kernel without `UFFDIO_POISON` (before Linux 6.6) is not used: a
/// system call whose page fails to load could not be failed, only retried
/// (`uffd.rs`), forever if the loader keeps failing.
const NO_POISON: &str = "userfaultfd lacks UFFDIO_POISON (Linux 6.6+): a system call whose \
                         page fails to load could only be retried, forever if the loader \
                         keeps failing, never failed with EFAULT";

/// Why a hugetlbfs RAM is not on userfaultfd where the kernel lacks minor
/// faults on hugetlbfs (its pieces are registered for them: `mapper.rs`).
const NO_MINOR_HUGETLBFS: &str = "a hugetlbfs RAM, and this kernel's userfaultfd lacks minor \
                                  faults on hugetlbfs (UFFD_FEATURE_MINOR_HUGETLBFS, Linux 5.13+)";

/// Why a process that cannot read its threads' `/proc` entries does not use
/// userfaultfd.
const NO_PROC: &str = "/proc/self/task/TID/syscall cannot be read (/proc not mounted, or \
                       mounted without this process's entries): the userfaultfd backend \
                       tells a user-mode fault from a system call's by it";

/// Why a RAM made on userfaultfd before a fork is on signals in the child.
const FORKED: &str = "a forked child of the process that made this RAM on its userfaultfd \
                      (the descriptor acts on the parent's address space; RAMs made in \
                      this process get a userfaultfd of its own)";
