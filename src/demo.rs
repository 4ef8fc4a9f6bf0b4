//! `blkdebugfs demo`: a self-contained tour. Makes a 1 MiB image in a temporary directory,
//! mounts it with the embedded QEMU rules below, drives real I/O through the mount and prints
//! each operation with its result; then mounts it again with `--write-cache` and the faults
//! beyond QEMU's errors ([`FAULT_RULES`]) and shows each one as a client sees it: a delay
//! timed at the client, a corrupted read compared with the image, a torn write read back, and
//! a power cut that loses a write that was not flushed. Each of those is checked against the
//! bytes, and the demo fails if one did not happen. Then it unmounts and removes everything.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{CliRule, RuleSet, parse_config_text};
use crate::control::Control;
use crate::{MountOptions, Shutdown, errno, prepare, wait_until};

/// The embedded rules, in QEMU's blkdebug syntax (they work unchanged with QEMU).
pub const DEMO_RULES: &str = r#"# 1. Every read is armed: reading sector 16 (byte 8192) fails with EIO.
[inject-error]
event = "read_aio"
sector = "16"
errno = "5"

# 2. The state machine: the first write moves state 1 -> 2 ...
[set-state]
event = "write_aio"
state = "1"
new_state = "2"

# 3. ... so the second write arms this rule and fails with ENOSPC, once.
[inject-error]
event = "write_aio"
state = "2"
errno = "28"
once = "on"

[set-state]
event = "write_aio"
state = "2"
new_state = "3"

# 4. In state 3 the next flush that reaches the disk fails with EIO, once.
[inject-error]
event = "flush_to_disk"
state = "3"
errno = "5"
once = "on"
iotype = "flush"
"#;

struct Row {
    what: String,
    result: String,
    why: &'static str,
}

fn outcome(r: io::Result<()>) -> String {
    match r {
        Ok(()) => "ok".to_string(),
        Err(e) => match e.raw_os_error() {
            Some(n) => errno::name(n).map_or(n.to_string(), str::to_string),
            None => e.to_string(),
        },
    }
}

/// Keeps the log off stderr while it lives (it would interleave with the table).
struct QuietLog;

impl QuietLog {
    fn start() -> QuietLog {
        crate::control::logring::set_quiet(true);
        QuietLog
    }
}

impl Drop for QuietLog {
    fn drop(&mut self) {
        crate::control::logring::set_quiet(false);
    }
}

/// The second mount's rules, as `--rule` takes them: one per fault, each on its own range.
pub const FAULT_RULES: &[&str] = &[
    "delay:latency=50ms,iotype=read,sectors=0-7",
    "corrupt:iotype=read,sectors=16-23,bits=3",
    "torn-write:sectors=32-39,keep=1k,once=on",
];

/// A mount served on a thread of this process, with its control endpoint.
struct Served {
    shutdown: Shutdown,
    server: std::thread::JoinHandle<Result<(), crate::Error>>,
    control: Arc<Control>,
}

impl Served {
    fn start(options: MountOptions) -> Result<Served, String> {
        let prepared = prepare(options).map_err(|e| e.to_string())?;
        let shutdown = Shutdown::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let server = {
            let shutdown = shutdown.clone();
            std::thread::spawn(move || {
                crate::run(prepared, shutdown, move |control| {
                    let _ = ready_tx.send(control);
                })
            })
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(control) => Ok(Served {
                shutdown,
                server,
                control,
            }),
            Err(_) => {
                shutdown.trigger();
                match server.join() {
                    Ok(Err(e)) => Err(e.to_string()),
                    _ => Err("the mount did not come up within 10 s".into()),
                }
            }
        }
    }

    /// One control command, as `blkdebugfs ctl MNT LINE` sends it: its reply.
    fn ctl(&self, line: &str) -> Result<String, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.control.run(
            line,
            Box::new(move |reply| {
                let _ = tx.send(reply);
            }),
        );
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(text)) => Ok(text),
            Ok(Err(e)) => Err(format!("ctl {line}: {}", e.message)),
            Err(_) => Err(format!("ctl {line}: no reply within 10 s")),
        }
    }

    /// Unmounts and waits for the server; whether `mnt` left the mount table.
    fn stop(self, mnt: &Path) -> Result<bool, String> {
        self.shutdown.trigger();
        let served = self
            .server
            .join()
            .map_err(|_| "the server thread panicked".to_string())?;
        served.map_err(|e| e.to_string())?;
        Ok(wait_until(Duration::from_secs(5), || {
            !std::fs::read_to_string("/proc/self/mounts")
                .unwrap_or_default()
                .contains(mnt.to_string_lossy().as_ref())
        }))
    }
}

/// Runs the demo; `Err` carries a message for the user.
pub fn run_demo() -> Result<(), String> {
    let dir = tempfile::Builder::new()
        .prefix("blkdebugfs-demo.")
        .tempdir()
        .map_err(|e| format!("temporary directory: {e}"))?;
    let image = dir.path().join("disk.img");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).map_err(|e| e.to_string())?;
    let pattern: Vec<u8> = (0..(1u32 << 20))
        .map(|i| (i / 512 % 251 + 1) as u8)
        .collect();
    std::fs::write(&image, &pattern).map_err(|e| format!("{}: {e}", image.display()))?;
    let rules_path = dir.path().join("demo.ini");
    std::fs::write(&rules_path, DEMO_RULES).map_err(|e| e.to_string())?;

    println!("blkdebugfs demo: image {} (1 MiB)", image.display());
    println!(
        "rules ({}), numbered as `ctl MNT rules` shows them:\n",
        rules_path.display()
    );
    let rules = parse_config_text(&rules_path, DEMO_RULES).map_err(|e| e.to_string())?;
    let comments: Vec<&str> = DEMO_RULES.lines().filter(|l| l.starts_with('#')).collect();
    for (i, rule) in rules.iter().enumerate() {
        println!("  rule {}: {rule}", i + 1);
    }
    println!();
    for line in comments {
        println!("  {line}");
    }
    println!();

    // The daemon's log lines would interleave with the table: keep them for after it.
    let quiet = QuietLog::start();
    let seen_before =
        crate::control::logring::recent(crate::control::logring::CAPACITY).map_or(0, |l| l.len());
    let mut options = MountOptions::new(&image, &mnt);
    options.rules = rules;
    options.threads = 2;
    let served = Served::start(options)?;
    let rows = drive(&mnt.join("disk.img"));
    let mut unmounted = served.stop(&mnt)?;

    drop(quiet);
    let rows = rows.map_err(|e| format!("driving the mount: {e}"))?;
    println!("{:<3} {:<34} {:<8} why", "#", "operation", "result");
    for (i, r) in rows.iter().enumerate() {
        println!("{:<3} {:<34} {:<8} {}", i + 1, r.what, r.result, r.why);
    }
    let pristine = std::fs::read(&image).map_err(|e| e.to_string())?;
    println!(
        "\nimage after unmount: bytes 0..4096 = 0x{:02x} (written by ops 5 and 7)",
        pristine[0]
    );
    if let Some(lines) = crate::control::logring::recent(crate::control::logring::CAPACITY) {
        println!("\nthe daemon's log (`blkdebugfs ctl MNT log` shows it for a real mount):");
        for line in lines.iter().skip(seen_before) {
            println!("  {line}");
        }
    }

    println!(
        "\nFaults beyond QEMU's errors: the image mounted again with --write-cache --seed 7 \
         and three rules:"
    );
    for rule in FAULT_RULES {
        println!("  --rule {rule}");
    }
    println!();
    let cli: Vec<CliRule> = FAULT_RULES
        .iter()
        .map(|r| CliRule::new("--rule", *r))
        .collect();
    let set = RuleSet::load(None, &cli).map_err(|e| e.to_string())?;
    let mut options = MountOptions::new(&image, &mnt);
    options.rules = set.rules;
    options.threads = 2;
    options.write_cache = true;
    options.seed = Some(7);
    let quiet = QuietLog::start();
    let served = Served::start(options)?;
    let shown = show_faults(&served, &mnt.join("disk.img"), &image);
    unmounted &= served.stop(&mnt)?;
    drop(quiet);
    let lines = shown?;
    for line in &lines {
        println!("{line}");
    }
    if lines.iter().any(|l| l.contains("UNEXPECTED")) {
        return Err("a fault did not show as it should (see above)".into());
    }
    println!(
        "unmounted: {}; removing {}",
        if unmounted { "yes" } else { "NO" },
        dir.path().display()
    );
    Ok(())
}

/// The operations of the tour, through the mounted file.
fn drive(file: &Path) -> io::Result<Vec<Row>> {
    let f: File = OpenOptions::new().read(true).write(true).open(file)?;
    let mut buf = vec![0u8; 4096];
    let data = vec![0xabu8; 4096];
    let mut rows = Vec::new();
    let mut row = |what: &str, r: io::Result<()>, why: &'static str| {
        rows.push(Row {
            what: what.to_string(),
            result: outcome(r),
            why,
        })
    };
    row(
        "read  4096 bytes at 0",
        f.read_exact_at(&mut buf, 0),
        "rule 1 armed, sector 16 not in range",
    );
    row(
        "read  4096 bytes at 8192",
        f.read_exact_at(&mut buf, 8192),
        "rule 1: sector 16 is byte 8192",
    );
    row(
        "read  4096 bytes at 12288",
        f.read_exact_at(&mut buf, 12288),
        "only sector 16 fails",
    );
    row(
        "fsync",
        f.sync_all(),
        "nothing written yet: no flush_to_disk",
    );
    row(
        "write 4096 bytes at 0",
        f.write_all_at(&data, 0),
        "first write: state 1 -> 2",
    );
    row(
        "write 4096 bytes at 0",
        f.write_all_at(&data, 0),
        "second write: rule 3 (state 2), once",
    );
    row(
        "write 4096 bytes at 0",
        f.write_all_at(&data, 0),
        "rule 3 deleted; state is 3",
    );
    row("fsync", f.sync_all(), "rule 5: flush_to_disk in state 3");
    row("fsync", f.sync_all(), "rule 5 was once: the retry passes");
    row(
        "read  4096 bytes at 8192",
        f.read_exact_at(&mut buf, 8192),
        "read_aio re-arms rule 1",
    );
    Ok(rows)
}

/// Drives the second mount: one short story per fault, as lines to print. A fault that did
/// not show as described gets a line with `UNEXPECTED` (the caller fails the demo).
fn show_faults(served: &Served, view: &Path, image: &Path) -> Result<Vec<String>, String> {
    let io = |what: &str, e: io::Error| format!("{what}: {e}");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(view)
        .map_err(|e| io("opening the view", e))?;
    let mut lines = Vec::new();
    let checked = |ok: bool, line: String| {
        if ok {
            line
        } else {
            format!("{line}  <- UNEXPECTED")
        }
    };
    let image_at = |offset: usize, len: usize| -> Result<Vec<u8>, String> {
        let bytes = std::fs::read(image).map_err(|e| io("reading the image", e))?;
        Ok(bytes[offset..offset + len].to_vec())
    };
    let mut buf = vec![0u8; 4096];

    // [delay]: the same read, timed by the client, in and out of the rule's range.
    let timed = |buf: &mut [u8], offset: u64| -> Result<Duration, String> {
        let start = Instant::now();
        f.read_exact_at(buf, offset)
            .map_err(|e| io("delayed read", e))?;
        Ok(start.elapsed())
    };
    let slow = timed(&mut buf, 0)?;
    let fast = timed(&mut buf, 4096)?;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    lines.push(checked(
        slow >= Duration::from_millis(50),
        format!(
            "delay:      read 4096 bytes at 0 (sectors 0-7): {:.1} ms at the client; the same \
             read at 4096: {:.1} ms",
            ms(slow),
            ms(fast)
        ),
    ));

    // [corrupt]: what the client reads against what the image holds.
    f.read_exact_at(&mut buf, 8192)
        .map_err(|e| io("corrupted read", e))?;
    let stored = image_at(8192, 4096)?;
    let differ: Vec<usize> = (0..4096).filter(|&i| buf[i] != stored[i]).collect();
    lines.push(checked(
        (1..=3).contains(&differ.len()),
        format!(
            "corrupt:    read 4096 bytes at 8192: {} byte(s) differ from the image (at {}), \
             which is unchanged",
            differ.len(),
            differ
                .iter()
                .map(|i| (8192 + i).to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ));

    // [torn-write]: the write reports success; reading it back shows what was stored.
    let new = vec![0xccu8; 4096];
    let old = image_at(16384, 4096)?;
    let wrote = f.write_all_at(&new, 16384);
    f.read_exact_at(&mut buf, 16384)
        .map_err(|e| io("reading the torn write back", e))?;
    let kept = buf.iter().zip(&new).take_while(|(a, b)| a == b).count();
    lines.push(checked(
        wrote.is_ok() && kept == 1024 && buf[1024..] == old[1024..],
        format!(
            "torn-write: wrote 4096 bytes of 0xcc at 16384: {}; read back: stored 1024 of the \
             4096 bytes, the rest kept the old bytes",
            outcome(wrote)
        ),
    ));

    // Power cut: one write flushed, one not; cut; power on; read both back.
    let (durable, volatile) = (65536u64, 69632u64);
    let old = image_at(volatile as usize, 4096)?;
    f.write_all_at(&[0xddu8; 4096], durable)
        .map_err(|e| io("write", e))?;
    let synced = f.sync_data();
    f.write_all_at(&[0xeeu8; 4096], volatile)
        .map_err(|e| io("write", e))?;
    let unsynced = served.ctl("unsynced")?;
    lines.push(format!(
        "power cut:  wrote 4096 bytes at {durable}, fsync {}; wrote 4096 bytes at {volatile}, not \
         flushed ({unsynced})",
        outcome(synced)
    ));
    let cut = served.ctl("power-cut")?;
    lines.push(format!("            ctl power-cut: {cut}"));
    served.ctl("power-on")?;
    let mut back = vec![0u8; 4096];
    f.read_exact_at(&mut back, durable)
        .map_err(|e| io("read after power-on", e))?;
    f.read_exact_at(&mut buf, volatile)
        .map_err(|e| io("read after power-on", e))?;
    lines.push(checked(
        back == [0xddu8; 4096] && buf == old,
        format!(
            "            after power-on: {durable} reads the new bytes: kept (flushed); \
             {volatile} reads its old bytes: lost (not flushed)"
        ),
    ));
    drop(f);
    Ok(lines)
}

/// Entry point for `blkdebugfs demo`.
pub fn run() -> Result<(), String> {
    run_demo()
}
