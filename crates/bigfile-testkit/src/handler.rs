//! Fault handlers for the fault layer's tests, from closures.

use std::sync::Arc;

use bigfile_fault::{Access, Fault, FaultHandler, Outcome};
use bigfile_os::os_page_size;

use crate::memory::{page_of, protect};

/// A handler that calls `f`.
pub fn handler(f: impl Fn(&Fault) -> Outcome + Send + Sync + 'static) -> Arc<dyn FaultHandler> {
    Arc::new(FnHandler(f))
}

struct FnHandler<F>(F);

impl<F: Fn(&Fault) -> Outcome + Send + Sync + 'static> FaultHandler for FnHandler<F> {
    fn handle(&self, fault: &Fault) -> Outcome {
        (self.0)(fault)
    }
}

/// Serve `fault` the simplest way: make its page readable for a read,
/// writable for a write.
pub fn unprotect(fault: &Fault) -> Outcome {
    let prot = match fault.access {
        Access::Read => libc::PROT_READ,
        Access::Write => libc::PROT_READ | libc::PROT_WRITE,
    };
    protect(page_of(fault.addr), os_page_size(), prot);
    Outcome::Handled
}
