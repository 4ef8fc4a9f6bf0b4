//! `--trace FILE`: one JSON object per line for every request a rule acted on, every state
//! change, breakpoint hit, power cut and power-on, and with `--trace-all` for every request
//! (`spec/faults.md` §6).
//!
//! Contract: [`Trace::record`] never does I/O on the caller's thread (a FUSE worker, often
//! right after the engine's lock was released): it hands the finished line to one writer
//! thread, which writes lines in the order they were recorded and flushes whenever it has
//! caught up, so a test or a `tail -f` sees a line within moments of the request. Dropping
//! (or [`Trace::finish`]ing) the trace writes what is queued and closes the file.
//!
//! Why `serde_json`: the objects carry user-chosen text (tags, paths) that must be escaped
//! exactly, and test harnesses parse the lines with a JSON parser; the crate is the standard
//! one and writes what they read.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::Instant;

use parking_lot::Mutex;
use serde_json::{Map, Value};

/// Every field a trace line can carry, with what it means: the reference the section-5 man
/// page prints (`manpage.rs`). The integration tests check that each field of the lines they
/// read is listed here, so a new field cannot go undocumented.
pub const FIELDS: &[(&str, &str)] = &[
    (
        "t",
        "seconds since the mount started (always the first field)",
    ),
    ("req", "the request's id, the same in every line about it"),
    ("pid", "the process (thread) that sent the request"),
    (
        "op",
        "the client operation: read, write, zero-range, punch-hole, flush or lseek",
    ),
    ("offset", "the request's byte offset"),
    ("len", "the request's length in bytes"),
    (
        "iotype",
        "what the rule checked the request as (a write's read-modify-write padding is a read)",
    ),
    (
        "rule",
        "the number of the rule that acted (null: a ctl command, for a power cut)",
    ),
    (
        "action",
        "what happened: a rule's section (inject-error, delay, corrupt, drop-write, torn-write, \
         short-io, misdirect-write, suspend), set-state, break, power-cut, power-on or \
         bad-sector; absent on a --trace-all request line",
    ),
    (
        "armed_by",
        "the event that armed the rule (null: a standing rule)",
    ),
    ("state", "the state (after the change, for set-state)"),
    (
        "errno",
        "the errno name the request gets (\"EIO\"), or null",
    ),
    ("delay_us", "[delay]: the wait, in microseconds"),
    (
        "corrupted",
        "[corrupt]: the image offsets of the bytes changed",
    ),
    (
        "kept",
        "[torn-write]: the [start, end) byte ranges stored; power-cut: the [offset, length] of \
         each unsynced write kept",
    ),
    ("kept_bytes", "[torn-write]: the number of bytes stored"),
    ("transferred", "[short-io]: the count the request returned"),
    (
        "landed",
        "[misdirect-write]: the offset the data was stored at",
    ),
    ("tag", "[suspend]: the tag the request was parked under"),
    ("event", "set-state and break: the event that fired"),
    ("from", "set-state: the state before the change"),
    ("tags", "break: the tags of the breakpoints hit"),
    ("mode", "power-cut: lose, keep, random or sectors"),
    ("seed", "power-cut: the seed of its draws"),
    (
        "lost",
        "power-cut: the [offset, length] of each unsynced write lost",
    ),
    (
        "torn",
        "power-cut: the [offset, length, bytes kept] of each unsynced write torn",
    ),
    ("sector", "bad-sector: the first bad sector the request met"),
    (
        "events",
        "--trace-all: the events the request fired, in order",
    ),
    (
        "result",
        "--trace-all: the request's errno name, or null for success",
    ),
    (
        "sent",
        "over NBD, when the errno (or result) is one NBD cannot carry: the error sent instead \
         (EIO; ENOSPC for EDQUOT and EFBIG)",
    ),
];

/// The trace of one mount. See the module doc.
pub struct Trace {
    sender: Mutex<Option<Sender<String>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Time zero of `t`.
    started: Instant,
    /// Every request, not only those acted on (`--trace-all`).
    all: bool,
}

impl Trace {
    /// Creates (truncates) `path` and starts the writer. A symbolic link is refused, not
    /// followed, as for `--log-file` (a daemon run as root must not be aimed at another file).
    pub fn create(path: &Path, all: bool, started: Instant) -> io::Result<Trace> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        let (sender, receiver) = channel();
        let name = path.display().to_string();
        let writer = std::thread::Builder::new()
            .name("blkdebugfs-trace".into())
            .spawn(move || write_lines(receiver, BufWriter::new(file), &name))?;
        Ok(Trace {
            sender: Mutex::new(Some(sender)),
            writer: Mutex::new(Some(writer)),
            started,
            all,
        })
    }

    /// Whether every request is traced (`--trace-all`).
    pub fn all(&self) -> bool {
        self.all
    }

    /// Seconds since the mount started, for `t`.
    pub fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Queues one object; `t` is set here, first in the line.
    pub fn record(&self, fields: Map<String, Value>) {
        let mut object = Map::with_capacity(fields.len() + 1);
        object.insert("t".into(), Value::from(round_us(self.now())));
        object.extend(fields);
        let line = Value::Object(object).to_string();
        if let Some(sender) = self.sender.lock().as_ref() {
            let _ = sender.send(line);
        }
    }

    /// Writes what is queued and closes the file; later records are dropped.
    pub fn finish(&self) {
        drop(self.sender.lock().take());
        if let Some(writer) = self.writer.lock().take() {
            let _ = writer.join();
        }
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Seconds rounded to the microsecond, so lines stay short.
fn round_us(secs: f64) -> f64 {
    (secs * 1e6).round() / 1e6
}

fn write_lines(receiver: Receiver<String>, mut out: BufWriter<File>, name: &str) {
    let mut failed = false;
    let mut write = |out: &mut BufWriter<File>, line: String| {
        if !failed && let Err(e) = writeln!(out, "{line}") {
            log::warn!("writing the trace {name} failed: {e}; tracing stops");
            failed = true;
        }
    };
    while let Ok(line) = receiver.recv() {
        write(&mut out, line);
        // Drain what is already queued, then flush: one write per burst, not per line.
        while let Ok(line) = receiver.try_recv() {
            write(&mut out, line);
        }
        let _ = out.flush();
    }
    let _ = out.flush();
}

/// Builds a trace object: `fields!{"op" => "read", "len" => 4096}`.
#[macro_export]
macro_rules! fields {
    ($($key:expr => $value:expr),* $(,)?) => {{
        let mut map = serde_json::Map::new();
        $( map.insert(String::from($key), serde_json::Value::from($value)); )*
        map
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_in_order_with_t_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        let trace = Trace::create(&path, false, Instant::now()).unwrap();
        for i in 0..100u64 {
            trace.record(fields! {"req" => i, "tag" => "a \"quoted\"\ntag"});
        }
        trace.finish();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 100);
        for (i, v) in lines.iter().enumerate() {
            assert_eq!(v["req"], i as u64);
            assert_eq!(v["tag"], "a \"quoted\"\ntag");
            assert!(v["t"].as_f64().unwrap() >= 0.0);
        }
        assert!(text.starts_with("{\"t\":"), "{text}");
        // After finish, records are dropped, not written.
        trace.record(fields! {"req" => 1000});
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 100);
    }
}
