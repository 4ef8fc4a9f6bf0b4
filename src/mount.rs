//! The one owned state object of a mount, and the executor that walks a plan (`ops.rs`)
//! against it.
//!
//! Lock rule: the engine's mutex is taken for one `fire` or `check` call at a time and never
//! held across I/O. Image I/O is positional (`pread`/`pwrite`/`fallocate`/`fdatasync` on one
//! shared descriptor), so requests run in parallel on any number of FUSE workers.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use log::{info, warn};
use parking_lot::Mutex;

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
    /// Serialises size changes (growth, truncate) with each other; data I/O never takes it.
    resize: Mutex<()>,
}

/// The buffer of the client operation a plan works on.
pub enum Payload<'a> {
    None,
    /// A read's reply buffer.
    Read(&'a mut [u8]),
    /// A write's data.
    Write(&'a [u8]),
}

impl Mount {
    pub fn new(
        engine: Engine,
        image: File,
        image_path: PathBuf,
        limits: Limits,
        mode: ImageMode,
    ) -> Mount {
        Mount {
            engine: Mutex::new(engine),
            image,
            image_path,
            limits,
            mode,
            raw_node: Generations::default(),
            blkdebug_node: Generations::default(),
            resize: Mutex::new(()),
        }
    }

    /// Runs `f` with the engine locked. Keep `f` short: no I/O, no waiting.
    pub fn with_engine<T>(&self, f: impl FnOnce(&mut Engine) -> T) -> T {
        f(&mut self.engine.lock())
    }

    /// The image's current size.
    pub fn size(&self) -> io::Result<u64> {
        Ok(self.image.metadata()?.len())
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
        if self.size()? < end {
            self.image.set_len(end)?;
        }
        Ok(())
    }

    /// Truncates or extends the image (setattr size).
    pub fn set_size(&self, size: u64) -> io::Result<()> {
        let _guard = self.resize.lock();
        self.image.set_len(size)
    }

    /// Runs one client operation to completion: its events, checks and I/O, in plan order.
    /// Returns the errno the client gets on failure.
    pub fn execute(&self, op: Op, mut payload: Payload<'_>) -> Result<(), i32> {
        let steps = plan(op, self.limits);
        let mut failed: Option<i32> = None;
        // Generations captured by the flush gates, recorded if the flush succeeds.
        let mut raw_gen = None;
        let mut node_gen = None;
        let mut pc = 0;
        loop {
            let step = steps[pc];
            pc += 1;
            match step {
                Step::Event(event) => {
                    let fired = self.engine.lock().fire(event);
                    if !fired.suspend.is_empty() {
                        warn!("breakpoints are not supported yet; '{event}' ignored");
                    }
                }
                Step::Check {
                    iotype,
                    offset,
                    len,
                    on_fail,
                } => {
                    if let Some(errno) = self.check(op, iotype, offset, len, "") {
                        failed = Some(errno);
                        pc = on_fail;
                    }
                }
                Step::RmwCheck {
                    offset,
                    len,
                    on_fail,
                } => {
                    let note = "; ignored, as QEMU ignores read-modify-write read errors";
                    if self.check(op, IoType::Read, offset, len, note).is_some() {
                        pc = on_fail;
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
                            Some(fallback) if errno == libc::EOPNOTSUPP => pc = fallback,
                            _ => {
                                failed = Some(errno);
                                pc = on_fail;
                            }
                        }
                    }
                }
                Step::Jump { to } => pc = to,
                Step::Read { offset, len, at } => {
                    let Payload::Read(buf) = &mut payload else {
                        return Err(libc::EIO);
                    };
                    let dst = &mut buf[at..at + len as usize];
                    if let Err(e) = read_full(&self.image, dst, offset) {
                        return Err(self.io_failed("read", offset, len, e));
                    }
                }
                Step::Write { offset, len, at } => {
                    let Payload::Write(data) = &payload else {
                        return Err(libc::EIO);
                    };
                    let src = &data[at..at + len as usize];
                    if let Err(e) = self.image.write_all_at(src, offset) {
                        return Err(self.io_failed("write", offset, len, e));
                    }
                }
                Step::Zero { offset, len, punch } => {
                    if len > 0
                        && let Err(e) = zero_range(&self.image, offset, len, punch)
                    {
                        return Err(self.io_failed("zero", offset, len, e));
                    }
                }
                Step::RawWritten => self.raw_node.bump(),
                Step::NodeWritten => self.blkdebug_node.bump(),
                Step::RawFlushGate { skip_to } => {
                    raw_gen = self.raw_node.dirty();
                    if raw_gen.is_none() {
                        pc = skip_to;
                    }
                }
                Step::NodeFlushGate { skip_to } => {
                    node_gen = self.blkdebug_node.dirty();
                    if node_gen.is_none() {
                        pc = skip_to;
                    }
                }
                Step::Flush => {
                    if let Err(e) = self.image.sync_data() {
                        return Err(self.io_failed("fdatasync", 0, 0, e));
                    }
                }
                Step::FailWith { errno } => failed = Some(errno),
                Step::StopIfFailed { to } => {
                    if failed.is_some() {
                        pc = to;
                    }
                }
                Step::Done => break,
            }
        }
        match failed {
            Some(errno) => Err(errno),
            None => {
                // A successful flush of each node records the generation it saw.
                if let Some(g) = raw_gen {
                    self.raw_node.record_flushed(g);
                }
                if let Some(g) = node_gen {
                    self.blkdebug_node.record_flushed(g);
                }
                Ok(())
            }
        }
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
