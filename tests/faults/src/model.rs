//! The injected workloads' file and model: the test kit's memory file,
//! whose blocks start as [`initial`] and whose `loadblk` and `storeblk` are
//! failure points (`file::loadblk`, `file::storeblk`) like the system calls
//! below them; and the test kit's model of what a handle must show.

use std::sync::Arc;

use bigfile_testkit::model::fill_initial;
use bigfile_testkit::MemFile;

pub use bigfile_testkit::model::{initial, Model, Rng};

/// A memory file of `blksize`-byte blocks, named "injectfile".
pub fn inject_file(blksize: usize) -> Arc<MemFile> {
    Arc::new(
        MemFile::new(blksize)
            .named("injectfile")
            .with_initial(fill_initial),
    )
}
