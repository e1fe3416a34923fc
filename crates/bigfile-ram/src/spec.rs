//! Which RAM to use: backend, page size and allocation policy, and the spec string naming them.
//!
//! Grammar (also in every spec error message):
//!
//! ```text
//! spec    = backend *( "," option )
//! backend = "memfd" | "shmfs" [ ":" DIR ] | "hugetlbfs" [ ":" DIR ]
//! option  = "pagesize=" SIZE | "alloc=" ( "reserve" | "touch" ) | "thp=" ( "collapse" | "off" )
//! SIZE    = DIGITS [ "K" | "M" | "G" ] [ "iB" | "B" ]   ; binary units, case-insensitive: 2M = 2 MiB
//! ```
//!
//! `shmfs` without a directory uses `/dev/shm`; `hugetlbfs` without a directory uses a memfd
//! created with `MFD_HUGETLB`. A directory may not contain `,`. Examples: `memfd`,
//! `shmfs:/dev/shm,pagesize=64K`, `hugetlbfs,pagesize=2M`, `memfd,alloc=touch`.

use crate::error::RamError;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Environment variable naming the RAM to use, in the spec grammar; overrides the default.
pub const RAM_ENV: &str = "BIGFILE_RAM";

/// Default page size of a RAM: 2 MiB, the x86-64 huge page size, so the same blocks work on
/// every backend.
pub const DEFAULT_PAGE_SIZE: usize = 2 << 20;

/// Where a RAM's pages live. Each handle is one kernel file of this kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Backend {
    /// An anonymous `memfd_create` file (shmem, not bounded by any mount).
    Memfd,
    /// An unlinked file in a tmpfs directory (bounded by that mount's size).
    Shmfs {
        /// The directory, `/dev/shm` by default.
        dir: PathBuf,
    },
    /// Huge pages from the kernel's hugetlb pool.
    Hugetlbfs {
        /// A hugetlbfs mount point, or `None` for a memfd created with `MFD_HUGETLB`.
        dir: Option<PathBuf>,
    },
}

/// When a page's memory is taken from the kernel.
///
/// The default is [`AllocPolicy::Reserve`], from a measurement on this project's machines
/// (2-core VM, memfd, 2 MiB pages, 256 pages per run, two runs after a warm-up):
///
/// | per 2 MiB page                                  | µs          |
/// |-------------------------------------------------|-------------|
/// | `fallocate` alone                               | 580         |
/// | `fallocate`, then fill through a mapping        | 1525 – 1666 |
/// | fill through a mapping, kernel populates (touch)| 1726 – 1762 |
/// | `fallocate`, then write one byte per 4 KiB      | 1452        |
/// | write one byte per 4 KiB, kernel populates      | 1660        |
///
/// `fallocate` costs about a third of loading a page, but the first-touch faults then find the
/// memory in place, so the total is 5–12 % *lower* than letting 512 faults allocate one 4 KiB
/// page each. Reserving also turns running out of memory into a [`RamError::Exhausted`] at
/// allocation, which the layer above can answer by reclaiming, instead of a SIGBUS in the middle
/// of a load. Touch stays available for sparse pages, where most of a page is never written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AllocPolicy {
    /// `fallocate` the page at allocation: exhaustion is an error then, never a SIGBUS later.
    #[default]
    Reserve,
    /// Only claim the page index; the kernel populates memory on first touch. Exhaustion shows
    /// as SIGBUS on that touch.
    OnTouch,
}

/// Whether pages of memfd and shmfs RAMs are made transparent huge pages.
///
/// A page whose size is a multiple of the kernel's PMD size (2 MiB on x86-64)
/// can be one or more transparent huge pages, each mapped by one page-table
/// entry instead of 512. Every step of a page fault that touches page tables
/// (mapping the page, populating it, unmapping it on reclaim) then costs a
/// few microseconds instead of hundreds; measured on this project's machines
/// (2 MiB page, memfd, 4 KiB PTEs vs. one huge page): populate 457 vs 2.7 µs,
/// map + populate-read 160 vs 7 µs, unmap 65 vs 4 µs (benches/README.md).
///
/// The kernel's `MADV_COLLAPSE` (Linux 6.1) makes them on request, whatever
/// `/sys/kernel/mm/transparent_hugepage/shmem_enabled` says (short of
/// `deny`), so this works on machines where shmem THP is off by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ThpPolicy {
    /// Collapse each newly reserved page into huge pages (under
    /// [`AllocPolicy::Reserve`], for page sizes that are a multiple of the
    /// PMD size). Best effort: where the kernel cannot (too old, no huge page
    /// free right now), the page is reserved as small pages, as with `Off`.
    #[default]
    Collapse,
    /// Small pages only.
    Off,
}

/// A RAM's configuration: backend, page size, allocation and huge-page policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RamSpec {
    /// Where pages live.
    pub backend: Backend,
    /// Bytes per page: a multiple of the OS page size (of the huge page size for hugetlbfs).
    pub page_size: usize,
    /// When memory is taken.
    pub alloc: AllocPolicy,
    /// Transparent huge pages for memfd and shmfs (hugetlbfs pages are huge anyway).
    pub thp: ThpPolicy,
}

impl Default for RamSpec {
    /// memfd, 2 MiB pages, [`AllocPolicy::Reserve`], [`ThpPolicy::Collapse`].
    fn default() -> Self {
        RamSpec {
            backend: Backend::Memfd,
            page_size: DEFAULT_PAGE_SIZE,
            alloc: AllocPolicy::default(),
            thp: ThpPolicy::default(),
        }
    }
}

impl RamSpec {
    /// The spec named by `BIGFILE_RAM` when it is set (and not empty), else the default.
    pub fn from_env() -> Result<RamSpec, RamError> {
        match std::env::var_os(RAM_ENV) {
            None => Ok(RamSpec::default()),
            Some(v) if v.is_empty() => Ok(RamSpec::default()),
            Some(v) => {
                let Some(s) = v.to_str() else {
                    return Err(RamError::Spec {
                        spec: v.to_string_lossy().into_owned(),
                        problem: format!("{RAM_ENV} is not valid UTF-8"),
                    });
                };
                s.parse().map_err(|e| match e {
                    RamError::Spec { spec, problem } => RamError::Spec {
                        spec,
                        problem: format!("{problem} (from {RAM_ENV})"),
                    },
                    e => e,
                })
            }
        }
    }
}

fn parse_size(s: &str) -> Option<usize> {
    let lower = s.to_ascii_lowercase();
    let t = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match t.as_bytes().last()? {
        b'k' => (&t[..t.len() - 1], 10),
        b'm' => (&t[..t.len() - 1], 20),
        b'g' => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<usize>().ok()?.checked_mul(1 << shift)
}

impl FromStr for RamSpec {
    type Err = RamError;

    fn from_str(spec: &str) -> Result<RamSpec, RamError> {
        let bad = |problem: String| RamError::Spec {
            spec: spec.to_owned(),
            problem,
        };
        let mut parts = spec.split(',');
        let head = parts.next().unwrap_or_default().trim();
        let (name, dir) = match head.split_once(':') {
            Some((n, d)) => (n, Some(d)),
            None => (head, None),
        };
        if dir == Some("") {
            return Err(bad(format!("empty directory after {name:?}:")));
        }
        let backend = match (name, dir) {
            ("memfd", None) => Backend::Memfd,
            ("memfd", Some(_)) => return Err(bad("memfd takes no directory".into())),
            ("shmfs", d) => Backend::Shmfs {
                dir: PathBuf::from(d.unwrap_or("/dev/shm")),
            },
            ("hugetlbfs", d) => Backend::Hugetlbfs {
                dir: d.map(PathBuf::from),
            },
            (other, _) => return Err(bad(format!("unknown backend {other:?}"))),
        };
        let mut out = RamSpec {
            backend,
            ..RamSpec::default()
        };
        for opt in parts {
            let opt = opt.trim();
            match opt.split_once('=') {
                Some(("pagesize", v)) => {
                    out.page_size = parse_size(v)
                        .filter(|&n| n > 0)
                        .ok_or_else(|| bad(format!("bad page size {v:?}")))?;
                }
                Some(("alloc", "reserve")) => out.alloc = AllocPolicy::Reserve,
                Some(("alloc", "touch")) => out.alloc = AllocPolicy::OnTouch,
                Some(("alloc", v)) => return Err(bad(format!("unknown alloc policy {v:?}"))),
                Some(("thp", "collapse")) => out.thp = ThpPolicy::Collapse,
                Some(("thp", "off")) => out.thp = ThpPolicy::Off,
                Some(("thp", v)) => return Err(bad(format!("unknown thp policy {v:?}"))),
                _ => return Err(bad(format!("unknown option {opt:?}"))),
            }
        }
        Ok(out)
    }
}

impl fmt::Display for RamSpec {
    /// The canonical spec string; parsing it gives back the same spec.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.backend {
            Backend::Memfd => write!(f, "memfd")?,
            Backend::Shmfs { dir } => write!(f, "shmfs:{}", dir.display())?,
            Backend::Hugetlbfs { dir: None } => write!(f, "hugetlbfs")?,
            Backend::Hugetlbfs { dir: Some(d) } => write!(f, "hugetlbfs:{}", d.display())?,
        }
        let ps = self.page_size;
        match ps {
            _ if ps % (1 << 30) == 0 && ps > 0 => write!(f, ",pagesize={}G", ps >> 30)?,
            _ if ps % (1 << 20) == 0 && ps > 0 => write!(f, ",pagesize={}M", ps >> 20)?,
            _ if ps % (1 << 10) == 0 && ps > 0 => write!(f, ",pagesize={}K", ps >> 10)?,
            _ => write!(f, ",pagesize={ps}")?,
        }
        match self.alloc {
            AllocPolicy::Reserve => write!(f, ",alloc=reserve")?,
            AllocPolicy::OnTouch => write!(f, ",alloc=touch")?,
        }
        match self.thp {
            ThpPolicy::Collapse => write!(f, ",thp=collapse"),
            ThpPolicy::Off => write!(f, ",thp=off"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> RamSpec {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn backends() {
        assert_eq!(parse("memfd"), RamSpec::default());
        assert_eq!(
            parse("shmfs").backend,
            Backend::Shmfs {
                dir: "/dev/shm".into()
            }
        );
        assert_eq!(
            parse("shmfs:/tmp/x").backend,
            Backend::Shmfs {
                dir: "/tmp/x".into()
            }
        );
        assert_eq!(parse("hugetlbfs").backend, Backend::Hugetlbfs { dir: None });
        assert_eq!(
            parse("hugetlbfs:/mnt/huge").backend,
            Backend::Hugetlbfs {
                dir: Some("/mnt/huge".into())
            }
        );
    }

    #[test]
    fn options() {
        let s = parse("shmfs:/dev/shm,pagesize=64K,alloc=touch");
        assert_eq!(s.page_size, 64 << 10);
        assert_eq!(s.alloc, AllocPolicy::OnTouch);
        assert_eq!(parse("memfd,pagesize=4096").page_size, 4096);
        assert_eq!(parse("memfd,pagesize=1GiB").page_size, 1 << 30);
        assert_eq!(parse("memfd,pagesize=2mb").page_size, 2 << 20);
        assert_eq!(parse("memfd,alloc=reserve").alloc, AllocPolicy::Reserve);
        assert_eq!(parse("memfd").thp, ThpPolicy::Collapse);
        assert_eq!(parse("memfd,thp=off").thp, ThpPolicy::Off);
        assert_eq!(parse("shmfs,thp=collapse").thp, ThpPolicy::Collapse);
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "memfd",
            "shmfs:/dev/shm,pagesize=64K",
            "hugetlbfs,pagesize=1G,alloc=touch",
            "hugetlbfs:/mnt/h",
            "memfd,pagesize=12288",
            "memfd,thp=off",
        ] {
            let spec = parse(s);
            assert_eq!(parse(&spec.to_string()), spec, "{s} -> {spec}");
        }
    }

    #[test]
    fn unknown_specs_say_what_is_allowed() {
        for bad in [
            "",
            "ramfs",
            "memfd:/x",
            "shmfs:",
            "memfd,pagesize=",
            "memfd,pagesize=0",
            "memfd,pagesize=2X",
            "memfd,pagesize=-1",
            "memfd,pagesize=99999999999999999999G",
            "memfd,alloc=lazy",
            "memfd,thp=always",
            "memfd,colour=blue",
        ] {
            let err = bad.parse::<RamSpec>().unwrap_err();
            assert!(matches!(err, RamError::Spec { .. }), "{bad}: {err:?}");
            let msg = err.to_string();
            assert!(
                msg.contains("allowed: memfd | shmfs[:DIR] | hugetlbfs[:DIR]"),
                "{msg}"
            );
        }
    }
}
