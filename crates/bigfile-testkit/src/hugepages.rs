//! The system's pool of huge pages (hugetlbfs), resized for a test: only
//! as root, and under a machine-wide lock that every test process (and
//! anyone else resizing it by hand: `flock` on [`pool_lock_path`]) takes.
//!
//! The lock file records the pool's size from before it was changed while
//! a holder has it changed: a holder that dies without restoring it (a
//! test killed by a signal) releases the lock with the record still there,
//! and the next holder restores that size, not the grown one it finds.
//! Python's tests (crates/bigfile-python/tests) follow the same protocol.

use std::io::{Read, Seek, Write};

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The size of the pool of default-size huge pages.
pub const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// A pool of default-size (2 MiB on x86-64) huge pages, restored to its old size on drop.
///
/// The pool is the system's: the caller keeps its own process's tests apart, and a lock on
/// [`pool_lock_path`] keeps another test process's (a second test run on the machine) from
/// resizing the pool under this one's feet, or restoring a size this one set.
#[derive(Debug)]
pub struct HugePages {
    old: String,
    /// Held (`flock`) until after the pool is restored; holds `old` until
    /// then.
    lock: std::fs::File,
}

/// The file whose `flock` is held while a test process has changed the pool:
/// one path for the machine (the pool is the machine's), whatever a test
/// process's `TMPDIR` (Rust's and Python's temporary directories differ
/// when only `TMP` is set, and two runs may set it differently), the same
/// in bigfile-python's tests.
pub fn pool_lock_path() -> std::path::PathBuf {
    std::path::PathBuf::from("/tmp/bigfile-ram-tests-nr_hugepages.lock")
}

impl HugePages {
    /// Resize the pool to `n` pages (waiting for the lock first), or why not (not root, or
    /// the kernel found fewer free huge pages).
    pub fn set(n: u64) -> Result<HugePages, String> {
        if !is_root() {
            return Err("not root: cannot change /proc/sys/vm/nr_hugepages".into());
        }
        let path = pool_lock_path();
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        // SAFETY: flock on a descriptor we own; blocks until the other holder is done.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
            return Err(format!(
                "flock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            ));
        }
        let old = match recorded(&lock).map_err(|e| format!("{}: {e}", path.display()))? {
            // A holder died without restoring the pool: its size before.
            Some(old) => old,
            None => std::fs::read_to_string(NR_HUGEPAGES).map_err(|e| e.to_string())?,
        };
        record(&lock, &old).map_err(|e| format!("{}: {e}", path.display()))?;
        let guard = HugePages { old, lock };
        std::fs::write(NR_HUGEPAGES, n.to_string())
            .map_err(|e| format!("write {NR_HUGEPAGES}: {e}"))?;
        let got: u64 = std::fs::read_to_string(NR_HUGEPAGES)
            .map_err(|e| e.to_string())?
            .trim()
            .parse()
            .map_err(|e| format!("{e}"))?;
        if got != n {
            return Err(format!("asked the kernel for {n} huge pages, got {got}"));
        }
        Ok(guard)
    }
}

/// The pool size recorded in the lock file, if any.
fn recorded(mut lock: &std::fs::File) -> std::io::Result<Option<String>> {
    let mut old = String::new();
    lock.rewind()?;
    lock.read_to_string(&mut old)?;
    Ok(Some(old.trim().to_owned()).filter(|o| !o.is_empty()))
}

/// Record `old` in the lock file (empty: nothing to restore).
fn record(mut lock: &std::fs::File, old: &str) -> std::io::Result<()> {
    lock.set_len(0)?;
    lock.rewind()?;
    lock.write_all(old.trim().as_bytes())
}

impl Drop for HugePages {
    fn drop(&mut self) {
        match std::fs::write(NR_HUGEPAGES, self.old.trim()) {
            // Restored: nothing for the next holder to undo.
            Ok(()) => {
                let _ = record(&self.lock, "");
            }
            Err(e) => eprintln!(
                "could not restore {NR_HUGEPAGES} to {}: {e}",
                self.old.trim()
            ),
        }
    }
}
