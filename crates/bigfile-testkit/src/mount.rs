//! A filesystem mounted for a test (root only): a small tmpfs to run out
//! of, a hugetlbfs.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

/// A filesystem mounted on a fresh temporary directory; unmounted (lazily,
/// if still busy) and the directory removed on drop.
#[derive(Debug)]
pub struct Mount {
    dir: PathBuf,
}

impl Mount {
    /// Mount a `fstype` with `options` ("size=8m", "pagesize=2M").
    pub fn new(fstype: &str, options: &str) -> Result<Mount, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "bigfile-test-{}-{fstype}-{}",
            std::process::id(),
            N.fetch_add(1, Relaxed)
        ));
        std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let cdir = c_path(&dir)?;
        let ctype = CString::new(fstype).map_err(|e| e.to_string())?;
        let copts = CString::new(options).map_err(|e| e.to_string())?;
        // SAFETY: all strings are NUL-terminated and live across the call.
        let rc = unsafe {
            libc::mount(
                ctype.as_ptr(),
                cdir.as_ptr(),
                ctype.as_ptr(),
                0,
                copts.as_ptr().cast(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            let _ = std::fs::remove_dir(&dir);
            return Err(format!(
                "mount -t {fstype} -o {options} {}: {e}",
                dir.display()
            ));
        }
        Ok(Mount { dir })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Bytes in use on the filesystem.
    pub fn used(&self) -> Result<u64, String> {
        let c = c_path(&self.dir)?;
        let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
        // SAFETY: `c` is NUL-terminated, `st` has room for a statfs.
        if unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
            return Err(format!("statfs: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: statfs succeeded and filled `st`.
        let st = unsafe { st.assume_init() };
        // The statfs field types differ between architectures.
        #[allow(clippy::unnecessary_cast)]
        Ok((st.f_blocks - st.f_bfree) as u64 * st.f_bsize as u64)
    }
}

fn c_path(dir: &Path) -> Result<CString, String> {
    CString::new(dir.as_os_str().as_bytes()).map_err(|e| e.to_string())
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Ok(c) = c_path(&self.dir) {
            // SAFETY: a NUL-terminated path; MNT_DETACH unmounts even if
            // something is still open.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
