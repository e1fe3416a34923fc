//! `soak/python`: the model-based randomized soak of the Python bindings
//! (`soak_python.py` says what it does and checks). About a minute by
//! default; `--minutes N` runs it for N minutes.

use std::time::Duration;

use crate::coredump::{expect_success, last_line};
use crate::{python, Scenario};

/// Seconds of soaking when `--minutes` is not given.
const DEFAULT_SECONDS: f64 = 60.0;

pub fn scenarios() -> Vec<Scenario> {
    vec![Scenario::new("soak/python", || {
        let seconds = crate::minutes().map_or(DEFAULT_SECONDS, |m| m * 60.0);
        let mut cmd = python::command(SOURCE)?;
        cmd.arg(seconds.to_string());
        // The end checks take seconds; a hang is caught well before CI's limit.
        let timeout = Duration::from_secs_f64(seconds * 2.0 + 120.0);
        let out = expect_success(cmd, timeout)?;
        last_line(&out, "python soak OK")
    })]
}

const SOURCE: &str = include_str!("soak_python.py");
