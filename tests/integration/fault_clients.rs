//! Real clients seeing the faults of spec/faults.md §3 (fio verify, SQLite on ext4): each
//! test checks what the client's user would check (fio's verify report, SQLite's
//! `integrity_check`) and that the fault is where the rule put it.
//!
//! Kernel-side objects (loop devices, filesystem mounts) are held by the RAII guards of
//! `util.rs`, declared after the daemon so that they are released before it stops.

use std::path::Path;

use crate::util::*;

/// fio's options for a sequential 4 KiB write job over the view that stamps every block with a
/// header and a crc32c of its data. `--verify_state_save=0`: no state file in the working
/// directory.
const FIO_WRITE_CRC32C: [&str; 3] = ["--rw=write", "--verify=crc32c", "--verify_state_save=0"];

/// Writes the job's blocks, then reads them back and verifies them (fio's usual write job).
fn fio_write_and_verify(view: &Path) -> (i32, String) {
    fio(
        view,
        "psync",
        &[&FIO_WRITE_CRC32C[..], &["--do_verify=1"]].concat(),
    )
}

/// Only the verify pass of the same job: reads the blocks a previous run wrote and checks them.
fn fio_verify_only(view: &Path) -> (i32, String) {
    fio(
        view,
        "psync",
        &[&FIO_WRITE_CRC32C[..], &["--verify_only"]].concat(),
    )
}

/// The rule number in `ctl`'s reply `added rule N: ...`.
fn added_rule(reply: &str) -> String {
    reply
        .strip_prefix("added rule ")
        .and_then(|r| r.split(':').next())
        .unwrap_or_else(|| panic!("not an `added rule N:` reply: {reply}"))
        .to_string()
}

#[test]
fn fio_crc32c_verify_reports_a_corrupted_read_in_the_block_the_rule_covers() {
    let s = Scratch::new(4 * MIB);
    let view = s.view();
    let d = mount(&s, &["--seed", "42"]);
    let (code, out) = fio_write_and_verify(&view);
    assert_eq!(code, 0, "fio write and verify, no rules:\n{out}");
    let written = s.image_bytes();
    let (code, out) = fio_verify_only(&view);
    assert_eq!(code, 0, "fio verify, no rules:\n{out}");

    // The fio block at 1 MiB is sectors 2048-2055; its header is in sector 2048, so a bit
    // flipped in 2049-2055 is in the data the crc32c covers: certain to be a CRC mismatch.
    let reply = ctl(
        &s.mnt,
        &["corrupt", "iotype=read,sectors=2049-2055,mode=flip,bits=1"],
    );
    let rule = added_rule(&reply);
    let (code, out) = fio_verify_only(&view);
    assert_ne!(code, 0, "fio verify should fail with the rule:\n{out}");
    let failed = format!(
        "crc32c: verify failed at file {} offset 1048576, length 4096",
        view.display()
    );
    assert!(
        out.contains(&failed) && out.contains("Received CRC"),
        "fio should report a CRC mismatch in the block at 1 MiB:\n{out}"
    );
    assert!(
        s.image_bytes() == written,
        "a corrupted read changed the image"
    );

    // The image was never damaged: without the rule the same verify passes again.
    ctl(&s.mnt, &["remove", &rule]);
    let (code, out) = fio_verify_only(&view);
    assert_eq!(code, 0, "fio verify after removing the rule:\n{out}");
    assert!(d.stop().success());
}

#[test]
fn fio_crc32c_verify_reports_dropped_writes_and_the_image_keeps_the_old_bytes() {
    const BLOCK: usize = 4096;
    let s = Scratch::new(4 * MIB);
    let view = s.view();
    let old = s.image_bytes();
    // Sectors 2048-4095 are the 4 KiB blocks 256..512; fio writes them in order with one
    // job, so every second one of them (257, 259, ..., 511) is dropped.
    let d = mount(&s, &["--rule", "drop-write:sectors=2048-4095,every=2"]);
    let (code, out) = fio_write_and_verify(&view);
    assert_ne!(code, 0, "fio verify should fail:\n{out}");
    // The first dropped block (257, at 1052672) still holds the image's old bytes, 0x31 for
    // sector 2056, where fio expects its header's magic.
    let failed = format!(
        "verify: bad magic header 3131, wanted acca at file {} offset 1052672, length 4096",
        view.display()
    );
    assert!(
        out.contains(&failed),
        "fio should report the old bytes of the block at 1052672:\n{out}"
    );
    assert!(d.stop().success());

    let img = s.image_bytes();
    let dropped = |b: usize| (256..512).contains(&b) && b % 2 == 1;
    for b in 0..4 * MIB / BLOCK {
        let (now, then) = (&img[b * BLOCK..][..BLOCK], &old[b * BLOCK..][..BLOCK]);
        if dropped(b) {
            assert!(now == then, "block {b} was dropped but the image changed");
        } else {
            assert!(
                now != then,
                "block {b} was not dropped but holds the old bytes"
            );
        }
    }
}

// ------------------------------------------------------------------------- SQLite on ext4

/// Writes back and drops the page cache (dentries and inodes too), so that the next reads of
/// the filesystem go to the loop device and through the daemon's rules. ext4 caches the
/// bytes a corrupted read returned: without this, a rule's removal would not be seen either.
fn drop_caches() {
    tool_ok("sync", &[]);
    std::fs::write("/proc/sys/vm/drop_caches", "3").expect("write /proc/sys/vm/drop_caches");
}

/// A fresh `sqlite3` process running `sql` on `db`: (exit code, stdout then stderr).
fn sqlite(db: &Path, sql: &str) -> (i32, String) {
    let (code, out, err) = run_tool("sqlite3", &[db.to_str().unwrap(), sql]);
    (code, out + &err)
}

/// The physical 4 KiB block holding logical block `logical` of `file`, from the
/// filesystem's own map.
fn physical_block(file: &Path, logical: u64) -> u64 {
    let map = tool_ok("filefrag", &["-v", "-b4096", file.to_str().unwrap()]);
    let range = |col: &str| -> Option<(u64, u64)> {
        let (a, b) = col.split_once("..")?;
        Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
    };
    // Extent lines: `N: L0.. L1: P0.. P1: LEN: ...`.
    map.lines()
        .find_map(|l| {
            let cols: Vec<&str> = l.split(':').map(str::trim).collect();
            cols[0].parse::<u64>().ok()?;
            let ((l0, l1), (p0, _)) = (range(cols.get(1)?)?, range(cols.get(2)?)?);
            if (l0..=l1).contains(&logical) {
                Some(p0 + logical - l0)
            } else {
                None
            }
        })
        .unwrap_or_else(|| panic!("logical block {logical} not in filefrag output:\n{map}"))
}

#[test]
fn sqlite_integrity_check_on_ext4_reports_a_corrupted_btree_page_until_the_rule_goes() {
    const ROWS: u32 = 5000;
    let s = Scratch::new(64 * MIB);
    // No draw matters here (the rule zeroes the whole page it covers); the seed keeps any
    // failure reproducible all the same.
    let d = mount(&s, &["--seed", "42", "--threads", "2"]);
    // Direct I/O: the loop device keeps no page cache of the view that would hide reads.
    let lo = LoopDevice::attach(&s.view(), true);
    tool_ok("mkfs.ext4", &["-q", "-F", "-b", "4096", &lo.0]);
    let fs = FsMount::mount(&lo.0, &s.dir.path().join("fs"));
    let db = fs.0.join("test.db");
    // SQLite pages the size of ext4's blocks: page P is the file's logical block P - 1.
    let create = format!(
        "PRAGMA page_size = 4096;\
         CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, body TEXT);\
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {ROWS})\
         INSERT INTO t SELECT i, printf('row %05d', i), printf('%0100d', i) FROM n;\
         CREATE INDEX t_name ON t(name);"
    );
    tool_ok("sqlite3", &[db.to_str().unwrap(), &create]);
    let (code, report) = sqlite(&db, "PRAGMA integrity_check");
    assert_eq!((code, report.trim()), (0, "ok"), "{report}");
    let root: u64 = tool_ok(
        "sqlite3",
        &[
            db.to_str().unwrap(),
            "SELECT rootpage FROM sqlite_master WHERE name = 't'",
        ],
    )
    .trim()
    .parse()
    .expect("the table's root page");
    tool_ok("sync", &[]);
    let first = physical_block(&db, root - 1) * 8;

    // Every read of the table's root page comes back as zeroes: the b-tree of all its rows
    // is unreadable, while page 1 (the schema) is intact, so SQLite opens the database and
    // its integrity check is what finds the damage.
    let reply = ctl(
        &s.mnt,
        &[
            "corrupt",
            &format!(
                "iotype=read,sectors={first}-{},mode=zero,bytes=4096",
                first + 7
            ),
        ],
    );
    let rule = added_rule(&reply);
    drop_caches();
    let (code, report) = sqlite(&db, "PRAGMA integrity_check");
    assert!(
        report.trim() != "ok" && report.contains(&format!("Page {root}: ")),
        "integrity_check should report the table's root page {root} (exit {code}):\n{report}\n\
         rules: {}",
        ctl(&s.mnt, &["rules"])
    );

    // Only the bytes read were damaged: without the rule (and the cached bad page) the
    // database is whole.
    ctl(&s.mnt, &["remove", &rule]);
    drop_caches();
    let (code, report) = sqlite(&db, "PRAGMA integrity_check");
    assert_eq!(
        (code, report.trim()),
        (0, "ok"),
        "after removing the rule:\n{report}"
    );
    let (code, count) = sqlite(&db, "SELECT count(*) FROM t NOT INDEXED");
    assert_eq!(
        (code, count.trim()),
        (0, ROWS.to_string().as_str()),
        "{count}"
    );

    fs.unmount();
    drop(lo);
    assert!(d.stop().success());
}
