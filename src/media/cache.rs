//! The volatile write cache and power cuts (`spec/faults.md` §5).
//!
//! # The write cache (`--write-cache`)
//! Writes go through to the image at once (so reads see the newest data and a `kill -9` of
//! the daemon leaves every acknowledged write on the image), and each one first keeps the
//! *before-image* of the bytes it overwrites in an undo journal: in memory up to 64 MiB,
//! then in a temporary file beside the image (disk, not memory, bounds the unsynced data),
//! with an in-memory index of one small entry per write. A successful flush drops the entries of the writes that completed before
//! it: they are durable. A power cut walks the journal from the newest write to the oldest
//! and, sector by sector, either keeps a write (the sector is settled: no older write may
//! touch it again) or restores its before-image. So a sector ends as its durable content or
//! as the content one of its writes left, and a kept later write is never undone by an
//! earlier one (§5).
//!
//! Holes stay holes: a before-image records no bytes for a piece that reads as zeroes, and
//! restoring such a piece punches a hole (which reads the same); ranges over 1 MiB (a big
//! write-zeroes) first ask for their data extents (`SEEK_DATA`), so a 1 TiB sparse image with
//! 1 GiB unsynced journals at most 1 GiB, not a terabyte.
//!
//! # Flushes against cuts
//! A cut is a point in time: the moment it takes the journal's lock, turns the device off
//! and starts a new power cycle. A flush ends under that same lock ([`WriteCache::end_flush`]):
//! if it got there first, its writes leave the journal before the cut can see them (durable
//! in every mode); if the cut got there first, the flush fails with EIO, even when the
//! power is back on by then. Requests carry the power cycle they began in, so a write or
//! flush parked across a cut (and a power-on) is refused too. No second check anywhere
//! else decides "before or after the cut".
//!
//! Lock rule: a journaled write claims its sectors for its three steps (read the
//! before-image, keep it, write the data), because a before-image is only right if no other
//! write to those bytes runs in between; writes to other sectors run in parallel. The
//! journal's index lock is held only to reserve space and record an entry, never across
//! I/O. A cut takes the power lock exclusively, so it waits for the writes in flight and no
//! write starts during it. Only with `--write-cache`; the engine's lock is never taken under
//! any of these.

use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex, RwLock};

use crate::engine::faults::{CutMode, Draw};
use crate::engine::ranges::{SECTOR, SectorSet};
use crate::engine::settle::settle;
use crate::media::record::{Content, Recorder};

/// One journaled write: the bytes it covered and its before-image's pieces that are not
/// zeroes (the gaps between them were zeroes or holes, and are restored as holes).
struct Entry {
    /// Orders entries against flushes.
    seq: u64,
    offset: u64,
    len: u64,
    /// The before-image's pieces that are not zeroes, in image order.
    data: Vec<Piece>,
}

impl Entry {
    /// Bytes of its before-image held in memory.
    fn memory(&self) -> u64 {
        memory_of(&self.data)
    }
}

/// Bytes of `pieces` held in memory.
fn memory_of(pieces: &[Piece]) -> u64 {
    pieces
        .iter()
        .filter(|p| matches!(p.bytes, Stored::Memory(_)))
        .map(|p| p.len)
        .sum()
}

/// A piece of a before-image: `len` bytes that were at image offset `at`.
struct Piece {
    at: u64,
    len: u64,
    bytes: Stored,
}

/// Where a piece's bytes are kept.
enum Stored {
    /// In memory, while the journal's memory budget lasts (no syscall to keep them).
    Memory(Box<[u8]>),
    /// At this offset of the journal file.
    File(u64),
}

/// Before-image bytes kept in memory at most; the rest goes to the journal file, so the
/// unsynced data is bounded by the filesystem, not by memory.
const MEMORY_BUDGET: u64 = 64 << 20;

struct Journal {
    /// Bytes used (or reserved by writes in flight) in the journal file.
    end: u64,
    entries: Vec<Entry>,
    next_seq: u64,
    /// Writes that reserved journal space and have not recorded their entry yet: the file
    /// may only be emptied when there are none.
    in_flight: usize,
    /// Before-image bytes held in memory (at most [`MEMORY_BUDGET`]).
    in_memory: u64,
    /// Before-image bytes freed since the allocator was last asked to give memory back.
    freed_since_trim: u64,
}

/// Freed before-images worth giving back to the system. Thousands of freed 4 KiB
/// before-images leave free pages scattered inside the heap, which the allocator keeps
/// (with the daemon's one arena, see `use_one_malloc_arena` in `main.rs`) until asked:
/// without this the daemon stayed at its peak after every flush.
const TRIM_AFTER: u64 = 8 << 20;

impl Journal {
    /// Counts `freed` bytes; `true` when it is time to give memory back (outside the lock).
    fn note_freed(&mut self, freed: u64) -> bool {
        self.freed_since_trim += freed;
        if self.freed_since_trim >= TRIM_AFTER {
            self.freed_since_trim = 0;
            return true;
        }
        false
    }
}

/// Asks the allocator to return free memory to the system (glibc's `malloc_trim`, which
/// also releases free pages inside a heap). It walks the heap: a few milliseconds, once per
/// [`TRIM_AFTER`] bytes freed, outside every lock, on the flush that freed them. Run before
/// that flush replies on purpose: a client that saw the fsync return sees the memory back
/// (a background trim would make that a race).
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only reorganises the allocator's own free lists; no pointer of
    // ours is involved.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The largest piece of a before-image read at once (and the largest range journaled
/// without asking for its data extents first).
const READ_WHOLE_MAX: u64 = 1 << 20;

/// The write cache; see the module doc.
pub struct WriteCache {
    /// The undo journal's file (positional I/O: no lock needed to use it).
    file: File,
    /// The journal's index, held only to reserve space and record entries, never across I/O.
    journal: Mutex<Journal>,
    /// Journaled writes hold it shared from their before-image to their entry; a cut holds
    /// it exclusively, so it never runs while a write is half done.
    power: RwLock<()>,
    /// Sector ranges with a journaled write in flight: a write waits for overlapping ones,
    /// so its before-image is what the write before it left.
    busy: Mutex<Vec<(u64, u64)>>,
    busy_done: Condvar,
    /// The device is off (from the moment a cut starts until power-on). Changed only under
    /// the journal's lock, together with `cycle`; read without the lock by everything else
    /// (reads must not wait behind a write's I/O).
    off: AtomicBool,
    /// Power cuts so far: the power cycle the device is in. A cut bumps it under the
    /// journal's lock at the moment it starts (the cut's point in time), and each cut's
    /// draws are keyed by its number.
    cycle: AtomicU64,
    /// `--record`: the journal kept whole, in the journal's order (`record.rs`).
    recorder: Option<Recorder>,
}

/// A request's view of the power: the cycle it began in. A flush or write that began in one
/// cycle and reaches the media in another was in flight at a cut, and fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PowerCycle(u64);

/// A flush under way: the writes it covers (journaled before it began) and the power
/// cycle it belongs to. See [`WriteCache::begin_flush`].
#[derive(Debug)]
#[must_use = "a flush makes nothing durable until end_flush says so"]
pub struct FlushTicket {
    mark: u64,
    cycle: PowerCycle,
}

impl FlushTicket {
    /// The flush covers the writes whose sequence numbers are below this one.
    pub fn covers(&self) -> u64 {
        self.mark
    }
}

/// What a power cut did, for the reply and the trace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CutReport {
    pub mode: Option<CutMode>,
    pub seed: u64,
    /// Byte ranges `(offset, len)` of the writes lost, kept and torn (with the bytes kept).
    pub lost: Vec<(u64, u64)>,
    pub kept: Vec<(u64, u64)>,
    pub torn: Vec<(u64, u64, u64)>,
}

impl CutReport {
    /// `power cut (lose, seed 1): 3 unsynced write(s): 2 lost [...], 1 kept [...], 0 torn`.
    pub fn summary(&self, max_ranges: usize) -> String {
        let mode = self.mode.map_or("?", |m| m.name());
        let total = self.lost.len() + self.kept.len() + self.torn.len();
        let mut out = format!(
            "power cut ({mode}, seed {}): {total} unsynced write(s): ",
            self.seed
        );
        let list = |ranges: &mut dyn Iterator<Item = String>, n: usize| {
            let shown: Vec<String> = ranges.take(max_ranges).collect();
            let more = if n > max_ranges {
                format!(" and {} more", n - max_ranges)
            } else {
                String::new()
            };
            if shown.is_empty() {
                String::new()
            } else {
                format!(" [{}{more}]", shown.join(", "))
            }
        };
        let _ = write!(
            out,
            "{} lost{}, {} kept{}, {} torn{}",
            self.lost.len(),
            list(
                &mut self.lost.iter().map(|(o, l)| format!("{o}+{l}")),
                self.lost.len()
            ),
            self.kept.len(),
            list(
                &mut self.kept.iter().map(|(o, l)| format!("{o}+{l}")),
                self.kept.len()
            ),
            self.torn.len(),
            list(
                &mut self
                    .torn
                    .iter()
                    .map(|(o, l, k)| format!("{o}+{l} ({k} kept)")),
                self.torn.len()
            ),
        );
        out
    }
}

/// The unsynced writes, for `ctl unsynced`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Unsynced {
    pub writes: usize,
    /// Bytes of the writes (a byte written twice counts twice).
    pub bytes: u64,
    /// Sectors they cover.
    pub sectors: SectorSet,
}

impl WriteCache {
    /// A write cache whose journal lives beside `image` (same filesystem, so the same space
    /// bounds it), unlinked from the start so nothing is left behind.
    pub fn new(image: &Path, recorder: Option<Recorder>) -> io::Result<WriteCache> {
        let dir = image
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let file = tempfile::tempfile_in(dir)?;
        Ok(WriteCache {
            file,
            journal: Mutex::new(Journal {
                end: 0,
                entries: Vec::new(),
                next_seq: 0,
                in_flight: 0,
                in_memory: 0,
                freed_since_trim: 0,
            }),
            power: RwLock::new(()),
            busy: Mutex::new(Vec::new()),
            busy_done: Condvar::new(),
            off: AtomicBool::new(false),
            cycle: AtomicU64::new(0),
            recorder,
        })
    }

    pub fn recorder(&self) -> Option<&Recorder> {
        self.recorder.as_ref()
    }

    /// Records a mark (`ctl MNT mark LABEL`), ordered against the writes and flushes.
    pub fn mark(&self, label: &str) -> Result<(), String> {
        let Some(rec) = &self.recorder else {
            return Err("not recording (mount with --record DIR)".into());
        };
        let pending = {
            let j = self.journal.lock();
            rec.mark(j.next_seq, label)?
        };
        pending
            .write(rec)
            .map_err(|e| format!("cannot write the mark to {}: {e}", rec.dir().display()))
    }

    /// Stops the recording: writes from here on are not part of it. `false` when it had
    /// stopped already (or there is none).
    pub fn stop_recording(&self) -> io::Result<bool> {
        let Some(rec) = &self.recorder else {
            return Ok(false);
        };
        let pending = {
            let j = self.journal.lock();
            rec.stop(j.next_seq)
        };
        match pending {
            Some(event) => event.write(rec).map(|()| true),
            None => Ok(false),
        }
    }

    /// The power cycle a request that begins now belongs to (read without a lock: a cut
    /// that starts right after is caught when the request reaches the media).
    pub fn cycle(&self) -> PowerCycle {
        PowerCycle(self.cycle.load(Ordering::Acquire))
    }

    /// Whether the media refuse a write or flush of a request that began in `begun`: the
    /// device is off, or a cut came since.
    fn refuses(&self, begun: PowerCycle) -> bool {
        self.is_off() || self.cycle() != begun
    }

    pub fn is_off(&self) -> bool {
        self.off.load(Ordering::Acquire)
    }

    /// Turns the device on; `true` when it was off.
    pub fn power_on(&self) -> bool {
        let _journal = self.journal.lock();
        self.off.swap(false, Ordering::AcqRel)
    }

    /// Journals the before-image of `[offset, offset+len)`, then runs `io` (the write), with
    /// no other journaled write to those sectors in between. Fails with EIO, doing nothing,
    /// while the power is off. Writes to other sectors run in parallel.
    ///
    /// `begun` is the power cycle the request began in: a write that began before a cut and
    /// reaches the media after it (parked by a rule across the cut and a power-on) fails too,
    /// as a command the disk lost with its power.
    pub fn write(
        &self,
        image: &File,
        offset: u64,
        len: u64,
        begun: PowerCycle,
        content: Content<'_>,
        io: impl FnOnce() -> io::Result<()>,
    ) -> io::Result<()> {
        // Fail fast while a cut runs, rather than wait for its power lock.
        if self.is_off() {
            return Err(power_lost());
        }
        let _powered = self.power.read();
        // A cut takes the power lock exclusively before it changes the flag and the cycle,
        // so while this read side is held both are stable: no cut runs until the write is
        // recorded, and the cut then resolves it.
        if self.refuses(begun) {
            return Err(power_lost());
        }
        if len == 0 {
            return io();
        }
        let _range = self.claim(offset, len);
        // The recording keeps the first before-image of each sector (from the reads below,
        // under the claim, so it is what the write before left) and the bytes stored.
        // Before-images go on after `record stop`, until the mount ends: a write after the
        // stop still changes the image the recording's base is read from.
        let (mut fresh, data_at) = match &self.recorder {
            Some(rec) => (
                Some(rec.claim_fresh(offset, len)),
                match rec.recording() {
                    true => rec.keep_data(content)?,
                    false => 0,
                },
            ),
            None => (None, 0),
        };
        // A small write reads its range whole; only a large range (a big write-zeroes) asks
        // the filesystem where its data is first: SEEK_HOLE on tmpfs walks the file to its
        // end, milliseconds per call on a large image.
        let extents = if len <= READ_WHOLE_MAX {
            vec![(offset, len)]
        } else {
            data_extents(image, offset, len)?
        };
        self.journal.lock().in_flight += 1;
        let mut data = Vec::new();
        let recorded = (|| -> io::Result<()> {
            let mut buf = Vec::new();
            for (s, l) in extents {
                let mut at = s;
                while at < s + l {
                    let n = (s + l - at).min(READ_WHOLE_MAX);
                    buf.resize(n as usize, 0);
                    read_full(image, &mut buf, at)?;
                    if let Some(fresh) = &mut fresh
                        && !fresh.is_empty()
                    {
                        fresh.keep(at, &buf)?;
                    }
                    // Zeroes need no bytes: restoring them punches a hole (which reads the
                    // same), so a sparse image stays sparse and its holes cost no journal.
                    if buf.iter().any(|b| *b != 0) {
                        let in_memory = {
                            let mut j = self.journal.lock();
                            if j.in_memory + n <= MEMORY_BUDGET {
                                j.in_memory += n;
                                None
                            } else {
                                j.end += n;
                                Some(j.end - n)
                            }
                        };
                        let bytes = match in_memory {
                            None => Stored::Memory(std::mem::take(&mut buf).into_boxed_slice()),
                            Some(place) => {
                                self.file.write_all_at(&buf, place)?;
                                Stored::File(place)
                            }
                        };
                        data.push(Piece { at, len: n, bytes });
                    }
                    at += n;
                }
            }
            if let Some(fresh) = fresh {
                fresh.finish(image)?;
            }
            io()
        })();
        let mut j = self.journal.lock();
        j.in_flight -= 1;
        if let Err(e) = recorded {
            // The write did not happen: give back the memory its before-image held.
            j.in_memory -= memory_of(&data);
            return Err(e);
        }
        // Recorded once the write is done, so a flush marks only completed writes; under the
        // range claim, so overlapping writes are recorded in the order they wrote.
        let seq = j.next_seq;
        j.next_seq += 1;
        j.entries.push(Entry {
            seq,
            offset,
            len,
            data,
        });
        let event = self
            .recorder
            .as_ref()
            .and_then(|rec| rec.written(seq, offset, len, content, data_at));
        drop(j);
        match (event, &self.recorder) {
            (Some(event), Some(rec)) => event.write(rec),
            _ => Ok(()),
        }
    }

    /// Waits until no journaled write in flight overlaps the sectors of `[offset,
    /// offset+len)`, then claims them until the guard drops.
    fn claim(&self, offset: u64, len: u64) -> RangeClaim<'_> {
        let range = (offset / SECTOR, (offset + len - 1) / SECTOR);
        let mut busy = self.busy.lock();
        while busy.iter().any(|(a, b)| *a <= range.1 && range.0 <= *b) {
            self.busy_done.wait(&mut busy);
        }
        busy.push(range);
        RangeClaim { cache: self, range }
    }

    /// Starts a flush of a request that began in power cycle `begun`: it covers the writes
    /// journaled so far. `Err(EIO)` when the device is off or a cut came since the request
    /// began.
    ///
    /// Run the flush's `fdatasync` between this and [`WriteCache::end_flush`], which alone
    /// decides whether the flush succeeded.
    pub fn begin_flush(&self, begun: PowerCycle) -> io::Result<FlushTicket> {
        let j = self.journal.lock();
        if self.refuses(begun) {
            return Err(power_lost());
        }
        Ok(FlushTicket {
            mark: j.next_seq,
            cycle: begun,
        })
    }

    /// Ends a flush whose `fdatasync` succeeded: the one place that orders a flush against
    /// the power cuts (§5, "a cut is a point in time"). Under the journal's lock, which a cut
    /// holds from its first moment to its last: if no cut started since the flush began, the
    /// writes it covers become durable here, before any later cut can see them, and the
    /// flush may report success; if one did (even one followed by a power-on), the cut has
    /// resolved those writes and the flush fails with EIO.
    pub fn end_flush(&self, ticket: FlushTicket) -> io::Result<()> {
        let mut j = self.journal.lock();
        if self.refuses(ticket.cycle) {
            return Err(power_lost());
        }
        let keep_from = j.entries.partition_point(|e| e.seq < ticket.mark);
        let durable: Vec<Entry> = j.entries.drain(..keep_from).collect();
        let event = self
            .recorder
            .as_ref()
            .and_then(|rec| rec.flushed(ticket.mark));
        let freed: u64 = durable.iter().map(Entry::memory).sum();
        j.in_memory -= freed;
        if j.entries.is_empty() && j.in_flight == 0 && j.end > 0 {
            // Nothing unsynced: the journal's space goes back to the filesystem.
            let _ = self.file.set_len(0);
            j.end = 0;
        }
        let trim = j.note_freed(freed);
        drop(j);
        // Freed outside the lock: thousands of before-images take a while to free.
        drop(durable);
        if trim {
            release_freed_memory();
        }
        match (event, &self.recorder) {
            (Some(event), Some(rec)) => event.write(rec),
            _ => Ok(()),
        }
    }

    pub fn unsynced(&self) -> Unsynced {
        let j = self.journal.lock();
        let mut sectors = SectorSet::new();
        let mut bytes = 0;
        for e in &j.entries {
            bytes += e.len;
            sectors.insert(e.offset / SECTOR, (e.offset + e.len - 1) / SECTOR);
        }
        Unsynced {
            writes: j.entries.len(),
            bytes,
            sectors,
        }
    }

    /// Cuts the power: resolves every unsynced write by `mode` (draws keyed by `seed` and
    /// this cut's number), leaves the image as the crash image (synced to its filesystem),
    /// and turns the device off.
    pub fn cut(&self, image: &File, mode: CutMode, seed: u64) -> io::Result<CutReport> {
        if self.recorder.as_ref().is_some_and(Recorder::recording) {
            // A cut rewrites the image behind the recording's back: its states would no
            // longer follow from what it recorded.
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a power cut is refused while recording (stop the recording first)",
            ));
        }
        // No journaled write is half done from here on, and none starts.
        let _no_writes = self.power.write();
        let mut j = self.journal.lock();
        // The cut's point in time: from here the device is off and in a new power cycle, so
        // every flush that has not ended yet fails (`end_flush` waits for this lock and then
        // sees it), and every request that arrives fails at once.
        let cut_number = self.cycle.fetch_add(1, Ordering::AcqRel);
        self.off.store(true, Ordering::Release);
        let mut report = CutReport {
            mode: Some(mode),
            seed,
            ..CutReport::default()
        };
        let mut draw = Draw::new(seed, u32::MAX, cut_number, 2);
        let entries = std::mem::take(&mut j.entries);
        // Which sectors each write keeps or gives back is the one rule `engine/settle.rs`
        // states (explore builds its crash states by it too); the mode only answers, per
        // sector of each write, newest write first, whether it reached the disk: `random`
        // draws once per write (all, none, or sector by sector), `sectors` per sector.
        let writes: Vec<(u64, u64)> = entries.iter().map(|e| (e.offset, e.len)).collect();
        let mut kept_bytes = vec![0u64; entries.len()];
        let mut restore: Vec<Vec<(u64, u64)>> = vec![Vec::new(); entries.len()];
        let (mut current, mut keep_all) = (usize::MAX, None);
        settle(
            &writes,
            SECTOR,
            |i, _, _, len| {
                if i != current {
                    current = i;
                    keep_all = match mode {
                        CutMode::Lose => Some(false),
                        CutMode::Keep => Some(true),
                        CutMode::Sectors => None,
                        CutMode::Random => match draw.below(3) {
                            0 => Some(true),
                            1 => Some(false),
                            _ => None,
                        },
                    };
                }
                let kept = keep_all.unwrap_or_else(|| draw.chance(0.5));
                if kept {
                    kept_bytes[i] += len;
                }
                kept
            },
            |i, at, len, reached| {
                if !reached {
                    let pieces = &mut restore[i];
                    match pieces.last_mut() {
                        Some(last) if last.0 + last.1 == at => last.1 += len,
                        _ => pieces.push((at, len)),
                    }
                }
            },
        );
        // Newest first: a write's before-image is what the one before it left, so an older
        // lost write restores over a newer one.
        for (i, e) in entries.iter().enumerate().rev() {
            for &(s, l) in &restore[i] {
                restore_range(image, &self.file, e, s, l)?;
            }
            match kept_bytes[i] {
                0 => report.lost.push((e.offset, e.len)),
                k if k == e.len => report.kept.push((e.offset, e.len)),
                k => report.torn.push((e.offset, e.len, k)),
            }
        }
        // Oldest first, as a reader of the report expects.
        report.lost.reverse();
        report.kept.reverse();
        report.torn.reverse();
        image.sync_data()?;
        let _ = self.file.set_len(0);
        j.end = 0;
        let freed = std::mem::take(&mut j.in_memory);
        j.freed_since_trim = 0;
        drop(j);
        drop(entries);
        if freed > 0 {
            release_freed_memory();
        }
        Ok(report)
    }
}

/// Why the media refused a write or flush: the power was cut before it reached them (the
/// request fails with EIO, as on a disk that lost power mid-command). Carried inside an
/// `io::Error`, so callers tell it from a real I/O error with [`is_power_lost`].
#[derive(Debug)]
struct PowerLost;

impl std::fmt::Display for PowerLost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the power was cut")
    }
}

impl std::error::Error for PowerLost {}

fn power_lost() -> io::Error {
    io::Error::other(PowerLost)
}

/// Whether `e` is the media's refusal after a power cut (not an I/O error to log).
pub fn is_power_lost(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<PowerLost>())
}

/// A journaled write's claim on its sectors (see [`WriteCache::claim`]).
struct RangeClaim<'a> {
    cache: &'a WriteCache,
    range: (u64, u64),
}

impl Drop for RangeClaim<'_> {
    fn drop(&mut self) {
        let mut busy = self.cache.busy.lock();
        if let Some(at) = busy.iter().position(|r| *r == self.range) {
            busy.swap_remove(at);
        }
        drop(busy);
        self.cache.busy_done.notify_all();
    }
}

/// Puts the before-image of `e` back over `[s, s+l)` (inside `e`'s range): data extents
/// copied from the journal, the gaps between them punched. Data first, then the gaps, and
/// never a byte punched that data goes to: a `kill -9` in the middle leaves every byte old
/// or new, never zeroes that were neither.
fn restore_range(image: &File, journal: &File, e: &Entry, s: u64, l: u64) -> io::Result<()> {
    let end = s + l;
    let mut gaps: Vec<(u64, u64)> = Vec::new();
    let mut at = s;
    for piece in &e.data {
        let (a, b) = (piece.at.max(s), (piece.at + piece.len).min(end));
        if a >= b {
            continue;
        }
        let from = (a - piece.at) as usize;
        let n = (b - a) as usize;
        match &piece.bytes {
            Stored::Memory(bytes) => image.write_all_at(&bytes[from..from + n], a)?,
            Stored::File(place) => {
                let mut buf = vec![0u8; n];
                journal.read_exact_at(&mut buf, place + from as u64)?;
                image.write_all_at(&buf, a)?;
            }
        }
        if at < a {
            gaps.push((at, a - at));
        }
        at = b;
    }
    if at < end {
        gaps.push((at, end - at));
    }
    for (g, n) in gaps {
        punch(image, g, n)?;
    }
    Ok(())
}

/// Makes `[offset, offset+len)` a hole (zeroes where the filesystem cannot punch).
fn punch(image: &File, offset: u64, len: u64) -> io::Result<()> {
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on an open descriptor we own; no memory is passed.
    let r = unsafe { libc::fallocate(image.as_raw_fd(), mode, offset as i64, len as i64) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(e);
    }
    image.write_all_at(&vec![0u8; len as usize], offset)
}

/// The data extents of `[offset, offset+len)` of `image` (what is not a hole), clipped to the
/// range; past the end of the file there is no data.
pub(crate) fn data_extents(image: &File, offset: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = image.as_raw_fd();
    let end = offset + len;
    let mut out = Vec::new();
    let mut at = offset;
    while at < end {
        // SAFETY: lseek on an open descriptor we own. Positional I/O ignores the offset.
        let data = unsafe { libc::lseek(fd, at as i64, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // No data from `at` on (or past the end).
                Some(libc::ENXIO) => Ok(out),
                // No SEEK_DATA here: treat the whole range as data.
                Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => {
                    out.push((at, end - at));
                    Ok(out)
                }
                _ => Err(e),
            };
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as i64, libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            end
        } else {
            (hole as u64).min(end)
        };
        out.push((data, hole - data));
        at = hole;
    }
    Ok(out)
}

/// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zeroes.
pub(crate) fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An image of `sectors` sectors, sector `i` filled with byte `i + 1`, synced: durable.
    fn image(dir: &Path, sectors: u64) -> File {
        let path = dir.join("img");
        let bytes: Vec<u8> = (0..sectors * SECTOR)
            .map(|i| (i / SECTOR + 1) as u8)
            .collect();
        std::fs::write(&path, bytes).unwrap();
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap()
    }

    fn write(c: &WriteCache, img: &File, offset: u64, bytes: &[u8]) {
        c.write(
            img,
            offset,
            bytes.len() as u64,
            c.cycle(),
            Content::Bytes(bytes),
            || img.write_all_at(bytes, offset),
        )
        .unwrap();
    }

    /// A flush that begins and ends now (its fdatasync is not this module's business).
    fn flush(c: &WriteCache) -> io::Result<()> {
        c.end_flush(c.begin_flush(c.cycle())?)
    }

    fn sector(img: &File, s: u64) -> Vec<u8> {
        let mut b = vec![0u8; SECTOR as usize];
        img.read_exact_at(&mut b, s * SECTOR).unwrap();
        b
    }

    fn filled(byte: u8, sectors: u64) -> Vec<u8> {
        vec![byte; (sectors * SECTOR) as usize]
    }

    #[test]
    fn lose_restores_the_last_flushed_content_and_turns_the_device_off() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 8);
        let c = WriteCache::new(&dir.path().join("img"), None).unwrap();
        write(&c, &img, 0, &filled(0xaa, 2));
        flush(&c).unwrap(); // sectors 0-1 are durable now
        write(&c, &img, 512, &filled(0xbb, 2)); // sectors 1-2
        write(&c, &img, 1024, &filled(0xcc, 1)); // sector 2 again
        let u = c.unsynced();
        assert_eq!(
            (u.writes, u.bytes, u.sectors.to_string()),
            (2, 1536, "1-2".into())
        );
        assert_eq!(
            sector(&img, 2),
            filled(0xcc, 1),
            "reads see the newest data"
        );
        let report = c.cut(&img, CutMode::Lose, 1).unwrap();
        assert_eq!(report.lost, vec![(512, 1024), (1024, 512)]);
        assert_eq!(sector(&img, 0), filled(0xaa, 1));
        assert_eq!(
            sector(&img, 1),
            filled(0xaa, 1),
            "durable content, not the original"
        );
        assert_eq!(sector(&img, 2), filled(3, 1));
        assert!(c.is_off());
        let e = c
            .write(&img, 0, 1, c.cycle(), Content::Zeroes, || {
                panic!("no I/O while off")
            })
            .unwrap_err();
        assert!(is_power_lost(&e), "{e}");
        assert!(c.power_on());
        assert_eq!(c.unsynced().writes, 0);
    }

    #[test]
    fn a_failed_flush_makes_nothing_durable_and_a_flush_covers_only_earlier_writes() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 4);
        let c = WriteCache::new(&dir.path().join("img"), None).unwrap();
        write(&c, &img, 0, &filled(0x11, 1));
        let ticket = c.begin_flush(c.cycle()).unwrap();
        write(&c, &img, 512, &filled(0x22, 1)); // completes after the flush started
        c.end_flush(ticket).unwrap();
        // (A flush failed by a rule never ends: it makes nothing durable.)
        let abandoned = c.begin_flush(c.cycle()).unwrap();
        drop(abandoned);
        let report = c.cut(&img, CutMode::Lose, 0).unwrap();
        assert_eq!(report.lost, vec![(512, 512)]);
        assert_eq!(sector(&img, 0), filled(0x11, 1));
        assert_eq!(sector(&img, 1), filled(2, 1));
    }

    /// §5: a cut is a point in time. A flush that ended before it made its writes durable in
    /// every mode; one in flight at the cut fails, even when it ends after a power-on; so
    /// does a flush or a write of a request that began before the cut.
    #[test]
    fn flushes_and_writes_are_ordered_against_the_cut() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path(), 4);
        let c = WriteCache::new(&dir.path().join("img"), None).unwrap();
        write(&c, &img, 0, &filled(0x11, 1));
        let before = c.begin_flush(c.cycle()).unwrap();
        c.end_flush(before).unwrap();
        write(&c, &img, 512, &filled(0x22, 1));
        let begun = c.cycle();
        let in_flight = c.begin_flush(begun).unwrap();
        let report = c.cut(&img, CutMode::Lose, 0).unwrap();
        assert_eq!(report.lost, vec![(512, 512)], "the flush had not ended");
        assert!(c.power_on());
        let e = c.end_flush(in_flight).unwrap_err();
        assert!(is_power_lost(&e), "a flush in flight at the cut fails: {e}");
        assert_eq!(
            sector(&img, 0),
            filled(0x11, 1),
            "the ended flush kept its write"
        );
        assert_eq!(sector(&img, 1), filled(2, 1));
        // A request that began before the cut and reaches the media after the power-on
        // (parked across both by a rule) was lost with the power.
        let e = c.begin_flush(begun).unwrap_err();
        assert!(is_power_lost(&e), "{e}");
        let e = c
            .write(&img, 1024, 512, begun, Content::Zeroes, || {
                panic!("no I/O for a lost command")
            })
            .unwrap_err();
        assert!(is_power_lost(&e), "{e}");
        // Requests of the new cycle work.
        write(&c, &img, 1024, &filled(0x33, 1));
        flush(&c).unwrap();
        assert_eq!(c.unsynced().writes, 0);
    }

    /// The model of §5 under concurrency: threads write and flush while cuts come at random
    /// moments, in every mode; a flush that ended well is never undone, and every sector is a
    /// state the disk could have left. Many rounds, a seeded schedule of modes.
    #[test]
    fn concurrent_flushes_never_succeed_for_writes_a_cut_resolved() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;
        let dir = tempfile::tempdir().unwrap();
        let sectors = 64;
        let img = Arc::new(image(dir.path(), sectors));
        let c = Arc::new(WriteCache::new(&dir.path().join("img"), None).unwrap());
        let modes = [
            CutMode::Lose,
            CutMode::Keep,
            CutMode::Random,
            CutMode::Sectors,
        ];
        // The first byte of each sector when the round began (durable then).
        let mut round_start: Vec<u8> = (0..sectors).map(|s| sector(&img, s)[0]).collect();
        for round in 0..200u64 {
            let stop = Arc::new(AtomicBool::new(false));
            // Each thread owns sectors t, t+4, ...: per sector, (value, flushed) history.
            let workers: Vec<_> = (0..4u64)
                .map(|t| {
                    let (c, img, stop) = (Arc::clone(&c), Arc::clone(&img), Arc::clone(&stop));
                    std::thread::spawn(move || {
                        let mut draw = Draw::new(round, t as u32, 0, 7);
                        // Per owned sector: values written, and the index of the newest one
                        // a successful flush covered.
                        let mut written: Vec<(u64, Vec<u8>, Option<usize>)> = Vec::new();
                        let mut value = 0x40u8 + t as u8;
                        while !stop.load(Ordering::Acquire) {
                            let s = t + 4 * draw.below(sectors / 4);
                            value = value.wrapping_add(4).max(0x40);
                            let bytes = filled(value, 1);
                            let ok = c
                                .write(
                                    &img,
                                    s * SECTOR,
                                    SECTOR,
                                    c.cycle(),
                                    Content::Bytes(&bytes),
                                    || img.write_all_at(&bytes, s * SECTOR),
                                )
                                .is_ok();
                            if ok {
                                match written.iter_mut().find(|w| w.0 == s) {
                                    Some(w) => w.1.push(value),
                                    None => written.push((s, vec![value], None)),
                                }
                            }
                            if draw.below(2) == 0 {
                                let snapshot: Vec<(u64, usize)> =
                                    written.iter().map(|w| (w.0, w.1.len() - 1)).collect();
                                // The flush's fdatasync between its start and its end, as
                                // the executor does: the window a cut can fall into.
                                let synced = c.begin_flush(c.cycle()).and_then(|ticket| {
                                    img.sync_data()?;
                                    c.end_flush(ticket)
                                });
                                if synced.is_ok() {
                                    for (s, newest) in snapshot {
                                        let w = written.iter_mut().find(|w| w.0 == s).unwrap();
                                        w.2 = Some(newest);
                                    }
                                }
                            }
                        }
                        written
                    })
                })
                .collect();
            std::thread::sleep(std::time::Duration::from_micros(round * 37 % 500));
            let mode = modes[(round % 4) as usize];
            c.cut(&img, mode, round).unwrap();
            stop.store(true, Ordering::Release);
            for w in workers {
                for (s, values, flushed) in w.join().unwrap() {
                    let got = sector(&img, s)[0];
                    // The newest flushed value or a later one; nothing older.
                    let allowed = &values[flushed.unwrap_or(0)..];
                    let original = flushed.is_none() && got == round_start[s as usize];
                    assert!(
                        allowed.contains(&got) || original,
                        "round {round} ({mode:?}), sector {s}: holds {got:#x}, allowed \
                         {allowed:x?} (flushed up to {flushed:?})"
                    );
                    if mode == CutMode::Keep {
                        assert_eq!(got, *values.last().unwrap(), "keep lost a write");
                    }
                }
            }
            assert!(c.power_on());
            // Settle: the next round starts from a durable image.
            flush(&c).unwrap();
            round_start = (0..sectors).map(|s| sector(&img, s)[0]).collect();
        }
    }

    /// The §5 invariant under every mode and many seeds: each sector ends as its durable
    /// content or as the content one of its writes left, and never shows an older write
    /// over a newer one that was kept.
    #[test]
    fn every_mode_resolves_overlapping_writes_to_states_a_disk_could_produce() {
        for mode in [
            CutMode::Lose,
            CutMode::Keep,
            CutMode::Random,
            CutMode::Sectors,
        ] {
            for seed in 0..40 {
                let dir = tempfile::tempdir().unwrap();
                let img = image(dir.path(), 16);
                let c = WriteCache::new(&dir.path().join("img"), None).unwrap();
                // Write k (1-based) fills its sectors with byte 0x80 + k.
                let writes: [(u64, u64); 5] = [(0, 8), (4, 8), (2, 3), (10, 4), (6, 1)];
                for (k, (s, n)) in writes.iter().enumerate() {
                    write(&c, &img, s * SECTOR, &filled(0x81 + k as u8, *n));
                }
                let report = c.cut(&img, mode, seed).unwrap();
                let total = report.lost.len() + report.kept.len() + report.torn.len();
                assert_eq!(total, writes.len());
                for s in 0..16u64 {
                    let got = sector(&img, s);
                    let byte = got[0];
                    assert!(got.iter().all(|b| *b == byte), "sector {s} is whole");
                    let touching: Vec<usize> = writes
                        .iter()
                        .enumerate()
                        .filter(|(_, (a, n))| (*a..a + n).contains(&s))
                        .map(|(k, _)| k)
                        .collect();
                    let durable = (s + 1) as u8;
                    let ok = byte == durable || touching.iter().any(|k| byte == 0x81 + *k as u8);
                    assert!(ok, "{mode:?} seed {seed}: sector {s} = {byte:#x}");
                    match mode {
                        CutMode::Lose => assert_eq!(byte, durable),
                        CutMode::Keep => {
                            let newest = touching.last().map_or(durable, |k| 0x81 + *k as u8);
                            assert_eq!(byte, newest);
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    #[test]
    fn the_same_seed_cuts_the_same_way() {
        let run = |seed: u64| {
            let dir = tempfile::tempdir().unwrap();
            let img = image(dir.path(), 64);
            let c = WriteCache::new(&dir.path().join("img"), None).unwrap();
            for i in 0..32u64 {
                write(&c, &img, i * 2 * SECTOR, &filled(0xf0, 2));
            }
            let report = c.cut(&img, CutMode::Random, seed).unwrap();
            let mut bytes = vec![0u8; 64 * SECTOR as usize];
            img.read_exact_at(&mut bytes, 0).unwrap();
            (report, bytes)
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5).0, run(6).0);
    }

    #[test]
    fn holes_stay_holes_and_cost_no_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let img = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        img.set_len(1 << 40).unwrap();
        let c = WriteCache::new(&path, None).unwrap();
        let at = 1 << 39;
        write(&c, &img, at, &filled(0x5a, 8));
        assert_eq!(c.journal.lock().end, 0, "a hole's before-image is no bytes");
        c.cut(&img, CutMode::Lose, 0).unwrap();
        let mut b = vec![1u8; 4096];
        img.read_exact_at(&mut b, at).unwrap();
        assert!(b.iter().all(|x| *x == 0));
        let allocated = std::fs::metadata(&path).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!(allocated.blocks(), 0, "punched back to a hole");
    }
}
