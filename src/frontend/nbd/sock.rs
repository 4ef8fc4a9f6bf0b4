//! A connected stream socket (unix or TCP) as the server uses it: blocking reads on one
//! thread (polling briefly before it sleeps), whole replies sent under the connection's
//! writer lock from any thread, and `shutdown` from the server's stop. Plain `libc` calls on one descriptor, so that unix and
//! TCP connections are one type and a send to a client that went away is an `EPIPE`, never a
//! `SIGPIPE`.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

pub struct Sock(OwnedFd);

impl Sock {
    pub fn new(fd: OwnedFd) -> Sock {
        Sock(fd)
    }

    /// Sends every byte of `parts`, in order, as one stream write where the kernel allows.
    pub fn send_all(&self, parts: &[&[u8]]) -> io::Result<()> {
        let mut parts: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
        while !parts.is_empty() {
            let iov: Vec<libc::iovec> = parts
                .iter()
                .take(64)
                .map(|p| libc::iovec {
                    iov_base: p.as_ptr() as *mut libc::c_void,
                    iov_len: p.len(),
                })
                .collect();
            // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = iov.len();
            // SAFETY: sendmsg reads `iov.len()` buffers that `parts` keeps alive for the call,
            // on our own open descriptor.
            let n = unsafe { libc::sendmsg(self.0.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut sent = n as usize;
            while sent > 0 {
                let first = parts[0];
                if sent >= first.len() {
                    sent -= first.len();
                    parts.remove(0);
                } else {
                    parts[0] = &first[sent..];
                    sent = 0;
                }
            }
        }
        Ok(())
    }

    /// Sends what of `parts` the socket takes now, without waiting (`MSG_DONTWAIT`): the
    /// number of bytes sent, 0 when its buffer is full.
    pub fn send_now(&self, parts: &[&[u8]]) -> io::Result<usize> {
        let iov: Vec<libc::iovec> = parts
            .iter()
            .filter(|p| !p.is_empty())
            .take(64)
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        if iov.is_empty() {
            return Ok(0);
        }
        // SAFETY: msghdr is plain old data; all-zero is a valid empty header.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iov.len();
        loop {
            // SAFETY: sendmsg reads `iov.len()` buffers that `parts` keeps alive for the
            // call, on our own open descriptor.
            let n = unsafe {
                libc::sendmsg(
                    self.0.as_raw_fd(),
                    &msg,
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(0),
                _ => return Err(e),
            }
        }
    }

    /// Polls for something to read (or the end of the stream) for up to `window`, without
    /// sleeping: true when it came. The reader calls it before a read that would sleep (see
    /// `pace`). It asks the socket about every microsecond, not in a tight loop, since each
    /// asking takes the lock the client's send needs.
    pub fn poll_readable(&self, window: std::time::Duration) -> bool {
        if window.is_zero() {
            return false;
        }
        let start = std::time::Instant::now();
        loop {
            let mut fd = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one pollfd we own, with a zero timeout: it never sleeps.
            if unsafe { libc::poll(&mut fd, 1, 0) } > 0 {
                return true;
            }
            let asked = start.elapsed();
            if asked >= window {
                return false;
            }
            let next = asked + std::time::Duration::from_micros(1);
            while start.elapsed() < next {
                std::hint::spin_loop();
            }
        }
    }

    /// Stops reading (`SHUT_RD`: the reader sees the end of the stream, replies still go
    /// out) or everything (`SHUT_RDWR`: a blocked send fails too).
    pub fn shutdown(&self, how: libc::c_int) {
        // SAFETY: shutdown on our own open descriptor; no memory is passed.
        unsafe { libc::shutdown(self.0.as_raw_fd(), how) };
    }
}

impl io::Read for &Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: read into the buffer we were lent, at most its length, on our own
            // open descriptor.
            let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}
