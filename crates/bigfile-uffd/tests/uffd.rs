//! userfaultfd against a real kernel: kernel-mode and user-mode faults on a
//! memfd mapping, told apart by the faulting thread; minor faults;
//! write-protection tracking a kernel write; poisoned pages; refusal for an
//! unprivileged user.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use bigfile_uffd::{
    thread_mode, waiting, Buffer, Event, FaultKind, ThreadMode, Uffd, Unavailable, Waiting,
};

const PS: usize = 4096;
const PAGES: usize = 8;

/// A memfd mapped twice: `vma` (registered) and `win` (the loader's view).
struct Shm {
    fd: OwnedFd,
    vma: *mut u8,
    win: *mut u8,
}

// SAFETY: the pointers are to shared mappings alive as long as Shm; tests
// synchronize the accesses they make through them.
unsafe impl Send for Shm {}
// SAFETY: as above.
unsafe impl Sync for Shm {}

impl Shm {
    fn new() -> Shm {
        // SAFETY: plain system calls on values we own; results checked.
        unsafe {
            let fd = libc::memfd_create(c"uffd-test".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            assert_eq!(libc::ftruncate(fd, (PAGES * PS) as i64), 0);
            let map = || {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    PAGES * PS,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    0,
                );
                assert_ne!(p, libc::MAP_FAILED);
                p.cast::<u8>()
            };
            Shm {
                vma: map(),
                win: map(),
                fd: OwnedFd::from_raw_fd(fd),
            }
        }
    }

    fn addr(&self, page: usize) -> usize {
        self.vma as usize + page * PS
    }

    /// "loadblk": the page's bytes written through the window.
    fn fill(&self, page: usize, byte: u8) {
        // SAFETY: the window maps PAGES pages; nothing else writes this page now.
        unsafe { std::ptr::write_bytes(self.win.add(page * PS), byte, PS) };
    }

    fn drop_page(&self, page: usize) {
        // SAFETY: punching a hole in our own memfd.
        let rc = unsafe {
            libc::fallocate(
                self.fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                (page * PS) as i64,
                PS as i64,
            )
        };
        assert_eq!(rc, 0);
    }
}

/// Every event the server saw, with the faulting thread's mode then.
type Seen = Arc<Mutex<Vec<(Event, ThreadMode, Waiting)>>>;

/// The system call a thread was in (`None`: in its own code) and the
/// buffer it copies, if the reader follows that call's.
fn call_of(mode: ThreadMode) -> Option<(i64, Option<Buffer>)> {
    match mode {
        ThreadMode::Syscall(call) => Some((call.nr, call.buffer())),
        _ => None,
    }
}

/// Where thread `tid`, whose fault was just reported, waits once it is
/// asleep (it queues the event before it sleeps: running or not said
/// until then).
fn asleep(tid: libc::pid_t) -> Waiting {
    for _ in 0..100_000 {
        match waiting(tid).unwrap() {
            Waiting::Running | Waiting::Unknown => thread::yield_now(),
            w => return w,
        }
    }
    waiting(tid).unwrap()
}

/// Resolves faults on `shm` until stopped: missing pages filled with
/// `b'a' + page`, write-protect faults unprotected; every event recorded with
/// the faulting thread's mode.
fn server(uffd: Arc<Uffd>, shm: Arc<Shm>, stop: Arc<AtomicBool>) -> (thread::JoinHandle<()>, Seen) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let h = thread::spawn(move || {
        let mut events = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let mut pfd = libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd we own.
            unsafe { libc::poll(&mut pfd, 1, 20) };
            events.clear();
            uffd.read_events(&mut events, 16).unwrap();
            for e in &events {
                let mode = thread_mode(e.tid).unwrap();
                log.lock().unwrap().push((*e, mode, asleep(e.tid)));
                let page_addr = e.addr & !(PS - 1);
                let page = (page_addr - shm.vma as usize) / PS;
                match e.kind {
                    FaultKind::WriteProtect => {
                        uffd.write_protect(page_addr, PS, false, true).unwrap()
                    }
                    FaultKind::Missing => {
                        shm.fill(page, b'a' + page as u8);
                        uffd.resolve(page_addr, PS, !e.write, true).unwrap();
                    }
                    FaultKind::Minor => uffd.resolve(page_addr, PS, !e.write, true).unwrap(),
                }
            }
        }
    });
    (h, seen)
}

/// The userfaultfd, or `None` where this user may not have one for kernel
/// faults (not root, vm.unprivileged_userfaultfd=0, no access to
/// /dev/userfaultfd): the test is then skipped, unless
/// `BIGFILE_REQUIRE_UFFD` is set (as `cargo xtask test` does where it is
/// available), which makes it fail.
fn uffd_or_skip() -> Option<Uffd> {
    match Uffd::open() {
        Ok(u) => Some(u),
        Err(e) if std::env::var_os("BIGFILE_REQUIRE_UFFD").is_none() => {
            eprintln!("skipped: userfaultfd not available: {e}");
            None
        }
        Err(e) => panic!("BIGFILE_REQUIRE_UFFD is set, yet: {e}"),
    }
}

fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as libc::pid_t }
}

#[test]
fn kernel_and_user_faults_are_served_and_told_apart() {
    let Some(uffd) = uffd_or_skip().map(Arc::new) else {
        return;
    };
    let shm = Arc::new(Shm::new());
    let reg = uffd.register(shm.vma as usize, PAGES * PS).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (h, seen) = server(uffd.clone(), shm.clone(), stop.clone());
    let me = gettid();

    // user-mode read of a missing page
    // SAFETY: reading a byte of the registered mapping.
    assert_eq!(unsafe { shm.vma.read_volatile() }, b'a');
    // the kernel reads a missing page for write(2)
    let mut pipe = [0; 2];
    // SAFETY: a pipe into an array we own.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    // SAFETY: the descriptors are new and ours.
    let (mut rd, mut wr) = unsafe {
        (
            std::fs::File::from_raw_fd(pipe[0]),
            std::fs::File::from_raw_fd(pipe[1]),
        )
    };
    // SAFETY: page 1 of the mapping, PS bytes.
    let from_map = unsafe { std::slice::from_raw_parts(shm.vma.add(PS), 16) };
    assert_eq!(wr.write(from_map).unwrap(), 16);
    let mut got = [0u8; 16];
    rd.read_exact(&mut got).unwrap();
    assert_eq!(got, [b'b'; 16]);
    // the kernel writes into a missing page for read(2)
    wr.write_all(b"hello").unwrap();
    // SAFETY: page 2 of the mapping.
    let into_map = unsafe { std::slice::from_raw_parts_mut(shm.vma.add(2 * PS), 5) };
    assert_eq!(rd.read(into_map).unwrap(), 5);
    assert_eq!(into_map, b"hello");
    // a page in the page cache but not mapped here: a minor fault
    shm.fill(3, b'M');
    // SAFETY: page 3 of the mapping.
    assert_eq!(unsafe { shm.vma.add(3 * PS).read_volatile() }, b'M');
    // dropped (a reclaim): missing again
    shm.drop_page(0);
    // SAFETY: page 0 of the mapping.
    assert_eq!(unsafe { shm.vma.read_volatile() }, b'a');

    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();
    drop(reg);
    let seen = seen.lock().unwrap();
    let mine: Vec<_> = seen
        .iter()
        .filter(|(e, _, _)| e.tid == me)
        .map(|(e, m, _)| (e.addr - shm.vma as usize, e.kind, e.write, call_of(*m)))
        .collect();
    // Each fault's thread, user or kernel mode, slept in the userfaultfd's
    // wait (as `/proc` tells a fault still waiting from a stale event's).
    assert!(
        seen.iter()
            .filter(|(e, _, _)| e.tid == me)
            .all(|(_, _, w)| *w == Waiting::InUserfault),
        "{seen:?}"
    );
    let buffer = |offset, len| Buffer {
        addr: shm.vma as usize + offset,
        len,
    };
    assert_eq!(
        mine,
        [
            (0, FaultKind::Missing, false, None),
            (
                PS,
                FaultKind::Missing,
                false,
                Some((libc::SYS_write, Some(buffer(PS, 16))))
            ),
            (
                2 * PS,
                FaultKind::Missing,
                true,
                Some((libc::SYS_read, Some(buffer(2 * PS, 5))))
            ),
            (3 * PS, FaultKind::Minor, false, None),
            (0, FaultKind::Missing, false, None),
        ]
    );
}

#[test]
fn write_protection_tracks_kernel_writes() {
    let Some(uffd) = uffd_or_skip().map(Arc::new) else {
        return;
    };
    let shm = Arc::new(Shm::new());
    let _reg = uffd.register(shm.vma as usize, PAGES * PS).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (h, seen) = server(uffd.clone(), shm.clone(), stop.clone());
    // a read maps page 4 write-protected (the server resolves reads with wp)
    // SAFETY: page 4 of the mapping.
    assert_eq!(unsafe { shm.vma.add(4 * PS).read_volatile() }, b'a' + 4);
    // the kernel writes into it: a write-protect fault, then the write lands
    let mut f = std::fs::File::open("/dev/zero").unwrap();
    // SAFETY: page 4 of the mapping.
    let dst = unsafe { std::slice::from_raw_parts_mut(shm.vma.add(4 * PS + 8), 8) };
    f.read_exact(dst).unwrap();
    assert_eq!(dst, [0u8; 8]);
    stop.store(true, Ordering::Relaxed);
    h.join().unwrap();
    let kinds: Vec<_> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|(e, m, _)| {
            (
                e.addr - shm.vma as usize,
                e.kind,
                call_of(*m).map(|(nr, _)| nr),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            (4 * PS, FaultKind::Missing, None),
            (4 * PS + 8, FaultKind::WriteProtect, Some(libc::SYS_read))
        ]
    );
}

#[test]
fn poisoned_page_fails_kernel_access_with_efault() {
    let Some(uffd) = uffd_or_skip() else {
        return;
    };
    assert!(uffd.features().poison, "Linux 6.18 has UFFDIO_POISON");
    let shm = Shm::new();
    let _reg = uffd.register(shm.vma as usize, PAGES * PS).unwrap();
    uffd.poison(shm.addr(5), PS).unwrap();
    let mut f = std::fs::File::open("/dev/zero").unwrap();
    // SAFETY: page 5 of the mapping (the kernel's access fails, ours is none).
    let dst = unsafe { std::slice::from_raw_parts_mut(shm.vma.add(5 * PS), 8) };
    let err = f.read(dst).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFAULT));
}

#[test]
fn an_unprivileged_user_is_told_why_not() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: giving up root needs root");
        return;
    }
    // A child that gives up root: the system call is refused (the sysctl is
    // 0 here) and /dev/userfaultfd is root's only.
    // SAFETY: fork; the child only calls async-signal-safe functions and
    // userfaultfd's system calls, then _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: setuid to nobody; then report through the exit status.
        let code = unsafe {
            if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                3
            } else {
                match Uffd::open() {
                    Err(Unavailable::Denied { syscall, device })
                        if syscall.raw_os_error() == Some(libc::EPERM)
                            && device.raw_os_error() == Some(libc::EACCES) =>
                    {
                        0
                    }
                    Err(_) => 1,
                    Ok(_) => 2,
                }
            }
        };
        // SAFETY: leaving the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waiting for our child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    let unprivileged = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap();
    if unprivileged.trim() == "0" {
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "status {status:#x}"
        );
    } else {
        // The sysctl allows it: the child gets a descriptor.
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 2,
            "status {status:#x}"
        );
    }
    let msg = Unavailable::Denied {
        syscall: std::io::Error::from_raw_os_error(libc::EPERM),
        device: std::io::Error::from_raw_os_error(libc::EACCES),
    }
    .to_string();
    assert!(
        msg.contains("vm.unprivileged_userfaultfd=1") && msg.contains("/dev/userfaultfd"),
        "{msg}"
    );
}

#[test]
fn a_forked_child_cannot_touch_its_parents_registrations() {
    let Some(uffd) = uffd_or_skip() else {
        return;
    };
    let shm = Shm::new();
    let reg = uffd.register(shm.vma as usize, PAGES * PS).unwrap();
    // SAFETY: fork; the child only makes userfaultfd calls (ioctl, getpid)
    // and _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // The inherited descriptor acts on the parent's address space: the
        // child's registration (a copy) must not end the parent's.
        let own = uffd.is_own();
        let refused = uffd.wake(shm.addr(0), PS).is_err();
        drop(reg);
        // SAFETY: leaving the child without running the parent's destructors.
        unsafe { libc::_exit(if !own && refused { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waiting for our child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "status {status:#x}"
    );
    assert!(uffd.is_own());
    // Still registered in the parent: poisoning a page of it works.
    uffd.poison(shm.addr(1), PS).unwrap();
    drop(reg);
}

/// A RAM page mapped over a slot of an anonymous reservation registered for
/// missing faults (how virtmem maps a recycled page): a thread blocked in
/// the slot's fault retries into the page once woken; an access that
/// reached the page before the piece was registered is seen, as EEXIST of
/// `resolve_new`.
#[test]
fn a_page_mapped_over_a_registered_reservation() {
    let Some(uffd) = uffd_or_skip() else {
        return;
    };
    let shm = Shm::new();
    shm.fill(0, b'x');
    shm.fill(1, b'y');
    // SAFETY: a new anonymous mapping of two pages, ours alone.
    let res = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            2 * PS,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(res, libc::MAP_FAILED);
    let slot = res as usize;
    let reg = uffd.register_missing(slot, 2 * PS).unwrap();
    let map_over = |at: usize, page: usize| {
        // SAFETY: a slot of the reservation above, replaced by a page of
        // our own memfd.
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                PS,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                shm.fd.as_raw_fd(),
                (page * PS) as i64,
            )
        };
        assert_eq!(p as usize, at);
    };
    // SAFETY: reading a byte of the registered reservation: blocks until
    // woken.
    let reader = thread::spawn(move || unsafe { (slot as *const u8).read_volatile() });
    let mut events = Vec::new();
    for _ in 0..1000 {
        uffd.read_events(&mut events, 4).unwrap();
        if !events.is_empty() {
            break;
        }
        thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(
        (events[0].addr & !(PS - 1), events[0].kind),
        (slot, FaultKind::Missing)
    );
    map_over(slot, 0);
    uffd.register_part(slot, PS).unwrap();
    assert!(
        uffd.resolve_new(slot, PS, true).unwrap(),
        "nothing mapped yet"
    );
    uffd.wake(slot, PS).unwrap();
    assert_eq!(
        reader.join().unwrap(),
        b'x',
        "the woken thread reads the page"
    );

    // An access between the mmap and the registration: seen.
    map_over(slot + PS, 1);
    // SAFETY: the page just mapped, not registered yet: the write lands.
    unsafe { ((slot + PS) as *mut u8).write_volatile(b'z') };
    uffd.register_part(slot + PS, PS).unwrap();
    assert!(!uffd.resolve_new(slot + PS, PS, true).unwrap(), "EEXIST");
    drop(reg);
    // SAFETY: our mapping, unused from here on.
    assert_eq!(unsafe { libc::munmap(res, 2 * PS) }, 0);
}
