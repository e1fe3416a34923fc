//! Registration and unregistration racing with faults on other threads.
//!
//! A handler object is swapped for a fresh one over and over while faulting
//! threads hammer its range, and unrelated ranges come and go meanwhile (so
//! the table is republished under the lookups). Asserted: no handler runs
//! after its Registration's drop returned or after it was dropped, and every
//! fault is served exactly once.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use bigfile_fault::{register, Fault, FaultHandler, Outcome, Registration};
use bigfile_os::os_page_size as page_size;
use bigfile_testkit::memory::{protect, read_byte, Mapping};

/// The race runs at least this long, and until each party has done its
/// minimum ([`MIN_TOUCHES`], [`MIN_SWAPS`], [`MIN_CHURN`]): on a loaded
/// machine a fixed time may not be enough for any of them.
const RUN_FOR: Duration = Duration::from_millis(1500);
/// Faults taken, by all the faulting threads together.
const MIN_TOUCHES: usize = 1000;
/// Handler swaps over the faulted ranges.
const MIN_SWAPS: usize = 100;
/// Registrations and drops of unrelated ranges.
const MIN_CHURN: usize = 100;
const REGIONS: usize = 4;
const PAGES_PER_REGION: usize = 16;
const FAULTERS: usize = 3;
const MAX_HANDLERS: usize = 1 << 20;
const ALIVE: u64 = 0xA11CE;
const DEAD: u64 = 0xDEAD;

static TOLERATE_LO: AtomicUsize = AtomicUsize::new(0);
static TOLERATE_HI: AtomicUsize = AtomicUsize::new(0);
static RETRIES: AtomicUsize = AtomicUsize::new(0);

/// The "previous" handler of this binary: a fault that arrives in the test
/// mapping while its range is momentarily unregistered just retries (the
/// access re-executes until a handler is registered again); anything else
/// dies by the default action.
extern "C" fn tolerant(signo: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel's siginfo.
    let addr = unsafe { (*info).si_addr() } as usize;
    if (TOLERATE_LO.load(SeqCst)..TOLERATE_HI.load(SeqCst)).contains(&addr) {
        RETRIES.fetch_add(1, SeqCst);
        // Let the swapping thread finish re-registering (2 cores only).
        // SAFETY: sched_yield has no arguments and is async-signal-safe.
        unsafe { libc::sched_yield() };
        return;
    }
    // SAFETY: all-zero is SIG_DFL.
    let dfl: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a valid action.
    unsafe { libc::sigaction(signo, &dfl, std::ptr::null_mut()) };
}

struct Shared {
    map_start: usize,
    /// Set once a handler's Registration drop has returned.
    retired: Vec<AtomicBool>,
    served: Vec<AtomicUsize>,
    violations: AtomicUsize,
}

struct Racer {
    id: usize,
    magic: AtomicU64,
    shared: Arc<Shared>,
}

impl FaultHandler for Racer {
    fn handle(&self, fault: &Fault) -> Outcome {
        let s = &self.shared;
        if self.magic.load(SeqCst) != ALIVE || s.retired[self.id].load(SeqCst) {
            s.violations.fetch_add(1, SeqCst);
        }
        // Stay a while, so unregistration meets handlers in flight.
        for _ in 0..(fault.addr >> 12) % 2000 {
            std::hint::spin_loop();
        }
        let page = fault.addr & !(page_size() - 1);
        protect(page, page_size(), libc::PROT_READ);
        let index = (page - s.map_start) / page_size();
        s.served[index % FAULTERS].fetch_add(1, SeqCst);
        if self.magic.load(SeqCst) != ALIVE || s.retired[self.id].load(SeqCst) {
            s.violations.fetch_add(1, SeqCst);
        }
        Outcome::Handled
    }
}

impl Drop for Racer {
    fn drop(&mut self) {
        self.magic.store(DEAD, SeqCst);
    }
}

fn lcg(x: &mut u64) -> usize {
    *x = x
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*x >> 33) as usize
}

#[test]
fn registration_races_with_faults() {
    let ps = page_size();
    let total = REGIONS * PAGES_PER_REGION;
    let map = Mapping::new(total, libc::PROT_READ | libc::PROT_WRITE);
    for p in 0..total {
        // SAFETY: page p of our writable mapping.
        unsafe { std::ptr::write_bytes(map.page(p) as *mut u8, p as u8 + 1, ps) };
    }
    protect(map.start, map.len, libc::PROT_NONE);
    TOLERATE_LO.store(map.start, SeqCst);
    TOLERATE_HI.store(map.start + map.len, SeqCst);
    // SAFETY: all-zero sigaction, then a valid SA_SIGINFO handler.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = tolerant as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: a valid action, installed before ours so that we chain to it.
    let rc = unsafe { libc::sigaction(libc::SIGSEGV, &act, std::ptr::null_mut()) };
    assert_eq!(rc, 0);

    let shared = Arc::new(Shared {
        map_start: map.start,
        retired: (0..MAX_HANDLERS).map(|_| AtomicBool::new(false)).collect(),
        served: (0..FAULTERS).map(|_| AtomicUsize::new(0)).collect(),
        violations: AtomicUsize::new(0),
    });
    let next_id = AtomicUsize::new(0);
    let new_racer = || {
        Arc::new(Racer {
            id: next_id.fetch_add(1, SeqCst),
            magic: AtomicU64::new(ALIVE),
            shared: shared.clone(),
        })
    };
    let region = |r: usize| (map.page(r * PAGES_PER_REGION), PAGES_PER_REGION * ps);
    let mut regs: Vec<(usize, Registration)> = (0..REGIONS)
        .map(|r| {
            let h = new_racer();
            let (start, len) = region(r);
            (h.id, register(start, len, h).unwrap())
        })
        .collect();

    let deadline = Instant::now() + RUN_FOR;
    let stop = AtomicBool::new(false);
    let (touched, churning) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let (stop, touched, churning) = (&stop, &touched, &churning);
    let spare = Mapping::new(256, libc::PROT_NONE);
    let (map_start, spare_start) = (map.start, spare.start);
    let results = thread::scope(|s| {
        let faulters: Vec<_> = (0..FAULTERS)
            .map(|t| {
                s.spawn(move || {
                    let mut rng = t as u64 + 1;
                    let mut touches = 0usize;
                    while !stop.load(SeqCst) {
                        let p = (lcg(&mut rng) % (total / FAULTERS)) * FAULTERS + t;
                        let page = map_start + p * ps;
                        protect(page, ps, libc::PROT_NONE);
                        assert_eq!(read_byte(page + lcg(&mut rng) % ps), p as u8 + 1);
                        touches += 1;
                        touched.fetch_add(1, SeqCst);
                    }
                    touches
                })
            })
            .collect();
        // Unrelated ranges registered and dropped meanwhile.
        let churn = s.spawn(move || {
            let mut live: Vec<Option<Registration>> = (0..256).map(|_| None).collect();
            let mut rng = 99u64;
            let mut n = 0usize;
            while !stop.load(SeqCst) {
                let i = lcg(&mut rng) % live.len();
                live[i] = match live[i].take() {
                    Some(_) => None,
                    None => {
                        let h = Arc::new(Racer {
                            id: MAX_HANDLERS - 1,
                            magic: AtomicU64::new(ALIVE),
                            shared: Arc::new(Shared {
                                map_start: 0,
                                retired: Vec::new(),
                                served: Vec::new(),
                                violations: AtomicUsize::new(0),
                            }),
                        });
                        Some(register(spare_start + i * ps, ps, h).unwrap())
                    }
                };
                n += 1;
                churning.fetch_add(1, SeqCst);
            }
            n
        });
        // The faulted ranges' handlers swapped for fresh ones.
        let mut swaps = 0usize;
        let mut rng = 7u64;
        while next_id.load(SeqCst) < MAX_HANDLERS - 2 {
            // A thread ends early only by panicking: stop, and let the join say.
            if faulters.iter().any(|f| f.is_finished()) || churn.is_finished() {
                break;
            }
            if Instant::now() >= deadline
                && touched.load(SeqCst) >= MIN_TOUCHES
                && swaps >= MIN_SWAPS
                && churning.load(SeqCst) >= MIN_CHURN
            {
                break;
            }
            let r = lcg(&mut rng) % REGIONS;
            let (old_id, old) = regs.swap_remove(r);
            drop(old);
            shared.retired[old_id].store(true, SeqCst);
            let h = new_racer();
            let (start, len) = region(r);
            regs.push((h.id, register(start, len, h).unwrap()));
            regs.swap(r, REGIONS - 1);
            swaps += 1;
            if swaps % 16 == 0 {
                thread::yield_now();
            }
        }
        stop.store(true, SeqCst);
        let touches: Vec<usize> = faulters.into_iter().map(|f| f.join().unwrap()).collect();
        (touches, churn.join().unwrap(), swaps)
    });
    let (touches, churned, swaps) = results;
    drop(regs);
    assert_eq!(
        shared.violations.load(SeqCst),
        0,
        "a handler ran after being unregistered"
    );
    for (t, &n) in touches.iter().enumerate() {
        assert_eq!(
            shared.served[t].load(SeqCst),
            n,
            "faults of thread {t} served once each"
        );
    }
    let total_touches: usize = touches.iter().sum();
    eprintln!(
        "retries {} {total_touches} faults, {swaps} handler swaps, {churned} churn registrations",
        RETRIES.load(SeqCst)
    );
    // Short only if the swaps ran out of handler ids first.
    assert!(total_touches >= MIN_TOUCHES && swaps >= MIN_SWAPS && churned >= MIN_CHURN);
}
