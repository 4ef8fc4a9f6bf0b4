//! The process's logger: `env_logger` on stderr, plus the last [`CAPACITY`] lines kept in
//! memory for the control command `log`, so that the one line per injection stays reachable
//! when `--daemonize` sends stderr to /dev/null and no `--log-file` was given.
//!
//! The log is process-wide by nature (the `log` crate has one logger), so the ring is too;
//! it exists only once [`install`] ran (the `blkdebugfs` binary does; a test or the demo
//! that mounts in-process has none, and `log` says so).

use std::collections::VecDeque;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Log, Metadata, Record};
use parking_lot::Mutex;

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
        self.stderr.flush();
    }
}

/// Installs the logger: `default_filter` unless `RUST_LOG` is set, lines on stderr and in
/// the ring. Call once, first thing in `main`.
pub fn install(default_filter: &str) {
    let stderr =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default_filter))
            .format_target(false)
            .build();
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

    #[test]
    fn dates_from_day_counts() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_788), (2026, 12, 1));
    }
}
