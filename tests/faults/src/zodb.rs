//! `zodb-stress/zeo`: the ZODB layer under concurrent transactions with a
//! real ZEO server, several client processes and threads, clients killed
//! mid-commit, verified against the transactions the storage holds
//! (`zodb_stress.py` says how). About two minutes by default;
//! `--minutes N` runs its transactions for N minutes.

use std::path::PathBuf;
use std::time::Duration;

use crate::coredump::{expect_success, last_line};
use crate::{python, Scenario};

/// Seconds of transactions when `--minutes` is not given; the checks after
/// them take about half as long again.
const DEFAULT_SECONDS: f64 = 75.0;

pub fn scenarios() -> Vec<Scenario> {
    vec![Scenario::new("zodb-stress/zeo", || {
        let seconds = crate::minutes().map_or(DEFAULT_SECONDS, |m| m * 60.0);
        let script = Script::write()?;
        let mut cmd = std::process::Command::new(python::interpreter()?);
        cmd.arg(&script.0)
            .args(["supervise", ".", &seconds.to_string()])
            .env("PYTHONUNBUFFERED", "1");
        // Replaying and checking takes less time than the run; a hang
        // (a client or the server stuck) is caught well before CI's limit.
        let timeout = Duration::from_secs_f64(seconds * 2.0 + 300.0);
        let out = expect_success(cmd, timeout)?;
        last_line(&out, "zodb stress OK")
    })]
}

/// The script, written to a file of its own: its supervisor starts writer
/// and reader processes running it too (the scenario runs in a fresh
/// directory, which holds the database and the clients' logs).
struct Script(PathBuf);

impl Script {
    fn write() -> Result<Self, String> {
        let path =
            std::env::temp_dir().join(format!("bigfile-zodb-stress-{}.py", std::process::id()));
        std::fs::write(&path, SOURCE).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Script(path))
    }
}

impl Drop for Script {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

const SOURCE: &str = include_str!("zodb_stress.py");
