//! Running a child that must die, and reading how it died from outside: the
//! wait status, and the core file it leaves, read with gdb. Neither depends
//! on our signal handler telling the truth about itself.
//!
//! The child runs in a fresh temporary directory with RLIMIT_CORE raised, so
//! a relative `core_pattern` (the machines' `core`, `core.%p`...) drops the
//! core there and nowhere else; the directory, core included, is removed
//! afterwards.

use std::fs;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bigfile_testkit::child::{self, signal_name, Death, Ended};

/// The largest core a crash may leave with the default dump filter. A RAM
/// handle's window spans the RAM's whole capacity (physical memory for
/// memfd); were it dumped, one loaded page would make a core of that size
/// (seen: 24 GB, 76 s of kernel time), so the library marks it
/// MADV_DONTDUMP and this checks it stays so.
const MAX_CORE_BYTES: u64 = 512 << 20;

/// How a crash scenario must end.
pub struct Expect {
    /// The signal that must kill the child.
    pub signal: libc::c_int,
    /// A function that must be on the crashed thread's stack in the core:
    /// a substring of a frame's function name as gdb prints it with module
    /// paths dropped (`read_block`, `<X as BigFile>::loadblk`, `memory_item`).
    pub frame: &'static str,
    /// The frame must be the innermost one (frame #0): the process died at
    /// an instruction of that function, not somewhere below it.
    pub innermost: bool,
    /// Substrings stderr must contain, in this order.
    pub stderr: &'static [&'static str],
    /// Substrings neither stdout nor stderr may contain.
    pub absent: &'static [&'static str],
    /// Longer than this is a hang.
    pub timeout: Duration,
}

impl Expect {
    pub fn new(signal: libc::c_int, frame: &'static str) -> Self {
        Expect {
            signal,
            frame,
            innermost: true,
            stderr: &[],
            absent: &[],
            timeout: Duration::from_secs(60),
        }
    }

    pub fn stderr(mut self, wanted: &'static [&'static str]) -> Self {
        self.stderr = wanted;
        self
    }

    pub fn absent(mut self, unwanted: &'static [&'static str]) -> Self {
        self.absent = unwanted;
        self
    }

    /// The frame may be anywhere on the stack (the process died in code
    /// called from it: abort(3), a kill(2) handled on its way).
    pub fn below(mut self) -> Self {
        self.innermost = false;
        self
    }
}

/// A child that ran to its end, in its directory (removed on drop).
struct Finished {
    ended: Ended,
    dir: TempDir,
}

/// The line of `out` starting with `prefix`, as the scenario's detail.
pub fn last_line(out: &str, prefix: &str) -> Result<String, String> {
    out.lines()
        .rev()
        .find(|l| l.starts_with(prefix))
        .map(str::to_owned)
        .ok_or_else(|| format!("no {prefix:?} line in the output:\n{out}"))
}

/// Runs `cmd` in a fresh directory, optionally with cores enabled, and
/// waits for it; killing it after `timeout` is a failure (a hang).
fn run(mut cmd: Command, timeout: Duration, cores: bool) -> Result<Finished, String> {
    let dir = TempDir::new()?;
    cmd.current_dir(&dir.path);
    if cores {
        // SAFETY: between fork and exec only async-signal-safe calls are
        // allowed: setrlimit is; its argument is a constant.
        unsafe { cmd.pre_exec(enable_cores) };
    }
    let ended = child::run(cmd, timeout)?;
    Ok(Finished { ended, dir })
}

/// Runs in the child between fork and exec (async-signal-safe calls only).
fn enable_cores() -> std::io::Result<()> {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit on this stack.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &unlimited) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `cmd` (which must not crash) and returns its stdout if it exited
/// with status 0 within `timeout`.
pub fn expect_success(cmd: Command, timeout: Duration) -> Result<String, String> {
    let f = run(cmd, timeout, false)?;
    if !f.ended.status.success() {
        return Err(f.ended.describe());
    }
    Ok(f.ended.stdout)
}

/// As [`expect_success`], for a child in which bigfile must have nothing to
/// say: a `bigfile:` diagnostic on its stderr fails it (a race injects no
/// failure, so any is a bug, even one the child survived: a deadlock
/// found where there was none failed a system call with EFAULT).
pub fn expect_quiet_success(cmd: Command, timeout: Duration) -> Result<String, String> {
    let f = run(cmd, timeout, false)?;
    if !f.ended.status.success() || f.ended.stderr.contains("bigfile:") {
        return Err(f.ended.describe());
    }
    Ok(f.ended.stdout)
}

/// Ends a child that must succeed: prints `Ok`'s detail after `ok` (the
/// line [`last_line`] looks for) and exits 0, or prints the error after
/// `failed` on stderr and exits 1.
pub fn exit_child(res: Result<String, String>, ok: &str, failed: &str) -> ! {
    match res {
        Ok(detail) => {
            println!("{ok}: {detail}");
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("{failed}: {e}");
            std::process::exit(1)
        }
    }
}

/// Runs `cmd` in a fresh directory with cores enabled, waits for it to die
/// and checks everything `expect` says. `Ok` is the line printed for the
/// scenario.
pub fn expect_crash(cmd: Command, expect: &Expect) -> Result<String, String> {
    let pattern = check_core_pattern()?;
    let exe = PathBuf::from(cmd.get_program());
    let f = run(cmd, expect.timeout, true)?;
    Death::by(expect.signal)
        .stderr(expect.stderr)
        .absent(expect.absent)
        .check(&f.ended)?;
    if !f.ended.status.core_dumped() {
        return Err(format!(
            "died by {} but dumped no core (core_pattern {pattern:?}, RLIMIT_CORE raised)\n{}",
            signal_name(expect.signal),
            f.ended.describe()
        ));
    }

    let core = find_core(&f.dir.path, f.ended.pid)?;
    let size = fs::metadata(&core).map(|m| m.len()).unwrap_or(0);
    if size > MAX_CORE_BYTES {
        return Err(format!(
            "the core is {} MiB (at most {} expected): RAM that is not in use was dumped",
            size >> 20,
            MAX_CORE_BYTES >> 20
        ));
    }
    let bt = gdb_backtrace(&exe, &core)?;
    let want = format!(
        "Program terminated with signal {}",
        signal_name(expect.signal)
    );
    if !bt.contains(&want) {
        return Err(format!("gdb does not say {want:?}:\n{bt}"));
    }
    let mut frames: Vec<&str> = bt.lines().filter(|l| l.starts_with('#')).collect();
    // gdb shows frame #0 once on loading the core and again in `bt`.
    frames.dedup();
    let hit = frames.iter().enumerate().find_map(|(i, f)| {
        let func = short_name(frame_function(f)?);
        func.contains(expect.frame).then_some((i, func))
    });
    // Frames before the first one with a return address ("#2  0x... in")
    // are inlined into the innermost real frame: dying in any of them is
    // dying at the instruction that crashed.
    let innermost = frames
        .iter()
        .skip(1)
        .position(|f| has_address(f))
        .map_or(frames.len(), |i| i + 1);
    match hit {
        Some((i, _)) if expect.innermost && i >= innermost => Err(format!(
            "{} is frame #{i}, not the innermost: the process died elsewhere:\n{bt}",
            expect.frame
        )),
        Some((_, func)) => Ok(format!(
            "crashed OK (in {func}) by {}",
            signal_name(expect.signal)
        )),
        None => Err(format!("{} is not on the stack:\n{bt}", expect.frame)),
    }
}

/// The function named by one gdb backtrace line:
/// `#3  0x000055.. in crate::module::func (args) at file.rs:12` or
/// `#0  crate::module::func (args) at file.rs:12`.
fn frame_function(line: &str) -> Option<&str> {
    let rest = line.split_once(char::is_whitespace)?.1.trim_start();
    let rest = match rest.split_once(" in ") {
        Some((addr, f)) if addr.starts_with("0x") => f,
        _ => rest,
    };
    Some(rest.split(" (").next().unwrap_or(rest))
}

/// Whether a backtrace line names a return address (a frame of its own,
/// not one inlined into the frame before it).
fn has_address(line: &str) -> bool {
    line.split_whitespace()
        .nth(1)
        .is_some_and(|w| w.starts_with("0x"))
}

/// `func` with every path prefix dropped:
/// `<bigfile_faults::crash::X as bigfile_virtmem::bigfile::BigFile>::loadblk`
/// becomes `<X as BigFile>::loadblk`.
fn short_name(func: &str) -> String {
    let mut out = String::new();
    let mut rest = func;
    while let Some(i) = rest.find("::") {
        let head = &rest[..i];
        let kept = head.trim_end_matches(|c: char| c.is_alphanumeric() || c == '_');
        if kept.len() == head.len() {
            // `>::name`: the last segment of a qualified path, keep it.
            out.push_str(head);
            out.push_str("::");
        } else {
            out.push_str(kept);
        }
        rest = &rest[i + 2..];
    }
    out.push_str(rest);
    out
}

/// The pattern the kernel names core files by, if it leaves them in the
/// crashing process's working directory.
fn check_core_pattern() -> Result<String, String> {
    let pattern = fs::read_to_string("/proc/sys/kernel/core_pattern")
        .map_err(|e| format!("cannot read /proc/sys/kernel/core_pattern: {e}"))?;
    usable_core_pattern(pattern.trim())
}

/// `pattern` if it names a file in the crashing process's working directory.
fn usable_core_pattern(pattern: &str) -> Result<String, String> {
    let fix = "crash scenarios need core files in the working directory: as root, \
               `echo core > /proc/sys/kernel/core_pattern`";
    if pattern.starts_with('|') {
        return Err(format!(
            "core_pattern {pattern:?} pipes cores to a program; {fix}"
        ));
    }
    if pattern.contains('/') || pattern.is_empty() {
        return Err(format!(
            "core_pattern {pattern:?} is not a plain file name; {fix}"
        ));
    }
    Ok(pattern.to_owned())
}

/// The core file the child `pid` left in `dir`: `core`, `core.PID` (with
/// core_uses_pid) or whatever else the pattern expands to, the only new file.
fn find_core(dir: &Path, pid: u32) -> Result<PathBuf, String> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| !p.ends_with("stdout") && !p.ends_with("stderr"))
        .collect();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(format!(
            "the kernel reported a core dump but no core file is in {} (pid {pid})",
            dir.display()
        )),
        _ => Err(format!(
            "several candidate core files in {}: {found:?}",
            dir.display()
        )),
    }
}

fn gdb_backtrace(exe: &Path, core: &Path) -> Result<String, String> {
    let out = Command::new("gdb")
        .args(["-batch", "-nx", "-ex", "set pagination off", "-ex", "bt"])
        .arg(exe)
        .arg(core)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run gdb (needed to read core files): {e}"))?;
    // gdb writes "Program terminated" to stdout and warnings to stderr.
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !text.contains("Core was generated by") {
        return Err(format!("gdb could not read {}:\n{text}", core.display()));
    }
    Ok(text)
}

/// A directory of its own for one child; removed with everything in it.
struct TempDir {
    path: PathBuf,
}

impl TempDir {
    fn new() -> Result<Self, String> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "bigfile-faults-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(TempDir { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_patterns_outside_the_working_directory_are_refused() {
        assert!(usable_core_pattern("core").is_ok());
        assert!(usable_core_pattern("core.%e.%p").is_ok());
        let pipe = usable_core_pattern("|/usr/lib/systemd/systemd-coredump %P").unwrap_err();
        assert!(
            pipe.contains("pipes cores") && pipe.contains("echo core >"),
            "{pipe}"
        );
        assert!(usable_core_pattern("/var/crash/core.%p").is_err());
        assert!(usable_core_pattern("").is_err());
    }

    #[test]
    fn frames_are_named_and_told_apart_from_inlined_ones() {
        let real = "#2  0x000055b1a67b2864 in bigfile_faults::crash::child () at src/crash.rs:169";
        let inlined = "#1  bigfile_faults::crash::read_block () at src/crash.rs:278";
        let trait_impl = "#4  0x0000 in <bigfile_faults::crash::X as \
                          bigfile_virtmem::bigfile::BigFile>::loadblk (blk=1) at x.rs:1";
        assert_eq!(frame_function(real), Some("bigfile_faults::crash::child"));
        assert_eq!(
            frame_function(inlined),
            Some("bigfile_faults::crash::read_block")
        );
        assert!(has_address(real) && !has_address(inlined));
        assert_eq!(
            short_name(frame_function(trait_impl).unwrap()),
            "<X as BigFile>::loadblk"
        );
        assert_eq!(short_name("memory_item"), "memory_item");
        assert_eq!(short_name("std::sys::backtrace::f<a::B>"), "f<B>");
    }
}
