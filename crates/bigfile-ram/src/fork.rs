//! RAM handles across fork(2). A forked child inherits every handle's
//! descriptor, so its pages would be the parent's memory: a page the child
//! dropped (a hole punched) or wrote would be gone or changed in the parent,
//! and the child's allocations would take the parent's page indices. So in
//! the child every live handle is renewed before fork returns: a new empty
//! file of the same size, of the same backend, takes the old descriptor's
//! number (`dup3`), the handle's window is mapped onto it at the same
//! address, and the handle holds no page. Mappings of the old pages made
//! with [`RamHandle::map_page`](crate::RamHandle::map_page) or `map_page_fixed`
//! still show the parent's memory in the child: their owner replaces them
//! (bigfile-virtmem puts its reservations back).
//!
//! A handle whose renewal fails (no descriptor or memory left) is
//! *orphaned*: its window becomes private memory, and it allocates nothing,
//! failing with [`RamError::Forked`](crate::RamError::Forked).
//!
//! The handles' mutexes are taken before the fork (`prepare`) and given back
//! after it in both processes, so a child never finds one held by a thread
//! that does not exist there. `Ram::new` registers the handlers: before any
//! layer above, whose locks are taken before these (`bigfile_os::at_fork`).

use std::cell::RefCell;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, Once, Weak};

use crate::ram::{lock, Bitmap, Core, Locked};
use crate::sys;

/// Every live handle.
static HANDLES: Mutex<Vec<Weak<Core>>> = Mutex::new(Vec::new());

/// Register the fork handlers, once.
pub(crate) fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Without them a child could damage its parent's pages: no way on.
        bigfile_os::at_fork(prepare, parent, child).expect("pthread_atfork");
    });
}

/// Track a new handle.
pub(crate) fn track(core: &Arc<Core>) {
    let mut handles = HANDLES.lock().unwrap_or_else(|p| p.into_inner());
    handles.retain(|w| w.strong_count() > 0);
    handles.push(Arc::downgrade(core));
}

/// One handle's mutexes, held across a fork. The guards borrow `core`'s
/// mutexes: declared before it, they are dropped before it.
struct HeldHandle {
    _window_init: Locked<'static, ()>,
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
                    _window_init: extend(lock(&core.window_init)),
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
    let window = core.window.get().map(|w| (w.ptr, w.len));
    let windowed = match (renewed, window) {
        (Ok(()), Some((ptr, len))) => {
            // SAFETY: the window's own range, remapped onto the handle's
            // (new) file, as it was made; no page is allocated in it.
            unsafe {
                sys::mmap(
                    ptr.as_ptr(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_NORESERVE | libc::MAP_FIXED,
                    core.fd.as_fd(),
                    0,
                )
                .and_then(|_| sys::madvise(ptr, len, libc::MADV_DONTDUMP))
            }
            .is_ok()
        }
        (Ok(()), None) => true,
        (Err(()), _) => false,
    };
    if !windowed {
        core.orphaned.store(true, Ordering::Relaxed);
        if let Some((ptr, len)) = window {
            // The parent's memory must not stay reachable; a write through
            // the window by a load in progress lands in private memory.
            // SAFETY: the window's own range; no page of it is in use.
            if unsafe { sys::map_anonymous_over(ptr, len) }.is_err() {
                // SAFETY: as above; unmapped, a use faults.
                let _ = unsafe { sys::munmap(ptr, len) };
            }
        }
    }
    *h.used = Bitmap::default();
    h.stray.clear();
    *h.huge = Bitmap::default();
    core.account.forget_all();
}
