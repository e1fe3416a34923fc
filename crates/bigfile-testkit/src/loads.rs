//! Waiting for loads other threads run (read-ahead's workers).

use std::ops::Range;
use std::time::{Duration, Instant};

use bigfile_virtmem::{FileH, PageState};

/// Wait until no page of `blocks` of `fh` is loading: the read-ahead
/// workers are done with them. Bounded only so that a bug fails the test
/// instead of hanging it (a minute).
pub fn settle(fh: &FileH, blocks: Range<u64>) {
    let start = Instant::now();
    while blocks.clone().any(|b| {
        matches!(
            fh.page_state(b),
            Some(PageState::Loading | PageState::LoadingInvalidated)
        )
    }) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "loads of {blocks:?} never finish"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}
