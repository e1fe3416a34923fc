//! The Python interpreter the Python scenarios run in: one with the
//! `bigfile` package installed, named by `BIGFILE_FAULTS_PYTHON`, which
//! `cargo xtask faults` sets after building the package into a venv.

use std::path::PathBuf;
use std::process::Command;

pub const PYTHON_ENV: &str = "BIGFILE_FAULTS_PYTHON";

/// `python -c SCRIPT` in the interpreter named by `BIGFILE_FAULTS_PYTHON`.
pub fn command(script: &str) -> Result<Command, String> {
    let mut cmd = Command::new(interpreter()?);
    cmd.args(["-c", script])
        .env_remove("PYTHONSTARTUP")
        .env("PYTHONUNBUFFERED", "1");
    Ok(cmd)
}

/// The interpreter named by `BIGFILE_FAULTS_PYTHON`. Without it a Python
/// scenario fails: it is not skipped, since a suite that silently stops
/// testing the bindings would still say "passed".
pub fn interpreter() -> Result<PathBuf, String> {
    let python = std::env::var_os(PYTHON_ENV)
        .map(PathBuf::from)
        .ok_or_else(|| {
            format!(
                "{PYTHON_ENV} is not set: run the suite through `cargo xtask faults`, \
             which builds bigfile into a venv and names its python here"
            )
        })?;
    if !python.exists() {
        return Err(format!("{PYTHON_ENV}={} does not exist", python.display()));
    }
    Ok(python)
}
