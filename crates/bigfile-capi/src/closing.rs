//! Closing a file handle against its mappings: a count of the mappings
//! that are live or being made, and whether the handle is closed, checked
//! by mapping and by closing under one lock.
//!
//! The lock is held only to read and change these two values, never across
//! a virtmem call: a virtmem call may release and retake the host lock (see
//! `bigfile_set_host_lock`), and a thread holding the host lock may be
//! waiting for this one; holding it across the call would deadlock.

use std::sync::{Arc, Mutex, MutexGuard};

use bigfile_virtmem::Error;

use crate::error::CError;

#[derive(Debug, Default)]
struct State {
    closed: bool,
    mappings: usize,
}

/// A file handle's mappings and closed flag.
#[derive(Debug, Default)]
pub(crate) struct Mappings(Mutex<State>);

impl Mappings {
    fn state(&self) -> MutexGuard<'_, State> {
        // The state is two plain values, never left half-changed.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Count a mapping about to be made, unless the handle is closed; the
    /// count lasts as long as the slot (keep it with the mapping).
    pub(crate) fn begin(self: &Arc<Self>) -> Result<MappingSlot, CError> {
        let mut st = self.state();
        if st.closed {
            return Err(CError::invalid("the file handle is closed"));
        }
        st.mappings += 1;
        Ok(MappingSlot(self.clone()))
    }

    /// Mark the handle closed, unless mappings of it are live or being made.
    pub(crate) fn close(&self) -> Result<(), CError> {
        let mut st = self.state();
        if st.closed {
            return Err(CError::invalid("the file handle is already closed"));
        }
        if st.mappings != 0 {
            return Err(Error::LiveMappings(st.mappings).into());
        }
        st.closed = true;
        Ok(())
    }
}

/// One mapping counted by [`Mappings::begin`]; dropping it uncounts it.
#[derive(Debug)]
pub(crate) struct MappingSlot(Arc<Mappings>);

impl Drop for MappingSlot {
    fn drop(&mut self) {
        self.0.state().mappings -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{BIGFILE_ERROR_INVALID, BIGFILE_ERROR_STATE};

    #[test]
    fn close_waits_for_no_mapping_and_happens_once() {
        let m = Arc::new(Mappings::default());
        let slot = m.begin().unwrap();
        assert_eq!(m.close().unwrap_err().kind(), BIGFILE_ERROR_STATE);
        drop(slot);
        m.close().unwrap();
        assert_eq!(m.close().unwrap_err().kind(), BIGFILE_ERROR_INVALID);
        assert_eq!(m.begin().unwrap_err().kind(), BIGFILE_ERROR_INVALID);
    }
}
