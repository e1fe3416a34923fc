//! Sequential detection: whether a mapping's faults form a forward scan
//! (a stream), as the kernel's read-ahead tells one for a file. The policy
//! is described in ARCHITECTURE.md ("Sequential detection").

/// A mapping's faults seen as a stream: the block of its last fault and
/// how many faults in a row came each on the block right after the one
/// before.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Stream {
    last: Option<u64>,
    run: u64,
}

/// What a fault made of its mapping's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Not right after the fault before: no stream (or not any more).
    Random,
    /// Right after a fault that was not itself sequential: a stream begins.
    Began,
    /// A stream goes on (or the same block faulted again within it: a
    /// write after a read, an access spanning two blocks).
    Continues,
}

impl Stream {
    /// A fault on block `blk`: what it makes of the stream.
    pub(crate) fn note(&mut self, blk: u64) -> Step {
        let prev = self.last.replace(blk);
        if prev == Some(blk) {
            return if self.run > 0 {
                Step::Continues
            } else {
                Step::Random
            };
        }
        if prev.and_then(|p| p.checked_add(1)) == Some(blk) {
            self.run += 1;
            return if self.run == 1 {
                Step::Began
            } else {
                Step::Continues
            };
        }
        self.run = 0;
        Step::Random
    }

    /// Whether the faults so far form a stream.
    pub(crate) fn is_sequential(&self) -> bool {
        self.run > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(blocks: &[u64]) -> Vec<Step> {
        let mut s = Stream::default();
        blocks.iter().map(|&b| s.note(b)).collect()
    }

    #[test]
    fn a_fault_right_after_the_one_before_begins_a_stream() {
        use Step::*;
        assert_eq!(
            steps(&[5, 6, 7, 7, 8]),
            [Random, Began, Continues, Continues, Continues]
        );
    }

    #[test]
    fn random_and_backward_faults_keep_it_shut() {
        use Step::*;
        assert_eq!(steps(&[9, 3, 3, 8, 7, 1]), [Random; 6]);
        let mut s = Stream::default();
        s.note(1);
        s.note(2);
        assert!(s.is_sequential());
        assert_eq!(s.note(10), Random, "a jump ends it");
        assert!(!s.is_sequential());
        assert_eq!(s.note(11), Began, "and a new one may begin there");
    }

    #[test]
    fn the_last_block_ends_nothing() {
        let mut s = Stream::default();
        s.note(u64::MAX);
        assert_eq!(s.note(0), Step::Random, "no wrap around");
    }
}
