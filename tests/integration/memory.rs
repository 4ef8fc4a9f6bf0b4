//! What the daemon's memory costs (issue 15 §4), measured on the real daemon through
//! `/proc/PID/status`: a million scattered bad sectors, and the write cache's in-memory
//! before-images, which must go back to the system once a flush makes them durable.
//!
//! These are resource bounds, not timings: each compares the daemon's resident memory with
//! the same binary's memory on a plain mount, and states its band (the bound is about twice
//! the data the structure must hold, and far below what the old code used).

use std::path::Path;

use crate::util::*;

/// Resident memory of process `pid`, in bytes.
fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// The resident memory of a plain mount of `s` (no rules), the baseline of the bounds.
fn baseline(s: &Scratch) -> u64 {
    let d = mount(s, &[]);
    let base = rss(d.pid());
    assert!(d.stop().success());
    base
}

fn list_file(dir: &Path, n: u64) -> std::path::PathBuf {
    let list = dir.join("scattered.txt");
    let text: String = (0..n).map(|i| format!("{}\n", 4096 + 3 * i)).collect();
    std::fs::write(&list, text).unwrap();
    list
}

/// A million scattered bad sectors: 16 MB of intervals. Before the fix the daemon held
/// three copies of an ordered map (112 MB resident in a release build).
#[test]
fn a_million_scattered_bad_sectors_cost_the_daemon_under_32_mb() {
    let s = Scratch::new(MIB);
    let base = baseline(&s);
    let list = list_file(s.dir.path(), 1_000_000);
    // Room for the sectors listed (a sparse 2 GiB image).
    std::fs::OpenOptions::new()
        .write(true)
        .open(&s.image)
        .and_then(|f| f.set_len(2 << 30))
        .expect("grow the image");
    let conf = s.config(&format!("[bad-sectors]\nfile = \"{}\"\n", list.display()));
    let d = mount(&s, &["-c", conf.to_str().unwrap()]);
    let f = open_direct(&s.view());
    // The set is live: a read of the 1000th bad sector fails, one between two passes.
    assert_eq!(read_at(&f, (4096 + 3 * 999) * 512, 512), Err(libc::EIO));
    assert!(read_at(&f, (4096 + 3 * 999 + 1) * 512, 512).is_ok());
    let cost = rss(d.pid()).saturating_sub(base);
    drop(f);
    assert!(d.stop().success());
    assert!(
        cost < 32 << 20,
        "a million bad sectors cost {} MiB of daemon memory (the set itself is 16 MB)",
        cost >> 20
    );
}

/// The write cache keeps up to 64 MiB of before-images in memory; a flush that makes them
/// durable gives that memory back, round after round. Before the fix the freed memory stayed
/// in the allocator's per-thread arenas and the daemon grew with each round.
#[test]
fn the_write_cache_gives_its_memory_back_after_each_flush() {
    let s = Scratch::new(256 * MIB);
    let base = baseline(&s);
    let d = mount(&s, &["--write-cache"]);
    let f = open_direct(&s.view());
    let block = AlignedBuf::filled(4096, 0x7e);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut after_flush = Vec::new();
    let mut peak = 0;
    for _round in 0..3 {
        // 80 MiB of 4 KiB writes over data: the memory tier fills (64 MiB), the rest goes
        // to the journal file.
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x % 65_536) * 4096;
            assert_eq!(pwrite(&f, block.as_ref(), at), Ok(4096));
        }
        peak = peak.max(rss(d.pid()).saturating_sub(base));
        assert_eq!(fsync(&f), Ok(0));
        after_flush.push(rss(d.pid()).saturating_sub(base));
    }
    drop(f);
    assert!(d.stop().success());
    let mib = |v: &[u64]| v.iter().map(|b| b >> 20).collect::<Vec<_>>();
    assert!(
        peak < 96 << 20,
        "unsynced: {} MiB over a plain mount (64 MiB budget plus the index)",
        peak >> 20
    );
    assert!(
        after_flush.iter().all(|b| *b < 24 << 20),
        "after each flush the daemon still held {:?} MiB over a plain mount (peak {} MiB)",
        mib(&after_flush),
        peak >> 20
    );
}
