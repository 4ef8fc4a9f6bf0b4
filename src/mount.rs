//! The one owned state object of a mount, and the executor that walks a plan (`ops.rs`)
//! against it.
//!
//! Lock rule: the engine's mutex is taken for one `fire` or `check` call at a time and never
//! held across I/O. Image I/O is positional (`pread`/`pwrite`/`fallocate`/`fdatasync` on one
//! shared descriptor), so requests run in parallel on any number of FUSE workers.

use std::borrow::Cow;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use log::{info, warn};
use parking_lot::Mutex;

use crate::breakpoints::{Breakpoints, Resumed};
pub use crate::buffers::ReadBuf;
use crate::buffers::{ImageMap, MAPPED_READ_MIN};
use crate::config::Limits;
use crate::errno;
use crate::ops::{Op, Step, plan};
use crate::rules::{Engine, Event, IoType, Verdict};

/// Write and flush generations of one block node, as QEMU keeps them: a flush reaches the
/// disk only if the node was written (successfully or not) since its last successful flush.
#[derive(Default)]
struct Generations {
    written: AtomicU64,
    flushed: AtomicU64,
}

impl Generations {
    fn bump(&self) {
        self.written.fetch_add(1, Ordering::AcqRel);
    }

    /// The generation to record if the flush succeeds, or `None` when nothing to flush.
    fn dirty(&self) -> Option<u64> {
        let current = self.written.load(Ordering::Acquire);
        (current != self.flushed.load(Ordering::Acquire)).then_some(current)
    }

    fn record_flushed(&self, generation: u64) {
        self.flushed.fetch_max(generation, Ordering::AcqRel);
    }
}

/// How a mount treats its image.
#[derive(Clone, Copy, Debug, Default)]
pub struct ImageMode {
    pub read_only: bool,
    /// Writes past the end grow the image.
    pub growable: bool,
}

/// Everything a mount owns: the rules, the image and the flush bookkeeping.
pub struct Mount {
    engine: Mutex<Engine>,
    image: File,
    pub image_path: PathBuf,
    limits: Limits,
    pub mode: ImageMode,
    raw_node: Generations,
    blkdebug_node: Generations,
    /// Serialises size changes (growth, truncate, allocation) with each other; data I/O
    /// never takes it.
    resize: Mutex<()>,
    /// The image's size, kept here so that requests need no fstat. Every size change goes
    /// through this mount (the image must not be resized behind its back while mounted).
    size: AtomicU64,
    /// Requests parked by breakpoints, and `wait_break` waiters.
    pub breakpoints: Breakpoints,
    /// The image mapped read-only for large reads (`None` if it cannot be mapped).
    map: Option<Arc<ImageMap>>,
}

/// Called exactly once with a request's outcome: the bytes read (empty for other
/// operations) or the errno. It owns the FUSE reply, so a parked request carries it along.
pub type Completion = Box<dyn FnOnce(Result<ReadBuf, i32>) + Send>;

/// A request in flight: its plan, where it is in it, and everything it owns.
pub struct Pending<'a> {
    pub(crate) op: Op,
    steps: Vec<Step>,
    pc: usize,
    failed: Option<i32>,
    /// Generations captured by the flush gates, recorded if the flush succeeds.
    raw_gen: Option<u64>,
    node_gen: Option<u64>,
    read_buf: ReadBuf,
    /// Borrowed from the FUSE worker's buffer until the request parks.
    write_data: Cow<'a, [u8]>,
    done: Completion,
}

impl Pending<'static> {
    /// A request that has not started, for tests of the parking lot.
    #[cfg(test)]
    pub(crate) fn for_test(op: Op, done: Completion) -> Pending<'static> {
        Pending {
            op,
            steps: Vec::new(),
            pc: 0,
            failed: None,
            raw_gen: None,
            node_gen: None,
            read_buf: ReadBuf::pooled(0),
            write_data: Cow::Owned(Vec::new()),
            done,
        }
    }
}

impl Pending<'_> {
    /// Takes ownership of the write payload so the request can outlive the worker's buffer.
    fn into_owned(self) -> Pending<'static> {
        Pending {
            op: self.op,
            steps: self.steps,
            pc: self.pc,
            failed: self.failed,
            raw_gen: self.raw_gen,
            node_gen: self.node_gen,
            read_buf: self.read_buf,
            write_data: Cow::Owned(self.write_data.into_owned()),
            done: self.done,
        }
    }
}

enum Advance {
    Finished(Result<(), i32>),
    Parked { tags: Vec<String>, event: Event },
}

impl Mount {
    pub fn new(
        engine: Engine,
        image: File,
        image_path: PathBuf,
        limits: Limits,
        mode: ImageMode,
    ) -> io::Result<Mount> {
        let len = image.metadata()?.len();
        let size = AtomicU64::new(len);
        let map = ImageMap::new(&image, len);
        Ok(Mount {
            engine: Mutex::new(engine),
            image,
            image_path,
            limits,
            mode,
            raw_node: Generations::default(),
            blkdebug_node: Generations::default(),
            resize: Mutex::new(()),
            size,
            breakpoints: Breakpoints::default(),
            map,
        })
    }

    /// Runs `f` with the engine locked. Keep `f` short: no I/O, no waiting.
    pub fn with_engine<T>(&self, f: impl FnOnce(&mut Engine) -> T) -> T {
        f(&mut self.engine.lock())
    }

    /// The image's current size.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub fn image(&self) -> &File {
        &self.image
    }

    /// Fires an event outside any request (the `none` event at mount start).
    pub fn fire(&self, event: Event) {
        let fired = self.engine.lock().fire(event);
        if !fired.suspend.is_empty() {
            warn!("breakpoint on '{event}' hit outside a request: nothing to suspend");
        }
    }

    /// Grows the image to at least `end` bytes (growable writes, zero-range past the end).
    pub fn grow_to(&self, end: u64) -> io::Result<()> {
        let _guard = self.resize.lock();
        // The real size, not the cache: a racing truncate and write could leave the file
        // longer than the cache says, and growing must never cut it.
        let real = self.image.metadata()?.len();
        if real < end {
            self.image.set_len(end)?;
        }
        self.size.store(real.max(end), Ordering::Release);
        Ok(())
    }

    /// After a write or zeroing that ended past the cached size (it was checked against the
    /// size before a truncate that ran meanwhile, and extended the file again), re-reads the
    /// size so that the cache never stays below the file.
    fn note_extent(&self, end: u64) {
        if end > self.size() {
            let _guard = self.resize.lock();
            if let Ok(md) = self.image.metadata() {
                self.size.store(md.len(), Ordering::Release);
            }
        }
    }

    /// Truncates or extends the image (setattr size).
    pub fn set_size(&self, size: u64) -> io::Result<()> {
        let _guard = self.resize.lock();
        // Pages past a new, smaller end must not be in any reply's window when they go.
        let _no_windows = self.map.as_ref().map(|m| m.exclude_windows());
        self.image.set_len(size)?;
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    /// Plain `fallocate(2)` on the image (no blkdebug request: allocation only). Without
    /// `FALLOC_FL_KEEP_SIZE` it may extend the image.
    pub fn allocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let _guard = self.resize.lock();
        // SAFETY: fallocate on our own open descriptor; no memory is passed.
        let r = unsafe { libc::fallocate(self.image.as_raw_fd(), mode, offset as i64, len as i64) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        self.size
            .store(self.image.metadata()?.len(), Ordering::Release);
        Ok(())
    }

    /// Starts one client operation: walks its plan until it finishes (and `done` replies) or
    /// a breakpoint parks it. Either way the calling worker returns at once: a parked
    /// request owns its buffer and reply, and continues on whichever thread resumes it.
    pub fn submit(&self, op: Op, write_data: &[u8], done: Completion) {
        let pending = Pending {
            op,
            steps: plan(op, self.limits),
            pc: 0,
            failed: None,
            raw_gen: None,
            node_gen: None,
            // Allocated at the first read step, so a request parked before it holds none.
            read_buf: ReadBuf::pooled(0),
            write_data: Cow::Borrowed(write_data),
            done,
        };
        self.drive(pending);
    }

    /// Walks `p` on from its current step; parks it when a breakpoint hits.
    pub(crate) fn drive(&self, mut p: Pending<'_>) {
        match self.advance(&mut p) {
            Advance::Finished(result) => {
                if result.is_ok() {
                    // A successful flush of each node records the generation it saw.
                    if let Some(g) = p.raw_gen {
                        self.raw_node.record_flushed(g);
                    }
                    if let Some(g) = p.node_gen {
                        self.blkdebug_node.record_flushed(g);
                    }
                }
                let Pending { done, read_buf, .. } = p;
                done(result.map(|()| read_buf));
            }
            Advance::Parked { tags, event } => {
                // Parking is refused once shutting down: then continue right away.
                if let Some(p) = self.breakpoints.park(p.into_owned(), tags, event) {
                    self.drive(p);
                }
            }
        }
    }

    /// Runs steps until the plan ends or a breakpoint hits.
    fn advance(&self, p: &mut Pending<'_>) -> Advance {
        let op = p.op;
        loop {
            let step = p.steps[p.pc];
            p.pc += 1;
            match step {
                Step::Event(event) => {
                    let fired = self.engine.lock().fire(event);
                    if !fired.suspend.is_empty() {
                        // Parked after the whole event, state updated (as QEMU 6.1+).
                        return Advance::Parked {
                            tags: fired.suspend,
                            event,
                        };
                    }
                }
                Step::Check {
                    iotype,
                    offset,
                    len,
                    on_fail,
                } => {
                    if let Some(errno) = self.check(op, iotype, offset, len, "") {
                        p.failed = Some(errno);
                        p.pc = on_fail;
                    }
                }
                Step::RmwCheck {
                    offset,
                    len,
                    on_fail,
                } => {
                    let note = "; ignored, as QEMU ignores read-modify-write read errors";
                    if self.check(op, IoType::Read, offset, len, note).is_some() {
                        p.pc = on_fail;
                    }
                }
                Step::ZeroesCheck {
                    offset,
                    len,
                    on_fail,
                    on_enotsup,
                } => {
                    if let Some(errno) = self.check(op, IoType::WriteZeroes, offset, len, "") {
                        match on_enotsup {
                            Some(fallback) if errno == libc::EOPNOTSUPP => p.pc = fallback,
                            _ => {
                                p.failed = Some(errno);
                                p.pc = on_fail;
                            }
                        }
                    }
                }
                Step::Jump { to } => p.pc = to,
                Step::Read { offset, len, at } => {
                    if let (Op::Read { len: total, .. }, true) = (p.op, p.read_buf.is_empty()) {
                        // A large read done in one step that nothing can park after (the
                        // next step is the end) may reply straight from the mapping.
                        let whole_and_last = at == 0
                            && len == total
                            && len >= MAPPED_READ_MIN
                            && matches!(p.steps.get(p.pc), Some(Step::Done));
                        let window = match &self.map {
                            Some(map) if whole_and_last => map.window(&self.image, offset, len),
                            _ => None,
                        };
                        p.read_buf = window.unwrap_or_else(|| ReadBuf::pooled(total as usize));
                    }
                    if let Some(buf) = p.read_buf.as_mut() {
                        let dst = &mut buf[at..at + len as usize];
                        if let Err(e) = read_full(&self.image, dst, offset) {
                            return Advance::Finished(Err(self.io_failed("read", offset, len, e)));
                        }
                    }
                }
                Step::Write { offset, len, at } => {
                    let src = &p.write_data[at..at + len as usize];
                    if let Err(e) = self.image.write_all_at(src, offset) {
                        return Advance::Finished(Err(self.io_failed("write", offset, len, e)));
                    }
                    self.note_extent(offset + len);
                }
                Step::Zero { offset, len, punch } => {
                    if len > 0
                        && let Err(e) = zero_range(&self.image, offset, len, punch)
                    {
                        return Advance::Finished(Err(self.io_failed("zero", offset, len, e)));
                    }
                    self.note_extent(offset + len);
                }
                Step::RawWritten => self.raw_node.bump(),
                Step::NodeWritten => self.blkdebug_node.bump(),
                Step::RawFlushGate { skip_to } => {
                    p.raw_gen = self.raw_node.dirty();
                    if p.raw_gen.is_none() {
                        p.pc = skip_to;
                    }
                }
                Step::NodeFlushGate { skip_to } => {
                    p.node_gen = self.blkdebug_node.dirty();
                    if p.node_gen.is_none() {
                        p.pc = skip_to;
                    }
                }
                Step::Flush => {
                    if let Err(e) = self.image.sync_data() {
                        return Advance::Finished(Err(self.io_failed("fdatasync", 0, 0, e)));
                    }
                }
                Step::FailWith { errno } => p.failed = Some(errno),
                Step::StopIfFailed { to } => {
                    if p.failed.is_some() {
                        p.pc = to;
                    }
                }
                Step::Done => return Advance::Finished(p.failed.map_or(Ok(()), Err)),
            }
        }
    }

    /// Resumes the newest request suspended under `tag`; `false` if there is none.
    pub fn resume(&self, tag: &str) -> bool {
        match self.breakpoints.resume(tag) {
            Resumed::NotFound => false,
            Resumed::Released(next) => {
                if let Some(p) = next {
                    self.drive(p);
                }
                true
            }
        }
    }

    /// Resumes every suspended request (newest first); returns how many continued.
    pub fn resume_all(&self) -> usize {
        let all = self.breakpoints.take_all();
        let n = all.len();
        for p in all {
            self.drive(p);
        }
        n
    }

    /// QEMU's `remove_break`: deletes the un-hit breakpoints with `tag` and resumes every
    /// request suspended under it. Returns how many breakpoints were deleted.
    pub fn remove_break(&self, tag: &str) -> usize {
        let deleted = self.engine.lock().remove_breakpoints(tag);
        while self.resume(tag) {}
        deleted
    }

    /// The `--max-suspend` watchdog: resumes requests suspended longer than `limit`.
    pub fn resume_older_than(&self, limit: Duration) {
        for (id, p) in self.breakpoints.take_older_than(limit) {
            warn!(
                "request {id} ({}) was suspended for more than {limit:?}: resuming it \
                 (--max-suspend)",
                p.op.name()
            );
            self.drive(p);
        }
    }

    /// Shutdown: nothing parks any more, every parked request continues, waiters fail.
    pub fn release_everything(&self) {
        self.breakpoints.close();
        let n = self.resume_all();
        if n > 0 {
            info!("released {n} suspended request(s) for shutdown");
        }
        self.breakpoints.cancel_waiters();
    }

    /// Checks one request against the rules; logs and returns the errno of an injection.
    fn check(&self, op: Op, iotype: IoType, offset: u64, len: u64, note: &str) -> Option<i32> {
        let verdict = self.engine.lock().check(iotype, offset, len);
        let Verdict::Fail { errno, rule, event } = verdict else {
            return None;
        };
        let range = if len == 0 {
            String::new()
        } else {
            format!(" at offset {offset}, {len} bytes")
        };
        info!(
            "injecting {} into {} ({iotype}{range}) for rule {rule} armed by {event}{note}",
            errno::describe(errno),
            op.name(),
        );
        Some(errno)
    }

    fn io_failed(&self, what: &str, offset: u64, len: u64, e: io::Error) -> i32 {
        warn!(
            "{what} of {len} bytes at offset {offset} on {} failed: {e}",
            self.image_path.display()
        );
        e.raw_os_error().unwrap_or(libc::EIO)
    }
}

/// Reads `buf.len()` bytes at `offset`; bytes past the end of the image read as zeroes.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Zeroes a range, keeping the size. Punching keeps sparse images sparse; zero-range falls
/// back to punching, then to writing zeroes, on filesystems that lack it.
fn zero_range(file: &File, offset: u64, len: u64, punch: bool) -> io::Result<()> {
    let fd = file.as_raw_fd();
    let try_mode = |mode: i32| {
        // SAFETY: fallocate on an owned, open descriptor; no memory is passed.
        let r = unsafe { libc::fallocate(fd, mode, offset as i64, len as i64) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    let unsupported = |e: &io::Error| e.raw_os_error() == Some(libc::EOPNOTSUPP);
    if !punch {
        match try_mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE) {
            Err(e) if unsupported(&e) => {}
            other => return other,
        }
    }
    match try_mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) {
        Err(e) if unsupported(&e) => {}
        other => return other,
    }
    const CHUNK: u64 = 1 << 20;
    let zeroes = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK) as usize;
        file.write_all_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}
