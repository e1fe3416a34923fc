//! Races: threads faulting, writing out, discarding, invalidating and
//! unmapping at once, checked against a model.

use crate::Scenario;

pub fn scenarios() -> Vec<Scenario> {
    Vec::new()
}
