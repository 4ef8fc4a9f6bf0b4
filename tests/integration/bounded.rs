//! Nothing a user types may hang the mount (issue 15 §2): a number in a rule that is as
//! large as the request, a key whose cost grows with what the user wrote, and a log sink
//! that nobody drains. Every test here runs its I/O on a thread and waits for it with a
//! deadline, so a hang fails the test instead of hanging the suite.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use crate::util::*;

const KIB: usize = 1024;
/// How long a client may take before the mount counts as hung. Generous: the machine may be
/// loaded; what it guards against is minutes or forever.
const HUNG: Duration = Duration::from_secs(60);

/// Runs `f` on its own thread and returns its result; fails the test, naming `what`, when it
/// has not finished within `limit`: the mount (or the engine lock) is hung.
fn within<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => v,
        Err(_) => panic!("{what} did not finish within {limit:?}: the mount hung"),
    }
}

/// Sends one command through `<mnt>/.control` from this thread (no `ctl` process: a thread
/// of this test may not spawn one while the test holds the mount lock).
fn control_file(mnt: &Path, command: &str) -> String {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join(".control"))
        .expect("open .control");
    f.write_all(command.as_bytes()).expect("send the command");
    let mut reply = String::new();
    f.read_to_string(&mut reply).expect("read the reply");
    reply
}

/// `bits` as large as the request used to be drawn by rejection with `Vec::contains` under
/// the engine lock (a 128 KiB read: hours). Now every bit of the request flips at once, and
/// meanwhile another read and a `rules` command are served.
#[test]
fn a_corruption_as_large_as_the_request_ends_and_leaves_the_mount_serving() {
    const LEN: usize = 128 * KIB;
    let s = Scratch::new(4 * MIB);
    let bits = format!("corrupt:iotype=read,bits={}", LEN * 8);
    let d = mount(&s, &["--seed", "7", "--rule", &bits]);
    let view = s.view();
    let (big_tx, big_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = big_tx.send(read_at(&open_direct(&view), 0, LEN));
    });
    let (view, mnt) = (s.view(), s.mnt.clone());
    let (other, rules) = within(HUNG, "a 4 KiB read and `rules` beside it", move || {
        let other = read_at(&open_direct(&view), 2 * MIB as u64, 4096);
        (other, control_file(&mnt, "rules"))
    });
    let big = big_rx
        .recv_timeout(HUNG)
        .unwrap_or_else(|_| panic!("a read with bits = {} hung the mount", LEN * 8));
    let flipped = |at: usize, len: usize| -> Vec<u8> {
        pattern(4 * MIB)[at..at + len].iter().map(|b| !b).collect()
    };
    // The rule has no range: the request bounds it, and every bit of the request flips.
    same_bytes(&big.expect("the big read"), &flipped(0, LEN), "big read");
    same_bytes(
        &other.expect("the other read"),
        &flipped(2 * MIB, 4096),
        "other read",
    );
    assert!(rules.contains("corrupt mode=flip bits=1048576"), "{rules}");
    // The image is untouched: only the bytes returned were corrupted.
    same_bytes(&s.image_bytes(), &pattern(4 * MIB), "image");
    assert!(d.stop().success());
}

/// A `bits` or `bytes` larger than the rule's own range can ever hold is a load error (exit
/// 2, naming the line, section, key and value), on the command line and through `ctl` too;
/// so is a torn-write `unit` that is not whole sectors (`unit = 1` made one journal entry per
/// byte written).
#[test]
fn numbers_no_request_can_hold_are_refused_at_load() {
    let s = Scratch::new(MIB);
    let conf = s.config("[corrupt]\nsectors = \"0-7\"\nbits = \"32769\"\n");
    let (code, _, err) = run_cli(&["check", "--config", conf.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("rules.ini:3: [corrupt] bits = \"32769\": ")
            && err.contains("the rule's range holds 4096 bytes (32768 bits)"),
        "{err}"
    );
    // As many bits as the range holds is fine.
    let conf = s.config("[corrupt]\nsectors = \"0-7\"\nbits = \"32768\"\n");
    let (code, _, err) = run_cli(&["check", "--config", conf.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    for (rule, what) in [
        ("corrupt:mode=zero,bytes=513,sector=8", "bytes = \"513\""),
        ("corrupt:bits=4097,sector=8", "bits = \"4097\""),
        ("torn-write:unit=1", "unit = \"1\""),
        ("torn-write:mode=sectors,unit=1000", "unit = \"1000\""),
    ] {
        let (code, _, err) = run_cli(&["check", "--rule", rule]);
        assert_eq!(code, 2, "{rule}: {err}");
        assert!(
            err.contains("--rule #1") && err.contains(what),
            "{rule}: {err}"
        );
    }
    let (code, _, err) = run_cli(&["check", "--rule", "torn-write:mode=sectors,unit=4k"]);
    assert_eq!(code, 0, "{err}");
    // `mount` refuses it before mounting anything.
    let (code, _, err) = run_cli(&[
        "mount",
        s.image.to_str().unwrap(),
        s.mnt.to_str().unwrap(),
        "--rule",
        "corrupt:bits=4097,sector=8",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("the rule's range holds 512 bytes"), "{err}");
    assert!(!is_mounted(&s.mnt));
    // Through `ctl`: an error reply, and the mount goes on.
    let d = mount(&s, &[]);
    let (code, out, err) = run_cli(&[
        "ctl",
        s.mnt.to_str().unwrap(),
        "corrupt",
        "bits=4097,sectors=8",
    ]);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("the rule's range holds 512 bytes"), "{err}");
    assert!(ctl(&s.mnt, &["rules"]).contains("no rules"));
    assert!(d.stop().success());
}

/// Starts a mount whose stderr is a pipe that this test does not read (yet), with `log` as
/// RUST_LOG and `extra` options.
fn mount_with_stderr_pipe(s: &Scratch, log: &str, extra: &[&str]) -> (Daemon, PipeReader) {
    let mut args = vec![s.image.to_str().unwrap(), s.mnt.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut d = Daemon::start_with(&s.mnt, &args, |cmd| {
        cmd.env("RUST_LOG", log).stderr(Stdio::piped());
    });
    let pipe = d.take_stderr_pipe().expect("a stderr pipe");
    (d, PipeReader(Some(pipe)))
}

/// The read end of a daemon's stderr, read only when the test says so.
struct PipeReader(Option<std::process::ChildStderr>);

impl PipeReader {
    /// Starts draining the pipe on a thread; lines come through the channel as they arrive.
    fn drain(&mut self) -> mpsc::Receiver<String> {
        let mut pipe = self.0.take().expect("drained once");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let mut buf = [0u8; 65536];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                text.extend_from_slice(&buf[..n]);
                while let Some(at) = text.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = text.drain(..=at).collect();
                    if tx
                        .send(String::from_utf8_lossy(&line).trim_end().to_string())
                        .is_err()
                    {
                        return;
                    }
                }
            }
        });
        rx
    }
}

/// `n` O_DIRECT 512-byte reads of `view` (the first MiB, in turn), on a thread, within the
/// deadline.
fn reads(view: PathBuf, n: usize) {
    within(HUNG * 2, &format!("{n} reads"), move || {
        let f = open_direct(&view);
        let mut b = AlignedBuf::new(512);
        for i in 0..n {
            let got = pread(&f, b.as_mut(), (i % 2048 * 512) as u64);
            assert_eq!(got, Ok(512), "read {i}");
        }
    });
}

/// The first line from `lines` that `wanted` accepts, waiting up to [`DEADLINE`] for it.
fn wait_line(lines: &mpsc::Receiver<String>, wanted: impl Fn(&str) -> bool) -> Option<String> {
    let end = std::time::Instant::now() + DEADLINE;
    loop {
        let left = end.checked_duration_since(std::time::Instant::now())?;
        match lines.recv_timeout(left) {
            Ok(line) if wanted(&line) => return Some(line),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// The number in `rule 1: delayed 1234 more request(s) in the last ...`.
fn summarised(line: &str) -> Option<u64> {
    let rest = line.split("rule 1: delayed ").nth(1)?;
    let (n, tail) = rest.split_once(' ')?;
    tail.starts_with("more request").then(|| n.parse().ok())?
}

/// A daemon in the foreground whose stderr is a pipe nobody reads stopped serving after
/// about 640 delayed reads: one line per injection, and the 641st write to the full pipe
/// blocked a FUSE worker. Now a rule that acts thousands of times logs its first few
/// injections and then one summary a second, and the counts add up to exactly what it did.
#[test]
fn a_busy_rule_logs_a_summary_and_an_unread_log_pipe_stops_nothing() {
    const N: usize = 5000;
    let s = Scratch::new(MIB);
    let (d, mut pipe) = mount_with_stderr_pipe(
        &s,
        "info",
        &["--rule", "delay:latency=1ms,iotype=read,sectors=0-2047"],
    );
    reads(s.view(), N);
    let st = ctl(&s.mnt, &["stats", "json"]);
    let st: serde_json::Value = serde_json::from_str(st.trim()).expect("stats json");
    assert_eq!(st["faults"]["delay"], N, "the stats stay exact: {st}");
    let lines = pipe.drain();
    // Shutdown says what the last, unfinished second held, and closes the pipe.
    assert!(d.stop().success());
    let log: Vec<String> = lines.iter().collect();
    let one_by_one = log
        .iter()
        .filter(|l| l.contains("delaying read at offset"))
        .count() as u64;
    let summaries: Vec<u64> = log.iter().filter_map(|l| summarised(l)).collect();
    assert!(
        one_by_one >= 1,
        "the first injection is logged:\n{}",
        log.join("\n")
    );
    assert!(!summaries.is_empty(), "{}", log.join("\n"));
    assert_eq!(
        one_by_one + summaries.iter().sum::<u64>(),
        N as u64,
        "every injection is counted once:\n{}",
        log.join("\n")
    );
    assert!(
        log.len() < 200,
        "{} lines for {N} injections:\n{}",
        log.len(),
        log.join("\n")
    );
}

/// With a line per request (`RUST_LOG=debug` logs every event), an unread pipe fills: the
/// lines that do not fit are dropped and counted, the I/O goes on, and once the pipe is read
/// again the log says how many were lost.
#[test]
fn a_full_log_pipe_drops_and_counts_lines_instead_of_stalling_io() {
    // About 2.5 lines a read (events, and fuser's own debug lines): some 25,000 lines, where
    // the pipe, the lines the writer holds and the queue take at most about 9,000.
    const N: usize = 10_000;
    let s = Scratch::new(MIB);
    let (d, mut pipe) = mount_with_stderr_pipe(&s, "debug", &[]);
    reads(s.view(), N);
    let lines = pipe.drain();
    let dropped = wait_line(&lines, |l| {
        l.contains("log lines dropped: the log sink was full")
    })
    .expect("a line says how many were dropped");
    let n: u64 = dropped
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .expect("a count");
    assert!(n > 0, "{dropped}");
    assert!(d.stop().success());
}
