//! Why a page could not be served, as a value the loader and every thread
//! that waited for its load share. A fault source turns it into what it
//! reports: a diagnostic and SIGBUS or SIGSEGV inside a signal handler, an
//! [`Error`] for prefault.

use std::io;

use bigfile_os::clone_io_error;
use bigfile_ram::RamError;

use crate::error::{Error, LoadError, SharedBlockError};

/// Why serving block `blk` failed. Its messages name the block, and the
/// file given to [`Failure::message`].
#[derive(Debug)]
pub(crate) enum Failure {
    /// Serving would wait on this very thread (a loader touching its own
    /// page, a storeblk writing to its handle under writeout) or close a
    /// cycle of waits: fatal, SIGSEGV. The whole diagnostic.
    Deadlock(String),
    /// `loadblk` failed on each of `attempts` attempts; its last error.
    Load {
        attempts: u32,
        source: SharedBlockError,
    },
    /// `loadblk` panicked (what waiters of that load see).
    Panicked,
    /// The budget is full of pages that cannot be reclaimed.
    Budget { budget: u64, pinned: u64 },
    /// One instruction touches more pages than the budget plus one holds:
    /// loading one of them took back another (`streak.rs`).
    TooWide { budget: u64 },
    /// The RAM itself (its filesystem, the OS) has no memory for another
    /// page, and no clean page is left to reclaim.
    RamExhausted(RamError),
    /// The RAM layer failed `doing` something for the block ("allocating
    /// RAM for", "mapping"); an OS failure keeps its errno inside.
    Ram {
        doing: &'static str,
        source: RamError,
    },
    /// One of virtmem's own OS calls failed (mprotect).
    Os { op: &'static str, source: io::Error },
    /// The load this thread waited for failed with this.
    Waited(Box<Failure>),
}

impl Clone for Failure {
    fn clone(&self) -> Failure {
        match self {
            Failure::Deadlock(m) => Failure::Deadlock(m.clone()),
            Failure::Load { attempts, source } => Failure::Load {
                attempts: *attempts,
                source: source.clone(),
            },
            Failure::Panicked => Failure::Panicked,
            &Failure::Budget { budget, pinned } => Failure::Budget { budget, pinned },
            &Failure::TooWide { budget } => Failure::TooWide { budget },
            Failure::RamExhausted(e) => Failure::RamExhausted(e.clone()),
            Failure::Ram { doing, source } => Failure::Ram {
                doing,
                source: source.clone(),
            },
            Failure::Os { op, source } => Failure::Os {
                op,
                source: clone_io_error(source),
            },
            Failure::Waited(f) => Failure::Waited(f.clone()),
        }
    }
}

impl Failure {
    /// Whether this is fatal by SIGSEGV (a wait on itself) rather than SIGBUS.
    pub(crate) fn is_deadlock(&self) -> bool {
        matches!(self, Failure::Deadlock(_))
    }

    /// The diagnostic for a failed fault on block `blk` of `file`.
    pub(crate) fn message(&self, blk: u64, file: &str) -> String {
        match self {
            Failure::Deadlock(m) => m.clone(),
            Failure::Load { attempts, source } => format!(
                "loadblk of block {blk} of {file} failed after {attempts} attempt(s): {source}"
            ),
            Failure::Panicked => format!("loadblk of block {blk} of {file} panicked"),
            Failure::Budget { budget, pinned } => format!(
                "RAM budget of {budget} bytes is exhausted by {pinned} dirty or loading pages; \
                 cannot load block {blk} of {file} (write out or discard changes, or raise the budget)"
            ),
            Failure::TooWide { budget } => format!(
                "an access needs block {blk} of {file} again after loading another of its pages \
                 took it back: one instruction touches more pages than the RAM budget of {budget} \
                 bytes plus one page holds (raise the budget)"
            ),
            Failure::RamExhausted(e) => format!(
                "no RAM for block {blk} of {file} and no clean page to reclaim: {e}"
            ),
            Failure::Ram { doing, source } => format!("{doing} block {blk} of {file}: {source}"),
            Failure::Os { op, source } => format!("mapping block {blk} of {file}: {op}: {source}"),
            Failure::Waited(f) => format!(
                "while waiting for another thread's load: {}",
                f.message(blk, file)
            ),
        }
    }

    /// The error prefault returns for block `blk` of `file`.
    pub(crate) fn into_error(self, blk: u64, file: &str) -> Error {
        let load = |source| Error::Load {
            file: file.to_owned(),
            blk,
            source,
        };
        match self {
            Failure::Deadlock(m) => load(LoadError::Deadlock(m)),
            Failure::Load { attempts, source } => load(LoadError::Block { attempts, source }),
            Failure::Panicked => load(LoadError::Panicked),
            Failure::Budget { budget, pinned } => Error::BudgetExhausted { budget, pinned },
            // Prefault has no instruction to re-execute: not met there.
            Failure::TooWide { budget } => Error::BudgetExhausted { budget, pinned: 0 },
            // The RAM's own memory (its filesystem, the OS) ran out: not
            // the budget, whatever it is.
            Failure::RamExhausted(e) => Error::Ram(e),
            // Allocating, windowing or mapping the page failed: the OS's
            // failure, with its errno, not loadblk's.
            Failure::Ram { doing, source } => match source {
                RamError::Io { source, .. } => Error::Os {
                    op: ram_call(doing),
                    source,
                },
                other => Error::Ram(other),
            },
            Failure::Os { op, source } => Error::Os { op, source },
            Failure::Waited(f) => load(LoadError::Waited(Box::new(f.into_error(blk, file)))),
        }
    }
}

/// The RAM call that failed while virtmem was `doing` something.
fn ram_call(doing: &'static str) -> &'static str {
    match doing {
        ALLOCATING => "allocate a RAM page",
        WINDOWING => "window onto a RAM page",
        _ => "map a RAM page",
    }
}

/// [`Failure::Ram`]'s `doing` for each RAM call a fault makes.
pub(crate) const ALLOCATING: &str = "allocating RAM for";
pub(crate) const WINDOWING: &str = "window onto RAM page for";
pub(crate) const MAPPING: &str = "mapping";

#[cfg(test)]
mod tests {
    use super::*;

    /// A RAM call failing the way bigfile-ram reports it.
    fn ram_io(errno: i32) -> RamError {
        RamError::Io {
            what: "map page 0 (mmap)".into(),
            source: io::Error::from_raw_os_error(errno),
        }
    }

    #[test]
    fn an_os_failure_keeps_its_errno_and_names_the_call() {
        let f = Failure::Ram {
            doing: MAPPING,
            source: ram_io(libc::ENOMEM),
        };
        assert_eq!(
            f.message(3, "f"),
            "mapping block 3 of f: map page 0 (mmap): Cannot allocate memory (os error 12)"
        );
        match f.clone().into_error(3, "f") {
            Error::Os { op, source } => {
                assert_eq!(op, "map a RAM page");
                assert_eq!(source.raw_os_error(), Some(libc::ENOMEM));
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn a_waiter_gets_the_loaders_error_value() {
        #[derive(Debug, thiserror::Error)]
        #[error("bad sector")]
        struct Disk;
        let failed = Failure::Load {
            attempts: 2,
            source: std::sync::Arc::new(Disk),
        };
        let waited = Failure::Waited(Box::new(failed.clone()));
        assert_eq!(
            waited.message(5, "f"),
            "while waiting for another thread's load: \
             loadblk of block 5 of f failed after 2 attempt(s): bad sector"
        );
        let Error::Load {
            source: LoadError::Waited(inner),
            ..
        } = waited.into_error(5, "f")
        else {
            panic!("not a waited load error");
        };
        let Error::Load {
            source: LoadError::Block { attempts, source },
            ..
        } = *inner
        else {
            panic!("not the loader's error");
        };
        assert_eq!(attempts, 2);
        assert!(source.downcast_ref::<Disk>().is_some());
    }

    #[test]
    fn deadlocks_are_sigsegv_the_rest_sigbus() {
        assert!(Failure::Deadlock("x".into()).is_deadlock());
        assert!(!Failure::Panicked.is_deadlock());
        assert!(!Failure::Budget {
            budget: 1,
            pinned: 1
        }
        .is_deadlock());
    }
}
