//! The QEMU and Linux tool ecosystem (issue 11): image locking, block devices, completions and
//! the man page, the library for Rust tests.
//!
//! Locking is checked against real QEMU 10 tools, and against a paused QEMU VM holding the
//! image as the reference: every probe (qemu-io, qemu-img, a VM) must fare the same against a
//! mount as against that VM. Block devices are loop devices over files (`LoopDevice`).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use blkdebugfs::builder::inject_error;
use blkdebugfs::rules::Event;
use blkdebugfs::{Builder, Error};

use crate::util::*;

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ----------------------------------------------------------------------------- image locks

/// What a probe did: `ok`, or QEMU's first line of error (without the program's prefix).
fn outcome(code: i32, out: &str, err: &str) -> String {
    let text = format!("{out}{err}");
    match text.lines().find(|l| l.contains("Failed to get")) {
        Some(line) => line
            .rsplit_once(": ")
            .map_or(line, |(_, msg)| msg)
            .to_string(),
        // qemu-io exits 0 even when a command fails: its output says what happened.
        None if code == 0 && !text.contains("failed") => "ok".to_string(),
        None => format!("exit {code}: {text}"),
    }
}

/// qemu-io, writing (`-c 'write ...'`) or reading (`-r`), optionally with `-U`.
fn qemu_io(img: &Path, args: &[&str]) -> String {
    let mut all = vec!["-f", "raw"];
    all.extend_from_slice(args);
    all.push(path(img));
    let (code, out, err) = run_tool("qemu-io", &all);
    outcome(code, &out, &err)
}

fn qemu_img_info(img: &Path) -> String {
    let (code, out, err) = run_tool("qemu-img", &["info", "-f", "raw", path(img)]);
    outcome(code, &out, &err)
}

/// `qemu-img convert` out of `img` into a new file beside it.
fn qemu_img_convert(img: &Path, extra: &[&str]) -> String {
    let copy = img.with_extension("copy");
    let mut args = vec!["convert", "-f", "raw", "-O", "raw"];
    args.extend_from_slice(extra);
    args.extend([path(img), path(&copy)]);
    let (code, out, err) = run_tool("qemu-img", &args);
    let _ = std::fs::remove_file(&copy);
    outcome(code, &out, &err)
}

const QEMU_SYSTEM: &str = "qemu-system-x86_64";

fn vm_args(img: &Path, read_only: bool) -> Vec<String> {
    let ro = if read_only { ",readonly=on" } else { "" };
    [
        "-machine",
        "q35,accel=tcg",
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-drive",
        &format!("file={},format=raw,if=none,id=d0{ro}", img.display()),
        "-device",
        "virtio-blk-pci,drive=d0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A VM that tries to open `img` as a disk and should be refused: its outcome. (One that
/// is not refused stays paused; `timeout` ends it, and the outcome says so.)
fn vm_probe(img: &Path, read_only: bool) -> String {
    let mut args = vec!["10".to_string(), QEMU_SYSTEM.to_string()];
    args.extend(vm_args(img, read_only));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, out, err) = run_tool("timeout", &args);
    if code == 124 {
        return "ok (ran until killed)".to_string();
    }
    outcome(code, &out, &err)
}

/// Whether anyone holds a lock on `byte` of `img` (QEMU's `qemu_lock_fd_test`).
fn byte_locked(img: &Path, byte: i64) -> bool {
    let f = File::open(img).unwrap();
    // SAFETY: flock is plain old data; all-zero is valid (and l_pid must be 0).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    // SAFETY: fcntl reads and fills the flock we own.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    assert_eq!(r, 0, "F_OFD_GETLK: {}", std::io::Error::last_os_error());
    fl.l_type != libc::F_UNLCK as libc::c_short
}

/// A paused QEMU VM with `img` as its virtio-blk disk: QEMU's own image locks, held until
/// dropped (SIGTERM to the VM we started, then reaped).
struct Vm(Child);

impl Vm {
    fn start(img: &Path, read_only: bool) -> Vm {
        let _exclusive = exclusive();
        let child = Command::new(QEMU_SYSTEM)
            .args(vm_args(img, read_only))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn qemu-system-x86_64");
        let mut vm = Vm(child);
        // The VM takes its locks when its disk is realized; byte 201 is its "not sharing
        // write".
        let up = wait_for(DEADLINE, || {
            if let Ok(Some(status)) = vm.0.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = vm.0.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                panic!("{QEMU_SYSTEM} exited with {status}: {err}");
            }
            byte_locked(img, 201)
        });
        assert!(up, "the VM did not lock {} in time", img.display());
        vm
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // SAFETY: SIGTERM to the VM we spawned and have not reaped.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        if !wait_for(Duration::from_secs(10), || {
            self.0.try_wait().ok().flatten().is_some()
        }) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn have_qemu_system() -> bool {
    Command::new(QEMU_SYSTEM)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A second `blkdebugfs mount` of `img` (at a fresh mount point): its status and stderr.
fn second_mount(s: &Scratch, img: &Path, extra: &[&str]) -> (i32, String, PathBuf) {
    let mnt2 = s.dir.path().join(format!("mnt2-{}", extra.len()));
    std::fs::create_dir_all(&mnt2).unwrap();
    let mut args = vec!["mount", path(img), path(&mnt2)];
    args.extend_from_slice(extra);
    let (code, _, err) = run_cli(&args);
    (code, err, mnt2)
}

const WRITE: &str = "Failed to get \"write\" lock";
const SHARED_WRITE: &str = "Failed to get shared \"write\" lock";

#[test]
fn qemu_io_cannot_write_an_image_a_mount_holds_and_readers_still_can() {
    let s = Scratch::new(MIB);
    let d = mount(&s, &[]);
    assert_eq!(qemu_io(&s.image, &["-c", "write -P 0x55 0 512"]), WRITE);
    assert_eq!(
        s.image_bytes(),
        pattern(MIB),
        "the refused write changed nothing"
    );
    // Readers that share writing go on, as against a QEMU VM (see the VM test).
    assert_eq!(qemu_io(&s.image, &["-r", "-c", "read -P 1 0 512"]), "ok");
    assert_eq!(
        qemu_io(&s.image, &["-U", "-r", "-c", "read -P 1 0 512"]),
        "ok"
    );
    assert_eq!(qemu_img_info(&s.image), "ok");
    // The view itself is not locked by the backing file's locks.
    assert_eq!(qemu_io(&s.view(), &["-c", "write -P 0x55 0 512"]), "ok");
    assert!(d.stop().success());
    // Locks go with the mount.
    assert_eq!(qemu_io(&s.image, &["-c", "write -P 0x66 0 512"]), "ok");
    assert!(s.image_bytes()[..512].iter().all(|&b| b == 0x66));
}

#[test]
fn a_second_mount_of_the_same_image_is_refused_before_mounting_unless_forced() {
    let s = Scratch::new(MIB);
    let d = mount(&s, &[]);
    let (code, err, mnt2) = second_mount(&s, &s.image, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(WRITE), "{err}");
    assert!(err.contains("--force-share"), "{err}");
    assert!(
        err.contains(&format!("in use by blkdebugfs pid {}:", d.pid())),
        "the message names the holder: {err}"
    );
    assert!(!is_mounted(&mnt2));
    // A reader is refused too: a writer holds it.
    let (code, err, _) = second_mount(&s, &s.image, &["--read-only"]);
    assert_eq!((code, err.contains(SHARED_WRITE)), (1, true), "{err}");
    // --force-share skips the locks: both mounts serve the same image.
    let forced = s.dir.path().join("forced");
    std::fs::create_dir(&forced).unwrap();
    let d2 = Daemon::start(&forced, &[path(&s.image), path(&forced), "--force-share"]);
    assert_eq!(
        std::fs::read(forced.join("disk.img")).unwrap(),
        pattern(MIB)
    );
    assert!(d2.stop().success());
    assert!(d.stop().success());
}

/// `umount MNT` returns before the daemon has exited and dropped its locks: a script that
/// mounts the same image again at once must not be refused by the mount it just ended.
#[test]
fn the_image_can_be_mounted_again_right_after_umount() {
    let s = Scratch::new(MIB);
    for round in 0..5 {
        let mut d = mount(&s, &[]);
        tool_ok("umount", &[path(&s.mnt)]);
        // At once: no wait for the daemon to exit.
        let again = mount(&s, &[]);
        assert!(is_mounted(&s.mnt), "round {round}");
        assert!(d.wait_exit().success(), "round {round}: {}", d.stderr());
        drop(again);
    }
}

#[test]
fn read_only_mounts_coexist_and_keep_writers_out() {
    let s = Scratch::new(MIB);
    let d = mount(&s, &["--read-only"]);
    let other = s.dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let d2 = Daemon::start(&other, &[path(&s.image), path(&other), "--read-only"]);
    let (code, err, _) = second_mount(&s, &s.image, &[]);
    assert_eq!((code, err.contains(WRITE)), (1, true), "{err}");
    assert_eq!(qemu_io(&s.image, &["-c", "write 0 512"]), WRITE);
    assert_eq!(qemu_io(&s.image, &["-r", "-c", "read 0 512"]), "ok");
    assert_eq!(qemu_img_convert(&s.image, &[]), "ok");
    assert!(d2.stop().success());
    assert!(d.stop().success());
}

/// The reference: what QEMU's tools and a second VM do while a QEMU VM writes the image, they
/// must do while a mount does; and a mount is refused while the VM holds the image, as a
/// second VM is.
#[test]
fn every_probe_fares_against_a_mount_as_against_a_qemu_vm() {
    if !have_qemu_system() {
        // The VM test script installs it; this reference needs nothing else.
        eprintln!("SKIPPED: {QEMU_SYSTEM} is not installed (apt-get install qemu-system-x86)");
        return;
    }
    let s = Scratch::new(MIB);
    let probes = |img: &Path| {
        vec![
            ("qemu-io write", qemu_io(img, &["-c", "write 0 512"])),
            ("qemu-io -r read", qemu_io(img, &["-r", "-c", "read 0 512"])),
            (
                "qemu-io -U -r",
                qemu_io(img, &["-U", "-r", "-c", "read 0 512"]),
            ),
            ("qemu-img info", qemu_img_info(img)),
            ("qemu-img convert", qemu_img_convert(img, &[])),
            ("qemu-img convert -U", qemu_img_convert(img, &["-U"])),
            ("VM, writing", vm_probe(img, false)),
            ("VM, read-only", vm_probe(img, true)),
        ]
    };
    let vm = Vm::start(&s.image, false);
    let against_vm = probes(&s.image);
    // A mount, writing or reading, is refused as a VM is.
    let (code, err, _) = second_mount(&s, &s.image, &[]);
    assert_eq!((code, err.contains(WRITE)), (1, true), "{err}");
    assert!(
        err.contains("in use by qemu-system-x86"),
        "names the VM: {err}"
    );
    let (code, err, _) = second_mount(&s, &s.image, &["--read-only"]);
    assert_eq!((code, err.contains(SHARED_WRITE)), (1, true), "{err}");
    drop(vm);

    let d = mount(&s, &[]);
    let against_mount = probes(&s.image);
    assert!(d.stop().success());
    assert_eq!(against_mount, against_vm);
    // And what the VM reference says, spelled out.
    let said = |probe: &str| &against_vm.iter().find(|(p, _)| *p == probe).unwrap().1;
    assert_eq!(said("qemu-io write"), WRITE);
    assert_eq!(said("VM, writing"), WRITE);
    assert_eq!(said("VM, read-only"), SHARED_WRITE);
    assert_eq!(said("qemu-img convert"), SHARED_WRITE);
    assert_eq!(said("qemu-io -r read"), "ok");
    assert_eq!(said("qemu-img convert -U"), "ok");

    // A read-only VM keeps a writing mount out and lets a read-only one in.
    let vm = Vm::start(&s.image, true);
    let (code, err, _) = second_mount(&s, &s.image, &[]);
    assert_eq!((code, err.contains(WRITE)), (1, true), "{err}");
    let ro = s.dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let d = Daemon::start(&ro, &[path(&s.image), path(&ro), "--read-only"]);
    assert!(d.stop().success());
    drop(vm);
}

// ---------------------------------------------------------------------------- block devices

/// A loop device over a copy of the pattern, and the mount of the device.
struct DeviceMount {
    s: Scratch,
    backing: PathBuf,
    dev: LoopDevice,
}

impl DeviceMount {
    fn new(size: usize) -> DeviceMount {
        let s = Scratch::new(size);
        let backing = s.dir.path().join("backing.img");
        std::fs::copy(&s.image, &backing).unwrap();
        let dev = LoopDevice::attach(&backing, false);
        DeviceMount { s, backing, dev }
    }

    fn dev(&self) -> &Path {
        Path::new(&self.dev.0)
    }

    fn mount(&self, extra: &[&str]) -> Daemon {
        let mut args = vec![self.dev.0.as_str(), path(&self.s.mnt)];
        args.extend_from_slice(extra);
        Daemon::start(&self.s.mnt, &args)
    }

    fn view(&self) -> PathBuf {
        self.s.mnt.join(self.dev().file_name().unwrap())
    }
}

#[test]
fn a_loop_device_is_served_as_the_image_with_its_size_its_zeroing_and_no_holes() {
    let size = 4 * MIB;
    let m = DeviceMount::new(size);
    let d = m.mount(&[]);
    let view = m.view();
    let md = std::fs::metadata(&view).unwrap();
    assert_eq!(md.len(), size as u64, "the size is the device's");
    assert_eq!(md.blocks() * 512, size as u64, "a device is all data");
    assert!(std::fs::read(&view).unwrap() == pattern(size));

    let mut expect = pattern(size);
    let f = open_direct(&view);
    pwrite(&f, AlignedBuf::filled(8192, 0x11).as_ref(), 4096).unwrap();
    expect[4096..12288].fill(0x11);
    // No growth: a write at the end finds no room; a truncate is refused.
    assert_eq!(
        pwrite(&f, AlignedBuf::filled(4096, 1).as_ref(), size as u64),
        Err(libc::ENOSPC)
    );
    let g = open_rw(&view);
    assert_eq!(
        g.set_len(MIB as u64).unwrap_err().raw_os_error(),
        Some(libc::EINVAL)
    );
    g.set_len(size as u64).unwrap();
    // No holes: data everywhere, the only hole is the end.
    assert_eq!(lseek(&g, 12345, libc::SEEK_DATA), Ok(12345));
    assert_eq!(lseek(&g, 12345, libc::SEEK_HOLE), Ok(size));
    assert_eq!(lseek(&g, size as u64, libc::SEEK_DATA), Err(libc::ENXIO));
    // Punch and zero-range, aligned and not, through the device's own zeroing.
    fallocate(&g, PUNCH, 65536, 8192).unwrap();
    expect[65536..73728].fill(0);
    fallocate(&g, ZERO, 100_000, 300).unwrap();
    expect[100_000..100_300].fill(0);
    fallocate(&g, ZERO, 200_000, 70_000).unwrap();
    expect[200_000..270_000].fill(0);
    // Zeroing past the end stops at it; plain allocation has nothing to do.
    fallocate(&g, ZERO, size as u64 - 4096, 8192).unwrap();
    expect[size - 4096..].fill(0);
    fallocate(&g, 0, 0, 4096).unwrap();
    assert_eq!(fsync(&g), Ok(0));
    assert_eq!(std::fs::metadata(&view).unwrap().len(), size as u64);
    assert!(std::fs::read(&view).unwrap() == expect, "the view");
    // The view is the device's bytes, and the fsync took them down to the loop's file.
    assert!(std::fs::read(m.dev()).unwrap() == expect, "the device");
    assert!(
        std::fs::read(&m.backing).unwrap() == expect,
        "the loop's backing file"
    );
    let info = tool_ok("qemu-img", &["info", "-f", "raw", path(&view)]);
    assert!(info.contains("virtual size: 4 MiB"), "{info}");
    drop((f, g));
    assert!(d.stop().success());
}

#[test]
fn rules_fire_on_a_block_device_which_is_locked_and_cannot_grow() {
    let m = DeviceMount::new(MIB);
    let (code, _, err) = run_cli(&["mount", &m.dev.0, path(&m.s.mnt), "--growable"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("block device"), "{err}");
    let d = m.mount(&["--inject-error", "event=read_aio,errno=EIO,sector=16"]);
    let f = open_direct(&m.view());
    let mut b = AlignedBuf::new(4096);
    assert_eq!(pread(&f, b.as_mut(), 0), Ok(4096));
    assert_eq!(pread(&f, b.as_mut(), 8192), Err(libc::EIO));
    drop(f);
    // QEMU locks devices as it locks files.
    assert_eq!(qemu_io(m.dev(), &["-c", "write 0 512"]), WRITE);
    let log = d.stderr_with("injecting EIO");
    assert!(log.contains("injecting EIO"), "{log}");
    assert!(!d.stderr().contains("is in use"), "{}", d.stderr());
    assert!(d.stop().success());
    // A device a filesystem holds is served, with a warning.
    tool_ok("mkfs.ext4", &["-q", "-F", &m.dev.0]);
    let fs = FsMount::mount(&m.dev.0, &m.s.dir.path().join("fs"));
    let d = m.mount(&["--read-only"]);
    assert!(
        wait_for(DEADLINE, || d.stderr().contains("is in use")),
        "{}",
        d.stderr()
    );
    assert!(d.stop().success());
    fs.unmount();
}

// ---------------------------------------------------------------- man page and completions

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_committed_man_page_is_what_the_cli_generates() {
    let (code, now, err) = run_cli(&["manpage"]);
    assert_eq!(code, 0, "{err}");
    let committed = std::fs::read_to_string(manifest_dir().join("blkdebugfs.1"))
        .expect("blkdebugfs.1 is committed at the top of the repository");
    assert!(
        committed == now,
        "blkdebugfs.1 is out of date with the command line: regenerate it with\n\
         \x20   cargo run -q -- manpage > blkdebugfs.1"
    );
    for flag in [
        "--force-share",
        "--inject-error",
        "--write-cache",
        "completions",
    ] {
        assert!(now.contains(&flag.replace('-', "\\-")), "{flag}");
    }
}

/// `man ARGS` in the crate's directory, rendered as plain text 100 columns wide.
fn man(args: &[&str]) -> Output {
    output(
        Command::new("man")
            .args(args)
            .current_dir(manifest_dir())
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "100"),
        "man (apt-get install man-db)",
    )
}

/// The section-5 page (rule sections and keys, control commands, power cuts, the trace) is
/// committed as `manpage --section 5` writes it, and `man -l` renders it without a warning.
#[test]
fn the_committed_rules_page_is_what_the_cli_generates_and_man_renders_it() {
    let (code, now, err) = run_cli(&["manpage", "--section", "5"]);
    assert_eq!(code, 0, "{err}");
    let committed =
        std::fs::read_to_string(manifest_dir().join("blkdebugfs.ini.5")).unwrap_or_default();
    assert!(
        committed == now,
        "blkdebugfs.ini.5 is missing or out of date with the code's tables: regenerate it with\n\
         \x20   cargo run -q -- manpage --section 5 > blkdebugfs.ini.5"
    );
    let out = man(&["-l", "./blkdebugfs.ini.5"]);
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    // troff's warnings (a bad escape, an unknown request) go to stderr.
    assert!(out.stderr.is_empty(), "{}", text(&out));
    let mut wanted: Vec<String> = [
        "SECTIONS",
        "MATCH KEYS",
        "EVENTS",
        "CONTROL COMMANDS",
        "POWER CUTS",
        "TRACE",
        "wait_break TAG [TIMEOUT_MS]",
        "heal-on-write",
        "kept_bytes",
    ]
    .map(String::from)
    .to_vec();
    wanted.extend(
        blkdebugfs::config::Group::ALL
            .iter()
            .map(|g| format!("[{}]", g.name())),
    );
    for w in &wanted {
        assert!(page.contains(w.as_str()), "{w} missing:\n{page}");
    }
}

/// `--rule` takes every section the parser accepts (`Group::ALL`), so its help names each one,
/// in `mount --help` and `check --help` alike (it once listed 9 of the 11).
#[test]
fn rule_help_names_every_section_the_parser_accepts() {
    for sub in ["mount", "check"] {
        let (code, help, err) = run_cli(&[sub, "--help"]);
        assert_eq!(code, 0, "{err}");
        let rule = help
            .split("\n  ")
            .find(|entry| entry.trim_start().starts_with("--rule"))
            .unwrap_or_else(|| panic!("no --rule in `{sub} --help`:\n{help}"));
        let listed: Vec<&str> = rule
            .split_once("sections: ")
            .and_then(|(_, rest)| rest.split_once([';', ')']))
            .map(|(list, _)| list.split(',').map(str::trim).collect())
            .unwrap_or_default();
        let accepted: Vec<&str> = blkdebugfs::config::Group::ALL
            .iter()
            .map(|g| g.name())
            .collect();
        assert_eq!(listed, accepted, "`{sub} --help`, --rule:\n{rule}");
    }
}

#[test]
fn man_opens_the_page_with_every_subcommand() {
    let out = man(&["./blkdebugfs.1"]);
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    for wanted in [
        "blkdebugfs mount",
        "blkdebugfs ctl",
        "blkdebugfs completions",
        "--force-share",
        "EXIT STATUS",
        "SEE ALSO",
        "blkdebugfs.ini(5)",
    ] {
        assert!(page.contains(wanted), "{wanted} missing:\n{page}");
    }
}

#[test]
fn bash_completes_subcommands_and_flags_from_the_generated_script() {
    let (code, script, err) = run_cli(&["completions", "bash"]);
    assert_eq!(code, 0, "{err}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("blkdebugfs.bash");
    std::fs::write(&file, script).unwrap();
    // What bash's programmable completion does on TAB: the function with COMP_* set.
    let complete = |line: &str| {
        let words: Vec<&str> = line.split(' ').collect();
        let program = format!(
            "source {}; COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE='{line}'; \
             COMP_POINT={}; _blkdebugfs blkdebugfs '{}' '{}'; echo \"${{COMPREPLY[*]}}\"",
            file.display(),
            words
                .iter()
                .map(|w| format!("'{w}'"))
                .collect::<Vec<_>>()
                .join(" "),
            words.len() - 1,
            line.len(),
            words[words.len() - 1],
            words[words.len() - 2],
        );
        tool_ok("bash", &["-c", &program])
    };
    let subcommands = complete("blkdebugfs m");
    let mut found: Vec<&str> = subcommands.split_whitespace().collect();
    found.sort();
    assert_eq!(found, ["manpage", "mount"], "{subcommands}");
    assert!(complete("blkdebugfs mount --force").contains("--force-share"));
    assert!(complete("blkdebugfs completions ").contains("zsh"));
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let (code, script, err) = run_cli(&["completions", shell]);
        assert_eq!(code, 0, "{shell}: {err}");
        assert!(script.contains("blkdebugfs"), "{shell}");
    }
}

// ------------------------------------------------------------------- the library for tests

#[test]
fn a_rust_test_mounts_through_the_builder_and_drives_it_by_method() {
    let s = Scratch::new(MIB);
    let mnt = Builder::new(&s.image)
        .mountpoint(&s.mnt)
        .config("[inject-error]\nevent = \"read_aio\"\nsector = \"16\"\nerrno = \"5\"\n")
        .rule("inject-error:event=write_aio,errno=ENOSPC,sector=64")
        .rule(inject_error(Event::ReadAio, libc::ENOSPC, Some(32)))
        .seed(5)
        .mount()
        .expect("mount");
    assert!(is_mounted(&s.mnt));
    assert_eq!(mnt.view(), s.view());
    assert_eq!(mnt.seed(), 5);
    let f = open_rw(mnt.view());
    let mut b = vec![0u8; 512];
    assert_eq!(pread(&f, &mut b, 0), Ok(512));
    assert_eq!(pread(&f, &mut b, 16 * 512), Err(libc::EIO), "config text");
    assert_eq!(pread(&f, &mut b, 32 * 512), Err(libc::ENOSPC), "typed rule");
    assert_eq!(pwrite(&f, &b, 64 * 512), Err(libc::ENOSPC), "text rule");
    let rules = mnt.rules();
    assert_eq!(rules.len(), 3);

    // Rules come and go by method, as by `ctl`.
    let id = mnt.add_rule("drop-write:sector=128").unwrap();
    assert_eq!(pwrite(&f, &[9u8; 512], 128 * 512), Ok(512));
    assert_eq!(
        s.image_bytes()[128 * 512],
        pattern(MIB)[128 * 512],
        "dropped"
    );
    assert!(mnt.remove(id).is_some());
    assert!(mnt.remove(id).is_none());
    assert!(matches!(
        mnt.add_rule("no-such-section:x=1"),
        Err(Error::Config(_))
    ));
    assert_eq!(mnt.state(), 1);
    mnt.set_state(3);
    assert_eq!(mnt.ctl("state").unwrap(), "state 3");
    let refused = mnt.ctl("no_such_command").unwrap_err();
    assert_eq!(refused.errno(), Some(libc::EINVAL), "{refused}");

    // Breakpoints: suspend a write, see it, let it go.
    mnt.break_on(Event::WriteAio, "w");
    let writer = {
        let view = mnt.view().to_path_buf();
        std::thread::spawn(move || open_rw(&view).write_all_at(&[7u8; 512], 0))
    };
    mnt.wait_break("w", Some(DEADLINE)).unwrap();
    assert!(mnt.ctl("list").unwrap().contains("tag w"));
    assert!(mnt.resume("w"));
    writer.join().unwrap().unwrap();
    let timed_out = mnt
        .wait_break("never", Some(Duration::from_millis(1)))
        .unwrap_err();
    assert_eq!(timed_out.errno(), Some(libc::ETIMEDOUT));
    assert!(!mnt.resume("w"), "nothing is suspended any more");

    let stats = mnt.stats();
    let faults = |action: &str| stats.faults.iter().find(|f| f.0 == action).unwrap().1;
    assert_eq!(faults("inject-error"), 3);
    assert_eq!(faults("drop-write"), 1);
    assert_eq!(faults("break"), 1);
    drop(f);
    drop(mnt);
    assert!(!is_mounted(&s.mnt), "dropping the handle unmounts");
    assert!(s.image_bytes()[..512].iter().all(|&b| b == 7));
}

#[test]
fn the_builder_refuses_what_the_binary_refuses_and_cleans_up_its_mount_point() {
    let s = Scratch::new(MIB);
    let bad = Builder::new(&s.image)
        .mountpoint(&s.mnt)
        .rule("inject-error:event=no_such_event")
        .mount();
    assert!(matches!(bad, Err(Error::Config(_))));
    assert!(!is_mounted(&s.mnt));
    // Without a mount point: a temporary one, removed with the mount.
    let first = Builder::new(&s.image).mount().expect("mount");
    let at = first.mountpoint().to_path_buf();
    assert!(is_mounted(&at));
    assert_eq!(std::fs::read(first.view()).unwrap(), pattern(MIB));
    // The same image twice: the locks refuse it, in one process too.
    let second = Builder::new(&s.image).mountpoint(&s.mnt).mount();
    match second {
        Err(Error::Locked { conflict, .. }) => assert_eq!(conflict, WRITE),
        Err(e) => panic!("expected Locked, got {e}"),
        Ok(_) => panic!("a second mount of a locked image succeeded"),
    }
    assert!(!is_mounted(&s.mnt));
    let forced = Builder::new(&s.image)
        .mountpoint(&s.mnt)
        .force_share(true)
        .read_only(true)
        .mount()
        .expect("forced mount");
    assert_eq!(
        open_rw_err(forced.view()),
        Some(libc::EROFS),
        "a read-only view"
    );
    forced.unmount().unwrap();
    first.unmount().unwrap();
    assert!(!is_mounted(&at));
    assert!(
        !at.exists(),
        "the temporary mount point went with the mount"
    );
}

/// The errno of opening `p` for writing.
fn open_rw_err(p: &Path) -> Option<i32> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .err()
        .and_then(|e| e.raw_os_error())
}
