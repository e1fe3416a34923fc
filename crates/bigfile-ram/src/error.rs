//! The one error type of this crate.

use std::io;
use std::path::PathBuf;

/// The spec grammar, quoted by every spec error so the message says what is allowed.
pub(crate) const SPEC_GRAMMAR: &str = "memfd | shmfs[:DIR] | hugetlbfs[:DIR], optionally \
     followed by ,pagesize=SIZE (bytes, or with a K/M/G suffix), ,alloc=reserve|touch \
     and/or ,thp=collapse|off";

/// What went wrong in the RAM layer. Every message says what was wrong and what is allowed.
///
/// [`RamError::is_exhausted`] tells the layer above when reclaiming memory and retrying can
/// help.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RamError {
    /// A spec string (or `BIGFILE_RAM`) that does not follow the grammar.
    #[error("invalid RAM spec {spec:?}: {problem}; allowed: {SPEC_GRAMMAR}")]
    Spec {
        /// The offending spec text.
        spec: String,
        /// What is wrong with it.
        problem: String,
    },

    /// A page size that is zero or not a multiple of the unit the backend maps in.
    #[error(
        "page size {page_size} is not a multiple of the {unit_name} page size {unit}; \
         allowed: a non-zero multiple of {unit}"
    )]
    PageSize {
        /// The requested page size.
        page_size: usize,
        /// The size it must be a multiple of.
        unit: usize,
        /// "OS" or "huge".
        unit_name: &'static str,
    },

    /// A hugetlbfs RAM while the kernel's pool of huge pages of that size is empty.
    #[error(
        "no {huge_page_size}-byte huge pages are reserved (the pool in {pool} is 0); \
         reserve some, e.g. `echo 16 > {pool}` as root, or use the memfd or shmfs backend"
    )]
    NoHugePages {
        /// The huge page size needed.
        huge_page_size: usize,
        /// The sysfs file holding the pool size.
        pool: PathBuf,
    },

    /// The hugetlbfs backend given a directory that is not on hugetlbfs.
    #[error(
        "{dir} is not on a hugetlbfs mount; allowed: a hugetlbfs mount point, \
         or no directory (memfd with MFD_HUGETLB)"
    )]
    NotHugetlbfs {
        /// The directory given.
        dir: PathBuf,
    },

    /// The backend cannot hold even one page.
    #[error("RAM of {max_size} bytes cannot hold one page of {page_size} bytes; allowed: a page size up to the RAM size")]
    TooSmall {
        /// Current maximal size of the RAM.
        max_size: u64,
        /// The page size.
        page_size: usize,
    },

    /// A fixed mapping address that is not aligned to the page size.
    #[error("address {addr:#x} is not aligned to the page size {page_size}; allowed: a multiple of {page_size}")]
    Unaligned {
        /// The address given.
        addr: usize,
        /// The required alignment.
        page_size: usize,
    },

    /// A page index beyond the handle's file.
    #[error("page {page} is beyond the handle, which holds pages 0..{max_pages}")]
    OutOfRange {
        /// The page index given.
        page: u64,
        /// Number of pages the handle can hold.
        max_pages: u64,
    },

    /// An operation on a page index that was not allocated.
    #[error(
        "page {page} is not allocated; allowed: pages returned by alloc_page and not yet dropped"
    )]
    NotAllocated {
        /// The page index given.
        page: u64,
    },

    /// The kernel has no memory for another page (ENOSPC or ENOMEM from fallocate).
    #[error("RAM exhausted: no memory for another page of {page_size} bytes ({source}); free pages and retry")]
    Exhausted {
        /// The page size.
        page_size: usize,
        /// The kernel's error.
        source: io::Error,
    },

    /// Every page index of the handle is allocated.
    #[error("RAM handle full: all {max_pages} pages are allocated; free pages and retry")]
    HandleFull {
        /// Number of pages the handle can hold.
        max_pages: u64,
    },

    /// The handle was inherited by a forked child, which could not give it
    /// a file of its own: its file is the parent's memory, not to be used.
    #[error(
        "this RAM handle was inherited through fork(2) and the child could not give it memory \
         of its own (out of descriptors or memory); open a new handle in the child"
    )]
    Forked,

    /// A system call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The kernel's error.
        source: io::Error,
    },
}

impl RamError {
    /// Whether memory ran out, so that freeing pages (reclaim) and retrying can succeed.
    pub fn is_exhausted(&self) -> bool {
        matches!(
            self,
            RamError::Exhausted { .. } | RamError::HandleFull { .. }
        )
    }

    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> RamError {
        RamError::Io {
            what: what.into(),
            source,
        }
    }
}

/// A copy for a second owner: virtmem hands the error of one failed load to
/// every thread that waited for that load. OS errors keep their errno.
impl Clone for RamError {
    fn clone(&self) -> RamError {
        use bigfile_os::clone_io_error;
        match self {
            RamError::Spec { spec, problem } => RamError::Spec {
                spec: spec.clone(),
                problem: problem.clone(),
            },
            &RamError::PageSize {
                page_size,
                unit,
                unit_name,
            } => RamError::PageSize {
                page_size,
                unit,
                unit_name,
            },
            RamError::NoHugePages {
                huge_page_size,
                pool,
            } => RamError::NoHugePages {
                huge_page_size: *huge_page_size,
                pool: pool.clone(),
            },
            RamError::NotHugetlbfs { dir } => RamError::NotHugetlbfs { dir: dir.clone() },
            &RamError::TooSmall {
                max_size,
                page_size,
            } => RamError::TooSmall {
                max_size,
                page_size,
            },
            &RamError::Unaligned { addr, page_size } => RamError::Unaligned { addr, page_size },
            &RamError::OutOfRange { page, max_pages } => RamError::OutOfRange { page, max_pages },
            &RamError::NotAllocated { page } => RamError::NotAllocated { page },
            RamError::Exhausted { page_size, source } => RamError::Exhausted {
                page_size: *page_size,
                source: clone_io_error(source),
            },
            &RamError::HandleFull { max_pages } => RamError::HandleFull { max_pages },
            RamError::Forked => RamError::Forked,
            RamError::Io { what, source } => RamError::Io {
                what: what.clone(),
                source: clone_io_error(source),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clone_keeps_the_errno_and_the_message() {
        let e = RamError::io(
            "map page 3 (mmap)",
            io::Error::from_raw_os_error(libc::ENOMEM),
        );
        let c = e.clone();
        assert_eq!(c.to_string(), e.to_string());
        match c {
            RamError::Io { source, .. } => assert_eq!(source.raw_os_error(), Some(libc::ENOMEM)),
            other => panic!("{other:?}"),
        }
        let x = RamError::Exhausted {
            page_size: 4096,
            source: io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert!(x.clone().is_exhausted());
    }
}
