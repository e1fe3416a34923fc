//! bigfile-testkit: what bigfile's tests share, so each test says only what
//! it tests. Dev-only (never published, never a dependency of a library).
//!
//! - [`MemFile`]: a BigFile kept in memory that records its calls, runs
//!   hooks (to fail, to block, to touch memory) and, with the `failpoints`
//!   feature, has the `file::loadblk` / `file::storeblk` failure points;
//! - [`child`]: running a scenario in a child process (the test binary
//!   re-executed) and checking how it died;
//! - [`model`]: the reference model of a file and a handle's changes, and a
//!   seeded generator;
//! - [`memory`]: plain mappings, protections, byte accesses and
//!   `/proc/self/maps`;
//! - [`handler`]: fault handlers from closures;
//! - [`mount`]: a filesystem mounted for a test (a tmpfs to fill);
//! - [`hugepages`]: the huge page pool, resized for a test.
//!
//! See ARCHITECTURE.md at the repository root for who uses it.

pub mod child;
pub mod handler;
pub mod hugepages;
#[cfg(feature = "virtmem")]
pub mod loads;
pub mod memfile;
pub mod memory;
pub mod model;
pub mod mount;

pub use memfile::{Call, MemFile};
