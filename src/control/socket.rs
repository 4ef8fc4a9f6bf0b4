//! The `--control` UNIX socket: one thread accepts, one thread per connection serves
//! [`Control::serve_stream`]. Dropping it stops accepting and removes the socket file.
//!
//! Contract (the socket is as private as `.control`): the socket file is mode 0600 whatever
//! the umask, and every connection's peer must be the mounting user (SO_PEERCRED), or it is
//! answered with EACCES and closed. At most [`MAX_CONNECTIONS`] are served at once (more get
//! EBUSY); a line longer than the cap or not UTF-8 gets an error reply and the connection
//! goes on; a client that hangs up while its `wait_break` waits takes its waiter (and the
//! connection's thread) with it.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use log::{debug, warn};

use crate::control::{Control, CtlError, encode_reply};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

pub struct ControlSocket {
    path: PathBuf,
    stop: Arc<AtomicBool>,
}

/// The uid of the process at the other end of `conn`.
fn peer_uid(conn: &UnixStream) -> std::io::Result<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which we own.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Whether the client closed its end (both directions: a client that only shut down its
/// writing side still waits for replies).
fn hung_up(conn: &UnixStream) -> bool {
    let mut fd = libc::pollfd {
        fd: conn.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: poll on one descriptor we own, without waiting.
    let r = unsafe { libc::poll(&mut fd, 1, 0) };
    r > 0 && fd.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

fn refuse(mut conn: UnixStream, errno: i32, why: &str) {
    let _ = writeln!(
        conn,
        "{}",
        encode_reply(&Err(CtlError {
            errno,
            message: why.into()
        }))
    );
}

impl ControlSocket {
    /// Binds the socket and starts serving it; `Err` is the whole message for the user
    /// (the caller makes it a usage error: exit 2).
    pub fn bind(path: &Path, control: Arc<Control>) -> Result<ControlSocket, String> {
        let bad = |why: String| format!("control socket {}: {why}", path.display());
        if let Ok(md) = std::fs::symlink_metadata(path) {
            if !md.file_type().is_socket() {
                return Err(bad("exists and is not a socket".into()));
            }
            // A stale socket from a previous run: nobody answers on it.
            if UnixStream::connect(path).is_ok() {
                return Err(bad("another daemon is listening on it".into()));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path).map_err(|e| bad(e.to_string()))?;
        // bind(2) applies the umask; the mode is the first gate, the peer check below is
        // the one that holds even in the moment before this chmod.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| bad(format!("chmod 0600: {e}")))?;
        // SAFETY: geteuid cannot fail and touches no memory.
        let owner = unsafe { libc::geteuid() };
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let live = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("blkdebugfs-ctl".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stopped.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    match peer_uid(&conn) {
                        Ok(uid) if uid == owner => {}
                        Ok(uid) => {
                            warn!("control socket: refused a connection from uid {uid}");
                            refuse(conn, libc::EACCES, "only the mounting user may control");
                            continue;
                        }
                        Err(e) => {
                            warn!("control socket: cannot tell who connected ({e}): refused");
                            continue;
                        }
                    }
                    if live.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                        live.fetch_sub(1, Ordering::AcqRel);
                        refuse(
                            conn,
                            libc::EBUSY,
                            &format!("too many control connections (at most {MAX_CONNECTIONS})"),
                        );
                        continue;
                    }
                    let control = control.clone();
                    let live_now = live.clone();
                    let spawned = std::thread::Builder::new()
                        .name("blkdebugfs-ctl-conn".into())
                        .spawn(move || {
                            if let Ok(reader) = conn.try_clone() {
                                let served = control.serve_stream(
                                    std::io::BufReader::new(reader),
                                    &conn,
                                    || hung_up(&conn),
                                );
                                if let Err(e) = served {
                                    debug!("control connection ended: {e}");
                                }
                            }
                            live_now.fetch_sub(1, Ordering::AcqRel);
                        });
                    if spawned.is_err() {
                        live.fetch_sub(1, Ordering::AcqRel);
                    }
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
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop so it sees the flag, then remove the socket file.
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}
