//! The descriptor: opening it, its features, registering ranges, reading
//! events, resolving them.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use bigfile_os::syscall;

use crate::abi;
use crate::event::Event;

/// Why this process cannot use userfaultfd for the kernel's faults.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// Neither the system call nor `/dev/userfaultfd` gave a descriptor
    /// that sees kernel faults.
    #[error(
        "userfaultfd is not allowed for kernel faults: userfaultfd(2): {syscall}; /dev/userfaultfd: {device} \
         (root, CAP_SYS_PTRACE, the sysctl vm.unprivileged_userfaultfd=1 or read-write access to \
         /dev/userfaultfd allow it, unless a seccomp filter or security module forbids it, as container \
         runtimes' default profiles do)"
    )]
    Denied {
        syscall: io::Error,
        device: io::Error,
    },
    /// The kernel lacks a feature bigfile needs (shared-memory minor
    /// faults, write-protection of shared memory, the faulting thread).
    #[error("userfaultfd lacks {0} (this kernel is too old for bigfile's userfaultfd backend)")]
    Feature(&'static str),
    /// Another failure (e.g. a seccomp filter answering EINVAL or ENOSYS).
    #[error("userfaultfd: {0}")]
    Os(io::Error),
}

/// Features the kernel granted beyond those required.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// `UFFDIO_POISON` (6.6): fail one page's accesses.
    pub poison: bool,
    /// Write-protect markers on pages not yet populated.
    pub wp_unpopulated: bool,
    /// Minor faults on hugetlbfs mappings (5.13): without it a hugetlbfs
    /// piece cannot be registered as [`Uffd::register_part`] does.
    pub minor_hugetlbfs: bool,
}

/// A userfaultfd: non-blocking, closed on exec.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: Features,
    /// Opened through `/dev/userfaultfd` (the system call was refused).
    via_device: bool,
    /// The process that opened it. A forked child inherits the descriptor,
    /// but the descriptor still acts on the address space of the process
    /// that opened it: from the child, a registration or resolution would
    /// change the parent's mappings. So every operation checks.
    owner: libc::pid_t,
}

const REQUIRED: [(u64, &str); 5] = [
    (
        abi::UFFD_FEATURE_MISSING_SHMEM,
        "missing faults on shared memory",
    ),
    (
        abi::UFFD_FEATURE_MINOR_SHMEM,
        "minor faults on shared memory",
    ),
    (
        abi::UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
        "write-protection of shared memory",
    ),
    (abi::UFFD_FEATURE_THREAD_ID, "the faulting thread's id"),
    (abi::UFFD_FEATURE_EXACT_ADDRESS, "exact fault addresses"),
];
const REQUIRED_MASK: u64 = abi::UFFD_FEATURE_MISSING_SHMEM
    | abi::UFFD_FEATURE_MINOR_SHMEM
    | abi::UFFD_FEATURE_WP_HUGETLBFS_SHMEM
    | abi::UFFD_FEATURE_THREAD_ID
    | abi::UFFD_FEATURE_EXACT_ADDRESS;
const OPTIONAL: u64 =
    abi::UFFD_FEATURE_POISON | abi::UFFD_FEATURE_WP_UNPOPULATED | abi::UFFD_FEATURE_MINOR_HUGETLBFS;

impl Uffd {
    /// A userfaultfd that sees kernel faults too, with the features bigfile
    /// needs; else why not.
    pub fn open() -> Result<Uffd, Unavailable> {
        let (fd, via_device) = new_fd()?;
        let granted = match negotiate(&fd, REQUIRED_MASK | OPTIONAL) {
            Ok(granted) => granted,
            // A kernel lacking an optional feature refuses the whole request;
            // UFFDIO_API can be asked once per descriptor, so on a new one.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let (fd2, _) = new_fd()?;
                match negotiate(&fd2, REQUIRED_MASK) {
                    Ok(granted) => return Ok(Uffd::new(fd2, granted, via_device)),
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        return Err(missing_feature(e))
                    }
                    Err(e) => return Err(Unavailable::Os(e)),
                }
            }
            Err(e) => return Err(Unavailable::Os(e)),
        };
        Ok(Uffd::new(fd, granted, via_device))
    }

    fn new(fd: OwnedFd, granted: u64, via_device: bool) -> Uffd {
        let granted = granted & !hidden_features();
        Uffd {
            fd,
            features: Features {
                poison: granted & abi::UFFD_FEATURE_POISON != 0,
                wp_unpopulated: granted & abi::UFFD_FEATURE_WP_UNPOPULATED != 0,
                minor_hugetlbfs: granted & abi::UFFD_FEATURE_MINOR_HUGETLBFS != 0,
            },
            via_device,
            // SAFETY: getpid has no preconditions.
            owner: unsafe { libc::getpid() },
        }
    }

    /// Whether this process opened it (not a forked child of the one that
    /// did). Operations from a child fail with an error saying so (`forked_child_error`).
    pub fn is_own(&self) -> bool {
        // SAFETY: getpid has no preconditions.
        self.owner == unsafe { libc::getpid() }
    }

    pub fn features(&self) -> Features {
        self.features
    }

    /// Whether the system call was refused and `/dev/userfaultfd` used.
    pub fn via_device(&self) -> bool {
        self.via_device
    }

    /// Register `[addr, addr + len)` (page-aligned, part of a shared-memory
    /// mapping) for missing, minor and write-protect faults. Faults there
    /// block their thread until resolved; the registration ends with the
    /// returned value (or the mapping).
    pub fn register(&self, addr: usize, len: usize) -> io::Result<Registration<'_>> {
        self.register_part(addr, len)?;
        Ok(Registration {
            uffd: self,
            addr,
            len,
        })
    }

    /// Register `[addr, addr + len)` (page-aligned, anonymous memory: a
    /// reservation nothing is mapped in yet) for missing faults: every
    /// access there, the kernel's included, blocks its thread until woken.
    /// The registration ends with the returned value (or the mapping); parts
    /// of the range mapped anew later are registered with
    /// [`Uffd::register_part`], and end with it too.
    pub fn register_missing(&self, addr: usize, len: usize) -> io::Result<Registration<'_>> {
        self.register_missing_part(addr, len)?;
        Ok(Registration {
            uffd: self,
            addr,
            len,
        })
    }

    /// As [`Uffd::register_missing`], for anonymous memory mapped anew over
    /// part of a range registered before, with no value of its own: the
    /// registration of the range around it ends it.
    pub fn register_missing_part(&self, addr: usize, len: usize) -> io::Result<()> {
        self.register_mode(
            addr,
            len,
            abi::UFFDIO_REGISTER_MODE_MISSING,
            &[(0x02, "UFFDIO_WAKE")],
        )
    }

    /// Register `[addr, addr + len)` (page-aligned, a shared-memory mapping
    /// just made over part of a range registered before; a hugetlbfs one,
    /// huge-page-aligned, needs `features().minor_hugetlbfs`) for missing, minor
    /// and write-protect faults, with no value of its own: the registration
    /// of the range around it ends it.
    pub fn register_part(&self, addr: usize, len: usize) -> io::Result<()> {
        self.register_mode(
            addr,
            len,
            abi::UFFDIO_REGISTER_MODE_MISSING
                | abi::UFFDIO_REGISTER_MODE_MINOR
                | abi::UFFDIO_REGISTER_MODE_WP,
            &[
                (0x07, "UFFDIO_CONTINUE"),
                (0x06, "UFFDIO_WRITEPROTECT"),
                (0x02, "UFFDIO_WAKE"),
            ],
        )
    }

    /// `UFFDIO_REGISTER` with `mode`, checking the range supports `needed`
    /// (ioctls as bits numbered like the requests, with their names).
    fn register_mode(
        &self,
        addr: usize,
        len: usize,
        mode: u64,
        needed: &[(u32, &str)],
    ) -> io::Result<()> {
        let mut reg = abi::uffdio_register {
            range: range(addr, len),
            mode,
            ioctls: 0,
        };
        self.ioctl(abi::UFFDIO_REGISTER, &mut reg)?;
        for &(nr, name) in needed {
            if reg.ioctls & (1 << nr) == 0 {
                let _ = self.ioctl(abi::UFFDIO_UNREGISTER, &mut range(addr, len));
                return Err(io::Error::other(format!(
                    "{name} is not available on this range"
                )));
            }
        }
        Ok(())
    }

    /// The page-fault events waiting, at most `out.len()`; 0 if none.
    pub fn read_events(&self, out: &mut Vec<Event>, max: usize) -> io::Result<usize> {
        if !self.is_own() {
            return Err(forked_child_error());
        }
        let mut msgs = vec![abi::uffd_msg::default(); max.max(1)];
        let bytes = size_of_val(msgs.as_slice());
        // SAFETY: reading into a buffer of `bytes` bytes we own; uffd_msg is
        // plain data for which any bytes are valid.
        let n = match syscall!(unsafe {
            libc::read(self.fd.as_raw_fd(), msgs.as_mut_ptr().cast(), bytes)
        }) {
            Ok(n) => n as usize / size_of::<abi::uffd_msg>(),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        let before = out.len();
        out.extend(msgs[..n].iter().filter_map(Event::from_msg));
        Ok(out.len() - before)
    }

    /// Map the file's pages over `[addr, addr + len)` in the registered
    /// mapping (they must be in the page cache), write-protected if `wp`;
    /// with `wake`, wake the threads waiting there. A page already mapped
    /// (another thread resolved it) is not an error.
    pub fn resolve(&self, addr: usize, len: usize, wp: bool, wake: bool) -> io::Result<()> {
        if !self.continue_range(addr, len, wp, wake)? && wake {
            self.wake(addr, len)?;
        }
        Ok(())
    }

    /// Map the file's pages over `[addr, addr + len)`, none of which may be
    /// mapped there yet, write-protected if `wp`, waking nobody: `Ok(true)`.
    /// `Ok(false)` if a page was found mapped already (EEXIST: an access
    /// reached the range before it was registered); the pages before it are
    /// mapped, the rest not.
    pub fn resolve_new(&self, addr: usize, len: usize, wp: bool) -> io::Result<bool> {
        self.continue_range(addr, len, wp, false)
    }

    /// `UFFDIO_CONTINUE`: false if it stopped at a page mapped already.
    /// EAGAIN (the kernel found the page table changing under it, e.g.
    /// freed by a concurrent zap of its range) is retried from where it
    /// stopped.
    fn continue_range(&self, addr: usize, len: usize, wp: bool, wake: bool) -> io::Result<bool> {
        let mut mode = if wp { abi::UFFDIO_CONTINUE_MODE_WP } else { 0 };
        if !wake {
            mode |= abi::UFFDIO_CONTINUE_MODE_DONTWAKE;
        }
        let (mut addr, mut len) = (addr, len);
        for _ in 0..EAGAIN_RETRIES {
            let mut c = abi::uffdio_continue {
                range: range(addr, len),
                mode,
                mapped: 0,
            };
            match self.ioctl(abi::UFFDIO_CONTINUE, &mut c) {
                Ok(()) => return Ok(true),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => return Ok(false),
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    let done = usize::try_from(c.mapped).unwrap_or(0).min(len);
                    (addr, len) = (addr + done, len - done);
                    std::thread::yield_now();
                }
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::from_raw_os_error(libc::EAGAIN))
    }

    /// Write-protect (`protect`) or unprotect `[addr, addr + len)`; with
    /// `wake`, an unprotection wakes the threads waiting there.
    pub fn write_protect(
        &self,
        addr: usize,
        len: usize,
        protect: bool,
        wake: bool,
    ) -> io::Result<()> {
        let mut mode = if protect {
            abi::UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        };
        // Protecting wakes nobody; the kernel refuses DONTWAKE with it.
        if !wake && !protect {
            mode |= abi::UFFDIO_WRITEPROTECT_MODE_DONTWAKE;
        }
        let mut wp = abi::uffdio_writeprotect {
            range: range(addr, len),
            mode,
        };
        // EAGAIN: retried, as for `UFFDIO_CONTINUE`.
        for _ in 0..EAGAIN_RETRIES {
            match self.ioctl(abi::UFFDIO_WRITEPROTECT, &mut wp) {
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => std::thread::yield_now(),
                r => return r,
            }
        }
        Err(io::Error::from_raw_os_error(libc::EAGAIN))
    }

    /// Wake the threads waiting on faults in `[addr, addr + len)` (after
    /// the page was made present some other way); they retry the access.
    pub fn wake(&self, addr: usize, len: usize) -> io::Result<()> {
        self.ioctl(abi::UFFDIO_WAKE, &mut range(addr, len))
    }

    /// Make `[addr, addr + len)` fail its accesses until the range is
    /// unmapped or its pages dropped: SIGBUS for user-mode code, EFAULT for
    /// the kernel's; wakes the waiting threads. Needs `features().poison`.
    pub fn poison(&self, addr: usize, len: usize) -> io::Result<()> {
        if !self.features.poison {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        let mut p = abi::uffdio_poison {
            range: range(addr, len),
            mode: 0,
            updated: 0,
        };
        self.ioctl(abi::UFFDIO_POISON, &mut p)
    }

    fn ioctl<T>(&self, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
        if !self.is_own() {
            return Err(forked_child_error());
        }
        // SAFETY: `request` is one of the UFFDIO requests, whose argument is
        // the structure `T` the caller passes (sizes checked by the abi
        // tests); the kernel reads and writes only that structure.
        syscall!(unsafe { libc::ioctl(self.fd.as_raw_fd(), request, arg as *mut T) }).map(drop)
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// How many times an operation the kernel answers EAGAIN ("retry") is
/// made before the error is returned.
const EAGAIN_RETRIES: usize = 1000;

/// A registered range; unregistered on drop (faults there then go to the
/// mapping's own rules again).
#[derive(Debug)]
pub struct Registration<'a> {
    uffd: &'a Uffd,
    addr: usize,
    len: usize,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        // The range may be gone already (unmapped first): nothing to undo.
        let _ = self
            .uffd
            .ioctl(abi::UFFDIO_UNREGISTER, &mut range(self.addr, self.len));
    }
}

/// The error of an operation on a userfaultfd inherited from the parent
/// process: it would act on the parent's address space.
pub(crate) fn forked_child_error() -> io::Error {
    io::Error::other(
        "the userfaultfd belongs to the parent process (this is a forked child): \
         it acts on the parent's address space",
    )
}

fn range(addr: usize, len: usize) -> abi::uffdio_range {
    abi::uffdio_range {
        start: addr as u64,
        len: len as u64,
    }
}

fn open_device(flags: libc::c_int) -> io::Result<RawFd> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/userfaultfd")?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the new descriptor's flags as its
    // argument and returns a new descriptor.
    let fd = syscall!(unsafe { libc::ioctl(dev.as_raw_fd(), abi::USERFAULTFD_IOC_NEW, flags) })?;
    Ok(fd)
}

/// A new descriptor (non-blocking, closed on exec, kernel faults
/// included): from the system call, else from `/dev/userfaultfd`; whether
/// the device was used.
fn new_fd() -> Result<(OwnedFd, bool), Unavailable> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd takes flags only and returns a new descriptor.
    let (fd, via_device) = match syscall!(unsafe { libc::syscall(libc::SYS_userfaultfd, flags) }) {
        Ok(fd) => (fd as RawFd, false),
        Err(syscall) if syscall.raw_os_error() == Some(libc::EPERM) => match open_device(flags) {
            Ok(fd) => (fd, true),
            Err(device) => return Err(Unavailable::Denied { syscall, device }),
        },
        Err(e) => return Err(Unavailable::Os(e)),
    };
    // SAFETY: a descriptor the kernel just gave us, owned by nobody else.
    Ok((unsafe { OwnedFd::from_raw_fd(fd) }, via_device))
}

/// `UFFDIO_API` asking for `features`: those granted.
fn negotiate(fd: &OwnedFd, features: u64) -> io::Result<u64> {
    let mut api = abi::uffdio_api {
        api: abi::UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a uffdio_api, which we own.
    syscall!(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            abi::UFFDIO_API,
            &mut api as *mut abi::uffdio_api,
        )
    })?;
    Ok(api.features)
}

/// The environment variable that hides optional features the kernel
/// granted, for tests of what a user of an older kernel meets: a
/// comma-separated list of `poison`, `wp_unpopulated`, `minor_hugetlbfs`.
pub const HIDE_FEATURES_ENV: &str = "BIGFILE_UFFD_HIDE_FEATURES";

/// The optional features [`HIDE_FEATURES_ENV`] hides.
fn hidden_features() -> u64 {
    let Ok(names) = std::env::var(HIDE_FEATURES_ENV) else {
        return 0;
    };
    names
        .split(',')
        .map(|n| match n.trim() {
            "poison" => abi::UFFD_FEATURE_POISON,
            "wp_unpopulated" => abi::UFFD_FEATURE_WP_UNPOPULATED,
            "minor_hugetlbfs" => abi::UFFD_FEATURE_MINOR_HUGETLBFS,
            _ => 0,
        })
        .fold(0, |a, b| a | b)
}

/// The first required feature the kernel lacks (asked on a new descriptor
/// with no feature: the answer lists all it has), as the reason.
fn missing_feature(refused: io::Error) -> Unavailable {
    let offered = new_fd().ok().and_then(|(fd, _)| negotiate(&fd, 0).ok());
    match offered.and_then(|o| REQUIRED.iter().find(|(f, _)| o & f == 0)) {
        Some((_, name)) => Unavailable::Feature(name),
        None => Unavailable::Os(refused),
    }
}
