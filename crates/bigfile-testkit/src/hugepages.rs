//! The system's pool of huge pages (hugetlbfs), resized for a test: only
//! as root, and under a machine-wide lock that every test process (and
//! anyone else resizing it by hand: `flock` on [`pool_lock_path`]) takes.

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
    /// Held (`flock`) until after the pool is restored.
    _lock: std::fs::File,
}

/// The file whose `flock` is held while a test process has changed the pool.
pub fn pool_lock_path() -> std::path::PathBuf {
    std::env::temp_dir().join("bigfile-ram-tests-nr_hugepages.lock")
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
        let old = std::fs::read_to_string(NR_HUGEPAGES).map_err(|e| e.to_string())?;
        let guard = HugePages { old, _lock: lock };
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

impl Drop for HugePages {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(NR_HUGEPAGES, self.old.trim()) {
            eprintln!(
                "could not restore {NR_HUGEPAGES} to {}: {e}",
                self.old.trim()
            );
        }
    }
}
