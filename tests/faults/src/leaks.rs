//! What a run may leave behind, checked against the process as it was before:
//! descriptors, mappings, fault-registry entries.

use std::ops::Range;
use std::sync::Arc;

use bigfile_fault::{Fault, FaultHandler, Outcome};

/// Number of open descriptors of this process.
pub fn fd_count() -> Result<usize, String> {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .map_err(|e| format!("/proc/self/fd: {e}"))
}

/// One line of /proc/self/maps: address range, permissions, path (if any).
#[derive(Debug, Clone)]
pub struct MapLine {
    pub range: Range<usize>,
    pub perms: String,
    pub path: String,
}

pub fn maps() -> Result<Vec<MapLine>, String> {
    let text =
        std::fs::read_to_string("/proc/self/maps").map_err(|e| format!("/proc/self/maps: {e}"))?;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(range), Some(perms)) = (it.next(), it.next()) else {
            continue;
        };
        // offset, device, inode, then the path, which may contain spaces.
        let path = it.skip(3).collect::<Vec<_>>().join(" ");
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else {
            continue;
        };
        out.push(MapLine {
            range: a..b,
            perms: perms.to_owned(),
            path,
        });
    }
    Ok(out)
}

/// Address ranges of the anonymous mappings made with MAP_NORESERVE (VmFlags
/// `nr` in /proc/self/smaps): how both backends reserve a mapping's range,
/// and what tells a reservation from other anonymous memory. A thread
/// started during a run maps its signal stack and guard page anonymously,
/// and may be given the address a dropped mapping had.
pub fn reservations() -> Result<Vec<(usize, usize)>, String> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")
        .map_err(|e| format!("/proc/self/smaps: {e}"))?;
    let mut out = Vec::new();
    // The range of the last header line, if the mapping is anonymous.
    let mut anonymous: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if let Some(r) = anonymous.take() {
                if flags.split_whitespace().any(|f| f == "nr") {
                    out.push(r);
                }
            }
            continue;
        }
        let mut it = line.split_whitespace();
        let Some((a, b)) = it.next().and_then(|r| r.split_once('-')) else {
            continue;
        };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else {
            continue;
        };
        // A header: range, perms, offset, device, inode, then the path.
        anonymous = it.nth(4).is_none().then_some((a, b));
    }
    Ok(out)
}

/// Mappings of RAM files (memfd or a tmpfs file of bigfile-ram).
fn ram_mappings(maps: &[MapLine]) -> usize {
    maps.iter()
        .filter(|m| m.path.contains("bigfile-ram"))
        .count()
}

/// The process before a run, to compare with after it.
#[derive(Debug)]
pub struct Baseline {
    fds: usize,
    ram_maps: usize,
}

struct Probe;

impl FaultHandler for Probe {
    fn handle(&self, _fault: &Fault) -> Outcome {
        Outcome::NotOurs
    }
}

impl Baseline {
    /// The process's descriptors and RAM mappings now, after a first RAM
    /// has opened what the process keeps open for good (on the userfaultfd
    /// backend, its userfaultfd): what a run must leave as it found.
    pub fn take() -> Result<Baseline, String> {
        static FIRST_RAM: std::sync::Once = std::sync::Once::new();
        FIRST_RAM.call_once(|| {
            let ps = bigfile_ram::os_page_size();
            drop(bigfile_virtmem::Ram::from_spec(&format!(
                "memfd,pagesize={ps}"
            )));
        });
        Ok(Baseline {
            fds: fd_count()?,
            ram_maps: ram_mappings(&maps()?),
        })
    }

    /// After everything of a run is dropped: the descriptor count is back,
    /// no RAM file is mapped any more than before, nothing is mapped in the
    /// address ranges the run's mappings had, and none of those ranges is
    /// still in the fault registry (registering a probe over a range fails
    /// with an overlap exactly when something is registered there).
    pub fn check(&self, used: &[Range<usize>]) -> Result<(), String> {
        let fds = fd_count()?;
        if fds != self.fds {
            return Err(format!(
                "descriptors leaked: {fds} open, {} before",
                self.fds
            ));
        }
        let maps = maps()?;
        let ram_maps = ram_mappings(&maps);
        if ram_maps != self.ram_maps {
            return Err(format!(
                "RAM file mappings left: {ram_maps}, {} before",
                self.ram_maps
            ));
        }
        let reservations = reservations()?;
        for r in used {
            // Ours are RAM file pages and reservations (all or part of the
            // range); the allocator may since have put its own memory there.
            if let Some(m) = maps.iter().find(|m| {
                m.range.start < r.end && r.start < m.range.end && m.path.contains("bigfile-ram")
            }) {
                return Err(format!(
                    "mapping left at {:#x}..{:#x} ({} {}) inside a dropped Vma's range {:#x}..{:#x}",
                    m.range.start, m.range.end, m.perms, m.path, r.start, r.end
                ));
            }
            if let Some(m) = reservations.iter().find(|m| r.start <= m.0 && m.1 <= r.end) {
                return Err(format!(
                    "reservation left at {:#x}..{:#x} inside a dropped Vma's range {:#x}..{:#x}",
                    m.0, m.1, r.start, r.end
                ));
            }
            match bigfile_fault::register(r.start, r.end - r.start, Arc::new(Probe)) {
                Ok(reg) => drop(reg),
                Err(e) => {
                    return Err(format!(
                        "fault registry still holds a range of a dropped Vma: {e}"
                    ))
                }
            }
        }
        Ok(())
    }
}
