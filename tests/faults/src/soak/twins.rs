//! Two threads that prefault what they are given at once: the coordinator's
//! broken-block check needs two threads asking for one load. They live as
//! long as the soak, started before its first mapping: a thread started
//! later could have its stack (and glibc keeps the stacks of threads gone)
//! where a dropped mapping was, which the leak check looks at.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bigfile_virtmem::{Access, Error, Vma};

type Job = (Arc<Vma>, Range<usize>);

pub struct Twins {
    jobs: Mutex<Sender<Job>>,
    taken: Mutex<Receiver<Job>>,
    done: Mutex<Sender<Result<(), Error>>>,
    results: Mutex<Receiver<Result<(), Error>>>,
    closed: AtomicBool,
}

impl Twins {
    pub fn new() -> Twins {
        let (jobs, taken) = channel();
        let (done, results) = channel();
        Twins {
            jobs: Mutex::new(jobs),
            taken: Mutex::new(taken),
            done: Mutex::new(done),
            results: Mutex::new(results),
            closed: AtomicBool::new(false),
        }
    }

    /// One of the twins: prefaults (for reading) what it is given until
    /// closed.
    pub fn serve(&self) {
        loop {
            let job = self
                .taken
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_millis(100));
            match job {
                Ok((vma, range)) => {
                    let res = vma.prefault(range, Access::Read);
                    drop(vma);
                    let _ = self.done.lock().unwrap().send(res);
                }
                Err(RecvTimeoutError::Timeout) if !self.closed.load(SeqCst) => {}
                Err(_) => return,
            }
        }
    }

    /// The twins stop (once nobody asks them for anything any more).
    pub fn close(&self) {
        self.closed.store(true, SeqCst);
    }

    /// Both twins prefault: `a` and `b` at once; their results.
    pub fn prefault(&self, a: Job, b: Job) -> [Result<(), Error>; 2] {
        {
            let jobs = self.jobs.lock().unwrap();
            jobs.send(a).unwrap();
            jobs.send(b).unwrap();
        }
        let results = self.results.lock().unwrap();
        [results.recv().unwrap(), results.recv().unwrap()]
    }
}
