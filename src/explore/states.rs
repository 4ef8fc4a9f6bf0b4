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

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::sync::Arc;

use parking_lot::Mutex;

use super::enumerate::{Candidate, Kind, Shape};
use super::overlay::{Layer, StateImage, sector_hash, sector_units};
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
}

/// A state to check.
#[derive(Clone, Debug)]
pub struct Planned {
    pub candidate: Candidate,
    pub hash: u128,
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

/// Builds the list. Reads the sectors each epoch wrote, once per candidate.
pub fn plan(rec: &Arc<Recording>, base_image: &Arc<File>, opts: &Options) -> io::Result<StateList> {
    let mut prior = Layer::default();
    let base = Arc::new(base_layer(rec));
    let mut start_sum = sector_hash(u64::MAX, rec.image.hash.as_bytes());
    let mut seen: HashSet<(u128, usize)> = HashSet::new();
    let mut states = Vec::new();
    let mut skipped = vec![0; rec.epochs.len()];
    let last_epoch = rec.epochs.len().saturating_sub(1);
    for (e, epoch) in rec.epochs.iter().enumerate() {
        let units: Vec<usize> = epoch
            .writes
            .iter()
            .map(|w| sector_units(w.offset, w.len).len())
            .collect();
        let shape = Shape {
            epoch: e,
            units: &units,
            seed: opts.seed,
        };
        let touched = touched_sectors(rec, e);
        let prior_arc = Arc::new(prior.clone());
        let image_of = |c: &Candidate| StateImage {
            rec: rec.clone(),
            base_image: base_image.clone(),
            base: base.clone(),
            prior: prior_arc.clone(),
            delta: StateImage::delta_of(rec, c),
        };
        let durable = shape.candidate(Kind::Durable, 0).expect("always one");
        let a = start_sum.wrapping_sub(share(&image_of(&durable), &touched)?);
        let mut taken = 0;
        for &kind in &opts.kinds {
            if kind == Kind::Full && e != last_epoch {
                // The same bytes as the next epoch's `durable`, checked there under its
                // stronger marks.
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
                let hash = a.wrapping_add(share(&image_of(&c), &touched)?);
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
                    hash,
                    marks,
                });
            }
            if kind != Kind::Full {
                taken += taken_here;
            }
        }
        let full = shape.candidate(Kind::Full, 0).expect("always one");
        start_sum = a.wrapping_add(share(&image_of(&full), &touched)?);
        for w in &epoch.writes {
            prior.put(*w);
        }
    }
    Ok(StateList { states, skipped })
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

/// A state's share of its hash over the sectors `touched`.
fn share(state: &StateImage, touched: &[(u64, u64)]) -> io::Result<u128> {
    const RUN: u64 = 256;
    let mut sum = 0u128;
    let mut buf = vec![0u8; (RUN * SECTOR) as usize];
    for &(first, last) in touched {
        let mut s = first;
        while s <= last {
            let n = (last - s + 1).min(RUN);
            let bytes = &mut buf[..(n * SECTOR) as usize];
            state.read(s * SECTOR, bytes)?;
            for (i, sector) in bytes.chunks_exact(SECTOR as usize).enumerate() {
                sum = sum.wrapping_add(sector_hash(s + i as u64, sector));
            }
            s += n;
        }
    }
    Ok(sum)
}

/// The epochs' starting layers, built forward on demand and kept for the few epochs
/// checks are on at once (checks run in list order, so epochs ascend).
pub struct Priors {
    rec: Arc<Recording>,
    pub base: Arc<Layer>,
    /// `(epoch, its prior layer)`, newest last.
    built: Mutex<Vec<(usize, Arc<Layer>)>>,
}

/// Prior layers kept at once.
const PRIORS_KEPT: usize = 4;

impl Priors {
    pub fn new(rec: Arc<Recording>) -> Priors {
        Priors {
            base: Arc::new(base_layer(&rec)),
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
            delta: StateImage::delta_of(&self.rec, candidate),
        }
    }
}
