//! What a range's handler gets and answers: the [`Fault`], the
//! [`FaultHandler`] trait and its [`Outcome`]. The contract is in the crate
//! docs.

/// Whether the faulting access read or wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

/// The signal a fault arrived as, or should kill the process with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultSignal {
    /// SIGSEGV: a protection fault.
    Segv,
    /// SIGBUS: e.g. a file-backed page past the end of the file, or an I/O error.
    Bus,
}

/// One fault in a registered range.
#[derive(Debug, Clone, Copy)]
pub struct Fault {
    /// The faulting address (not page-aligned).
    pub addr: usize,
    pub access: Access,
    pub signal: FaultSignal,
    /// 1 for a first fault on this thread, 2 for a fault taken while a
    /// handler on this thread runs, and so on.
    pub depth: u32,
    /// Which execution of which instruction faulted (a hash of its program
    /// counter and general registers): the same value when an instruction
    /// faults again without having made progress, as an access spanning
    /// two pages does on each of them in turn; another value for another
    /// instruction, or the same one run again (another loop iteration, a
    /// string copy further along).
    pub execution: u64,
}

/// What a [`FaultHandler`] did with a fault.
#[derive(Debug)]
pub enum Outcome {
    /// The memory is fixed up: re-execute the access.
    Handled,
    /// Treat the fault as outside every range: chain to the previous handler.
    NotOurs,
    /// Print `bigfile: <message>` to stderr and die by `signal`: the faulting
    /// access dies by SIGSEGV at its instruction (a true core); SIGBUS is
    /// delivered to the faulting thread as it returns to that instruction.
    Fatal {
        signal: FaultSignal,
        message: String,
    },
}

/// Serves faults in a registered range. See the crate docs for the contract.
pub trait FaultHandler: Send + Sync + 'static {
    fn handle(&self, fault: &Fault) -> Outcome;
}
