//! The transmission phase of one connection: its workers take turns reading the socket (as
//! nbdkit's threads do). The worker whose turn it is (the reader) reads a request (and a
//! write's payload) and checks it. A quick one (a read or write without FUA of at most
//! [`INLINE_MAX`]) it runs itself through [`Mount`] and reads on; any other it runs after
//! handing the turn to the next worker, so the socket has a reader while a flush or a large
//! request runs. A request that takes long in the kernel therefore holds only its own
//! worker, and a connection's requests reach the image in parallel (a client's queue depth
//! becomes the image's): quick requests that turn out slow shut the inline gate for a while
//! (`pace`), and one stuck for [`STUCK_INLINE`] loses the turn to a waiting worker. A
//! delayed or suspended request holds no worker at all: its completion waits in the mount's
//! parking. Replies go out in the order requests finish, each identified by its cookie.
//! Why the reader runs requests itself and polls before it sleeps: `pace`'s module doc.
//!
//! Workers: the connection's own thread is the first; an inline run with no other worker
//! waiting starts one (to watch the run), and so does a hand-off with none waiting (to take
//! the turn), up to [`MAX_WORKERS`]: a client that sends one request at a time keeps two
//! threads, and one with 16 in flight gets up to 16. They end with the connection.
//!
//! Locks: the read lock guards the read side and the turn; the reader holds it while it
//! reads off the socket (polling, then a blocking read: the reader waits there for the
//! client), and drops it while it runs a request, so a waiting worker can see a stuck run
//! and take the turn; never held across a `Mount` call or a send. Waiting workers sleep on
//! the turn's condition variable, the one watching a run with a deadline. Replies go out
//! whole and never make the thread that completes a request wait (that thread may be the
//! mount's timer, serving every client's delays): under the connection's outbox lock it
//! sends what the socket takes at once (`MSG_DONTWAIT`), and whatever does not fit (a
//! client that reads slowly or not at all) is queued for the connection's writer thread,
//! which alone waits on the socket; a reply goes straight out only when nothing is queued or
//! being sent, so replies never interleave. While the reader runs requests it read in one
//! gulp, replies are corked (held in the outbox, up to [`CORK_REPLIES`]) and sent together;
//! not while it runs one that no other worker watches (every worker busy), which could get
//! stuck with them held, and never while a thread waits in [`Conn::enter`].
//! The in-flight count has its own mutex, never held across a send or a `Mount` call.
//!
//! Backpressure: at most [`MAX_IN_FLIGHT`] requests of a connection may be in the mount at
//! once (running or parked), carrying at most [`MAX_IN_FLIGHT_BYTES`] of reads and writes
//! (whose replies, resumed together, are queued at once whatever the client reads), and at
//! most [`MAX_QUEUED`] bytes of its replies may wait for it to read them; a worker waits
//! for room before starting its request, and with every worker waiting nothing more is
//! read, so a client cannot make the server hold unbounded completions or replies. Only
//! that connection waits.
//!
//! Limits are checked before any I/O: a request past the export, with flags its command
//! does not take, or of an unknown command gets an error reply; a write's payload is read
//! off the socket first (so the stream stays in step), unless it is longer than
//! [`MAX_PAYLOAD`]: then the connection is closed, as nothing it sends can be trusted.

use std::io::{self, BufReader, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::Scope;
use std::time::{Duration, Instant};

use log::{debug, warn};
use parking_lot::{Condvar, Mutex, MutexGuard};

use super::ErrnoLog;
use super::handshake::{MAX_PAYLOAD, Session};
use super::pace::{InlineGate, OpenConnection, PollPermit, PollWindow};
use super::proto::*;
use super::sock::Sock;
use crate::mount::{Caller, Mount, ReadBuf};

/// Who sends NBD's requests, for the trace: no process, and errnos as NBD carries them (the
/// trace names what was sent beside an errno NBD has no number for).
const NBD_CALLER: Caller = Caller {
    pid: 0,
    sends: Some(sent_as),
};

fn sent_as(errno: i32) -> i32 {
    nbd_error(errno) as i32
}

/// Requests of one connection in the mount at once (see the module doc).
pub const MAX_IN_FLIGHT: usize = 128;

/// Bytes of replies a connection may leave unread before its requests wait.
pub const MAX_QUEUED: usize = 64 << 20;

/// Bytes of reads and writes of one connection in the mount at once: the buffers they hold
/// while parked, and the replies they queue together when resumed (qemu-nbd and nbdkit
/// hold at most 16 requests of 32 MiB).
pub const MAX_IN_FLIGHT_BYTES: usize = 512 << 20;

/// A connection's requests in the mount, and the bytes of data they carry.
#[derive(Default)]
struct Admitted {
    requests: usize,
    bytes: usize,
}

impl Admitted {
    /// Whether a request carrying `bytes` may go in now: within [`MAX_IN_FLIGHT`], and
    /// within [`MAX_IN_FLIGHT_BYTES`] unless nothing else carries data.
    fn admits(&self, bytes: usize) -> bool {
        self.requests < MAX_IN_FLIGHT
            && (self.bytes == 0 || self.bytes + bytes <= MAX_IN_FLIGHT_BYTES)
    }
}

/// Replies the socket did not take at once, for the connection's writer thread.
#[derive(Default)]
struct Outbox {
    queue: std::collections::VecDeque<Vec<u8>>,
    queued_bytes: usize,
    /// The writer thread is sending a reply it took off the queue.
    sending: bool,
    /// No reply comes any more: the writer thread ends once the queue is empty.
    closed: bool,
    /// Replies held back while the reader runs requests it already has, sent together (up
    /// to [`CORK_REPLIES`] in one send): fewer sends, and fewer wake-ups of the client.
    corked: bool,
    cork: Vec<u8>,
    corked_replies: usize,
}

/// Replies the reader holds back at most before it sends them together, and bytes: the
/// cork also takes the replies of requests that other workers finish meanwhile, which it
/// must not hold in numbers outside [`MAX_QUEUED`]'s count; a reply that would take it past
/// [`CORK_BYTES`] (a 32 MiB read, say) goes out after it, uncopied.
const CORK_REPLIES: usize = 4;
const CORK_BYTES: usize = 256 << 10;

/// The write side and bookkeeping of a connection, shared by its reader and completions.
pub struct Conn {
    pub sock: Sock,
    out: Mutex<Outbox>,
    /// Signalled when a reply is queued, when one left, and when the outbox closes.
    out_changed: Condvar,
    in_flight: Mutex<Admitted>,
    finished: Condvar,
    /// A reply could not be sent: the client is gone, later replies are dropped.
    broken: std::sync::atomic::AtomicBool,
    pub id: u64,
}

impl Conn {
    pub fn new(sock: Sock, id: u64) -> Conn {
        Conn {
            sock,
            out: Mutex::new(Outbox::default()),
            out_changed: Condvar::new(),
            in_flight: Mutex::new(Admitted::default()),
            finished: Condvar::new(),
            broken: Default::default(),
            id,
        }
    }

    /// Sends one whole reply, or queues what the socket does not take now for the writer
    /// thread: never waits for the client (see the module doc).
    fn send(&self, parts: &[&[u8]]) {
        if self.broken.load(Ordering::Relaxed) {
            return;
        }
        let mut out = self.out.lock();
        let sent = if !out.corked {
            self.send_locked(&mut out, parts)
        } else if out.cork.len() + parts.iter().map(|p| p.len()).sum::<usize>() > CORK_BYTES {
            // Too large to hold: what the cork holds goes first, then this reply from
            // where it is. Copied into the cork, it would keep the cork's buffer that size
            // for the connection's life.
            self.send_cork(&mut out)
                .and_then(|()| self.send_locked(&mut out, parts))
        } else {
            for p in parts {
                out.cork.extend_from_slice(p);
            }
            out.corked_replies += 1;
            if out.corked_replies < CORK_REPLIES {
                return;
            }
            self.send_cork(&mut out)
        };
        if let Err(e) = sent {
            // `fail` takes the outbox's lock itself.
            drop(out);
            self.fail(&e);
        }
    }

    /// Sends (or queues) whole replies under the outbox lock; an error means the client is
    /// gone, for the caller to [`Conn::fail`] once it dropped the lock.
    fn send_locked(&self, out: &mut Outbox, parts: &[&[u8]]) -> io::Result<()> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut sent = 0;
        if out.queue.is_empty() && !out.sending {
            sent = self.sock.send_now(parts)?;
            // A reply of many parts may need more than one call while the socket takes it.
            while sent < total && sent > 0 {
                match self.sock.send_now(&remainder(parts, sent))? {
                    0 => break,
                    n => sent += n,
                }
            }
            if sent == total {
                return Ok(());
            }
        }
        let rest: Vec<u8> = remainder(parts, sent).concat();
        out.queued_bytes += rest.len();
        out.queue.push_back(rest);
        self.out_changed.notify_all();
        Ok(())
    }

    /// Sends the replies held back (the cork stays as it was: on or off), keeping the
    /// cork's buffer for the next ones.
    fn send_cork(&self, out: &mut Outbox) -> io::Result<()> {
        out.corked_replies = 0;
        let mut held = std::mem::take(&mut out.cork);
        let sent = if held.is_empty() {
            Ok(())
        } else {
            self.send_locked(out, &[&held])
        };
        held.clear();
        out.cork = held;
        sent
    }

    /// Holds replies back until [`Conn::uncork`] (or until [`CORK_REPLIES`] or [`CORK_BYTES`]
    /// are held).
    fn cork(&self) {
        self.out.lock().corked = true;
    }

    /// Sends the replies held back, and sends the next ones at once again.
    fn uncork(&self) {
        let mut out = self.out.lock();
        if !out.corked {
            return;
        }
        out.corked = false;
        if let Err(e) = self.send_cork(&mut out) {
            drop(out);
            self.fail(&e);
        }
    }

    /// The client cannot follow the stream any more: later replies are dropped, and it is
    /// not read from either. Takes the outbox's lock: never call it holding that.
    fn fail(&self, e: &io::Error) {
        if !self.broken.swap(true, Ordering::Relaxed) {
            debug!("NBD connection {}: reply not sent ({e})", self.id);
        }
        self.sock.shutdown(libc::SHUT_RDWR);
        let mut out = self.out.lock();
        out.queue.clear();
        out.queued_bytes = 0;
        out.cork.clear();
        out.corked_replies = 0;
        self.out_changed.notify_all();
    }

    /// The writer thread: sends the queued replies, waiting on the socket as long as the
    /// client takes, until the outbox is closed and empty.
    fn write_queued(&self) {
        loop {
            let reply = {
                let mut out = self.out.lock();
                loop {
                    if let Some(reply) = out.queue.pop_front() {
                        out.sending = true;
                        break reply;
                    }
                    if out.closed {
                        return;
                    }
                    self.out_changed.wait(&mut out);
                }
            };
            let result = self.sock.send_all(&[&reply]);
            {
                let mut out = self.out.lock();
                out.sending = false;
                out.queued_bytes = out.queued_bytes.saturating_sub(reply.len());
                self.out_changed.notify_all();
            }
            if let Err(e) = result {
                self.fail(&e);
            }
        }
    }

    /// Waits while [`MAX_QUEUED`] bytes of replies wait for the client, holding none back.
    fn wait_for_room(&self) {
        let mut out = self.out.lock();
        while out.queued_bytes > MAX_QUEUED && !self.broken.load(Ordering::Relaxed) {
            if out.corked {
                MutexGuard::unlocked(&mut out, || self.uncork());
                continue;
            }
            self.out_changed.wait(&mut out);
        }
    }

    /// No reply comes any more: the writer thread ends once it sent the queue.
    fn close_outbox(&self) {
        self.out.lock().closed = true;
        self.out_changed.notify_all();
    }

    /// Counts a request in; waits while [`MAX_IN_FLIGHT`] are in the mount, or while
    /// [`MAX_QUEUED`] bytes of replies wait for the client. Uncorks before either wait: the
    /// reader corks, and may wait here for as long as the client takes to resume a parked
    /// request, which it may do only once it has a reply the cork would hold.
    fn enter(&self, bytes: usize) {
        self.wait_for_room();
        let mut n = self.in_flight.lock();
        while !n.admits(bytes) {
            // The outbox's lock is never taken holding `in_flight`.
            MutexGuard::unlocked(&mut n, || self.uncork());
            if n.admits(bytes) {
                break;
            }
            self.finished.wait(&mut n);
        }
        n.requests += 1;
        n.bytes += bytes;
    }

    /// Counts a request out: `bytes` as it came in with.
    fn leave(&self, bytes: usize) {
        let mut n = self.in_flight.lock();
        n.requests -= 1;
        n.bytes -= bytes;
        self.finished.notify_all();
    }

    /// Waits until every request of this connection has replied.
    fn drain(&self) {
        let mut n = self.in_flight.lock();
        while n.requests > 0 {
            self.finished.wait(&mut n);
        }
    }
}

/// Counts a request in the mount until it replied: dropping it (after the reply, or on any
/// path that never replies) lets the reader go on.
struct InFlight(Arc<Conn>, usize);

impl InFlight {
    /// `bytes`: the data the request carries (a read's or a write's length; 0 for others).
    fn new(conn: &Arc<Conn>, bytes: usize) -> InFlight {
        conn.enter(bytes);
        InFlight(conn.clone(), bytes)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.leave(self.1);
    }
}

/// Replies to requests of one connection.
#[derive(Clone)]
struct Replier {
    conn: Arc<Conn>,
    structured: bool,
    errnos: Arc<ErrnoLog>,
}

impl Replier {
    fn ok(&self, cookie: u64) {
        self.conn.send(&[&simple_reply(cookie, 0)]);
    }

    /// An error reply for `errno` as NBD carries it (logged when it changes).
    fn errno(&self, cookie: u64, command: u16, errno: i32) {
        let error = self.errnos.map(command, errno);
        let message = crate::mount::describe_errno(errno);
        self.error(cookie, error, &message, None);
    }

    /// An error reply with an NBD error and a message (structured replies carry it).
    fn error(&self, cookie: u64, error: u32, message: &str, offset: Option<u64>) {
        if self.structured {
            self.conn
                .send(&[&error_chunk(cookie, error, message, offset)]);
        } else {
            self.conn.send(&[&simple_reply(cookie, error)]);
        }
    }

    fn einval(&self, cookie: u64, message: &str) {
        debug!("NBD connection {}: EINVAL: {message}", self.conn.id);
        self.error(cookie, NBD_EINVAL, message, None);
    }

    /// The reply to a read of `len` bytes at `offset` that produced `buf`.
    fn read(&self, cookie: u64, offset: u64, len: u32, r: Result<ReadBuf, i32>) {
        let buf = match r {
            Ok(buf) => buf,
            Err(e) => return self.errno(cookie, CMD_READ, e),
        };
        let got = buf.len().min(len as usize);
        match (self.structured, got == len as usize) {
            (false, true) => self.conn.send(&[&simple_reply(cookie, 0), &buf[..got]]),
            // A short read: no way to send part of it in a simple reply.
            (false, false) => self.errno(cookie, CMD_READ, libc::EIO),
            (true, _) if len == 0 => self.conn.send(&[&none_chunk(cookie)]),
            (true, true) => self
                .conn
                .send(&[&data_chunk_header(cookie, true, offset, got), &buf[..got]]),
            (true, false) => {
                let failed = offset + got as u64;
                let error = error_chunk(
                    cookie,
                    NBD_EIO,
                    &format!("short read: {got} of {len} bytes"),
                    Some(failed),
                );
                if got == 0 {
                    self.conn.send(&[&error]);
                } else {
                    self.conn.send(&[
                        &data_chunk_header(cookie, false, offset, got),
                        &buf[..got],
                        &error,
                    ]);
                }
            }
        }
    }

    /// The reply to a `base:allocation` block status: one extent from the request's start.
    fn extent(&self, cookie: u64, length: u32, status: u32) {
        self.conn
            .send(&[&block_status_chunk(cookie, &[(length, status)])]);
    }
}

/// Threads of one connection that may run its requests at once (as nbdkit's default
/// `--threads 16`); see the module doc.
pub const MAX_WORKERS: usize = 16;

/// The read side of a connection, which its workers take turns at.
struct ReadSide<'a> {
    reader: BufReader<&'a Sock>,
    /// Nothing more is read: the client disconnected or broke the stream, or the server
    /// shut the socket's read side.
    stopped: bool,
    /// How long the reader polls before it sleeps on the socket.
    poll: PollWindow,
    /// Whether the reader runs a request itself.
    gate: InlineGate,
    /// The turn is free: the next worker to wake takes it.
    free: bool,
    /// The turn's holder has been running a request inline since then, without this lock.
    inline_since: Option<Instant>,
    /// Counts the turns taken from a holder stuck inline, so that it knows on its return.
    taken: u64,
    /// A waiting worker sleeps with no deadline: the next inline run wakes it to watch.
    watcher_asleep: bool,
}

/// What a connection's workers share.
struct Workers<'a> {
    read: Mutex<ReadSide<'a>>,
    /// Signalled when the turn is free, when an inline run starts with no one watching, and
    /// when reading stops.
    turn: Condvar,
    /// Workers waiting for their turn to read (not the one reading).
    waiting: AtomicUsize,
    /// Workers started (the connection's own thread is the first).
    started: AtomicUsize,
    /// Requests running on a worker that handed the read turn on: while any runs, the
    /// reader does not poll (it would take the CPU they may need).
    handed_off: AtomicUsize,
    replier: Replier,
    mount: Arc<Mount>,
    session: Session,
}

/// Serves one connection's requests until the client disconnects, breaks the protocol or
/// the server stops; then waits for every request in flight to reply and closes.
pub fn serve(
    conn: Arc<Conn>,
    reader: BufReader<&Sock>,
    mount: Arc<Mount>,
    session: Session,
    errnos: Arc<ErrnoLog>,
) {
    let open = OpenConnection::new();
    let workers = Workers {
        read: Mutex::new(ReadSide {
            reader,
            stopped: false,
            poll: PollWindow::default(),
            gate: InlineGate::default(),
            free: true,
            inline_since: None,
            taken: 0,
            watcher_asleep: false,
        }),
        turn: Condvar::new(),
        waiting: AtomicUsize::new(0),
        started: AtomicUsize::new(1),
        handed_off: AtomicUsize::new(0),
        replier: Replier {
            conn: conn.clone(),
            structured: session.structured,
            errnos,
        },
        mount,
        session,
    };
    let writer = {
        let conn = conn.clone();
        std::thread::Builder::new()
            .name(format!("blkdebugfs-nbd-{}.w", conn.id))
            .spawn(move || conn.write_queued())
    };
    if let Err(e) = &writer {
        // Without it, queued replies would never leave: this connection cannot work.
        warn!(
            "NBD connection {}: no writer thread ({e}); closing it",
            conn.id
        );
        conn.sock.shutdown(libc::SHUT_RDWR);
    }
    std::thread::scope(|scope| work(scope, &workers));
    // Nothing reads or polls for this connection any more, though requests of it may still
    // be parked: it no longer counts against the readers' polling (`PollPermit`).
    drop(open);
    let started = workers.started.load(Ordering::Relaxed);
    debug!("NBD connection {}: {started} worker(s) served it", conn.id);
    conn.drain();
    // The writer sends what is queued, then ends (the server's stop cuts a client that does
    // not read with SHUT_RDWR, which ends a send that waits).
    conn.close_outbox();
    if let Ok(writer) = writer {
        let _ = writer.join();
    }
    conn.sock.shutdown(libc::SHUT_RDWR);
}

/// What of `parts` is left after the first `sent` bytes.
fn remainder<'a>(parts: &[&'a [u8]], mut sent: usize) -> Vec<&'a [u8]> {
    let mut rest = Vec::with_capacity(parts.len());
    for p in parts {
        if sent >= p.len() {
            sent -= p.len();
        } else {
            rest.push(&p[sent..]);
            sent = 0;
        }
    }
    rest
}

/// One worker: takes its turn at reading requests. It runs a quick request itself and
/// reads on (see `pace`); any other request, or every request while the inline gate is shut,
/// it runs after handing the turn to the next worker, and then waits for another turn.
/// When it hands the turn on and no other worker is waiting for it, it starts one (up to
/// [`MAX_WORKERS`]), so the socket always has a reader while requests run.
///
/// A waiting worker also watches the holder's inline runs: one still running after
/// [`STUCK_INLINE`] (blocked in the kernel: an image on a stalled disk or network file
/// system) loses the turn to the watcher, so that requests behind it are read and run; the
/// stuck holder becomes a waiting worker when its request returns.
fn work<'scope, 'env>(scope: &'scope Scope<'scope, 'env>, w: &'scope Workers<'env>) {
    let conn = &w.replier.conn;
    let mut payload = Vec::new();
    let mut side = lock_waiting(w);
    loop {
        if !wait_for_turn(w, &mut side) {
            return;
        }
        let taken = side.taken;
        // Runs requests inline until one must be handed off.
        let req = loop {
            if side.stopped {
                conn.uncork();
                return;
            }
            let Some(req) = next_request(w, &mut side, &mut payload) else {
                stop_reading(w, &mut side);
                return;
            };
            let now = Instant::now();
            if !(is_quick(&req) && side.gate.open(now)) {
                break Some(req);
            }
            side.inline_since = Some(now);
            let watched = if w.waiting.load(Ordering::SeqCst) == 0 {
                // Someone must watch this run (the others may all be running requests they
                // were handed, or stuck in theirs): start one.
                spawn_worker(scope, w)
            } else {
                if side.watcher_asleep {
                    side.watcher_asleep = false;
                    w.turn.notify_one();
                }
                true
            };
            if !watched {
                // Every worker is busy: should this run get stuck, nothing would send what
                // the cork holds (a parked request's reply the client may be waiting for)
                // until it returns.
                conn.uncork();
            } else if has_whole_request(side.reader.buffer()) {
                // More requests already read: hold their replies back to send them together
                // (a watcher that takes the turn from a stuck run sends them).
                conn.cork();
            }
            // Timed around the request alone: waiting for the lock afterwards is not the
            // request's time.
            let (run_start, run_end) = MutexGuard::unlocked(&mut side, || {
                let run_start = Instant::now();
                request(&w.replier, &w.mount, &w.session, req, &payload);
                (run_start, Instant::now())
            });
            if side.taken != taken {
                // A watcher took the turn while this run was stuck.
                conn.uncork();
                break None;
            }
            side.inline_since = None;
            side.gate.ran(run_start, run_end);
        };
        let Some(req) = req else { continue };
        conn.uncork();
        if w.waiting.load(Ordering::SeqCst) == 0 {
            spawn_worker(scope, w);
        }
        side.free = true;
        w.turn.notify_one();
        w.handed_off.fetch_add(1, Ordering::SeqCst);
        drop(side);
        request(&w.replier, &w.mount, &w.session, req, &payload);
        w.handed_off.fetch_sub(1, Ordering::SeqCst);
        side = lock_waiting(w);
        // A 32 MiB write once must not pin 32 MiB per idle worker.
        if payload.len() > 4 << 20 {
            payload = Vec::new();
        }
    }
}

/// Takes the read lock, counted as a waiting worker meanwhile (the lock's holder may be
/// the reader, asleep on the socket: a worker parked here is one the next hand-off needs
/// not start).
fn lock_waiting<'a, 'b>(w: &'a Workers<'b>) -> MutexGuard<'a, ReadSide<'b>> {
    w.waiting.fetch_add(1, Ordering::SeqCst);
    let side = w.read.lock();
    w.waiting.fetch_sub(1, Ordering::SeqCst);
    side
}

/// How long an inline run may take before a waiting worker takes the read turn from it.
pub const STUCK_INLINE: Duration = Duration::from_millis(20);

/// Waits (under the read lock, which the wait releases) until this worker holds the turn:
/// the turn is free, or the holder has been stuck in an inline run for [`STUCK_INLINE`].
/// False when reading stopped.
fn wait_for_turn(w: &Workers<'_>, side: &mut MutexGuard<'_, ReadSide<'_>>) -> bool {
    loop {
        if side.stopped {
            return false;
        }
        if side.free {
            side.free = false;
            return true;
        }
        w.waiting.fetch_add(1, Ordering::SeqCst);
        match side.inline_since {
            Some(since) => {
                let deadline = since + STUCK_INLINE;
                let now = Instant::now();
                if now >= deadline {
                    w.waiting.fetch_sub(1, Ordering::SeqCst);
                    debug!(
                        "NBD connection {}: a request has run inline for {:?}; another worker reads on",
                        w.replier.conn.id,
                        now - since
                    );
                    side.inline_since = None;
                    side.taken += 1;
                    side.gate.shut(now);
                    return true;
                }
                w.turn.wait_until(side, deadline);
            }
            None => {
                side.watcher_asleep = true;
                w.turn.wait(side);
            }
        }
        w.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Nothing more is read: every waiting worker ends.
fn stop_reading(w: &Workers<'_>, side: &mut ReadSide<'_>) {
    side.stopped = true;
    w.turn.notify_all();
    w.replier.conn.uncork();
}

/// Starts one more worker, unless [`MAX_WORKERS`] run; whether it did.
fn spawn_worker<'scope, 'env>(
    scope: &'scope Scope<'scope, 'env>,
    w: &'scope Workers<'env>,
) -> bool {
    if w.started.load(Ordering::Relaxed) >= MAX_WORKERS {
        return false;
    }
    let id = w.replier.conn.id;
    let n = w.started.fetch_add(1, Ordering::Relaxed);
    let spawned = std::thread::Builder::new()
        .name(format!("blkdebugfs-nbd-{id}.{n}"))
        .spawn_scoped(scope, move || work(scope, w));
    match spawned {
        Ok(_) => true,
        Err(e) => {
            w.started.fetch_sub(1, Ordering::Relaxed);
            debug!("NBD connection {id}: no thread for another worker ({e})");
            false
        }
    }
}

/// What the turn's holder runs itself: a read or write without FUA of at most this many bytes.
/// A flush, a FUA write, a trim or write-zeroes, or a larger request may take long in the
/// kernel (an fsync, an allocation) and is always handed off.
const INLINE_MAX: u32 = 128 << 10;

fn is_quick(req: &Request) -> bool {
    matches!(req.kind, CMD_READ | CMD_WRITE)
        && req.flags & CMD_FLAG_FUA == 0
        && req.len <= INLINE_MAX
}

/// The turn holder's read of the next request. When nothing is buffered it sends the
/// replies held back, then polls the socket for the poll window before it sleeps there
/// (not while handed-off requests run, nor without a [`PollPermit`]), and adapts the
/// window to how long the wait took.
fn next_request(
    w: &Workers<'_>,
    side: &mut ReadSide<'_>,
    payload: &mut Vec<u8>,
) -> Option<Request> {
    let id = w.replier.conn.id;
    if has_whole_request(side.reader.buffer()) {
        return read_request(&mut side.reader, payload, id);
    }
    // Reading may wait for the client now: what is held back goes first.
    w.replier.conn.uncork();
    if w.handed_off.load(Ordering::SeqCst) > 0 {
        return read_request(&mut side.reader, payload, id);
    }
    let window = side.poll.window();
    let permit = (!window.is_zero()).then(PollPermit::take).flatten();
    if permit.is_none() && !window.is_zero() {
        // Others poll: this wait says nothing about the window.
        return read_request(&mut side.reader, payload, id);
    }
    let start = Instant::now();
    let caught = permit.is_some() && w.replier.conn.sock.poll_readable(window);
    drop(permit);
    let req = read_request(&mut side.reader, payload, id);
    side.poll.waited(caught, start.elapsed());
    req
}

/// Whether `buffered` holds the next request whole (with a write's payload), so reading it
/// does not wait for the client. A request the reader will refuse (a bad magic, an
/// oversized write) counts as whole: reading it ends the connection without waiting.
fn has_whole_request(buffered: &[u8]) -> bool {
    let Some(header) = buffered.first_chunk::<REQUEST_LEN>() else {
        return false;
    };
    match decode_request(header) {
        Some(req) if req.kind == CMD_WRITE && req.len <= MAX_PAYLOAD => {
            buffered.len() >= REQUEST_LEN + req.len as usize
        }
        _ => true,
    }
}

/// Reads the next request off the stream, with a write's payload (into `payload`); `None`
/// when reading stops: the end of the stream, a disconnect request, or a stream that cannot
/// be followed (a bad magic, a write over [`MAX_PAYLOAD`], a connection closed mid-write).
fn read_request(reader: &mut BufReader<&Sock>, payload: &mut Vec<u8>, id: u64) -> Option<Request> {
    let mut h = [0u8; REQUEST_LEN];
    if let Err(e) = reader.read_exact(&mut h) {
        if e.kind() != io::ErrorKind::UnexpectedEof {
            debug!("NBD connection {id}: {e}");
        }
        return None;
    }
    let Some(req) = decode_request(&h) else {
        warn!("NBD connection {id}: bad request magic; closing it");
        cut_off(reader);
        return None;
    };
    match req.kind {
        CMD_DISC => {
            debug!("NBD connection {id}: the client disconnects");
            None
        }
        CMD_WRITE => {
            // The payload now, whatever the answer: the next request starts after it.
            let len = req.len;
            if len > MAX_PAYLOAD {
                warn!(
                    "NBD connection {id}: a write of {len} bytes (over {MAX_PAYLOAD}); closing it"
                );
                cut_off(reader);
                return None;
            }
            if payload.len() < len as usize {
                payload.resize(len as usize, 0);
            }
            if let Err(e) = reader.read_exact(&mut payload[..len as usize]) {
                debug!("NBD connection {id}: closed mid-write ({e})");
                return None;
            }
            Some(req)
        }
        _ => Some(req),
    }
}

/// Closes a connection whose stream cannot be followed now, not once its requests in flight
/// (parked ones, say) have finished: the client sees the end at once, and their replies,
/// which it could not match to anything it sent, are dropped (a send on the shut socket
/// fails, which marks the connection broken).
fn cut_off(reader: &BufReader<&Sock>) {
    reader.get_ref().shutdown(libc::SHUT_RDWR);
}

/// Checks and starts one request (a write's payload is in `payload`).
fn request(replier: &Replier, mount: &Arc<Mount>, session: &Session, req: Request, payload: &[u8]) {
    let Request {
        flags,
        kind,
        cookie,
        offset,
        len,
    } = req;
    let caller = NBD_CALLER;
    let in_range = offset
        .checked_add(len as u64)
        .is_some_and(|end| end <= session.size);
    if flags & !allowed_flags(kind) != 0 {
        replier.einval(
            cookie,
            &format!("flags {flags:#x} on {}", command_name(kind)),
        );
        return;
    }
    let writes = matches!(kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && mount.read_only() {
        replier.error(cookie, NBD_EPERM, "the export is read-only", None);
        return;
    }
    let ranged = matches!(
        kind,
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS
    );
    if ranged && !in_range {
        let message = format!(
            "{} of {len} bytes at {offset} is past the end ({} bytes)",
            command_name(kind),
            session.size
        );
        debug!("NBD connection {}: {message}", replier.conn.id);
        // proto.md: a write past the end is ENOSPC, any other request EINVAL.
        let error = match kind {
            CMD_WRITE | CMD_WRITE_ZEROES => NBD_ENOSPC,
            _ => NBD_EINVAL,
        };
        replier.error(cookie, error, &message, None);
        return;
    }
    if kind == CMD_WRITE_ZEROES && flags & CMD_FLAG_FAST_ZERO != 0 {
        // A write-zeroes runs its plan like any write: a rule may delay or suspend it, the
        // write cache journals what it overwrites, and a file system or device without
        // zero-range falls back to writing zeroes. None of that is fast, so FAST_ZERO is
        // refused before anything runs (no rule sees it), and the client writes zeroes its
        // own way (`proto.md`: NBD_ENOTSUP, "fail quickly").
        replier.error(
            cookie,
            NBD_ENOTSUP,
            "FAST_ZERO: zeroing here is not guaranteed fast",
            None,
        );
        return;
    }
    let fua = flags & CMD_FLAG_FUA != 0;
    match kind {
        CMD_READ => {
            if len > MAX_PAYLOAD {
                replier.einval(cookie, "a read over 32 MiB");
                return;
            }
            let inflight = InFlight::new(&replier.conn, len as usize);
            let r = replier.clone();
            mount.read(
                caller,
                offset,
                len,
                Box::new(move |result| {
                    r.read(cookie, offset, len, result);
                    drop(inflight);
                }),
            );
        }
        CMD_WRITE => {
            let inflight = InFlight::new(&replier.conn, len as usize);
            let r = replier.clone();
            let m = mount.clone();
            mount.write(
                caller,
                offset,
                &payload[..len as usize],
                Box::new(move |result| match result {
                    Ok(n) if n == len => finish(&m, &r, cookie, kind, fua, inflight),
                    Ok(n) => {
                        r.error(
                            cookie,
                            NBD_EIO,
                            &format!("short write: {n} of {len} bytes"),
                            None,
                        );
                        drop(inflight);
                    }
                    Err(e) => {
                        r.errno(cookie, kind, e);
                        drop(inflight);
                    }
                }),
            );
        }
        CMD_FLUSH => {
            let inflight = InFlight::new(&replier.conn, 0);
            let r = replier.clone();
            mount.flush(
                caller,
                Box::new(move |result| {
                    match result {
                        Ok(()) => r.ok(cookie),
                        Err(e) => r.errno(cookie, kind, e),
                    }
                    drop(inflight);
                }),
            );
        }
        CMD_TRIM | CMD_WRITE_ZEROES => {
            // TRIM is a discard (a punched hole), WRITE_ZEROES a zero-range write: their FUSE
            // twins' fallocate modes, so the same plans and rules apply.
            let mode = match kind {
                CMD_TRIM => libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                _ => libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            };
            let inflight = InFlight::new(&replier.conn, 0);
            let r = replier.clone();
            let m = mount.clone();
            mount.fallocate(
                caller,
                mode,
                offset,
                len as u64,
                Box::new(move |result| match result {
                    Ok(()) => finish(&m, &r, cookie, kind, fua, inflight),
                    Err(e) => {
                        r.errno(cookie, kind, e);
                        drop(inflight);
                    }
                }),
            );
        }
        CMD_BLOCK_STATUS => {
            if !session.base_allocation {
                replier.einval(cookie, "BLOCK_STATUS without base:allocation negotiated");
                return;
            }
            if len == 0 {
                replier.einval(cookie, "BLOCK_STATUS of 0 bytes");
                return;
            }
            block_status(mount, replier, cookie, offset, len);
        }
        _ => replier.einval(
            cookie,
            &format!("unknown command {kind} ({})", command_name(kind)),
        ),
    }
}

/// After a write, trim or write-zeroes succeeded: with FUA, a flush makes it durable before
/// the reply (what QEMU does for a node without native FUA), otherwise the reply.
fn finish(mount: &Arc<Mount>, r: &Replier, cookie: u64, kind: u16, fua: bool, inflight: InFlight) {
    if !fua {
        r.ok(cookie);
        return drop(inflight);
    }
    let r = r.clone();
    mount.flush(
        NBD_CALLER,
        Box::new(move |result| {
            match result {
                Ok(()) => r.ok(cookie),
                Err(e) => r.errno(cookie, kind, e),
            }
            drop(inflight);
        }),
    );
}

/// `BLOCK_STATUS` as its FUSE twin: `SEEK_DATA` from the offset, and when data starts there,
/// `SEEK_HOLE` for its end. One extent is the answer (the protocol lets a server describe
/// less than asked; the client asks again from its end).
fn block_status(mount: &Arc<Mount>, replier: &Replier, cookie: u64, offset: u64, len: u32) {
    let inflight = InFlight::new(&replier.conn, 0);
    let r = replier.clone();
    let m = mount.clone();
    let clamp = move |end: i64| (end as u64).saturating_sub(offset).clamp(1, len as u64) as u32;
    mount.seek(
        NBD_CALLER,
        offset as i64,
        libc::SEEK_DATA,
        Box::new(move |found| match found {
            Ok(data) if data as u64 > offset => {
                r.extent(cookie, clamp(data), STATE_HOLE | STATE_ZERO);
                drop(inflight);
            }
            // No data from here to the end: all hole.
            Err(libc::ENXIO) => {
                r.extent(cookie, len, STATE_HOLE | STATE_ZERO);
                drop(inflight);
            }
            Ok(_) => {
                let r2 = r.clone();
                m.seek(
                    NBD_CALLER,
                    offset as i64,
                    libc::SEEK_HOLE,
                    Box::new(move |found| {
                        match found {
                            Ok(hole) => r2.extent(cookie, clamp(hole), 0),
                            Err(e) => r2.errno(cookie, CMD_BLOCK_STATUS, e),
                        }
                        drop(inflight);
                    }),
                );
            }
            Err(e) => {
                r.errno(cookie, CMD_BLOCK_STATUS, e);
                drop(inflight);
            }
        }),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    #[test]
    fn a_request_is_whole_with_its_header_and_a_write_with_its_payload() {
        let header = |kind: u16, len: u32| {
            let mut h = Vec::new();
            h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
            h.extend_from_slice(&0u16.to_be_bytes());
            h.extend_from_slice(&kind.to_be_bytes());
            h.extend_from_slice(&7u64.to_be_bytes());
            h.extend_from_slice(&0u64.to_be_bytes());
            h.extend_from_slice(&len.to_be_bytes());
            h
        };
        let read = header(CMD_READ, 4096);
        assert!(!has_whole_request(&[]));
        assert!(!has_whole_request(&read[..REQUEST_LEN - 1]));
        assert!(has_whole_request(&read));
        let mut write = header(CMD_WRITE, 512);
        assert!(!has_whole_request(&write), "a write without its payload");
        write.extend_from_slice(&[0; 511]);
        assert!(!has_whole_request(&write));
        write.push(0);
        assert!(has_whole_request(&write));
        assert!(
            has_whole_request(&header(CMD_WRITE, MAX_PAYLOAD + 1)),
            "an oversized write closes the connection at once"
        );
        let mut bad = read.clone();
        bad[0] ^= 1;
        assert!(
            has_whole_request(&bad),
            "a bad magic closes the connection at once"
        );
    }

    /// A reply to a client that has gone (a request resumed after its client hung up) must
    /// return at once, on any thread: the connection is marked broken, nothing waits.
    #[test]
    fn a_reply_to_a_client_that_went_away_returns() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        drop(theirs);
        let conn = Arc::new(Conn::new(Sock::new(ours.into()), 1));
        let (tx, rx) = std::sync::mpsc::channel();
        let sender = conn.clone();
        std::thread::spawn(move || {
            sender.send(&[b"reply"]);
            sender.send(&[b"another"]);
            let _ = tx.send(());
        });
        assert!(
            rx.recv_timeout(Duration::from_secs(10)).is_ok(),
            "send to a closed client never returned"
        );
        assert!(conn.broken.load(Ordering::Relaxed));
    }

    /// The reader corks its replies, then waits in `enter` for a request slot (the mount
    /// holds [`MAX_IN_FLIGHT`] of this connection's requests, parked); meanwhile another
    /// request completes. Its reply must reach the client while the reader waits: held back,
    /// it would wait for the reader, which waits for requests the client may resume only
    /// once it has that reply (found by review: with every worker busy, no watcher takes the
    /// turn and uncorks).
    #[test]
    fn a_reader_waiting_for_a_request_slot_holds_no_reply_back() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let conn = Arc::new(Conn::new(Sock::new(ours.into()), 1));
        for _ in 0..MAX_IN_FLIGHT {
            conn.enter(0);
        }
        conn.cork();
        let reader = conn.clone();
        let (entered, in_mount) = std::sync::mpsc::channel();
        let waiting = std::thread::spawn(move || {
            reader.enter(0);
            let _ = entered.send(());
        });
        // A parked request completes (before or after the reader began to wait: either way
        // the reply must go out): its reply is sent, its slot frees.
        conn.send(&[b"the reply"]);
        theirs
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut got = [0u8; 9];
        let read = std::io::Read::read_exact(&mut theirs, &mut got);
        conn.leave(0);
        assert!(
            in_mount.recv_timeout(Duration::from_secs(10)).is_ok(),
            "the reader never got the freed slot"
        );
        waiting.join().unwrap();
        assert!(
            read.is_ok(),
            "the reply was held back while the reader waited for a slot: {read:?}"
        );
        assert_eq!(&got, b"the reply");
    }

    /// A large reply that completes while replies are corked (a 32 MiB read another worker
    /// finished) goes out after what the cork holds, in order, but is not copied into the
    /// cork: the cork's buffer would otherwise keep its size for the connection's life.
    #[test]
    fn a_large_reply_is_not_copied_into_the_cork() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let conn = Arc::new(Conn::new(Sock::new(ours.into()), 1));
        let large = vec![0xab; 4 * CORK_BYTES];
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; 5 + 4 * CORK_BYTES + 5];
            std::io::Read::read_exact(&mut theirs, &mut got).map(|()| got)
        });
        // Through the writer thread: the socket's buffer takes less than the large reply.
        let cork_capacity = std::thread::scope(|scope| {
            scope.spawn(|| conn.write_queued());
            conn.cork();
            conn.send(&[b"first"]);
            conn.send(&[&large]);
            conn.send(&[b"third"]);
            conn.uncork();
            // Asserted once the writer thread ended: a panic here would leave it waiting.
            let cork_capacity = conn.out.lock().cork.capacity();
            conn.close_outbox();
            cork_capacity
        });
        assert!(
            cork_capacity <= 2 * CORK_BYTES,
            "the cork grew to {cork_capacity} bytes"
        );
        let got = reader.join().unwrap().expect("every reply, in order");
        assert_eq!(&got[..5], b"first");
        assert!(got[5..5 + large.len()] == large[..]);
        assert_eq!(&got[5 + large.len()..], b"third");
    }

    /// Reads and writes in the mount are bounded in bytes as well as in number: 16 parked
    /// 32 MiB reads hold 512 MiB of buffers (and will queue as many bytes of replies at
    /// once when resumed), so a 17th waits for one of them to leave, as it would on
    /// qemu-nbd or nbdkit (16 requests at most); a request without data still goes in.
    #[test]
    fn requests_in_flight_are_bounded_in_bytes() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let conn = Arc::new(Conn::new(Sock::new(ours.into()), 1));
        let big = MAX_PAYLOAD as usize;
        // 16: qemu-nbd's and nbdkit's most.
        for _ in 0..MAX_IN_FLIGHT_BYTES / big {
            conn.enter(big);
        }
        conn.enter(0);
        conn.leave(0);
        let (entered, in_mount) = std::sync::mpsc::channel();
        let waiting = {
            let conn = conn.clone();
            std::thread::spawn(move || {
                conn.enter(big);
                let _ = entered.send(());
            })
        };
        let early = in_mount.recv_timeout(Duration::from_millis(200));
        conn.leave(big);
        let admitted = in_mount.recv_timeout(Duration::from_secs(10));
        waiting.join().unwrap();
        assert!(early.is_err(), "a 17th 32 MiB request went in beside 16");
        assert!(admitted.is_ok(), "it never went in once one left");
    }
}
