//! The media model through real mounts (`spec/faults.md` §4, §5): the write cache and power
//! cuts at the byte level, `[power-cut]` rules, and bad sectors that heal on rewrite.

use std::io::{Read, Write};
use std::path::Path;

use serde_json::Value;

use crate::util::*;

/// Sends one command through `MNT/.control` from this process: `Ok(reply)` or
/// `Err(reason)`. Not `util::ctl`: spawning a process while the view is open makes the
/// child's close-on-exec of the inherited descriptor send a FLUSH, which would make the
/// unsynced writes these tests count durable.
fn control(mnt: &Path, words: &[&str]) -> Result<String, String> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(mnt.join(".control"))
        .expect("open .control");
    let written = f.write(words.join(" ").as_bytes());
    let mut reply = String::new();
    f.read_to_string(&mut reply).expect("read the reply");
    match written {
        Ok(_) => Ok(reply),
        Err(_) => Err(reply),
    }
}

/// [`control`], which must succeed.
#[track_caller]
pub(crate) fn ctl(mnt: &Path, words: &[&str]) -> String {
    control(mnt, words).unwrap_or_else(|e| panic!("{words:?} failed: {e}"))
}

/// [`control`], which must fail: the reason.
#[track_caller]
fn ctl_fails(mnt: &Path, words: &[&str]) -> String {
    match control(mnt, words) {
        Ok(reply) => panic!("{words:?} should fail, said: {reply}"),
        Err(e) => e,
    }
}

#[test]
fn a_power_cut_loses_exactly_the_writes_since_the_last_successful_flush() {
    let s = Scratch::new(MIB);
    let trace = s.dir.path().join("trace.jsonl");
    let d = mount(&s, &["--write-cache", "--trace", trace.to_str().unwrap()]);
    let f = open_direct(&s.view());
    let expect = pattern(MIB);
    assert_eq!(
        pwrite(&f, AlignedBuf::filled(4096, 0xa1).as_ref(), 0),
        Ok(4096)
    );
    fsync(&f).unwrap();
    assert_eq!(ctl(&s.mnt, &["unsynced"]).trim(), "nothing unsynced");
    assert_eq!(
        pwrite(&f, AlignedBuf::filled(4096, 0xb2).as_ref(), 0),
        Ok(4096)
    );
    assert_eq!(
        pwrite(&f, AlignedBuf::filled(8192, 0xc3).as_ref(), 65536),
        Ok(8192)
    );
    // Reads see the newest data.
    same_bytes(&read_at(&f, 0, 4096).unwrap(), &[0xb2; 4096], "newest data");
    let unsynced = ctl(&s.mnt, &["unsynced"]);
    assert_eq!(
        unsynced.trim(),
        "2 unsynced write(s), 12288 bytes, in sectors 0-7,128-143"
    );
    let cut = ctl(&s.mnt, &["power-cut"]);
    assert!(
        cut.starts_with("power cut (lose, seed ")
            && cut.contains("2 unsynced write(s): 2 lost [0+4096, 65536+8192]"),
        "{cut}"
    );
    // Off: every request fails and fires nothing; the image is the crash image now.
    assert_eq!(read_at(&f, 0, 512), Err(libc::EIO));
    assert_eq!(
        pwrite(&f, AlignedBuf::filled(512, 1).as_ref(), 0),
        Err(libc::EIO)
    );
    assert_eq!(fsync(&f), Err(libc::EIO));
    let img = s.image_bytes();
    same_bytes(&img[..4096], &[0xa1; 4096], "the flushed write stays");
    same_bytes(
        &img[4096..],
        &expect[4096..],
        "the unsynced writes are gone",
    );
    assert!(ctl(&s.mnt, &["stats"]).contains("power off"));
    assert_eq!(ctl(&s.mnt, &["power-on"]).trim(), "power on");
    same_bytes(
        &read_at(&f, 65536, 8192).unwrap(),
        &expect[65536..73728],
        "old bytes",
    );
    drop(f);
    assert!(d.stop().success());
    let lines: Vec<Value> = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_trace_fields_documented(&lines);
    let cut = lines
        .iter()
        .find(|v| v["action"] == "power-cut")
        .expect("a power-cut line");
    assert_eq!(cut["lost"], serde_json::json!([[0, 4096], [65536, 8192]]));
    assert!(lines.iter().any(|v| v["action"] == "power-on"));
}

#[test]
fn a_flush_failed_by_a_rule_makes_nothing_durable() {
    let s = Scratch::new(MIB);
    let d = mount(
        &s,
        &[
            "--write-cache",
            "--rule",
            "inject-error:iotype=flush,count=1",
        ],
    );
    let f = open_direct(&s.view());
    assert_eq!(
        pwrite(&f, AlignedBuf::filled(4096, 0x5e).as_ref(), 0),
        Ok(4096)
    );
    // Linux's "fsync failed, data gone": the failed flush made nothing durable.
    assert_eq!(fsync(&f), Err(libc::EIO));
    assert!(ctl(&s.mnt, &["unsynced"]).starts_with("1 unsynced write(s)"));
    ctl(&s.mnt, &["power-cut", "lose", "on"]);
    same_bytes(
        &read_at(&f, 0, 4096).unwrap(),
        &pattern(MIB)[..4096],
        "lost",
    );
    // The next flush succeeds (count = 1) and makes a new write durable.
    assert_eq!(
        pwrite(&f, AlignedBuf::filled(4096, 0x6f).as_ref(), 0),
        Ok(4096)
    );
    fsync(&f).unwrap();
    ctl(&s.mnt, &["power-cut", "lose", "on"]);
    same_bytes(&read_at(&f, 0, 4096).unwrap(), &[0x6f; 4096], "durable");
    drop(f);
    assert!(d.stop().success());
}

#[test]
fn keep_random_and_sectors_cuts_are_seeded_and_whole_sectors() {
    let run = |mode: &str, seed: &str| {
        let s = Scratch::new(MIB);
        let d = mount(&s, &["--write-cache"]);
        let f = open_direct(&s.view());
        for i in 0..32u64 {
            let data = AlignedBuf::filled(4096, 0x80 + i as u8);
            assert_eq!(pwrite(&f, data.as_ref(), i * 8192), Ok(4096));
        }
        let cut = ctl(&s.mnt, &["power-cut", mode, &format!("seed={seed}")]);
        drop(f);
        assert!(d.stop().success());
        (cut, s.image_bytes())
    };
    let (cut, img) = run("keep", "1");
    assert!(
        cut.contains("32 unsynced write(s): 0 lost, 32 kept"),
        "{cut}"
    );
    assert!((0..32usize).all(|i| img[i * 8192] == 0x80 + i as u8));
    let expect = pattern(MIB);
    for mode in ["random", "sectors"] {
        let (cut_a, img_a) = run(mode, "9");
        let (cut_b, img_b) = run(mode, "9");
        assert_eq!(cut_a, cut_b, "{mode}: same seed, same cut");
        assert!(img_a == img_b, "{mode}: same seed, same crash image");
        let (cut_c, _) = run(mode, "10");
        // What was lost and kept, without the seed the summary starts with.
        let outcome = |cut: &str| cut.split_once("): ").map(|(_, o)| o.to_string());
        assert_ne!(
            outcome(&cut_a),
            outcome(&cut_c),
            "{mode}: another seed, another cut"
        );
        // Each sector is old or new, never a mix.
        for sector in 0..(MIB / 512) {
            let bytes = &img_a[sector * 512..sector * 512 + 512];
            let write = sector / 16;
            let new = sector % 16 < 8 && bytes.iter().all(|b| *b == 0x80 + write as u8);
            let old = bytes == &expect[sector * 512..sector * 512 + 512];
            assert!(new || old, "{mode}: sector {sector} is neither old nor new");
        }
    }
}

#[test]
fn a_power_cut_rule_cuts_at_the_nth_firing_and_fails_that_request() {
    let s = Scratch::new(MIB);
    let d = mount(
        &s,
        &[
            "--write-cache",
            "--rule",
            "power-cut:event=flush_to_disk,skip=2,once=on",
        ],
    );
    let f = open_direct(&s.view());
    for i in 0..2u8 {
        assert_eq!(
            pwrite(&f, AlignedBuf::filled(512, i + 1).as_ref(), 0),
            Ok(512)
        );
        fsync(&f).unwrap();
    }
    assert_eq!(pwrite(&f, AlignedBuf::filled(512, 9).as_ref(), 0), Ok(512));
    // The third flush_to_disk: the power goes before the flush, which fails.
    assert_eq!(fsync(&f), Err(libc::EIO));
    assert_eq!(
        s.image_bytes()[0],
        2,
        "the second write was flushed, the third lost"
    );
    assert!(ctl(&s.mnt, &["stats"]).contains("power off"));
    let rules = ctl(&s.mnt, &["rules"]);
    assert_eq!(rules.trim(), "no rules", "once: the rule is gone");
    ctl(&s.mnt, &["power-on"]);
    assert_eq!(read_at(&f, 0, 512).unwrap(), vec![2; 512]);
    drop(f);
    assert!(d.stop().success());
}

#[test]
fn power_cuts_need_the_write_cache() {
    let s = Scratch::new(MIB);
    let d = mount(&s, &[]);
    for words in [&["power-cut"][..], &["power-on"], &["unsynced"]] {
        let err = ctl_fails(&s.mnt, words);
        assert!(err.contains("mount with --write-cache"), "{err}");
    }
    assert!(d.stop().success());
    let (code, _, err) = run_cli(&[
        "mount",
        s.image.to_str().unwrap(),
        s.mnt.to_str().unwrap(),
        "--rule",
        "power-cut:event=flush_to_disk",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("[power-cut]") && err.contains("--write-cache"),
        "{err}"
    );
    // The page cache would serve what a cut lost: the two do not go together.
    let (code, _, err) = run_cli(&[
        "mount",
        s.image.to_str().unwrap(),
        s.mnt.to_str().unwrap(),
        "--write-cache",
        "--cache",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--write-cache needs every read to reach the daemon"),
        "{err}"
    );
    assert!(!is_mounted(&s.mnt));
}

/// `kill -9` of the daemon leaves every acknowledged write on the image (the `keep` crash
/// image): the journal only ever holds before-images.
#[test]
fn a_killed_daemon_leaves_every_acknowledged_write_on_the_image() {
    let s = Scratch::new(MIB);
    let d = mount(&s, &["--write-cache"]);
    let f = open_direct(&s.view());
    assert_eq!(
        pwrite(&f, AlignedBuf::filled(4096, 0x11).as_ref(), 4096),
        Ok(4096)
    );
    assert_eq!(
        pwrite(&f, AlignedBuf::filled(4096, 0x22).as_ref(), 8192),
        Ok(4096)
    );
    drop(f);
    d.signal(libc::SIGKILL);
    drop(d);
    let img = s.image_bytes();
    same_bytes(
        &img[4096..12288],
        &[[0x11; 4096], [0x22; 4096]].concat(),
        "kept",
    );
    let leftovers: Vec<_> = std::fs::read_dir(s.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "no journal left behind: {leftovers:?}"
    );
}

#[test]
fn a_bad_sector_fails_reads_until_it_is_rewritten_then_reads_the_new_data() {
    let s = Scratch::new(MIB);
    let list = s.dir.path().join("bad.txt");
    std::fs::write(&list, "# badblocks -b 512 output\n100\n200-203\n").unwrap();
    let conf = s.config(&format!(
        "[bad-sectors]\nsectors = \"8\"\nfile = \"{}\"\nerrno = \"ENODATA\"\n",
        list.display()
    ));
    let trace = s.dir.path().join("trace.jsonl");
    let d = mount(
        &s,
        &[
            "-c",
            conf.to_str().unwrap(),
            "--trace",
            trace.to_str().unwrap(),
        ],
    );
    let f = open_direct(&s.view());
    assert_eq!(
        ctl(&s.mnt, &["bad", "list"]).trim(),
        "6 bad sector(s) in 3 range(s): 8,100,200-203 (errno ENODATA (61), heal-on-write on, write-errno 0 (no error))"
    );
    // A read covering a bad sector fails as a whole; beside it reads work.
    assert_eq!(read_at(&f, 0, 8192), Err(libc::ENODATA));
    assert_eq!(read_at(&f, 0, 4096).unwrap(), pattern(MIB)[..4096].to_vec());
    // A write covering part of a bad sector fails (the disk would have to read it).
    let g = open_rw(&s.view());
    assert_eq!(pwrite(&g, &[0x77; 100], 8 * 512 + 100), Err(libc::ENODATA));
    drop(g);
    // A write of the whole sector stores it and heals it.
    assert_eq!(
        pwrite(&f, AlignedBuf::filled(512, 0x77).as_ref(), 8 * 512),
        Ok(512)
    );
    assert_eq!(read_at(&f, 8 * 512, 512).unwrap(), vec![0x77; 512]);
    assert_eq!(read_at(&f, 0, 8192).unwrap()[4096..4608], [0x77; 512]);
    assert_eq!(
        ctl(&s.mnt, &["bad", "list"]).trim(),
        "5 bad sector(s) in 2 range(s): 100,200-203 (errno ENODATA (61), heal-on-write on, write-errno 0 (no error))"
    );
    // Run-time changes; the bad set is media: `clear` of the rules leaves it alone.
    ctl(&s.mnt, &["bad", "add", "300-301"]);
    ctl(&s.mnt, &["bad", "remove", "200-203"]);
    ctl(&s.mnt, &["clear"]);
    assert!(
        ctl(&s.mnt, &["bad", "list"]).starts_with("3 bad sector(s) in 2 range(s): 100,300-301")
    );
    assert_eq!(read_at(&f, 300 * 512, 512), Err(libc::ENODATA));
    assert_eq!(
        read_at(&f, 200 * 512, 512).unwrap(),
        pattern(MIB)[200 * 512..201 * 512].to_vec()
    );
    let st: Value = serde_json::from_str(ctl(&s.mnt, &["stats", "json"]).trim()).unwrap();
    assert_eq!(st["faults"]["bad-sector"], 3, "{st}");
    assert_eq!(ctl(&s.mnt, &["bad", "clear"]).trim(), "no bad sectors");
    assert_eq!(read_at(&f, 300 * 512, 512).unwrap().len(), 512);
    drop(f);
    assert!(d.stop().success());
    let text = std::fs::read_to_string(&trace).unwrap();
    let bad: Value = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["action"] == "bad-sector")
        .expect("a bad-sector line");
    assert_eq!(
        (bad["sector"].clone(), bad["errno"].clone()),
        (8.into(), "ENODATA".into())
    );
}

#[test]
fn a_million_bad_sectors_load_and_bad_input_is_refused() {
    let s = Scratch::new(MIB);
    let list = s.dir.path().join("many.txt");
    let text: String = (0..1_000_000u64)
        .map(|i| format!("{}\n", 4096 + 2 * i))
        .collect();
    std::fs::write(&list, text).unwrap();
    let conf = s.config(&format!("[bad-sectors]\nfile = \"{}\"\n", list.display()));
    let (code, out, err) = run_cli(&["check", "-c", conf.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("bad sectors: 1000000 sector(s) in 1000000 range(s)"),
        "{out}"
    );
    std::fs::write(&list, "12\nbogus\n").unwrap();
    let (code, _, err) = run_cli(&["check", "-c", conf.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("many.txt:2: 'bogus' is not a sector or a range"),
        "{err}"
    );
    let d = mount(&s, &[]);
    let err = ctl_fails(&s.mnt, &["bad", "add", "9-3"]);
    assert!(err.contains("ends before it starts"), "{err}");
    assert!(d.stop().success());
}
