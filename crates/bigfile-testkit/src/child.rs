//! Crash tests as ordinary tests: the test binary re-executes itself (or
//! another program is run) as a child, and the parent checks how it ended:
//! its wait status, and what it printed.
//!
//! ```no_run
//! use bigfile_testkit::child::{self, Death};
//!
//! const ENV: &str = "MY_CRATE_CHILD";
//!
//! #[test]
//! fn child_body() {
//!     let Some(scenario) = child::scenario(ENV) else { return };
//!     // ... do what must crash, by `scenario` ...
//! }
//!
//! #[test]
//! fn a_loader_touching_its_page_dies() {
//!     let ended = child::run(child::test_child("child_body", ENV, "self-touch"), child::TIMEOUT)
//!         .unwrap();
//!     Death::by(libc::SIGSEGV).stderr(&["touched the page"]).check(&ended).unwrap();
//! }
//! ```

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

/// How long a child may run before it counts as hung.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// How a child ended.
#[derive(Debug)]
pub struct Ended {
    pub status: ExitStatus,
    pub pid: u32,
    pub stdout: String,
    pub stderr: String,
}

impl Ended {
    /// The status, stdout and stderr, for a failure message.
    pub fn describe(&self) -> String {
        let how = match self.status.signal() {
            Some(s) => format!("killed by {}", signal_name(s)),
            None => format!("{}", self.status),
        };
        format!(
            "child {} {how}\nstdout:\n{}\nstderr:\n{}",
            self.pid, self.stdout, self.stderr
        )
    }
}

/// `SIGSEGV` for 11, and so on.
pub fn signal_name(signo: i32) -> String {
    Signal::try_from(signo).map_or_else(|_| format!("signal {signo}"), |s| s.as_str().to_owned())
}

/// This test binary, to run its test `test` alone with `env` set to
/// `scenario` (see [`scenario`]).
pub fn test_child(test: &str, env: &str, scenario: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("the test binary"));
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(env, scenario)
        .env("RUST_BACKTRACE", "0");
    cmd
}

/// In a child started by [`test_child`], the scenario it must run;
/// `None` in the parent (an ordinary test run). A child leaves no core
/// file behind (the crashes are provoked on purpose).
pub fn scenario(env: &str) -> Option<String> {
    let name = std::env::var(env).ok()?;
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
    Some(name)
}

/// Run `cmd` to its end with stdin closed, stdout and stderr captured;
/// still running after `timeout`, it is killed (with whatever it started:
/// it runs in a process group of its own) and that is an error (a hang),
/// with what it printed.
pub fn run(mut cmd: Command, timeout: Duration) -> Result<Ended, String> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {program}: {e}"))?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut text);
            }
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let out = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let err = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| e.to_string())? {
            break st;
        }
        if t0.elapsed() > timeout {
            let group = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(group, Signal::SIGKILL);
            let _ = child.wait();
            let stderr = err.join().unwrap_or_default();
            return Err(format!(
                "{program} hung: still running after {timeout:?}, killed\nstderr:\n{stderr}"
            ));
        }
        thread::sleep(Duration::from_millis(10));
    };
    Ok(Ended {
        status,
        pid: child.id(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Fork, run `body` in the child and end it with its answer (`true`: exit
/// 0, `false`: exit 1), and wait for it in the parent: its wait status, or
/// an error if it is still running after `timeout` (killed: a hang). The
/// child runs nothing but `body` and `_exit`: other threads of the test
/// binary may hold locks (stdout's, the allocator's arenas') that only
/// they would release, so `body` keeps to what the code under test
/// promises to do in a forked child.
pub fn forked(body: impl FnOnce() -> bool, timeout: Duration) -> Result<ExitStatus, String> {
    // SAFETY: fork; the child runs `body` and `_exit`s, never returning
    // into the test harness.
    match unsafe { libc::fork() } {
        -1 => Err(format!("fork: {}", std::io::Error::last_os_error())),
        0 => {
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or(false);
            // SAFETY: _exit ends the child at once, running no destructor
            // and no atexit handler of the parent's.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) }
        }
        pid => {
            let t0 = Instant::now();
            let pid = nix::unistd::Pid::from_raw(pid);
            loop {
                match nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                    Ok(nix::sys::wait::WaitStatus::StillAlive) => {}
                    Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => {
                        return Ok(ExitStatus::from_raw(code << 8))
                    }
                    Ok(nix::sys::wait::WaitStatus::Signaled(_, sig, _)) => {
                        return Ok(ExitStatus::from_raw(sig as i32))
                    }
                    Ok(_) => {}
                    Err(e) => return Err(format!("waitpid: {e}")),
                }
                if t0.elapsed() > timeout {
                    let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
                    let _ = nix::sys::wait::waitpid(pid, None);
                    return Err(format!(
                        "the forked child hung: still running after {timeout:?}, killed"
                    ));
                }
                thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// How a child must die: by a signal, after printing some things (in
/// order) on stderr, and never printing others.
#[derive(Debug, Clone)]
pub struct Death {
    pub signal: i32,
    pub stderr: Vec<String>,
    pub absent: Vec<String>,
}

impl Death {
    pub fn by(signal: i32) -> Death {
        Death {
            signal,
            stderr: Vec::new(),
            absent: Vec::new(),
        }
    }

    /// Substrings stderr must contain, in this order.
    pub fn stderr(mut self, wanted: &[&str]) -> Death {
        self.stderr = wanted.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Substrings neither stdout nor stderr may contain.
    pub fn absent(mut self, unwanted: &[&str]) -> Death {
        self.absent = unwanted.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Whether `ended` died so; `Err` says how not.
    pub fn check(&self, ended: &Ended) -> Result<(), String> {
        let why = |what: String| Err(format!("{what}\n{}", ended.describe()));
        if ended.status.signal() != Some(self.signal) {
            return why(format!("expected death by {}", signal_name(self.signal)));
        }
        let mut rest = ended.stderr.as_str();
        for w in &self.stderr {
            match rest.find(w.as_str()) {
                Some(i) => rest = &rest[i + w.len()..],
                None => return why(format!("stderr lacks {w:?} (in this order)")),
            }
        }
        for u in &self.absent {
            if ended.stdout.contains(u.as_str()) || ended.stderr.contains(u.as_str()) {
                return why(format!("printed {u:?}"));
            }
        }
        Ok(())
    }
}

/// Runs `cmd` and checks that it ended successfully; returns its stdout.
pub fn expect_success(cmd: Command) -> Result<String, String> {
    let ended = run(cmd, TIMEOUT)?;
    if !ended.status.success() {
        return Err(format!("expected success\n{}", ended.describe()));
    }
    Ok(ended.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn a_death_is_checked_by_signal_and_output_in_order() {
        let ended = run(sh("echo one >&2; echo two >&2; kill -SEGV $$"), TIMEOUT).unwrap();
        let death = Death::by(libc::SIGSEGV).stderr(&["one", "two"]);
        death.check(&ended).unwrap();
        assert!(Death::by(libc::SIGSEGV)
            .stderr(&["two", "one"])
            .check(&ended)
            .unwrap_err()
            .contains("in this order"));
        assert!(Death::by(libc::SIGBUS)
            .check(&ended)
            .unwrap_err()
            .contains("expected death by SIGBUS"));
        assert!(death.absent(&["two"]).check(&ended).is_err());
        assert!(ended.describe().contains("killed by SIGSEGV"));
    }

    #[test]
    fn a_hang_is_killed_and_reported() {
        let e = run(sh("echo started >&2; sleep 5"), Duration::from_millis(200)).unwrap_err();
        assert!(e.contains("hung") && e.contains("started"), "{e}");
    }

    #[test]
    fn success_returns_stdout() {
        assert_eq!(expect_success(sh("echo fine")).unwrap(), "fine\n");
        assert!(expect_success(sh("exit 3")).is_err());
    }
}
