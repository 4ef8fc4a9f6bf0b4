//! `blkdebugfs demo`: a self-contained tour. Makes a 1 MiB image in a temporary directory,
//! mounts it with the embedded rules below, drives real I/O through the mount and prints
//! each operation with its result, then unmounts and removes everything.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use crate::config::parse_config_text;
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
        crate::logring::set_quiet(true);
        QuietLog
    }
}

impl Drop for QuietLog {
    fn drop(&mut self) {
        crate::logring::set_quiet(false);
    }
}

/// Runs the demo; `Err` carries a message for the user.
pub fn run_demo() -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| format!("temporary directory: {e}"))?;
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
    let seen_before = crate::logring::recent(crate::logring::CAPACITY).map_or(0, |l| l.len());
    let mut options = MountOptions::new(&image, &mnt);
    options.rules = rules;
    options.threads = 2;
    let prepared = prepare(options).map_err(|e| e.to_string())?;
    let shutdown = Shutdown::new();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = {
        let shutdown = shutdown.clone();
        std::thread::spawn(move || {
            crate::run(prepared, shutdown, move |_| {
                let _ = ready_tx.send(());
            })
        })
    };
    if ready_rx.recv_timeout(Duration::from_secs(10)).is_err() {
        shutdown.trigger();
        return match server.join() {
            Ok(Err(e)) => Err(e.to_string()),
            _ => Err("the mount did not come up within 10 s".into()),
        };
    }

    let rows = drive(&mnt.join("disk.img"));
    shutdown.trigger();
    let served = server
        .join()
        .map_err(|_| "the server thread panicked".to_string())?;
    served.map_err(|e| e.to_string())?;
    let unmounted = wait_until(Duration::from_secs(5), || {
        !std::fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .contains(mnt.to_string_lossy().as_ref())
    });

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
    if let Some(lines) = crate::logring::recent(crate::logring::CAPACITY) {
        println!("\nthe daemon's log (`blkdebugfs ctl MNT log` shows it for a real mount):");
        for line in lines.iter().skip(seen_before) {
            println!("  {line}");
        }
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

/// Entry point for `blkdebugfs demo`.
pub fn run() -> Result<(), String> {
    run_demo()
}
