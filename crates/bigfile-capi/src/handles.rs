//! The handles C holds: opaque tokens, never addresses, looked up in a
//! registry per kind of object.
//!
//! A token is a number that is never reused in the process, so every misuse
//! of a handle is detected instead of being undefined behaviour: NULL, a
//! handle freed or closed before (a second close), a handle of another kind
//! (a `bigfile_vma *` cast to `bigfile_fileh *`), or any other value. C
//! never dereferences a token; it only passes it back.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::CError;

/// Tokens are multiples of this, so they look like aligned pointers to
/// whatever inspects them (debuggers, a foreign runtime's checks).
const TOKEN_STEP: usize = 16;

/// The first token. Foreign runtimes hold tokens in pointer-typed
/// variables and some check those: Go's aborts on a pointer below 4096 on
/// a stack, and looks up values that fall in its heap (from 0xc000000000).
/// Tokens start at 4 GiB, with 50 billion handles before Go's heap.
/// (A 64-bit constant: this crate is for 64-bit targets.)
const TOKEN_BASE: usize = 1 << 32;

/// The next token's number, shared by every kind: a token of one kind is
/// never a live token of another.
static NEXT: AtomicUsize = AtomicUsize::new(1);

/// The live objects of one kind, by token.
pub(crate) struct Registry<T> {
    /// The C type's name, for messages.
    kind: &'static str,
    live: RwLock<BTreeMap<usize, Arc<T>>>,
}

impl<T> Registry<T> {
    pub(crate) const fn new(kind: &'static str) -> Registry<T> {
        Registry {
            kind,
            live: RwLock::new(BTreeMap::new()),
        }
    }

    // The map stays consistent whatever panicked while holding the lock (an
    // insert or remove either happened or not), so poisoning is ignored.
    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<usize, Arc<T>>> {
        self.live.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<usize, Arc<T>>> {
        self.live.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Register `obj`; its token, as the C handle type `P`.
    pub(crate) fn insert<P>(&self, obj: T) -> Result<*mut P, CError> {
        let token = NEXT
            .fetch_add(1, Relaxed)
            .checked_mul(TOKEN_STEP)
            .and_then(|t| t.checked_add(TOKEN_BASE))
            .ok_or_else(|| CError::state("no handle numbers left in this process"))?;
        self.write().insert(token, Arc::new(obj));
        Ok(token as *mut P)
    }

    fn not_live<P>(&self, handle: *const P) -> CError {
        if handle.is_null() {
            CError::invalid(format!("{} is NULL", self.kind))
        } else {
            CError::invalid(format!(
                "{handle:p} is not a live {} (already freed or closed, or another kind of handle)",
                self.kind
            ))
        }
    }

    /// The live object behind `handle`. The object stays alive while the
    /// result does, even if another thread frees the handle meanwhile.
    pub(crate) fn get<P>(&self, handle: *const P) -> Result<Arc<T>, CError> {
        self.read()
            .get(&(handle as usize))
            .cloned()
            .ok_or_else(|| self.not_live(handle))
    }

    /// Unregister `handle`; the object is dropped when the result and every
    /// call still using it are done. Drop the result outside any lock: that
    /// may unmap memory and call the file's `release`.
    pub(crate) fn remove<P>(&self, handle: *const P) -> Result<Arc<T>, CError> {
        self.write()
            .remove(&(handle as usize))
            .ok_or_else(|| self.not_live(handle))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::BIGFILE_ERROR_INVALID;

    struct A;
    struct B;

    #[test]
    fn misuse_of_tokens_is_an_error() {
        static AS: Registry<u32> = Registry::new("bigfile_a");
        static BS: Registry<u32> = Registry::new("bigfile_b");
        let a: *mut A = AS.insert(1).unwrap();
        let b: *mut B = BS.insert(2).unwrap();
        assert!(a as usize > TOKEN_BASE);
        assert_eq!(a as usize % TOKEN_STEP, 0);
        assert_eq!(*AS.get(a).unwrap(), 1);
        // Another kind's token, NULL and garbage are not live here.
        let e = AS.get(b as *const A).unwrap_err();
        assert_eq!(e.kind(), BIGFILE_ERROR_INVALID);
        assert!(AS.get(std::ptr::null::<A>()).is_err());
        assert!(AS.get(0x1234 as *const A).is_err());
        // A second removal is an error, and the token is never given again.
        let kept = AS.get(a).unwrap();
        assert_eq!(*AS.remove(a).unwrap(), 1);
        assert!(AS.remove(a).is_err());
        assert!(AS.get(a).is_err());
        assert_eq!(*kept, 1, "users of a removed object keep it alive");
        let again: *mut A = AS.insert(3).unwrap();
        assert_ne!(again, a);
    }
}
