//! blkdebugfs: a FUSE view of a disk image that injects faults by QEMU blkdebug's rules.
//!
//! [`prepare`] validates everything a mount needs (rules, limits, image, mount point) without
//! touching the mount table; [`run`] mounts, serves until [`Shutdown`] is triggered or the
//! mount point is unmounted, then flushes the image and returns. Tests and the `demo`
//! subcommand call these in-process; `main.rs` is a thin CLI around them.
//!
//! Where things live: `rules.rs` (engine), `config.rs` (rule syntax), `ops.rs` (per-operation
//! event sequences), `mount.rs` (state + executor), `fs.rs` (FUSE adapter).

pub mod breakpoints;
pub mod buffers;
pub mod config;
pub mod control;
pub mod demo;
pub mod errno;
pub mod fs;
pub mod mount;
pub mod ops;
pub mod rules;

use std::fmt;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use log::{info, warn};
use parking_lot::{Condvar, Mutex};

use crate::config::{ConfigError, Limits};
use crate::control::{Control, ReloadSource};
use crate::fs::{BlkdebugFs, Layout, OpenPolicy};
use crate::mount::{ImageMode, Mount};
use crate::rules::{Engine, Event, Rule};

/// Everything a mount is made of, as parsed from the command line.
#[derive(Clone, Debug)]
pub struct MountOptions {
    pub image: PathBuf,
    pub mountpoint: PathBuf,
    /// Rules in written order (config file first, then command line).
    pub rules: Vec<Rule>,
    pub limits: Limits,
    pub read_only: bool,
    pub growable: bool,
    pub cache: bool,
    /// FUSE worker threads.
    pub threads: usize,
    pub allow_other: bool,
    /// Also serve control commands on a UNIX socket here (`--control`).
    pub control_socket: Option<PathBuf>,
    /// Resume requests suspended longer than this (`--max-suspend`).
    pub max_suspend: Option<Duration>,
    /// Where `reload` (and SIGHUP) re-read the rules from.
    pub reload: ReloadSource,
}

impl MountOptions {
    /// Options with defaults: no rules, no limits, direct I/O, one worker per CPU.
    pub fn new(image: impl Into<PathBuf>, mountpoint: impl Into<PathBuf>) -> MountOptions {
        MountOptions {
            image: image.into(),
            mountpoint: mountpoint.into(),
            rules: Vec::new(),
            limits: Limits::default(),
            read_only: false,
            growable: false,
            cache: false,
            threads: default_threads(),
            allow_other: false,
            control_socket: None,
            max_suspend: None,
            reload: ReloadSource::default(),
        }
    }
}

/// One worker per CPU.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

/// Why a mount could not be made. [`Error::exit_code`] maps each to the documented status.
#[derive(Debug)]
pub enum Error {
    /// Bad rules, config file or limit options (exit 2).
    Config(Box<ConfigError>),
    /// Bad command-line usage not caught by the parser (exit 2).
    Usage(String),
    /// The image is missing, unreadable or not a regular file (exit 1).
    Image { path: PathBuf, why: String },
    /// The mount point is missing, of the wrong type or already mounted (exit 1).
    Mountpoint { path: PathBuf, why: String },
    /// The kernel refused the mount or the session failed (exit 1).
    Fuse {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A control command was refused or failed (`blkdebugfs ctl`, exit 1).
    Ctl(String),
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) | Error::Usage(_) => 2,
            _ => 1,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(e) => write!(f, "{e}"),
            Error::Usage(e) => f.write_str(e),
            Error::Image { path, why } => write!(f, "image {}: {why}", path.display()),
            Error::Mountpoint { path, why } => {
                write!(f, "mount point {}: {why}", path.display())
            }
            Error::Fuse { path, source } => {
                write!(f, "FUSE mount at {}: {source}", path.display())
            }
            Error::Ctl(e) => f.write_str(e),
        }
    }
}

impl std::error::Error for Error {}

impl From<ConfigError> for Error {
    fn from(e: ConfigError) -> Self {
        Error::Config(Box::new(e))
    }
}

/// A one-way "stop now" flag that threads can wait on. Cloning shares it.
#[derive(Clone, Default)]
pub struct Shutdown(Arc<(Mutex<bool>, Condvar)>);

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    pub fn trigger(&self) {
        *self.0.0.lock() = true;
        self.0.1.notify_all();
    }

    pub fn is_triggered(&self) -> bool {
        *self.0.0.lock()
    }

    pub fn wait(&self) {
        let mut stop = self.0.0.lock();
        while !*stop {
            self.0.1.wait(&mut stop);
        }
    }
}

/// A validated mount, ready to run: the image is open and the mount point checked.
pub struct Prepared {
    options: MountOptions,
    image: File,
    layout: Layout,
    mountpoint: PathBuf,
}

/// Validates options and opens the image. Nothing is mounted.
pub fn prepare(options: MountOptions) -> Result<Prepared, Error> {
    options.limits.validate()?;
    let image_err = |why: String| Error::Image {
        path: options.image.clone(),
        why,
    };
    let md = std::fs::metadata(&options.image).map_err(|e| image_err(e.to_string()))?;
    if !md.file_type().is_file() {
        return Err(image_err("not a regular file".into()));
    }
    let image = OpenOptions::new()
        .read(true)
        .write(!options.read_only)
        .open(&options.image)
        .map_err(|e| image_err(format!("cannot open: {e}")))?;

    let mp_err = |why: String| Error::Mountpoint {
        path: options.mountpoint.clone(),
        why,
    };
    let mp_md = std::fs::metadata(&options.mountpoint).map_err(|e| mp_err(e.to_string()))?;
    let mountpoint = options
        .mountpoint
        .canonicalize()
        .map_err(|e| mp_err(e.to_string()))?;
    let layout = if mp_md.is_dir() {
        let name = options
            .image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| image_err("has no file name".into()))?;
        Layout::Directory { name }
    } else if mp_md.file_type().is_file() {
        if mp_md.dev() == md.dev() && mp_md.ino() == md.ino() {
            return Err(mp_err("is the image itself".into()));
        }
        Layout::File
    } else if mp_md.file_type().is_block_device() || mp_md.file_type().is_char_device() {
        return Err(mp_err(
            "is a device, not a directory or regular file".into(),
        ));
    } else {
        return Err(mp_err("is neither a directory nor a regular file".into()));
    };
    if is_mount_point(&mountpoint) {
        return Err(mp_err("is already a mount point (unmount it first)".into()));
    }
    Ok(Prepared {
        options,
        image,
        layout,
        mountpoint,
    })
}

/// The `major:minor` device of the filesystem mounted at `path` (canonical), from the mount
/// table (which, unlike stat, never sends a request to a FUSE server).
fn mounted_device(path: &Path) -> Option<String> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let wanted = path.to_string_lossy();
    table.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let mp = unescape_mount_path(fields.get(4)?);
        (mp == wanted).then(|| fields.get(2).map(|d| d.to_string()))?
    })
}

/// Whether `path` (canonical) is the mount point of a mounted filesystem.
fn is_mount_point(path: &Path) -> bool {
    mounted_device(path).is_some()
}

/// The FUSE connection id of a mount: the minor number of its `major:minor` device.
fn fuse_connection(device: &str) -> Option<u32> {
    device.split_once(':')?.1.parse().ok()
}

/// Undoes the octal escapes of /proc/self/mountinfo (`\040` for a space).
fn unescape_mount_path(field: &str) -> String {
    let mut out = Vec::new();
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 4 <= bytes.len()
            && let Ok(v) = u8::from_str_radix(&field[i + 1..i + 4], 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a filesystem with device `major:minor` is in the mount table.
fn device_mounted(device: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .is_ok_and(|t| t.lines().any(|l| l.split(' ').nth(2) == Some(device)))
}

/// Triggers the shutdown when our mount leaves the mount table from outside. A lazy
/// `umount -l` while a client holds the file open takes the mount out of the namespace but
/// keeps the FUSE connection, and the kernel tells the daemon nothing: without this watch,
/// suspended requests (and so the client and the daemon) would wait for a signal. The mount
/// table reports every change with POLLPRI, so the thread sleeps until one happens; dropping
/// the watch wakes and joins it.
struct DetachWatch {
    wake: std::os::unix::net::UnixStream,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DetachWatch {
    fn start(device: String, shutdown: Shutdown) -> std::io::Result<DetachWatch> {
        use std::os::fd::AsRawFd;
        let table = File::open("/proc/self/mountinfo")?;
        let (wake, woken) = std::os::unix::net::UnixStream::pair()?;
        let thread = std::thread::Builder::new()
            .name("blkdebugfs-detach".into())
            .spawn(move || {
                loop {
                    let mut fds = [
                        libc::pollfd {
                            fd: table.as_raw_fd(),
                            events: libc::POLLPRI,
                            revents: 0,
                        },
                        libc::pollfd {
                            fd: woken.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        },
                    ];
                    // SAFETY: poll on two descriptors this thread owns, no timeout.
                    let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
                    if r < 0
                        && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted
                        || fds[1].revents != 0
                    {
                        return;
                    }
                    if fds[0].revents != 0 && !device_mounted(&device) {
                        info!("the mount was detached from outside: shutting down");
                        shutdown.trigger();
                        return;
                    }
                }
            })?;
        Ok(DetachWatch {
            wake,
            thread: Some(thread),
        })
    }
}

impl Drop for DetachWatch {
    fn drop(&mut self) {
        let _ = self.wake.shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// When clients still hold files open and a plain unmount fails, detaches the mount and
/// aborts the FUSE connection so that nothing can keep the daemon alive (clients get
/// ENOTCONN).
fn force_unmount(path: &Path, connection: Option<u32>) {
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: umount2 with a valid C string.
    unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) };
    if let Some(conn) = connection {
        let abort = format!("/sys/fs/fuse/connections/{conn}/abort");
        if let Err(e) = std::fs::write(&abort, "1") {
            warn!("could not abort FUSE connection {conn}: {e}");
        }
    }
}

/// Mounts and serves until `shutdown` is triggered or the mount point is unmounted, then
/// releases every suspended request, flushes the image and unmounts. `on_ready` runs once
/// the mount is live (the kernel handshake is done and the `none` event has fired), with the
/// mount's control endpoint (for signals).
pub fn run(
    prepared: Prepared,
    shutdown: Shutdown,
    on_ready: impl FnOnce(Arc<Control>),
) -> Result<(), Error> {
    let Prepared {
        options,
        image,
        layout,
        mountpoint,
    } = prepared;
    let engine = Engine::new(options.rules.clone());
    let mode = ImageMode {
        read_only: options.read_only,
        growable: options.growable,
    };
    let mount = Arc::new(
        Mount::new(engine, image, options.image.clone(), options.limits, mode).map_err(|e| {
            Error::Image {
                path: options.image.clone(),
                why: format!("stat failed: {e}"),
            }
        })?,
    );
    let control = Arc::new(Control::new(mount.clone(), options.reload.clone()));
    let socket = match &options.control_socket {
        Some(path) => Some(ControlSocket::bind(path, control.clone())?),
        None => None,
    };
    let fs = BlkdebugFs::new(
        control.clone(),
        layout,
        OpenPolicy {
            cache: options.cache,
        },
    );

    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(format!("blkdebugfs:{}", options.image.display())),
        fuser::MountOption::Subtype("blkdebugfs".into()),
        fuser::MountOption::DefaultPermissions,
    ];
    if options.read_only {
        config.mount_options.push(fuser::MountOption::RO);
    }
    if options.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(options.threads.max(1));
    config.clone_fd = true;

    // `none` fires once at mount start, before any request can arrive.
    mount.fire(Event::None);
    let mut session =
        fuser::Session::new(fs, &mountpoint, &config).map_err(|source| Error::Fuse {
            path: mountpoint.clone(),
            source,
        })?;
    // Never stat the mount point here: no worker serves requests until `run` below.
    let device = mounted_device(&mountpoint);
    let connection = device.as_deref().and_then(fuse_connection);
    let detach_watch = match &device {
        Some(d) => Some(
            DetachWatch::start(d.clone(), shutdown.clone()).map_err(|source| Error::Fuse {
                path: mountpoint.clone(),
                source,
            })?,
        ),
        None => None,
    };
    info!(
        "serving {} at {} ({} rules, {} workers)",
        options.image.display(),
        mountpoint.display(),
        options.rules.len(),
        options.threads
    );
    let timer = {
        let mount = mount.clone();
        let max_suspend = options.max_suspend;
        std::thread::Builder::new()
            .name("blkdebugfs-timer".into())
            .spawn(move || timer_loop(&mount, max_suspend))
            .map_err(|source| Error::Fuse {
                path: mountpoint.clone(),
                source,
            })?
    };
    on_ready(control);

    // The session serves on its own threads; this thread waits for the end: a shutdown
    // request, or the session ending because the mount point was unmounted from outside.
    let mut unmounter = session.unmount_callable();
    let (ended_tx, ended_rx) = std::sync::mpsc::channel();
    let server = {
        let shutdown = shutdown.clone();
        std::thread::Builder::new()
            .name("blkdebugfs-session".into())
            .spawn(move || {
                let served = session.run();
                let _ = ended_tx.send(served);
                shutdown.trigger();
            })
            .map_err(|source| Error::Fuse {
                path: mountpoint.clone(),
                source,
            })?
    };
    shutdown.wait();
    // Suspended requests complete normally before the mount goes away.
    mount.release_everything();
    let _ = timer.join();
    drop(socket);
    drop(detach_watch);
    let detached = device.as_deref().is_some_and(|d| !device_mounted(d));
    let served = match ended_rx.try_recv() {
        Ok(served) => Some(served),
        Err(_) => {
            // Unmounted lazily from outside: nothing is left to unmount.
            if !detached && let Err(e) = unmounter.unmount() {
                warn!(
                    "unmount of {} failed ({e}); detaching it",
                    mountpoint.display()
                );
                force_unmount(&mountpoint, connection);
            }
            // Once detached, open files can keep the connection alive; the process exiting
            // (closing /dev/fuse) ends it for good, so do not wait for them forever.
            ended_rx.recv_timeout(Duration::from_secs(2)).ok()
        }
    };
    if let Err(e) = mount.image().sync_data() {
        warn!("final flush of {} failed: {e}", options.image.display());
    }
    match served {
        Some(served) => {
            let _ = server.join();
            info!("unmounted {}", mountpoint.display());
            served.map_err(|source| Error::Fuse {
                path: mountpoint,
                source,
            })
        }
        None => {
            warn!(
                "{} detached; clients still holding it open get ENOTCONN once we exit",
                mountpoint.display()
            );
            Ok(())
        }
    }
}

/// Times out `wait_break` waiters and runs the `--max-suspend` watchdog, sleeping until the
/// next deadline. Ends when the breakpoints close (shutdown).
fn timer_loop(mount: &Mount, max_suspend: Option<Duration>) {
    let bp = &mount.breakpoints;
    while !bp.is_closed() {
        let seen = bp.changes();
        let mut next = bp.expire_waiters();
        if let Some(limit) = max_suspend {
            mount.resume_older_than(limit);
            if let Some(due) = bp.oldest_parked().map(|oldest| oldest + limit) {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        bp.sleep_until(next, seen);
    }
}

/// The `--control` UNIX socket: one thread accepts, one thread per connection serves
/// [`Control::serve_stream`]. Dropping it stops accepting and removes the socket file.
struct ControlSocket {
    path: PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl ControlSocket {
    fn bind(path: &Path, control: Arc<Control>) -> Result<ControlSocket, Error> {
        let bad = |why: String| Error::Usage(format!("control socket {}: {why}", path.display()));
        if let Ok(md) = std::fs::symlink_metadata(path) {
            if !md.file_type().is_socket() {
                return Err(bad("exists and is not a socket".into()));
            }
            // A stale socket from a previous run: nobody answers on it.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(bad("another daemon is listening on it".into()));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener =
            std::os::unix::net::UnixListener::bind(path).map_err(|e| bad(e.to_string()))?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("blkdebugfs-ctl".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stopped.load(std::sync::atomic::Ordering::Acquire) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let control = control.clone();
                    let _ = std::thread::Builder::new()
                        .name("blkdebugfs-ctl-conn".into())
                        .spawn(move || {
                            let Ok(reader) = conn.try_clone() else { return };
                            let _ = control.serve_stream(std::io::BufReader::new(reader), conn);
                        });
                }
            })
            .map_err(|e| bad(e.to_string()))?;
        Ok(ControlSocket {
            path: path.to_path_buf(),
            stop,
        })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        // Wake the accept loop so it sees the flag, then remove the socket file.
        let _ = std::os::unix::net::UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Polls `cond` until it holds or `timeout` passes. For callers that must wait on an outside
/// effect (the mount table) that offers no notification.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
