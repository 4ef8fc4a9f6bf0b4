//! Parked requests and `wait_break` waiters.
//!
//! Contract: a request that hits a breakpoint is *parked* here with everything it owns (its
//! plan position, buffer and FUSE reply: to this module an opaque `T`, described by the
//! [`Op`] it serves); the worker that was serving it returns at once, so
//! no worker ever waits on a suspended request. Resuming takes a request out (newest first,
//! as QEMU resumes) and hands it back to the caller, which continues it on its own thread.
//! A request hit by several breakpoints in one event is parked once per tag, like QEMU's
//! list entries, and continues when the last of them is resumed.
//!
//! Delayed requests (`[delay]`) are parked the same way with a deadline instead of a tag: the
//! timer takes them out when they are due ([`Breakpoints::take_due`]), and shutdown takes
//! them out at once like every parked request.
//!
//! `wait_break` waiters are parked the same way: a completion that fires when a request is
//! suspended under their tag, with ETIMEDOUT at their deadline, or never, when cancelled
//! (its client went away). Lock rule: one mutex, held only to move entries in and out;
//! continuations always run after it is released.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::plan::Op;

/// A parked request as `list` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParkedInfo {
    pub id: u64,
    pub tags: Vec<String>,
    /// What parked it: `event write_aio` (a breakpoint) or `rule 3` (a `[suspend]` rule).
    pub cause: String,
    pub op: Op,
    pub suspended_for: Duration,
}

struct Parked<T> {
    id: u64,
    /// Tags still holding it; it continues when the last one is resumed.
    tags: Vec<String>,
    cause: String,
    op: Op,
    since: Instant,
    request: T,
}

/// A delayed request, ordered so that the heap's top is the earliest deadline.
struct Delayed<T> {
    due: Instant,
    id: u64,
    request: T,
}

impl<T> PartialEq for Delayed<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.id) == (other.due, other.id)
    }
}

impl<T> Eq for Delayed<T> {}

impl<T> PartialOrd for Delayed<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Delayed<T> {
    /// Reversed: `BinaryHeap` is a max-heap and the earliest deadline must come out first.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.due, other.id).cmp(&(self.due, self.id))
    }
}

impl<T> Parked<T> {
    fn held_by(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }
}

/// Called when a waiter's tag is hit (`Ok`) or its deadline passes (`Err(ETIMEDOUT)`).
pub type WaiterDone = Box<dyn FnOnce(Result<(), i32>) + Send>;

/// Names one `wait_break` waiter, to cancel it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaiterId(u64);

struct Waiter {
    id: WaiterId,
    tag: String,
    deadline: Option<Instant>,
    done: WaiterDone,
}

struct Inner<T> {
    /// In parking order: the newest is last.
    parked: Vec<Parked<T>>,
    /// Delayed requests, earliest deadline on top.
    delayed: BinaryHeap<Delayed<T>>,
    waiters: Vec<Waiter>,
    next_id: u64,
    next_waiter: u64,
    closed: bool,
    /// Bumped whenever a deadline may have moved (a park, a new waiter, shutdown), so the
    /// timer never sleeps through a change made while it was computing its deadline.
    changes: u64,
}

/// See the module doc. `T` is whatever a parked request is to its owner.
pub struct Breakpoints<T> {
    inner: Mutex<Inner<T>>,
    /// Wakes the timer thread when a deadline may have moved earlier.
    timer: Condvar,
}

impl<T> Default for Breakpoints<T> {
    fn default() -> Self {
        Breakpoints {
            inner: Mutex::new(Inner {
                parked: Vec::new(),
                delayed: BinaryHeap::new(),
                waiters: Vec::new(),
                next_id: 0,
                next_waiter: 0,
                closed: false,
                changes: 0,
            }),
            timer: Condvar::new(),
        }
    }
}

/// What a resume found.
pub enum Resumed<T> {
    /// Nothing was suspended under the tag.
    NotFound,
    /// A request was released from the tag; `Some` when it may now continue.
    Released(Option<T>),
}

impl<T> Breakpoints<T> {
    /// Parks `request` (serving `op`) under `tags` and completes the waiters of those tags.
    /// Once closed (shutdown), nothing parks: the request is handed straight back.
    pub fn park(&self, request: T, op: Op, tags: Vec<String>, cause: String) -> Option<T> {
        let mut woken = Vec::new();
        {
            let mut inner = self.inner.lock();
            if inner.closed {
                return Some(request);
            }
            let id = inner.next_id;
            inner.next_id += 1;
            inner.changes += 1;
            let mut i = 0;
            while i < inner.waiters.len() {
                if tags.contains(&inner.waiters[i].tag) {
                    woken.push(inner.waiters.swap_remove(i).done);
                } else {
                    i += 1;
                }
            }
            log::info!(
                "suspended request {id} ({} at {}) by {cause} under tag(s) {}",
                op.name(),
                op_range(&op),
                tags.join(", ")
            );
            inner.parked.push(Parked {
                id,
                tags,
                cause,
                op,
                since: Instant::now(),
                request,
            });
        }
        self.timer.notify_all();
        for done in woken {
            done(Ok(()));
        }
        None
    }

    /// Holds `request` until `due`, when [`Self::take_due`] hands it back. Once closed
    /// (shutdown), nothing is held: the request is handed straight back.
    pub fn delay(&self, request: T, due: Instant) -> Option<T> {
        let mut inner = self.inner.lock();
        if inner.closed {
            return Some(request);
        }
        let id = inner.next_id;
        inner.next_id += 1;
        // Wake the timer only when this deadline comes first: at 16,000 delayed requests a
        // second, a wake per request would cost more than the requests.
        let earliest = inner.delayed.peek().is_none_or(|top| due < top.due);
        inner.delayed.push(Delayed { due, id, request });
        if earliest {
            inner.changes += 1;
            drop(inner);
            self.timer.notify_all();
        }
        None
    }

    /// Takes out the delayed requests that are due, earliest first, and tells when the next
    /// one is.
    pub fn take_due(&self, now: Instant) -> (Vec<T>, Option<Instant>) {
        let mut inner = self.inner.lock();
        let mut due = Vec::new();
        while inner.delayed.peek().is_some_and(|top| top.due <= now) {
            if let Some(d) = inner.delayed.pop() {
                due.push(d.request);
            }
        }
        (due, inner.delayed.peek().map(|top| top.due))
    }

    /// How many requests are delayed now.
    pub fn delayed_count(&self) -> usize {
        self.inner.lock().delayed.len()
    }

    /// How many requests are suspended now.
    pub fn suspended_count(&self) -> usize {
        self.inner.lock().parked.len()
    }

    /// Releases the newest request suspended under `tag` from it.
    pub fn resume(&self, tag: &str) -> Resumed<T> {
        let mut inner = self.inner.lock();
        let Some(pos) = inner.parked.iter().rposition(|p| p.held_by(tag)) else {
            return Resumed::NotFound;
        };
        let p = &mut inner.parked[pos];
        if let Some(t) = p.tags.iter().position(|t| t == tag) {
            p.tags.remove(t);
        }
        if !p.tags.is_empty() {
            return Resumed::Released(None);
        }
        let p = inner.parked.remove(pos);
        log::info!("resumed request {} (tag {tag})", p.id);
        Resumed::Released(Some(p.request))
    }

    /// Takes every parked request out, suspended ones newest first, then delayed ones.
    pub fn take_all(&self) -> Vec<T> {
        let mut inner = self.inner.lock();
        let all: Vec<Parked<T>> = inner.parked.drain(..).rev().collect();
        let delayed: Vec<Delayed<T>> = inner.delayed.drain().collect();
        all.into_iter()
            .map(|p| p.request)
            .chain(delayed.into_iter().map(|d| d.request))
            .collect()
    }

    /// Takes out requests parked for longer than `limit` (the `--max-suspend` watchdog).
    pub fn take_older_than(&self, limit: Duration) -> Vec<(u64, Op, T)> {
        let mut inner = self.inner.lock();
        let now = Instant::now();
        let (old, young): (Vec<Parked<T>>, Vec<Parked<T>>) = inner
            .parked
            .drain(..)
            .partition(|p| now.duration_since(p.since) >= limit);
        inner.parked = young;
        old.into_iter().map(|p| (p.id, p.op, p.request)).collect()
    }

    /// Stops parking (shutdown): from now on a breakpoint hit continues at once.
    pub fn close(&self) {
        let mut inner = self.inner.lock();
        inner.closed = true;
        inner.changes += 1;
        drop(inner);
        self.timer.notify_all();
    }

    /// Whether any request is suspended under `tag` (for the tests).
    #[cfg(test)]
    pub fn is_suspended(&self, tag: &str) -> bool {
        self.inner.lock().parked.iter().any(|p| p.held_by(tag))
    }

    /// Completes `done` once a request is suspended under `tag` (at once if one already is),
    /// or with ETIMEDOUT after `timeout` (a timeout past the end of time is none). Returns
    /// the waiter's id while it waits, for [`Self::cancel_waiter`].
    pub fn wait_for(
        &self,
        tag: &str,
        timeout: Option<Duration>,
        done: WaiterDone,
    ) -> Option<WaiterId> {
        {
            let mut inner = self.inner.lock();
            let already = inner.parked.iter().any(|p| p.held_by(tag));
            if !already {
                let id = WaiterId(inner.next_waiter);
                inner.next_waiter += 1;
                inner.waiters.push(Waiter {
                    id,
                    tag: tag.to_string(),
                    deadline: timeout.and_then(|t| Instant::now().checked_add(t)),
                    done,
                });
                inner.changes += 1;
                drop(inner);
                self.timer.notify_all();
                return Some(id);
            }
        }
        done(Ok(()));
        None
    }

    /// Forgets a waiter whose client went away; its completion is dropped unrun. `false`
    /// when it had already completed.
    pub fn cancel_waiter(&self, id: WaiterId) -> bool {
        let mut inner = self.inner.lock();
        let Some(at) = inner.waiters.iter().position(|w| w.id == id) else {
            return false;
        };
        let waiter = inner.waiters.swap_remove(at);
        drop(inner);
        drop(waiter);
        true
    }

    /// How many `wait_break` waiters are waiting.
    pub fn waiter_count(&self) -> usize {
        self.inner.lock().waiters.len()
    }

    /// Times out expired waiters; returns when the next deadline is due.
    pub fn expire_waiters(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut expired = Vec::new();
        let next = {
            let mut inner = self.inner.lock();
            let mut i = 0;
            while i < inner.waiters.len() {
                if inner.waiters[i].deadline.is_some_and(|d| d <= now) {
                    expired.push(inner.waiters.swap_remove(i).done);
                } else {
                    i += 1;
                }
            }
            inner.waiters.iter().filter_map(|w| w.deadline).min()
        };
        for done in expired {
            done(Err(libc::ETIMEDOUT));
        }
        next
    }

    /// Fails every waiter (shutdown).
    pub fn cancel_waiters(&self) {
        let waiters: Vec<Waiter> = self.inner.lock().waiters.drain(..).collect();
        for w in waiters {
            (w.done)(Err(libc::ECANCELED));
        }
    }

    /// The change counter, read before computing a deadline for [`Self::sleep_until`].
    pub fn changes(&self) -> u64 {
        self.inner.lock().changes
    }

    /// Sleeps until `until` (or, with `None`, indefinitely) or until something may have
    /// changed a deadline: a new waiter, a parked request, shutdown. Returns at once if
    /// anything changed since `seen` was read.
    pub fn sleep_until(&self, until: Option<Instant>, seen: u64) {
        tighten_timer_slack();
        let mut inner = self.inner.lock();
        if !inner.closed && inner.changes == seen {
            match until {
                Some(until) => {
                    self.timer.wait_until(&mut inner, until);
                }
                None => self.timer.wait(&mut inner),
            }
        }
    }

    pub fn is_closed(&self) -> bool {
        self.inner.lock().closed
    }

    /// The oldest parking time, for the watchdog.
    pub fn oldest_parked(&self) -> Option<Instant> {
        self.inner.lock().parked.iter().map(|p| p.since).min()
    }

    /// The parked requests, oldest first.
    pub fn list(&self) -> Vec<ParkedInfo> {
        let now = Instant::now();
        self.inner
            .lock()
            .parked
            .iter()
            .map(|p| ParkedInfo {
                id: p.id,
                tags: p.tags.clone(),
                cause: p.cause.clone(),
                op: p.op,
                suspended_for: now.duration_since(p.since),
            })
            .collect()
    }
}

/// Asks the kernel to wake this thread within a microsecond of its deadline instead of the
/// default 50 µs "timer slack": a 1 ms delay would otherwise run 5% long. Once per thread.
fn tighten_timer_slack() {
    thread_local! {
        static DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if !DONE.get() {
        // SAFETY: PR_SET_TIMERSLACK takes a plain integer and touches no memory.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong) };
        DONE.set(true);
    }
}

/// `offset 4096, 512 bytes` for log lines and `list`.
pub fn op_range(op: &Op) -> String {
    match *op {
        Op::Read { offset, len }
        | Op::Write { offset, len }
        | Op::Zero { offset, len, .. }
        | Op::BlockStatus { offset, len } => format!("offset {offset}, {len} bytes"),
        Op::Flush => "no range".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A parked "request" is just its offset here: the lot never looks inside.
    type Lot = Breakpoints<u64>;

    fn park(b: &Lot, offset: u64, tags: Vec<String>) -> Option<u64> {
        b.park(
            offset,
            Op::Read { offset, len: 512 },
            tags,
            "event read_aio".into(),
        )
    }

    fn offset_of(p: &u64) -> u64 {
        *p
    }

    fn tags(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn resume_takes_the_newest_request_of_the_tag() {
        let b = Lot::default();
        assert!(park(&b, 0, tags(&["t"])).is_none());
        assert!(park(&b, 512, tags(&["t"])).is_none());
        assert!(park(&b, 1024, tags(&["other"])).is_none());
        let Resumed::Released(Some(p)) = b.resume("t") else {
            panic!("nothing resumed");
        };
        assert_eq!(offset_of(&p), 512);
        let Resumed::Released(Some(p)) = b.resume("t") else {
            panic!("nothing resumed");
        };
        assert_eq!(offset_of(&p), 0);
        assert!(matches!(b.resume("t"), Resumed::NotFound));
        assert_eq!(b.list().len(), 1);
    }

    #[test]
    fn a_request_held_by_two_tags_continues_after_both_resume() {
        let b = Lot::default();
        assert!(park(&b, 0, tags(&["a", "b"])).is_none());
        assert!(matches!(b.resume("a"), Resumed::Released(None)));
        assert!(b.is_suspended("b") && !b.is_suspended("a"));
        assert!(matches!(b.resume("b"), Resumed::Released(Some(_))));
        assert!(b.list().is_empty());
    }

    #[test]
    fn waiters_complete_on_park_at_once_if_parked_and_time_out() {
        let b = Lot::default();
        let ok = Arc::new(AtomicUsize::new(0));
        let timed_out = Arc::new(AtomicUsize::new(0));
        let waiter = |ok: &Arc<AtomicUsize>, to: &Arc<AtomicUsize>| -> WaiterDone {
            let (ok, to) = (ok.clone(), to.clone());
            Box::new(move |r| match r {
                Ok(()) => {
                    ok.fetch_add(1, Ordering::SeqCst);
                }
                Err(e) => {
                    assert_eq!(e, libc::ETIMEDOUT);
                    to.fetch_add(1, Ordering::SeqCst);
                }
            })
        };
        b.wait_for("t", None, waiter(&ok, &timed_out));
        b.wait_for("late", Some(Duration::ZERO), waiter(&ok, &timed_out));
        assert_eq!(ok.load(Ordering::SeqCst), 0);
        park(&b, 0, tags(&["t"]));
        assert_eq!(ok.load(Ordering::SeqCst), 1);
        // Already suspended: completes at once.
        b.wait_for("t", Some(Duration::from_secs(60)), waiter(&ok, &timed_out));
        assert_eq!(ok.load(Ordering::SeqCst), 2);
        assert_eq!(b.expire_waiters(), None);
        assert_eq!(timed_out.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_cancelled_waiter_never_completes_and_is_gone() {
        let b = Lot::default();
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        let id = b
            .wait_for(
                "t",
                None,
                Box::new(move |_| {
                    r.fetch_add(1, Ordering::SeqCst);
                }),
            )
            .expect("waits: nothing is parked");
        assert_eq!(b.waiter_count(), 1);
        assert!(b.cancel_waiter(id));
        assert!(!b.cancel_waiter(id));
        assert_eq!(b.waiter_count(), 0);
        park(&b, 0, tags(&["t"]));
        b.cancel_waiters();
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        // A timeout no clock can reach is no timeout, not a panic.
        assert!(
            b.wait_for("u", Some(Duration::MAX), Box::new(|_| {}))
                .is_some()
        );
        assert_eq!(b.expire_waiters(), None);
    }

    #[test]
    fn once_closed_nothing_parks_and_everything_can_be_taken() {
        let b = Lot::default();
        park(&b, 0, tags(&["t"]));
        park(&b, 512, tags(&["u"]));
        b.close();
        assert!(park(&b, 1024, tags(&["t"])).is_some());
        let all: Vec<u64> = b.take_all().iter().map(offset_of).collect();
        assert_eq!(all, vec![512, 0]);
        assert!(b.list().is_empty());
    }

    #[test]
    fn delayed_requests_come_out_when_due_earliest_first_and_at_shutdown() {
        let b = Lot::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert!(b.delay(30, t0 + ms(30)).is_none());
        assert!(b.delay(10, t0 + ms(10)).is_none());
        assert!(b.delay(20, t0 + ms(20)).is_none());
        assert_eq!(b.delayed_count(), 3);
        let (due, next) = b.take_due(t0 + ms(5));
        assert!(due.is_empty());
        assert_eq!(next, Some(t0 + ms(10)));
        let (due, next) = b.take_due(t0 + ms(20));
        assert_eq!(due, vec![10, 20]);
        assert_eq!(next, Some(t0 + ms(30)));
        b.close();
        assert_eq!(b.delay(40, t0), Some(40), "closed: nothing is held");
        assert_eq!(b.take_all(), vec![30]);
        assert_eq!(b.delayed_count(), 0);
    }

    #[test]
    fn the_watchdog_takes_only_old_requests() {
        let b = Lot::default();
        park(&b, 0, tags(&["t"]));
        assert!(b.take_older_than(Duration::from_secs(3600)).is_empty());
        assert_eq!(b.take_older_than(Duration::ZERO).len(), 1);
        assert!(b.list().is_empty());
    }
}
