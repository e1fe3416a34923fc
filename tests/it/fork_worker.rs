//! fork(2) inside a loader running on one of bigfile's own threads: a
//! userfaultfd worker (a system call's fault) or a read-ahead worker (native
//! and host-lock pools). The child's only thread is a copy of that worker,
//! with no caller to return to: once the loader returns there, the child
//! must not go back into its parent's service (its queues, its
//! userfaultfd's jobs): it says so on stderr and `_exit`s with
//! `FORKED_WORKER_STATUS`. The parent's load goes on as if nothing
//! happened.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bigfile::virtmem::{
    Advice, BigFile, BlockError, FaultBackend, FileH, Ram, WriteoutFlags, FORKED_WORKER_STATUS,
};
use bigfile_testkit::child::TIMEOUT;
use bigfile_testkit::loads::settle;

use crate::common::{holds_initial, ram, write_out, MemFile, BLK};

/// Blocks mapped.
const BLOCKS: u64 = 8;

/// A loader (block `n` all bytes `n + 1`, as the memory file's) that forks
/// in its first `loadblk` (or `storeblk`) on a thread whose name starts
/// with `fork_on`; in the child, it sends stderr to `stderr` and returns.
/// No lock is taken around the fork: the child must get back to bigfile.
struct ForkingFile {
    fork_on: &'static str,
    on_store: bool,
    needs_host: bool,
    forked: AtomicBool,
    /// The child's pid, in the parent.
    child: AtomicI32,
    stderr: File,
}

impl ForkingFile {
    fn new(fork_on: &'static str, needs_host: bool) -> ForkingFile {
        ForkingFile {
            fork_on,
            on_store: false,
            needs_host,
            forked: AtomicBool::new(false),
            child: AtomicI32::new(0),
            stderr: memfd(),
        }
    }

    fn maybe_fork(&self) {
        let here = std::thread::current().name().unwrap_or("").to_owned();
        if !here.starts_with(self.fork_on) || self.forked.swap(true, SeqCst) {
            return;
        }
        // SAFETY: the child only calls dup2 before it returns into bigfile.
        match unsafe { libc::fork() } {
            // SAFETY: dup2 of a descriptor we own onto stderr.
            0 => unsafe {
                libc::dup2(self.stderr.as_raw_fd(), 2);
            },
            pid => self.child.store(pid, SeqCst),
        }
    }

    /// Wait for the child (forked by now, else the test is wrong): its
    /// wait status and what it wrote on stderr. A child still running after
    /// [`TIMEOUT`] is killed and reported hung.
    fn child_ended(&self) -> (i32, String) {
        let pid = self.child.load(SeqCst);
        assert!(
            pid > 0,
            "the loader never forked on a {} thread",
            self.fork_on
        );
        let t0 = Instant::now();
        let mut status = 0;
        // SAFETY: waitpid on our own child, into a local.
        while unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == 0 {
            if t0.elapsed() > TIMEOUT {
                // SAFETY: our own child.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                }
                panic!("the child forked on a worker hung: {}", self.stderr_text());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        (status, self.stderr_text())
    }

    fn stderr_text(&self) -> String {
        let mut f = &self.stderr;
        let mut text = String::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_string(&mut text).unwrap();
        text
    }

    /// The child exited with the documented status, after saying why.
    fn check_child(&self) {
        let (status, stderr) = self.child_ended();
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == FORKED_WORKER_STATUS,
            "the child forked on a {} thread: wait status {status:#x}, stderr:\n{stderr}",
            self.fork_on
        );
        assert!(
            stderr.contains("bigfile: ") && stderr.contains("forked on bigfile's worker thread"),
            "{stderr}"
        );
    }
}

impl BigFile for ForkingFile {
    fn blksize(&self) -> usize {
        BLK
    }
    fn loadblk(&self, blk: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        if !self.on_store {
            self.maybe_fork();
        }
        buf.fill(MemFile::initial(blk));
        Ok(())
    }
    fn storeblk(&self, _blk: u64, _buf: &[u8]) -> Result<(), BlockError> {
        if self.on_store {
            self.maybe_fork();
        }
        Ok(())
    }
    fn needs_host_lock(&self) -> bool {
        self.needs_host
    }
    fn reads_ahead(&self) -> bool {
        true
    }
}

/// An empty memory file (shared with children forked later).
fn memfd() -> File {
    // SAFETY: a name we own; the new descriptor is ours alone.
    let fd = unsafe { libc::memfd_create(c"bigfile-it-fork-worker".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: as above.
    unsafe { File::from_raw_fd(fd) }
}

/// A RAM on userfaultfd, if this process can have one (else `None`, said,
/// unless it must: `BIGFILE_REQUIRE_UFFD`).
fn uffd_ram() -> Option<Ram> {
    match ram(2 * BLOCKS).with_fault_backend(FaultBackend::Userfaultfd) {
        Ok(ram) => Some(ram),
        Err(e) if std::env::var_os("BIGFILE_REQUIRE_UFFD").is_none() => {
            eprintln!("no userfaultfd here ({e}): nothing to test");
            None
        }
        Err(e) => panic!("userfaultfd required: {e}"),
    }
}

/// A system call's fault, served by a userfaultfd worker whose loader
/// (native, or one taking the host lock) forks: the call copies the right
/// data in the parent; the child ends at once.
#[test]
fn a_loader_forking_on_a_userfaultfd_worker_ends_the_child() {
    for needs_host in [false, true] {
        let Some(ram) = uffd_ram() else {
            return;
        };
        let file = Arc::new(ForkingFile::new("bigfile-uffd-", needs_host));
        let fh = FileH::open(file.clone(), Some(&ram)).unwrap();
        let vma = fh.mmap(0, BLOCKS).unwrap();
        let got = write_out(&vma);
        assert!(
            got.len() == BLOCKS as usize * BLK && holds_initial(&got, 0..BLOCKS),
            "the parent's write(2)"
        );
        file.check_child();
        // The parent's service goes on.
        assert!(ram.reclaim() > 0);
        assert!(holds_initial(&write_out(&vma), 0..BLOCKS), "again");
    }
}

/// A read-ahead worker (of the native pool, or of the host-lock one) whose
/// loader forks: the parent's read-ahead page loads; the child ends.
#[test]
fn a_loader_forking_on_a_read_ahead_worker_ends_the_child() {
    for (needs_host, fork_on) in [
        (false, "bigfile-readahead-"),
        (true, "bigfile-readahead-host-"),
    ] {
        let file = Arc::new(ForkingFile::new(fork_on, needs_host));
        let ram = ram(2 * BLOCKS);
        let fh = FileH::open(file.clone(), Some(&ram)).unwrap();
        let vma = fh.mmap(0, BLOCKS).unwrap();
        vma.advise(Advice::Sequential);
        let mut buf = vec![0u8; BLK];
        // The first fault reads the rest of the mapping ahead, on workers.
        vma.read_at(0, &mut buf).unwrap();
        settle(&fh, 0..BLOCKS);
        file.check_child();
        assert!(fh.stats().readahead_loads > 0);
        for blk in 0..BLOCKS {
            vma.read_at(blk as usize * BLK, &mut buf).unwrap();
            assert!(holds_initial(&buf, blk..blk + 1), "{fork_on}: block {blk}");
        }
    }
}

/// A `storeblk` forking on a worker: a loader there writing out another
/// handle (a layered file), whose `storeblk` forks.
#[test]
fn a_storeblk_forking_on_a_read_ahead_worker_ends_the_child() {
    let mut stored = ForkingFile::new("bigfile-readahead-", false);
    stored.on_store = true;
    let stored = Arc::new(stored);
    let ram = ram(4 * BLOCKS);
    let below = FileH::open(stored.clone(), Some(&ram)).unwrap();
    let below_vma = below.mmap(0, 1).unwrap();
    below_vma.advise(Advice::Random);
    let mut buf = vec![0u8; BLK];
    below_vma.read_at(0, &mut buf).unwrap();
    below_vma.write_at(0, &[0x77]).unwrap();
    let layered = Arc::new(Layered {
        below,
        wrote_out: AtomicBool::new(false),
    });
    let fh = FileH::open(layered.clone(), Some(&ram)).unwrap();
    let vma = fh.mmap(0, BLOCKS).unwrap();
    vma.advise(Advice::Sequential);
    vma.read_at(0, &mut buf).unwrap();
    settle(&fh, 0..BLOCKS);
    stored.check_child();
    for blk in 0..BLOCKS {
        vma.read_at(blk as usize * BLK, &mut buf).unwrap();
        assert!(holds_initial(&buf, blk..blk + 1), "block {blk}");
    }
    assert!(
        layered.below.dirty_blocks().is_empty(),
        "the parent's writeout"
    );
}

/// A native loader that writes out another handle first (once, on a
/// read-ahead worker).
struct Layered {
    below: FileH,
    wrote_out: AtomicBool,
}

impl BigFile for Layered {
    fn blksize(&self) -> usize {
        BLK
    }
    fn loadblk(&self, blk: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let here = std::thread::current().name().unwrap_or("").to_owned();
        if here.starts_with("bigfile-readahead-") && !self.wrote_out.swap(true, SeqCst) {
            self.below
                .dirty_writeout(WriteoutFlags::STORE | WriteoutFlags::MARKSTORED)
                .map_err(|e| e.to_string())?;
        }
        buf.fill(MemFile::initial(blk));
        Ok(())
    }
    fn storeblk(&self, _blk: u64, _buf: &[u8]) -> Result<(), BlockError> {
        Ok(())
    }
    fn needs_host_lock(&self) -> bool {
        false
    }
    fn reads_ahead(&self) -> bool {
        true
    }
}
