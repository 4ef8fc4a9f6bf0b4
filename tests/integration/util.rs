//! Test harness: an RAII guard around a real `blkdebugfs mount` process, aligned buffers for
//! O_DIRECT, and errno helpers.
//!
//! The guard waits for the mount with a deadline and fails fast (printing the daemon's
//! stderr and the mount table) if the daemon dies first. On drop it stops the daemon it
//! started (SIGTERM by PID), waits for it, and as a last resort detaches the mount and kills
//! the process, so no test leaves a mount or a process behind, even when it fails.
//!
//! Tests that mount run one at a time ([`exclusive`]): every close(2) of a file on a FUSE
//! mount sends FLUSH, including the implicit closes when a forked child of this test process
//! execs, and a child inherits the descriptors of every thread. A process spawned by one test
//! would otherwise fire flush events on another test's mount and arm its rules, consume its
//! `once` rules or hit its breakpoints.

#![allow(dead_code)]

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_blkdebugfs");
pub const DEADLINE: Duration = Duration::from_secs(20);
pub const MIB: usize = 1 << 20;

/// Polls `cond` every 10 ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `path` is a mount point now (from the mount table, which never blocks on FUSE).
pub fn is_mounted(path: &Path) -> bool {
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let wanted = path.to_string_lossy().replace(' ', "\\040");
    // Read as bytes: another mount's path need not be UTF-8.
    let table = std::fs::read("/proc/self/mountinfo").expect("read the mount table");
    String::from_utf8_lossy(&table)
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(wanted.as_str()))
}

pub fn mount_table() -> String {
    String::from_utf8_lossy(&std::fs::read("/proc/self/mounts").unwrap_or_default())
        .lines()
        .filter(|l| l.contains("fuse"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Holds the test process's one mount-and-spawn lock (reentrant: a test that holds it may
/// still spawn). [`Scratch`], [`Daemon`] and [`run_cli`] take it, so while a test has a mount,
/// no other test spawns a process that could close descriptors on it.
pub fn exclusive() -> parking_lot::ReentrantMutexGuard<'static, ()> {
    static LOCK: parking_lot::ReentrantMutex<()> = parking_lot::ReentrantMutex::new(());
    LOCK.lock()
}

/// A scratch directory with an image whose 512-byte sector `i` holds byte `(i % 251) + 1`.
pub struct Scratch {
    pub dir: tempfile::TempDir,
    pub image: PathBuf,
    pub mnt: PathBuf,
    _exclusive: parking_lot::ReentrantMutexGuard<'static, ()>,
}

pub fn pattern(size: usize) -> Vec<u8> {
    (0..size).map(|i| ((i / 512) % 251 + 1) as u8).collect()
}

impl Scratch {
    pub fn new(size: usize) -> Scratch {
        let exclusive = exclusive();
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.img");
        std::fs::write(&image, pattern(size)).expect("write image");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).expect("mkdir mnt");
        Scratch {
            dir,
            image,
            mnt,
            _exclusive: exclusive,
        }
    }

    /// Writes a config file and returns its path.
    pub fn config(&self, text: &str) -> PathBuf {
        let p = self.dir.path().join("rules.ini");
        std::fs::write(&p, text).expect("write config");
        p
    }

    /// The mounted view of the image in the directory layout.
    pub fn view(&self) -> PathBuf {
        self.mnt.join("disk.img")
    }

    pub fn image_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.image).expect("read image")
    }
}

/// Mounts `s.image` on the directory `s.mnt` with `extra` options.
pub fn mount(s: &Scratch, extra: &[&str]) -> Daemon {
    let mut args = vec![s.image.to_str().unwrap(), s.mnt.to_str().unwrap()];
    args.extend_from_slice(extra);
    Daemon::start(&s.mnt, &args)
}

/// A running `blkdebugfs mount`; see the module doc.
pub struct Daemon {
    child: Option<Child>,
    pub mountpoint: PathBuf,
    stderr_path: PathBuf,
    args: Vec<String>,
    _exclusive: parking_lot::ReentrantMutexGuard<'static, ()>,
}

impl Daemon {
    /// Starts `blkdebugfs mount ARGS` (ARGS include image and mount point) and waits until
    /// `mountpoint` is mounted.
    pub fn start(mountpoint: &Path, args: &[&str]) -> Daemon {
        Daemon::start_with(mountpoint, args, |_| {})
    }

    /// [`Daemon::start`], letting `configure` adjust the command first (a umask, say).
    pub fn start_with(
        mountpoint: &Path,
        args: &[&str],
        configure: impl FnOnce(&mut Command),
    ) -> Daemon {
        let exclusive = exclusive();
        let stderr_path = mountpoint.with_extension(format!("stderr.{}", rand_suffix()));
        let stderr = File::create(&stderr_path).expect("stderr file");
        let mut cmd = Command::new(BIN);
        cmd.arg("mount")
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        configure(&mut cmd);
        let child = cmd.spawn().expect("spawn blkdebugfs");
        let mut d = Daemon {
            child: Some(child),
            mountpoint: mountpoint.to_path_buf(),
            stderr_path,
            args: args.iter().map(|s| s.to_string()).collect(),
            _exclusive: exclusive,
        };
        let up = wait_for(DEADLINE, || {
            if let Some(status) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "blkdebugfs mount {:?} exited with {status} before mounting:\n{}\nmounts:\n{}",
                    d.args,
                    d.stderr(),
                    mount_table()
                );
            }
            is_mounted(mountpoint)
        });
        if !up {
            panic!(
                "blkdebugfs mount {:?} did not mount within {DEADLINE:?}:\n{}\nmounts:\n{}",
                d.args,
                d.stderr(),
                mount_table()
            );
        }
        d
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(-1)
    }

    /// The daemon's stderr pipe, when `start_with` made it one (`Stdio::piped()`).
    pub fn take_stderr_pipe(&mut self) -> Option<std::process::ChildStderr> {
        self.child.as_mut().and_then(|c| c.stderr.take())
    }

    /// The daemon's stderr so far (its log).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// The daemon's stderr once it contains `needle`, or after [`DEADLINE`] without it (for
    /// the caller's assert to show): lines reach stderr through the daemon's log writer
    /// thread, a moment after the request they are about has been answered.
    pub fn stderr_with(&self, needle: &str) -> String {
        let mut log = String::new();
        wait_for(DEADLINE, || {
            log = self.stderr();
            log.contains(needle)
        });
        log
    }

    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: kill on the PID of the child we spawned and have not reaped.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// Waits for the daemon to exit (with a deadline) and returns its status.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("daemon already reaped");
        let mut status = None;
        let exited = wait_for(DEADLINE, || {
            status = child.try_wait().expect("try_wait");
            status.is_some()
        });
        assert!(
            exited,
            "blkdebugfs did not exit within {DEADLINE:?}:\n{}",
            self.stderr()
        );
        self.child = None;
        status.expect("status")
    }

    /// SIGTERM, then wait for a clean exit; returns the exit status.
    pub fn stop(mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.wait_exit()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        if child.try_wait().ok().flatten().is_none() {
            // SAFETY: kill on our own unreaped child's PID.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let exited = wait_for(Duration::from_secs(10), || {
                child.try_wait().ok().flatten().is_some()
            });
            if !exited {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(&self.mountpoint)
                    .status();
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}

fn rand_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Runs `blkdebugfs ARGS` to completion; returns (status code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env("RUST_LOG", "warn");
    code_and_text(&output(&mut cmd, "blkdebugfs"))
}

/// `blkdebugfs ctl TARGET WORDS...`, asserting success; returns stdout.
pub fn ctl(target: &Path, words: &[&str]) -> String {
    let mut args = vec!["ctl", target.to_str().unwrap()];
    args.extend_from_slice(words);
    let (code, out, err) = run_cli(&args);
    assert_eq!(code, 0, "ctl {words:?} failed: {err}");
    out
}

/// Runs `cmd` to completion under the test lock (see [`exclusive`]), stdin from /dev/null.
/// Panics with a clear message when the program is not installed (`bash .ci/run` installs
/// every tool the tests use).
pub fn output(cmd: &mut Command, what: &str) -> Output {
    let _exclusive = exclusive();
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what} ({e}): `bash .ci/run` installs it"))
}

/// Stdout followed by stderr, as text.
pub fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

fn code_and_text(out: &Output) -> (i32, String, String) {
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs an external tool to completion; returns (status code, stdout, stderr).
pub fn run_tool(program: &str, args: &[&str]) -> (i32, String, String) {
    code_and_text(&output(Command::new(program).args(args), program))
}

/// Like [`run_tool`], asserting success; returns stdout.
pub fn tool_ok(program: &str, args: &[&str]) -> String {
    let (code, out, err) = run_tool(program, args);
    assert_eq!(code, 0, "{program} {args:?} failed:\n{out}\n{err}");
    out
}

/// A 4096-aligned buffer for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len.max(4096), 4096).unwrap();
        // SAFETY: non-zero size layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        AlignedBuf { ptr, len }
    }

    pub fn filled(len: usize, byte: u8) -> AlignedBuf {
        let mut b = AlignedBuf::new(len);
        b.as_mut().fill(byte);
        b
    }

    pub fn as_ref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for our lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.len.max(4096), 4096).unwrap();
        // SAFETY: allocated with this layout in new().
        unsafe { std::alloc::dealloc(self.ptr, layout) };
    }
}

// SAFETY: the buffer is plain owned memory.
unsafe impl Send for AlignedBuf {}

pub fn open_direct(path: &Path) -> File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .unwrap_or_else(|e| panic!("open O_DIRECT {}: {e}", path.display()))
}

pub fn open_rw(path: &Path) -> File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// `Ok(n)` or the errno of a syscall result.
pub fn sys(r: isize) -> Result<usize, i32> {
    if r < 0 {
        Err(io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(r as usize)
    }
}

pub fn pread(f: &File, buf: &mut [u8], off: u64) -> Result<usize, i32> {
    // SAFETY: buf is valid for writes of its length.
    sys(unsafe {
        libc::pread(
            f.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            off as i64,
        )
    })
}

pub fn pwrite(f: &File, buf: &[u8], off: u64) -> Result<usize, i32> {
    // SAFETY: buf is valid for reads of its length.
    sys(unsafe { libc::pwrite(f.as_raw_fd(), buf.as_ptr().cast(), buf.len(), off as i64) })
}

pub fn fsync(f: &File) -> Result<usize, i32> {
    // SAFETY: plain syscall on an open descriptor.
    sys(unsafe { libc::fsync(f.as_raw_fd()) } as isize)
}

pub fn fdatasync(f: &File) -> Result<usize, i32> {
    // SAFETY: plain syscall on an open descriptor.
    sys(unsafe { libc::fdatasync(f.as_raw_fd()) } as isize)
}

/// close(2) with its result (a FUSE flush error shows up here).
pub fn close(f: File) -> Result<usize, i32> {
    use std::os::fd::IntoRawFd;
    let fd = f.into_raw_fd();
    // SAFETY: we own fd and close it exactly once.
    sys(unsafe { libc::close(fd) } as isize)
}

pub fn fallocate(f: &File, mode: i32, off: u64, len: u64) -> Result<usize, i32> {
    // SAFETY: plain syscall on an open descriptor.
    sys(unsafe { libc::fallocate(f.as_raw_fd(), mode, off as i64, len as i64) } as isize)
}

pub fn lseek(f: &File, off: u64, whence: i32) -> Result<usize, i32> {
    // SAFETY: plain syscall on an open descriptor.
    sys(unsafe { libc::lseek(f.as_raw_fd(), off as i64, whence) } as isize)
}

pub const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
pub const ZERO: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

// ------------------------------------------------------------- real clients, kernel objects

/// Runs fio on `view` with O_DIRECT, 4 KiB blocks over the first 4 MiB, and `extra` options;
/// returns its exit code and its output (stdout then stderr).
pub fn fio(view: &Path, engine: &str, extra: &[&str]) -> (i32, String) {
    let name = format!("--filename={}", view.to_str().unwrap());
    let engine = format!("--ioengine={engine}");
    let mut args = vec![
        "--name=blkdebugfs",
        name.as_str(),
        engine.as_str(),
        "--direct=1",
        "--bs=4k",
        "--size=4M",
    ];
    args.extend_from_slice(extra);
    let (code, out, err) = run_tool("fio", &args);
    (code, out + &err)
}

/// A loop device attached to a file; detached on drop.
pub struct LoopDevice(pub String);

impl LoopDevice {
    pub fn attach(file: &Path, direct_io: bool) -> LoopDevice {
        let dio = format!("--direct-io={}", if direct_io { "on" } else { "off" });
        let dev = tool_ok(
            "losetup",
            &["--find", "--show", &dio, file.to_str().unwrap()],
        );
        LoopDevice(dev.trim().to_string())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = run_tool("losetup", &["-d", &self.0]);
    }
}

/// A filesystem mounted from a device; unmounted (lazily if need be) on drop.
pub struct FsMount(pub PathBuf);

impl FsMount {
    pub fn mount(dev: &str, at: &Path) -> FsMount {
        std::fs::create_dir_all(at).unwrap();
        tool_ok("mount", &[dev, at.to_str().unwrap()]);
        FsMount(at.to_path_buf())
    }

    pub fn unmount(self) {
        tool_ok("umount", &[self.0.to_str().unwrap()]);
        std::mem::forget(self);
    }
}

impl Drop for FsMount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = run_tool("umount", &["-l", self.0.to_str().unwrap()]);
        }
    }
}

/// Marks the kernel log so that only lines after the mark are searched.
pub fn kernel_log_mark() -> String {
    let mark = format!(
        "blkdebugfs-test-mark-{}-{:?}",
        std::process::id(),
        std::time::Instant::now()
    );
    std::fs::write("/dev/kmsg", &mark).expect("write /dev/kmsg");
    mark
}

/// The kernel log from `mark` on (all of it when the mark has scrolled out).
pub fn kernel_log_since(mark: &str) -> String {
    let log = tool_ok("dmesg", &[]);
    match log.rfind(mark) {
        Some(at) => log[at..].to_string(),
        None => log,
    }
}

/// Reads up to `len` bytes at `offset` with O_DIRECT-friendly alignment; the bytes read, or
/// the errno.
pub fn read_at(f: &File, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
    let mut b = AlignedBuf::new(len);
    let n = pread(f, b.as_mut(), offset)?;
    Ok(b.as_ref()[..n].to_vec())
}

/// Asserts that two byte strings are equal, naming the first difference (never printing
/// megabytes).
#[track_caller]
pub fn same_bytes(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

/// Every field of every trace line is one `blkdebugfs::trace::FIELDS` documents (the table
/// the section-5 man page prints): a field added to the trace must be described there.
pub fn assert_trace_fields_documented(lines: &[serde_json::Value]) {
    for line in lines {
        for key in line.as_object().expect("a trace line is an object").keys() {
            assert!(
                blkdebugfs::trace::FIELDS.iter().any(|(f, _)| f == key),
                "trace field {key:?} is not in trace::FIELDS (add what it means there):\n{line}"
            );
        }
    }
}
