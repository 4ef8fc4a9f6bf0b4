//! Reading a recording (`media/record.rs` writes it) into epochs (`spec/explore.md` §2).
//!
//! An epoch is the writes that completed between two successful flushes; a flush closes
//! the writes it covered (those with a smaller sequence number), so a write that completed
//! while the flush ran belongs to the next epoch. Epochs with no write are dropped (their
//! states are the next epoch's `durable`); their marks carry forward.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::media::record::{EVENT_SIZE, EventKind, EventRecord, FORMAT_VERSION, ImageInfo, ZEROES};

/// Where a range's bytes come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Src {
    /// At this offset of the recording's `data` file.
    Data(u64),
    /// At this offset of its `before` file (the base under a written sector).
    Before(u64),
    Zero,
}

impl Src {
    /// The source of the bytes `skip` bytes further on.
    pub fn advance(self, skip: u64) -> Src {
        match self {
            Src::Data(at) => Src::Data(at + skip),
            Src::Before(at) => Src::Before(at + skip),
            Src::Zero => Src::Zero,
        }
    }
}

/// One recorded change: `len` bytes at `offset` from `src`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    pub offset: u64,
    pub len: u64,
    pub src: Src,
}

/// The writes of one epoch, in completion order, and how many marks its states require.
#[derive(Clone, Debug, Default)]
pub struct Epoch {
    pub writes: Vec<Change>,
    /// Marks recorded before the flush that ended it (all of them for an unclosed epoch).
    pub marks: usize,
    /// Ended by a successful flush (the last epoch may be writes no flush covered).
    pub closed: bool,
}

/// A recording, loaded: its base layer, epochs and marks.
pub struct Recording {
    pub dir: PathBuf,
    /// The image it was made over (sectors no write touched come from it).
    pub image: ImageInfo,
    /// The view's size when it stopped: every state's size.
    pub size: u64,
    /// Before-images (the base under every written sector), then the writes before the
    /// recording started, in order.
    pub base: Vec<Change>,
    pub epochs: Vec<Epoch>,
    pub marks: Vec<String>,
    data: File,
    before: File,
}

fn bad(dir: &Path, why: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: not a usable recording: {why}", dir.display()),
    )
}

impl Recording {
    pub fn open(dir: &Path) -> io::Result<Recording> {
        let meta_path = dir.join("recording.json");
        let text = std::fs::read_to_string(&meta_path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{}: {e} (a recording is complete once its mount has ended)",
                    meta_path.display()
                ),
            )
        })?;
        let meta: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(dir, format!("recording.json: {e}")))?;
        let field = |v: &serde_json::Value, k: &str| {
            v.get(k)
                .and_then(|x| x.as_u64())
                .ok_or_else(|| bad(dir, format!("recording.json has no number '{k}'")))
        };
        if field(&meta, "format")? != FORMAT_VERSION {
            return Err(bad(dir, "an unknown format version"));
        }
        if let Some(why) = meta.get("broken").and_then(|b| b.as_str()) {
            return Err(bad(
                dir,
                format!("it is incomplete (an I/O error while recording: {why})"),
            ));
        }
        let img = meta
            .get("image")
            .ok_or_else(|| bad(dir, "recording.json names no image"))?;
        let image = ImageInfo {
            path: PathBuf::from(img.get("path").and_then(|p| p.as_str()).unwrap_or_default()),
            size: field(img, "size")?,
            hash: img
                .get("hash")
                .and_then(|h| h.as_str())
                .unwrap_or_default()
                .to_string(),
        };
        let size = field(&meta, "size")?;
        let count = field(&meta, "events")?;
        let open = |name: &str| {
            File::open(dir.join(name))
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.join(name).display())))
        };
        let events_file = open("events")?;
        let labels = std::fs::read(dir.join("labels"))?;
        let mut raw = vec![0u8; (count * EVENT_SIZE) as usize];
        events_file
            .read_exact_at(&mut raw, 0)
            .map_err(|e| bad(dir, format!("events: {e}")))?;
        let events = raw
            .chunks_exact(EVENT_SIZE as usize)
            .filter_map(EventRecord::decode);
        let mut rec = Recording {
            dir: dir.to_path_buf(),
            image,
            size,
            base: Vec::new(),
            epochs: Vec::new(),
            marks: Vec::new(),
            data: open("data")?,
            before: open("before")?,
        };
        rec.build(events, &labels).map_err(|why| bad(dir, why))?;
        Ok(rec)
    }

    /// Sorts the events into the base, epochs and marks.
    fn build(
        &mut self,
        events: impl Iterator<Item = EventRecord>,
        labels: &[u8],
    ) -> Result<(), String> {
        let mut befores = Vec::new();
        let mut pending: Vec<(u64, Change)> = Vec::new();
        let mut started = false;
        // After the stop only before-images count: writes then are not part of the run, but
        // they changed the image the base is read from.
        let mut stopped = false;
        for e in events {
            if stopped && e.kind != EventKind::Before {
                continue;
            }
            let change = |src| Change {
                offset: e.a,
                len: e.b,
                src,
            };
            match e.kind {
                EventKind::Before if e.c == ZEROES => befores.push(change(Src::Zero)),
                EventKind::Before => befores.push(change(Src::Before(e.c))),
                EventKind::Write => pending.push((e.seq, change(Src::Data(e.c)))),
                EventKind::Zero => pending.push((e.seq, change(Src::Zero))),
                EventKind::Start => {
                    // Writes the start's flush covered are the base; any that completed
                    // while it ran belong to the first epoch.
                    started = true;
                    let (base, later): (Vec<_>, Vec<_>) =
                        pending.drain(..).partition(|(seq, _)| *seq < e.seq);
                    self.base.extend(base.into_iter().map(|(_, c)| c));
                    pending = later;
                }
                EventKind::Flush if started => {
                    let (closed, later): (Vec<_>, Vec<_>) =
                        pending.drain(..).partition(|(seq, _)| *seq < e.seq);
                    pending = later;
                    if !closed.is_empty() {
                        self.epochs.push(Epoch {
                            writes: closed.into_iter().map(|(_, c)| c).collect(),
                            marks: self.marks.len(),
                            closed: true,
                        });
                    }
                }
                EventKind::Flush => {}
                EventKind::Mark => {
                    let label = labels
                        .get(e.a as usize..(e.a + e.b) as usize)
                        .ok_or("a mark's label is missing")?;
                    self.marks.push(String::from_utf8_lossy(label).into_owned());
                }
                EventKind::Stop => stopped = true,
            }
        }
        if !started {
            return Err("the recording never started (no flush after the setup)".into());
        }
        if !pending.is_empty() {
            self.epochs.push(Epoch {
                writes: pending.into_iter().map(|(_, c)| c).collect(),
                marks: self.marks.len(),
                closed: false,
            });
        }
        // The before-images go under everything.
        befores.append(&mut self.base);
        self.base = befores;
        Ok(())
    }

    /// Reads `buf.len()` bytes of `src`.
    pub fn read_src(&self, src: Src, buf: &mut [u8]) -> io::Result<()> {
        match src {
            Src::Zero => {
                buf.fill(0);
                Ok(())
            }
            Src::Data(at) => self.data.read_exact_at(buf, at),
            Src::Before(at) => self.before.read_exact_at(buf, at),
        }
    }

    /// Writes in the whole recording (epochs only).
    pub fn writes(&self) -> usize {
        self.epochs.iter().map(|e| e.writes.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: EventKind, seq: u64, a: u64, b: u64) -> EventRecord {
        EventRecord {
            kind,
            seq,
            a,
            b,
            c: 0,
        }
    }

    fn empty() -> Recording {
        let null = File::open("/dev/null").unwrap();
        Recording {
            dir: PathBuf::new(),
            image: ImageInfo {
                path: PathBuf::new(),
                size: 0,
                hash: String::new(),
            },
            size: 0,
            base: Vec::new(),
            epochs: Vec::new(),
            marks: Vec::new(),
            data: null.try_clone().unwrap(),
            before: null,
        }
    }

    /// Marks recorded before the flush that ends an epoch are required in its states; a
    /// mark after it belongs to the next epoch; the last epoch requires every mark.
    #[test]
    fn marks_belong_to_the_epoch_whose_flush_follows_them() {
        use EventKind::*;
        let labels = b"abc";
        let events = vec![
            ev(Write, 0, 0, 512), // setup: base
            ev(Start, 1, 0, 0),
            ev(Write, 1, 512, 512),
            ev(Mark, 2, 0, 1), // "a": before the flush: epoch 0 needs it
            ev(Flush, 2, 0, 0),
            ev(Mark, 2, 1, 1),  // "b": after it
            ev(Flush, 2, 0, 0), // no write: no epoch
            ev(Write, 2, 1024, 512),
            ev(Write, 3, 1536, 512), // completes while the next flush runs
            ev(Flush, 3, 0, 0),
            ev(Mark, 4, 2, 1),
            ev(Stop, 4, 0, 0),
            ev(Write, 4, 0, 512), // after the stop: not recorded
        ];
        let mut rec = empty();
        rec.build(events.into_iter(), labels).unwrap();
        assert_eq!(rec.base.len(), 1);
        assert_eq!(rec.marks, vec!["a", "b", "c"]);
        let shape: Vec<(Vec<u64>, usize, bool)> = rec
            .epochs
            .iter()
            .map(|e| {
                (
                    e.writes.iter().map(|w| w.offset).collect(),
                    e.marks,
                    e.closed,
                )
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                (vec![512], 1, true),
                (vec![1024], 2, true),
                (vec![1536], 3, false),
            ]
        );
    }
}
