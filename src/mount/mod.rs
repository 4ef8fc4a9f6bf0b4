//! `Mount`: the one door to the core. One owned state object per mount (the engine, the
//! image and its media, parked requests, the trace and the counters) and its methods; front
//! ends and the control table reach everything below only through them, so that size,
//! growth and parking decisions live in one place. Fields are private to `mount/`.
//!
//! One struct, its `impl` blocks in child files by what changes together:
//! - `mod.rs`: the type, its construction, the verbs a front end calls (`read`, `write`,
//!   `flush`, `fallocate`, `seek`, `stat`, `set_attr`, `statfs`) and size changes
//! - `executor.rs`: walking a request's plan: events, checks, I/O, faults' effects
//! - `plan.rs`: the events, checks and I/O of each operation, as data
//! - `parking.rs`: parked requests (breakpoints, `[suspend]`, delays) and waiters
//! - `timer.rs`: deadlines (delays, `wait_break` timeouts, `--max-suspend`)
//! - `admin.rs`: what the control table calls (rules, breakpoints, power, bad sectors)
//! - `logging.rs`, `trace.rs`, `stats.rs`: what the mount says and counts
//!
//! May import: `engine/`, `media/` and `config/` (its [`Limits`]). Never `control/`,
//! `frontend/` or the crate root's wiring.
//!
//! Lock rule: the engine's mutex is taken for one `fire` or `decide` call at a time and never
//! held across I/O, nor across work that grows with the request or with a rule's numbers:
//! a check decides under it (`Engine::decide`) and draws the effect (which bits, bytes or
//! sectors) after releasing it. Image I/O is positional (`pread`/`pwrite`/`fallocate`/
//! `fdatasync` on one shared descriptor), so requests run in parallel on any number of FUSE
//! workers.
//!
//! Logging: the request path never waits on the log (`control/logring.rs` queues lines for a
//! writer thread), and a rule that acts on every request logs its first few injections,
//! then one summary a second (`logging.rs`); the trace and stats count every request.
//!
//! Faults (`spec/faults.md` §3): a check's decision applies to the I/O steps after it, up to
//! the next check (one chunk of the request): a corruption edits the bytes read or a copy of
//! the bytes stored, a dropped write skips its I/O, a torn write stores only what it keeps, a
//! short transfer stops at its end and returns the count up to it, a misdirected write lands
//! elsewhere. A delay parks the request with a deadline (the timer continues it) and a
//! `[suspend]` rule parks it under a tag, exactly as a breakpoint does: no worker waits. What
//! a later rule decided after a delay (faults §1) is logged and counted with the delay and
//! applied to the steps after the wait; a `[suspend]` after a delay parks the request once
//! the timer continues it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::warn;
use parking_lot::Mutex;

mod admin;
mod executor;
mod logging;
pub(crate) mod parking;
pub(crate) mod plan;
pub mod stats;
mod timer;
pub mod trace;

pub use crate::engine::errno::describe as describe_errno;
pub use crate::media::buffers::ReadBuf;
pub use parking::{WaiterId, op_range};

use crate::config::Limits;
use crate::engine::ranges::SectorSet;
use crate::engine::{Engine, Rule, RuleId, RuleStats};
use crate::media::buffers::ImageMap;
use crate::media::record::{ImageInfo, Recorder};
use crate::media::{BadSectors, BadSettings, WriteCache};
use executor::Pending;
use logging::{Limiter, LogKey};
use parking::Breakpoints;
use plan::Op;
use stats::Stats;
use trace::Trace;

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

/// The image's attributes, as the adapter shows them.
#[derive(Clone, Copy, Debug)]
pub struct ImageStat {
    pub size: u64,
    pub blocks: u64,
    /// Permission bits; write bits cleared on a read-only mount.
    pub perm: u16,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

/// A rule as `rules` and `list` show it.
#[derive(Clone, Debug)]
pub struct RuleStatus {
    pub id: RuleId,
    pub rule: Rule,
    pub stats: RuleStats,
    /// In the active list now.
    pub armed_now: bool,
}

/// Everything a mount owns: the rules, the image and the flush bookkeeping. Every field is
/// private: the adapter and the control table reach them only through the methods below, so
/// that size, growth and parking decisions live in one place.
pub struct Mount {
    engine: Mutex<Engine>,
    image: File,
    image_path: PathBuf,
    limits: Limits,
    mode: ImageMode,
    raw_node: Generations,
    blkdebug_node: Generations,
    /// Serialises size changes (growth, truncate, allocation) with each other; data I/O
    /// never takes it.
    resize: Mutex<()>,
    /// The image's size, kept here so that requests need no fstat. Every size change goes
    /// through this mount (the image must not be resized behind its back while mounted).
    size: AtomicU64,
    /// Requests parked by breakpoints, and `wait_break` waiters.
    breakpoints: Breakpoints<Pending<'static>>,
    /// The image mapped read-only for large reads (`None` if it cannot be mapped).
    map: Option<Arc<ImageMap>>,
    /// `--trace`, when given.
    trace: Option<Trace>,
    /// The logical block size when the image is a block device (`media/device.rs`): its size is
    /// fixed and it has no holes.
    device_block: Option<u64>,
    /// The media: bad sectors, and with `--write-cache` the cache and power state.
    bad: BadSectors,
    cache: Option<WriteCache>,
    stats: Stats,
    /// Request ids, for the trace and logs.
    next_request: AtomicU64,
    /// Keeps the log lines of a rule (or of bad sectors) that acts on thousands of requests
    /// a second to a few, then one summary a second (the trace and stats stay exact).
    log_limit: Limiter<LogKey>,
}

/// The media a mount starts with (`spec/faults.md` §4, §5).
#[derive(Clone, Debug, Default)]
pub struct MediaSetup {
    /// The `[bad-sectors]` of the config.
    pub bad: Option<(SectorSet, BadSettings)>,
    /// Model a volatile write cache (`--write-cache`).
    pub write_cache: bool,
    /// Record the run (`--record`, `explore`): implies the write cache.
    pub record: Option<RecordSetup>,
}

/// A recording a mount makes (`spec/explore.md` §1).
#[derive(Clone, Debug)]
pub struct RecordSetup {
    /// The recording's directory.
    pub dir: PathBuf,
    /// The image as the recording names it; `None`: the image itself, hashed at the end.
    pub image: Option<ImageInfo>,
    /// Start at once (`mount --record`); otherwise at `Mount::record_start` (`explore`,
    /// after its setup).
    pub start_now: bool,
}

/// Who sent a request (for the trace).
#[derive(Clone, Copy, Debug, Default)]
pub struct Caller {
    pub pid: u32,
    /// How the front end sends an errno, when it cannot send every one (NBD carries seven):
    /// the trace then names what was sent beside the errno (`sent`).
    pub sends: Option<fn(i32) -> i32>,
}

/// What a finished request hands its completion: the bytes read (empty for other
/// operations) and, after a short transfer, how many bytes moved.
struct Outcome {
    data: ReadBuf,
    transferred: Option<u64>,
}

/// Called exactly once with a request's [`Outcome`] or its errno.
type Finish = Box<dyn FnOnce(Result<Outcome, i32>) + Send>;

/// Called exactly once with a request's outcome: the bytes read (empty for other
/// operations) or the errno. It owns the FUSE reply, so a parked request carries it along.
pub type Completion = Box<dyn FnOnce(Result<ReadBuf, i32>) + Send>;

/// Called exactly once with an operation's outcome (flush, fallocate).
pub type Done = Box<dyn FnOnce(Result<(), i32>) + Send>;

/// Called exactly once with the bytes a write stored, or its errno.
pub type WriteDone = Box<dyn FnOnce(Result<u32, i32>) + Send>;

/// Called exactly once with the offset an lseek found, or its errno.
pub type SeekDone = Box<dyn FnOnce(Result<i64, i32>) + Send>;

fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl Mount {
    pub fn new(
        engine: Engine,
        image: File,
        image_path: PathBuf,
        limits: Limits,
        mode: ImageMode,
        trace: Option<Trace>,
        media: MediaSetup,
    ) -> io::Result<Mount> {
        let md = image.metadata()?;
        let device_block = md
            .file_type()
            .is_block_device()
            .then(|| crate::media::device::logical_block_size(&image));
        let len = match device_block {
            Some(_) => crate::media::device::size(&image)?,
            None => md.len(),
        };
        let size = AtomicU64::new(len);
        // A device is read with pread: a window checks the file's length, which is 0.
        let map = match device_block {
            Some(_) => None,
            None => ImageMap::new(&image, len),
        };
        // The journal lives beside the image; beside a device is /dev (memory), so a
        // device's journal lives in the temporary directory.
        let journal_beside = match device_block {
            Some(_) => std::env::temp_dir().join("blkdebugfs-journal"),
            None => image_path.clone(),
        };
        let recorder = match &media.record {
            Some(setup) => Some(Recorder::create(&setup.dir, setup.image.clone())?),
            None => None,
        };
        let cache = match media.write_cache || recorder.is_some() {
            true => Some(WriteCache::new(&journal_beside, recorder)?),
            false => None,
        };
        if let Some(rec) = cache.as_ref().and_then(|c| c.recorder())
            && media.record.as_ref().is_some_and(|r| r.start_now)
        {
            rec.start_now(0)?;
        }
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
            trace,
            device_block,
            bad: match media.bad {
                Some((set, settings)) => BadSectors::new(set, settings),
                None => BadSectors::default(),
            },
            cache,
            stats: Stats::default(),
            next_request: AtomicU64::new(1),
            log_limit: Limiter::default(),
        })
    }

    // ---- The image, for the adapter: each method decides and completes one operation.

    /// The image's current size.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    pub fn image_path(&self) -> &Path {
        &self.image_path
    }

    pub fn read_only(&self) -> bool {
        self.mode.read_only
    }

    /// The image's attributes (size from the cache, the rest from the file).
    pub fn stat(&self) -> Result<ImageStat, i32> {
        let md = self.image.metadata().map_err(|e| {
            warn!("stat of {} failed: {e}", self.image_path.display());
            errno_of(&e)
        })?;
        let time = |secs: i64, nsecs: i64| {
            UNIX_EPOCH + Duration::new(secs.max(0) as u64, nsecs.clamp(0, 999_999_999) as u32)
        };
        let mut perm = (md.mode() & 0o7777) as u16;
        if self.mode.read_only {
            perm &= !0o222;
        }
        Ok(ImageStat {
            size: self.size(),
            // A device is all data (its node has no blocks of its own).
            blocks: match self.device_block {
                Some(_) => self.size().div_ceil(512),
                None => md.blocks(),
            },
            perm,
            atime: time(md.atime(), md.atime_nsec()),
            mtime: time(md.mtime(), md.mtime_nsec()),
            ctime: time(md.ctime(), md.ctime_nsec()),
        })
    }

    /// setattr: truncate or extend (`size`) and chmod (`mode`); no blkdebug request.
    pub fn set_attr(&self, size: Option<u64>, mode: Option<u32>) -> Result<ImageStat, i32> {
        if let Some(size) = size {
            if self.mode.read_only {
                return Err(libc::EROFS);
            }
            let recording = self
                .cache
                .as_ref()
                .and_then(|c| c.recorder())
                .is_some_and(|r| r.recording());
            if self.device_block.is_some() {
                // A device's size is fixed: its own size is a no-op, any other gets the
                // EINVAL that ftruncate on the device gives.
                if size != self.size() {
                    return Err(libc::EINVAL);
                }
            } else if recording && size != self.size() {
                // A resize is no write the recording can replay (a shrink drops bytes with
                // no before-image): refused while recording.
                warn!(
                    "refused a resize of {} to {size} bytes while recording",
                    self.image_path.display()
                );
                return Err(libc::EBUSY);
            } else {
                self.set_size(size).map_err(|e| {
                    warn!(
                        "truncate of {} to {size} failed: {e}",
                        self.image_path.display()
                    );
                    errno_of(&e)
                })?;
            }
        }
        if let Some(mode) = mode {
            // SAFETY: fchmod on our own open descriptor; no memory is passed.
            let r = unsafe { libc::fchmod(self.image.as_raw_fd(), mode & 0o7777) };
            if r != 0 {
                return Err(errno_of(&io::Error::last_os_error()));
            }
        }
        self.stat()
    }

    /// statfs of the filesystem holding the image.
    pub fn statfs(&self) -> Result<libc::statvfs, i32> {
        // SAFETY: statvfs is plain old data; all-zero is a valid value.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatvfs fills the struct we own, from our own open descriptor.
        let r = unsafe { libc::fstatvfs(self.image.as_raw_fd(), &mut st) };
        if r != 0 {
            return Err(errno_of(&io::Error::last_os_error()));
        }
        Ok(st)
    }

    /// A client read of up to `size` bytes: like QEMU's export, reads stop at the end.
    pub fn read(&self, caller: Caller, offset: u64, size: u32, done: Completion) {
        let len = (size as u64).min(self.size().saturating_sub(offset));
        if len == 0 {
            return done(Ok(ReadBuf::pooled(0)));
        }
        self.submit(
            caller,
            Op::Read { offset, len },
            &[],
            Box::new(move |r| done(r.map(|o| o.data))),
        );
    }

    /// A client write. Within the image it is one request; past the end it grows the
    /// image (`--growable`) only if it succeeds, or is cut at the end (a disk has no room
    /// past its end: ENOSPC when nothing is left).
    pub fn write(&self, caller: Caller, offset: u64, data: &[u8], done: WriteDone) {
        if self.mode.read_only {
            return done(Err(libc::EROFS));
        }
        let size = self.size();
        let end = offset.saturating_add(data.len() as u64);
        let len = if end <= size || self.mode.growable {
            // A growing write extends the file in its own pwrite, after every check passed.
            data.len() as u64
        } else if offset >= size {
            return done(Err(libc::ENOSPC));
        } else {
            size - offset
        };
        if len == 0 {
            return done(Ok(0));
        }
        self.submit(
            caller,
            Op::Write { offset, len },
            &data[..len as usize],
            Box::new(move |r| done(r.map(|o| o.transferred.unwrap_or(len).min(len) as u32))),
        );
    }

    /// fsync, fdatasync and the flush of every close.
    pub fn flush(&self, caller: Caller, done: Done) {
        self.submit(
            caller,
            Op::Flush,
            &[],
            Box::new(move |r| done(r.map(|_| ()))),
        );
    }

    /// fallocate(2): punch-hole and zero-range are write-zeroes requests; plain allocation
    /// reaches no rule. Zero-range without KEEP_SIZE extends the image once it succeeded.
    pub fn fallocate(
        self: &Arc<Self>,
        caller: Caller,
        mode: i32,
        offset: u64,
        length: u64,
        done: Done,
    ) {
        if self.mode.read_only {
            return done(Err(libc::EROFS));
        }
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        let known =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 || (punch && zero) {
            return done(Err(libc::EOPNOTSUPP));
        }
        if !punch && !zero {
            return done(
                self.allocate(mode, offset, length)
                    .map_err(|e| errno_of(&e)),
            );
        }
        let size = self.size();
        let end = offset.saturating_add(length);
        // A device never grows: its zeroing stops at its end, as with KEEP_SIZE.
        let extends = !keep_size && end > size && self.device_block.is_none();
        let len = if extends {
            length
        } else {
            end.min(size).saturating_sub(offset)
        };
        if len == 0 {
            return done(Ok(()));
        }
        let mount = self.clone();
        self.submit(
            caller,
            Op::Zero { offset, len, punch },
            &[],
            Box::new(move |r| {
                let r = r.map(|_| ());
                done(match r {
                    Ok(()) if extends => mount.grow_to(end).map_err(|e| {
                        warn!("growing {} failed: {e}", mount.image_path.display());
                        errno_of(&e)
                    }),
                    other => other,
                })
            }),
        );
    }

    /// lseek SEEK_DATA / SEEK_HOLE: a block-status request, answered by the image's own
    /// holes. Other whences never reach a FUSE server.
    pub fn seek(self: &Arc<Self>, caller: Caller, offset: i64, whence: i32, done: SeekDone) {
        if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
            return done(Err(libc::EINVAL));
        }
        let size = self.size();
        let start = offset.max(0) as u64;
        if start >= size {
            return done(Err(libc::ENXIO));
        }
        let mount = self.clone();
        self.submit(
            caller,
            Op::BlockStatus {
                offset: start,
                len: size - start,
            },
            &[],
            Box::new(move |r| {
                if let Err(e) = r {
                    return done(Err(e));
                }
                // A device has no holes (and the kernel refuses both whences on one).
                if mount.device_block.is_some() {
                    let found = if whence == libc::SEEK_DATA {
                        start
                    } else {
                        size
                    };
                    return done(Ok(found as i64));
                }
                // Positional I/O never uses the descriptor's file offset, so seeking on the
                // shared descriptor disturbs no request.
                // SAFETY: lseek on the mount's own open descriptor.
                let found = unsafe { libc::lseek(mount.image.as_raw_fd(), offset, whence) };
                done(if found < 0 {
                    Err(errno_of(&io::Error::last_os_error()))
                } else {
                    Ok(found)
                })
            }),
        );
    }

    /// The final flush at unmount.
    pub fn sync(&self) -> io::Result<()> {
        self.image.sync_data()
    }

    // ---- Size changes: each one takes `resize`.

    /// Grows the image to at least `end` bytes (zero-range past the end).
    fn grow_to(&self, end: u64) -> io::Result<()> {
        let _guard = self.resize.lock();
        // The real size, not the cache: a racing truncate and write could leave the file
        // longer than the cache says, and growing must never cut it.
        let real = self.real_len()?;
        if real < end {
            self.image.set_len(end)?;
        }
        self.size.store(real.max(end), Ordering::Release);
        Ok(())
    }

    /// After a write or zeroing that ended past the cached size (a growing write, or one
    /// checked against the size before a truncate that ran meanwhile), re-reads the size so
    /// that the cache never stays below the file.
    fn note_extent(&self, end: u64) {
        if end > self.size() {
            let _guard = self.resize.lock();
            if let Ok(len) = self.real_len() {
                self.size.store(len, Ordering::Release);
            }
        }
    }

    /// Truncates or extends the image (setattr size).
    fn set_size(&self, size: u64) -> io::Result<()> {
        let _guard = self.resize.lock();
        // Pages past a new, smaller end must not be in any reply's window when they go.
        let _no_windows = self.map.as_ref().map(|m| m.exclude_windows());
        self.image.set_len(size)?;
        self.size.store(size, Ordering::Release);
        Ok(())
    }

    /// Plain `fallocate(2)` on the image (no blkdebug request: allocation only). Without
    /// `FALLOC_FL_KEEP_SIZE` it may extend the image.
    fn allocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        let _guard = self.resize.lock();
        if self.device_block.is_some() {
            // Every byte of a device is allocated; past its end there is no room.
            let inside = offset.saturating_add(len) <= self.size();
            if inside || mode & libc::FALLOC_FL_KEEP_SIZE != 0 {
                return Ok(());
            }
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        // SAFETY: fallocate on our own open descriptor; no memory is passed.
        let r = unsafe { libc::fallocate(self.image.as_raw_fd(), mode, offset as i64, len as i64) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        self.size.store(self.real_len()?, Ordering::Release);
        Ok(())
    }

    /// The image's length now: the file's, or the device's.
    fn real_len(&self) -> io::Result<u64> {
        match self.device_block {
            Some(_) => crate::media::device::size(&self.image),
            None => Ok(self.image.metadata()?.len()),
        }
    }
}
