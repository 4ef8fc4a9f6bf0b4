//! Crash states as overlays (`spec/explore.md` §3): a state's bytes resolve through layers
//! of recorded changes over the base image, so building one costs O(sectors its epoch
//! wrote), never O(image).
//!
//! Layers, bottom to top: the base image file (sectors no write touched); the recording's
//! base (before-images, then the writes before it started); the writes of the epochs
//! before the state's (`prior`); the state's own choice of its epoch's writes (`delta`),
//! applied in completion order so a sector takes the newest chosen write; and, while a
//! check runs, a copy-on-write layer for the check's own writes (`serve.rs`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::enumerate::Candidate;
use super::recording::{Change, Recording, Src};
use crate::engine::settle::settle;
use crate::media::record::{DATA_BLOCK, data_blocks};
/// Non-overlapping ranges of bytes and where each comes from: `start -> (end, src)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layer {
    map: BTreeMap<u64, (u64, Src)>,
}

impl Layer {
    /// Puts `change` over whatever the layer had there.
    pub fn put(&mut self, change: Change) {
        let (start, end) = (change.offset, change.offset + change.len);
        if start >= end {
            return;
        }
        // A range that starts before and reaches in: keep its head (and its tail past end).
        if let Some((&s, &(e, src))) = self.map.range(..start).next_back()
            && e > start
        {
            self.map.insert(s, (start, src));
            if e > end {
                self.map.insert(end, (e, src.advance(end - s)));
            }
        }
        let inside: Vec<u64> = self.map.range(start..end).map(|(s, _)| *s).collect();
        for s in inside {
            let (e, src) = self.map.remove(&s).expect("listed");
            if e > end {
                self.map.insert(end, (e, src.advance(end - s)));
            }
        }
        self.map.insert(start, (end, change.src));
    }

    /// The pieces of `[start, end)` the layer has, clipped: `(offset, len, src)`.
    pub fn pieces(&self, start: u64, end: u64) -> Vec<(u64, u64, Src)> {
        let mut out = Vec::new();
        if let Some((&s, &(e, src))) = self.map.range(..start).next_back()
            && e > start
        {
            out.push((start, e.min(end) - start, src.advance(start - s)));
        }
        for (&s, &(e, src)) in self.map.range(start..end) {
            out.push((s, e.min(end) - s, src));
        }
        out
    }

    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter().map(|(s, (e, _))| (*s, *e))
    }
}

/// The part of `change` inside `[a, b)` (which it overlaps).
fn clip(change: Change, a: u64, b: u64) -> Change {
    let (s, e) = (change.offset.max(a), (change.offset + change.len).min(b));
    Change {
        offset: s,
        len: e - s,
        src: change.src.advance(s - change.offset),
    }
}

pub use crate::engine::ranges::atomic_units;

/// One crash state's bytes: the base image, the recording's layers and its own choice.
pub struct StateImage {
    pub rec: Arc<Recording>,
    pub base_image: Arc<File>,
    pub base: Arc<Layer>,
    pub prior: Arc<Layer>,
    pub delta: Layer,
}

impl StateImage {
    /// The delta layer of `candidate` over its epoch's writes, by the crash rule of
    /// `engine/settle.rs` (the power cut's): a write of S reached the disk (a torn one only
    /// its kept `unit`s), and each block of `unit` bytes it reached ends as the newest such
    /// write left it, that is with the bytes of every write up to that one, S or not,
    /// applied in order (the disk wrote the cache's copy of the whole block).
    pub fn delta_of(rec: &Recording, candidate: &Candidate, unit: u64) -> Layer {
        let ends_as = Self::ends_as(rec, candidate, unit);
        Self::delta_from(rec, candidate.epoch, &ends_as, unit)
    }

    /// The block (of `unit` bytes) -> the write of `candidate`'s epoch it ends as, for every
    /// block a write of S reached: the crash rule of `engine/settle.rs`, no I/O.
    pub fn ends_as(rec: &Recording, candidate: &Candidate, unit: u64) -> BTreeMap<u64, usize> {
        let writes = &rec.epochs[candidate.epoch].writes;
        let spans: Vec<(u64, u64)> = writes.iter().map(|w| (w.offset, w.len)).collect();
        let mut chosen = vec![false; writes.len()];
        for &w in &candidate.writes {
            chosen[w] = true;
        }
        let mut ends_as: BTreeMap<u64, usize> = BTreeMap::new();
        settle(
            &spans,
            unit,
            |i, u, _, _| {
                chosen[i]
                    && match &candidate.tear {
                        Some(tear) if tear.write == i => tear.kept.binary_search(&u).is_ok(),
                        _ => true,
                    }
            },
            |i, at, _, reached| {
                if reached {
                    ends_as.insert(at / unit, i);
                }
            },
        );
        ends_as
    }

    /// The delta layer of a state of `epoch` whose blocks end as `ends_as` says: each such
    /// block with the bytes of every write up to the one it ends as, applied in order.
    pub fn delta_from(
        rec: &Recording,
        epoch: usize,
        ends_as: &BTreeMap<u64, usize>,
        unit: u64,
    ) -> Layer {
        let writes = &rec.epochs[epoch].writes;
        let mut delta = Layer::default();
        // Blocks the write they end as covers whole: that write's bytes alone, in runs.
        let mut run: Option<Change> = None;
        // Writes by the blocks they touch, for blocks a write covers only in part.
        let mut by_block: Option<BTreeMap<u64, Vec<usize>>> = None;
        for (&block, &k) in ends_as {
            let (a, b) = (block * unit, (block + 1) * unit);
            let w = writes[k];
            if w.offset <= a && b <= w.offset + w.len {
                let piece = clip(w, a, b);
                match &mut run {
                    Some(r) if r.offset + r.len == a && r.src.advance(r.len) == piece.src => {
                        r.len += piece.len;
                    }
                    _ => {
                        if let Some(r) = run.replace(piece) {
                            delta.put(r);
                        }
                    }
                }
                continue;
            }
            let index = by_block.get_or_insert_with(|| {
                let mut index: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
                for (j, w) in writes.iter().enumerate().filter(|(_, w)| w.len > 0) {
                    for blk in w.offset / unit..=(w.offset + w.len - 1) / unit {
                        index.entry(blk).or_default().push(j);
                    }
                }
                index
            });
            for &j in index[&block].iter().take_while(|&&j| j <= k) {
                delta.put(clip(writes[j], a, b));
            }
        }
        if let Some(r) = run {
            delta.put(r);
        }
        delta
    }

    pub fn size(&self) -> u64 {
        self.rec.size
    }

    /// Reads `buf.len()` bytes at `offset` (zeroes past the end).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        if offset < self.rec.image.size {
            let n = (self.rec.image.size.min(end) - offset) as usize;
            read_full(&self.base_image, &mut buf[..n], offset)?;
            buf[n..].fill(0);
        } else {
            buf.fill(0);
        }
        for layer in [&*self.base, &*self.prior, &self.delta] {
            for (at, len, src) in layer.pieces(offset, end) {
                let from = (at - offset) as usize;
                self.rec
                    .read_src(src, &mut buf[from..from + len as usize])?;
            }
        }
        Ok(())
    }

    /// Writes the state to `out` as a sparse file of its size, byte for byte: the base
    /// image's data (zero blocks left as holes), then every recorded range over it.
    pub fn write_image(&self, out: &File) -> io::Result<()> {
        out.set_len(0)?;
        out.set_len(self.size())?;
        let limit = self.rec.image.size.min(self.size());
        data_blocks(&self.base_image, limit, |at, bytes| {
            out.write_all_at(bytes, at)
        })?;
        const BLOCK: u64 = DATA_BLOCK;
        let mut buf = vec![0u8; BLOCK as usize];
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for layer in [&*self.base, &*self.prior, &self.delta] {
            ranges.extend(layer.ranges());
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        for (s, e) in merged {
            let e = e.min(self.size());
            let mut at = s;
            while at < e {
                let n = (e - at).min(BLOCK) as usize;
                self.read(at, &mut buf[..n])?;
                out.write_all_at(&buf[..n], at)?;
                at += n as u64;
            }
        }
        out.sync_all()
    }
}

fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    crate::media::read_full(file, buf, offset)
}

/// A sector's share of a state's content hash: states are hashed as the sum of these over
/// the sectors their epoch wrote, on top of what their epoch started from (`states.rs`).
pub fn sector_hash(sector: u64, bytes: &[u8]) -> u128 {
    let mut h = blake3::Hasher::new();
    h.update(&sector.to_le_bytes());
    h.update(bytes);
    u128::from_le_bytes(h.finalize().as_bytes()[..16].try_into().expect("16 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ranges::SECTOR;

    fn c(offset: u64, len: u64, at: u64) -> Change {
        Change {
            offset,
            len,
            src: Src::Data(at),
        }
    }

    #[test]
    fn a_newer_range_splits_and_covers_older_ones() {
        let mut l = Layer::default();
        l.put(c(0, 100, 1000));
        l.put(c(200, 100, 2000));
        l.put(c(50, 200, 5000));
        assert_eq!(
            l.pieces(0, 400),
            vec![
                (0, 50, Src::Data(1000)),
                (50, 200, Src::Data(5000)),
                (250, 50, Src::Data(2050)),
            ]
        );
        // Inside one range: its head, the new range, its tail.
        l.put(c(10, 10, 9000));
        assert_eq!(
            l.pieces(0, 60),
            vec![
                (0, 10, Src::Data(1000)),
                (10, 10, Src::Data(9000)),
                (20, 30, Src::Data(1020)),
                (50, 10, Src::Data(5000)),
            ]
        );
        assert_eq!(
            l.pieces(5, 12),
            vec![(5, 5, Src::Data(1005)), (10, 2, Src::Data(9000))]
        );
    }

    #[test]
    fn a_larger_physical_sector_tears_only_at_its_own_boundaries() {
        assert_eq!(
            atomic_units(1024, 8192, 4096),
            vec![(1024, 3072), (4096, 4096), (8192, 1024)]
        );
        assert_eq!(atomic_units(0, 4096, 4096), vec![(0, 4096)]);
        assert_eq!(atomic_units(0, 4096, SECTOR).len(), 8);
    }
}
