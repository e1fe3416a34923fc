//! A mapping as the `VMA` objects see it: its addresses stay valid while
//! any of them lives.
//!
//! numpy arrays made over a VMA (`np.ndarray(buffer=vma)`,
//! `np.frombuffer(vma)`, their views) give the buffer back at once and keep
//! only the VMA object, so closing a VMA cannot know they are there. Closing
//! therefore gives the file up at once (the handle counts the mapping gone
//! and can be closed), but the addresses stay taken, by zero-filled memory
//! (virtmem's [`Placeholder`]), until the last `VMA` object of the mapping
//! is deallocated: such an array reads zeros and its writes go nowhere,
//! never into another file mapped there later.

use std::ops::Deref;
use std::sync::{Arc, Mutex};

use bigfile_virtmem::{Placeholder, Vma};

/// One mapping, shared by the `VMA` objects of it and the `mmap_cached`
/// cache; unmapped when the last of them lets go.
pub(crate) struct Mapping {
    /// `None` only while dropped.
    vma: Option<Vma>,
    addresses: Arc<Addresses>,
}

/// The addresses of a mapping, held by every `VMA` object of it: once the
/// mapping is closed, they keep its placeholder.
#[derive(Default)]
pub(crate) struct Addresses(Mutex<Option<Placeholder>>);

impl Mapping {
    pub(crate) fn new(vma: Vma) -> Arc<Mapping> {
        Arc::new(Mapping {
            vma: Some(vma),
            addresses: Arc::default(),
        })
    }

    /// The addresses, for a `VMA` object of this mapping to hold.
    pub(crate) fn addresses(&self) -> Arc<Addresses> {
        self.addresses.clone()
    }
}

impl Deref for Mapping {
    type Target = Vma;

    fn deref(&self) -> &Vma {
        self.vma
            .as_ref()
            .expect("a mapping has its Vma until dropped")
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        let Some(vma) = self.vma.take() else {
            return;
        };
        // Only we hold the addresses: no VMA object is left to reach them.
        // (Nobody can take a new hold: that is done through a Mapping, and
        // this was the last.)
        if Arc::strong_count(&self.addresses) == 1 {
            drop(vma);
            return;
        }
        let placeholder = vma.unmap_to_placeholder();
        *self.addresses.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(placeholder);
    }
}
