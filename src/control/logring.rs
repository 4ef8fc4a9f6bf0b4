//! The process's logger: `env_logger`'s lines on stderr, plus the last [`CAPACITY`] lines
//! kept in memory for the control command `log`, so that the one line per injection stays
//! reachable when `--daemonize` sends stderr to /dev/null and no `--log-file` was given.
//!
//! The log is process-wide by nature (the `log` crate has one logger), so the ring is too;
//! it exists only once [`install`] ran (the `blkdebugfs` binary does; a test or the demo
//! that mounts in-process has none, and `log` says so).
//!
//! **The request path never waits on the log.** A thread that logs formats its line and
//! queues it (at most [`QUEUE_LINES`] lines); a dedicated writer thread writes the queue to
//! stderr, and only that thread waits when stderr is slow or a full pipe nobody reads (a
//! test harness, `| head`). When the queue is full, new lines are dropped and counted, and
//! the writer says so as soon as it can write again: `N log lines dropped: the log sink was
//! full`. The ring always gets every line. Before [`start_writer`] (the daemon starts it
//! once it has forked: a thread does not survive `fork`) and in the commands that only print,
//! lines are written directly, as no request is served yet. [`finish`] lets the writer empty
//! the queue before the process exits, for a bounded time.
//!
//! A busy source (a rule that acts thousands of times a second) is summarised before it gets
//! here: see the mount's `Limiter` (`mount/logging.rs`).

use std::collections::VecDeque;
use std::io::Write;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{Log, Metadata, Record};
use parking_lot::{Condvar, Mutex};

/// Lines kept.
pub const CAPACITY: usize = 1000;
/// Longest line kept (longer ones are cut, with `...`).
const MAX_LINE: usize = 1000;

static RING: Mutex<Option<VecDeque<String>>> = Mutex::new(None);
/// While set, lines go to the ring only (the demo prints them after its table).
static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Keeps log lines off stderr (`true`) or sends them there again (`false`).
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, std::sync::atomic::Ordering::Relaxed);
}

/// Lines waiting for the writer, at most. A line per request at 10,000 requests a second
/// fills it in under half a second; a summarised log never comes close.
pub const QUEUE_LINES: usize = 4096;

/// The queue between the threads that log and the writer thread (see the module doc).
struct Queue {
    state: Mutex<QueueState>,
    /// Signalled when a line is queued.
    queued: Condvar,
    /// Signalled when the writer has written all it took.
    written: Condvar,
}

struct QueueState {
    lines: VecDeque<Vec<u8>>,
    /// Lines dropped since the writer last reported.
    dropped: u64,
    /// A writer thread runs: lines are queued (otherwise written directly).
    started: bool,
    /// The writer holds lines it took and has not written yet.
    writing: bool,
}

/// The process's queue, written to stderr.
static QUEUE: Queue = Queue::new();

impl Queue {
    const fn new() -> Queue {
        Queue {
            state: Mutex::new(QueueState {
                lines: VecDeque::new(),
                dropped: 0,
                started: false,
                writing: false,
            }),
            queued: Condvar::new(),
            written: Condvar::new(),
        }
    }

    /// Queues one formatted line, or drops and counts it when the queue is full. Never waits
    /// for the writer. `false` when no writer runs yet (the caller writes it itself).
    fn push(&self, line: &[u8]) -> bool {
        let mut q = self.state.lock();
        if !q.started {
            return false;
        }
        if q.lines.len() >= QUEUE_LINES {
            q.dropped += 1;
        } else {
            q.lines.push_back(line.to_vec());
            drop(q);
            self.queued.notify_one();
        }
        true
    }

    /// Marks the writer as running (see [`start_writer`]); `false` if it already was.
    fn mark_started(&self) -> bool {
        !std::mem::replace(&mut self.state.lock().started, true)
    }

    /// The writer thread's loop: takes what is queued and writes it to `out`, then reports
    /// the lines dropped meanwhile (after the lines queued before them). Only this thread
    /// ever waits on `out`.
    fn write_to(&self, out: &mut impl Write) -> ! {
        loop {
            let (lines, dropped) = {
                let mut q = self.state.lock();
                while q.lines.is_empty() && q.dropped == 0 {
                    self.queued.wait(&mut q);
                }
                q.writing = true;
                (std::mem::take(&mut q.lines), std::mem::take(&mut q.dropped))
            };
            for line in &lines {
                // A write error (stderr closed) loses the line: there is nowhere to say so.
                let _ = out.write_all(line);
            }
            if dropped > 0 {
                let _ = out.write_all(dropped_line(dropped).as_bytes());
            }
            let _ = out.flush();
            self.state.lock().writing = false;
            self.written.notify_all();
        }
    }

    /// Waits until the writer has written everything queued, for at most `limit`. Returns
    /// whether it all went out.
    fn finish(&self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        let mut q = self.state.lock();
        while q.started && (!q.lines.is_empty() || q.dropped > 0 || q.writing) {
            if self.written.wait_until(&mut q, end).timed_out() {
                return false;
            }
        }
        true
    }
}

/// What `env_logger` writes its formatted records to: one `write` per record, which queues
/// it (or, before [`start_writer`], writes it to stderr directly).
struct Sink;

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !QUEUE.push(buf) {
            // No writer yet, so nothing is served yet: this thread may wait for stderr.
            let _ = std::io::stderr().lock().write_all(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Starts the writer thread: from now on log lines are queued, never written by the thread
/// that logs. Call once the process will not fork any more (after daemonizing). Idempotent.
pub fn start_writer() -> std::io::Result<()> {
    if !QUEUE.mark_started() {
        return Ok(());
    }
    let spawned = std::thread::Builder::new()
        .name("blkdebugfs-log".into())
        .spawn(|| QUEUE.write_to(&mut std::io::stderr()));
    if spawned.is_err() {
        QUEUE.state.lock().started = false;
    }
    spawned.map(drop)
}

/// The line that reports `n` dropped lines, in the log's own format.
fn dropped_line(n: u64) -> String {
    format!(
        "[{} WARN ] {n} log lines dropped: the log sink was full\n",
        utc_now()
    )
}

/// Waits until the writer has written everything queued, for at most `limit` (stderr may be
/// a pipe nobody reads: the process must still exit). Returns whether it all went out.
pub fn finish(limit: Duration) -> bool {
    QUEUE.finish(limit)
}

struct Tee {
    stderr: env_logger::Logger,
}

impl Log for Tee {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.stderr.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.stderr.matches(record) {
            return;
        }
        if !QUIET.load(std::sync::atomic::Ordering::Relaxed) {
            self.stderr.log(record);
        }
        let mut line = format!("[{} {:<5}] {}", utc_now(), record.level(), record.args());
        if line.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !line.is_char_boundary(cut) {
                cut -= 1;
            }
            line.truncate(cut);
            line.push_str("...");
        }
        if let Some(ring) = RING.lock().as_mut() {
            if ring.len() == CAPACITY {
                ring.pop_front();
            }
            ring.push_back(line);
        }
    }

    fn flush(&self) {
        finish(FINISH);
    }
}

/// How long [`Log::flush`] waits for the writer.
const FINISH: Duration = Duration::from_secs(2);

/// Installs the logger: `default_filter` unless `RUST_LOG` is set, lines on stderr and in
/// the ring. Call once, first thing in `main`.
pub fn install(default_filter: &str) {
    let env = env_logger::Env::default().default_filter_or(default_filter);
    let mut builder = env_logger::Builder::from_env(env);
    builder
        .format_target(false)
        .target(env_logger::Target::Pipe(Box::new(Sink)));
    // Through a pipe env_logger cannot tell a terminal: say so (unless RUST_LOG_STYLE does).
    if std::env::var_os("RUST_LOG_STYLE").is_none() {
        use std::io::IsTerminal;
        builder.write_style(if std::io::stderr().is_terminal() {
            env_logger::WriteStyle::Always
        } else {
            env_logger::WriteStyle::Never
        });
    }
    let stderr = builder.build();
    let max = stderr.filter();
    *RING.lock() = Some(VecDeque::with_capacity(CAPACITY));
    if log::set_boxed_logger(Box::new(Tee { stderr })).is_ok() {
        log::set_max_level(max);
    }
}

/// The last `n` lines, oldest first; `None` when this process keeps no ring.
pub fn recent(n: usize) -> Option<Vec<String>> {
    let ring = RING.lock();
    let ring = ring.as_ref()?;
    let skip = ring.len().saturating_sub(n);
    Some(ring.iter().skip(skip).cloned().collect())
}

/// `2026-12-01T22:43:37Z`, as env_logger prints it (UTC, whole seconds).
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that blocks until the test opens its gate, like a pipe nobody reads.
    struct Gated {
        gate: std::sync::mpsc::Receiver<()>,
        out: std::sync::Arc<Mutex<Vec<u8>>>,
    }

    impl Write for Gated {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            // Blocks until the gate opens (or its sender is gone).
            let _ = self.gate.recv();
            self.out.lock().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_blocked_sink_drops_and_counts_and_says_so_once_it_drains() {
        let queue: &'static Queue = Box::leak(Box::new(Queue::new()));
        assert!(!queue.push(b"before\n"), "no writer yet: the caller writes");
        assert!(queue.mark_started());
        let (open, gate) = std::sync::mpsc::channel();
        let out = std::sync::Arc::new(Mutex::new(Vec::new()));
        let sink = Gated {
            gate,
            out: out.clone(),
        };
        std::thread::spawn(move || {
            let mut sink = sink;
            queue.write_to(&mut sink)
        });
        // The writer takes the first line and blocks on it; the queue fills behind it, and
        // the rest are dropped. No push waits.
        let n = QUEUE_LINES + 500;
        assert!(queue.push(b"line 0\n"));
        let end = Instant::now() + Duration::from_secs(60);
        while !queue.state.lock().writing {
            assert!(Instant::now() < end, "the writer never took the first line");
            std::thread::yield_now();
        }
        for i in 1..n {
            assert!(queue.push(format!("line {i}\n").as_bytes()));
        }
        assert!(!queue.finish(Duration::ZERO), "the writer is blocked");
        drop(open);
        assert!(queue.finish(Duration::from_secs(60)), "it drains");
        let text = String::from_utf8(out.lock().clone()).unwrap();
        let written = text.lines().filter(|l| l.starts_with("line ")).count();
        let dropped: usize = text
            .lines()
            .filter_map(|l| l.strip_suffix(" log lines dropped: the log sink was full"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<usize>().unwrap())
            .sum();
        assert_eq!(dropped, n - 1 - QUEUE_LINES, "the first, then a full queue");
        assert_eq!(written + dropped, n, "every line written or counted");
        assert!(
            text.lines()
                .last()
                .unwrap()
                .ends_with("the log sink was full")
        );
    }

    #[test]
    fn dates_from_day_counts() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_788), (2026, 12, 1));
    }
}
