//! What the mount says: log lines that may repeat for every request, kept to a few and then
//! one summary a second per rule ([`Limiter`]), and the trace fields every request-related
//! trace object starts with. The request path never waits on the log (`control/logring.rs`
//! queues lines for a writer thread); the trace and stats count every request.

use std::collections::HashMap;
use std::hash::Hash;
use std::io;
use std::time::{Duration, Instant};

use log::{info, warn};
use parking_lot::Mutex;
use serde_json::Value;

use super::Mount;
use super::executor::Pending;
use crate::engine::{RuleId, errno};
use crate::fields;

/// What a log line that may repeat for every request is about (see `Mount::log_limit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum LogKey {
    Rule(RuleId),
    BadSector,
    Healed,
}

impl std::fmt::Display for LogKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogKey::Rule(id) => write!(f, "rule {id}"),
            LogKey::BadSector | LogKey::Healed => f.write_str("bad sectors"),
        }
    }
}

impl Mount {
    /// Logs (at info) one occurrence of something that may happen on every request: its
    /// own `line` for the first few of `key`, then a summary a second, `KEY: DONE N more
    /// request(s) in the last 1.0 s` (`done` says what was done to them). Only what is
    /// logged is formatted.
    pub(super) fn log_limited(
        &self,
        key: LogKey,
        line: impl FnOnce() -> String,
        done: impl Fn() -> String,
    ) {
        if !log::log_enabled!(log::Level::Info) {
            return;
        }
        match self.log_limit.admit(key, Instant::now(), &done) {
            Say::Line => info!("{}", line()),
            Say::Summary { count, over } => info!("{}", summary(key, &done(), count, over)),
            Say::Nothing => {}
        }
    }

    /// Logs what [`Mount::log_limited`] counted and has not said yet (at shutdown).
    pub(super) fn log_pending(&self) {
        for (key, done, count, over) in self.log_limit.pending(Instant::now()) {
            info!("{}", summary(key, &done, count, over));
        }
    }

    /// The errno of a failed image I/O, logged with what it was. The media's refusal after
    /// a power cut is not an I/O error: EIO, and nothing to log.
    pub(super) fn io_failed(&self, what: &str, offset: u64, len: u64, e: io::Error) -> i32 {
        if crate::media::is_power_lost(&e) {
            return libc::EIO;
        }
        warn!(
            "{what} of {len} bytes at offset {offset} on {} failed: {e}",
            self.image_path.display()
        );
        e.raw_os_error().unwrap_or(libc::EIO)
    }
}

/// `rule 3: injected ENOSPC (28) into 1234 more request(s) in the last 1.0 s`.
pub(super) fn summary(key: LogKey, done: &str, count: u64, over: Duration) -> String {
    format!(
        "{key}: {done} {count} more request(s) in the last {:.1} s",
        over.as_secs_f64()
    )
}

/// The trace fields every request-related object starts with.
pub(super) fn request_fields(p: &Pending<'_>) -> serde_json::Map<String, Value> {
    let (offset, len) = p.op.range();
    fields! {
        "req" => p.id,
        "pid" => p.caller.pid,
        "op" => p.op.name(),
        "offset" => offset,
        "len" => len,
    }
}

/// Adds `sent` (the errno the front end sent instead, by name) when `errno` is one the
/// request's front end cannot carry.
pub(super) fn sent_field(
    f: &mut serde_json::Map<String, Value>,
    p: &Pending<'_>,
    errno: Option<i32>,
) {
    if let (Some(e), Some(sends)) = (errno, p.caller.sends) {
        let sent = sends(e);
        if sent != e {
            f.insert("sent".into(), errno_field(Some(sent)));
        }
    }
}

/// An errno as the trace writes it: its name (`"EIO"`), or `null`.
pub(super) fn errno_field(errno: Option<i32>) -> Value {
    match errno {
        None => Value::Null,
        Some(e) => errno::name(e).map_or_else(|| Value::from(e), Value::from),
    }
}

/// How many of a key's occurrences [`Limiter`] lets through one by one.
pub const ONE_BY_ONE: u32 = 10;
/// After those, at most one summary line per key per this long.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(1);

/// What to log for one occurrence (see [`Limiter::admit`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Say {
    /// Its own line.
    Line,
    /// One line for `count` occurrences (this one included) over the last `over`.
    Summary { count: u64, over: Duration },
    /// Nothing now: it is counted for the next summary.
    Nothing,
}

/// One key's count (see [`Limiter`]).
struct Window {
    /// Occurrences logged one by one (up to [`ONE_BY_ONE`]).
    logged: u32,
    /// When the last line for this key was logged.
    since: Instant,
    /// Occurrences counted since then, not logged yet.
    quiet: u64,
    /// What they were, for a last summary at shutdown ([`Limiter::pending`]).
    what: String,
}

/// Keeps a source of many alike lines (a rule acting on every request) to a bounded rate:
/// the first [`ONE_BY_ONE`] occurrences of each key are logged one by one, then at most one
/// summary per key per [`SUMMARY_EVERY`], with the count of what happened since. Counts are
/// exact: every occurrence is in a line or in a summary, or in [`Limiter::pending`].
pub struct Limiter<K> {
    keys: Mutex<HashMap<K, Window>>,
}

/// Keys kept before the quiet ones are forgotten (a forgotten key logs one by one again).
const MAX_KEYS: usize = 4096;

impl<K: Eq + Hash + Copy> Default for Limiter<K> {
    fn default() -> Self {
        Limiter {
            keys: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Copy> Limiter<K> {
    /// Counts one occurrence of `key` at `now` and says what to log for it. `what` describes
    /// it for a summary at shutdown; it is called at most once per summary.
    pub fn admit(&self, key: K, now: Instant, what: impl FnOnce() -> String) -> Say {
        let mut keys = self.keys.lock();
        if keys.len() >= MAX_KEYS && !keys.contains_key(&key) {
            keys.retain(|_, w| w.quiet > 0);
        }
        let w = keys.entry(key).or_insert(Window {
            logged: 0,
            since: now,
            quiet: 0,
            what: String::new(),
        });
        if w.logged < ONE_BY_ONE {
            w.logged += 1;
            w.since = now;
            return Say::Line;
        }
        w.quiet += 1;
        let over = now.saturating_duration_since(w.since);
        if over >= SUMMARY_EVERY {
            let count = std::mem::take(&mut w.quiet);
            w.since = now;
            Say::Summary { count, over }
        } else {
            if w.quiet == 1 {
                w.what = what();
            }
            Say::Nothing
        }
    }

    /// Takes the counts not reported yet: (key, what they were, count, over how long).
    pub fn pending(&self, now: Instant) -> Vec<(K, String, u64, Duration)> {
        let mut keys = self.keys.lock();
        keys.iter_mut()
            .filter(|(_, w)| w.quiet > 0)
            .map(|(k, w)| {
                let over = now.saturating_duration_since(w.since);
                w.since = now;
                (
                    *k,
                    std::mem::take(&mut w.what),
                    std::mem::take(&mut w.quiet),
                    over,
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limiter_lets_the_first_lines_through_then_summarises_each_second() {
        let l: Limiter<u32> = Limiter::default();
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let says: Vec<Say> = (0..ONE_BY_ONE as u64 + 3)
            .map(|i| l.admit(1, ms(i), || "x".into()))
            .collect();
        assert!(says[..ONE_BY_ONE as usize].iter().all(|s| *s == Say::Line));
        assert!(
            says[ONE_BY_ONE as usize..]
                .iter()
                .all(|s| *s == Say::Nothing)
        );
        // Another key has its own count.
        assert_eq!(l.admit(2, ms(20), || "y".into()), Say::Line);
        // A second after the last line: one summary for the 3 quiet ones and this one.
        let last_line = ms(ONE_BY_ONE as u64 - 1);
        let at = last_line + SUMMARY_EVERY;
        assert_eq!(
            l.admit(1, at, || "x".into()),
            Say::Summary {
                count: 4,
                over: SUMMARY_EVERY
            }
        );
        assert_eq!(l.admit(1, at, || "later".into()), Say::Nothing);
        let pending = l.pending(at + Duration::from_millis(500));
        assert_eq!(
            pending,
            vec![(1, "later".to_string(), 1, Duration::from_millis(500))]
        );
        assert!(l.pending(at + SUMMARY_EVERY).is_empty(), "taken once");
    }
}
