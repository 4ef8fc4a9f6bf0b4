//! How a connection's reader paces itself: how long it polls the socket before it sleeps
//! ([`PollWindow`]), and whether it runs a request itself or hands the read turn on first
//! ([`InlineGate`]). Pure bookkeeping over durations the caller measures, so the policies
//! are tested without a socket or a clock.
//!
//! Why poll: a thread asleep on a socket is woken by the client's send through the
//! scheduler, which between two CPUs of a virtual machine costs tens of microseconds (a
//! unix-socket ping-pong across CPUs measured 74 µs a round trip here, 20 µs with the
//! server polling). A client that sends its next request right after our reply (queue depth
//! one) pays that on every request, so the reader polls for a short window first. The window
//! adapts as KVM's halt polling does: it grows while waits end soon after it (polling longer
//! would have caught them), and shrinks when waits run long (an idle or slow client, for
//! which polling only burns CPU), down to not polling at all. And only so many readers poll
//! at once ([`PollPermit`]): one CPU is always left to the clients and the requests.
//!
//! Why run requests inline: handing the read turn to another worker before every request
//! costs a wake-up and a context switch each, and leaves the next request to a thread asleep
//! on the socket, which defeats the polling. A read or write the page cache serves takes
//! microseconds, so the reader runs it itself and keeps reading. A request that blocked in
//! the kernel (a page-cache miss on a real disk, dirty throttling) would stall the requests
//! behind it, so two of the last four inline runs slower than [`SLOW_RUN`] make the
//! connection hand off every request for [`HANDOFF_SPAN`], where each request has its own
//! worker again and a client's queue depth reaches the disk. (A run stuck far longer is
//! taken over sooner: see `conn`'s `STUCK_INLINE`.)

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The longest the reader polls before it sleeps on the socket.
pub const MAX_POLL: Duration = Duration::from_micros(100);

/// A window below this is not worth a poll: it becomes zero.
const MIN_POLL: Duration = Duration::from_micros(5);

/// The first window after a wait that polling would have caught.
const FIRST_POLL: Duration = Duration::from_micros(10);

/// The adaptive polling window of one connection's reader.
#[derive(Debug, Default)]
pub struct PollWindow {
    window: Duration,
}

impl PollWindow {
    /// How long to poll before sleeping on the socket.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// After one wait for the client: `caught` when data came while polling, `waited` the
    /// whole wait (polling and sleeping).
    pub fn waited(&mut self, caught: bool, waited: Duration) {
        if caught {
            return;
        }
        if waited <= MAX_POLL {
            // A longer window would have caught it.
            self.window = (self.window * 2).clamp(FIRST_POLL, MAX_POLL);
        } else {
            self.window /= 2;
            if self.window < MIN_POLL {
                self.window = Duration::ZERO;
            }
        }
    }
}

/// A permit to poll. Readers poll only while no more connections are open (process-wide)
/// than the machine has CPUs less one (at least one), and no more than that many at a time:
/// a polling reader needs a CPU to itself, and one CPU is left for the clients and the
/// requests. Polling readers of several connections would otherwise take the CPUs from the
/// work they poll for: four connections (fio `--numjobs=4`, QD4, 4k random reads) on two
/// CPUs measured 0.58x of not polling with every reader polling, 0.74x with one at a time.
#[derive(Debug)]
pub struct PollPermit(());

static POLLING: AtomicUsize = AtomicUsize::new(0);
static CONNECTIONS: AtomicUsize = AtomicUsize::new(0);

/// Counts one connection as open while it lives (see [`PollPermit`]).
#[derive(Debug)]
pub struct OpenConnection(());

impl OpenConnection {
    pub fn new() -> OpenConnection {
        CONNECTIONS.fetch_add(1, Ordering::AcqRel);
        OpenConnection(())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        CONNECTIONS.fetch_sub(1, Ordering::AcqRel);
    }
}

impl PollPermit {
    /// A permit, if no more than [`PollPermit::limit`] connections are open and fewer than
    /// that many readers poll now.
    pub fn take() -> Option<PollPermit> {
        let limit = Self::limit();
        if CONNECTIONS.load(Ordering::Acquire) > limit {
            return None;
        }
        POLLING
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| PollPermit(()))
    }

    /// How many readers may poll at once.
    pub fn limit() -> usize {
        static LIMIT: OnceLock<usize> = OnceLock::new();
        *LIMIT.get_or_init(|| {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get().saturating_sub(1))
                .max(1)
        })
    }
}

impl Drop for PollPermit {
    fn drop(&mut self) {
        POLLING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An inline run longer than this probably blocked in the kernel (a page-cache hit of
/// [`super::conn`]'s largest inline request takes a few microseconds; a miss on a solid-state
/// disk, about a hundred).
pub const SLOW_RUN: Duration = Duration::from_micros(50);

/// How many of the last [`RECENT_RUNS`] inline runs must be slow to shut the gate: one slow
/// run alone may be a preemption, not the disk.
const SLOW_OF_RECENT: u32 = 2;
const RECENT_RUNS: u32 = 4;

/// How long a connection hands off every request once the gate shut.
pub const HANDOFF_SPAN: Duration = Duration::from_millis(50);

/// Whether the reader may run a request itself (see the module doc).
#[derive(Debug, Default)]
pub struct InlineGate {
    handoff_until: Option<Instant>,
    /// The last runs, newest in the lowest bit: 1 for slow.
    recent: u8,
}

impl InlineGate {
    pub fn open(&self, now: Instant) -> bool {
        self.handoff_until.is_none_or(|until| now >= until)
    }

    /// After an inline run that started at `started` and ended at `now`.
    pub fn ran(&mut self, started: Instant, now: Instant) {
        let slow = now.duration_since(started) > SLOW_RUN;
        self.recent = ((self.recent << 1) | slow as u8) & ((1 << RECENT_RUNS) - 1);
        if self.recent.count_ones() >= SLOW_OF_RECENT {
            self.shut(now);
        }
    }

    /// Hands off every request for [`HANDOFF_SPAN`] from `now`.
    pub fn shut(&mut self, now: Instant) {
        self.handoff_until = Some(now + HANDOFF_SPAN);
        self.recent = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn the_window_grows_to_catch_quick_clients_and_stays() {
        let mut w = PollWindow::default();
        assert_eq!(w.window(), Duration::ZERO, "no polling before any wait");
        // A client that answers 30 µs after each reply.
        let mut caught_at = None;
        for round in 0..10 {
            let caught = w.window() >= us(30);
            if caught && caught_at.is_none() {
                caught_at = Some(round);
            }
            w.waited(caught, us(30));
        }
        assert_eq!(
            caught_at,
            Some(3),
            "none, 10 µs, 20 µs, then 40 µs catches it"
        );
        assert_eq!(w.window(), us(40), "a window that catches stays");
    }

    #[test]
    fn long_waits_shrink_the_window_to_nothing_and_it_never_passes_the_maximum() {
        let mut w = PollWindow::default();
        for _ in 0..20 {
            w.waited(false, us(90));
            assert!(w.window() <= MAX_POLL);
        }
        assert_eq!(w.window(), MAX_POLL);
        // An idle client: each wait is long.
        let mut steps = 0;
        while w.window() > Duration::ZERO {
            w.waited(false, Duration::from_secs(1));
            steps += 1;
            assert!(steps < 10, "the window never reached zero");
        }
        assert_eq!(steps, 5, "100, 50, 25, 12.5, 6.25 µs, then zero");
        w.waited(false, Duration::from_secs(1));
        assert_eq!(w.window(), Duration::ZERO);
    }

    #[test]
    fn no_more_readers_poll_at_once_than_the_limit_nor_with_more_connections_open() {
        // No other test of this binary opens connections or takes permits: the counts are
        // this test's.
        let limit = PollPermit::limit();
        assert!(limit >= 1);
        let permits: Vec<_> = (0..limit).map(|_| PollPermit::take()).collect();
        assert!(permits.iter().all(Option::is_some));
        assert!(PollPermit::take().is_none(), "one past the limit");
        drop(permits);
        assert!(
            PollPermit::take().is_some(),
            "a dropped permit frees its place"
        );
        let open: Vec<_> = (0..limit).map(|_| OpenConnection::new()).collect();
        assert!(
            PollPermit::take().is_some(),
            "as many connections as the limit poll"
        );
        let one_more = OpenConnection::new();
        assert!(
            PollPermit::take().is_none(),
            "more connections than the limit do not"
        );
        drop(one_more);
        assert!(PollPermit::take().is_some());
        drop(open);
    }

    #[test]
    fn slow_inline_runs_hand_off_for_a_span_then_inline_resumes() {
        let mut g = InlineGate::default();
        let t0 = Instant::now();
        assert!(g.open(t0));
        g.ran(t0, t0 + us(40));
        assert!(
            g.open(t0 + us(40)),
            "a run under SLOW_RUN keeps the gate open"
        );
        g.ran(t0 + us(100), t0 + us(400));
        assert!(g.open(t0 + us(400)), "one slow run may be a preemption");
        g.ran(t0 + us(500), t0 + us(510));
        g.ran(t0 + us(600), t0 + us(610));
        g.ran(t0 + us(700), t0 + us(710));
        g.ran(t0 + us(800), t0 + us(1100));
        assert!(
            g.open(t0 + us(1100)),
            "the first slow run left the last four runs"
        );
        let end = t0 + us(1500);
        g.ran(t0 + us(1200), end);
        assert!(!g.open(end), "two slow runs of the last four shut it");
        assert!(!g.open(end + HANDOFF_SPAN - us(1)));
        assert!(g.open(end + HANDOFF_SPAN));
        g.ran(end + HANDOFF_SPAN, end + HANDOFF_SPAN + us(100));
        assert!(
            g.open(end + HANDOFF_SPAN + us(100)),
            "shutting forgets the old runs"
        );
    }
}
