//! `blkdebugfs explore` (`spec/explore.md`): the known-answer table of §5 through real
//! mounts (ext4 on loop devices, Debian's `sqlite3`), determinism (the same recording and
//! seed give the same states and the same first failure; `--image-out` twice gives the
//! same bytes; two shards make the whole), `mount --record` with marks, and bad input.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::*;

/// A 64 MiB image in a temporary directory, and the scripts the tests write there.
struct Bench {
    dir: tempfile::TempDir,
}

impl Bench {
    fn new() -> Bench {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        Bench { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn image(&self) -> String {
        self.path("disk.img").display().to_string()
    }

    /// Writes `text` to a script `name`; returns `sh PATH`.
    fn script(&self, name: &str, text: &str) -> String {
        std::fs::write(self.path(name), text).unwrap();
        format!("sh {}", self.path(name).display())
    }
}

/// The setup every ext4 scenario uses: a fresh filesystem holding `config` = version 0.
const EXT4_SETUP: &str = r#"set -e
mkfs.ext4 -q -F "$BLKDEBUGFS_DEV"
m=$(mktemp -d)
mount "$BLKDEBUGFS_DEV" "$m"
echo "version 0" > "$m/config"
umount "$m"
rmdir "$m"
"#;

/// Rewrites `config` five times by write-temp-then-rename, without any fsync.
const UNSAFE_UPDATE: &str = r#"set -e
for i in 1 2 3 4 5; do
  echo "version $i" > config.tmp
  mv config.tmp config
done
# Past ext4's commit interval: the renames reach the journal, the data does not.
sleep 2
"#;

/// The fixed update: fsync of the file, rename, fsync of the directory; then a mark (the
/// update is acknowledged), through `ctl` and through `.control` in turns.
const SAFE_UPDATE: &str = r#"set -e
for i in 1 2 3 4 5 6; do
  echo "version $i" > config.tmp
  sync config.tmp
  mv config.tmp config
  sync .
  if [ $((i % 2)) = 0 ]; then
    blkdebugfs ctl "$BLKDEBUGFS_MNT" mark "$i"
  else
    echo "mark $i" > "$BLKDEBUGFS_MNT/.control"
  fi
done
"#;

/// `config` holds a version, and at least the last acknowledged one.
const CONFIG_CHECK: &str = r#"v=$(sed -n 's/^version //p' config 2>/dev/null)
[ -n "$v" ] || { echo "config is empty or missing"; exit 1; }
acked=${BLKDEBUGFS_ACKED:-0}
[ "$v" -ge "$acked" ] || { echo "config is version $v, but version $acked was acknowledged"; exit 1; }
"#;

/// Runs `blkdebugfs explore ARGS` with `blkdebugfs` on the PATH (the workloads call `ctl`).
fn explore(args: &[&str]) -> (i32, String, String) {
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new(BIN);
    cmd.arg("explore").args(args).env("PATH", path);
    let out = output(&mut cmd, "blkdebugfs explore");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An ext4 run of `workload` with `fs`, checked by [`CONFIG_CHECK`].
fn ext4_run(b: &Bench, fs: &str, workload: &str, extra: &[&str]) -> (i32, String, String) {
    let check = b.script("check.sh", CONFIG_CHECK);
    ext4_run_with_check(b, fs, workload, &check, extra)
}

/// An ext4 run of `workload` with `fs`, checked by `check`.
fn ext4_run_with_check(
    b: &Bench,
    fs: &str,
    workload: &str,
    check: &str,
    extra: &[&str],
) -> (i32, String, String) {
    let setup = b.script("setup.sh", EXT4_SETUP);
    let work = b.script("workload.sh", workload);
    let image = b.image();
    let mut args = vec![
        image.as_str(),
        "--fs",
        fs,
        "--setup",
        &setup,
        "--workload",
        &work,
        "--check",
        check,
        "--jobs",
        "2",
        "--seed",
        "7",
    ];
    args.extend_from_slice(extra);
    explore(&args)
}

#[test]
fn the_unsafe_rename_leaves_an_empty_config_and_the_image_is_never_changed() {
    let b = Bench::new();
    let before = std::fs::read(b.image()).unwrap();
    let (code, out, err) = ext4_run(&b, "ext4:noauto_da_alloc,commit=1", UNSAFE_UPDATE, &[]);
    assert_eq!(code, 1, "a failing state is exit 1:\n{out}\n{err}");
    assert!(out.contains("FAILED: state "), "{out}");
    assert!(out.contains("config is empty or missing"), "{out}");
    assert!(
        out.contains("rebuild it: blkdebugfs explore --from"),
        "{out}"
    );
    assert!(std::fs::read(b.image()).unwrap() == before, "IMAGE changed");
}

#[test]
fn the_fixed_update_never_fails_on_ext4_defaults_nor_with_noauto_da_alloc() {
    for fs in ["ext4", "ext4:noauto_da_alloc"] {
        let b = Bench::new();
        let (code, out, err) = ext4_run(&b, fs, SAFE_UPDATE, &[]);
        assert_eq!(code, 0, "{fs}: no state may fail:\n{out}\n{err}");
        // Six updates, each fsync'd: six marks, several epochs, all checked.
        assert!(out.contains("6 marks"), "{out}");
        assert!(out.contains(" 0 failed; seed 7"), "{out}");
    }
}

#[test]
fn the_fixed_update_on_nobarrier_loses_acknowledged_versions() {
    let b = Bench::new();
    let (code, out, err) = ext4_run(&b, "ext4:nobarrier", SAFE_UPDATE, &[]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("was acknowledged"), "{out}");
}

/// The SQLite scenarios: a table, then `commits` transactions of their own, each followed
/// by a mark; the check opens the database (recovering it), runs `integrity_check`, and
/// requires the last acknowledged commit.
fn sqlite_run(journal: &str, synchronous: &str) -> (i32, String, String) {
    let b = Bench::new();
    let workload = format!(
        r#"set -e
sqlite3 db "PRAGMA journal_mode={journal}; CREATE TABLE t(v INTEGER);" >/dev/null
for i in 1 2 3 4 5 6 7 8; do
  sqlite3 db "PRAGMA synchronous={synchronous}; INSERT INTO t VALUES($i);"
  blkdebugfs ctl "$BLKDEBUGFS_MNT" mark "$i" >/dev/null
done
"#
    );
    let check = r#"acked=${BLKDEBUGFS_ACKED:-0}
if [ ! -e db ]; then
  [ "$acked" = 0 ] && exit 0
  echo "the database is missing, commit $acked was acknowledged"; exit 1
fi
ok=$(sqlite3 db "PRAGMA integrity_check;" 2>&1) || true
[ "$ok" = ok ] || { echo "integrity_check: $ok"; exit 1; }
max=$(sqlite3 db "SELECT coalesce(max(v), 0) FROM t;" 2>/dev/null || echo 0)
[ "$max" -ge "$acked" ] || { echo "commit $acked was acknowledged, the database ends at $max"; exit 1; }
"#;
    let setup = b.script("setup.sh", "mkfs.ext4 -q -F \"$BLKDEBUGFS_DEV\"\n");
    let work = b.script("workload.sh", &workload);
    let check = b.script("check.sh", check);
    explore(&[
        &b.image(),
        "--fs",
        "ext4",
        "--setup",
        &setup,
        "--workload",
        &work,
        "--check",
        &check,
        "--jobs",
        "2",
        "--seed",
        "3",
        "--per-epoch",
        "24",
    ])
}

#[test]
fn sqlite_wal_with_synchronous_full_never_loses_a_marked_commit() {
    let (code, out, err) = sqlite_run("WAL", "FULL");
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("8 marks"), "{out}");
}

#[test]
fn sqlite_wal_with_synchronous_off_loses_a_marked_commit() {
    let (code, out, err) = sqlite_run("WAL", "OFF");
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("was acknowledged"), "{out}");
}

#[test]
fn sqlite_delete_journal_with_synchronous_extra_never_loses_a_marked_commit() {
    let (code, out, err) = sqlite_run("DELETE", "EXTRA");
    assert_eq!(code, 0, "{out}\n{err}");
}

/// The states of a report, in order, and its first failure.
fn report_states(path: &Path) -> (Vec<(String, String, String)>, Option<String>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut states = Vec::new();
    let mut first_failure = None;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v.get("summary").is_some() {
            continue;
        }
        let id = v["state"].as_str().unwrap().to_string();
        let result = v["result"].as_str().unwrap().to_string();
        if result != "pass" && first_failure.is_none() {
            first_failure = Some(id.clone());
        }
        states.push((id, v["hash"].as_str().unwrap().to_string(), result));
    }
    (states, first_failure)
}

#[test]
fn a_recording_explored_again_gives_the_same_states_images_and_shards() {
    let b = Bench::new();
    let rec = b.path("rec");
    let rec_s = rec.display().to_string();
    let (code, out, err) = ext4_run(
        &b,
        "ext4:noauto_da_alloc,commit=1",
        UNSAFE_UPDATE,
        &["--record", &rec_s],
    );
    assert_eq!(code, 1, "{out}\n{err}");
    let check = b.script("check.sh", CONFIG_CHECK);
    let run = |report: &str, extra: &[&str]| {
        let report = b.path(report);
        let r = report.display().to_string();
        let mut args = vec![
            "--from",
            &rec_s,
            "--fs",
            "ext4:noauto_da_alloc,commit=1",
            "--check",
            &check,
            "--seed",
            "7",
            "--report",
            &r,
        ];
        args.extend_from_slice(extra);
        let (code, out, err) = explore(&args);
        assert!(code == 0 || code == 1, "{out}\n{err}");
        report_states(&report)
    };
    let (a, first_a) = run("a.jsonl", &[]);
    let (again, first_again) = run("b.jsonl", &["--jobs", "2"]);
    assert!(!a.is_empty());
    assert_eq!(a, again, "the same recording and seed give the same states");
    assert_eq!(first_a, first_again);
    assert!(first_a.is_some());
    // The run that recorded found the same first failure.
    assert!(
        out.contains(&format!("FAILED: state {} ", first_a.clone().unwrap())),
        "{out}"
    );

    // Two shards: disjoint, and together the whole.
    let (s1, _) = run("s1.jsonl", &["--shard", "1/2"]);
    let (s2, _) = run("s2.jsonl", &["--shard", "2/2"]);
    let ids =
        |v: &[(String, String, String)]| v.iter().map(|s| s.0.clone()).collect::<BTreeSet<_>>();
    assert!(ids(&s1).is_disjoint(&ids(&s2)));
    let union: BTreeSet<_> = ids(&s1).union(&ids(&s2)).cloned().collect();
    assert_eq!(union, ids(&a));

    // The failing state, rebuilt twice: the same bytes, and the check fails on them.
    let id = first_a.unwrap();
    let image = |name: &str| {
        let out = b.path(name);
        let o = out.display().to_string();
        let (code, text, err) = explore(&[
            "--from",
            &rec_s,
            "--seed",
            "7",
            "--state",
            &id,
            "--image-out",
            &o,
        ]);
        assert_eq!(code, 0, "{text}\n{err}");
        std::fs::read(&out).unwrap()
    };
    let one = image("one.img");
    assert_eq!(one.len(), 64 << 20);
    assert!(
        one == image("two.img"),
        "--image-out twice gives the same bytes"
    );
    // A debugfs look at the rebuilt image: config is there and empty.
    let (_, stat, _) = run_tool(
        "debugfs",
        &[
            "-R",
            "stat /config",
            &b.path("one.img").display().to_string(),
        ],
    );
    assert!(stat.contains("Size: 0"), "{stat}");
}

/// A mount with `--record` over a 1 MiB pattern image, block 0 written (0xaa) and fsync'd
/// through an O_DIRECT descriptor: (scratch, recording dir, daemon, that descriptor). Marks
/// and `record` commands go through `.control` from this process: a spawned `ctl` would close
/// its inherited copy of the view's descriptor, and every close of the view is a flush.
fn recording_with_block_a() -> (Scratch, String, Daemon, std::fs::File) {
    let s = Scratch::new(MIB);
    let rec_s = s.dir.path().join("rec").display().to_string();
    let d = mount(&s, &["--record", &rec_s]);
    let f = open_direct(&s.view());
    pwrite(&f, AlignedBuf::filled(4096, 0xaa).as_ref(), 0).unwrap();
    fsync(&f).unwrap();
    (s, rec_s, d, f)
}

#[test]
fn mount_record_with_marks_is_explored_later_and_marks_decide_what_must_survive() {
    // A run a test harness drives: block A written and fsync'd, mark "a"; block B written,
    // never synced, mark "b" (a bug: B was acknowledged without a flush).
    let (s, rec_s, d, f) = recording_with_block_a();
    crate::power::ctl(&s.mnt, &["mark", "a"]);
    pwrite(&f, AlignedBuf::filled(4096, 0xbb).as_ref(), 8192).unwrap();
    crate::power::ctl(&s.mnt, &["mark", "b"]);
    let status = crate::power::ctl(&s.mnt, &["record", "status"]);
    // (One fsync is a flush of each of QEMU's two nodes, when both were written.)
    assert!(
        status.contains("2 writes, ") && status.contains(" flushes, 2 marks"),
        "{status}"
    );
    drop(f);
    d.stop();
    // A state is fine when every block a required mark names holds its bytes.
    let check = r#"# Block N holds only byte B (octal): nothing else is left once they are deleted.
holds() { [ "$(dd if="$BLKDEBUGFS_VIEW" bs=4096 skip=$1 count=1 2>/dev/null | tr -d "\\$2" | wc -c)" = 0 ]; }
if grep -qx a "$BLKDEBUGFS_MARKS"; then holds 0 252 || { echo "block a lost"; exit 1; }; fi
if grep -qx b "$BLKDEBUGFS_MARKS"; then holds 2 273 || { echo "block b lost"; exit 1; }; fi
echo "state $BLKDEBUGFS_STATE acked $BLKDEBUGFS_ACKED"
"#;
    let image = s.image.display().to_string();
    let report = s.dir.path().join("r.jsonl");
    let (code, out, err) = explore(&[
        &image,
        "--from",
        &rec_s,
        "--check",
        check,
        "--seed",
        "1",
        "--report",
        &report.display().to_string(),
    ]);
    assert_eq!(
        code, 1,
        "mark b needs block B, which no flush covered:\n{out}\n{err}"
    );
    let (states, first) = report_states(&report);
    // Epoch 0 (block A) needs no mark; epoch 1 (block B, unflushed) needs both.
    assert_eq!(first.as_deref(), Some("1.durable.0"), "{states:?}\n{out}");
    assert!(out.contains("block b lost"), "{out}");
    // The state with both blocks passes (as `subset.1`: `full` is the same bytes, so it is
    // checked once, under the first ID).
    assert!(
        states.iter().any(|s| s.0 == "1.subset.1" && s.2 == "pass"),
        "{states:?}"
    );
}

#[test]
fn explore_refuses_bad_input_with_exit_2_and_a_failing_workload_with_exit_3() {
    let b = Bench::new();
    let image = b.image();
    let (code, _, err) = explore(&[
        &image,
        "--workload",
        "true",
        "--check",
        "true",
        "--shard",
        "3/2",
    ]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = explore(&[
        "--from",
        "/nonexistent",
        "--state",
        "x.y",
        "--image-out",
        "/tmp/x",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("EPOCH.KIND.N"), "{err}");
    let (code, _, err) = explore(&[
        &image,
        "--workload",
        "echo broken; exit 4",
        "--check",
        "true",
    ]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("--workload exited 4") && err.contains("broken"),
        "{err}"
    );

    // A recording explored over an image that changed since is refused.
    let rec = b.path("rec").display().to_string();
    let (code, out, err) = explore(&[
        &image,
        "--workload",
        "dd if=/dev/urandom of=\"$BLKDEBUGFS_VIEW\" bs=4096 count=4 oflag=direct conv=notrunc,fsync 2>/dev/null",
        "--check",
        "true",
        "--record",
        &rec,
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    std::fs::write(b.image(), b"changed").unwrap();
    let (code, _, err) = explore(&[&image, "--from", &rec, "--check", "true"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("is not the image the recording"), "{err}");
}

/// A recording without a filesystem: `n` 4 KiB direct writes, each fsync'd, into the view.
fn raw_recording(b: &Bench, n: usize) -> String {
    let rec = b.path("rec").display().to_string();
    let workload = format!(
        "for i in $(seq 0 {}); do dd if=/dev/urandom of=\"$BLKDEBUGFS_VIEW\" bs=4096 seek=$i \
         count=1 oflag=direct conv=notrunc,fsync 2>/dev/null; done",
        n - 1
    );
    let (code, out, err) = explore(&[
        &b.image(),
        "--workload",
        &workload,
        "--check",
        "true",
        "--record",
        &rec,
    ]);
    assert_eq!(code, 0, "{out}\n{err}");
    rec
}

#[test]
fn a_check_past_its_timeout_is_killed_with_its_process_group_and_the_state_is_timeout() {
    let b = Bench::new();
    let rec = raw_recording(&b, 3);
    let pidfile = b.path("child.pid");
    // The check leaves a grandchild behind that would hold the state: it must die too.
    let check = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
    let report = b.path("r.jsonl").display().to_string();
    let (code, out, err) = explore(&[
        "--from",
        &rec,
        "--check",
        &check,
        "--timeout",
        // Long enough for the check to start its sleep on a loaded machine.
        "2s",
        "--stop-at-first",
        "--report",
        &report,
    ]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(out.contains("ran past 2s"), "{out}");
    assert!(
        out.contains("not checked (--stop-at-first or --budget)"),
        "{out}"
    );
    let (states, first) = report_states(Path::new(&report));
    assert_eq!(first.as_deref(), Some("0.durable.0"));
    assert_eq!(states.len(), 1, "--stop-at-first: {states:?}");
    assert_eq!(states[0].2, "timeout");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: kill with signal 0 only asks whether the process exists.
    let alive = || unsafe { libc::kill(pid, 0) } == 0;
    assert!(
        wait_for(DEADLINE, || !alive()),
        "the check's sleep {pid} survived its timeout"
    );
}

#[test]
fn a_budget_ends_checking_and_says_how_many_states_were_not_reached() {
    let b = Bench::new();
    let rec = raw_recording(&b, 4);
    let (code, out, err) = explore(&["--from", &rec, "--check", "sleep 0.3", "--budget", "1s"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("not checked (--stop-at-first or --budget)"),
        "{out}"
    );
}

#[test]
fn writes_after_record_stop_change_no_crash_state() {
    // A run recorded, stopped, then written on (a guest's shutdown): the image changed
    // under sectors the run never touched, and every state must still show them as they
    // were before the run.
    let (s, rec_s, d, f) = recording_with_block_a();
    crate::power::ctl(&s.mnt, &["record", "stop"]);
    pwrite(&f, AlignedBuf::filled(4096, 0xcc).as_ref(), 65536).unwrap();
    drop(f);
    d.stop();
    // Block 16 (bytes 64 KiB..68 KiB) as the image was before the run.
    let before: Vec<u8> = pattern(MIB)[65536..69632].to_vec();
    let expected = s.dir.path().join("block16");
    std::fs::write(&expected, &before).unwrap();
    let check = format!(
        "dd if=\"$BLKDEBUGFS_VIEW\" bs=4096 skip=16 count=1 2>/dev/null | cmp -s - {} || \
         {{ echo 'block 16 is not what the image held before the run'; exit 1; }}",
        expected.display()
    );
    let image = s.image.display().to_string();
    let (code, out, err) = explore(&[&image, "--from", &rec_s, "--check", &check]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("states checked"), "{out}");
}

#[test]
fn a_check_that_leaves_its_filesystem_busy_costs_its_loop_device_not_the_run() {
    // Each check leaves a process of its own session in the mounted filesystem: the
    // filesystem cannot be unmounted, is detached, and the next state must not share the
    // loop device it lives on; explore ends (nothing waits for the stragglers).
    let b = Bench::new();
    let pids = b.path("pids");
    let check = format!(
        "setsid sh -c 'echo $$ >> {}; exec sleep 60' </dev/null >/dev/null 2>&1 & sleep 0.2; test -e config",
        pids.display()
    );
    let (code, out, err) = ext4_run_with_check(
        &b,
        "ext4",
        SAFE_UPDATE,
        &check,
        &["--strategies", "durable"],
    );
    // Kill the stragglers (ours, by PID) before judging.
    for pid in std::fs::read_to_string(&pids).unwrap_or_default().lines() {
        if let Ok(pid) = pid.trim().parse::<i32>() {
            // SAFETY: kill of a process this test started (recorded by its own shell).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("states checked"), "{out}");
}
