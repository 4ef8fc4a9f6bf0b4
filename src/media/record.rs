//! Recordings (`spec/explore.md` §1): the write cache's journal kept whole, on disk.
//!
//! A recording is a directory:
//! - `events`: fixed [`EVENT_SIZE`]-byte little-endian records, in the order the write
//!   cache ordered them (a write when it completed, a flush when it succeeded, a mark when
//!   it was asked for): `[kind, seq, a, b, c]` as five `u64`s; see [`EventKind`].
//! - `data`: the bytes each write stored (its after-image).
//! - `before`: the before-image of every sector the first time a write touched it, so the
//!   base comes back from an image the run changed (`mount --record` writes through).
//! - `labels`: the marks' labels.
//! - `recording.json`: written when the recording stops: the image it was made over (path,
//!   size and a content hash, [`image_hash`]), the view's size, counts.
//!
//! Cost: O(bytes written) on disk, one 40-byte event per write; memory holds the set of
//! sectors touched so far and at most 64 KiB of events not written yet. A write's bytes
//! (and first before-images) are written with positional I/O at offsets reserved under a
//! short lock, so writes record in parallel; events are written in 64 KiB chunks, and at
//! once at every flush, mark, start and stop. A recording is complete once its
//! `recording.json` is written (the mount's end); explore refuses one without it.
//!
//! Ordering: a write's event is reserved under the write cache's journal lock, at the
//! moment the cache gives it its sequence number; a flush's at the moment it succeeds
//! (`end_flush`); a mark's when it is asked for. So the file's order is the order the
//! cache saw, and a flush's `seq` says which writes it covered (those with a smaller one).
//!
//! Lock rule: `state` is taken under the journal's lock (journal → recorder) or alone,
//! never across I/O.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

use crate::engine::ranges::{SECTOR, SectorSet};

/// Bytes of one event record.
pub const EVENT_SIZE: u64 = 40;

/// A `Before` event's `c` when the before-image is zeroes (no bytes kept).
pub const ZEROES: u64 = u64::MAX;

/// The recording format's version, in `recording.json`.
pub const FORMAT_VERSION: u64 = 1;

/// What an event record is. `seq` is the write cache's sequence number: a write's own, or
/// for the others the next write's (so "writes with a smaller seq came before").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// Recording starts here: every write before it (and its flush) is the base.
    Start = 1,
    /// A write of `b` bytes at `a`, its bytes at `c` in `data`.
    Write = 2,
    /// `b` bytes at `a` became zeroes (write-zeroes, discard).
    Zero = 3,
    /// A successful flush: every write with a smaller `seq` is durable.
    Flush = 4,
    /// A mark: label `b` bytes at `a` in `labels`.
    Mark = 5,
    /// The before-image of `b` bytes at `a` (whole sectors), at `c` in `before`, or
    /// zeroes when `c` is [`ZEROES`].
    Before = 6,
    /// Recording stops: nothing after it is part of the recording.
    Stop = 7,
}

impl EventKind {
    pub fn from_u64(kind: u64) -> Option<EventKind> {
        Some(match kind {
            1 => EventKind::Start,
            2 => EventKind::Write,
            3 => EventKind::Zero,
            4 => EventKind::Flush,
            5 => EventKind::Mark,
            6 => EventKind::Before,
            7 => EventKind::Stop,
            _ => return None,
        })
    }
}

/// One decoded event record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventRecord {
    pub kind: EventKind,
    pub seq: u64,
    pub a: u64,
    pub b: u64,
    pub c: u64,
}

impl EventRecord {
    pub fn encode(&self) -> [u8; EVENT_SIZE as usize] {
        let mut out = [0u8; EVENT_SIZE as usize];
        for (i, v) in [self.kind as u64, self.seq, self.a, self.b, self.c]
            .into_iter()
            .enumerate()
        {
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// `None` for a record never written (a crash between its reservation and its write).
    pub fn decode(bytes: &[u8]) -> Option<EventRecord> {
        let word = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
        Some(EventRecord {
            kind: EventKind::from_u64(word(0))?,
            seq: word(1),
            a: word(2),
            b: word(3),
            c: word(4),
        })
    }
}

/// The image a recording was made over, as `recording.json` names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub path: PathBuf,
    pub size: u64,
    /// [`image_hash`] of its content.
    pub hash: String,
}

/// What the bytes a write stores are.
#[derive(Clone, Copy, Debug)]
pub enum Content<'a> {
    Bytes(&'a [u8]),
    Zeroes,
}

/// The recording of one mount; see the module doc.
pub struct Recorder {
    dir: PathBuf,
    events: File,
    data: File,
    before: File,
    labels: File,
    /// The image as `explore` names it (its original, not the copy the view writes); `None`:
    /// the recorder hashes the image it records when it stops (`mount --record`).
    image: Option<ImageInfo>,
    state: Mutex<RecorderState>,
    /// The first I/O error that left the recording incomplete: `recording.json` says so,
    /// and explore refuses the recording rather than explore states it cannot rebuild.
    broken: Mutex<Option<String>>,
}

struct RecorderState {
    next_event: u64,
    data_end: u64,
    before_end: u64,
    labels_end: u64,
    /// Sectors whose before-image is kept.
    touched: SectorSet,
    /// The flush that covers writes up to this sequence number starts the recording
    /// (`Mount::record_start`'s own flush; an older flush that ends later does not).
    start_at: Option<u64>,
    started: bool,
    stopped: bool,
    /// Encoded events not written yet, from event number `buffered_from` on: written in
    /// chunks (one `pwrite` per [`EVENT_CHUNK`] bytes, not one per write), and at once at
    /// every flush, mark, start and stop.
    buffered: Vec<u8>,
    buffered_from: u64,
    /// Counts for `recording.json` and `ctl`.
    writes: u64,
    flushes: u64,
    marks: u64,
}

impl Recorder {
    /// A new recording in `dir` (created if missing; it must not hold a recording already).
    pub fn create(dir: &Path, image: Option<ImageInfo>) -> io::Result<Recorder> {
        std::fs::create_dir_all(dir)?;
        if dir.join("events").exists() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} holds a recording already", dir.display()),
            ));
        }
        let open = |name: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(dir.join(name))
        };
        Ok(Recorder {
            dir: dir.to_path_buf(),
            events: open("events")?,
            data: open("data")?,
            before: open("before")?,
            labels: open("labels")?,
            image,
            broken: Mutex::new(None),
            state: Mutex::new(RecorderState {
                next_event: 0,
                data_end: 0,
                before_end: 0,
                labels_end: 0,
                touched: SectorSet::new(),
                buffered: Vec::new(),
                buffered_from: 0,
                start_at: None,
                started: false,
                stopped: false,
                writes: 0,
                flushes: 0,
                marks: 0,
            }),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether writes are still recorded (until [`Recorder::stop`]).
    pub fn recording(&self) -> bool {
        !self.state.lock().stopped
    }

    /// Before a write of `[offset, offset+len)` runs, under its sector claim: claims the
    /// sectors no write touched yet, whose before-image the recording must keep. The
    /// caller reads the range (the write cache does anyway), hands each piece it read to
    /// [`Fresh::keep`], and ends with [`Fresh::finish`]: one read of the image serves the
    /// cache's journal and the recording.
    pub fn claim_fresh(&self, offset: u64, len: u64) -> Fresh<'_> {
        let mut runs = Vec::new();
        if len == 0 {
            return Fresh { rec: self, runs };
        }
        let (first, last) = (offset / SECTOR, (offset + len - 1) / SECTOR);
        // Also after the stop (see `WriteCache::write`): the base must stay right.
        let mut st = self.state.lock();
        let mut s = first;
        while s <= last {
            if st.touched.contains(s) {
                s += 1;
                continue;
            }
            let mut e = s;
            while e < last && !st.touched.contains(e + 1) {
                e += 1;
            }
            runs.push((s * SECTOR, (e + 1) * SECTOR));
            st.touched.insert(s, e);
            s = e + 1;
        }
        Fresh { rec: self, runs }
    }

    /// Notes the first error that left the recording incomplete.
    fn noted<T>(&self, r: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &r {
            self.broke(format!("{e}"));
        }
        r
    }

    fn broke(&self, why: String) {
        let mut broken = self.broken.lock();
        if broken.is_none() {
            log::error!(
                "the recording in {} is incomplete from here on: {why}",
                self.dir.display()
            );
            *broken = Some(why);
        }
    }

    /// Keeps the before-image bytes `bytes` of `[at, at+len)`: zeroes as an event alone.
    fn keep_before(&self, at: u64, bytes: Option<&[u8]>, len: u64) -> io::Result<()> {
        let place = match bytes {
            Some(b) if b.iter().any(|x| *x != 0) => {
                let place = {
                    let mut st = self.state.lock();
                    st.before_end += len;
                    st.before_end - len
                };
                self.noted(self.before.write_all_at(b, place))?;
                place
            }
            _ => ZEROES,
        };
        self.append(EventKind::Before, 0, at, len, place)
    }

    /// Keeps a write's bytes before it runs; returns where they are in `data` (for
    /// [`Recorder::written`]).
    pub fn keep_data(&self, content: Content<'_>) -> io::Result<u64> {
        let Content::Bytes(bytes) = content else {
            return Ok(0);
        };
        let at = {
            let mut st = self.state.lock();
            st.data_end += bytes.len() as u64;
            st.data_end - bytes.len() as u64
        };
        self.noted(self.data.write_all_at(bytes, at))?;
        Ok(at)
    }

    /// A write completed with sequence number `seq`. Called with the journal's lock held:
    /// only reserves the event's place; the returned closure writes it after the lock.
    pub fn written(
        &self,
        seq: u64,
        offset: u64,
        len: u64,
        content: Content<'_>,
        data_at: u64,
    ) -> Option<PendingEvent> {
        let kind = match content {
            Content::Bytes(_) => EventKind::Write,
            Content::Zeroes => EventKind::Zero,
        };
        let mut st = self.state.lock();
        if st.stopped {
            return None;
        }
        st.writes += 1;
        Some(reserve(
            &mut st,
            EventRecord {
                kind,
                seq,
                a: offset,
                b: len,
                c: data_at,
            },
        ))
    }

    /// Makes the first successful flush that covers every write before `seq` start the
    /// recording. `Err` when it has started or stopped already.
    pub fn arm_start(&self, seq: u64) -> Result<(), String> {
        let mut st = self.state.lock();
        if st.stopped {
            return Err("the recording has stopped".into());
        }
        if st.started {
            return Err("the recording has started already".into());
        }
        st.start_at = Some(seq);
        Ok(())
    }

    /// A flush succeeded, covering writes before `seq`; or, the first time after
    /// [`Recorder::arm_start`], the flush that starts the recording (flushes before that
    /// are part of the setup: nothing to record). Called with the journal's lock held.
    pub fn flushed(&self, seq: u64) -> Option<PendingEvent> {
        let mut st = self.state.lock();
        if st.stopped {
            return None;
        }
        let kind = if st.started {
            st.flushes += 1;
            EventKind::Flush
        } else if st.start_at.is_some_and(|at| seq >= at) {
            st.started = true;
            EventKind::Start
        } else {
            return None;
        };
        Some(reserve(
            &mut st,
            EventRecord {
                kind,
                seq,
                a: 0,
                b: 0,
                c: 0,
            },
        ))
    }

    /// Starts the recording at once (`mount --record`, before any write: the image as it
    /// is is the base).
    pub fn start_now(&self, seq: u64) -> io::Result<()> {
        self.arm_start(seq).map_err(io::Error::other)?;
        if let Some(event) = self.flushed(seq) {
            event.write(self)?;
        }
        Ok(())
    }

    /// A mark (`ctl MNT mark LABEL`). Called with the journal's lock held, so it is ordered
    /// against the writes and flushes; `seq` is the next write's.
    pub fn mark(&self, seq: u64, label: &str) -> Result<PendingMark, String> {
        let mut st = self.state.lock();
        if st.stopped {
            return Err("the recording has stopped".into());
        }
        if !st.started {
            return Err("the recording has not started yet".into());
        }
        let at = st.labels_end;
        st.labels_end += label.len() as u64;
        st.marks += 1;
        let event = reserve(
            &mut st,
            EventRecord {
                kind: EventKind::Mark,
                seq,
                a: at,
                b: label.len() as u64,
                c: 0,
            },
        );
        Ok(PendingMark {
            event,
            label: label.to_string(),
            at,
        })
    }

    /// Stops recording (called with the journal's lock held); `None` if it had stopped.
    pub fn stop(&self, seq: u64) -> Option<PendingEvent> {
        let mut st = self.state.lock();
        if st.stopped {
            return None;
        }
        let event = reserve(
            &mut st,
            EventRecord {
                kind: EventKind::Stop,
                seq,
                a: 0,
                b: 0,
                c: 0,
            },
        );
        st.stopped = true;
        Some(event)
    }

    /// `writes, flushes, marks` recorded so far.
    pub fn counts(&self) -> (u64, u64, u64) {
        let st = self.state.lock();
        (st.writes, st.flushes, st.marks)
    }

    /// Writes `recording.json`: the image (hashed now, unless named at creation) and the
    /// view's size. Call once no write runs any more.
    pub fn finish(&self, image: &File, image_path: &Path, size: u64) -> io::Result<()> {
        let info = match &self.image {
            Some(info) => info.clone(),
            None => ImageInfo {
                path: std::fs::canonicalize(image_path).unwrap_or(image_path.to_path_buf()),
                size: crate::media::device::size(image)
                    .or_else(|_| image.metadata().map(|m| m.len()))?,
                hash: image_hash(image)?,
            },
        };
        let (writes, flushes, marks) = self.counts();
        let due = {
            let mut st = self.state.lock();
            let at = st.buffered_from * EVENT_SIZE;
            st.buffered_from = st.next_event;
            (at, std::mem::take(&mut st.buffered))
        };
        self.noted(self.events.write_all_at(&due.1, due.0))?;
        let st = self.state.lock();
        let meta = serde_json::json!({
            "format": FORMAT_VERSION,
            "image": {
                "path": info.path.to_string_lossy(),
                "size": info.size,
                "hash": info.hash,
            },
            "size": size,
            "events": st.next_event,
            "writes": writes,
            "flushes": flushes,
            "marks": marks,
            "started": st.started,
            "broken": *self.broken.lock(),
        });
        drop(st);
        let mut text = serde_json::to_string_pretty(&meta).map_err(io::Error::other)?;
        text.push('\n');
        let tmp = self.dir.join("recording.json.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.dir.join("recording.json"))?;
        for f in [&self.events, &self.data, &self.before, &self.labels] {
            f.sync_data()?;
        }
        Ok(())
    }

    fn append(&self, kind: EventKind, seq: u64, a: u64, b: u64, c: u64) -> io::Result<()> {
        let event = reserve(&mut self.state.lock(), EventRecord { kind, seq, a, b, c });
        event.write(self)
    }
}

/// The sectors of one write whose before-images the recording still needs (see
/// [`Recorder::claim_fresh`]): byte ranges `[start, end)`, ascending.
#[must_use = "claimed sectors whose before-image is never kept would read as the image"]
pub struct Fresh<'a> {
    rec: &'a Recorder,
    runs: Vec<(u64, u64)>,
}

impl Drop for Fresh<'_> {
    fn drop(&mut self) {
        // Dropped before `finish`: the write failed before the before-images of sectors it
        // claimed were kept, so the base under them is unknown.
        if !self.runs.is_empty() {
            self.rec
                .broke("a write failed before its before-image was kept".into());
        }
    }
}

impl Fresh<'_> {
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// The image read `buf` at `at`: keeps what of it is fresh.
    pub fn keep(&mut self, at: u64, buf: &[u8]) -> io::Result<()> {
        let rec = self.rec;
        let end = at + buf.len() as u64;
        let mut left = Vec::with_capacity(self.runs.len());
        for &(s, e) in &self.runs {
            let (a, b) = (s.max(at), e.min(end));
            if a >= b {
                left.push((s, e));
                continue;
            }
            rec.keep_before(a, Some(&buf[(a - at) as usize..(b - at) as usize]), b - a)?;
            if s < a {
                left.push((s, a));
            }
            if b < e {
                left.push((b, e));
            }
        }
        self.runs = left;
        Ok(())
    }

    /// Keeps what the caller did not read (a sector's edges beyond an unaligned write,
    /// the holes of a large range) from `image`: data extents read, holes as zeroes.
    pub fn finish(mut self, image: &File) -> io::Result<()> {
        const BLOCK: u64 = 1 << 20;
        let rec = self.rec;
        let mut buf = Vec::new();
        let runs = std::mem::take(&mut self.runs);
        for (start, end) in runs {
            let extents = match end - start <= BLOCK {
                true => vec![(start, end - start)],
                false => rec.noted(crate::media::cache_data_extents(image, start, end - start))?,
            };
            let mut cursor = start;
            for (s, l) in extents {
                let (s, e) = (s.max(start), (s + l).min(end));
                if s > cursor {
                    rec.keep_before(cursor, None, s - cursor)?;
                }
                let mut here = s;
                while here < e {
                    let n = (e - here).min(BLOCK);
                    buf.resize(n as usize, 0);
                    rec.noted(crate::media::read_full(image, &mut buf, here))?;
                    rec.keep_before(here, Some(&buf), n)?;
                    here += n;
                }
                cursor = cursor.max(e);
            }
            if cursor < end {
                rec.keep_before(cursor, None, end - cursor)?;
            }
        }
        Ok(())
    }
}

/// Buffered event bytes written at once (about 1,600 events).
const EVENT_CHUNK: usize = 64 << 10;

/// An event in its place in the order; what of the buffer it made due is written after the
/// lock that ordered it is released.
#[must_use = "a buffer that came due must be written"]
pub struct PendingEvent {
    due: Option<(u64, Vec<u8>)>,
}

impl PendingEvent {
    pub fn write(self, recorder: &Recorder) -> io::Result<()> {
        match self.due {
            Some((at, bytes)) => recorder.noted(recorder.events.write_all_at(&bytes, at)),
            None => Ok(()),
        }
    }
}

/// A mark whose place is reserved: its event and its label.
#[must_use = "a mark reserved but never written reads as a hole"]
pub struct PendingMark {
    event: PendingEvent,
    label: String,
    at: u64,
}

impl PendingMark {
    pub fn write(self, recorder: &Recorder) -> io::Result<()> {
        recorder.noted(recorder.labels.write_all_at(self.label.as_bytes(), self.at))?;
        self.event.write(recorder)
    }
}

/// Puts `record` next in the order. Flushes, marks, starts and stops write the buffer out
/// at once (a recording cut short by a crash keeps every closed epoch); other events when
/// the buffer is full.
fn reserve(st: &mut RecorderState, record: EventRecord) -> PendingEvent {
    st.next_event += 1;
    st.buffered.extend_from_slice(&record.encode());
    let sync_point = !matches!(
        record.kind,
        EventKind::Write | EventKind::Zero | EventKind::Before
    );
    if !sync_point && st.buffered.len() < EVENT_CHUNK {
        return PendingEvent { due: None };
    }
    let at = st.buffered_from * EVENT_SIZE;
    st.buffered_from = st.next_event;
    PendingEvent {
        due: Some((at, std::mem::take(&mut st.buffered))),
    }
}

/// The block [`data_blocks`] reads and hands on at once.
pub const DATA_BLOCK: u64 = 1 << 20;

/// Calls `each(offset, bytes)` for every block of [`DATA_BLOCK`] bytes (aligned, the last
/// one shorter) of the first `size` bytes of `file` that holds a byte other than zero, in
/// order. Holes are never read (`SEEK_DATA`): the cost is the file's data, not its size.
/// What hashing, copying and writing out an image share.
pub fn data_blocks(
    file: &File,
    size: u64,
    mut each: impl FnMut(u64, &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut buf = vec![0u8; DATA_BLOCK as usize];
    let mut block_seen = u64::MAX;
    for (s, l) in crate::media::cache_data_extents(file, 0, size)? {
        let mut block = s / DATA_BLOCK;
        while block * DATA_BLOCK < s + l {
            if block != block_seen {
                block_seen = block;
                let at = block * DATA_BLOCK;
                let n = DATA_BLOCK.min(size - at) as usize;
                crate::media::read_full(file, &mut buf[..n], at)?;
                if buf[..n].iter().any(|b| *b != 0) {
                    each(at, &buf[..n])?;
                }
            }
            block += 1;
        }
    }
    Ok(())
}

/// A hash of an image's content (its size and bytes), the same for a sparse copy and its
/// original: blocks that read as zeroes (holes included, never read) count only by their
/// absence. BLAKE3, hex.
pub fn image_hash(image: &File) -> io::Result<String> {
    let size = match crate::media::device::size(image) {
        Ok(size) if size > 0 => size,
        _ => image.metadata()?.len(),
    };
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"blkdebugfs image v1");
    hasher.update(&size.to_le_bytes());
    data_blocks(image, size, |at, bytes| {
        hasher.update(&(at / DATA_BLOCK).to_le_bytes());
        hasher.update(bytes);
        Ok(())
    })?;
    Ok(hasher.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip() {
        let e = EventRecord {
            kind: EventKind::Write,
            seq: 7,
            a: 4096,
            b: 512,
            c: 99,
        };
        assert_eq!(EventRecord::decode(&e.encode()), Some(e));
        assert_eq!(EventRecord::decode(&[0u8; 40]), None);
    }

    #[test]
    fn the_hash_sees_content_not_sparseness() {
        let dir = tempfile::tempdir().unwrap();
        let sparse = dir.path().join("a");
        let dense = dir.path().join("b");
        let f = File::create(&sparse).unwrap();
        f.set_len(3 << 20).unwrap();
        f.write_all_at(b"x", (2 << 20) + 5).unwrap();
        let mut bytes = vec![0u8; 3 << 20];
        bytes[(2 << 20) + 5] = b'x';
        std::fs::write(&dense, &bytes).unwrap();
        let h = |p: &Path| image_hash(&File::open(p).unwrap()).unwrap();
        assert_eq!(h(&sparse), h(&dense));
        bytes[7] = 1;
        std::fs::write(&dense, &bytes).unwrap();
        assert_ne!(h(&sparse), h(&dense));
    }

    #[test]
    fn before_images_are_kept_once_per_sector() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img");
        std::fs::write(&img, vec![7u8; 8 * 512]).unwrap();
        let image = File::open(&img).unwrap();
        let rec = Recorder::create(&dir.path().join("rec"), None).unwrap();
        let before = |offset: u64, len: u64, image: &File| {
            // The caller reads what it writes; `finish` reads the sectors' edges past it.
            let mut fresh = rec.claim_fresh(offset, len);
            let mut buf = vec![0u8; len as usize];
            crate::media::read_full(image, &mut buf, offset).unwrap();
            fresh.keep(offset, &buf).unwrap();
            fresh.finish(image).unwrap();
        };
        before(512, 1024, &image);
        before(100, 2000, &image);
        let st = rec.state.lock();
        // Sectors 1-2 first, then 0 and 3-4 (100..2100 covers sectors 0-4).
        assert_eq!(st.before_end, 5 * 512);
        drop(st);
        // Zeroes keep no bytes.
        let zeroes = dir.path().join("zeroes");
        std::fs::write(&zeroes, vec![0u8; 4 << 20]).unwrap();
        before(1 << 20, 2 << 20, &File::open(&zeroes).unwrap());
        assert_eq!(rec.state.lock().before_end, 5 * 512);
    }
}
