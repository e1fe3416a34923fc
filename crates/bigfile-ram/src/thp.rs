//! Transparent huge pages for memfd and shmfs RAM ([`ThpPolicy::Collapse`]).
//!
//! A freshly reserved page is made of huge pages with `MADV_COLLAPSE`, asked
//! through the handle's window. The kernel collapses only a range that holds
//! at least one page, so one OS page of each huge-page range is reserved
//! first; the collapse then allocates the huge page, zero-fills the rest and
//! replaces the small page. From then on every mapping of the page at a
//! suitably aligned address (the window; virtmem's mappings, aligned to the
//! page size) is mapped by PMD entries, and the page stays huge until it is
//! dropped. virtmem reuses the RAM page of the block it reclaims for the
//! block it loads (same handle), so in a steady scan the collapse is paid
//! once per page of the budget; pages dropped (discard, invalidation,
//! reclaim for another handle) are collapsed again when allocated anew.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::OnceLock;

use crate::spec::{AllocPolicy, Backend, RamSpec, ThpPolicy};
use crate::sys;

/// The kernel's PMD (transparent huge page) size, if it has THP at all.
pub(crate) fn pmd_size() -> Option<usize> {
    static SIZE: OnceLock<Option<usize>> = OnceLock::new();
    *SIZE.get_or_init(|| {
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .filter(|&n: &usize| n.is_power_of_two() && n > sys::os_page_size())
    })
}

/// Whether a handle of `spec` should collapse its pages, and with which
/// huge-page size.
pub(crate) fn collapse_size(spec: &RamSpec) -> Option<usize> {
    let eligible = spec.thp == ThpPolicy::Collapse
        && spec.alloc == AllocPolicy::Reserve
        && matches!(spec.backend, Backend::Memfd | Backend::Shmfs { .. });
    pmd_size().filter(|&pmd| eligible && spec.page_size % pmd == 0)
}

/// A handle's huge-page state: on until the kernel says it cannot.
#[derive(Debug)]
pub(crate) struct Collapser {
    pmd: usize,
    on: AtomicBool,
}

impl Collapser {
    pub(crate) fn new(pmd: usize) -> Collapser {
        Collapser {
            pmd,
            on: AtomicBool::new(true),
        }
    }

    /// Make the page at file offset `off`, `len` bytes, seen at `window` in
    /// the handle's window, of huge pages. `Ok(true)`: done, the page is
    /// fully reserved. `Ok(false)`: not done (the kernel cannot collapse, or
    /// has no huge page free now); the caller reserves it the ordinary way.
    /// `Err`: reserving the seed pages failed (the same error the ordinary
    /// reservation would meet).
    pub(crate) fn reserve(
        &self,
        fd: std::os::fd::BorrowedFd<'_>,
        off: u64,
        len: usize,
        window: std::ptr::NonNull<u8>,
    ) -> io::Result<bool> {
        if !self.on.load(Relaxed) {
            return Ok(false);
        }
        for chunk in (0..len).step_by(self.pmd) {
            sys::fallocate(fd, 0, off + chunk as u64, sys::os_page_size() as u64)?;
        }
        // SAFETY: `window` maps `len` bytes of the handle file at `off`
        // (the page being reserved, claimed by the caller and used by no one
        // yet); collapsing keeps the data (zeros) and changes only how the
        // kernel backs it.
        match unsafe { sys::madvise(window, len, libc::MADV_COLLAPSE) } {
            Ok(()) => Ok(true),
            // The kernel cannot collapse this kind of memory (older than
            // 6.1, shmem THP denied): stop asking for this handle.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.on.store(false, Relaxed);
                Ok(false)
            }
            // No huge page to be had now (EAGAIN, ENOMEM): small pages this time.
            Err(_) => Ok(false),
        }
    }
}
