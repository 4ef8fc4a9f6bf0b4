//! What a new user stumbled on (issue 15 §3), each through a real mount or the real CLI: a
//! standing delay no longer hides a rule added later, `ctl` places a rule, a `[power-cut]`
//! rule cuts once, ranges as lists and in bytes on the command line, the rules that are
//! refused or warned about, and the messages that name the real problem.

use std::path::Path;

use serde_json::Value;

use crate::util::*;

/// `ctl MNT rules json`, parsed: (number, section, hits) in the order of checks.
fn rules(mnt: &Path) -> Vec<(u64, String, u64)> {
    let v: Value = serde_json::from_str(ctl(mnt, &["rules", "json"]).trim()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_u64().unwrap(),
                r["section"].as_str().unwrap().to_string(),
                r["hits"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_standing_delay_does_not_hide_a_suspend_added_later() {
    let s = Scratch::new(MIB);
    let d = mount(&s, &["--rule", "delay:latency=1ms,iotype=write"]);
    let added = ctl(&s.mnt, &["suspend", "tag=S,iotype=write"]);
    assert!(added.starts_with("added rule 2"), "{added}");
    let view = s.view();
    let writer = std::thread::spawn(move || {
        let f = open_direct(&view);
        pwrite(&f, AlignedBuf::filled(4096, 0x5a).as_ref(), 8192)
    });
    // The write is delayed, then parked by the suspend rule (it never fired before).
    ctl(&s.mnt, &["wait_break", "S", "20000"]);
    assert!(!writer.is_finished());
    assert!(ctl(&s.mnt, &["list"]).contains("tag S rule 2 write at offset 8192"));
    ctl(&s.mnt, &["resume", "S"]);
    assert_eq!(writer.join().unwrap(), Ok(4096));
    same_bytes(&s.image_bytes()[8192..12288], &[0x5a; 4096], "bytes");
    // Each rule counted the write once.
    assert_eq!(
        rules(&s.mnt),
        vec![(1, "delay".into(), 1), (2, "suspend".into(), 1)]
    );
    assert!(d.stop().success());
}

#[test]
fn ctl_places_a_rule_first_or_before_rule_n() {
    let s = Scratch::new(MIB);
    let d = mount(
        &s,
        &[
            "--rule",
            "inject-error:errno=ENOSPC,iotype=read",
            "--rule",
            "drop-write:",
        ],
    );
    let added = ctl(
        &s.mnt,
        &["inject-error", "errno=EROFS,iotype=read", "first"],
    );
    assert!(
        added.starts_with("added rule 3 (checked first): "),
        "{added}"
    );
    let f = open_direct(&s.view());
    let mut b = AlignedBuf::new(512);
    assert_eq!(pread(&f, b.as_mut(), 0), Err(libc::EROFS));
    let added = ctl(&s.mnt, &["inject-error", "errno=EIO,iotype=write,before=2"]);
    assert!(
        added.starts_with("added rule 4 (checked before rule 2): "),
        "{added}"
    );
    assert_eq!(
        pwrite(&f, AlignedBuf::filled(512, 1).as_ref(), 0),
        Err(libc::EIO)
    );
    let order: Vec<u64> = rules(&s.mnt).iter().map(|r| r.0).collect();
    assert_eq!(order, vec![3, 1, 4, 2], "listed in the order of checks");
    // A delay placed first composes with the error after it: delayed, then failed.
    ctl(&s.mnt, &["delay", "latency=1ms,iotype=read", "first"]);
    assert_eq!(pread(&f, b.as_mut(), 0), Err(libc::EROFS));
    let hits: Vec<(u64, u64)> = rules(&s.mnt).iter().map(|r| (r.0, r.2)).collect();
    assert_eq!(hits[..2], [(5, 1), (3, 2)], "{hits:?}");
    let (code, _, err) = run_cli(&["ctl", s.mnt.to_str().unwrap(), "drop-write", "before=99"]);
    assert_eq!(code, 1);
    assert!(err.contains("no rule 99"), "{err}");
    drop(f);
    assert!(d.stop().success());
}

#[test]
fn a_power_cut_rule_cuts_once_unless_count_or_every_say_otherwise() {
    let s = Scratch::new(MIB);
    let d = mount(
        &s,
        &[
            "--write-cache",
            "--rule",
            "power-cut:event=flush_to_disk,skip=1",
        ],
    );
    let f = open_direct(&s.view());
    let write_and_sync = |b: u8| {
        assert_eq!(pwrite(&f, AlignedBuf::filled(512, b).as_ref(), 0), Ok(512));
        fsync(&f)
    };
    assert_eq!(write_and_sync(1), Ok(0));
    assert_eq!(write_and_sync(2), Err(libc::EIO), "the second flush cuts");
    ctl(&s.mnt, &["power-on"]);
    // After power-on the device stays on: the rule cut once and is gone.
    for b in 3..6 {
        assert_eq!(write_and_sync(b), Ok(0));
    }
    assert!(ctl(&s.mnt, &["rules"]).trim() == "no rules");
    drop(f);
    assert!(d.stop().success());
    // `every` (or `count`) keeps it: it cuts at every second flush.
    let d = mount(
        &s,
        &[
            "--write-cache",
            "--rule",
            "power-cut:event=flush_to_disk,every=2",
        ],
    );
    let f = open_direct(&s.view());
    for round in 0..2 {
        assert_eq!(pwrite(&f, AlignedBuf::filled(512, 7).as_ref(), 0), Ok(512));
        assert_eq!(fsync(&f), Ok(0), "round {round}");
        assert_eq!(pwrite(&f, AlignedBuf::filled(512, 8).as_ref(), 0), Ok(512));
        assert_eq!(fsync(&f), Err(libc::EIO), "round {round}");
        ctl(&s.mnt, &["power-on"]);
    }
    drop(f);
    assert!(d.stop().success());
}

#[test]
fn ranges_are_lists_with_plus_and_byte_ranges_with_sizes_on_the_command_line() {
    let (code, out, err) = run_cli(&[
        "check",
        "--rule",
        "delay:latency=5ms,sectors=2048-2055+10000",
        "--rule",
        "drop-write:range=0-64M",
        "--rule",
        "corrupt:range=1000-1025+4k-8k",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("range=sectors 2048-2055,10000 "), "{out}");
    // The first 64 MiB, and exactly the sectors a byte range touches.
    assert!(out.contains("range=sectors 0-131071 "), "{out}");
    assert!(out.contains("range=sectors 1-2,8-15 "), "{out}");
    // A comma between ranges: the error names the real problem and the rule.
    let (code, _, err) = run_cli(&[
        "check",
        "--inject-error",
        "event=read_aio",
        "--rule",
        "delay:latency=5ms,sectors=2048-2055,10000",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--rule #1 'delay:latency=5ms,sectors=2048-2055,10000': [delay] \"10000\": not KEY=VALUE")
            && err.contains("joined with '+'"),
        "{err}"
    );
    for (rule, needle) in [
        ("delay:latency=5ms,range=64M", "'64M' is not a byte range"),
        (
            "delay:latency=5ms,range=8k-4k",
            "'8k-4k' ends before it starts",
        ),
        (
            "delay:latency=5ms,range=0-4k,sectors=8",
            "give one of 'sector'",
        ),
    ] {
        let (code, _, err) = run_cli(&["check", "--rule", rule]);
        assert_eq!(code, 2, "{rule}");
        assert!(err.contains(needle), "{rule}: {err}");
    }
}

#[test]
fn ctl_takes_range_lists_and_byte_ranges() {
    let s = Scratch::new(MIB);
    let d = mount(&s, &[]);
    let added = ctl(
        &s.mnt,
        &[
            "inject-error",
            "errno=ENOSPC,iotype=read,range=4k-8k+12k-16k",
        ],
    );
    assert!(added.contains("range=sectors 8-15,24-31 "), "{added}");
    ctl(&s.mnt, &["drop-write", "sectors=0-0+100"]);
    let f = open_direct(&s.view());
    let mut b = AlignedBuf::new(4096);
    for (off, want) in [(0, Ok(4096)), (4096, Err(libc::ENOSPC)), (8192, Ok(4096))] {
        assert_eq!(pread(&f, b.as_mut(), off), want, "read at {off}");
    }
    assert_eq!(pread(&f, b.as_mut(), 12288), Err(libc::ENOSPC));
    let (code, _, err) = run_cli(&[
        "ctl",
        s.mnt.to_str().unwrap(),
        "drop-write",
        "sectors=0-7,9",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("\"9\": not KEY=VALUE"), "{err}");
    drop(f);
    assert!(d.stop().success());
}

#[test]
fn a_key_given_twice_in_our_sections_is_an_error_and_qemus_keep_the_last() {
    let s = Scratch::new(4096);
    let conf = s.config("[delay]\nlatency = 5ms\niotype = read\nlatency = 50ms\n");
    let (code, _, err) = run_cli(&["check", "-c", conf.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains(
            "rules.ini:4: [delay] latency = \"50ms\": the key is given twice in this section \
             (first on line 2)"
        ),
        "{err}"
    );
    let (code, _, err) = run_cli(&["check", "--rule", "corrupt:iotype=read,iotype=write"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--rule #1") && err.contains("given twice"),
        "{err}"
    );
    // QEMU's [inject-error] keeps the last value, as QEMU does.
    let conf = s.config("[inject-error]\nevent = read_aio\nerrno = 5\nerrno = 28\n");
    let (code, out, err) = run_cli(&["check", "-c", conf.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("errno=ENOSPC (28)"), "{out}");
}

#[test]
fn a_rule_that_can_never_act_is_refused_or_warned_about() {
    // A flush has no range: refused in our sections, a warning on QEMU's [inject-error].
    let (code, _, err) = run_cli(&[
        "check",
        "--rule",
        "delay:latency=5ms,iotype=flush,sectors=0-7",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("[delay] iotype = \"flush\": a flush has no range"),
        "{err}"
    );
    let (code, out, err) = run_cli(&[
        "check",
        "--inject-error",
        "event=flush_to_disk,iotype=flush,sector=8",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(
            "warning: rule 1 (--inject-error #1): iotype=flush with a range never matches"
        ),
        "{out}"
    );
    // A range past the image's end: a warning at mount, and in the reply to ctl.
    let s = Scratch::new(MIB);
    let d = mount(
        &s,
        &[
            "--rule",
            "drop-write:range=1M-2M",
            "--rule",
            "drop-write:sectors=0-7+4096",
        ],
    );
    let warned = |d: &Daemon| {
        d.stderr().contains("rule 1 (--rule #1): its range (sectors 2048-4095) starts at byte 1048576, at or past the image's end (1048576 bytes)")
    };
    assert!(wait_for(DEADLINE, || warned(&d)), "{}", d.stderr());
    assert!(!d.stderr().contains("rule 2"), "{}", d.stderr());
    let reply = ctl(&s.mnt, &["corrupt", "sector=2048"]);
    assert!(
        reply.contains("warning: its range (sector 2048 (byte 1048576)) starts at byte 1048576"),
        "{reply}"
    );
    assert!(d.stop().success());
}

#[test]
fn check_refuses_a_power_cut_rule_without_write_cache_like_mount() {
    let rule = "power-cut:event=flush_to_disk,skip=150";
    let (code, _, err) = run_cli(&["check", "--rule", rule]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--rule #1: [power-cut]: a power cut needs the write-cache model: mount with --write-cache"),
        "{err}"
    );
    let (code, out, err) = run_cli(&["check", "--write-cache", "--rule", rule]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("power-cut mode=lose once=on skip=150"),
        "{out}"
    );
}

#[test]
fn messages_say_section_name_the_real_problem_and_end_with_the_errno_name() {
    let s = Scratch::new(MIB);
    for (text, needle) in [
        ("[flaky]\n", "[flaky]: unknown section (expected"),
        ("latency = 5ms\n", "key before any [section] header"),
        (
            "[delay]\nlatncy = 5ms\n",
            "unknown key (this section takes: ",
        ),
        (
            "[bad-sectors]\nerrno = EIO\n",
            "give 'sectors' (a range list) or 'file' (a badblocks list)",
        ),
        (
            "[bad-sectors]\nfile = missing.txt\n",
            "[bad-sectors] file = \"missing.txt\": cannot read the bad-sector list: ",
        ),
    ] {
        let conf = s.config(text);
        let (code, _, err) = run_cli(&["check", "-c", conf.to_str().unwrap()]);
        assert_eq!(code, 2, "{text}");
        assert!(err.contains(needle), "{text}: {err}");
        assert!(
            !err.contains("group") && !err.contains("config file"),
            "{text}: {err}"
        );
    }
    // --rule errors name the rule by its flag and number, whatever came before it.
    let (code, _, err) = run_cli(&[
        "check",
        "--inject-error",
        "event=read_aio",
        "--rule",
        "bad-sectors:errno=EIO",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--rule #1 'bad-sectors:errno=EIO': [bad-sectors]"),
        "{err}"
    );

    let d = mount(&s, &["--write-cache"]);
    let mnt = s.mnt.to_str().unwrap();
    let (code, _, err) = run_cli(&["ctl", mnt, "power-cut", "event=flush_to_disk"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("rules go in a [power-cut] section") && err.trim_end().ends_with("(EINVAL)"),
        "{err}"
    );
    let (code, _, err) = run_cli(&["ctl", mnt, "remove", "7"]);
    assert_eq!(code, 1);
    assert!(err.trim_end().ends_with("no rule 7 (ENOENT)"), "{err}");
    assert!(!err.contains("os error"), "{err}");
    let help = ctl(&s.mnt, &["help"]);
    let resume_all = help.lines().find(|l| l.starts_with("resume_all")).unwrap();
    assert!(resume_all.contains("end every delay"), "{resume_all}");
    assert!(d.stop().success());
}
