//! The one owned state object of a mount, and the executor that walks a plan (`ops.rs`)
//! against it.
//!
//! Lock rule: the engine's mutex is taken for one `fire` or `decide` call at a time and never
//! held across I/O, nor across work that grows with the request or with a rule's numbers:
//! a check decides under it (`Engine::decide`) and draws the effect (which bits, bytes or
//! sectors) after releasing it. Image I/O is positional (`pread`/`pwrite`/`fallocate`/
//! `fdatasync` on one shared descriptor), so requests run in parallel on any number of FUSE
//! workers.
//!
//! Logging: the request path never waits on the log (`logring.rs` queues lines for a writer
//! thread), and a rule that acts on every request logs its first few injections, then one
//! summary a second (`Mount::log_limited`); the trace and stats count every request.
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

pub(crate) mod parking;
pub(crate) mod plan;
pub mod stats;
pub mod trace;

use std::borrow::Cow;
use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, info, warn};
use parking_lot::Mutex;
use serde_json::Value;

use crate::config::Limits;
use crate::engine::errno;
use crate::engine::faults::{CutMode, Edit, Effect};
use crate::engine::ranges::SectorSet;
use crate::engine::{
    Decision, Engine, Event, Fired, IoType, Placement, Plan, Rule, RuleId, RuleStats, Verdict,
};
use crate::fields;
use crate::logring::{Limiter, Say};
pub use crate::media::buffers::ReadBuf;
use crate::media::buffers::{ImageMap, MAPPED_READ_MIN};
use crate::media::{
    self, BadSectors, BadSettings, CutReport, PowerCycle, Unsynced, WriteCache, WriteCheck,
    read_full,
};
use crate::mount::parking::{Breakpoints, Resumed};
pub use crate::mount::parking::{ParkedInfo, WaiterDone, WaiterId};
use crate::mount::plan::{Op, Step, plan};
use crate::mount::stats::{Snapshot, Stats};
use crate::mount::trace::Trace;

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
    /// The logical block size when the image is a block device (`device.rs`): its size is
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

/// What a log line that may repeat for every request is about (see `Mount::log_limit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum LogKey {
    Rule(RuleId),
    BadSector,
    Healed,
}

impl std::fmt::Display for LogKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogKey::Rule(id) => write!(f, "rule {id}"),
            LogKey::BadSector | LogKey::Healed => f.write_str("bad sectors"),
        }
    }
}

/// The media a mount starts with (`spec/faults.md` §4, §5).
#[derive(Clone, Debug, Default)]
pub struct MediaSetup {
    /// The `[bad-sectors]` of the config.
    pub bad: Option<(SectorSet, BadSettings)>,
    /// Model a volatile write cache (`--write-cache`).
    pub write_cache: bool,
}

/// Who sent a request (for the trace).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    pub pid: u32,
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

/// A request in flight: its plan, where it is in it, and everything it owns.
pub struct Pending<'a> {
    op: Op,
    /// The request's id and sender, for the trace and logs.
    id: u64,
    caller: Caller,
    steps: Vec<Step>,
    pc: usize,
    failed: Option<i32>,
    /// Generations captured by the flush gates, recorded if the flush succeeds.
    raw_gen: Option<u64>,
    node_gen: Option<u64>,
    read_buf: ReadBuf,
    /// Borrowed from the FUSE worker's buffer until the request parks.
    write_data: Cow<'a, [u8]>,
    /// What the last check decided for the I/O steps after it (corrupt, drop, tear,
    /// misdirect); cleared at the next check.
    effect: Option<Effect>,
    /// A short transfer stops at this image offset.
    short_end: Option<u64>,
    /// The events fired, for `--trace-all` (empty otherwise).
    events: Vec<Event>,
    /// The power cycle the request began in (with `--write-cache`): the media fails its
    /// writes and flushes if a cut comes before they reach it.
    power: Option<PowerCycle>,
    /// A `[suspend]` rule that acted after a delay: park under its tag once the wait is over.
    suspend_after_delay: Option<(String, RuleId)>,
    done: Finish,
}

impl Pending<'_> {
    /// Takes ownership of the write payload so the request can outlive the worker's buffer.
    fn into_owned(self) -> Pending<'static> {
        Pending {
            op: self.op,
            id: self.id,
            caller: self.caller,
            steps: self.steps,
            pc: self.pc,
            failed: self.failed,
            raw_gen: self.raw_gen,
            node_gen: self.node_gen,
            read_buf: self.read_buf,
            write_data: Cow::Owned(self.write_data.into_owned()),
            effect: self.effect,
            short_end: self.short_end,
            events: self.events,
            power: self.power,
            suspend_after_delay: self.suspend_after_delay,
            done: self.done,
        }
    }
}

enum Advance {
    Finished(Result<(), i32>),
    /// Park under `tags` (a breakpoint's event, or a `[suspend]` rule: `cause` says which).
    Parked {
        tags: Vec<String>,
        cause: String,
    },
    /// Hold for this long (a `[delay]` rule), then go on.
    Delayed(Duration),
}

impl Advance {
    /// Parked by the `[suspend]` rule `rule` under `tag`.
    fn suspended(tag: String, rule: RuleId) -> Advance {
        Advance::Parked {
            tags: vec![tag],
            cause: format!("rule {rule}"),
        }
    }
}

/// What a check decided, for the executor.
enum Checked {
    Pass,
    Fail(i32),
    /// Wait this long, then apply `then` (a delay with `errno` is followed by `Fail`; a
    /// delay composes with the first later rule that acted: faults §1). `then` is never a
    /// `Delay`.
    Delay {
        wait: Duration,
        then: Box<Checked>,
    },
    Suspend {
        tag: String,
        rule: RuleId,
    },
    /// Applies to the I/O steps up to the next check.
    Effect(Effect),
}

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
        let cache = match media.write_cache {
            true => Some(WriteCache::new(&journal_beside)?),
            false => None,
        };
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
            if self.device_block.is_some() {
                // A device's size is fixed: its own size is a no-op, any other gets the
                // EINVAL that ftruncate on the device gives.
                if size != self.size() {
                    return Err(libc::EINVAL);
                }
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

    // ---- Rules and state, for the control table. Each takes the engine lock once.

    /// The seed of every random choice (`--seed`).
    pub fn seed(&self) -> u64 {
        self.engine.lock().seed()
    }

    /// The counters of `stats`.
    pub fn stats(&self) -> Snapshot {
        self.stats.snapshot()
    }

    /// Requests delayed and suspended now.
    pub fn parked_counts(&self) -> (usize, usize) {
        (
            self.breakpoints.delayed_count(),
            self.breakpoints.suspended_count(),
        )
    }

    /// Writes what the trace has queued and closes it (shutdown).
    pub fn finish_trace(&self) {
        if let Some(trace) = &self.trace {
            trace.finish();
        }
    }

    pub fn add_rule(&self, rule: Rule) -> RuleId {
        self.engine.lock().add(rule)
    }

    /// Adds a rule at `at` in the order of checks; `Err(n)`: no rule `n`.
    pub fn add_rule_placed(&self, rule: Rule, at: Placement) -> Result<RuleId, RuleId> {
        self.engine.lock().add_placed(rule, at)
    }

    pub fn remove_rule(&self, id: RuleId) -> Option<Rule> {
        self.engine.lock().remove(id)
    }

    /// Deletes every rule and breakpoint; state back to 1 (numbers keep counting).
    pub fn clear_rules(&self) {
        self.engine.lock().clear();
    }

    /// Replaces the inject-error and set-state rules (`reload`); breakpoints stay.
    pub fn replace_rules(&self, rules: Vec<Rule>) {
        self.engine.lock().replace_rules(rules);
    }

    pub fn state(&self) -> i64 {
        self.engine.lock().state()
    }

    pub fn set_state(&self, state: i64) {
        self.engine.lock().set_state(state);
    }

    /// Every live rule and breakpoint in written order, with its counters.
    pub fn rules(&self) -> Vec<RuleStatus> {
        let engine = self.engine.lock();
        engine
            .rules()
            .map(|(id, rule, stats)| RuleStatus {
                id,
                rule: rule.clone(),
                stats,
                armed_now: engine.is_armed(id),
            })
            .collect()
    }

    // ---- Breakpoints, for the control table and the timer.

    /// The suspended requests, oldest first.
    pub fn parked(&self) -> Vec<ParkedInfo> {
        self.breakpoints.list()
    }

    /// `wait_break`: completes `done` once a request is suspended under `tag`. The id
    /// returned while it waits cancels it ([`Self::cancel_wait`]).
    pub fn wait_for_break(
        &self,
        tag: &str,
        timeout: Option<Duration>,
        done: WaiterDone,
    ) -> Option<WaiterId> {
        self.breakpoints.wait_for(tag, timeout, done)
    }

    /// Forgets a `wait_break` whose client went away.
    pub fn cancel_wait(&self, id: WaiterId) {
        self.breakpoints.cancel_waiter(id);
    }

    /// How many `wait_break` waiters wait (for tests and `status`).
    pub fn waiters(&self) -> usize {
        self.breakpoints.waiter_count()
    }

    /// The timer's work: times out waiters and runs the `--max-suspend` watchdog. Returns
    /// when it is next due (`None`: only a change can make it due).
    pub fn expire(&self, max_suspend: Option<Duration>) -> Option<Instant> {
        self.expire_with(max_suspend, &mut |p| self.drive(p))
    }

    /// [`Self::expire`], handing each delayed request that is due to `resume`.
    fn expire_with(
        &self,
        max_suspend: Option<Duration>,
        resume: &mut dyn FnMut(Pending<'static>),
    ) -> Option<Instant> {
        let mut next = self.breakpoints.expire_waiters();
        let (due, next_delay) = self.breakpoints.take_due(Instant::now());
        for p in due {
            resume(p);
        }
        if let Some(d) = next_delay {
            next = Some(next.map_or(d, |n| n.min(d)));
        }
        if let Some(limit) = max_suspend {
            self.resume_older_than(limit);
            if let Some(due) = self
                .breakpoints
                .oldest_parked()
                .and_then(|oldest| oldest.checked_add(limit))
            {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
        }
        next
    }

    /// Runs the timer until shutdown closes the breakpoints. Delayed requests that are due
    /// continue on a few resumer threads, not on the timer's: a request's I/O and reply take
    /// microseconds, and sixteen requests due at once must not queue behind each other (nor
    /// delay the timer's next deadline). At shutdown the resumers finish what was handed to
    /// them before this returns.
    pub fn run_timer(&self, max_suspend: Option<Duration>) {
        let resumers = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
        let (tx, rx) = std::sync::mpsc::channel::<Pending<'static>>();
        let rx = Mutex::new(rx);
        std::thread::scope(|scope| {
            let mut running = 0;
            for i in 0..resumers {
                let rx = &rx;
                let spawned = std::thread::Builder::new()
                    .name(format!("blkdebugfs-resume-{i}"))
                    .spawn_scoped(scope, move || {
                        // The lock is held only to take the next request, never to run it.
                        loop {
                            let next = rx.lock().recv();
                            match next {
                                Ok(p) => self.drive(p),
                                Err(_) => return,
                            }
                        }
                    });
                match spawned {
                    Ok(_) => running += 1,
                    Err(e) => {
                        warn!("no resumer thread ({e}): delayed requests continue on the timer");
                        break;
                    }
                }
            }
            let bp = &self.breakpoints;
            while !bp.is_closed() {
                let seen = bp.changes();
                let next = self.expire_with(max_suspend, &mut |p| {
                    if running == 0 {
                        self.drive(p);
                    } else if let Err(back) = tx.send(p) {
                        self.drive(back.0);
                    }
                });
                bp.sleep_until(next, seen);
            }
            drop(tx);
        });
    }

    /// Fires an event outside any request (the `none` event at mount start).
    pub fn fire(&self, event: Event) {
        let fired = self.fire_logged(event, None);
        if !fired.suspend.is_empty() {
            warn!("breakpoint on '{event}' hit outside a request: nothing to suspend");
        }
    }

    /// Fires `event`; at debug level, says what it armed and how the state moved, so that
    /// "why did my rule not fire?" has an answer in the log.
    fn fire_logged(&self, event: Event, request: Option<&Pending<'_>>) -> Fired {
        let mut engine = self.engine.lock();
        let fired = engine.fire(event);
        if let Some(trace) = &self.trace
            && (fired.state_change.is_some() || !fired.suspend.is_empty())
        {
            let mut f = request.map(request_fields).unwrap_or_default();
            f.insert("event".into(), event.name().into());
            if let (Some((from, to)), Some(rule)) = (fired.state_change, fired.state_rule) {
                let mut g = f.clone();
                g.insert("action".into(), "set-state".into());
                g.insert("rule".into(), rule.0.into());
                g.insert("from".into(), from.into());
                g.insert("state".into(), to.into());
                trace.record(g);
            }
            if !fired.suspend.is_empty() {
                f.insert("action".into(), "break".into());
                f.insert("tags".into(), fired.suspend.clone().into());
                f.insert("state".into(), engine.state().into());
                trace.record(f);
            }
        }
        for _ in &fired.suspend {
            self.stats.fault("break");
        }
        if log::log_enabled!(log::Level::Debug) {
            let state = engine.state();
            let armed = fired.rearmed.then(|| {
                let ids: Vec<String> = engine.armed().iter().map(|id| id.to_string()).collect();
                ids.join(", ")
            });
            drop(engine);
            match (armed, fired.state_change) {
                (None, None) => debug!("event {event} fired (state {state})"),
                (armed, change) => {
                    let mut text = format!("event {event} fired");
                    if let Some(ids) = armed {
                        if ids.is_empty() {
                            text.push_str(", active list now empty");
                        } else {
                            let _ = write!(text, ", armed rule(s) {ids}");
                        }
                    }
                    match change {
                        Some((from, to)) => {
                            let _ = write!(text, ", state {from} -> {to}");
                        }
                        None => {
                            let _ = write!(text, " (state {state})");
                        }
                    }
                    debug!("{text}");
                }
            }
        }
        fired
    }

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

    /// Starts one client operation: walks its plan until it finishes (and `done` replies) or
    /// a breakpoint or delay parks it. Either way the calling worker returns at once: a
    /// parked request owns its buffer and reply, and continues on whichever thread resumes
    /// it.
    fn submit(&self, caller: Caller, op: Op, write_data: &[u8], done: Finish) {
        let bytes = match op {
            Op::BlockStatus { .. } => 0,
            op => op.range().1,
        };
        self.stats.request(op.kind(), bytes);
        // Read before the power check: a cut that starts in between is then seen by both.
        let power = self.cache.as_ref().map(|c| c.cycle());
        if self.powered_off() {
            // While off, every request fails and fires nothing.
            return done(Err(libc::EIO));
        }
        let pending = Pending {
            op,
            id: self.next_request.fetch_add(1, Ordering::Relaxed),
            caller,
            steps: plan(op, self.limits),
            pc: 0,
            failed: None,
            raw_gen: None,
            node_gen: None,
            // Allocated at the first read step, so a request parked before it holds none.
            read_buf: ReadBuf::pooled(0),
            write_data: Cow::Borrowed(write_data),
            effect: None,
            short_end: None,
            events: Vec::new(),
            power,
            suspend_after_delay: None,
            done,
        };
        self.drive(pending);
    }

    /// Walks `p` on from its current step; parks it when a breakpoint, `[suspend]` rule or
    /// delay says so.
    fn drive(&self, mut p: Pending<'_>) {
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
                if let Some(trace) = self.trace.as_ref().filter(|t| t.all()) {
                    let mut f = request_fields(&p);
                    let events: Vec<Value> = p.events.iter().map(|e| e.name().into()).collect();
                    f.insert("events".into(), Value::Array(events));
                    f.insert("result".into(), errno_field(result.err()));
                    if let Some(end) = p.short_end {
                        f.insert("transferred".into(), transferred(&p.op, end).into());
                    }
                    trace.record(f);
                }
                let Pending {
                    mut read_buf,
                    short_end,
                    op,
                    done,
                    ..
                } = p;
                let transferred = short_end.map(|end| transferred(&op, end));
                if let Some(n) = transferred {
                    read_buf.truncate(n as usize);
                }
                done(result.map(|()| Outcome {
                    data: read_buf,
                    transferred,
                }));
            }
            Advance::Parked { tags, cause } => {
                // Parking is refused once shutting down: then continue right away.
                let op = p.op;
                if let Some(p) = self.breakpoints.park(p.into_owned(), op, tags, cause) {
                    self.drive(p);
                }
            }
            Advance::Delayed(wait) => {
                let now = Instant::now();
                let due = now.checked_add(wait).unwrap_or(now);
                if let Some(p) = self.breakpoints.delay(p.into_owned(), due) {
                    self.drive(p);
                }
            }
        }
    }

    /// Runs steps until the plan ends or a breakpoint, `[suspend]` rule or delay parks it.
    fn advance(&self, p: &mut Pending<'_>) -> Advance {
        if let Some((tag, rule)) = p.suspend_after_delay.take() {
            // The delay is over; the `[suspend]` that acted after it parks the request now.
            return Advance::suspended(tag, rule);
        }
        loop {
            let step = p.steps[p.pc];
            p.pc += 1;
            match step {
                Step::Event(event) => {
                    if self.trace.as_ref().is_some_and(|t| t.all()) {
                        p.events.push(event);
                    }
                    let fired = self.fire_logged(event, Some(&*p));
                    if let Some((rule, mode)) = fired.power_cut {
                        // The cut happens before the request that fired it goes on, and that
                        // request fails.
                        if let Err(e) = self.power_cut(mode, None, Some(rule)) {
                            warn!("rule {rule}: {e}");
                        }
                        return Advance::Finished(Err(libc::EIO));
                    }
                    if !fired.suspend.is_empty() {
                        // Parked after the whole event, state updated (as QEMU 6.1+).
                        return Advance::Parked {
                            tags: fired.suspend,
                            cause: format!("event {event}"),
                        };
                    }
                }
                Step::Check {
                    iotype,
                    offset,
                    len,
                    on_fail,
                } => {
                    p.effect = None;
                    // What follows a delay is applied now and takes effect after the wait
                    // (the steps after this one run once the timer continues the request).
                    let (wait, checked) = after_delay(self.check(p, iotype, offset, len, ""));
                    match checked {
                        Checked::Pass | Checked::Delay { .. } => {}
                        Checked::Fail(errno) => {
                            p.failed = Some(errno);
                            p.pc = on_fail;
                        }
                        Checked::Suspend { tag, rule } => return p.suspend(wait, tag, rule),
                        Checked::Effect(effect) => p.take_effect(effect),
                    }
                    if let Some(wait) = wait {
                        return Advance::Delayed(wait);
                    }
                }
                Step::RmwCheck {
                    offset,
                    len,
                    on_fail,
                } => {
                    let note = "; ignored, as QEMU ignores read-modify-write read errors";
                    let (wait, checked) =
                        after_delay(self.check(p, IoType::Read, offset, len, note));
                    match checked {
                        Checked::Fail(_) => p.pc = on_fail,
                        // The padding read's bytes are never used (see ops.rs), so only the
                        // parking actions change anything here; an error after a delay is
                        // ignored like any padding read error.
                        Checked::Suspend { tag, rule } => return p.suspend(wait, tag, rule),
                        Checked::Pass | Checked::Effect(_) | Checked::Delay { .. } => {}
                    }
                    if let Some(wait) = wait {
                        return Advance::Delayed(wait);
                    }
                }
                Step::ZeroesCheck {
                    offset,
                    len,
                    on_fail,
                    on_enotsup,
                } => {
                    p.effect = None;
                    let fail = |p: &mut Pending<'_>, errno: i32| match on_enotsup {
                        Some(fallback) if errno == libc::EOPNOTSUPP => p.pc = fallback,
                        _ => {
                            p.failed = Some(errno);
                            p.pc = on_fail;
                        }
                    };
                    let (wait, checked) =
                        after_delay(self.check(p, IoType::WriteZeroes, offset, len, ""));
                    match checked {
                        Checked::Pass | Checked::Delay { .. } => {}
                        Checked::Fail(errno) => fail(p, errno),
                        Checked::Suspend { tag, rule } => return p.suspend(wait, tag, rule),
                        Checked::Effect(effect) => p.take_effect(effect),
                    }
                    if let Some(wait) = wait {
                        return Advance::Delayed(wait);
                    }
                }
                Step::Jump { to } => p.pc = to,
                Step::Read { offset, len, at } => {
                    let total = p.op.range().1;
                    // A short read stops at its end: later bytes are never read.
                    let len = p.clip(offset, len);
                    if p.read_buf.is_empty() {
                        // A large read done in one step that nothing can park after (the
                        // next step is the end) and that no fault edits may reply straight
                        // from the mapping.
                        let whole_and_last = at == 0
                            && len == total
                            && len >= MAPPED_READ_MIN
                            && p.effect.is_none()
                            && matches!(p.steps.get(p.pc), Some(Step::Done));
                        let window = match &self.map {
                            Some(map) if whole_and_last => map.window(&self.image, offset, len),
                            _ => None,
                        };
                        p.read_buf = window.unwrap_or_else(|| ReadBuf::pooled(total as usize));
                    }
                    if len == 0 {
                        continue;
                    }
                    if self.powered_off() {
                        return Advance::Finished(Err(libc::EIO));
                    }
                    if let Some((errno, sector)) = self.bad.check_read(offset, len) {
                        // A medium error fails the whole command.
                        self.bad_sector_hit(p, sector, errno);
                        return Advance::Finished(Err(errno));
                    }
                    let edits = match &p.effect {
                        Some(Effect::Corrupt { edits }) => Some(edits.as_slice()),
                        _ => None,
                    };
                    if let Some(buf) = p.read_buf.as_mut() {
                        let dst = &mut buf[at..at + len as usize];
                        if let Err(e) = read_full(&self.image, dst, offset) {
                            return Advance::Finished(Err(self.io_failed("read", offset, len, e)));
                        }
                        if let Some(edits) = edits {
                            Edit::apply_all(edits, dst, offset);
                        }
                    }
                }
                Step::Write { offset, len, at } => {
                    let len = p.clip(offset, len);
                    let src = &p.write_data[at..at + len as usize];
                    if let Err(errno) = self.write_with_effect(p, src, offset) {
                        return Advance::Finished(Err(errno));
                    }
                    if let Some(Effect::Torn { errno, .. }) = p.effect
                        && errno != 0
                    {
                        p.failed = Some(errno);
                    }
                }
                Step::Zero { offset, len, punch } => {
                    let dropped = matches!(p.effect, Some(Effect::DropWrite));
                    if len > 0
                        && !dropped
                        && let Err(errno) =
                            self.store(p, offset, len, "zero", || match self.device_block {
                                Some(block) => crate::media::device::zero(
                                    &self.image,
                                    offset,
                                    len,
                                    punch,
                                    block,
                                ),
                                None => zero_range(&self.image, offset, len, punch),
                            })
                    {
                        return Advance::Finished(Err(errno));
                    }
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
                    if let Err(errno) = self.flush_media(p) {
                        return Advance::Finished(Err(errno));
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

    /// The flush itself: `fdatasync` of the image, ordered against power cuts by the write
    /// cache (which alone decides whether a flush that overlapped a cut succeeded).
    fn flush_media(&self, p: &Pending<'_>) -> Result<(), i32> {
        // The cache refuses only because of a cut: EIO, nothing to log.
        let power_lost = |_| libc::EIO;
        let ticket = match (&self.cache, p.power) {
            (Some(cache), Some(begun)) => Some(cache.begin_flush(begun).map_err(power_lost)?),
            _ => None,
        };
        if let Err(e) = self.image.sync_data() {
            return Err(self.io_failed("fdatasync", 0, 0, e));
        }
        match (&self.cache, ticket) {
            (Some(cache), Some(ticket)) => cache.end_flush(ticket).map_err(power_lost),
            _ => Ok(()),
        }
    }

    /// Stores the client's bytes `src`, aimed at `offset`, as the check's `effect` says.
    fn write_with_effect(&self, p: &Pending<'_>, src: &[u8], offset: u64) -> Result<(), i32> {
        let len = src.len() as u64;
        if len == 0 {
            return Ok(());
        }
        let store = |bytes: &[u8], at: u64, what: &'static str| {
            self.store(p, at, bytes.len() as u64, what, || {
                self.image.write_all_at(bytes, at)
            })
        };
        match &p.effect {
            Some(Effect::DropWrite) => Ok(()),
            Some(Effect::Corrupt { edits }) => {
                let mut copy = src.to_vec();
                Edit::apply_all(edits, &mut copy, offset);
                store(&copy, offset, "write")
            }
            Some(Effect::Torn { kept, .. }) => {
                for &(s, e) in kept {
                    let (s, e) = (s.max(offset), e.min(offset + len));
                    if s < e {
                        store(
                            &src[(s - offset) as usize..(e - offset) as usize],
                            s,
                            "torn write",
                        )?;
                    }
                }
                Ok(())
            }
            Some(Effect::Misdirect { shift }) => {
                let at = misdirected(offset, len, *shift, self.size());
                store(src, at, "misdirected write")
            }
            _ => store(src, offset, "write"),
        }
    }

    /// Changes image bytes `[at, at+len)` by `io` through the media: bad sectors decide
    /// first (a write may heal them or fail on them), then the write cache journals the
    /// before-image (and refuses while the power is off), then `io` runs.
    fn store(
        &self,
        p: &Pending<'_>,
        at: u64,
        len: u64,
        what: &'static str,
        io: impl FnOnce() -> io::Result<()>,
    ) -> Result<(), i32> {
        let heal = match self.bad.check_write(at, len) {
            WriteCheck::Fail(errno, sector) => {
                self.bad_sector_hit(p, sector, errno);
                return Err(errno);
            }
            WriteCheck::Heal(ranges) => Some(ranges),
            WriteCheck::Clean | WriteCheck::StaysBad => None,
        };
        let done = match (&self.cache, p.power) {
            (Some(cache), Some(begun)) => cache.write(&self.image, at, len, begun, io),
            _ => io(),
        };
        if let Err(e) = done {
            if media::is_power_lost(&e) {
                return Err(libc::EIO);
            }
            return Err(self.io_failed(what, at, len, e));
        }
        self.note_extent(at + len);
        if let Some(ranges) = heal {
            self.log_limited(
                LogKey::Healed,
                || format!("healed bad sector(s) {ranges:?} by a {what} at offset {at}"),
                || "were healed by".to_string(),
            );
            self.bad.heal(&ranges);
        }
        Ok(())
    }

    /// Logs, counts and traces a request that a bad sector failed.
    fn bad_sector_hit(&self, p: &Pending<'_>, sector: u64, errno: i32) {
        self.log_limited(
            LogKey::BadSector,
            || {
                format!(
                    "{} at offset {}: bad sector {sector}, failing with {}",
                    p.op.name(),
                    p.op.range().0,
                    errno::describe(errno)
                )
            },
            || "failed".to_string(),
        );
        self.stats.fault("bad-sector");
        if let Some(trace) = &self.trace {
            let mut f = request_fields(p);
            f.insert("action".into(), "bad-sector".into());
            f.insert("sector".into(), sector.into());
            f.insert("errno".into(), errno_field(Some(errno)));
            trace.record(f);
        }
    }

    /// Whether the device is off (after a power cut, until power-on).
    fn powered_off(&self) -> bool {
        self.cache.as_ref().is_some_and(|c| c.is_off())
    }

    // ---- The write cache and the power, for the control table.

    /// Whether the mount models a write cache (`--write-cache`).
    pub fn has_write_cache(&self) -> bool {
        self.cache.is_some()
    }

    /// The unsynced writes (`None` without `--write-cache`).
    pub fn unsynced(&self) -> Option<Unsynced> {
        self.cache.as_ref().map(|c| c.unsynced())
    }

    /// Cuts the power (§5): resolves the unsynced writes by `mode`, with `seed` or the
    /// mount's; `rule` names the `[power-cut]` rule that did it. `Err` without
    /// `--write-cache`.
    pub fn power_cut(
        &self,
        mode: CutMode,
        seed: Option<u64>,
        rule: Option<RuleId>,
    ) -> Result<CutReport, String> {
        let Some(cache) = &self.cache else {
            return Err("no write cache to lose: mount with --write-cache to cut the power".into());
        };
        let seed = seed.unwrap_or_else(|| self.seed());
        let report = cache
            .cut(&self.image, mode, seed)
            .map_err(|e| format!("the power cut failed on {}: {e}", self.image_path.display()))?;
        let by = rule.map_or(String::new(), |r| format!(" by rule {r}"));
        info!(
            "{}{by}; the device is off until power-on",
            report.summary(10)
        );
        if let Some(trace) = &self.trace {
            let ranges = |v: &[(u64, u64)]| -> Vec<Value> {
                v.iter().map(|(o, l)| Value::from(vec![*o, *l])).collect()
            };
            let torn: Vec<Value> = report
                .torn
                .iter()
                .map(|(o, l, k)| Value::from(vec![*o, *l, *k]))
                .collect();
            trace.record(fields! {
                "action" => "power-cut",
                "mode" => mode.name(),
                "seed" => seed,
                "rule" => rule.map(|r| r.0),
                "lost" => ranges(&report.lost),
                "kept" => ranges(&report.kept),
                "torn" => torn,
            });
        }
        Ok(report)
    }

    /// Turns the device back on; `Err` without `--write-cache`. `Ok(false)` when it was on.
    pub fn power_on(&self) -> Result<bool, String> {
        let Some(cache) = &self.cache else {
            return Err("the power is always on without --write-cache".into());
        };
        let was_off = cache.power_on();
        if was_off {
            info!(
                "power on: serving {} as the cut left it",
                self.image_path.display()
            );
            if let Some(trace) = &self.trace {
                trace.record(fields! {"action" => "power-on"});
            }
        }
        Ok(was_off)
    }

    /// The power state as `stats` shows it.
    pub fn power_state(&self) -> &'static str {
        match &self.cache {
            None => "on (no --write-cache)",
            Some(c) if c.is_off() => "off",
            Some(_) => "on",
        }
    }

    // ---- Bad sectors, for the control table.

    pub fn bad_add(&self, set: &SectorSet) {
        self.bad.add(set);
    }

    pub fn bad_remove(&self, set: &SectorSet) {
        self.bad.remove(set);
    }

    pub fn bad_clear(&self) {
        self.bad.clear();
    }

    pub fn bad_list(&self) -> (SectorSet, BadSettings) {
        (self.bad.snapshot(), self.bad.settings())
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
    fn resume_older_than(&self, limit: Duration) {
        for (id, op, p) in self.breakpoints.take_older_than(limit) {
            warn!(
                "request {id} ({}) was suspended for more than {limit:?}: resuming it \
                 (--max-suspend)",
                op.name()
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
        self.log_pending();
        self.breakpoints.cancel_waiters();
    }

    /// Checks one request against the rules; logs, counts and traces what acted, and says
    /// what the executor must do.
    fn check(&self, p: &Pending<'_>, iotype: IoType, offset: u64, len: u64, note: &str) -> Checked {
        let (verdict, state) = {
            let mut engine = self.engine.lock();
            if !engine.has_checks() {
                return Checked::Pass;
            }
            // Only the decision under the lock: its effect (which bits, which sectors) costs
            // up to the request's size or the rule's numbers, and is drawn below.
            let verdict = engine.decide(iotype, offset, len);
            (verdict, engine.state())
        };
        let Verdict::Act(decision) = verdict else {
            return Checked::Pass;
        };
        self.decided(p, decision, state, iotype, offset, len, note)
    }

    /// Logs, counts and traces one rule's decision, and what follows it after a delay.
    #[allow(clippy::too_many_arguments)]
    fn decided(
        &self,
        p: &Pending<'_>,
        decision: Decision<Plan>,
        state: i64,
        iotype: IoType,
        offset: u64,
        len: u64,
        note: &str,
    ) -> Checked {
        self.stats.fault(decision.action);
        let range = if len == 0 {
            String::new()
        } else {
            format!(" at offset {offset}, {len} bytes")
        };
        // `into write_aio (write at ...)`, but `into flush` when the names agree.
        let op = p.op;
        let what = if op.name() == iotype.name() {
            format!("{}{range}", op.name())
        } else {
            format!("{} ({iotype}{range})", op.name())
        };
        let Decision {
            rule,
            armed_by,
            action,
            effect: plan,
            then,
        } = decision;
        let effect = plan.effect();
        let by = match armed_by {
            Some(event) => format!("armed by {event}"),
            None => "(standing)".to_string(),
        };
        let mut f = request_fields(p);
        f.insert("iotype".into(), iotype.name().into());
        f.insert("rule".into(), rule.0.into());
        f.insert("action".into(), action.into());
        f.insert("armed_by".into(), armed_by.map(|e| e.name()).into());
        f.insert("state".into(), state.into());
        let mut errno_of_effect = None;
        let mut follow = None;
        let mut checked = match effect {
            Effect::Fail { errno } => {
                self.log_limited(
                    LogKey::Rule(rule),
                    || {
                        format!(
                            "injecting {} into {what} for rule {rule} {by}{note}",
                            errno::describe(errno),
                        )
                    },
                    || format!("injected {} into", errno::describe(errno)),
                );
                errno_of_effect = Some(errno);
                Checked::Fail(errno)
            }
            Effect::Delay { wait, errno } => {
                self.log_limited(
                    LogKey::Rule(rule),
                    || {
                        format!(
                            "delaying {what} by {} for rule {rule} {by}{}",
                            crate::engine::units::duration_text(wait),
                            if errno != 0 {
                                format!(", then failing it with {}", errno::describe(errno))
                            } else {
                                String::new()
                            }
                        )
                    },
                    || match errno {
                        0 => "delayed".to_string(),
                        e => format!("delayed (then failed with {})", errno::describe(e)),
                    },
                );
                f.insert("delay_us".into(), (wait.as_micros() as u64).into());
                errno_of_effect = (errno != 0).then_some(errno);
                // What a later rule decided is logged and traced after the delay's line,
                // below, and applied when the wait is over.
                follow = then;
                Checked::Delay {
                    wait,
                    then: Box::new(match errno {
                        0 => Checked::Pass,
                        errno => Checked::Fail(errno),
                    }),
                }
            }
            Effect::Suspend { tag } => {
                f.insert("tag".into(), tag.clone().into());
                Checked::Suspend { tag, rule }
            }
            effect => {
                let detail = match &effect {
                    Effect::Corrupt { edits } => {
                        let offsets: Vec<Value> = edits.iter().map(|e| e.offset().into()).collect();
                        let text = format!(
                            "corrupting {} byte(s) from offset {}",
                            edits.len(),
                            edits.first().map_or(0, |e| e.offset())
                        );
                        f.insert("corrupted".into(), Value::Array(offsets));
                        text
                    }
                    Effect::DropWrite => "dropping".to_string(),
                    Effect::Torn { kept, errno } => {
                        let ranges: Vec<Value> = kept
                            .iter()
                            .map(|(s, e)| Value::from(vec![*s, *e]))
                            .collect();
                        let bytes: u64 = kept.iter().map(|(s, e)| e - s).sum();
                        f.insert("kept".into(), Value::Array(ranges));
                        f.insert("kept_bytes".into(), bytes.into());
                        errno_of_effect = (*errno != 0).then_some(*errno);
                        format!("tearing (keeping {bytes} of {len} bytes)")
                    }
                    Effect::Short { end } => {
                        let n = end.saturating_sub(offset);
                        f.insert("transferred".into(), transferred(&op, *end).into());
                        format!("shortening to {n} bytes")
                    }
                    Effect::Misdirect { shift } => {
                        let landed = misdirected(offset, len, *shift, self.size());
                        f.insert("landed".into(), landed.into());
                        format!("misdirecting to offset {landed}")
                    }
                    _ => String::new(),
                };
                let done = match &effect {
                    Effect::Corrupt { .. } => "corrupted",
                    Effect::DropWrite => "dropped",
                    Effect::Torn { .. } => "tore",
                    Effect::Short { .. } => "shortened",
                    Effect::Misdirect { .. } => "misdirected",
                    _ => "acted on",
                };
                self.log_limited(
                    LogKey::Rule(rule),
                    || format!("{detail} {what} for rule {rule} {by}{note}"),
                    || done.to_string(),
                );
                Checked::Effect(effect)
            }
        };
        f.insert("errno".into(), errno_field(errno_of_effect));
        if let Some(trace) = &self.trace {
            trace.record(f);
        }
        if let (Checked::Delay { then, .. }, Some(next)) = (&mut checked, follow) {
            **then = self.decided(p, *next, state, iotype, offset, len, note);
        }
        checked
    }

    /// Logs (at info) one occurrence of something that may happen on every request: its
    /// own `line` for the first few of `key`, then a summary a second, `KEY: DONE N more
    /// request(s) in the last 1.0 s` (`done` says what was done to them). Only what is
    /// logged is formatted.
    fn log_limited(&self, key: LogKey, line: impl FnOnce() -> String, done: impl Fn() -> String) {
        if !log::log_enabled!(log::Level::Info) {
            return;
        }
        match self.log_limit.admit(key, Instant::now(), &done) {
            Say::Line => info!("{}", line()),
            Say::Summary { count, over } => info!("{}", summary(key, &done(), count, over)),
            Say::Nothing => {}
        }
    }

    /// Logs what [`Mount::log_limited`] counted and has not said yet (at shutdown).
    fn log_pending(&self) {
        for (key, done, count, over) in self.log_limit.pending(Instant::now()) {
            info!("{}", summary(key, &done, count, over));
        }
    }

    fn io_failed(&self, what: &str, offset: u64, len: u64, e: io::Error) -> i32 {
        warn!(
            "{what} of {len} bytes at offset {offset} on {} failed: {e}",
            self.image_path.display()
        );
        e.raw_os_error().unwrap_or(libc::EIO)
    }
}

/// Splits a check's delay from what follows it: the wait (if any) and the decision to apply.
fn after_delay(checked: Checked) -> (Option<Duration>, Checked) {
    match checked {
        Checked::Delay { wait, then } => (Some(wait), *then),
        other => (None, other),
    }
}

impl Pending<'_> {
    /// Parks the request under a `[suspend]` rule's tag: now, or once `wait` is over.
    fn suspend(&mut self, wait: Option<Duration>, tag: String, rule: RuleId) -> Advance {
        match wait {
            None => Advance::suspended(tag, rule),
            Some(wait) => {
                self.suspend_after_delay = Some((tag, rule));
                Advance::Delayed(wait)
            }
        }
    }

    /// Takes a check's effect for the I/O steps up to the next check.
    fn take_effect(&mut self, effect: Effect) {
        if let Effect::Short { end } = effect {
            self.short_end = Some(self.short_end.map_or(end, |s| s.min(end)));
        }
        self.effect = Some(effect);
    }

    /// `len` bytes at `offset`, cut at a short transfer's end.
    fn clip(&self, offset: u64, len: u64) -> u64 {
        match self.short_end {
            Some(end) => len.min(end.saturating_sub(offset)),
            None => len,
        }
    }
}

/// The bytes of `op` before a short transfer's `end`.
fn transferred(op: &Op, end: u64) -> u64 {
    let (offset, len) = op.range();
    end.saturating_sub(offset).min(len)
}

/// Where a write of `len` bytes aimed at `offset` lands when shifted by `shift`, clamped so
/// that it stays inside an image of `size` bytes.
/// `rule 3: injected ENOSPC (28) into 1234 more request(s) in the last 1.0 s`.
fn summary(key: LogKey, done: &str, count: u64, over: Duration) -> String {
    format!(
        "{key}: {done} {count} more request(s) in the last {:.1} s",
        over.as_secs_f64()
    )
}

fn misdirected(offset: u64, len: u64, shift: i64, size: u64) -> u64 {
    let target = i128::from(offset) + i128::from(shift);
    let last_start = i128::from(size.saturating_sub(len));
    target.clamp(0, last_start.max(0)) as u64
}

/// The trace fields every request-related object starts with.
fn request_fields(p: &Pending<'_>) -> serde_json::Map<String, Value> {
    let (offset, len) = p.op.range();
    fields! {
        "req" => p.id,
        "pid" => p.caller.pid,
        "op" => p.op.name(),
        "offset" => offset,
        "len" => len,
    }
}

/// An errno as the trace writes it: its name (`"EIO"`), or `null`.
fn errno_field(errno: Option<i32>) -> Value {
    match errno {
        None => Value::Null,
        Some(e) => errno::name(e).map_or_else(|| Value::from(e), Value::from),
    }
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
    crate::media::device::write_zeroes(file, offset, len)
}
