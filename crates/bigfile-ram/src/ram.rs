//! `Ram` (a source of pages) and `RamHandle` (one kernel file of pages).

use crate::error::RamError;
use crate::spec::{AllocPolicy, Backend, RamSpec};
use crate::sys;
use crate::thp::Collapser;
use bigfile_os::Prot;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Once, Weak};

use bigfile_os::HeldLock;

/// Page and byte counts of a RAM or a handle.
///
/// `bytes_resident` is `pages_allocated × page_size`. Under [`AllocPolicy::Reserve`] that is
/// exactly the memory taken; under [`AllocPolicy::OnTouch`] it is an upper bound (untouched
/// parts of a page take no memory).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RamStats {
    /// Pages allocated and not dropped.
    pub pages_allocated: u64,
    /// Bytes those pages hold at most.
    pub bytes_resident: u64,
}

/// A source of pages of one size from one backend. Cheap to clone (shared); `Send + Sync`.
///
/// ```
/// use bigfile_ram::{Ram, RamSpec};
/// let ram = Ram::new("memfd,pagesize=64K".parse()?)?;
/// assert_eq!(ram.page_size(), 64 << 10);
/// # Ok::<(), bigfile_ram::RamError>(())
/// ```
#[derive(Clone)]
pub struct Ram {
    inner: Arc<RamInner>,
}

struct RamInner {
    spec: RamSpec,
    /// Huge page size for hugetlbfs backends.
    huge_page_size: Option<usize>,
    pages: AtomicU64,
}

impl fmt::Debug for Ram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ram")
            .field("spec", &self.inner.spec)
            .field("huge_page_size", &self.inner.huge_page_size)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Ram {
    /// A RAM as `spec` says. Checks the page size against the backend, that a shmfs or
    /// hugetlbfs directory exists (and is on hugetlbfs for that backend), that hugetlb pages
    /// are reserved, and that the RAM can hold at least one page.
    pub fn new(spec: RamSpec) -> Result<Ram, RamError> {
        install_fork_handlers();
        let os = sys::os_page_size();
        if spec.page_size == 0 || spec.page_size % os != 0 {
            return Err(RamError::PageSize {
                page_size: spec.page_size,
                unit: os,
                unit_name: "OS",
            });
        }
        let huge_page_size = match &spec.backend {
            Backend::Memfd => None,
            Backend::Shmfs { dir } => {
                let info = sys::statfs(dir)
                    .map_err(|e| RamError::io(format!("shmfs directory {}", dir.display()), e))?;
                if !dir.is_dir() {
                    return Err(RamError::io(
                        format!("shmfs directory {}", dir.display()),
                        io::Error::from_raw_os_error(libc::ENOTDIR),
                    ));
                }
                if info.is_hugetlbfs {
                    return Err(RamError::io(
                        format!(
                            "shmfs directory {} is on hugetlbfs; use the hugetlbfs backend",
                            dir.display()
                        ),
                        io::Error::from_raw_os_error(libc::EINVAL),
                    ));
                }
                None
            }
            Backend::Hugetlbfs { dir } => Some(hugetlb_page_size(dir.as_deref(), spec.page_size)?),
        };
        let ram = Ram {
            inner: Arc::new(RamInner {
                spec,
                huge_page_size,
                pages: AtomicU64::new(0),
            }),
        };
        let max_size = ram.max_size();
        if max_size < ram.page_size() as u64 {
            return Err(RamError::TooSmall {
                max_size,
                page_size: ram.page_size(),
            });
        }
        Ok(ram)
    }

    /// The default backend (`BIGFILE_RAM`'s, when set) with pages of `page_size` bytes.
    pub fn with_page_size(page_size: usize) -> Result<Ram, RamError> {
        let mut spec = RamSpec::from_env()?;
        spec.page_size = page_size;
        Ram::new(spec)
    }

    /// Bytes per page.
    pub fn page_size(&self) -> usize {
        self.inner.spec.page_size
    }

    /// The spec this RAM was made from.
    pub fn spec(&self) -> &RamSpec {
        &self.inner.spec
    }

    /// Huge page size backing each page, for hugetlbfs backends.
    pub fn huge_page_size(&self) -> Option<usize> {
        self.inner.huge_page_size
    }

    /// The most bytes this RAM can hold now: physical memory for memfd, the mount's size for
    /// shmfs, the hugetlb pool (bounded by the mount's size, if any) for hugetlbfs. 0 when the
    /// backend cannot be queried. A handle's page indices range over this size at its opening.
    pub fn max_size(&self) -> u64 {
        match (&self.inner.spec.backend, self.inner.huge_page_size) {
            (Backend::Memfd, _) => sys::phys_mem(),
            (Backend::Shmfs { dir }, _) => sys::statfs(dir).map(|i| i.total).unwrap_or(0),
            (Backend::Hugetlbfs { dir }, Some(huge)) => {
                let pool = sys::huge_pool(huge).saturating_mul(huge as u64);
                match dir.as_deref().map(sys::statfs) {
                    Some(Ok(info)) if info.total > 0 => pool.min(info.total),
                    Some(Err(_)) => 0,
                    _ => pool,
                }
            }
            (Backend::Hugetlbfs { .. }, None) => 0,
        }
    }

    /// Pages allocated over all live handles of this RAM.
    pub fn stats(&self) -> RamStats {
        stats(self.inner.pages.load(Ordering::Relaxed), self.page_size())
    }

    /// A new handle: one new kernel file, sized to hold [`Ram::max_size`] bytes of pages.
    pub fn open_handle(&self) -> Result<RamHandle, RamError> {
        self.open_handle_with(true)
    }

    /// As [`Ram::open_handle`], but its pages are never collapsed into huge
    /// pages (`thp=collapse`): for a caller that maps them only by small
    /// entries, where a collapse would gain nothing, and fails (EBUSY, after
    /// up to milliseconds) while a mapping registered with a userfaultfd for
    /// missing faults covers the page's range, as mappings of pages taken
    /// away on bigfile-virtmem's userfaultfd backend do.
    pub fn open_handle_small(&self) -> Result<RamHandle, RamError> {
        self.open_handle_with(false)
    }

    /// A new handle; `thp`: its pages collapsed into huge pages as the spec
    /// says.
    fn open_handle_with(&self, thp: bool) -> Result<RamHandle, RamError> {
        let page_size = self.page_size();
        let max_pages = self.max_size() / page_size as u64;
        if max_pages == 0 {
            return Err(RamError::TooSmall {
                max_size: self.max_size(),
                page_size,
            });
        }
        let fd = self.new_file(max_pages)?;
        let core = Arc::new(Core {
            fd,
            page_size,
            max_pages,
            alloc: self.inner.spec.alloc,
            hugetlb: self.inner.huge_page_size.is_some(),
            used: Mutex::new(Bitmap::default()),
            account: Account {
                ram: self.clone(),
                pages: AtomicU64::new(0),
            },
            windows: Mutex::new(HashMap::new()),
            thp: crate::thp::collapse_size(&self.inner.spec)
                .filter(|_| thp)
                .map(Collapser::new),
            stray: Mutex::new(Vec::new()),
            huge: Mutex::new(Bitmap::default()),
            orphaned: AtomicBool::new(false),
        });
        track(&core);
        Ok(RamHandle { core })
    }

    /// A new kernel file for a handle of `max_pages` pages.
    pub(crate) fn new_file(&self, max_pages: u64) -> Result<OwnedFd, RamError> {
        let spec = &self.inner.spec;
        let fd = match (&spec.backend, self.inner.huge_page_size) {
            (Backend::Memfd, _) => sys::memfd_create(c"bigfile-ram", libc::MFD_CLOEXEC)
                .map_err(|e| RamError::io("memfd_create", e))?,
            (Backend::Hugetlbfs { dir: None }, Some(huge)) => {
                // MFD_HUGE_* encodes log2 of the huge page size above MFD_HUGE_SHIFT.
                let size_flag = huge.trailing_zeros() << libc::MFD_HUGE_SHIFT;
                let flags = libc::MFD_CLOEXEC | libc::MFD_HUGETLB | size_flag;
                sys::memfd_create(c"bigfile-ram", flags)
                    .map_err(|e| RamError::io("memfd_create(MFD_HUGETLB)", e))?
            }
            (Backend::Shmfs { dir } | Backend::Hugetlbfs { dir: Some(dir) }, _) => {
                sys::open_unlinked(dir)
                    .map_err(|e| RamError::io(format!("create a file in {}", dir.display()), e))?
            }
            (Backend::Hugetlbfs { dir: None }, None) => unreachable!("checked by Ram::new"),
        };
        let page_size = self.page_size() as u64;
        let size = max_pages
            .checked_mul(page_size)
            .ok_or(RamError::OutOfRange {
                page: max_pages,
                max_pages: u64::MAX / page_size,
            })?;
        sys::ftruncate(fd.as_fd(), size)
            .map_err(|e| RamError::io("size the handle file (ftruncate)", e))?;
        Ok(fd)
    }
}

/// Picks the huge page size for a hugetlbfs RAM of `page_size` bytes per page.
fn hugetlb_page_size(dir: Option<&Path>, page_size: usize) -> Result<usize, RamError> {
    let huge = match dir {
        Some(dir) => {
            let info = sys::statfs(dir)
                .map_err(|e| RamError::io(format!("hugetlbfs directory {}", dir.display()), e))?;
            if !info.is_hugetlbfs {
                return Err(RamError::NotHugetlbfs { dir: dir.into() });
            }
            let huge = info.block_size as usize;
            if page_size % huge != 0 {
                return Err(RamError::PageSize {
                    page_size,
                    unit: huge,
                    unit_name: "huge",
                });
            }
            huge
        }
        None => {
            let sizes = sys::huge_page_sizes();
            let Some(&smallest) = sizes.first() else {
                return Err(RamError::io(
                    "hugetlbfs: the kernel lists no huge page sizes in /sys/kernel/mm/hugepages",
                    io::ErrorKind::Unsupported.into(),
                ));
            };
            let fitting: Vec<usize> = sizes.into_iter().filter(|h| page_size % h == 0).collect();
            // The largest size dividing the page that has a pool; else the largest dividing.
            match fitting.iter().rev().find(|&&h| sys::huge_pool(h) > 0) {
                Some(&h) => h,
                None => match fitting.last() {
                    Some(&h) => h,
                    None => {
                        return Err(RamError::PageSize {
                            page_size,
                            unit: smallest,
                            unit_name: "huge",
                        })
                    }
                },
            }
        }
    };
    if sys::huge_pool(huge) == 0 {
        return Err(RamError::NoHugePages {
            huge_page_size: huge,
            pool: sys::huge_pool_path(huge),
        });
    }
    Ok(huge)
}

fn stats(pages: u64, page_size: usize) -> RamStats {
    RamStats {
        pages_allocated: pages,
        bytes_resident: pages.saturating_mul(page_size as u64),
    }
}

/// A handle's page count, mirrored into its RAM's; taken back from the RAM when dropped
/// (closing the file frees the memory).
pub(crate) struct Account {
    ram: Ram,
    pages: AtomicU64,
}

impl Account {
    pub(crate) fn ram(&self) -> &Ram {
        &self.ram
    }

    /// The handle holds no page any more (a forked child's renewed file).
    pub(crate) fn forget_all(&self) {
        let n = self.pages.swap(0, Ordering::Relaxed);
        self.ram.inner.pages.fetch_sub(n, Ordering::Relaxed);
    }

    fn add(&self) {
        self.pages.fetch_add(1, Ordering::Relaxed);
        self.ram.inner.pages.fetch_add(1, Ordering::Relaxed);
    }

    fn sub(&self) {
        self.pages.fetch_sub(1, Ordering::Relaxed);
        self.ram.inner.pages.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Account {
    fn drop(&mut self) {
        let n = self.pages.load(Ordering::Relaxed);
        self.ram.inner.pages.fetch_sub(n, Ordering::Relaxed);
    }
}

/// Which page indices are allocated: one bit per page, in words kept only
/// where a bit is set (indices of a handle sized for a whole file's blocks
/// are sparse and can be huge).
#[derive(Default)]
pub(crate) struct Bitmap {
    words: std::collections::BTreeMap<u64, u64>,
}

impl Bitmap {
    fn word(&self, w: u64) -> u64 {
        self.words.get(&w).copied().unwrap_or(0)
    }

    fn get(&self, i: u64) -> bool {
        self.word(i / 64) & (1 << (i % 64)) != 0
    }

    fn set(&mut self, i: u64, on: bool) {
        let w = i / 64;
        let bit = 1u64 << (i % 64);
        if on {
            *self.words.entry(w).or_insert(0) |= bit;
        } else if let Some(word) = self.words.get_mut(&w) {
            *word &= !bit;
            if *word == 0 {
                self.words.remove(&w);
            }
        }
    }

    /// The first clear bit in `from..end`.
    fn first_free(&self, from: u64, end: u64) -> Option<u64> {
        let mut i = from;
        while i < end {
            let w = i / 64;
            // Bits below `i` in this word count as taken.
            let taken = self.word(w) | ((1u64 << (i % 64)) - 1);
            if taken != u64::MAX {
                let found = w * 64 + u64::from(taken.trailing_ones());
                return (found < end).then_some(found);
            }
            i = (w + 1) * 64;
        }
        None
    }

    /// The last clear bit below `below`.
    fn last_free(&self, below: u64) -> Option<u64> {
        let mut i = below;
        while i > 0 {
            let last = i - 1;
            let w = last / 64;
            // Bits above `last` in this word count as taken.
            let taken = self.word(w) | !(u64::MAX >> (63 - last % 64));
            if taken != u64::MAX {
                return Some(w * 64 + 63 - u64::from(taken.leading_ones()));
            }
            i = w * 64;
        }
        None
    }
}

/// One persistent read-write mapping of a segment of a handle file.
pub(crate) struct Window {
    pub(crate) ptr: NonNull<u8>,
    pub(crate) len: usize,
}

// SAFETY: `Window` is an address range owned by its handle; it never dereferences it, and
// the pointers it hands out are raw, their use governed by the callers' own rules.
unsafe impl Send for Window {}
// SAFETY: as above; `&Window` only reads the two fields.
unsafe impl Sync for Window {}

impl Window {
    fn unmap(self) -> io::Result<()> {
        let w = ManuallyDrop::new(self);
        // SAFETY: the window's range was mapped by `RamHandle::window` and is unmapped once:
        // `ManuallyDrop` keeps `Drop` from doing it again.
        unsafe { sys::munmap(w.ptr, w.len) }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: the range is ours (mapped in `RamHandle::window`), unmapped only here.
        // An error cannot be reported from drop; `RamHandle::close` reports it instead.
        let _ = unsafe { sys::munmap(self.ptr, self.len) };
    }
}

/// Bytes of the handle file each window mapping covers (see [`RamHandle::window`]).
pub const WINDOW_SEGMENT: u64 = 1 << 30;

/// One kernel file of pages from a [`Ram`]: page index `i` lives at file offset
/// `i × page_size`, so pages at adjacent indices mapped at adjacent addresses merge into one
/// kernel VMA. `Send + Sync`; every method takes `&self`.
///
/// The handle does not track the mappings it makes: unmapping them is the caller's business
/// ([`unmap`] or plain `munmap`). Closing the handle keeps existing mappings valid (they hold
/// the file); only the window goes away.
pub struct RamHandle {
    core: Arc<Core>,
}

/// A handle's state, shared with the registry of live handles that a
/// forked child renews (`fork.rs`).
pub(crate) struct Core {
    pub(crate) fd: OwnedFd,
    pub(crate) page_size: usize,
    pub(crate) max_pages: u64,
    pub(crate) alloc: AllocPolicy,
    pub(crate) hugetlb: bool,
    pub(crate) used: Mutex<Bitmap>,
    pub(crate) account: Account,
    /// The handle file mapped for filling pages, in segments of
    /// [`WINDOW_SEGMENT`] bytes made on first use (by segment index).
    pub(crate) windows: Mutex<HashMap<u64, Window>>,
    /// Makes new pages transparent huge pages ([`crate::ThpPolicy`]), when eligible.
    pub(crate) thp: Option<Collapser>,
    /// Pages given up by `drop_page` whose memory could not be returned (the hole punch
    /// failed): still allocated and counted, handed out first by `alloc_page`.
    pub(crate) stray: Mutex<Vec<u64>>,
    /// Pages made of transparent huge pages (see [`RamHandle::is_huge`]).
    pub(crate) huge: Mutex<Bitmap>,
    /// Inherited by a forked child that could not give it a file of its
    /// own (`fork.rs`): its file is still the parent's, so no page is
    /// allocated in it or written through its window.
    pub(crate) orphaned: AtomicBool,
}

impl fmt::Debug for RamHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RamHandle")
            .field("fd", &self.core.fd)
            .field("page_size", &self.core.page_size)
            .field("max_pages", &self.core.max_pages)
            .field("alloc", &self.core.alloc)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl RamHandle {
    /// Bytes per page.
    pub fn page_size(&self) -> usize {
        self.core.page_size
    }

    /// Number of page indices: valid pages are `0..max_pages()`.
    pub fn max_pages(&self) -> u64 {
        self.core.max_pages
    }

    /// Pages allocated in this handle.
    pub fn stats(&self) -> RamStats {
        stats(
            self.core.account.pages.load(Ordering::Relaxed),
            self.core.page_size,
        )
    }

    /// The handle's kernel file.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.core.fd.as_fd()
    }

    fn used(&self) -> Locked<'_, Bitmap> {
        // A panic while holding the lock cannot leave the bitmap half-updated (each update
        // is one bit), so a poisoned lock is still consistent.
        lock(&self.core.used)
    }

    fn offset(&self, page: u64) -> u64 {
        page * self.core.page_size as u64
    }

    /// Fails for a handle a forked child could not renew (`fork.rs`).
    fn check_own_file(&self) -> Result<(), RamError> {
        if self.core.orphaned.load(Ordering::Relaxed) {
            return Err(RamError::Forked);
        }
        Ok(())
    }

    fn check_allocated(&self, page: u64) -> Result<(), RamError> {
        if page >= self.core.max_pages {
            return Err(RamError::OutOfRange {
                page,
                max_pages: self.core.max_pages,
            });
        }
        if !self.used().get(page) {
            return Err(RamError::NotAllocated { page });
        }
        Ok(())
    }

    /// Whether `page` is allocated.
    pub fn is_allocated(&self, page: u64) -> bool {
        page < self.core.max_pages && self.used().get(page)
    }

    /// Whether `page` is backed by huge pages (made transparent huge pages
    /// when allocated, or any page of a hugetlbfs RAM), so that the first
    /// access through a suitably aligned mapping maps it whole: populating
    /// such a mapping ahead of use saves nothing.
    pub fn is_huge(&self, page: u64) -> bool {
        self.core.hugetlb || lock(&self.core.huge).get(page)
    }

    /// Allocates a page: `hint` itself when free (a hint beyond the handle counts as its last
    /// page), else the nearest free index above it, else the nearest below. Under
    /// [`AllocPolicy::Reserve`] the memory is taken now; the kernel's ENOSPC/ENOMEM is
    /// [`RamError::Exhausted`], a handle with every index taken is [`RamError::HandleFull`].
    ///
    /// A page whose [`RamHandle::drop_page`] failed is handed out first, with its old
    /// contents (its memory is still held, so this takes none).
    pub fn alloc_page(&self, hint: u64) -> Result<u64, RamError> {
        self.check_own_file()?;
        if let Some(page) = lock(&self.core.stray).pop() {
            return Ok(page);
        }
        let hint = hint.min(self.core.max_pages - 1);
        let page = {
            let mut used = self.used();
            let page = used
                .first_free(hint, self.core.max_pages)
                .or_else(|| used.last_free(hint))
                .ok_or(RamError::HandleFull {
                    max_pages: self.core.max_pages,
                })?;
            used.set(page, true);
            page
        };
        self.reserve_claimed(page)?;
        self.core.account.add();
        Ok(page)
    }

    /// Take claimed `page`'s memory now under [`AllocPolicy::Reserve`];
    /// on failure the claim is given up. The index is claimed, so this runs
    /// without the lock.
    fn reserve_claimed(&self, page: u64) -> Result<(), RamError> {
        if self.core.alloc != AllocPolicy::Reserve {
            return Ok(());
        }
        #[cfg(feature = "failpoints")]
        if let Err(e) = sys::failpoint("ram::alloc_page") {
            self.used().set(page, false);
            return Err(exhausted_or_io(e, page, self.core.page_size));
        }
        if self.reserve_huge(page) {
            lock(&self.core.huge).set(page, true);
        } else if let Err(e) =
            sys::fallocate(self.fd(), 0, self.offset(page), self.core.page_size as u64)
        {
            // Seed pages of a failed huge reservation may be there.
            let _ = self.punch(page);
            self.used().set(page, false);
            return Err(exhausted_or_io(e, page, self.core.page_size));
        }
        Ok(())
    }

    /// Reserve claimed `page` as transparent huge pages; false when that was
    /// not done and the page needs the ordinary reservation.
    fn reserve_huge(&self, page: u64) -> bool {
        let Some(thp) = &self.core.thp else {
            return false;
        };
        let Ok(window) = self.window(page) else {
            return false;
        };
        // A seed-page failure is left to the ordinary reservation to meet
        // and report.
        thp.reserve(self.fd(), self.offset(page), self.core.page_size, window)
            .unwrap_or(false)
    }

    fn punch(&self, page: u64) -> std::io::Result<()> {
        sys::fallocate(
            self.fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            self.offset(page),
            self.core.page_size as u64,
        )
    }

    fn mmap_page(
        &self,
        page: u64,
        addr: *mut u8,
        prot: Prot,
        fixed: bool,
    ) -> Result<NonNull<u8>, RamError> {
        self.check_allocated(page)?;
        #[cfg(feature = "failpoints")]
        sys::failpoint("ram::map_page")
            .map_err(|e| RamError::io(format!("map page {page} (mmap)"), e))?;
        let flags = libc::MAP_SHARED | if fixed { libc::MAP_FIXED } else { 0 };
        // SAFETY: without MAP_FIXED the kernel picks a free range; with it, `map_page_fixed`'s
        // caller vouches for `addr`.
        unsafe {
            sys::mmap(
                addr,
                self.core.page_size,
                prot.bits(),
                flags,
                self.fd(),
                self.offset(page),
            )
        }
        .map_err(|e| RamError::io(format!("map page {page} (mmap)"), e))
    }

    /// Maps allocated `page` at a new address chosen by the kernel (`MAP_SHARED`).
    pub fn map_page(&self, page: u64, prot: Prot) -> Result<NonNull<u8>, RamError> {
        self.mmap_page(page, ptr::null_mut(), prot, false)
    }

    /// Maps allocated `page` at `addr` (`MAP_FIXED`, `MAP_SHARED`). `addr` must be a multiple
    /// of the page size.
    ///
    /// # Safety
    /// Whatever is mapped at `addr..addr + page_size` is replaced: the caller must own that
    /// range, and no Rust reference may point into it.
    pub unsafe fn map_page_fixed(
        &self,
        page: u64,
        addr: NonNull<u8>,
        prot: Prot,
    ) -> Result<(), RamError> {
        if addr.as_ptr() as usize % self.core.page_size != 0 {
            return Err(RamError::Unaligned {
                addr: addr.as_ptr() as usize,
                page_size: self.core.page_size,
            });
        }
        self.mmap_page(page, addr.as_ptr(), prot, true).map(drop)
    }

    /// A pointer to allocated `page` inside a persistent read-write shared mapping of the
    /// handle file (made on first use, 1 GiB at a time, `MAP_NORESERVE`), so a
    /// loader fills pages without a mapping per page. Valid while the handle lives; writes
    /// through it are seen by every mapping of the page.
    pub fn window(&self, page: u64) -> Result<NonNull<u8>, RamError> {
        self.check_allocated(page)?;
        self.check_own_file()?;
        let per = self.segment_pages();
        let (seg, within) = (page / per, page % per);
        let mut windows = lock(&self.core.windows);
        let w = match windows.entry(seg) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let pages = per.min(self.core.max_pages - seg * per);
                let len = (pages * self.core.page_size as u64) as usize;
                #[cfg(feature = "failpoints")]
                sys::failpoint("ram::window")
                    .map_err(|e| RamError::io("map the handle window (mmap)", e))?;
                // Page-aligned: huge pages (hugetlb, or transparent ones) can
                // only be mapped at addresses aligned to them.
                let ptr = sys::mmap_aligned(
                    len,
                    self.core.page_size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_NORESERVE,
                    self.fd(),
                    self.offset(seg * per),
                )
                .map_err(|e| RamError::io("map the handle window (mmap)", e))?;
                // A core dump would read every page of the window, allocating
                // the holes (measured: 24 GB of core for one loaded page).
                // The pages are dumped where they are mapped for use, if the
                // dump filter says so.
                // SAFETY: the range was just mapped, and excluding it from
                // core dumps changes no data.
                let _ = unsafe { sys::madvise(ptr, len, libc::MADV_DONTDUMP) };
                e.insert(Window { ptr, len })
            }
        };
        // SAFETY: `within < per` pages, inside this segment's mapping.
        Ok(unsafe { w.ptr.add((within * self.core.page_size as u64) as usize) })
    }

    /// Pages per window segment: [`WINDOW_SEGMENT`] bytes, at least one page.
    fn segment_pages(&self) -> u64 {
        (WINDOW_SEGMENT / self.core.page_size as u64).max(1)
    }

    /// Returns `page`'s memory to the OS (`fallocate(PUNCH_HOLE)`); the page reads back as
    /// zeros through every mapping of it, and its index is free again. A fault through a
    /// mapping that is still there populates a fresh zeroed page (and takes memory again,
    /// uncounted): unmap or protect such mappings first. Dropping the same page from two
    /// threads at once is a caller bug (the page table above owns each page once).
    ///
    /// If the hole punch fails the error is returned, but the page is given up all the same:
    /// its memory, still held and still counted, goes to the next [`RamHandle::alloc_page`],
    /// so a failure costs one page until then instead of one page until the handle closes.
    pub fn drop_page(&self, page: u64) -> Result<(), RamError> {
        self.check_allocated(page)?;
        let punched = {
            #[cfg(feature = "failpoints")]
            let punched = sys::failpoint("ram::drop_page");
            #[cfg(not(feature = "failpoints"))]
            let punched = Ok(());
            punched.and_then(|()| self.punch(page))
        };
        let mut stray = lock(&self.core.stray);
        // A retried drop of a stray page must not list it twice (it would be
        // handed out twice), and a drop that succeeds takes it off the list.
        stray.retain(|&p| p != page);
        if let Err(e) = punched {
            stray.push(page);
            return Err(RamError::io(
                format!("drop page {page} (fallocate PUNCH_HOLE)"),
                e,
            ));
        }
        drop(stray);
        lock(&self.core.huge).set(page, false);
        let mut used = self.used();
        if used.get(page) {
            used.set(page, false);
            self.core.account.sub();
        }
        Ok(())
    }

    /// Closes the handle, reporting errors that dropping it would ignore. Mappings of its
    /// pages stay valid; the window is unmapped.
    pub fn close(self) -> Result<(), RamError> {
        // The registry of live handles holds it for a moment while a fork
        // is prepared: then it goes when the last holder drops it.
        let Ok(Core { fd, windows, .. }) = Arc::try_unwrap(self.core) else {
            return Ok(());
        };
        let unmapped = windows
            .into_inner()
            .unwrap_or_else(|p| p.into_inner())
            .into_values()
            .map(Window::unmap)
            .fold(Ok(()), Result::and);
        let closed = sys::close(fd);
        unmapped.map_err(|e| RamError::io("unmap the handle window (munmap)", e))?;
        closed.map_err(|e| RamError::io("close the handle file", e))
    }

    /// Whether pages come from the hugetlb pool.
    pub fn is_hugetlb(&self) -> bool {
        self.core.hugetlb
    }
}

/// One of a handle's mutexes, held, and counted as held by this thread
/// (`bigfile_os::HeldLock`): a page fault taken meanwhile, from a signal
/// handler, could need it, and fails rather than waits for this thread.
pub(crate) struct Locked<'a, T> {
    // Dropped first: the count goes before the lock does.
    _held: HeldLock,
    guard: MutexGuard<'a, T>,
}

impl<T> Deref for Locked<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for Locked<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

/// Take `m`. A panic while it was held leaves its data consistent (every
/// update is one step), so poisoning is ignored.
pub(crate) fn lock<T>(m: &Mutex<T>) -> Locked<'_, T> {
    let guard = m.lock().unwrap_or_else(|p| p.into_inner());
    Locked {
        _held: HeldLock::enter(),
        guard,
    }
}

/// The error of a failed page reservation: running out of memory is
/// [`RamError::Exhausted`] (reclaim and retry can help), anything else an I/O error.
fn exhausted_or_io(e: io::Error, page: u64, page_size: usize) -> RamError {
    match e.raw_os_error() {
        Some(libc::ENOSPC | libc::ENOMEM) => RamError::Exhausted {
            page_size,
            source: e,
        },
        _ => RamError::io(format!("reserve page {page} (fallocate)"), e),
    }
}

/// Unmaps `len` bytes at `addr` (`munmap`), for mappings made by [`RamHandle::map_page`].
///
/// # Safety
/// The range is mapped memory the caller owns; nothing refers to it afterwards.
pub unsafe fn unmap(addr: NonNull<u8>, len: usize) -> Result<(), RamError> {
    // SAFETY: forwarded to the caller.
    unsafe { sys::munmap(addr, len) }.map_err(|e| RamError::io("munmap", e))
}

// --- fork(2) ---
// RAM handles across fork(2). A forked child inherits every handle's
// descriptor, so its pages would be the parent's memory: a page the child
// dropped (a hole punched) or wrote would be gone or changed in the parent,
// and the child's allocations would take the parent's page indices. So in
// the child every live handle is renewed before fork returns: a new empty
// file of the same size, of the same backend, takes the old descriptor's
// number (`dup3`), the handle's window segments are mapped onto it at the
// same addresses, and the handle holds no page. Mappings of the old pages made
// with [`RamHandle::map_page`](crate::RamHandle::map_page) or `map_page_fixed`
// still show the parent's memory in the child: their owner replaces them
// (bigfile-virtmem puts its reservations back).
//
// A handle whose renewal fails (no descriptor or memory left) is
// *orphaned*: its window segments become private memory, and it allocates nothing,
// failing with [`RamError::Forked`](crate::RamError::Forked).
//
// The handles' mutexes are taken before the fork (`prepare`) and given back
// after it in both processes, so a child never finds one held by a thread
// that does not exist there. `Ram::new` registers the handlers: before any
// layer above, whose locks are taken before these (`bigfile_os::at_fork`).

/// Every live handle.
static HANDLES: Mutex<Vec<Weak<Core>>> = Mutex::new(Vec::new());

/// Register the fork handlers, once.
fn install_fork_handlers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Without them a child could damage its parent's pages: no way on.
        bigfile_os::at_fork(prepare, parent, child).expect("pthread_atfork");
    });
}

/// Track a new handle.
fn track(core: &Arc<Core>) {
    let mut handles = HANDLES.lock().unwrap_or_else(|p| p.into_inner());
    handles.retain(|w| w.strong_count() > 0);
    handles.push(Arc::downgrade(core));
}

/// One handle's mutexes, held across a fork. The guards borrow `core`'s
/// mutexes: declared before it, they are dropped before it.
struct HeldHandle {
    windows: Locked<'static, HashMap<u64, Window>>,
    used: Locked<'static, Bitmap>,
    stray: Locked<'static, Vec<u64>>,
    huge: Locked<'static, Bitmap>,
    core: Arc<Core>,
}

struct Held {
    handles: Vec<HeldHandle>,
    _registry: MutexGuard<'static, Vec<Weak<Core>>>,
}

thread_local! {
    /// What the forking thread holds between `prepare` and `parent`/`child`
    /// (the same thread runs all three).
    static HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
}

/// Extend a guard's borrow of `core`'s mutex to `'static`.
///
/// # Safety
/// The guard must be dropped before the last `Arc` of the `Core` whose
/// mutex it holds (`HeldHandle` keeps that order).
unsafe fn extend<T>(guard: Locked<'_, T>) -> Locked<'static, T> {
    // SAFETY: the same type but for the lifetime; the caller keeps the
    // mutex alive for as long as the guard.
    unsafe { std::mem::transmute::<Locked<'_, T>, Locked<'static, T>>(guard) }
}

unsafe extern "C" fn prepare() {
    let registry = HANDLES.lock().unwrap_or_else(|p| p.into_inner());
    let handles = registry
        .iter()
        .filter_map(Weak::upgrade)
        .map(|core| {
            // SAFETY: each guard is stored beside the `Arc` that keeps its
            // mutex alive, and dropped first.
            unsafe {
                HeldHandle {
                    windows: extend(lock(&core.windows)),
                    used: extend(lock(&core.used)),
                    stray: extend(lock(&core.stray)),
                    huge: extend(lock(&core.huge)),
                    core: core.clone(),
                }
            }
        })
        .collect();
    HELD.with(|h| {
        *h.borrow_mut() = Some(Held {
            handles,
            _registry: registry,
        })
    });
}

unsafe extern "C" fn parent() {
    HELD.with(|h| drop(h.borrow_mut().take()));
}

unsafe extern "C" fn child() {
    let Some(mut held) = HELD.with(|h| h.borrow_mut().take()) else {
        return;
    };
    for h in &mut held.handles {
        renew(h);
    }
}

/// Give handle `h` (its mutexes held) a file of its own in the child.
fn renew(h: &mut HeldHandle) {
    let core = &*h.core;
    let renewed = core
        .account
        .ram()
        .new_file(core.max_pages)
        .map_err(|_| ())
        .and_then(|file| sys::dup_onto(file.as_fd(), core.fd.as_fd()).map_err(drop));
    let per = (WINDOW_SEGMENT / core.page_size as u64).max(1);
    let mut windowed = renewed.is_ok();
    for (&seg, w) in h.windows.iter() {
        if windowed {
            // SAFETY: the segment's own range, remapped onto the handle's
            // (new) file at the offset it was made for; no page is
            // allocated in it.
            windowed = unsafe {
                sys::mmap(
                    w.ptr.as_ptr(),
                    w.len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_NORESERVE | libc::MAP_FIXED,
                    core.fd.as_fd(),
                    seg * per * core.page_size as u64,
                )
                .and_then(|_| sys::madvise(w.ptr, w.len, libc::MADV_DONTDUMP))
            }
            .is_ok();
        }
    }
    if !windowed {
        core.orphaned.store(true, Ordering::Relaxed);
        for w in h.windows.values() {
            // The parent's memory must not stay reachable; a write through
            // the window by a load in progress lands in private memory.
            // SAFETY: the segment's own range; no page of it is in use.
            if unsafe { sys::map_anonymous_over(w.ptr, w.len) }.is_err() {
                // SAFETY: as above; unmapped, a use faults.
                let _ = unsafe { sys::munmap(w.ptr, w.len) };
            }
        }
    }
    *h.used = Bitmap::default();
    h.stray.clear();
    *h.huge = Bitmap::default();
    core.account.forget_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_search() {
        let mut b = Bitmap::default();
        assert_eq!(b.first_free(5, 10), Some(5));
        assert_eq!(b.last_free(5), Some(4));
        assert_eq!(b.last_free(0), None);
        for i in 0..130 {
            b.set(i, true);
        }
        assert_eq!(b.first_free(0, 200), Some(130));
        assert_eq!(b.first_free(0, 130), None);
        assert_eq!(b.last_free(130), None);
        b.set(63, false);
        b.set(64, false);
        assert_eq!(b.first_free(10, 200), Some(63));
        assert_eq!(b.first_free(64, 200), Some(64));
        assert_eq!(b.first_free(65, 200), Some(130));
        assert_eq!(b.last_free(129), Some(64));
        assert_eq!(b.last_free(64), Some(63));
        assert_eq!(b.last_free(63), None);
        b.set(1000, false);
        assert!(!b.get(1000));
    }

    #[test]
    fn alloc_follows_hint() {
        let ram = Ram::new("memfd,pagesize=4K".parse().unwrap()).unwrap();
        let h = ram.open_handle().unwrap();
        assert_eq!(h.alloc_page(10).unwrap(), 10);
        assert_eq!(h.alloc_page(10).unwrap(), 11);
        assert_eq!(h.alloc_page(u64::MAX).unwrap(), h.max_pages() - 1);
        assert_eq!(h.alloc_page(u64::MAX).unwrap(), h.max_pages() - 2);
        assert_eq!(h.stats().pages_allocated, 4);
        assert_eq!(ram.stats().bytes_resident, 4 * 4096);
        h.drop_page(10).unwrap();
        assert!(!h.is_allocated(10));
        assert_eq!(h.alloc_page(9).unwrap(), 9);
        assert_eq!(h.alloc_page(9).unwrap(), 10);
        let h2 = ram.open_handle().unwrap();
        h2.alloc_page(0).unwrap();
        assert_eq!(ram.stats().pages_allocated, 6);
        drop(h);
        assert_eq!(ram.stats().pages_allocated, 1);
        h2.close().unwrap();
        assert_eq!(ram.stats(), RamStats::default());
    }

    /// A failed hole punch gives the page up all the same: still held and counted, then
    /// handed out by the next allocation, after which the counts are exact again.
    #[cfg(feature = "failpoints")]
    #[test]
    fn failed_drop_keeps_the_page_for_the_next_alloc() {
        let _scenario = fail::FailScenario::setup();
        let ram = Ram::new("memfd,pagesize=4K".parse().unwrap()).unwrap();
        let h = ram.open_handle().unwrap();
        let a = h.alloc_page(3).unwrap();
        let b = h.alloc_page(7).unwrap();
        fail::cfg("ram::drop_page", &format!("1*return({})", libc::EIO)).unwrap();
        assert!(matches!(h.drop_page(a), Err(RamError::Io { .. })));
        assert!(h.is_allocated(a));
        assert_eq!(ram.stats().pages_allocated, 2);
        // The stray page comes first, whatever the hint; then allocation is as usual.
        assert_eq!(h.alloc_page(100).unwrap(), a);
        assert_eq!(h.alloc_page(100).unwrap(), 100);
        assert_eq!(ram.stats().pages_allocated, 3);
        for p in [a, b, 100] {
            h.drop_page(p).unwrap();
        }
        assert_eq!(ram.stats(), RamStats::default());
    }

    #[cfg(feature = "failpoints")]
    #[test]
    fn a_retried_failed_drop_does_not_hand_the_page_out_twice() {
        let _scenario = fail::FailScenario::setup();
        let ram = Ram::new("memfd,pagesize=4K".parse().unwrap()).unwrap();
        let h = ram.open_handle().unwrap();
        let a = h.alloc_page(3).unwrap();
        fail::cfg("ram::drop_page", &format!("2*return({})", libc::EIO)).unwrap();
        assert!(h.drop_page(a).is_err());
        assert!(h.drop_page(a).is_err());
        fail::remove("ram::drop_page");
        assert_eq!(h.alloc_page(0).unwrap(), a);
        assert_ne!(h.alloc_page(0).unwrap(), a, "the stray page is listed once");
        // A drop that succeeds takes a page off the list.
        let b = h.alloc_page(9).unwrap();
        fail::cfg("ram::drop_page", &format!("1*return({})", libc::EIO)).unwrap();
        assert!(h.drop_page(b).is_err());
        h.drop_page(b).unwrap();
        assert!(!h.is_allocated(b));
        assert_eq!(h.alloc_page(50).unwrap(), 50, "no stray page is left");
    }
}
