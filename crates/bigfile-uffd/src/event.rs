//! Page-fault events as read from the descriptor.

use crate::abi;

/// What the faulting access found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// No page in the file at that offset (the page cache has none).
    Missing,
    /// The file has the page, this mapping does not map it yet.
    Minor,
    /// A write to a page mapped write-protected.
    WriteProtect,
}

/// One page fault waiting to be resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// The faulting address (exact: `UFFD_FEATURE_EXACT_ADDRESS`).
    pub addr: usize,
    pub kind: FaultKind,
    /// A write access (for `WriteProtect`, always).
    pub write: bool,
    /// The faulting thread (`UFFD_FEATURE_THREAD_ID`).
    pub tid: libc::pid_t,
}

impl Event {
    /// The event a message describes; `None` for other events (none are
    /// requested).
    pub(crate) fn from_msg(m: &abi::uffd_msg) -> Option<Event> {
        if m.event != abi::UFFD_EVENT_PAGEFAULT {
            return None;
        }
        let kind = if m.flags & abi::UFFD_PAGEFAULT_FLAG_WP != 0 {
            FaultKind::WriteProtect
        } else if m.flags & abi::UFFD_PAGEFAULT_FLAG_MINOR != 0 {
            FaultKind::Minor
        } else {
            FaultKind::Missing
        };
        Some(Event {
            addr: usize::try_from(m.address).ok()?,
            kind,
            write: m.flags & abi::UFFD_PAGEFAULT_FLAG_WRITE != 0,
            tid: libc::pid_t::try_from(m.ptid).ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_decode() {
        let mut m = abi::uffd_msg {
            event: abi::UFFD_EVENT_PAGEFAULT,
            flags: abi::UFFD_PAGEFAULT_FLAG_WRITE | abi::UFFD_PAGEFAULT_FLAG_WP,
            address: 0x7000_1234,
            ptid: 42,
            ..Default::default()
        };
        let e = Event::from_msg(&m).unwrap();
        assert_eq!(
            (e.addr, e.kind, e.write, e.tid),
            (0x7000_1234, FaultKind::WriteProtect, true, 42)
        );
        m.flags = abi::UFFD_PAGEFAULT_FLAG_MINOR;
        assert_eq!(Event::from_msg(&m).unwrap().kind, FaultKind::Minor);
        m.flags = 0;
        assert_eq!(Event::from_msg(&m).unwrap().kind, FaultKind::Missing);
        m.event = 0x13; // fork
        assert_eq!(Event::from_msg(&m), None);
    }
}
