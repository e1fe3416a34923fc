//! Crash scenarios: each runs in a child process that must die.

use crate::Scenario;

pub fn scenarios() -> Vec<Scenario> {
    Vec::new()
}

/// The body of child `name` (run by `--child NAME`).
pub fn child(name: &str) {
    eprintln!("faults: no child scenario {name:?}");
}
