//! The kernel's userfaultfd ABI (`include/uapi/linux/userfaultfd.h`): the
//! ioctl numbers, the structures they take and the bits they use. libc has
//! none of them. Values are the kernel's ABI, stable across versions; the
//! tests check the structure sizes the ioctl numbers encode.

#![allow(non_camel_case_types)] // the kernel's names, for grepping

/// `UFFD_API`: the API version `UFFDIO_API` negotiates.
pub const UFFD_API: u64 = 0xAA;
/// The ioctl type byte of every `UFFDIO_*` request.
const UFFDIO: u64 = 0xAA;

const fn ioc(dir: u64, nr: u64, size: usize) -> libc::c_ulong {
    ((dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr) as libc::c_ulong
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

pub const UFFDIO_API: libc::c_ulong = ioc(IOC_READ | IOC_WRITE, 0x3F, size_of::<uffdio_api>());
pub const UFFDIO_REGISTER: libc::c_ulong =
    ioc(IOC_READ | IOC_WRITE, 0x00, size_of::<uffdio_register>());
pub const UFFDIO_UNREGISTER: libc::c_ulong = ioc(IOC_READ, 0x01, size_of::<uffdio_range>());
pub const UFFDIO_WAKE: libc::c_ulong = ioc(IOC_READ, 0x02, size_of::<uffdio_range>());
pub const UFFDIO_WRITEPROTECT: libc::c_ulong =
    ioc(IOC_READ | IOC_WRITE, 0x06, size_of::<uffdio_writeprotect>());
pub const UFFDIO_CONTINUE: libc::c_ulong =
    ioc(IOC_READ | IOC_WRITE, 0x07, size_of::<uffdio_continue>());
pub const UFFDIO_POISON: libc::c_ulong =
    ioc(IOC_READ | IOC_WRITE, 0x08, size_of::<uffdio_poison>());
/// `/dev/userfaultfd`'s one ioctl: a new userfaultfd (flags as for the
/// system call).
pub const USERFAULTFD_IOC_NEW: libc::c_ulong = ioc(0, 0x00, 0);

// Features UFFDIO_API may grant.
pub const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
pub const UFFD_FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
pub const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
pub const UFFD_FEATURE_EXACT_ADDRESS: u64 = 1 << 11;
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFD_FEATURE_POISON: u64 = 1 << 14;

// Register modes.
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;

// Resolution modes.
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
pub const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
pub const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
pub const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;

// Events and page-fault flags.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
pub const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_api {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_range {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_register {
    pub range: uffdio_range,
    pub mode: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_writeprotect {
    pub range: uffdio_range,
    pub mode: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_continue {
    pub range: uffdio_range,
    pub mode: u64,
    pub mapped: i64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffdio_poison {
    pub range: uffdio_range,
    pub mode: u64,
    pub updated: i64,
}

/// `struct uffd_msg` as a page-fault event lays it out (the union's other
/// members, for fork/remap/remove/unmap events, are not requested).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct uffd_msg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    /// `arg.pagefault.flags`
    pub flags: u64,
    /// `arg.pagefault.address`
    pub address: u64,
    /// `arg.pagefault.feat.ptid` (with `UFFD_FEATURE_THREAD_ID`), padded
    /// to the union's size.
    pub ptid: u32,
    pub pad: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_the_kernel_abi() {
        // The sizes the kernel's _IOWR/_IOR encode for each request.
        assert_eq!(size_of::<uffdio_api>(), 24);
        assert_eq!(size_of::<uffdio_range>(), 16);
        assert_eq!(size_of::<uffdio_register>(), 32);
        assert_eq!(size_of::<uffdio_writeprotect>(), 24);
        assert_eq!(size_of::<uffdio_continue>(), 32);
        assert_eq!(size_of::<uffdio_poison>(), 32);
        assert_eq!(size_of::<uffd_msg>(), 32);
        // Two numbers as <linux/userfaultfd.h> defines them on x86-64 and
        // aarch64 (same encoding).
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_CONTINUE, 0xc020_aa07);
    }
}
