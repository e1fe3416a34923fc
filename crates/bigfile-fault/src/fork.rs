//! The registry across fork(2). A forked child has only the thread that
//! forked; whatever the others were doing in the registry is frozen there:
//! the writer lock one of them held would never be released, a reader
//! counted in the lookup would never leave (and a writer would wait for it
//! forever), and the handlers they were running would hold their range's
//! reference forever (and dropping its `Registration` would wait for them
//! forever). So the writer lock is taken before the fork and released
//! after it in both processes, and the child forgets the readers and the
//! running handlers of threads it does not have: its own (the forking
//! thread inside a handler) it keeps.

use std::cell::RefCell;
use std::sync::{Arc, Once};

use crate::frames::frames_serving;
use crate::halflock::WriteGuard;
use crate::table::{Table, TABLE};

thread_local! {
    /// The writer lock, held by the forking thread between `prepare` and
    /// `parent`/`child`.
    static HELD: RefCell<Option<WriteGuard<'static, Table>>> = const { RefCell::new(None) };
}

/// Register the fork handlers, once.
pub(crate) fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Without them a forked child could hang on its first registration.
        bigfile_os::at_fork(prepare, parent, child).expect("pthread_atfork");
    });
}

unsafe extern "C" fn prepare() {
    let guard = TABLE.write();
    HELD.with(|h| *h.borrow_mut() = Some(guard));
}

unsafe extern "C" fn parent() {
    HELD.with(|h| drop(h.borrow_mut().take()));
}

unsafe extern "C" fn child() {
    let Some(guard) = HELD.with(|h| h.borrow_mut().take()) else {
        return;
    };
    TABLE.forget_readers();
    if let Some(table) = guard.get() {
        for range in &table.ranges {
            // Held by: its Registration, this table, and each handler of it
            // running on a thread (a clone of the reference each).
            let ptr = Arc::as_ptr(range);
            let vanished = Arc::strong_count(range).saturating_sub(2 + frames_serving(ptr));
            for _ in 0..vanished {
                // SAFETY: these references belong to handlers of threads
                // the child does not have: nothing will ever drop them, and
                // the two known holders above keep the range alive.
                unsafe { Arc::decrement_strong_count(ptr) };
            }
        }
    }
    drop(guard);
}
