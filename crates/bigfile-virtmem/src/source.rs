//! Where a fault comes from: the seam between [`serve`], which serves a
//! [`PageRequest`] without knowing who asked, and the sources of requests.
//! A source decodes its faults into requests and finishes each its own way
//! once served.
//!
//! - [`SignalFaults`]: a thread touched a slot of a mapping (SIGSEGV, via
//!   bigfile-fault); finishing is returning from the handler, so the
//!   access re-executes, or dying with a diagnostic.
//! - [`Prefault`]: a thread asked for pages ([`Vma::prefault`]); finishing
//!   is returning the outcome as a value.
//!
//! A userfaultfd source fits the same way: a thread reading the uffd
//! decodes each message (address, read or write) into a request, and
//! finishes it by waking the faulting thread (UFFDIO_WAKE), or poisoning
//! the page (UFFDIO_POISON) when it failed. See ARCHITECTURE.md.
//!
//! [`Vma::prefault`]: crate::Vma::prefault

use std::sync::Arc;

use bigfile_fault::{Fault, FaultHandler, FaultSignal, Outcome};

use crate::error::Error;
use crate::failure::Failure;
use crate::handle::FileHInner;
use crate::host::HostLease;
use crate::keys::VmaId;
use crate::poison;
use crate::serve::{serve, PageRequest};

/// A source of faults: how a served (or failed) request is finished.
pub(crate) trait FaultSource {
    /// What finishing gives the source.
    type Finished;

    /// Finish `req` of `fh`, which [`serve`] served (`Ok`) or not.
    fn finish(
        &self,
        fh: &FileHInner,
        req: &PageRequest,
        served: Result<(), Failure>,
    ) -> Self::Finished;
}

/// Serve `req` of `fh` for `source`: the one way in for every source.
/// `host` is the host lock as the requesting thread holds it.
pub(crate) fn take<S: FaultSource>(
    source: &S,
    fh: &FileHInner,
    req: &PageRequest,
    host: &mut HostLease,
) -> S::Finished {
    source.finish(fh, req, serve(fh, req, host))
}

/// The signal handler's view of one mapping: a SIGSEGV on one of its slots
/// is a request for that slot's block.
pub(crate) struct SignalFaults {
    fileh: Arc<FileHInner>,
    vma: VmaId,
    pgoffset: u64,
}

impl SignalFaults {
    pub(crate) fn new(fileh: Arc<FileHInner>, vma: VmaId, pgoffset: u64) -> SignalFaults {
        SignalFaults {
            fileh,
            vma,
            pgoffset,
        }
    }
}

impl FaultHandler for SignalFaults {
    fn handle(&self, fault: &Fault) -> Outcome {
        let ps = self.fileh.page_size();
        let idx = (fault.addr - self.vma.start) / ps;
        let blk = self.pgoffset + idx as u64;
        let page_addr = self.vma.start + idx * ps;
        if fault.signal == FaultSignal::Bus && poison::take(page_addr, ps) {
            // The userfaultfd backend poisoned this page when a system call's
            // load of it failed (the call got EFAULT): the poison is cleared,
            // and this access served as any other (it loads the page again).
        } else if fault.signal == FaultSignal::Bus {
            // A SIGBUS inside our mapping means the RAM's memory could not be
            // provided (e.g. its filesystem is full under first-touch allocation).
            return Outcome::Fatal {
                signal: FaultSignal::Bus,
                message: format!(
                    "bus error at {:#x} in block {blk} of {}: the RAM could not provide memory",
                    fault.addr, self.fileh.name
                ),
            };
        }
        if bigfile_os::holds_lock() {
            // A signal handler touched the mapping while its thread was
            // inside bigfile: serving would wait for this very thread.
            return Outcome::Fatal {
                signal: FaultSignal::Segv,
                message: format!(
                    "page fault at {:#x} (block {blk} of {}) on a thread that holds a lock of \
                     bigfile's: a signal handler touched a mapping while its thread was inside \
                     bigfile, and serving the fault would wait for that thread itself; signal \
                     handlers must not touch mapped memory (or block the signal around bigfile calls)",
                    fault.addr, self.fileh.name
                ),
            };
        }
        let req = PageRequest {
            vma: self.vma,
            blk,
            access: fault.access,
            drop_behind: true,
            execution: Some(fault.execution),
            call_end: None,
        };
        // Kept while it can be: the code that touched the memory may be host
        // code that assumes no other host thread runs meanwhile.
        let mut host = HostLease::default();
        take(self, &self.fileh, &req, &mut host)
    }
}

impl FaultSource for SignalFaults {
    type Finished = Outcome;

    fn finish(&self, fh: &FileHInner, req: &PageRequest, served: Result<(), Failure>) -> Outcome {
        match served {
            Ok(()) => Outcome::Handled,
            Err(f) => Outcome::Fatal {
                signal: if f.is_deadlock() {
                    FaultSignal::Segv
                } else {
                    FaultSignal::Bus
                },
                message: f.message(req.blk, &fh.name),
            },
        }
    }
}

/// A thread asking for a page now (prefault): the outcome is a value.
pub(crate) struct Prefault;

impl FaultSource for Prefault {
    type Finished = Result<(), Error>;

    fn finish(
        &self,
        fh: &FileHInner,
        req: &PageRequest,
        served: Result<(), Failure>,
    ) -> Result<(), Error> {
        served.map_err(|f| f.into_error(req.blk, &fh.name))
    }
}
