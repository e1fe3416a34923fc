//! Injected failures: the Nth call of each failure point fails.

use crate::Scenario;

pub fn scenarios() -> Vec<Scenario> {
    Vec::new()
}
