//! The C heap kept for Python loaders that allocate block-sized objects
//! on every load (ZODB: three at once for a ZBlk0 block, the record read
//! from the storage and the unpickled state among them).
//!
//! glibc's malloc serves an allocation above its mmap threshold (128 KiB
//! until a free raises it) with a fresh `mmap`, and gives the top of its
//! heap back to the kernel once more than its trim threshold is free there,
//! keeping `M_TOP_PAD` bytes. A load that allocates three 2 MiB objects and
//! frees them left the memory to the kernel either way, so every load
//! touched fresh memory: about 1500 page faults per 2 MiB block, 2-4 ms of
//! a 5 ms fault in a fresh process (benches/README.md). Allocations below
//! `bytes` served from the heap, and `bytes` kept at its top when trimmed,
//! keep that memory in the process from one load to the next.
//!
//! The cost: setting either parameter stops glibc's own raising of its mmap
//! threshold, so allocations above `bytes` (numpy temporaries of more than
//! three blocks, say) stay fresh `mmap`s, where glibc would have served
//! them from the heap once it had freed one; and up to `bytes` more stays
//! resident after the heap shrinks.

use std::sync::atomic::{AtomicUsize, Ordering};

/// The pad we set, 0 if none (it is only ever raised).
static PAD: AtomicUsize = AtomicUsize::new(0);

/// Serve allocations below `bytes` from the C heap (`M_MMAP_THRESHOLD`,
/// at most glibc's 32 MiB) and keep `bytes` free at its top when it is
/// trimmed (`M_TOP_PAD`), unless the user tuned malloc's top pad, trim or
/// mmap threshold through the environment (`MALLOC_TOP_PAD_`,
/// `MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_`, `GLIBC_TUNABLES`):
/// theirs stays. Only ever raised. Returns whether it is now at least
/// `bytes` by our doing; false but for glibc. Called with the GIL held
/// (two callers never race to set it).
pub(crate) fn keep_top(bytes: usize) -> bool {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) || user_tuned(|k| std::env::var_os(k)) {
        return false;
    }
    if PAD.load(Ordering::Relaxed) >= bytes {
        return true;
    }
    let set = set_top_pad(bytes);
    if set {
        PAD.store(bytes, Ordering::Relaxed);
    }
    set
}

/// Whether the environment (as `var` reads it) sets malloc's top pad,
/// trim or mmap threshold.
fn user_tuned(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> bool {
    const TUNABLES: [&str; 3] = ["top_pad", "trim_threshold", "mmap_threshold"];
    TUNABLES
        .iter()
        .any(|t| var(&format!("MALLOC_{}_", t.to_uppercase())).is_some())
        || var("GLIBC_TUNABLES").is_some_and(|v| {
            let v = v.to_string_lossy();
            TUNABLES
                .iter()
                .any(|t| v.contains(&format!("glibc.malloc.{t}")))
        })
}

/// glibc's largest mmap threshold on 64-bit systems (`HEAP_MAX_SIZE / 2`):
/// `mallopt` refuses more.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD_MAX: usize = 32 << 20;

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_top_pad(bytes: usize) -> bool {
    let Ok(pad) = libc::c_int::try_from(bytes) else {
        return false;
    };
    let threshold = bytes.min(MMAP_THRESHOLD_MAX) as libc::c_int;
    // SAFETY: mallopt only sets parameters of malloc (under its own lock).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, threshold) == 1
            && libc::mallopt(libc::M_TOP_PAD, pad) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_top_pad(_bytes: usize) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_users_malloc_tuning_stays() {
        let env = |set: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                set.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        };
        assert!(!user_tuned(env(&[])));
        assert!(!user_tuned(env(&[(
            "GLIBC_TUNABLES",
            "glibc.malloc.arena_max=2"
        )])));
        assert!(user_tuned(env(&[("MALLOC_TOP_PAD_", "0")])));
        assert!(user_tuned(env(&[("MALLOC_TRIM_THRESHOLD_", "1")])));
        assert!(user_tuned(env(&[("MALLOC_MMAP_THRESHOLD_", "1")])));
        assert!(user_tuned(env(&[(
            "GLIBC_TUNABLES",
            "glibc.malloc.arena_max=2:glibc.malloc.top_pad=0"
        )])));
    }
}
