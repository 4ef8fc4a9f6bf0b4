//! The ordered list of crash states to check (`spec/explore.md` §2): per epoch, the kinds
//! in `--strategies` order, each kind's candidates in order, a state dropped when one with
//! the same bytes and the same required marks came before it, up to `--per-epoch` states
//! an epoch (`full` always). A function of (recording, seed, options) alone, so shards and
//! replays agree.
//!
//! Content hashes without reading whole images: a state's hash is the sum (mod 2^128) of
//! [`sector_hash`] over every sector the recording touched. States of one epoch differ
//! only in the sectors that epoch wrote (`T`), so with `A` = the epoch's starting sum minus
//! its share over `T`, a state's hash is `A` plus its own share over `T`: O(|T|) per state.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::sync::Arc;

use parking_lot::Mutex;

use super::enumerate::{Candidate, Kind, Shape};
use super::overlay::{Layer, StateImage, atomic_units, sector_hash};
use super::recording::Recording;
use crate::engine::ranges::SECTOR;

/// What picks the states.
#[derive(Clone, Debug)]
pub struct Options {
    pub seed: u64,
    /// States an epoch at most (`--per-epoch`); `full` does not count.
    pub per_epoch: usize,
    /// The kinds, in order (`--strategies`).
    pub kinds: Vec<Kind>,
    /// The disk's atomic write unit in bytes (`--physical-sector`): what a tear keeps or
    /// loses whole.
    pub unit: u64,
}

/// A state to check.
#[derive(Clone, Debug)]
pub struct Planned {
    pub candidate: Candidate,
    /// Its content hash (`None` for a state checked alone, by `--state ID`).
    pub hash: Option<u128>,
    /// How many of the recording's marks it must hold (the first N).
    pub marks: usize,
}

/// The list, and what dedup skipped per epoch.
pub struct StateList {
    pub states: Vec<Planned>,
    pub skipped: Vec<usize>,
}

/// How many random subsets an epoch draws at most, per state it may still check: draws
/// that repeat a state are skipped, so an epoch with few distinct states ends.
const DRAWS_PER_STATE: usize = 4;

/// Builds the list. Reads each sector an epoch wrote once per content it can take in that
/// epoch (see `Hashes`), not once per candidate.
pub fn plan(rec: &Arc<Recording>, base_image: &Arc<File>, opts: &Options) -> io::Result<StateList> {
    let mut prior = Layer::default();
    let base = Arc::new(base_layer(rec));
    let mut start_sum = sector_hash(u64::MAX, rec.image.hash.as_bytes());
    let mut seen: HashSet<(u128, usize)> = HashSet::new();
    let mut states = Vec::new();
    let mut skipped = vec![0; rec.epochs.len()];
    let last_epoch = rec.epochs.len().saturating_sub(1);
    for (e, epoch) in rec.epochs.iter().enumerate() {
        let units = epoch_units(rec, e, opts.unit);
        let shape = Shape {
            epoch: e,
            units: &units,
            seed: opts.seed,
        };
        let touched = touched_sectors(rec, e);
        // Shared with this epoch's states while they are hashed, then taken back (no copy).
        let prior_arc = Arc::new(std::mem::take(&mut prior));
        let mut hashes = Hashes {
            rec,
            base_image,
            base: &base,
            prior: &prior_arc,
            touched: &touched,
            unit: opts.unit,
            memo: HashMap::new(),
        };
        let durable = shape.candidate(Kind::Durable, 0).expect("always one");
        let a = start_sum.wrapping_sub(hashes.share(&durable)?);
        let mut taken = 0;
        // With `durable` first, every epoch's list starts with it (or with a state of the
        // same bytes and marks checked before), so an epoch's `full`, the same bytes as the
        // next epoch's `durable`, is checked there, under its stronger marks.
        let durable_first = opts.kinds.first() == Some(&Kind::Durable);
        for &kind in &opts.kinds {
            if kind == Kind::Full && e != last_epoch && durable_first {
                continue;
            }
            let budget = match kind {
                Kind::Full => usize::MAX,
                _ => opts.per_epoch.saturating_sub(taken),
            };
            let numbers = match shape.numbers(kind) {
                Some(numbers) => numbers,
                None => 0..(budget.saturating_mul(DRAWS_PER_STATE)) as u64,
            };
            let mut taken_here = 0;
            for n in numbers {
                if taken_here >= budget {
                    break;
                }
                let Some(c) = shape.candidate(kind, n) else {
                    continue;
                };
                let hash = a.wrapping_add(hashes.share(&c)?);
                let marks = match kind {
                    Kind::Full => rec.marks.len(),
                    _ => epoch.marks,
                };
                if !seen.insert((hash, marks)) {
                    skipped[e] += 1;
                    continue;
                }
                taken_here += 1;
                states.push(Planned {
                    candidate: c,
                    hash: Some(hash),
                    marks,
                });
            }
            if kind != Kind::Full {
                taken += taken_here;
            }
        }
        let full = shape.candidate(Kind::Full, 0).expect("always one");
        start_sum = a.wrapping_add(hashes.share(&full)?);
        drop(hashes);
        prior = Arc::try_unwrap(prior_arc).unwrap_or_else(|shared| (*shared).clone());
        for w in &epoch.writes {
            prior.put(*w);
        }
    }
    Ok(StateList { states, skipped })
}

/// How many atomic units (`unit` bytes, see [`atomic_units`]) each write of epoch `e` has:
/// the epoch's shape, as enumeration sees it.
pub fn epoch_units(rec: &Recording, e: usize, unit: u64) -> Vec<usize> {
    rec.epochs[e]
        .writes
        .iter()
        .map(|w| atomic_units(w.offset, w.len, unit).len())
        .collect()
}

/// The recording's base layer: before-images, then the writes before it started.
pub fn base_layer(rec: &Recording) -> Layer {
    let mut base = Layer::default();
    for c in &rec.base {
        base.put(*c);
    }
    base
}

/// Sector ranges `(first, last)` that epoch `e` wrote, merged.
fn touched_sectors(rec: &Recording, e: usize) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = rec.epochs[e]
        .writes
        .iter()
        .filter(|w| w.len > 0)
        .map(|w| (w.offset / SECTOR, (w.offset + w.len - 1) / SECTOR))
        .collect();
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (a, b) in ranges {
        match merged.last_mut() {
            Some(last) if a <= last.1 + 1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    merged
}

/// One epoch's sector hashes. In a state of the epoch, a sector the epoch wrote holds the
/// epoch's starting content, or the content of the write its block ends as (the crash rule):
/// few contents per sector, whatever the number of candidates. So a candidate's share of
/// its hash is a sum of memoized `(sector, content)` hashes, and only a content not seen
/// yet is read (from that candidate's own state).
struct Hashes<'a> {
    rec: &'a Arc<Recording>,
    base_image: &'a Arc<File>,
    base: &'a Arc<Layer>,
    prior: &'a Arc<Layer>,
    /// The sectors the epoch wrote, `(first, last)` runs.
    touched: &'a [(u64, u64)],
    unit: u64,
    /// `(sector, the write its block ends as, None for the epoch's start)` -> its hash.
    memo: HashMap<(u64, Option<usize>), u128>,
}

impl Hashes<'_> {
    /// `candidate`'s share of its hash over the sectors the epoch wrote.
    fn share(&mut self, candidate: &Candidate) -> io::Result<u128> {
        let ends = StateImage::ends_as(self.rec, candidate, self.unit);
        let version = |sector: u64| ends.get(&(sector * SECTOR / self.unit)).copied();
        let mut sum = 0u128;
        let mut missing: Vec<(u64, u64)> = Vec::new();
        for &(first, last) in self.touched {
            for sector in first..=last {
                match self.memo.get(&(sector, version(sector))) {
                    Some(h) => sum = sum.wrapping_add(*h),
                    None => match missing.last_mut() {
                        Some(run) if run.1 + 1 == sector => run.1 = sector,
                        _ => missing.push((sector, sector)),
                    },
                }
            }
        }
        if missing.is_empty() {
            return Ok(sum);
        }
        let state = StateImage {
            rec: self.rec.clone(),
            base_image: self.base_image.clone(),
            base: self.base.clone(),
            prior: self.prior.clone(),
            delta: StateImage::delta_from(self.rec, candidate.epoch, &ends, self.unit),
        };
        const RUN: u64 = 256;
        let mut buf = vec![0u8; (RUN * SECTOR) as usize];
        for (first, last) in missing {
            let mut s = first;
            while s <= last {
                let n = (last - s + 1).min(RUN);
                let bytes = &mut buf[..(n * SECTOR) as usize];
                state.read(s * SECTOR, bytes)?;
                for (i, content) in bytes.chunks_exact(SECTOR as usize).enumerate() {
                    let sector = s + i as u64;
                    let h = sector_hash(sector, content);
                    self.memo.insert((sector, version(sector)), h);
                    sum = sum.wrapping_add(h);
                }
                s += n;
            }
        }
        Ok(sum)
    }
}

/// The epochs' starting layers, built forward on demand and kept for the few epochs
/// checks are on at once (checks run in list order, so epochs ascend).
pub struct Priors {
    rec: Arc<Recording>,
    unit: u64,
    pub base: Arc<Layer>,
    /// `(epoch, its prior layer)`, newest last.
    built: Mutex<Vec<(usize, Arc<Layer>)>>,
}

/// Prior layers kept at once.
const PRIORS_KEPT: usize = 4;

impl Priors {
    pub fn new(rec: Arc<Recording>, unit: u64) -> Priors {
        Priors {
            base: Arc::new(base_layer(&rec)),
            unit,
            rec,
            built: Mutex::new(Vec::new()),
        }
    }

    /// The layer of every write of the epochs before `epoch`.
    pub fn before(&self, epoch: usize) -> Arc<Layer> {
        let mut built = self.built.lock();
        if let Some((_, layer)) = built.iter().find(|(e, _)| *e == epoch) {
            return layer.clone();
        }
        // Start from the newest layer at or below `epoch`, else from nothing.
        let (mut at, mut layer) = built
            .iter()
            .filter(|(e, _)| *e <= epoch)
            .max_by_key(|(e, _)| *e)
            .map(|(e, l)| (*e, (**l).clone()))
            .unwrap_or((0, Layer::default()));
        while at < epoch {
            for w in &self.rec.epochs[at].writes {
                layer.put(*w);
            }
            at += 1;
        }
        let layer = Arc::new(layer);
        built.push((epoch, layer.clone()));
        if built.len() > PRIORS_KEPT {
            built.remove(0);
        }
        layer
    }

    /// The bytes of `candidate`'s state.
    pub fn state(&self, base_image: &Arc<File>, candidate: &Candidate) -> StateImage {
        StateImage {
            rec: self.rec.clone(),
            base_image: base_image.clone(),
            base: self.base.clone(),
            prior: self.before(candidate.epoch),
            delta: StateImage::delta_of(&self.rec, candidate, self.unit),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::WriteCache;
    use crate::media::record::{Content, Recorder};
    use std::collections::{BTreeMap, BTreeSet};
    use std::os::unix::fs::FileExt;

    /// Records `epochs` (each a list of `(offset, len, byte)` writes, a flush after each but
    /// the last) over an image of `size` bytes of 0x11; returns the recording and the base.
    fn record(
        dir: &std::path::Path,
        size: u64,
        epochs: &[&[(u64, u64, u8)]],
    ) -> (Arc<Recording>, Arc<File>) {
        let path = dir.join("img");
        std::fs::write(&path, vec![0x11u8; size as usize]).unwrap();
        let base = dir.join("base");
        std::fs::copy(&path, &base).unwrap();
        let image = File::options().read(true).write(true).open(&path).unwrap();
        let rec = Recorder::create(&dir.join("rec"), None).unwrap();
        rec.arm_start(0).unwrap();
        let cache = WriteCache::new(&path, Some(rec)).unwrap();
        let flush = |cache: &WriteCache| {
            let t = cache.begin_flush(cache.cycle()).unwrap();
            cache.end_flush(t).unwrap();
        };
        flush(&cache);
        for (i, writes) in epochs.iter().enumerate() {
            for &(offset, len, byte) in *writes {
                let bytes = vec![byte; len as usize];
                cache
                    .write(
                        &image,
                        offset,
                        len,
                        cache.cycle(),
                        Content::Bytes(&bytes),
                        || image.write_all_at(&bytes, offset),
                    )
                    .unwrap();
            }
            if i + 1 < epochs.len() {
                flush(&cache);
            }
        }
        cache
            .recorder()
            .unwrap()
            .stop(u64::MAX)
            .map(|e| e.write(cache.recorder().unwrap()));
        // The recorded image hash names the base (the image before the run).
        let rec = cache.recorder().unwrap();
        rec.finish(&File::open(&base).unwrap(), &base, size)
            .unwrap();
        let recording = Recording::open(&dir.join("rec")).unwrap();
        (Arc::new(recording), Arc::new(File::open(&base).unwrap()))
    }

    fn bytes_of(state: &StateImage) -> Vec<u8> {
        let mut buf = vec![0u8; state.size() as usize];
        state.read(0, &mut buf).unwrap();
        buf
    }

    /// The model, the slow way: the epoch's base; then each sector some chosen write
    /// touches, as the newest such write left it (every write of the epoch up to that one
    /// applied to the sector, chosen or not: the disk writes whole sectors).
    fn model(size: u64, epochs: &[&[(u64, u64, u8)]], e: usize, set: &[usize]) -> Vec<u8> {
        let mut img = vec![0x11u8; size as usize];
        for writes in &epochs[..e] {
            for &(o, l, b) in *writes {
                img[o as usize..(o + l) as usize].fill(b);
            }
        }
        let writes = epochs[e];
        for sector in 0..size / SECTOR {
            let (a, b) = (sector * SECTOR, (sector + 1) * SECTOR);
            let touches = |&(o, l, _): &(u64, u64, u8)| o < b && a < o + l;
            let Some(&k) = set.iter().rev().find(|&&w| touches(&writes[w])) else {
                continue;
            };
            for &(o, l, byte) in writes[..=k].iter().filter(|w| touches(w)) {
                img[o.max(a) as usize..(o + l).min(b) as usize].fill(byte);
            }
        }
        img
    }

    #[test]
    fn every_distinct_subset_of_a_small_epoch_is_checked_once_with_newer_writes_on_top() {
        let dir = tempfile::tempdir().unwrap();
        // Overlapping writes, one rewriting the same bytes (a subset with and without it
        // is the same state), in two epochs.
        let epochs: &[&[(u64, u64, u8)]] = &[
            &[(0, 1024, 0xa1), (512, 1024, 0xa2)],
            &[
                (0, 2048, 0xb1),
                (1024, 512, 0xb2),
                (1024, 512, 0xb2),
                (4096, 512, 0x11),
                (512, 512, 0xb5),
                // Unaligned, into a sector no write touched: its before-image is the
                // whole sector, edges included.
                (5000, 100, 0xb8),
                // Two unaligned writes sharing sector 14: the second alone reaching the
                // disk carries the first's bytes in that sector too.
                (7200, 100, 0xb9),
                (7400, 100, 0xba),
            ],
        ];
        let size = 8192;
        let (rec, base) = record(dir.path(), size, epochs);
        assert_eq!(rec.epochs.len(), 2);
        let list = plan(
            &rec,
            &base,
            &Options {
                seed: 1,
                per_epoch: 1000,
                kinds: vec![Kind::Subset],
                unit: SECTOR,
            },
        )
        .unwrap();
        let priors = Priors::new(rec.clone(), SECTOR);
        // Every subset of every epoch, as the model builds it.
        let mut distinct: BTreeSet<Vec<u8>> = BTreeSet::new();
        for (e, writes) in epochs.iter().enumerate() {
            let n = writes.len();
            for mask in 0..1u64 << n {
                let set: Vec<usize> = (0..n).filter(|w| mask >> w & 1 == 1).collect();
                distinct.insert(model(size, epochs, e, &set));
            }
        }
        let mut checked: Vec<Vec<u8>> = Vec::new();
        for p in &list.states {
            let bytes = bytes_of(&priors.state(&base, &p.candidate));
            assert!(
                bytes == model(size, epochs, p.candidate.epoch, &p.candidate.writes),
                "{} is its writes applied in completion order over its epoch's start",
                p.candidate.id()
            );
            checked.push(bytes);
        }
        let unique: BTreeSet<Vec<u8>> = checked.iter().cloned().collect();
        // No marks here, so a state is skipped when an earlier one (this epoch's or an
        // earlier epoch's) had the same bytes: each distinct image is checked exactly once.
        assert_eq!(unique.len(), checked.len(), "a state was checked twice");
        assert_eq!(
            unique.len(),
            distinct.len(),
            "every distinct subset is checked"
        );
        assert!(unique == distinct);
        // The rewrite of the same bytes makes some subsets equal: they were skipped.
        assert!(list.skipped[1] > 0);
    }

    #[test]
    fn a_state_id_rebuilds_the_same_bytes_as_the_list_checked() {
        let dir = tempfile::tempdir().unwrap();
        let epochs: &[&[(u64, u64, u8)]] = &[&[(0, 4096, 0xc1), (2048, 4096, 0xc2)]];
        let (rec, base) = record(dir.path(), 8192, epochs);
        let opts = Options {
            seed: 9,
            per_epoch: 64,
            kinds: Kind::ALL.to_vec(),
            unit: SECTOR,
        };
        let list = plan(&rec, &base, &opts).unwrap();
        let priors = Priors::new(rec.clone(), SECTOR);
        let units: Vec<usize> = rec.epochs[0]
            .writes
            .iter()
            .map(|w| atomic_units(w.offset, w.len, SECTOR).len())
            .collect();
        let mut seen = BTreeMap::new();
        for p in &list.states {
            let (e, kind, n) = super::super::enumerate::parse_id(&p.candidate.id()).unwrap();
            let again = Shape {
                epoch: e,
                units: &units,
                seed: 9,
            }
            .candidate(kind, n)
            .unwrap();
            assert_eq!(again, p.candidate);
            seen.insert(p.candidate.id(), bytes_of(&priors.state(&base, &again)));
        }
        assert!(
            seen.keys().any(|id| id.contains("torn")),
            "{:?}",
            seen.keys()
        );
    }
}
