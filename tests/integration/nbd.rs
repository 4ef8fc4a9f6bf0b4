//! The NBD front end (`spec/nbd.md`) with the tools users have: `nbdinfo`, `qemu-io`,
//! `qemu-img`, `nbdcopy`, `fio --ioengine=nbd`, `nbdfuse`, and a raw socket for what no
//! well-behaved client sends. Each test starts `blkdebugfs serve` on a unix socket in a
//! temporary directory ([`Served`]), which is stopped and reaped on drop.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::*;

/// A running `blkdebugfs serve` on `DIR/nbd.sock`, with its control socket at `DIR/ctl.sock`;
/// stopped (SIGTERM, then SIGKILL after a deadline) and reaped on drop.
pub struct Served {
    child: Option<Child>,
    pub sock: PathBuf,
    pub control: PathBuf,
    stderr_path: PathBuf,
}

impl Served {
    /// `blkdebugfs serve IMAGE --listen unix:DIR/nbd.sock --control DIR/ctl.sock EXTRA`,
    /// once the socket accepts.
    pub fn start(s: &Scratch, extra: &[&str]) -> Served {
        Served::start_cmd(s, "serve", &[s.image.to_str().unwrap()], extra)
    }

    /// Starts `blkdebugfs SUB ARGS --listen ... --control ... EXTRA` and waits for both sockets
    /// (and, for `mount`, the mount).
    pub fn start_cmd(s: &Scratch, sub: &str, args: &[&str], extra: &[&str]) -> Served {
        let sock = s.dir.path().join("nbd.sock");
        let control = s.dir.path().join("ctl.sock");
        let stderr_path = s.dir.path().join("serve.stderr");
        let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
        let listen = format!("unix:{}", sock.display());
        let child = Command::new(BIN)
            .arg(sub)
            .args(args)
            .args(["--listen", &listen, "--control", control.to_str().unwrap()])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn blkdebugfs serve");
        let mut served = Served {
            child: Some(child),
            sock,
            control,
            stderr_path,
        };
        let up = wait_for(DEADLINE, || {
            if let Some(status) = served
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "blkdebugfs {sub} exited with {status} before serving:\n{}",
                    served.stderr()
                );
            }
            // The NBD socket accepts from the start (it is bound before anything else, so
            // an address in use fails early); the control socket is bound later: wait for
            // both (a loaded run once raced a test's first `ctl` here).
            UnixStream::connect(&served.sock).is_ok()
                && UnixStream::connect(&served.control).is_ok()
                && (sub != "mount" || is_mounted(&s.mnt))
        });
        assert!(
            up,
            "blkdebugfs {sub} did not serve within {DEADLINE:?}:\n{}",
            served.stderr()
        );
        served
    }

    /// `nbd+unix:///?socket=...`: the default export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The log once it contains `needle` (or after the deadline, for the assert to show).
    pub fn stderr_with(&self, needle: &str) -> String {
        let mut log = String::new();
        wait_for(DEADLINE, || {
            log = self.stderr();
            log.contains(needle)
        });
        log
    }

    pub fn ctl(&self, words: &[&str]) -> String {
        ctl(&self.control, words)
    }

    /// How many of the server's threads are inside system call `nr` now (from
    /// `/proc/PID/task/*/syscall`): those stuck in the kernel on the image, say.
    pub fn threads_in_syscall(&self, nr: libc::c_long) -> usize {
        let pid = self.child.as_ref().expect("not reaped").id();
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            return 0;
        };
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("syscall")).ok())
            .filter(|line| line.split_whitespace().next() == Some(&nr.to_string()))
            .count()
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill on the PID of the child we spawned and have not reaped.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// SIGTERM, then the exit status (within the deadline).
    pub fn stop(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let child = self.child.as_mut().expect("not reaped");
        let mut status = None;
        let exited = wait_for(DEADLINE, || {
            status = child.try_wait().expect("try_wait");
            status.is_some()
        });
        assert!(exited, "serve did not exit:\n{}", self.stderr());
        self.child = None;
        status.unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        if child.try_wait().ok().flatten().is_none() {
            // SAFETY: kill on our own unreaped child's PID.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            if !wait_for(Duration::from_secs(10), || {
                child.try_wait().ok().flatten().is_some()
            }) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Runs `qemu-io -f raw URI -c CMD...`; (exit code, stdout + stderr).
fn qemu_io(uri: &str, cmds: &[&str]) -> (i32, String) {
    let mut args = vec!["-f", "raw", uri];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let (code, out, err) = run_tool("qemu-io", &args);
    (code, out + &err)
}

#[test]
fn nbdinfo_shows_the_flags_and_the_base_allocation_context() {
    let s = Scratch::new(MIB);
    let d = Served::start(&s, &[]);
    let out = tool_ok("nbdinfo", &["--json", &d.uri()]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["protocol"], "newstyle-fixed", "{out}");
    assert_eq!(v["structured"], true, "{out}");
    let e = &v["exports"][0];
    assert_eq!(e["export-name"], "disk.img", "{out}");
    assert_eq!(e["export-size"], MIB as u64, "{out}");
    for yes in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_fast_zero",
        "can_multi_conn",
    ] {
        assert_eq!(e[yes], true, "{yes}: {out}");
    }
    assert_eq!(e["is_read_only"], false, "{out}");
    assert_eq!(
        e["contexts"],
        serde_json::json!(["base:allocation"]),
        "{out}"
    );
    // The export is listed, by its name.
    let list = tool_ok("nbdinfo", &["--list", "--json", &d.uri()]);
    assert!(list.contains("\"export-name\": \"disk.img\""), "{list}");
    assert!(d.stop().success());

    let d = Served::start(&s, &["--read-only", "--export", "faulty"]);
    let uri = format!("nbd+unix:///faulty?socket={}", d.sock.display());
    let v: Value = serde_json::from_str(&tool_ok("nbdinfo", &["--json", &uri])).unwrap();
    assert_eq!(v["exports"][0]["is_read_only"], true);
    assert_eq!(v["exports"][0]["export-name"], "faulty");
    // An export that does not exist is refused by name, and the server goes on.
    let wrong = format!("nbd+unix:///nope?socket={}", d.sock.display());
    let (code, _, err) = run_tool("nbdinfo", &[&wrong]);
    assert_ne!(code, 0, "{err}");
    tool_ok("nbdinfo", &[&uri]);
    assert!(d.stop().success());
    // The socket went with the server.
    assert!(!s.dir.path().join("nbd.sock").exists());
}

#[test]
fn qemu_io_sees_an_injected_error_at_its_exact_sector_and_a_delay() {
    let s = Scratch::new(MIB);
    let d = Served::start(
        &s,
        &["--inject-error", "event=read_aio,errno=EIO,sector=16"],
    );
    // Sector 16 is bytes 8192..8704: only requests covering it fail.
    let (code, out) = qemu_io(
        &d.uri(),
        &["read 0 4k", "read 8k 512", "read 8704 512", "read 7680 512"],
    );
    // qemu-io's status says that a command failed.
    assert_eq!(code, 1, "{out}");
    let lines: Vec<&str> = out.lines().filter(|l| l.starts_with("read")).collect();
    assert_eq!(lines.len(), 4, "{out}");
    assert!(lines[0].starts_with("read 4096/4096"), "{out}");
    assert_eq!(lines[1], "read failed: Input/output error", "{out}");
    assert!(lines[2].starts_with("read 512/512"), "{out}");
    assert!(lines[3].starts_with("read 512/512"), "{out}");
    // The bytes served are the image's.
    let (code, out) = qemu_io(&d.uri(), &["read -P 18 8704 512"]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    d.ctl(&["clear"]);

    // A delay: the read takes at least its latency.
    d.ctl(&["delay", "latency=400ms,iotype=read,sector=100"]);
    let start = Instant::now();
    let (code, out) = qemu_io(&d.uri(), &["read 51200 512"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        start.elapsed() >= Duration::from_millis(400),
        "{:?}",
        start.elapsed()
    );
    assert!(d.stop().success());
}

#[test]
fn errnos_nbd_cannot_carry_are_mapped_and_the_log_names_both() {
    let s = Scratch::new(MIB);
    let d = Served::start(
        &s,
        &[
            "--inject-error",
            "event=write_aio,errno=EDQUOT,sector=0",
            "--inject-error",
            "event=read_aio,errno=ETIMEDOUT,sector=8",
        ],
    );
    let (code, out) = qemu_io(&d.uri(), &["write 0 512", "read 4096 512"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("write failed: No space left on device"),
        "{out}"
    );
    assert!(out.contains("read failed: Input/output error"), "{out}");
    let log = d.stderr_with("sending ETIMEDOUT");
    assert!(log.contains("sending EDQUOT (122) as ENOSPC (28)"), "{log}");
    assert!(log.contains("sending ETIMEDOUT (110) as EIO (5)"), "{log}");
    assert!(d.stop().success());
    // The failed write changed nothing.
    assert_eq!(s.image_bytes(), pattern(MIB));
}

#[test]
fn qemu_img_map_shows_the_holes_and_trim_and_write_zeroes_reach_the_image() {
    let s = Scratch::new(MIB);
    // 1 MiB of data, then 3 MiB of hole.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&s.image)
        .unwrap()
        .set_len(4 * MIB as u64)
        .unwrap();
    let d = Served::start(&s, &[]);
    let out = tool_ok("qemu-img", &["map", "-f", "raw", "--output=json", &d.uri()]);
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    let extents: Vec<(u64, u64, bool)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["data"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        extents,
        vec![(0, MIB as u64, true), (MIB as u64, 3 * MIB as u64, false)],
        "{out}"
    );
    // TRIM punches a hole, WRITE_ZEROES zeroes: both land on the image.
    let (code, out) = qemu_io(&d.uri(), &["discard 0 64k", "write -z 64k 64k"]);
    assert_eq!(code, 0, "{out}");
    let out = tool_ok("qemu-img", &["map", "-f", "raw", "--output=json", &d.uri()]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["start"], 0, "{out}");
    assert_eq!(v[0]["data"], false, "{out}");
    assert!(d.stop().success());
    let bytes = s.image_bytes();
    assert!(bytes[..128 << 10].iter().all(|&b| b == 0));
    assert_eq!(bytes[128 << 10..MIB], pattern(MIB)[128 << 10..]);
}

#[test]
fn nbdcopy_both_ways_gives_identical_bytes() {
    let s = Scratch::new(4 * MIB);
    let d = Served::start(&s, &[]);
    let out_file = s.dir.path().join("copy.img");
    tool_ok("nbdcopy", &[&d.uri(), out_file.to_str().unwrap()]);
    same_bytes(
        &std::fs::read(&out_file).unwrap(),
        &pattern(4 * MIB),
        "nbdcopy out",
    );
    // The other way: different bytes in, the image holds them.
    let input = s.dir.path().join("in.img");
    let want: Vec<u8> = (0..4 * MIB).map(|i| (i * 7 % 253) as u8).collect();
    std::fs::write(&input, &want).unwrap();
    tool_ok("nbdcopy", &[input.to_str().unwrap(), &d.uri()]);
    assert!(d.stop().success());
    same_bytes(&s.image_bytes(), &want, "nbdcopy in");
}

#[test]
fn fio_over_nbd_verifies_with_several_connections() {
    let s = Scratch::new(8 * MIB);
    let d = Served::start(&s, &[]);
    let uri = format!("--uri={}", d.uri());
    let (code, out, err) = run_tool(
        "fio",
        &[
            "--name=nbd",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--size=8M",
            "--iodepth=16",
            "--numjobs=4",
            "--offset_increment=2M",
            "--size=2M",
            "--verify=crc32c",
            "--do_verify=1",
            // No verify state files in the working directory.
            "--verify_state_save=0",
            "--group_reporting",
        ],
    );
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(!out.contains("verify: bad"), "{out}");
    // Four jobs, four connections.
    let log = d.stderr();
    assert!(log.contains("NBD connection 4 from"), "{log}");
    assert!(d.stop().success());
}

#[test]
fn nbdfuse_maps_the_export_back_to_a_file() {
    let s = Scratch::new(MIB);
    let d = Served::start(
        &s,
        &["--inject-error", "event=read_aio,errno=EIO,sector=16"],
    );
    let fuse_dir = s.dir.path().join("fuse");
    std::fs::create_dir(&fuse_dir).unwrap();
    let mut nbdfuse = Command::new("nbdfuse")
        .arg(fuse_dir.join("disk"))
        .arg("--unix")
        .arg(&d.sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run nbdfuse ({e}): `bash .ci/run` installs it"));
    let file = fuse_dir.join("disk");
    let up = wait_for(DEADLINE, || is_mounted(&fuse_dir) && file.exists());
    let result = std::panic::catch_unwind(|| {
        assert!(up, "nbdfuse did not mount");
        let f = std::fs::File::open(&file).unwrap();
        assert_eq!(read_at(&f, 0, 4096), Ok(pattern(MIB)[..4096].to_vec()));
        assert_eq!(read_at(&f, 8192, 512), Err(libc::EIO));
    });
    // Unmounting ends nbdfuse. `umount` as root (the tests' user); fusermount3 otherwise.
    let unmounted = Command::new("umount").arg(&fuse_dir).status();
    if !unmounted.is_ok_and(|st| st.success()) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&fuse_dir)
            .status();
    }
    if !wait_for(DEADLINE, || nbdfuse.try_wait().ok().flatten().is_some()) {
        let _ = nbdfuse.kill();
        let _ = nbdfuse.wait();
    }
    // Never leave a mount behind, even when something above failed.
    let stayed = is_mounted(&fuse_dir);
    if stayed {
        let _ = Command::new("umount").arg("-l").arg(&fuse_dir).status();
    }
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    assert!(!stayed, "nbdfuse's mount stayed after umount");
    assert!(d.stop().success());
}

// ---------------------------------------------------------------- a raw client

/// A minimal NBD client on a raw socket, for requests no well-behaved client sends, and for
/// sending exactly one command per operation (the differential test's NBD leg).
pub struct Raw {
    pub s: UnixStream,
}

const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_MAGIC: u32 = 0x6744_6698;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;

impl Raw {
    /// Connects and negotiates the default export with `GO` (simple replies).
    pub fn connect(sock: &Path) -> Raw {
        let mut r = Raw::greeted(sock);
        r.option(7, &[0, 0, 0, 0, 0, 0]);
        loop {
            let (kind, _) = r.option_reply();
            if kind == 1 {
                return r;
            }
            assert_eq!(kind, 3, "GO refused");
        }
    }

    /// Connects, reads the greeting and sends the client flags.
    pub fn greeted(sock: &Path) -> Raw {
        let mut s = UnixStream::connect(sock).expect("connect");
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
        s.write_all(&3u32.to_be_bytes()).unwrap();
        Raw { s }
    }

    pub fn option(&mut self, code: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// (reply type, data).
    pub fn option_reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data).unwrap();
        (kind, data)
    }

    pub fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
        self.request_magic(REQUEST_MAGIC, kind, flags, cookie, offset, len, &[]);
    }

    #[allow(clippy::too_many_arguments)]
    pub fn request_magic(
        &mut self,
        magic: u32,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut b = magic.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
    }

    pub fn write(&mut self, cookie: u64, offset: u64, payload: &[u8]) {
        self.request_magic(
            REQUEST_MAGIC,
            1,
            0,
            cookie,
            offset,
            payload.len() as u32,
            payload,
        );
    }

    /// A simple reply: (error, cookie); `data_len` bytes follow a successful read.
    pub fn reply(&mut self, data_len: usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).expect("a reply");
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            SIMPLE_MAGIC
        );
        let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut data = Vec::new();
        if error == 0 && data_len > 0 {
            data.resize(data_len, 0);
            self.s.read_exact(&mut data).unwrap();
        }
        (error, cookie, data)
    }

    /// Whether the server closed the connection (reads end, or the connection was reset)
    /// within the read timeout: a read that times out, or that returns data, is false.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        }
    }
}

#[test]
fn bad_clients_get_errors_or_a_disconnect_and_the_server_goes_on() {
    let s = Scratch::new(MIB);
    let d = Served::start(&s, &[]);
    // A bystander connection that must keep working through everything below.
    let mut good = Raw::connect(&d.sock);

    // Handshake: a bad option magic ends that connection only.
    let mut bad = Raw::greeted(&d.sock);
    bad.s.write_all(&[0u8; 16]).unwrap();
    assert!(bad.closed());
    // An unknown option is refused (NBD_REP_ERR_UNSUP) and the handshake goes on.
    let mut r = Raw::greeted(&d.sock);
    r.option(4242, b"junk");
    assert_eq!(r.option_reply().0, (1 << 31) | 1);
    r.option(7, &[0, 0, 0, 0, 0, 0]);
    while r.option_reply().0 != 1 {}

    // Transmission: an unknown command is EINVAL, the connection goes on.
    r.request(99, 0, 1, 0, 512);
    assert_eq!(r.reply(0).0, 22);
    // Out of range: a read past the end is EINVAL, a write ENOSPC (its payload is read).
    r.request(0, 0, 2, MIB as u64 - 512, 1024);
    assert_eq!(r.reply(0), (22, 2, vec![]));
    r.write(3, MIB as u64, &[0xee; 512]);
    assert_eq!(r.reply(0), (28, 3, vec![]));
    r.request(0, 0, 4, u64::MAX - 100, 512);
    assert_eq!(r.reply(0), (22, 4, vec![]));
    // Flags a command does not take.
    r.request(3, 1 << 3, 5, 0, 0);
    assert_eq!(r.reply(0).0, 22);
    // Block status without the context negotiated.
    r.request(7, 0, 6, 0, 512);
    assert_eq!(r.reply(0).0, 22);
    // A read over 32 MiB is refused, not served.
    r.request(0, 0, 7, 0, 64 << 20);
    assert_eq!(r.reply(0).0, 22);
    // Still serving this connection.
    r.request(0, 0, 8, 512, 512);
    assert_eq!(r.reply(512), (0, 8, pattern(MIB)[512..1024].to_vec()));
    // A bad request magic ends the connection.
    r.request_magic(0xdead_beef, 0, 0, 9, 0, 512, &[]);
    assert!(r.closed());
    // A write over 32 MiB ends the connection (its payload is never read).
    let mut r = Raw::connect(&d.sock);
    r.request(1, 0, 10, 0, 64 << 20);
    assert!(r.closed());
    // A client that hangs up mid-payload.
    let mut r = Raw::connect(&d.sock);
    r.request(1, 0, 11, 0, 4096);
    r.s.write_all(&[0xab; 100]).unwrap();
    drop(r);

    good.request(0, 0, 12, 0, 4096);
    assert_eq!(good.reply(4096), (0, 12, pattern(MIB)[..4096].to_vec()));
    assert!(d.stop().success());
    // Nothing was written by any of it.
    assert_eq!(s.image_bytes(), pattern(MIB));
}

#[test]
fn a_write_to_a_read_only_export_is_eperm() {
    let s = Scratch::new(MIB);
    let d = Served::start(&s, &["--read-only"]);
    let mut r = Raw::connect(&d.sock);
    r.write(1, 0, &[0x11; 512]);
    assert_eq!(r.reply(0), (1, 1, vec![]));
    r.request(4, 0, 2, 0, 4096);
    assert_eq!(r.reply(0), (1, 2, vec![]));
    r.request(6, 0, 3, 0, 4096);
    assert_eq!(r.reply(0), (1, 3, vec![]));
    r.request(0, 0, 4, 0, 512);
    assert_eq!(r.reply(512), (0, 4, pattern(MIB)[..512].to_vec()));
    assert!(d.stop().success());
    assert_eq!(s.image_bytes(), pattern(MIB));
}

#[test]
fn a_parked_request_does_not_hold_up_its_connection_and_replies_come_by_cookie() {
    let s = Scratch::new(MIB);
    let d = Served::start(&s, &[]);
    d.ctl(&["suspend", "event=read_aio,tag=A,sector=16"]);
    let mut r = Raw::connect(&d.sock);
    r.request(0, 0, 1, 8192, 512);
    d.ctl(&["wait_break", "A", "10000"]);
    // The next request on the same connection is answered while the first waits.
    r.request(0, 0, 2, 0, 512);
    assert_eq!(r.reply(512), (0, 2, pattern(MIB)[..512].to_vec()));
    r.write(3, 4096, &[0x5a; 512]);
    assert_eq!(r.reply(0), (0, 3, vec![]));
    d.ctl(&["clear"]);
    d.ctl(&["resume", "A"]);
    assert_eq!(r.reply(512), (0, 1, pattern(MIB)[8192..8704].to_vec()));
    assert!(d.stop().success());
}

/// Clears the rules of the lower mount at the path and resumes the tags when dropped:
/// declared after the server over that mount, it is dropped first, so that a failing
/// assert's server stop never waits on a request the lower mount still holds.
struct ReleaseOnDrop<'a>(&'a Path, &'a [&'a str]);

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        let mnt = self.0.to_str().unwrap();
        run_cli(&["ctl", mnt, "clear"]);
        // `resume` releases one request (as QEMU's): repeat while any is suspended.
        for _ in 0..64 {
            for tag in self.1 {
                run_cli(&["ctl", mnt, "resume", tag]);
            }
            if !run_cli(&["ctl", mnt, "list"]).1.contains("suspended") {
                break;
            }
        }
    }
}

/// A request that blocks in the kernel must not hold up its connection either. The reader
/// runs small reads itself; here the image is the view of a second blkdebugfs whose read of
/// sector 16 is suspended, so the server's read of it sleeps in the kernel. The read after
/// it on the same connection is answered while the first still sleeps (a waiting worker
/// takes the read turn from a stuck run), and the first is answered once resumed.
#[test]
fn a_request_stuck_in_the_kernel_does_not_hold_up_its_connection() {
    let s = Scratch::new(MIB);
    let lower = mount(&s, &[]);
    ctl(&s.mnt, &["suspend", "event=read_aio,tag=A,sector=16"]);
    let d = Served::start_cmd(&s, "serve", &[s.view().to_str().unwrap()], &[]);
    let _release = ReleaseOnDrop(&s.mnt, &["A"]);
    let mut r = Raw::connect(&d.sock);
    r.request(0, 0, 1, 8192, 512);
    ctl(&s.mnt, &["wait_break", "A", "10000"]);
    r.request(0, 0, 2, 0, 512);
    assert_eq!(r.reply(512), (0, 2, pattern(MIB)[..512].to_vec()));
    // And more, while it still sleeps: a write and a read of what it wrote.
    r.write(3, 4096, &[0x5a; 512]);
    assert_eq!(r.reply(0), (0, 3, vec![]));
    r.request(0, 0, 4, 4096, 512);
    assert_eq!(r.reply(512), (0, 4, vec![0x5a; 512]));
    assert!(ctl(&s.mnt, &["list"]).contains("suspended"));
    ctl(&s.mnt, &["clear"]);
    ctl(&s.mnt, &["resume", "A"]);
    assert_eq!(r.reply(512), (0, 1, pattern(MIB)[8192..8704].to_vec()));
    drop(r);
    assert!(d.stop().success());
    assert!(lower.stop().success());
}

/// The same with every worker busy: a flush stuck in the kernel holds the worker it was
/// handed to, and then the reader's own inline read gets stuck too. The reader starts a
/// worker to watch its run when no other worker waits, so the third request is still read
/// and answered.
#[test]
fn a_read_stuck_behind_a_stuck_flush_still_leaves_a_reader() {
    let s = Scratch::new(MIB);
    let lower = mount(&s, &[]);
    ctl(&s.mnt, &["suspend", "event=flush_to_disk,tag=F"]);
    ctl(&s.mnt, &["suspend", "event=read_aio,tag=A,sector=16"]);
    let d = Served::start_cmd(&s, "serve", &[s.view().to_str().unwrap()], &[]);
    let _release = ReleaseOnDrop(&s.mnt, &["F", "A"]);
    let mut r = Raw::connect(&d.sock);
    // Something to flush, then the flush.
    r.write(9, 4096, &[0x5a; 512]);
    assert_eq!(r.reply(0), (0, 9, vec![]));
    r.request(3, 0, 1, 0, 0);
    ctl(&s.mnt, &["wait_break", "F", "10000"]);
    r.request(0, 0, 2, 8192, 512);
    ctl(&s.mnt, &["wait_break", "A", "10000"]);
    r.request(0, 0, 3, 0, 512);
    assert_eq!(r.reply(512), (0, 3, pattern(MIB)[..512].to_vec()));
    let list = ctl(&s.mnt, &["list"]);
    assert_eq!(list.matches("suspended").count(), 2, "{list}");
    ctl(&s.mnt, &["clear"]);
    ctl(&s.mnt, &["resume", "A"]);
    assert_eq!(r.reply(512), (0, 2, pattern(MIB)[8192..8704].to_vec()));
    ctl(&s.mnt, &["resume", "F"]);
    assert_eq!(r.reply(0), (0, 1, vec![]));
    drop(r);
    assert!(d.stop().success());
    assert!(lower.stop().success());
}

/// The same with every worker stuck: 15 FUA writes hold 15 of the connection's 16 workers
/// in the kernel (the lower mount suspends its flushes, and a FUA write is a write and a
/// flush), and the 16th, the reader, runs a read that gets stuck too, with another request
/// read behind it. No worker is left to watch that run, so nothing may be held back
/// meanwhile: a parked request resumed now (a read the server itself suspended) is answered
/// at once, not when the stuck read returns.
#[test]
fn a_parked_request_resumed_while_every_worker_is_stuck_is_answered() {
    let s = Scratch::new(MIB);
    let lower = mount(&s, &[]);
    ctl(&s.mnt, &["suspend", "event=flush_to_disk,tag=F"]);
    ctl(&s.mnt, &["suspend", "event=read_aio,tag=A,sector=16"]);
    let d = Served::start_cmd(&s, "serve", &[s.view().to_str().unwrap()], &[]);
    let _release = ReleaseOnDrop(&s.mnt, &["F", "A"]);
    d.ctl(&["break", "read_aio", "P"]);
    let mut r = Raw::connect(&d.sock);
    // P: parked in the server itself (its only run on the reader before R: the reader runs
    // reads itself unless recent runs were slow, and the requests below never run there).
    r.request(0, 0, 1, 0, 512);
    d.ctl(&["wait_break", "P", "10000"]);
    // FUA writes, each handed to a worker that gets stuck in the kernel (the first in its
    // fdatasync, the others behind it on the lower file's lock, in either call).
    // A connection's workers at most: `MAX_WORKERS` in src/frontend/nbd/conn.rs.
    let stuck = 16 - 1;
    for cookie in 100..100 + stuck as u64 {
        r.request_magic(REQUEST_MAGIC, 1, 1, cookie, 4096, 512, &[0x5a; 512]);
    }
    let in_kernel =
        || d.threads_in_syscall(libc::SYS_fdatasync) + d.threads_in_syscall(libc::SYS_pwrite64);
    assert!(
        wait_for(DEADLINE, || in_kernel() == stuck),
        "{} of {stuck} FUA writes stuck in the kernel",
        in_kernel()
    );
    // R (stuck in the lower mount) and Q behind it, in one send: the reader has both.
    let mut both = Vec::new();
    for (cookie, offset) in [(3u64, 8192u64), (4, 512)] {
        both.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        both.extend_from_slice(&[0, 0, 0, 0]); // flags, command: READ
        both.extend_from_slice(&cookie.to_be_bytes());
        both.extend_from_slice(&offset.to_be_bytes());
        both.extend_from_slice(&512u32.to_be_bytes());
    }
    r.s.write_all(&both).unwrap();
    ctl(&s.mnt, &["wait_break", "A", "10000"]);
    // P's reply must not wait for R.
    d.ctl(&["resume", "P"]);
    assert_eq!(r.reply(512), (0, 1, pattern(MIB)[..512].to_vec()));
    // Then everything else, in whatever order it finishes.
    ctl(&s.mnt, &["clear"]);
    ctl(&s.mnt, &["resume", "A"]);
    let mut got = [r.reply(512), r.reply(512)];
    got.sort_by_key(|g| g.1);
    assert_eq!(got[0], (0, 3, pattern(MIB)[8192..8704].to_vec()));
    assert_eq!(got[1], (0, 4, pattern(MIB)[512..1024].to_vec()));
    // The flushes reached the lower mount one at a time (and some find nothing left to
    // flush there): release whatever is suspended until nothing is.
    drop(ReleaseOnDrop(&s.mnt, &["F"]));
    let mut cookies: Vec<u64> = (0..stuck).map(|_| r.reply(0)).map(|g| g.1).collect();
    cookies.sort();
    assert_eq!(cookies, (100..100 + stuck as u64).collect::<Vec<_>>());
    drop(r);
    assert!(d.stop().success());
    assert!(lower.stop().success());
}

/// A client that breaks the stream (a bad magic, an oversized write) is cut off at once,
/// even with a request of it parked: the connection's end does not wait for that request.
#[test]
fn a_broken_stream_is_cut_off_at_once_with_requests_parked() {
    let s = Scratch::new(MIB);
    let d = Served::start(&s, &[]);
    for bad in [
        (0xdead_beef_u32, 0u16, 0u32), // a bad magic
        (REQUEST_MAGIC, 1, 64 << 20),  // a write over 32 MiB, its payload never sent
    ] {
        d.ctl(&["break", "read_aio", "A"]);
        let mut r = Raw::connect(&d.sock);
        r.request(0, 0, 1, 0, 512);
        d.ctl(&["wait_break", "A", "10000"]);
        r.request_magic(bad.0, bad.1, 0, 2, 0, bad.2, &[]);
        r.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(
            r.closed(),
            "{:#x}: still open while a request is parked",
            bad.0
        );
        d.ctl(&["resume", "A"]);
    }
    // Everyone else is served, and the server stops cleanly.
    let (code, out) = qemu_io(&d.uri(), &["read 0 512"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("read 512/512"), "{out}");
    assert!(d.stop().success());
}

#[test]
fn a_client_that_disconnects_with_requests_parked_leaves_the_server_serving() {
    let s = Scratch::new(MIB);
    let d = Served::start(&s, &[]);
    d.ctl(&["break", "read_aio", "A"]);
    let mut r = Raw::connect(&d.sock);
    r.request(0, 0, 1, 0, 512);
    d.ctl(&["wait_break", "A", "10000"]);
    r.request(0, 0, 2, 512, 512);
    drop(r);
    d.ctl(&["resume", "A"]);
    // Its replies had nowhere to go; everyone else is served.
    let (code, out) = qemu_io(&d.uri(), &["read -P 1 0 512"]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("failed"), "{out}");
    assert!(d.stop().success());
}

#[test]
fn sigterm_with_parked_requests_answers_them_and_exits_0() {
    let s = Scratch::new(MIB);
    let d = Served::start(&s, &[]);
    d.ctl(&["break", "read_aio", "A"]);
    let _lock = exclusive();
    let client = Command::new("qemu-io")
        .args(["-f", "raw", &d.uri(), "-c", "read -P 1 0 512"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io: `bash .ci/run` installs it");
    d.ctl(&["wait_break", "A", "10000"]);
    assert!(d.stop().success());
    let out = client.wait_with_output().unwrap();
    let text = text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("read 512/512"), "{text}");
}

#[test]
fn a_power_cut_loses_exactly_the_unsynced_writes_that_were_not_fua() {
    let s = Scratch::new(MIB);
    let d = Served::start(&s, &["--write-cache"]);
    // W1 plain, W2 FUA (durable when it completes, and with it what came before: a FUA write
    // is a write then a flush), W3 plain: only W3 is unsynced. A raw client, as qemu-io
    // flushes when it closes.
    let mut r = Raw::connect(&d.sock);
    r.write(1, 0, &[0xa1; 4096]);
    assert_eq!(r.reply(0), (0, 1, vec![]));
    r.request_magic(REQUEST_MAGIC, 1, 1, 2, 8192, 4096, &[0xb2; 4096]);
    assert_eq!(r.reply(0), (0, 2, vec![]));
    r.write(3, 16384, &[0xc3; 4096]);
    assert_eq!(r.reply(0), (0, 3, vec![]));
    let unsynced = d.ctl(&["unsynced"]);
    assert!(unsynced.contains("4096 bytes"), "{unsynced}");
    d.ctl(&["power-cut", "lose"]);
    // Off: every command fails with EIO.
    let (_, out) = qemu_io(&d.uri(), &["read 0 512"]);
    assert!(out.contains("read failed: Input/output error"), "{out}");
    assert!(d.stop().success());
    let mut want = pattern(MIB);
    want[0..4096].fill(0xa1);
    want[8192..12288].fill(0xb2);
    same_bytes(&s.image_bytes(), &want, "after the cut");
}

#[test]
fn mount_with_listen_serves_both_front_ends_over_one_mount() {
    let s = Scratch::new(MIB);
    let d = Served::start_cmd(
        &s,
        "mount",
        &[s.image.to_str().unwrap(), s.mnt.to_str().unwrap()],
        &[
            "--inject-error",
            "event=read_aio,errno=EIO,sector=16,once=on",
        ],
    );
    // The `once` rule fires for whichever front end comes first: here NBD.
    let (code, out) = qemu_io(&d.uri(), &["read 8k 512", "write -P 0x77 0 512"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("read failed: Input/output error"), "{out}");
    let f = open_direct(&s.view());
    let mut b = AlignedBuf::new(4096);
    assert_eq!(pread(&f, b.as_mut(), 8192), Ok(4096));
    // What NBD wrote, FUSE reads.
    assert_eq!(pread(&f, b.as_mut(), 0), Ok(4096));
    assert!(b.as_ref()[..512].iter().all(|&x| x == 0x77));
    drop(f);
    assert!(d.stop().success());
    assert!(!is_mounted(&s.mnt));
}

#[test]
fn serve_refuses_a_remote_address_without_allow_remote() {
    let s = Scratch::new(MIB);
    let (code, _, err) = run_cli(&[
        "serve",
        s.image.to_str().unwrap(),
        "--listen",
        "tcp:0.0.0.0:0",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--allow-remote"), "{err}");
    let (code, _, err) = run_cli(&["serve", s.image.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--listen"), "{err}");
}

#[test]
fn over_tcp_fast_zero_is_refused_and_the_trace_names_what_nbd_sent() {
    let s = Scratch::new(MIB);
    let trace = s.dir.path().join("trace.jsonl");
    let d = Served::start(
        &s,
        &[
            "--listen",
            "tcp:127.0.0.1:0",
            "--trace",
            trace.to_str().unwrap(),
            "--inject-error",
            "event=read_aio,errno=ETIMEDOUT,sector=64",
        ],
    );
    // The port the kernel chose, as the log names it.
    let log = d.stderr_with("tcp:127.0.0.1:");
    let port: u16 = log
        .split("tcp:127.0.0.1:")
        .nth(1)
        .and_then(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .unwrap_or_else(|| panic!("no TCP port in the log:\n{log}"));
    let uri = format!("nbd://127.0.0.1:{port}/disk.img");
    let (code, out) = qemu_io(
        &uri,
        &[
            "write -P 171 0 4k",
            "read -P 171 0 4k",
            // FAST_ZERO (`-n`: no slow fallback) is refused with ENOTSUP, and writes nothing.
            "write -z -n 16k 4k",
            "write -z 8k 4k",
            "read -P 0 8k 4k",
            // Sector 64: ETIMEDOUT, which NBD carries as EIO.
            "read 32k 512",
        ],
    );
    assert_eq!(code, 1, "{out}");
    let lines: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("read") || l.starts_with("wrote") || l.contains("failed"))
        .collect();
    assert_eq!(lines.len(), 6, "{out}");
    assert!(lines[0].starts_with("wrote 4096/4096"), "{out}");
    assert!(lines[1].starts_with("read 4096/4096"), "{out}");
    assert_eq!(lines[2], "write failed: Operation not supported", "{out}");
    assert!(lines[3].starts_with("wrote 4096/4096"), "{out}");
    assert!(lines[4].starts_with("read 4096/4096"), "{out}");
    assert_eq!(lines[5], "read failed: Input/output error", "{out}");
    assert!(!out.contains("Pattern verification failed"), "{out}");
    // nbdinfo over TCP: the same export and flags.
    let v: Value = serde_json::from_str(&tool_ok("nbdinfo", &["--json", &uri])).unwrap();
    assert_eq!(v["exports"][0]["export-name"], "disk.img");
    assert_eq!(v["exports"][0]["can_fast_zero"], true);
    assert!(d.stop().success());
    let image = s.image_bytes();
    let want = pattern(MIB);
    assert!(image[..4096].iter().all(|&b| b == 171));
    assert_eq!(image[4096..8192], want[4096..8192]);
    assert!(image[8192..12288].iter().all(|&b| b == 0));
    assert_eq!(image[12288..], want[12288..], "FAST_ZERO wrote something");
    // The trace line of the injected error names both the errno and what NBD sent.
    let text = std::fs::read_to_string(&trace).unwrap();
    let line: Value = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["action"] == "inject-error")
        .unwrap_or_else(|| panic!("no inject-error line:\n{text}"));
    assert_eq!(line["errno"], "ETIMEDOUT", "{line}");
    assert_eq!(line["sent"], "EIO", "{line}");
    assert_eq!(line["offset"], 32768, "{line}");
}

/// A client that stops reading its replies must hold up nothing but itself. Its delayed
/// reads complete on the mount's timer thread, which must never wait for that client's
/// socket: here 64 MiB of replies nobody reads, then another client's delayed read, which
/// must be answered in its 20 ms (the bound is the test's deadline, not a timing claim).
#[test]
fn a_client_that_never_reads_its_replies_stalls_no_one_else() {
    let s = Scratch::new(16 * MIB);
    let d = Served::start(&s, &["--rule", "delay:latency=20ms,iotype=read"]);
    let mut stuck = Raw::connect(&d.sock);
    for cookie in 0..64 {
        stuck.request(0, 0, cookie, (cookie % 16) * MIB as u64, MIB as u32);
    }
    // Let the delays run out: the timer completes them into a socket nobody reads.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let mut other = Raw::connect(&d.sock);
    other.request(0, 0, 99, 0, 512);
    let (error, cookie, data) = other.reply(512);
    assert_eq!((error, cookie), (0, 99), "{}", d.stderr());
    assert_eq!(data, pattern(16 * MIB)[..512].to_vec());
    drop(stuck);
    assert!(d.stop().success());
}

/// A client that stalls in the handshake, or trickles it a byte at a time, is closed once
/// the handshake has taken 10 s in all (qemu-nbd's limit), so idle sockets cannot use up
/// the server's connections; a connection past its handshake may idle for ever.
#[test]
fn a_handshake_that_trickles_past_its_limit_is_closed_and_others_are_served() {
    let s = Scratch::new(MIB);
    let d = Served::start(&s, &[]);
    let mut idle = Raw::connect(&d.sock);
    let mut slow = Raw::greeted(&d.sock);
    slow.s
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    // An option header then its 4 KiB of data, a byte a second: each read's wait is short,
    // only the handshake's whole time is long.
    let mut option = IHAVEOPT.to_be_bytes().to_vec();
    option.extend_from_slice(&7u32.to_be_bytes());
    option.extend_from_slice(&4096u32.to_be_bytes());
    option.resize(option.len() + 4096, 0);
    let started = Instant::now();
    let mut closed = false;
    for byte in option.iter().take(40) {
        if slow.s.write_all(&[*byte]).is_err() || slow.closed() {
            closed = true;
            break;
        }
    }
    assert!(
        closed,
        "still open after a {} s handshake",
        started.elapsed().as_secs()
    );
    // The connection that finished its handshake long ago is still served.
    idle.s.set_read_timeout(Some(DEADLINE)).unwrap();
    idle.request(0, 0, 1, 0, 512);
    let (error, _, _) = idle.reply(512);
    assert_eq!(error, 0, "an error");
    assert!(d.stop().success());
}

/// A read large enough to be served from the image's mapping (128 KiB and more), on
/// storage that fails to read it (here a lower mount failing one sector), gets `EIO` like
/// any other read, and its connection goes on: the failure must not surface only when the
/// reply is sent from the mapping (`EFAULT` half-way through a reply, which ends the
/// connection).
#[test]
fn a_large_read_the_storage_below_fails_gets_eio_and_the_connection_goes_on() {
    let s = Scratch::new(4 * MIB);
    let _lower = mount(
        &s,
        &["--inject-error", "event=read_aio,errno=EIO,sector=4096"],
    );
    let d = Served::start_cmd(&s, "serve", &[s.view().to_str().unwrap()], &[]);
    // Its exit status is its last command's: what happened is in its output.
    let (_, out) = qemu_io(&d.uri(), &["read 2M 1M", "read 1M 1M", "read 2M 64k"]);
    assert_eq!(
        out.matches("read failed: Input/output error").count(),
        2,
        "the 1 MiB and the 64 KiB read over the bad sector fail alike: {out}"
    );
    assert!(
        out.contains("read 1048576/1048576 bytes at offset 1048576"),
        "the connection served the next read: {out}"
    );
    assert!(d.stop().success());
}
