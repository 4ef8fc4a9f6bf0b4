//! The kernel's mount table (`/proc/self/mountinfo`), read as bytes, and the watch that ends
//! the daemon when its mount leaves the table.
//!
//! Contract: mount points are compared as bytes (a path need not be UTF-8, and any mount in
//! the namespace may have such a path), and a table that cannot be read is an *error*, never
//! "not mounted": the callers that decide to shut down on "not mounted" must retry instead.
//! Reading the table never sends a request to a FUSE server (unlike `stat` on the mount
//! point, which would deadlock before the session serves).

use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use log::{info, warn};

use super::Shutdown;

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Reads the whole table from an open mountinfo descriptor (from its start).
fn read_from(table: &mut File) -> io::Result<Vec<u8>> {
    table.rewind()?;
    let mut bytes = Vec::with_capacity(16 << 10);
    table.read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn read_table() -> io::Result<Vec<u8>> {
    read_from(&mut File::open(MOUNTINFO)?)
}

/// `(major:minor, mount point)` of every line, the mount point with its octal escapes
/// (`\040` for a space) undone.
fn entries(table: &[u8]) -> impl Iterator<Item = (&[u8], Vec<u8>)> {
    table.split(|&b| b == b'\n').filter_map(|line| {
        let mut fields = line.split(|&b| b == b' ');
        let device = fields.nth(2)?;
        let mount_point = fields.nth(1)?;
        Some((device, unescape(mount_point)))
    })
}

/// Undoes mountinfo's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` `\`).
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\'
            && let Some(digits) = field.get(i + 1..i + 4)
            && digits.iter().all(|d| (b'0'..=b'7').contains(d))
        {
            out.push(
                digits
                    .iter()
                    .fold(0u8, |v, d| v.wrapping_mul(8) + (d - b'0')),
            );
            i += 4;
            continue;
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

/// The `major:minor` device of the filesystem mounted at `path` (canonical), the newest
/// mount there if several are stacked.
pub fn device_at(path: &Path) -> io::Result<Option<String>> {
    let table = read_table()?;
    let wanted = path.as_os_str().as_bytes();
    Ok(entries(&table)
        .filter(|(_, mp)| mp == wanted)
        .last()
        .map(|(device, _)| String::from_utf8_lossy(device).into_owned()))
}

/// Whether a filesystem with device `major:minor` is in `table`.
fn device_in(table: &[u8], device: &str) -> bool {
    entries(table).any(|(d, _)| d == device.as_bytes())
}

/// Whether a filesystem with device `major:minor` is mounted now.
pub fn device_mounted(device: &str) -> io::Result<bool> {
    Ok(device_in(&read_table()?, device))
}

/// The FUSE connection id of a mount: the minor number of its `major:minor` device.
pub fn fuse_connection(device: &str) -> Option<u32> {
    device.split_once(':')?.1.parse().ok()
}

/// Triggers the shutdown when our mount leaves the mount table from outside. A lazy
/// `umount -l` while a client holds the file open takes the mount out of the namespace but
/// keeps the FUSE connection, and the kernel tells the daemon nothing: without this watch,
/// suspended requests (and so the client and the daemon) would wait for a signal. The mount
/// table reports every change with POLLPRI, so the thread sleeps until one happens; dropping
/// the watch wakes and joins it. A table it cannot read (no descriptor left, a transient
/// error) is logged and read again later: only a readable table without our device means
/// we were unmounted.
pub struct DetachWatch {
    wake: std::os::unix::net::UnixStream,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long the watch waits before reading a table that could not be read again.
const RETRY: Duration = Duration::from_millis(200);

impl DetachWatch {
    pub fn start(device: String, shutdown: Shutdown) -> io::Result<DetachWatch> {
        // Opened once: re-reading this descriptor needs no new one, so running out of
        // descriptors cannot blind the watch.
        let mut table = File::open(MOUNTINFO)?;
        let (wake, woken) = std::os::unix::net::UnixStream::pair()?;
        let thread = std::thread::Builder::new()
            .name("blkdebugfs-detach".into())
            .spawn(move || {
                // A failed read is retried after RETRY even without a table change.
                let mut retry_pending = false;
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
                    let timeout = if retry_pending {
                        RETRY.as_millis() as i32
                    } else {
                        -1
                    };
                    // SAFETY: poll on two descriptors this thread owns; the array outlives
                    // the call.
                    let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
                    if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted
                        || fds[1].revents != 0
                    {
                        return;
                    }
                    if fds[0].revents == 0 && !retry_pending {
                        continue;
                    }
                    match read_from(&mut table) {
                        Ok(bytes) => {
                            retry_pending = false;
                            if !device_in(&bytes, &device) {
                                info!(
                                    "the mount (device {device}) was unmounted from outside: \
                                     shutting down"
                                );
                                shutdown.trigger();
                                return;
                            }
                        }
                        Err(e) => {
                            if !retry_pending {
                                warn!("cannot read {MOUNTINFO} ({e}); will read it again");
                            }
                            retry_pending = true;
                        }
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

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &[u8] = b"22 1 0:21 / / rw - ext4 /dev/sda rw\n\
        40 22 0:39 / /tmp/a\\040b rw - fuse.blkdebugfs x rw\n\
        41 22 0:40 / /tmp/\xff\\134z rw - tmpfs tmpfs rw\n";

    #[test]
    fn entries_are_bytes_with_escapes_undone() {
        let all: Vec<(Vec<u8>, Vec<u8>)> = entries(TABLE).map(|(d, mp)| (d.to_vec(), mp)).collect();
        assert_eq!(
            all,
            vec![
                (b"0:21".to_vec(), b"/".to_vec()),
                (b"0:39".to_vec(), b"/tmp/a b".to_vec()),
                (b"0:40".to_vec(), b"/tmp/\xff\\z".to_vec()),
            ]
        );
        // A line that is not UTF-8 hides nothing after it.
        assert!(device_in(TABLE, "0:40") && device_in(TABLE, "0:39"));
        assert!(!device_in(TABLE, "0:41"));
    }

    #[test]
    fn connection_is_the_minor_number() {
        assert_eq!(fuse_connection("0:39"), Some(39));
        assert_eq!(fuse_connection("junk"), None);
    }
}
