//! Each action of `spec/faults.md` §3 through a real mount, as a user would check it: the
//! delay measured at the client, corrupted bits found by comparing bytes, a dropped write
//! read back as the old bytes, the bytes a torn write kept, the short count `pread`/`pwrite`
//! return, a misdirected write found where it landed, a `[suspend]` rule holding only the
//! writes to its range; then the seed, the trace, `stats` and the control commands.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::*;

const KIB: usize = 1024;

/// `ctl MNT stats json`, parsed.
fn stats(mnt: &Path) -> Value {
    serde_json::from_str(ctl(mnt, &["stats", "json"]).trim()).expect("stats json parses")
}

/// Bit positions where `a` and `b` differ.
fn differing_bits(a: &[u8], b: &[u8]) -> Vec<usize> {
    let mut bits = Vec::new();
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        for bit in 0..8 {
            if (x ^ y) & (1 << bit) != 0 {
                bits.push(i * 8 + bit);
            }
        }
    }
    bits
}

#[test]
fn a_delay_is_seen_by_the_client_and_holds_only_its_range() {
    let s = Scratch::new(MIB);
    let d = mount(&s, &["--rule", "delay:latency=300ms,sectors=0-7"]);
    let f = open_direct(&s.view());
    let t = Instant::now();
    same_bytes(
        &read_at(&f, 0, 4096).unwrap(),
        &pattern(MIB)[..4096],
        "bytes",
    );
    let delayed = t.elapsed();
    // A delay never ends early. (How close to the latency it ends is measured by
    // scripts/bench.sh, never asserted: this machine may be loaded.)
    assert!(delayed >= Duration::from_millis(300), "{delayed:?}");
    // Outside the range nothing waits: the read returns, and it is not acted on.
    same_bytes(
        &read_at(&f, 8192, 4096).unwrap(),
        &pattern(MIB)[8192..12288],
        "bytes",
    );
    let st = stats(&s.mnt);
    assert_eq!(st["faults"]["delay"], 1, "{st}");
    assert_eq!(st["ops"]["read"]["requests"], 2, "{st}");
    // A delay with errno is a timeout: the request fails once the wait is over.
    ctl(
        &s.mnt,
        &[
            "delay",
            "latency=50ms,errno=ETIMEDOUT,sectors=100,iotype=write",
        ],
    );
    let t = Instant::now();
    assert_eq!(
        pwrite(&f, AlignedBuf::filled(512, 7).as_ref(), 100 * 512),
        Err(libc::ETIMEDOUT)
    );
    assert!(t.elapsed() >= Duration::from_millis(50));
    assert_eq!(
        s.image_bytes()[100 * 512],
        pattern(MIB)[100 * 512],
        "not written"
    );
    drop(f);
    assert!(d.stop().success());
}

/// 1,000 requests delayed at once hold no worker: with two workers, an undelayed read
/// elsewhere completes while all of them still wait, and a shutdown releases them at once.
#[test]
fn a_thousand_delayed_requests_hold_no_worker_and_shutdown_releases_them() {
    const N: usize = 1000;
    let s = Scratch::new(MIB);
    let d = mount(
        &s,
        &["--threads", "2", "--rule", "delay:latency=60s,sectors=0-7"],
    );
    // One descriptor shared by every client thread (1,000 would pass the fd limit).
    let shared = Arc::new(open_direct(&s.view()));
    let clients: Vec<_> = (0..N)
        .map(|_| {
            let f = shared.clone();
            std::thread::Builder::new()
                .stack_size(64 * KIB)
                .spawn(move || {
                    let t = Instant::now();
                    let r = read_at(&f, 0, 512).map(|b| b.len());
                    (r, t.elapsed())
                })
                .expect("spawn client")
        })
        .collect();
    let all_parked = wait_for(Duration::from_secs(60), || {
        stats(&s.mnt)["delayed_now"] == N
    });
    assert!(all_parked, "{}", stats(&s.mnt));
    let f = open_direct(&s.view());
    same_bytes(
        &read_at(&f, 65536, 4096).unwrap(),
        &pattern(MIB)[65536..69632],
        "bytes",
    );
    assert_eq!(stats(&s.mnt)["delayed_now"], N, "they were still waiting");
    drop(f);
    let t = Instant::now();
    assert!(d.stop().success());
    for c in clients {
        let (r, waited): (Result<usize, i32>, Duration) = c.join().expect("client thread");
        assert_eq!(r, Ok(512), "released requests complete normally");
        assert!(waited < Duration::from_secs(60), "released, not timed out");
    }
    assert!(t.elapsed() < Duration::from_secs(60));
}

#[test]
fn corrupted_reads_flip_exactly_the_bits_asked_for_and_leave_the_image_alone() {
    let s = Scratch::new(MIB);
    let d = mount(
        &s,
        &[
            "--seed",
            "7",
            "--rule",
            "corrupt:iotype=read,sectors=16-23,bits=5",
        ],
    );
    let f = open_direct(&s.view());
    let expect = pattern(MIB);
    // The request covers sectors 8-31; only the rule's sectors 16-23 may change.
    let got = read_at(&f, 4096, 12288).unwrap();
    let bits = differing_bits(&got, &expect[4096..16384]);
    assert_eq!(bits.len(), 5, "{bits:?}");
    assert!(
        bits.iter().all(|b| (4096..8192).contains(&(b / 8))),
        "{bits:?}"
    );
    // A read elsewhere is untouched, and the image never changed.
    same_bytes(
        &read_at(&f, 65536, 4096).unwrap(),
        &expect[65536..69632],
        "bytes",
    );
    same_bytes(&s.image_bytes(), &expect, "bytes");
    // Zero mode overwrites a run of bytes.
    ctl(&s.mnt, &["clear"]);
    ctl(
        &s.mnt,
        &["corrupt", "mode=zero,bytes=100,iotype=read,sectors=200-201"],
    );
    let got = read_at(&f, 200 * 512, 1024).unwrap();
    assert_eq!(got.iter().filter(|b| **b == 0).count(), 100);
    drop(f);
    assert!(d.stop().success());
    same_bytes(&s.image_bytes(), &expect, "bytes");
}

#[test]
fn a_corrupted_write_reports_success_and_stores_other_bytes() {
    let s = Scratch::new(MIB);
    let d = mount(&s, &["--rule", "corrupt:iotype=write,bits=3,count=1"]);
    let f = open_direct(&s.view());
    let data = AlignedBuf::filled(4096, 0x5a);
    assert_eq!(pwrite(&f, data.as_ref(), 8192), Ok(4096));
    let stored = s.image_bytes()[8192..12288].to_vec();
    assert_eq!(differing_bits(&stored, data.as_ref()).len(), 3);
    // count = 1: the next write is stored as written.
    assert_eq!(pwrite(&f, data.as_ref(), 16384), Ok(4096));
    same_bytes(&s.image_bytes()[16384..20480], data.as_ref(), "bytes");
    drop(f);
    assert!(d.stop().success());
}

#[test]
fn a_dropped_write_reads_back_as_the_old_bytes() {
    let s = Scratch::new(MIB);
    let d = mount(&s, &["--rule", "drop-write:sectors=64-71,every=2"]);
    let f = open_direct(&s.view());
    let expect = pattern(MIB);
    let new = AlignedBuf::filled(4096, 0xee);
    // every = 2: the first matching write is stored, the second dropped.
    assert_eq!(
        pwrite(&f, AlignedBuf::filled(4096, 0x11).as_ref(), 32768),
        Ok(4096)
    );
    assert!(read_at(&f, 32768, 4096).unwrap() == vec![0x11; 4096]);
    assert_eq!(pwrite(&f, new.as_ref(), 32768), Ok(4096), "reports success");
    assert!(
        read_at(&f, 32768, 4096).unwrap() == vec![0x11; 4096],
        "the old bytes"
    );
    // Writes elsewhere are stored.
    assert_eq!(pwrite(&f, new.as_ref(), 0), Ok(4096));
    same_bytes(&read_at(&f, 0, 4096).unwrap(), new.as_ref(), "bytes");
    // A dropped zero-range leaves the bytes too.
    ctl(&s.mnt, &["clear"]);
    ctl(&s.mnt, &["drop-write", "sectors=64-71"]);
    let g = open_rw(&s.view());
    fallocate(
        &g,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        32768,
        4096,
    )
    .unwrap();
    assert!(read_at(&f, 32768, 4096).unwrap() == vec![0x11; 4096]);
    assert!(
        s.image_bytes()[65536..] == expect[65536..],
        "nothing else changed"
    );
    drop((f, g));
    assert!(d.stop().success());
}

#[test]
fn a_torn_write_keeps_its_prefix_or_a_seeded_set_of_sectors() {
    let s = Scratch::new(MIB);
    let d = mount(
        &s,
        &[
            "--seed",
            "3",
            "--rule",
            "torn-write:keep=1024,sectors=0-7,count=1",
            "--rule",
            "torn-write:mode=sectors,sectors=64-127,errno=EIO",
        ],
    );
    let f = open_direct(&s.view());
    let expect = pattern(MIB);
    assert_eq!(
        pwrite(&f, AlignedBuf::filled(4096, 0xab).as_ref(), 0),
        Ok(4096)
    );
    let img = s.image_bytes();
    same_bytes(&img[..1024], &[0xab; 1024], "bytes");
    same_bytes(
        &img[1024..4096],
        &expect[1024..4096],
        "the rest was never stored",
    );
    // mode = sectors: each 512-byte unit is old or new, and errno fails the write.
    assert_eq!(
        pwrite(&f, AlignedBuf::filled(32768, 0xcd).as_ref(), 32768),
        Err(libc::EIO)
    );
    let img = s.image_bytes();
    let mut kept = 0;
    for sector in 64..128 {
        let bytes = &img[sector * 512..sector * 512 + 512];
        if bytes == [0xcd; 512] {
            kept += 1;
        } else {
            assert_eq!(
                bytes,
                &expect[sector * 512..sector * 512 + 512],
                "sector {sector}"
            );
        }
    }
    // A seeded coin per sector: 64 throws, all heads or all tails has chance 2^-63.
    assert!(kept > 0 && kept < 64, "{kept} of 64 kept");
    drop(f);
    assert!(d.stop().success());
}

#[test]
fn short_reads_and_writes_return_the_count_and_move_only_that_much() {
    let s = Scratch::new(MIB);
    let d = mount(
        &s,
        &[
            "--rule",
            "short-io:length=1536,iotype=read,sectors=0-7",
            "--rule",
            "short-io:length=512,iotype=write,sectors=64-71",
        ],
    );
    let f = open_direct(&s.view());
    let expect = pattern(MIB);
    let mut b = AlignedBuf::new(4096);
    assert_eq!(pread(&f, b.as_mut(), 0), Ok(1536));
    assert_eq!(b.as_ref()[..1536], expect[..1536]);
    assert_eq!(
        pwrite(&f, AlignedBuf::filled(4096, 0x77).as_ref(), 32768),
        Ok(512)
    );
    let img = s.image_bytes();
    same_bytes(&img[32768..33280], &[0x77; 512], "bytes");
    same_bytes(&img[33280..36864], &expect[33280..36864], "bytes");
    drop(f);
    assert!(d.stop().success());
}

#[test]
fn a_misdirected_write_lands_shift_bytes_away_and_leaves_its_target() {
    let s = Scratch::new(MIB);
    let d = mount(&s, &["--rule", "misdirect-write:shift=-8k,sectors=64-71"]);
    let f = open_direct(&s.view());
    let expect = pattern(MIB);
    assert_eq!(
        pwrite(&f, AlignedBuf::filled(4096, 0x99).as_ref(), 32768),
        Ok(4096)
    );
    let img = s.image_bytes();
    same_bytes(
        &img[32768..36864],
        &expect[32768..36864],
        "aimed range unchanged",
    );
    same_bytes(&img[24576..28672], &[0x99; 4096], "found where it landed");
    // Clamped inside the image: a shift past the start lands at 0.
    ctl(&s.mnt, &["clear"]);
    ctl(&s.mnt, &["misdirect-write", "shift=-1G"]);
    assert_eq!(
        pwrite(&f, AlignedBuf::filled(512, 0x42).as_ref(), 4096),
        Ok(512)
    );
    same_bytes(&s.image_bytes()[..512], &[0x42; 512], "bytes");
    drop(f);
    assert!(d.stop().success());
}

#[test]
fn a_suspend_rule_holds_only_writes_to_its_range_until_resumed() {
    let s = Scratch::new(MIB);
    let d = mount(
        &s,
        &["--rule", "suspend:tag=w,iotype=write,sectors=128-135"],
    );
    let view = s.view();
    let writer = std::thread::spawn(move || {
        let f = open_direct(&view);
        pwrite(&f, AlignedBuf::filled(4096, 0x31).as_ref(), 65536)
    });
    ctl(&s.mnt, &["wait_break", "w", "30000"]);
    let f = open_direct(&s.view());
    // Reads of the range and writes elsewhere go on while the write is held.
    same_bytes(
        &read_at(&f, 65536, 4096).unwrap(),
        &pattern(MIB)[65536..69632],
        "bytes",
    );
    assert_eq!(
        pwrite(&f, AlignedBuf::filled(4096, 0x32).as_ref(), 0),
        Ok(4096)
    );
    assert!(ctl(&s.mnt, &["list"]).contains("tag w rule 1 write at offset 65536"));
    assert!(!writer.is_finished());
    ctl(&s.mnt, &["resume", "w"]);
    assert_eq!(writer.join().unwrap(), Ok(4096));
    same_bytes(&s.image_bytes()[65536..69632], &[0x31; 4096], "bytes");
    // Not one-shot: the next write to the range is held too.
    let view = s.view();
    let again = std::thread::spawn(move || {
        let f = open_direct(&view);
        pwrite(&f, AlignedBuf::filled(512, 0x33).as_ref(), 65536)
    });
    ctl(&s.mnt, &["wait_break", "w", "30000"]);
    ctl(&s.mnt, &["resume", "w"]);
    assert_eq!(again.join().unwrap(), Ok(512));
    drop(f);
    assert!(d.stop().success());
}

/// Which of 10,000 sequential 512-byte reads fail under `probability = 0.05` with `seed`.
fn failing_reads(seed: &str, threads: &str) -> BTreeSet<u64> {
    let s = Scratch::new(5 * MIB);
    let d = mount(
        &s,
        &[
            "--seed",
            seed,
            "--threads",
            threads,
            "--rule",
            "inject-error:iotype=read,probability=0.05",
        ],
    );
    let f = open_direct(&s.view());
    let mut b = AlignedBuf::new(512);
    let failed = (0..10_000u64)
        .filter(|i| match pread(&f, b.as_mut(), i * 512) {
            Ok(_) => false,
            Err(e) => {
                assert_eq!(e, libc::EIO);
                true
            }
        })
        .collect();
    drop(f);
    assert!(d.stop().success());
    failed
}

#[test]
fn the_same_seed_fails_the_same_requests_whatever_the_thread_count() {
    let a = failing_reads("12345", "1");
    let b = failing_reads("12345", "4");
    assert_eq!(a, b, "same seed, same requests: same failures");
    let c = failing_reads("54321", "1");
    assert_ne!(a, c, "another seed: other failures");
    // Binomial(10000, 0.05): mean 500, standard deviation 21.8. The band [400, 600] is
    // more than 4.5 deviations wide on each side (a false failure: below 1 in 100,000).
    for (name, set) in [("12345", &a), ("54321", &c)] {
        assert!(
            (400..=600).contains(&set.len()),
            "seed {name}: {}",
            set.len()
        );
    }
}

#[test]
fn the_trace_is_json_lines_with_the_fields_of_the_spec() {
    let s = Scratch::new(MIB);
    let trace = s.dir.path().join("trace.jsonl");
    let d = mount(
        &s,
        &[
            "--trace",
            trace.to_str().unwrap(),
            "--trace-all",
            "--inject-error",
            "event=read_aio,sector=8,errno=ENOSPC",
            "--set-state",
            "event=write_aio,state=1,new_state=2",
            "--rule",
            "delay:latency=1ms,iotype=flush",
        ],
    );
    let f = open_direct(&s.view());
    assert_eq!(read_at(&f, 4096, 512), Err(libc::ENOSPC));
    assert_eq!(pwrite(&f, AlignedBuf::filled(512, 1).as_ref(), 0), Ok(512));
    fsync(&f).unwrap();
    drop(f);
    assert!(d.stop().success());
    let lines: Vec<Value> = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_trace_fields_documented(&lines);
    let find = |action: &str| {
        lines
            .iter()
            .find(|v| v["action"] == action)
            .unwrap_or_else(|| panic!("no {action} line in {lines:?}"))
    };
    let fail = find("inject-error");
    for key in [
        "t", "req", "pid", "op", "offset", "len", "rule", "action", "errno", "armed_by", "state",
    ] {
        assert!(fail.get(key).is_some(), "{key} missing: {fail}");
    }
    assert_eq!(fail["op"], "read");
    assert_eq!(fail["offset"], 4096);
    assert_eq!(fail["errno"], "ENOSPC");
    assert_eq!(fail["armed_by"], "read_aio");
    assert_eq!(fail["rule"], 1);
    // FUSE names the calling thread.
    // SAFETY: gettid has no preconditions.
    assert_eq!(fail["pid"], unsafe { libc::gettid() });
    let state = find("set-state");
    assert_eq!(
        (state["from"].clone(), state["state"].clone()),
        (1.into(), 2.into())
    );
    let delay = find("delay");
    assert_eq!(delay["delay_us"], 1000);
    assert_eq!(delay["op"], "flush");
    // --trace-all: one line per request, with the events it fired.
    let write = lines
        .iter()
        .find(|v| v["op"] == "write" && v.get("events").is_some())
        .expect("a --trace-all line for the write");
    assert_eq!(
        write["events"],
        serde_json::json!(["write_aio", "pwritev", "pwritev_done"])
    );
    assert_eq!(write["result"], Value::Null);
    let times: Vec<f64> = lines.iter().map(|v| v["t"].as_f64().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
}

#[test]
fn fault_rules_are_managed_at_run_time_and_bad_ones_change_nothing() {
    let s = Scratch::new(MIB);
    let d = mount(&s, &[]);
    let added = ctl(&s.mnt, &["delay", "latency=5ms", "sectors=0-7"]);
    assert!(
        added.starts_with("added rule 1: standing state=any delay latency=5ms range=sectors 0-7"),
        "{added}"
    );
    let (code, _, err) = run_cli(&["ctl", s.mnt.to_str().unwrap(), "corrupt", "mode=shred"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("[corrupt] mode = \"shred\": must be one of: flip, zero, random"),
        "{err}"
    );
    let rules: Value = serde_json::from_str(ctl(&s.mnt, &["rules", "json"]).trim()).unwrap();
    assert_eq!(rules.as_array().unwrap().len(), 1, "{rules}");
    assert_eq!(rules[0]["section"], "delay");
    let status: Value = serde_json::from_str(ctl(&s.mnt, &["status", "json"]).trim()).unwrap();
    assert_eq!(status["state"], 1);
    assert!(status["seed"].is_u64());
    // The mount goes on.
    let f = open_direct(&s.view());
    same_bytes(&read_at(&f, 0, 512).unwrap(), &pattern(MIB)[..512], "bytes");
    drop(f);
    assert!(d.stop().success());
}

#[test]
fn a_bad_rule_on_the_command_line_exits_2_before_mounting_and_names_it() {
    let s = Scratch::new(MIB);
    let conf = s.config("[delay]\nlatency = 5ms\n\n[torn-write]\nkeep = 4k\nmode = sectors\n");
    let (code, _, err) = run_cli(&[
        "mount",
        s.image.to_str().unwrap(),
        s.mnt.to_str().unwrap(),
        "-c",
        conf.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(
            "rules.ini:5: [torn-write] keep = \"4k\": 'keep' applies only with mode = prefix"
        ),
        "{err}"
    );
    let (code, _, err) = run_cli(&[
        "mount",
        s.image.to_str().unwrap(),
        s.mnt.to_str().unwrap(),
        "--rule",
        "flaky:probability=1%",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("--rule #1 'flaky:probability=1%'"), "{err}");
    assert!(!is_mounted(&s.mnt));
}

/// A daemon run as root must not be aimed at another file through a link: `--trace` refuses
/// a symbolic link as `--log-file` does (it followed it and truncated the target before).
#[test]
fn the_trace_never_follows_a_symbolic_link() {
    let s = Scratch::new(MIB);
    let target = s.dir.path().join("precious");
    std::fs::write(&target, b"keep me").unwrap();
    let link = s.dir.path().join("trace.jsonl");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let (code, _, err) = run_cli(&[
        "mount",
        s.image.to_str().unwrap(),
        s.mnt.to_str().unwrap(),
        "--trace",
        link.to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot create the trace"), "{err}");
    assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    assert!(!is_mounted(&s.mnt));
}

/// `check | head` must end quietly when head stops reading (it panicked: "failed printing to
/// stdout: Broken pipe").
#[test]
fn a_printing_command_ends_quietly_when_its_reader_goes_away() {
    // Far more than a pipe holds (64 KiB), so the writer meets the closed pipe.
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("many.ini");
    std::fs::write(
        &conf,
        "[inject-error]\nevent = read_aio\nsector = 8\n".repeat(5000),
    )
    .unwrap();
    let script = format!("'{BIN}' check -c '{}' | head -n 1", conf.display());
    let (code, out, err) = run_tool("sh", &["-c", &script]);
    assert_eq!(code, 0);
    assert!(out.starts_with("rule   1: "), "{out}");
    assert!(!err.contains("panicked"), "{err}");
}
