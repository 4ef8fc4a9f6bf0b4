//! The differential test (spec §5): every scenario of `tests/scenarios.txt` runs against
//! QEMU's stack (qemu-storage-daemon: file → blkdebug → raw, FUSE export onto a regular file)
//! and against `blkdebugfs mount` onto a regular file, from the same image, with the same
//! config and the same O_DIRECT operations. Every operation's result (ok, bytes read, or the
//! errno) and the final image bytes must be identical.
//!
//! Scenario format (see the file's own comments): `=== name: description`, optional
//! `size N` and `opt key=value` lines, the config body verbatim, then `ops` and one operation
//! per line (`verbatim` before the body keeps `#` text in config lines, for scenarios about
//! what QEMU's parser ignores): `read OFF LEN`, `write OFF LEN BYTE`, `bwrite OFF LEN BYTE` (buffered fd),
//! `fsync`, `fdatasync`, `close` (close and reopen; reports the flush-on-close result),
//! `punch OFF LEN`, `zero OFF LEN`, `seek_data OFF`, `seek_hole OFF`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::util::*;

const QSD: &str = "qemu-storage-daemon";

#[derive(Debug)]
struct Scenario {
    name: String,
    size: usize,
    opts: Vec<(String, String)>,
    config: String,
    ops: Vec<String>,
    verbatim: bool,
}

fn parse_scenarios(text: &str) -> Vec<Scenario> {
    let mut out: Vec<Scenario> = Vec::new();
    let mut in_ops = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("===") {
            out.push(Scenario {
                name: rest.trim().to_string(),
                size: 1 << 20,
                opts: Vec::new(),
                config: String::new(),
                ops: Vec::new(),
                verbatim: false,
            });
            in_ops = false;
            continue;
        }
        let Some(s) = out.last_mut() else { continue };
        // Comments after '#' are allowed on op and directive lines, not in the config body
        // (which QEMU must read verbatim).
        let bare = line.split('#').next().unwrap_or("").trim();
        if in_ops {
            if !bare.is_empty() {
                s.ops.push(bare.to_string());
            }
        } else if bare == "ops" {
            in_ops = true;
        } else if bare == "verbatim" {
            s.verbatim = true;
        } else if s.verbatim && !line.trim().is_empty() {
            s.config.push_str(line);
            s.config.push('\n');
        } else if let Some(n) = bare.strip_prefix("size ") {
            s.size = n.trim().parse().expect("size");
        } else if let Some(kv) = bare.strip_prefix("opt ") {
            let (k, v) = kv.trim().split_once('=').expect("opt key=value");
            s.opts.push((k.to_string(), v.to_string()));
        } else if !line.trim().is_empty() && !line.trim_start().starts_with('#') {
            s.config
                .push_str(line.split(" #").next().unwrap_or(line).trim_end());
            s.config.push('\n');
        }
    }
    out
}

fn errno_name(e: i32) -> String {
    blkdebugfs::errno::name(e).map_or(e.to_string(), str::to_string)
}

/// Runs a scenario's operations against `file`, returning one line per operation.
fn drive(file: &Path, ops: &[String]) -> Vec<String> {
    let mut direct = Some(open_direct(file));
    let mut buffered: Option<File> = None;
    let mut results = Vec::new();
    for op in ops {
        let w: Vec<&str> = op.split_whitespace().collect();
        let num = |i: usize| -> u64 {
            let t = w[i];
            if let Some(h) = t.strip_prefix("0x") {
                u64::from_str_radix(h, 16).expect("hex")
            } else {
                t.parse().expect("number")
            }
        };
        let fd = direct.as_ref().expect("open fd");
        let fmt = |r: Result<usize, i32>| match r {
            Ok(_) => "ok".to_string(),
            Err(e) => errno_name(e),
        };
        let r = match w[0] {
            "read" => {
                let mut b = AlignedBuf::new(num(2) as usize);
                match pread(fd, b.as_mut(), num(1)) {
                    Ok(n) => {
                        let sum: u64 = b.as_ref()[..n]
                            .iter()
                            .enumerate()
                            .map(|(i, x)| (i as u64 + 1) * *x as u64)
                            .sum();
                        format!("ok {n} bytes, sum {sum}")
                    }
                    Err(e) => errno_name(e),
                }
            }
            "write" => {
                let b = AlignedBuf::filled(num(2) as usize, num(3) as u8);
                fmt(pwrite(fd, b.as_ref(), num(1)))
            }
            "bwrite" => {
                let f = buffered.get_or_insert_with(|| open_rw(file));
                fmt(pwrite(f, &vec![num(3) as u8; num(2) as usize], num(1)))
            }
            "fsync" => fmt(fsync(fd)),
            "fdatasync" => fmt(fdatasync(fd)),
            "close" => {
                let r = fmt(close(direct.take().expect("fd")));
                direct = Some(open_direct(file));
                r
            }
            "punch" => fmt(fallocate(fd, PUNCH, num(1), num(2))),
            "zero" => fmt(fallocate(fd, ZERO, num(1), num(2))),
            "seek_data" => match lseek(fd, num(1), libc::SEEK_DATA) {
                Ok(n) => format!("ok {n}"),
                Err(e) => errno_name(e),
            },
            "seek_hole" => match lseek(fd, num(1), libc::SEEK_HOLE) {
                Ok(n) => format!("ok {n}"),
                Err(e) => errno_name(e),
            },
            other => panic!("unknown op '{other}'"),
        };
        results.push(format!("{op:<24} -> {r}"));
    }
    results
}

/// One side's outcome: per-operation results and the final image.
struct Outcome {
    results: Vec<String>,
    image: Vec<u8>,
}

/// qemu-storage-daemon exporting IMG through blkdebug onto the regular file `target`.
struct Qsd {
    child: Child,
    target: PathBuf,
    log: PathBuf,
}

impl Qsd {
    fn start(img: &Path, conf: &Path, opts: &[(String, String)], target: &Path) -> Qsd {
        let mut bd = format!(
            "driver=blkdebug,node-name=bd,config={},image=f",
            conf.display()
        );
        for (k, v) in opts {
            bd.push_str(&format!(",{k}={v}"));
        }
        let log = target.with_extension("qsd.log");
        let child = Command::new(QSD)
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f,filename={}",
                img.display()
            ))
            .arg("--blockdev")
            .arg(bd)
            .arg("--blockdev")
            .arg("driver=raw,node-name=r,file=bd")
            .arg("--export")
            .arg(format!(
                "type=fuse,id=e,node-name=r,mountpoint={},writable=on",
                target.display()
            ))
            .stdin(Stdio::null())
            .stdout(File::create(&log).expect("log"))
            .stderr(Stdio::from(
                File::options().append(true).open(&log).expect("log"),
            ))
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let mut q = Qsd {
            child,
            target: target.to_path_buf(),
            log,
        };
        let up = wait_for(DEADLINE, || {
            if let Ok(Some(status)) = q.child.try_wait() {
                panic!(
                    "qemu-storage-daemon exited with {status}:\n{}",
                    std::fs::read_to_string(&q.log).unwrap_or_default()
                );
            }
            is_mounted(target)
        });
        assert!(up, "qemu-storage-daemon export did not come up");
        q
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        if is_mounted(&self.target) {
            let _ = Command::new("umount").arg(&self.target).status();
        }
        // SAFETY: SIGTERM to the qemu-storage-daemon we spawned and have not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let exited = wait_for(Duration::from_secs(10), || {
            self.child.try_wait().ok().flatten().is_some()
        });
        if !exited {
            let _ = Command::new("umount").arg("-l").arg(&self.target).status();
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn run_qemu(s: &Scenario, dir: &Path) -> Outcome {
    let img = dir.join("qemu.img");
    std::fs::write(&img, pattern(s.size)).unwrap();
    let conf = dir.join("qemu.ini");
    std::fs::write(&conf, &s.config).unwrap();
    let target = dir.join("qemu-export");
    std::fs::write(&target, b"").unwrap();
    let results = {
        let _qsd = Qsd::start(&img, &conf, &s.opts, &target);
        drive(&target, &s.ops)
    };
    Outcome {
        results,
        image: std::fs::read(&img).unwrap(),
    }
}

fn run_ours(s: &Scenario, dir: &Path) -> Outcome {
    let img = dir.join("ours.img");
    std::fs::write(&img, pattern(s.size)).unwrap();
    let conf = dir.join("ours.ini");
    std::fs::write(&conf, &s.config).unwrap();
    let target = dir.join("ours-export");
    std::fs::write(&target, b"").unwrap();
    let mut args: Vec<String> = vec![
        img.display().to_string(),
        target.display().to_string(),
        "--config".into(),
        conf.display().to_string(),
    ];
    for (k, v) in &s.opts {
        args.push(format!("--{k}"));
        args.push(v.clone());
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let results = {
        let daemon = Daemon::start(&target, &argv);
        let r = drive(&target, &s.ops);
        let status = daemon.stop();
        assert!(status.success(), "blkdebugfs exited with {status}");
        r
    };
    Outcome {
        results,
        image: std::fs::read(&img).unwrap(),
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[test]
fn blkdebugfs_matches_qemu_on_every_scenario() {
    let probe = {
        let _exclusive = exclusive();
        Command::new(QSD).arg("--version").output()
    };
    if probe.is_err() {
        // CI installs qemu-utils, so there this is a failure, not a skip.
        assert!(
            std::env::var_os("CI").is_none(),
            "qemu-storage-daemon is missing in CI"
        );
        eprintln!("SKIPPED: qemu-storage-daemon not installed (apt-get install qemu-utils)");
        return;
    }
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios.txt"))
            .expect("tests/scenarios.txt");
    let scenarios = parse_scenarios(&text);
    assert!(scenarios.len() >= 25, "only {} scenarios", scenarios.len());
    let only = std::env::var("SCENARIO").ok();
    let mut failures = Vec::new();
    let mut ran = 0;
    for s in &scenarios {
        if only
            .as_ref()
            .is_some_and(|o| !s.name.starts_with(o.as_str()))
        {
            continue;
        }
        ran += 1;
        let _exclusive = exclusive();
        let dir = tempfile::tempdir().unwrap();
        let qemu = run_qemu(s, dir.path());
        let ours = run_ours(s, dir.path());
        let mut report = String::new();
        if qemu.results != ours.results {
            report.push_str("  op                       -> qemu | blkdebugfs\n");
            for (q, o) in qemu.results.iter().zip(&ours.results) {
                let mark = if q == o { " " } else { "*" };
                report.push_str(&format!(
                    "{mark} {q} | {}\n",
                    o.split("-> ").nth(1).unwrap_or(o)
                ));
            }
        }
        if let Some(at) = first_difference(&qemu.image, &ours.image) {
            report.push_str(&format!("  images differ first at byte {at}\n"));
        }
        if report.is_empty() {
            eprintln!("same: {}", s.name);
        } else {
            eprintln!("DIFFERENT: {}\n{report}", s.name);
            failures.push(s.name.clone());
        }
    }
    assert!(ran > 0, "no scenario matched SCENARIO={only:?}");
    assert!(
        failures.is_empty(),
        "{} of {ran} scenarios differ from QEMU: {failures:#?}",
        failures.len()
    );
}

#[test]
fn scenario_file_parses() {
    let s = parse_scenarios(
        "# c\n=== a: one\nsize 4096\nopt align=512\n[inject-error]\nevent = \"read_aio\"\nops\nread 0 512 # x\n",
    );
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].size, 4096);
    assert_eq!(s[0].opts, vec![("align".to_string(), "512".to_string())]);
    assert_eq!(s[0].config, "[inject-error]\nevent = \"read_aio\"\n");
    assert_eq!(s[0].ops, vec!["read 0 512".to_string()]);
}
