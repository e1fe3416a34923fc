use std::io;
use std::ops::Range;

/// Errors from installing the handler or registering a range.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum FaultError {
    /// A range of zero bytes cannot take faults.
    #[error("cannot register an empty range at {start:#x}")]
    EmptyRange { start: usize },
    /// `start + len` does not fit in the address space.
    #[error("range at {start:#x} of {len:#x} bytes overflows the address space")]
    Overflow { start: usize, len: usize },
    /// The range overlaps one already registered.
    #[error("range {new:#x?} overlaps registered range {existing:#x?}")]
    Overlap {
        new: Range<usize>,
        existing: Range<usize>,
    },
    /// sigaction(2) failed for the named signal.
    #[error("sigaction({signal}) failed: {source}")]
    Sigaction {
        signal: &'static str,
        #[source]
        source: io::Error,
    },
}
