//! How many forks this process is the child of (counted by the fork
//! handlers of `fork.rs`, registered before any RAM is made). A leaf, so
//! that what depends on it (the userfaultfd backend's choice) need not
//! depend on the fork handling, which depends on the RAMs. Also what is
//! kept per generation ([`PerGeneration`]: the userfaultfd and its service,
//! each process its own).

use std::sync::atomic::{
    AtomicPtr, AtomicU64, Ordering::AcqRel, Ordering::Acquire, Ordering::Relaxed,
};

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// How many forks this process is the child of: a thread that compares it
/// before and after a `loadblk` or `storeblk` learns whether it forked
/// inside (and is now the child).
pub(crate) fn generation() -> u64 {
    GENERATION.load(Relaxed)
}

/// Count a fork, in the child.
pub(crate) fn advance() {
    GENERATION.fetch_add(1, Relaxed);
}

/// A value of each fork generation: made on first use in the generation
/// (a child's first use makes its own, never touching its parent's, which
/// a thread the child does not have may have held locked or been making
/// at the fork), then the same for the generation's life. The values of
/// earlier generations stay (leaked: a child may still reach them through
/// what it inherited), each linked to the one before it.
pub(crate) struct PerGeneration<T: 'static> {
    latest: AtomicPtr<Stamped<T>>,
}

/// One generation's value.
struct Stamped<T: 'static> {
    generation: u64,
    value: T,
    /// The value of the latest generation before this one that made one.
    earlier: Option<&'static Stamped<T>>,
}

impl<T: Default + Sync + 'static> PerGeneration<T> {
    pub(crate) const fn new() -> PerGeneration<T> {
        PerGeneration {
            latest: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    /// The value made last (of this generation or an earlier one).
    fn latest(&self) -> Option<&'static Stamped<T>> {
        // SAFETY: null or a leaked `Stamped`, never freed.
        unsafe { self.latest.load(Acquire).as_ref() }
    }

    /// This generation's value, made now if it has none.
    pub(crate) fn get(&self) -> &'static T {
        let generation = generation();
        loop {
            let latest = self.latest();
            if let Some(s) = latest.filter(|s| s.generation == generation) {
                return &s.value;
            }
            let mine = Box::into_raw(Box::new(Stamped {
                generation,
                value: T::default(),
                earlier: latest,
            }));
            let seen = latest.map_or(std::ptr::null_mut(), |s| std::ptr::from_ref(s).cast_mut());
            match self.latest.compare_exchange(seen, mine, AcqRel, Acquire) {
                // SAFETY: just leaked, never freed.
                Ok(_) => return unsafe { &(*mine).value },
                // Another thread made it first: take that one.
                // SAFETY: `mine` was never shared.
                Err(_) => drop(unsafe { Box::from_raw(mine) }),
            }
        }
    }

    /// Every generation's value, this one's (if made) first.
    pub(crate) fn all(&self) -> impl Iterator<Item = &'static T> {
        std::iter::successors(self.latest(), |s| s.earlier).map(|s| &s.value)
    }
}
