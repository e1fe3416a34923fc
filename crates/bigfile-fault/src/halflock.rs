//! A published value that a signal handler can read without taking any lock:
//! readers announce themselves on an atomic counter and load a pointer;
//! writers (serialized by an ordinary mutex) build a new value, swap the
//! pointer and wait for the readers that may still see the old one before
//! freeing it. Readers never wait; writers wait only for readers, whose
//! critical sections are a few instructions long.
//!
//! Readers count themselves in one of two slots chosen by the epoch's parity.
//! After the swap the writer advances the epoch twice, each time waiting for
//! the slot it just retired to drain: a reader that picked its slot before the
//! swap, however late it increments it, is then either gone or in a drained slot
//! that the writer waits on again. (One flip is not enough: a reader that read
//! the epoch before the first flip but incremented after the wait could be in
//! the slot the writer no longer watches.)

use std::marker::PhantomData;
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard};

pub(crate) struct HalfLock<T> {
    writer: Mutex<()>,
    current: AtomicPtr<T>,
    epoch: AtomicUsize,
    readers: [AtomicUsize; 2],
    _owns: PhantomData<Box<T>>,
}

impl<T> HalfLock<T> {
    pub(crate) const fn new() -> Self {
        Self {
            writer: Mutex::new(()),
            current: AtomicPtr::new(ptr::null_mut()),
            epoch: AtomicUsize::new(0),
            readers: [AtomicUsize::new(0), AtomicUsize::new(0)],
            _owns: PhantomData,
        }
    }

    /// Runs `f` on the current value (None before the first publish).
    /// Async-signal-safe: atomics only.
    pub(crate) fn read<R>(&self, f: impl FnOnce(Option<&T>) -> R) -> R {
        let slot = &self.readers[self.epoch.load(SeqCst) & 1];
        slot.fetch_add(1, SeqCst);
        let p = self.current.load(SeqCst);
        // SAFETY: a published pointer came from Box::into_raw, and a writer
        // frees it only after every reader counted before its swap has left
        // (see the module docs); we are counted until the fetch_sub below.
        let r = f(unsafe { p.as_ref() });
        slot.fetch_sub(1, SeqCst);
        r
    }

    /// In a forked child: no thread is reading any more (the readers
    /// counted were other threads of the parent).
    pub(crate) fn forget_readers(&self) {
        for slot in &self.readers {
            slot.store(0, SeqCst);
        }
    }

    /// Takes the writer lock. Never held while touching memory a signal
    /// handler serves, and never taken by the signal handler's lookup.
    pub(crate) fn write(&self) -> WriteGuard<'_, T> {
        WriteGuard {
            lock: self,
            _guard: self.writer.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }
}

pub(crate) struct WriteGuard<'a, T> {
    lock: &'a HalfLock<T>,
    _guard: MutexGuard<'a, ()>,
}

impl<T> WriteGuard<'_, T> {
    pub(crate) fn get(&self) -> Option<&T> {
        // SAFETY: only writers free values, and we are the only writer while
        // the guard lives, so the current value outlives this borrow.
        unsafe { self.lock.current.load(SeqCst).as_ref() }
    }

    /// Replaces the value; returns once no reader can see the old one, which
    /// is dropped here (in ordinary context, never in a signal handler).
    pub(crate) fn publish(&mut self, value: T) {
        let new = Box::into_raw(Box::new(value));
        let old = self.lock.current.swap(new, SeqCst);
        for _ in 0..2 {
            let retired = self.lock.epoch.fetch_add(1, SeqCst) & 1;
            let mut spins = 0u32;
            while self.lock.readers[retired].load(SeqCst) != 0 {
                spins += 1;
                if spins < 64 {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
            }
        }
        if !old.is_null() {
            // SAFETY: `old` came from Box::into_raw in an earlier publish and
            // no reader can reach it any more (drained above).
            drop(unsafe { Box::from_raw(old) });
        }
    }
}
