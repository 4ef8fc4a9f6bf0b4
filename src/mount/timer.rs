//! The timer: one thread for every deadline of the mount (delays that are due,
//! `wait_break` timeouts, the `--max-suspend` watchdog). Due requests continue on a few
//! resumer threads; the timer itself never runs a request's I/O.

use std::time::{Duration, Instant};

use log::warn;
use parking_lot::Mutex;

use super::Mount;
use super::executor::Pending;

impl Mount {
    /// The timer's work: times out waiters and runs the `--max-suspend` watchdog. Returns
    /// when it is next due (`None`: only a change can make it due).
    pub fn expire(&self, max_suspend: Option<Duration>) -> Option<Instant> {
        self.expire_with(max_suspend, &mut |p| self.drive(p))
    }

    /// [`Self::expire`], handing each delayed request that is due to `resume`.
    pub(super) fn expire_with(
        &self,
        max_suspend: Option<Duration>,
        resume: &mut dyn FnMut(Pending<'static>),
    ) -> Option<Instant> {
        let mut next = self.breakpoints.expire_waiters();
        let (due, next_delay) = self.breakpoints.take_due(Instant::now());
        for p in due {
            resume(p);
        }
        if let Some(d) = next_delay {
            next = Some(next.map_or(d, |n| n.min(d)));
        }
        if let Some(limit) = max_suspend {
            self.resume_older_than(limit);
            if let Some(due) = self
                .breakpoints
                .oldest_parked()
                .and_then(|oldest| oldest.checked_add(limit))
            {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        next
    }

    /// Starts [`Mount::run_timer`] on a thread of its own ("blkdebugfs-timer"), for every
    /// front end the mount serves.
    pub fn start_timer(
        self: &std::sync::Arc<Self>,
        max_suspend: Option<Duration>,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let mount = self.clone();
        std::thread::Builder::new()
            .name("blkdebugfs-timer".into())
            .spawn(move || mount.run_timer(max_suspend))
    }

    /// Runs the timer until shutdown closes the breakpoints. Delayed requests that are due
    /// continue on a few resumer threads, not on the timer's: a request's I/O and reply take
    /// microseconds, and sixteen requests due at once must not queue behind each other (nor
    /// delay the timer's next deadline). At shutdown the resumers finish what was handed to
    /// them before this returns.
    pub fn run_timer(&self, max_suspend: Option<Duration>) {
        let resumers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
        let (tx, rx) = std::sync::mpsc::channel::<Pending<'static>>();
        let rx = Mutex::new(rx);
        std::thread::scope(|scope| {
            let mut running = 0;
            for i in 0..resumers {
                let rx = &rx;
                let spawned = std::thread::Builder::new()
                    .name(format!("blkdebugfs-resume-{i}"))
                    .spawn_scoped(scope, move || {
                        // The lock is held only to take the next request, never to run it.
                        loop {
                            let next = rx.lock().recv();
                            match next {
                                Ok(p) => self.drive(p),
                                Err(_) => return,
                            }
                        }
                    });
                match spawned {
                    Ok(_) => running += 1,
                    Err(e) => {
                        warn!("no resumer thread ({e}): delayed requests continue on the timer");
                        break;
                    }
                }
            }
            let bp = &self.breakpoints;
            while !bp.is_closed() {
                let seen = bp.changes();
                let next = self.expire_with(max_suspend, &mut |p| {
                    if running == 0 {
                        self.drive(p);
                    } else if let Err(back) = tx.send(p) {
                        self.drive(back.0);
                    }
                });
                bp.sleep_until(next, seen);
            }
            drop(tx);
        });
    }

    /// The `--max-suspend` watchdog: resumes requests suspended longer than `limit`.
    pub(super) fn resume_older_than(&self, limit: Duration) {
        for (id, op, p) in self.breakpoints.take_older_than(limit) {
            warn!(
                "request {id} ({}) was suspended for more than {limit:?}: resuming it \
                 (--max-suspend)",
                op.name()
            );
            self.drive(p);
        }
    }
}
