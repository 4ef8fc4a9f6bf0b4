//! The NBD front end (`spec/nbd.md`): the same [`Mount`] served over the Network Block Device
//! protocol, to QEMU, `qemu-img`, `qemu-io`, `nbdcopy`, `nbdinfo`, `nbdfuse`, `fio
//! --ioengine=nbd` and the kernel's `nbd-client`, over unix sockets and TCP.
//!
//! - `proto.rs`: the wire format, pure (constants, encoding, decoding, the errno mapping)
//! - `handshake.rs`: fixed newstyle option negotiation, one state machine per connection
//! - `conn.rs`: the transmission phase: up to 16 workers per connection taking turns at
//!   reading its socket, each running the request it read; replies sent
//!   whole under a per-connection writer lock, out of order, by cookie
//! - `sock.rs`: the socket both use
//! - this file: what to listen on ([`Listen`]), binding ([`Listeners`], before the daemon
//!   forks), and the server ([`NbdServer`]): accept threads, the connection registry, stop
//!
//! Each command runs its FUSE twin's plan through the same `Mount` verbs, so rules mean the
//! same whichever front end a request came by: `READ` is a read, `WRITE` a write (with `FUA`,
//! followed by a flush before the reply), `FLUSH` an fsync, `WRITE_ZEROES` a zero-range
//! fallocate, `TRIM` a punch-hole fallocate (a discard), `BLOCK_STATUS` `SEEK_DATA` then
//! `SEEK_HOLE`. Errnos NBD does not carry are sent as `EIO` (`EDQUOT`, `EFBIG` as
//! `ENOSPC`); the log names both, and so does the trace (`sent`, through the requests'
//! [`Caller`](crate::mount::Caller)). `FAST_ZERO` is refused with `ENOTSUP` before anything
//! runs: a write-zeroes here is never guaranteed fast (rules, the write cache's journal, a
//! fallback to writing zeroes).
//!
//! A connection must finish its handshake within [`HANDSHAKE_LIMIT`] in all (qemu-nbd's
//! default): the accept threads close the ones that take longer, so clients that connect
//! and stall, or trickle the handshake a byte at a time, cannot use up [`MAX_CONNECTIONS`].
//! Past its handshake a connection may idle for ever, as NBD clients do.
//!
//! Stop ([`NbdServer::stop`], after the mount released every parked request): no more
//! accepts; each connection stops reading, its requests in flight reply, then it closes; a
//! connection whose client does not read its replies is cut after a grace period. Unix
//! sockets are removed.
//!
//! May import: `mount/` only.

mod conn;
mod handshake;
mod pace;
mod proto;
mod sock;

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufReader};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use parking_lot::{Condvar, Mutex};

use crate::mount::Mount;
use conn::Conn;
use handshake::{Ended, Export};
use sock::Sock;

/// Connections served at once; more are closed at accept, with a warning.
const MAX_CONNECTIONS: usize = 512;
/// How long a stopping server waits for its connections' requests to reply before it cuts
/// the connections whose clients do not read.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a connection's whole handshake may take (qemu-nbd's `--handshake-limit`
/// default); checked by the accept threads every [`HANDSHAKE_CHECK`].
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);
const HANDSHAKE_CHECK: Duration = Duration::from_secs(1);

/// One `--listen` address: `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    /// `HOST:PORT` as given (`127.0.0.1:10809`, `[::1]:10809`, `localhost:10809`).
    Tcp(String),
}

impl FromStr for Listen {
    type Err = String;

    fn from_str(text: &str) -> Result<Listen, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err("unix: needs a socket path (unix:PATH)".into());
            }
            return Ok(Listen::Unix(PathBuf::from(path)));
        }
        if let Some(addr) = text.strip_prefix("tcp:") {
            match addr.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    return Ok(Listen::Tcp(addr.to_string()));
                }
                _ => {
                    return Err(format!(
                        "'{text}': give tcp:HOST:PORT, e.g. tcp:127.0.0.1:10809"
                    ));
                }
            }
        }
        Err(format!(
            "'{text}': give unix:PATH or tcp:HOST:PORT (e.g. unix:disk.sock, tcp:127.0.0.1:10809)"
        ))
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// What `--listen`, `--allow-remote` and `--export` say.
#[derive(Clone, Debug, Default)]
pub struct NbdOptions {
    pub listen: Vec<Listen>,
    /// Serve on TCP addresses other than loopback (NBD has no authentication here).
    pub allow_remote: bool,
    /// The export's name (default: the image's file name).
    pub export: Option<String>,
}

/// Why listening failed.
#[derive(Debug)]
pub enum ListenError {
    /// A TCP address that is not loopback, without `--allow-remote` (a usage error).
    Remote(String),
    /// The address could not be bound or resolved.
    Bind(String),
}

impl fmt::Display for ListenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenError::Remote(e) | ListenError::Bind(e) => f.write_str(e),
        }
    }
}

enum Bound {
    Unix {
        listener: UnixListener,
        path: PathBuf,
        /// The socket file's identity, so only our own socket is removed at exit.
        id: (u64, u64),
    },
    Tcp {
        listener: TcpListener,
        addr: SocketAddr,
    },
}

impl Bound {
    fn fd(&self) -> RawFd {
        match self {
            Bound::Unix { listener, .. } => listener.as_raw_fd(),
            Bound::Tcp { listener, .. } => listener.as_raw_fd(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Bound::Unix { path, .. } => format!("unix:{}", path.display()),
            Bound::Tcp { addr, .. } => format!("tcp:{addr}"),
        }
    }
}

/// Sockets bound and listening, not yet served. Binding happens before the daemon forks
/// (a bad address is reported by the command that gave it); dropping them removes the unix
/// sockets.
#[derive(Default)]
pub struct Listeners {
    bound: Vec<Bound>,
}

impl Listeners {
    /// Binds every address of `options` (none: no NBD server).
    pub fn bind(options: &NbdOptions) -> Result<Listeners, ListenError> {
        let mut out = Listeners::default();
        for listen in &options.listen {
            let bound = match listen {
                Listen::Unix(path) => bind_unix(path)?,
                Listen::Tcp(addr) => bind_tcp(addr, options.allow_remote)?,
            };
            out.bound.push(bound);
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.bound.is_empty()
    }

    /// The addresses, as the log names them.
    pub fn describe(&self) -> String {
        let all: Vec<String> = self.bound.iter().map(Bound::describe).collect();
        all.join(", ")
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        for b in &self.bound {
            if let Bound::Unix { path, id, .. } = b {
                let ours = std::fs::symlink_metadata(path).is_ok_and(|m| (m.dev(), m.ino()) == *id);
                if ours {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

/// Binds a unix socket at `path`, mode 0600 from its first moment: it is bound in a private
/// directory beside `path`, made 0600 there, then renamed into place. A stale socket (one
/// nobody accepts on) is replaced; a live one, or any other file, is refused.
fn bind_unix(path: &Path) -> Result<Bound, ListenError> {
    let err = |why: String| ListenError::Bind(format!("--listen unix:{}: {why}", path.display()));
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if !md.file_type().is_socket() {
            return Err(err("exists and is not a socket".into()));
        }
        match UnixStream::connect(path) {
            Ok(_) => return Err(err("another server is listening there".into())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                debug!("replacing the stale socket {}", path.display());
                std::fs::remove_file(path).map_err(|e| err(e.to_string()))?;
            }
            Err(e) => return Err(err(e.to_string())),
        }
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let private = tempfile::Builder::new()
        .prefix(".blkdebugfs-nbd")
        .tempdir_in(parent)
        .map_err(|e| err(format!("cannot make a directory beside it: {e}")))?;
    let staged = private.path().join("sock");
    let listener = UnixListener::bind(&staged).map_err(|e| err(e.to_string()))?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err(e.to_string()))?;
    std::fs::rename(&staged, path).map_err(|e| err(e.to_string()))?;
    let md = std::fs::symlink_metadata(path).map_err(|e| err(e.to_string()))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| err(e.to_string()))?;
    Ok(Bound::Unix {
        listener,
        path: path.to_path_buf(),
        id: (md.dev(), md.ino()),
    })
}

fn bind_tcp(addr: &str, allow_remote: bool) -> Result<Bound, ListenError> {
    let err = |why: String| ListenError::Bind(format!("--listen tcp:{addr}: {why}"));
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| err(format!("cannot resolve: {e}")))?
        .collect();
    let Some(first) = addrs.first().copied() else {
        return Err(err("resolves to no address".into()));
    };
    if !allow_remote && let Some(remote) = addrs.iter().find(|a| !a.ip().is_loopback()) {
        return Err(ListenError::Remote(format!(
            "--listen tcp:{addr}: {} is not a loopback address, and NBD has no \
             authentication here: anyone who can reach it can read and write the image. \
             Give --allow-remote to serve it anyway (on a network you trust)",
            remote.ip()
        )));
    }
    let listener = TcpListener::bind(first).map_err(|e| err(e.to_string()))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| err(e.to_string()))?;
    let addr = listener.local_addr().unwrap_or(first);
    Ok(Bound::Tcp { listener, addr })
}

/// Logs each errno that NBD cannot carry the first time it is sent, then at most one line
/// per errno every ten seconds, with a count.
#[derive(Default)]
pub struct ErrnoLog {
    seen: Mutex<HashMap<i32, (Instant, u64)>>,
}

const ERRNO_LOG_EVERY: Duration = Duration::from_secs(10);

impl ErrnoLog {
    /// The NBD error `errno` is sent as, for a `command`.
    fn map(&self, command: u16, errno: i32) -> u32 {
        let nbd = proto::nbd_error(errno);
        if nbd as i32 != errno {
            let now = Instant::now();
            let mut seen = self.seen.lock();
            let entry = seen.entry(errno).or_insert((now - ERRNO_LOG_EVERY * 2, 0));
            entry.1 += 1;
            if now.duration_since(entry.0) >= ERRNO_LOG_EVERY {
                let times = match entry.1 {
                    1 => String::new(),
                    n => format!(" ({n} times since the last line)"),
                };
                *entry = (now, 0);
                drop(seen);
                info!(
                    "NBD carries no {}: sending {} as {} (from {}){times}",
                    crate::mount::describe_errno(errno),
                    crate::mount::describe_errno(errno),
                    crate::mount::describe_errno(nbd as i32),
                    proto::command_name(command),
                );
            }
        }
        nbd
    }
}

struct Inner {
    mount: Arc<Mount>,
    name: String,
    description: String,
    errnos: Arc<ErrnoLog>,
    conns: Mutex<HashMap<u64, Arc<Conn>>>,
    /// The connections still in their handshake, by id, with when they were accepted.
    handshaking: Mutex<HashMap<u64, (Instant, Arc<Conn>)>>,
    /// Signalled when a connection ends.
    ended: Condvar,
    next_id: AtomicU64,
    stopping: AtomicBool,
}

/// A running NBD server over one [`Mount`]; stops (see the module doc) when dropped.
pub struct NbdServer {
    inner: Arc<Inner>,
    accepters: Vec<JoinHandle<()>>,
    /// Closing it wakes the accept threads.
    wake: Option<OwnedFd>,
    listeners: Arc<Listeners>,
}

impl NbdServer {
    /// Serves `mount` on `listeners` under the export name `export` (default: the image's
    /// file name).
    pub fn start(
        mount: Arc<Mount>,
        listeners: Listeners,
        export: Option<String>,
    ) -> io::Result<NbdServer> {
        let name = export.unwrap_or_else(|| {
            mount
                .image_path()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
        let description = format!(
            "blkdebugfs: faulty view of {}",
            mount.image_path().display()
        );
        let inner = Arc::new(Inner {
            mount,
            name,
            description,
            errnos: Arc::default(),
            conns: Mutex::default(),
            ended: Condvar::new(),
            handshaking: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
        });
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 fills two descriptors that we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both are fresh descriptors owned by nobody else.
        let (wake_read, wake_write) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let wake_read = Arc::new(wake_read);
        let listeners = Arc::new(listeners);
        let mut accepters = Vec::new();
        for i in 0..listeners.bound.len() {
            let (inner, listeners, wake_read) =
                (inner.clone(), listeners.clone(), wake_read.clone());
            accepters.push(
                std::thread::Builder::new()
                    .name("blkdebugfs-nbd-accept".into())
                    .spawn(move || accept_loop(&inner, &listeners.bound[i], &wake_read))?,
            );
        }
        info!(
            "serving NBD export '{}' on {}",
            inner.name,
            listeners.describe()
        );
        Ok(NbdServer {
            inner,
            accepters,
            wake: Some(wake_write),
            listeners,
        })
    }

    /// Stops serving; see the module doc. Call it after the mount released its parked
    /// requests, so that every request in flight can reply.
    pub fn stop(self) {
        drop(self)
    }

    fn stop_now(&mut self) {
        let inner = &self.inner;
        inner.stopping.store(true, Ordering::SeqCst);
        drop(self.wake.take());
        for a in self.accepters.drain(..) {
            let _ = a.join();
        }
        let live: Vec<Arc<Conn>> = inner.conns.lock().values().cloned().collect();
        for c in &live {
            c.sock.shutdown(libc::SHUT_RD);
        }
        if !self.wait_for_connections(STOP_GRACE) {
            let live: Vec<Arc<Conn>> = inner.conns.lock().values().cloned().collect();
            warn!(
                "NBD: {} connection(s) still busy after {STOP_GRACE:?}: cutting them",
                live.len()
            );
            for c in &live {
                c.sock.shutdown(libc::SHUT_RDWR);
            }
            if !self.wait_for_connections(Duration::from_secs(2)) {
                warn!("NBD: connections still open at exit");
            }
        }
        debug!("NBD server stopped ({})", self.listeners.describe());
    }

    fn wait_for_connections(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut conns = self.inner.conns.lock();
        while !conns.is_empty() {
            if self
                .inner
                .ended
                .wait_until(&mut conns, deadline)
                .timed_out()
            {
                return conns.is_empty();
            }
        }
        true
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Accepts connections on `bound` until the wake pipe closes.
fn accept_loop(inner: &Arc<Inner>, bound: &Bound, wake: &OwnedFd) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: bound.fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        close_slow_handshakes(inner);
        let check = HANDSHAKE_CHECK.as_millis() as libc::c_int;
        // SAFETY: poll on two pollfds we own, for their count.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, check) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            warn!("NBD: poll on {} failed: {e}", bound.describe());
            return;
        }
        if fds[1].revents != 0 || inner.stopping.load(Ordering::SeqCst) {
            return;
        }
        let accepted = match bound {
            Bound::Unix { listener, .. } => listener
                .accept()
                .map(|(s, _)| (OwnedFd::from(s), "unix socket".to_string())),
            Bound::Tcp { listener, .. } => listener.accept().map(|(s, peer)| {
                let _ = s.set_nodelay(true);
                (OwnedFd::from(s), peer.to_string())
            }),
        };
        match accepted {
            Ok((fd, peer)) => connection(inner, fd, peer),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Out of descriptors, say: wait a little rather than spin.
                warn!("NBD: accept on {} failed: {e}", bound.describe());
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Closes the connections whose handshake took over [`HANDSHAKE_LIMIT`]: their threads,
/// blocked reading or sending, see the socket's end and finish.
fn close_slow_handshakes(inner: &Inner) {
    let mut handshaking = inner.handshaking.lock();
    handshaking.retain(|id, (accepted, conn)| {
        if accepted.elapsed() < HANDSHAKE_LIMIT {
            return true;
        }
        warn!(
            "NBD connection {id}: no handshake within {} s; closing it",
            HANDSHAKE_LIMIT.as_secs()
        );
        conn.sock.shutdown(libc::SHUT_RDWR);
        false
    });
}

/// Starts serving one accepted connection on its own thread.
fn connection(inner: &Arc<Inner>, fd: OwnedFd, peer: String) {
    // The accepted socket must block (a listener's non-blocking mode is not inherited on
    // Linux, but say so rather than rely on it).
    // SAFETY: fcntl on a descriptor we own; no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
    let conn = Arc::new(Conn::new(Sock::new(fd), id));
    {
        let mut conns = inner.conns.lock();
        if conns.len() >= MAX_CONNECTIONS {
            warn!("NBD: {MAX_CONNECTIONS} connections already; closing the one from {peer}");
            return;
        }
        conns.insert(id, conn.clone());
    }
    inner
        .handshaking
        .lock()
        .insert(id, (Instant::now(), conn.clone()));
    let inner2 = inner.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("blkdebugfs-nbd-{id}"))
        .spawn(move || {
            serve_connection(&inner2, conn, &peer);
            inner2.conns.lock().remove(&id);
            inner2.ended.notify_all();
        });
    if let Err(e) = spawned {
        warn!("NBD: no thread for a new connection ({e}); closing it");
        inner.handshaking.lock().remove(&id);
        inner.conns.lock().remove(&id);
        inner.ended.notify_all();
    }
}

fn serve_connection(inner: &Inner, conn: Arc<Conn>, peer: &str) {
    let id = conn.id;
    let mut reader = BufReader::with_capacity(64 * 1024, &conn.sock);
    let export = Export {
        name: inner.name.clone(),
        description: inner.description.clone(),
        size: inner.mount.size(),
        read_only: inner.mount.read_only(),
    };
    let negotiated = handshake::negotiate(&conn.sock, &mut reader, &export);
    // Under the same lock as the check: a connection closed for its slow handshake is not
    // served even if its last option came in meanwhile.
    let in_time = inner.handshaking.lock().remove(&id).is_some();
    match negotiated {
        Ok(_) if !in_time => debug!("NBD connection {id} from {peer}: handshake too slow"),
        Ok(session) => {
            info!(
                "NBD connection {id} from {peer}: export '{}', {} bytes, {} replies{}",
                export.name,
                session.size,
                if session.structured {
                    "structured"
                } else {
                    "simple"
                },
                if session.base_allocation {
                    ", base:allocation"
                } else {
                    ""
                }
            );
            conn::serve(
                conn.clone(),
                reader,
                inner.mount.clone(),
                session,
                inner.errnos.clone(),
            );
            info!("NBD connection {id} closed");
        }
        Err(Ended::Quietly) => debug!("NBD connection {id} from {peer} ended in the handshake"),
        Err(Ended::Broken(why)) => {
            warn!("NBD connection {id} from {peer}: {why}; closing it")
        }
        Err(Ended::Io(e)) => debug!("NBD connection {id} from {peer}: handshake: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse_and_bad_ones_say_what_to_give() {
        assert_eq!(
            "unix:/tmp/d.sock".parse::<Listen>(),
            Ok(Listen::Unix("/tmp/d.sock".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:10809".parse::<Listen>(),
            Ok(Listen::Tcp("127.0.0.1:10809".into()))
        );
        assert_eq!(
            "tcp:[::1]:10809".parse::<Listen>(),
            Ok(Listen::Tcp("[::1]:10809".into()))
        );
        for bad in ["unix:", "tcp:10809", "tcp:host:port", "10809", "nbd://x"] {
            let e = bad.parse::<Listen>().unwrap_err();
            assert!(e.contains("tcp:") || e.contains("unix:"), "{bad}: {e}");
        }
        assert_eq!(
            Listen::Tcp("127.0.0.1:1".into()).to_string(),
            "tcp:127.0.0.1:1"
        );
    }

    #[test]
    fn remote_tcp_is_refused_without_allow_remote() {
        let options = NbdOptions {
            listen: vec![Listen::Tcp("0.0.0.0:0".into())],
            allow_remote: false,
            export: None,
        };
        match Listeners::bind(&options) {
            Err(ListenError::Remote(e)) => assert!(e.contains("--allow-remote"), "{e}"),
            other => panic!("{:?}", other.map(|l| l.describe())),
        }
        let options = NbdOptions {
            listen: vec![Listen::Tcp("127.0.0.1:0".into())],
            ..options
        };
        let l = Listeners::bind(&options).unwrap();
        assert!(l.describe().starts_with("tcp:127.0.0.1:"));
    }

    #[test]
    fn a_unix_socket_is_0600_refuses_a_live_one_and_goes_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.sock");
        let options = NbdOptions {
            listen: vec![Listen::Unix(path.clone())],
            ..NbdOptions::default()
        };
        let l = Listeners::bind(&options).unwrap();
        let md = std::fs::symlink_metadata(&path).unwrap();
        assert!(md.file_type().is_socket());
        assert_eq!(md.mode() & 0o777, 0o600);
        assert!(matches!(
            Listeners::bind(&options),
            Err(ListenError::Bind(_))
        ));
        drop(l);
        assert!(!path.exists());
        // Nothing but the socket was left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        std::fs::write(&path, b"x").unwrap();
        assert!(matches!(
            Listeners::bind(&options),
            Err(ListenError::Bind(_))
        ));
    }
}
