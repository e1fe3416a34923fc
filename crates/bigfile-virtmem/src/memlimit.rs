//! The default RAMs' budget ("Default budget" in ARCHITECTURE.md): a
//! quarter of the memory the process may use, lowered while the system is
//! short of memory.
//!
//! A RAM's pages are shared memory (memfd, tmpfs), which the kernel can
//! neither drop nor, without swap, move out: unlike the page cache behind
//! a kernel `mmap`, it does not shrink under pressure. So the default
//! budget leaves room for the rest of the process (numpy temporaries, the
//! interpreter), for the page cache the storage reads through (a block is
//! briefly held twice, in the cache and in the RAM), and for other
//! processes:
//!
//! - *limit*: the least of the machine's memory (`MemTotal`) and every
//!   cgroup memory limit above the process (v2 `memory.max` and
//!   `memory.high`, v1 `memory.limit_in_bytes`);
//! - *ceiling*: a quarter of the limit, the budget when memory is plenty;
//! - under pressure, the budget is what the RAM holds plus what is
//!   available beyond a reserve of an eighth of the limit (available: the
//!   least of `MemAvailable` and the cgroups' limits minus their usage), so
//!   loads reclaim instead of growing, down to a floor of a 64th of the
//!   limit (a budget of a few pages would only thrash).
//!
//! Reading /proc and /sys takes tens of microseconds: a RAM looks again at
//! most every [`RECHECK_NS`], from the faults that load (a clock read and
//! a compare otherwise), never under its lock.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// How often a RAM with the default budget looks at the memory available.
const RECHECK_NS: u64 = 250_000_000;

/// The memory the process may use, and what is available of it now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Memory {
    pub(crate) limit: u64,
    pub(crate) available: u64,
}

impl Memory {
    /// What the system says now.
    pub(crate) fn now() -> Memory {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let (total, available) = parse_meminfo(&meminfo);
        let mut m = Memory {
            limit: total,
            available,
        };
        let cgroups = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        for dir in cgroup_dirs(&cgroups) {
            m = m.within(&read_cgroup(&dir));
        }
        m
    }

    /// This memory within a cgroup's limit and usage.
    fn within(self, cg: &Cgroup) -> Memory {
        match cg.limit {
            Some(limit) => Memory {
                limit: self.limit.min(limit),
                available: self.available.min(limit.saturating_sub(cg.usage)),
            },
            None => self,
        }
    }

    /// The budget when memory is plenty: a quarter of the limit.
    pub(crate) fn ceiling(&self) -> u64 {
        self.limit / 4
    }

    /// The budget for a RAM holding `resident` bytes now.
    pub(crate) fn budget(&self, resident: u64) -> u64 {
        let reserve = self.limit / 8;
        let floor = self.limit / 64;
        resident
            .saturating_add(self.available)
            .saturating_sub(reserve)
            .clamp(floor, self.ceiling().max(floor))
    }
}

/// `MemTotal` and `MemAvailable` of /proc/meminfo, in bytes.
fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    let total = field("MemTotal").unwrap_or(u64::MAX);
    (total, field("MemAvailable").unwrap_or(total))
}

/// One cgroup's memory limit (`None`: unlimited) and usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cgroup {
    limit: Option<u64>,
    usage: u64,
}

/// The directories of the process's memory cgroups, v2 and v1, each with
/// its ancestors (a parent's limit holds for its children), from the text
/// of /proc/self/cgroup.
fn cgroup_dirs(text: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let roots: &[&str] = if controllers.is_empty() {
            &["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        } else if controllers.split(',').any(|c| c == "memory") {
            &["/sys/fs/cgroup/memory"]
        } else {
            continue;
        };
        for root in roots {
            let mut p = Path::new(path.trim_start_matches('/'));
            loop {
                dirs.push(Path::new(root).join(p));
                match p.parent() {
                    Some(parent) => p = parent,
                    None => break,
                }
            }
        }
    }
    dirs
}

/// A cgroup directory's limit and usage (v2 or v1 files, whichever it has).
fn read_cgroup(dir: &Path) -> Cgroup {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    let limit_of = |v: Option<String>| v.and_then(|s| parse_limit(&s));
    let v2 = [limit_of(read("memory.max")), limit_of(read("memory.high"))]
        .into_iter()
        .flatten()
        .min();
    let limit = v2.or_else(|| limit_of(read("memory.limit_in_bytes")));
    let usage: u64 = read("memory.current")
        .or_else(|| read("memory.usage_in_bytes"))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    // Page cache not in use counts in the usage but goes when needed.
    let reclaimable = read("memory.stat").map_or(0, |s| inactive_file(&s));
    Cgroup {
        limit,
        usage: usage.saturating_sub(reclaimable),
    }
}

/// The inactive page cache of a cgroup's `memory.stat` (v2's
/// `inactive_file`, v1's hierarchical `total_inactive_file`): memory the
/// kernel reclaims first, which a RAM's pages (shared memory, on the
/// anonymous lists) are not part of.
fn inactive_file(stat: &str) -> u64 {
    let field = |name: &str| {
        stat.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    };
    field("total_inactive_file")
        .or_else(|| field("inactive_file"))
        .unwrap_or(0)
}

/// A limit file's value: `max` (v2) and v1's "no limit" (a page-rounded
/// `i64::MAX`) are none.
fn parse_limit(text: &str) -> Option<u64> {
    let v: u64 = text.trim().parse().ok()?;
    (v < 1 << 60).then_some(v)
}

/// A RAM's default-budget policy: when to look again.
#[derive(Debug)]
pub(crate) struct Policy {
    next_check_ns: AtomicU64,
}

impl Policy {
    pub(crate) fn new() -> Policy {
        Policy {
            next_check_ns: AtomicU64::new(now_ns() + RECHECK_NS),
        }
    }

    /// Whether it is time to look again (and, if so, the next time is set:
    /// one thread of those asking at once looks).
    pub(crate) fn due(&self) -> bool {
        let next = self.next_check_ns.load(Relaxed);
        let now = now_ns();
        now >= next
            && self
                .next_check_ns
                .compare_exchange(next, now + RECHECK_NS, Relaxed, Relaxed)
                .is_ok()
    }
}

/// A coarse monotonic clock (no system call: the vDSO's, a few ns).
fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn meminfo_gives_total_and_available() {
        let text = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   12000000 kB\n";
        assert_eq!(parse_meminfo(text), (24_000_000 * 1024, 12_000_000 * 1024));
        assert_eq!(parse_meminfo(""), (u64::MAX, u64::MAX));
    }

    #[test]
    fn limits_of_v1_and_v2() {
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("9223372036854771712\n"), None, "v1's no limit");
        assert_eq!(parse_limit("268435456\n"), Some(256 << 20));
    }

    #[test]
    fn inactive_page_cache_of_v1_and_v2() {
        assert_eq!(inactive_file("cache 5\ntotal_inactive_file 4096\n"), 4096);
        assert_eq!(
            inactive_file("anon 1\ninactive_file 8192\nactive_file 3\n"),
            8192
        );
        assert_eq!(inactive_file("anon 1\n"), 0);
    }

    #[test]
    fn cgroups_of_both_hierarchies_and_their_ancestors() {
        let text = "12:cpu:/a\n4:memory:/jobs/j1\n0::/user/app\n";
        let dirs = cgroup_dirs(text);
        for want in [
            "/sys/fs/cgroup/memory/jobs/j1",
            "/sys/fs/cgroup/memory/jobs",
            "/sys/fs/cgroup/memory/",
            "/sys/fs/cgroup/user/app",
            "/sys/fs/cgroup/user",
            "/sys/fs/cgroup/unified/user/app",
        ] {
            assert!(dirs.contains(&PathBuf::from(want)), "{want} in {dirs:?}");
        }
        assert!(!dirs.iter().any(|d| d.starts_with("/sys/fs/cgroup/cpu")));
    }

    #[test]
    fn a_cgroup_bounds_the_limit_and_what_is_available() {
        let m = Memory {
            limit: 24 * GIB,
            available: 20 * GIB,
        };
        let cg = Cgroup {
            limit: Some(4 * GIB),
            usage: 3 * GIB,
        };
        assert_eq!(
            m.within(&cg),
            Memory {
                limit: 4 * GIB,
                available: GIB
            }
        );
        let none = Cgroup {
            limit: None,
            usage: 5,
        };
        assert_eq!(m.within(&none), m);
    }

    #[test]
    fn the_budget_is_a_quarter_and_shrinks_when_memory_is_short() {
        let plenty = Memory {
            limit: 16 * GIB,
            available: 12 * GIB,
        };
        assert_eq!(plenty.ceiling(), 4 * GIB);
        assert_eq!(plenty.budget(GIB), 4 * GIB);
        // 1 GiB available beyond the RAM's 3 GiB, less a 2 GiB reserve.
        let short = Memory {
            limit: 16 * GIB,
            available: GIB,
        };
        assert_eq!(short.budget(3 * GIB), 2 * GIB);
        // Never below a 64th of the limit.
        assert_eq!(short.budget(0), GIB / 4);
    }
}
