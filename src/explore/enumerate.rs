//! Which crash states an epoch has (`spec/explore.md` §2): a pure, seeded function of the
//! epoch's shape (how many writes, how many sector units each), so a shard, a replay and
//! `--state ID` all name the same states.
//!
//! A candidate is a set S of the epoch's writes (indexes in completion order), and
//! optionally a tear: the last write of S keeps only some of its sector units. Each kind
//! numbers its candidates (`N` of `EPOCH.KIND.N`):
//! - `durable.0`: S empty.
//! - `prefix.K`: the first K writes, K = 1 .. n-1.
//! - `omit.I`: all but write I.
//! - `torn.N`: for N < n, the prefix of N+1 writes with write N torn; for n <= N < 2n-1,
//!   all but write N-n with the last write torn. Units kept: a seeded draw, never none and
//!   never all; a write of one sector cannot tear (no candidate).
//! - `subset.N`: for n <= 8, N is the bitmask of S (every subset); past that, seeded draws.
//! - `full.0`: every write.

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

/// Subsets of an epoch this small are all enumerated, larger ones drawn.
pub const ALL_SUBSETS_UP_TO: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Durable,
    Prefix,
    Omit,
    Torn,
    Subset,
    Full,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Durable,
        Kind::Prefix,
        Kind::Omit,
        Kind::Torn,
        Kind::Subset,
        Kind::Full,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Durable => "durable",
            Kind::Prefix => "prefix",
            Kind::Omit => "omit",
            Kind::Torn => "torn",
            Kind::Subset => "subset",
            Kind::Full => "full",
        }
    }

    pub fn parse(text: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == text)
    }
}

/// A write torn: of its atomic units (`engine/ranges.rs`'s `atomic_units`), those
/// in `kept` (ascending) reach the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tear {
    pub write: usize,
    pub kept: Vec<usize>,
}

/// One crash state of an epoch, before its bytes are known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub epoch: usize,
    pub kind: Kind,
    pub n: u64,
    /// S: indexes into the epoch's writes, ascending (applied in completion order).
    pub writes: Vec<usize>,
    pub tear: Option<Tear>,
}

impl Candidate {
    /// `EPOCH.KIND.N`.
    pub fn id(&self) -> String {
        format!("{}.{}.{}", self.epoch, self.kind.name(), self.n)
    }
}

/// Parses `EPOCH.KIND.N`.
pub fn parse_id(id: &str) -> Option<(usize, Kind, u64)> {
    let mut parts = id.split('.');
    let epoch = parts.next()?.parse().ok()?;
    let kind = Kind::parse(parts.next()?)?;
    let n = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((epoch, kind, n))
}

/// The shape of an epoch as enumeration sees it: sector units per write.
#[derive(Clone, Debug)]
pub struct Shape<'a> {
    pub epoch: usize,
    pub units: &'a [usize],
    pub seed: u64,
}

impl Shape<'_> {
    fn len(&self) -> usize {
        self.units.len()
    }

    /// The numbers `kind`'s candidates take (`None`: drawn without end, from 0).
    pub fn numbers(&self, kind: Kind) -> Option<std::ops::Range<u64>> {
        let n = self.len() as u64;
        Some(match kind {
            Kind::Durable | Kind::Full => 0..1,
            Kind::Prefix => 1..n.max(1),
            Kind::Omit => 0..n,
            Kind::Torn => 0..(2 * n).saturating_sub(1),
            Kind::Subset if self.len() <= ALL_SUBSETS_UP_TO => 0..1 << n,
            Kind::Subset => return None,
        })
    }

    /// Candidate `n` of `kind`; `None` outside its numbers or where it does not exist (a
    /// torn candidate whose write has one unit).
    pub fn candidate(&self, kind: Kind, n: u64) -> Option<Candidate> {
        if self
            .numbers(kind)
            .is_some_and(|numbers| !numbers.contains(&n))
        {
            return None;
        }
        let len = self.len();
        let all = || (0..len).collect::<Vec<_>>();
        let but = |i: usize| (0..len).filter(|w| *w != i).collect::<Vec<_>>();
        let (writes, tear) = match kind {
            Kind::Durable => (Vec::new(), None),
            Kind::Full => (all(), None),
            Kind::Prefix => ((0..n as usize).collect(), None),
            Kind::Omit => (but(n as usize), None),
            Kind::Torn => {
                let set = match (n as usize) < len {
                    true => (0..=n as usize).collect::<Vec<_>>(),
                    false => but(n as usize - len),
                };
                let last = *set.last()?;
                let units = self.units[last];
                if units < 2 {
                    return None;
                }
                let mut rng = self.rng(kind, n);
                let kept = loop {
                    let kept: Vec<usize> = (0..units).filter(|_| rng.next_u32() & 1 == 1).collect();
                    if !kept.is_empty() && kept.len() < units {
                        break kept;
                    }
                };
                (set, Some(Tear { write: last, kept }))
            }
            Kind::Subset if len <= ALL_SUBSETS_UP_TO => {
                ((0..len).filter(|w| n >> w & 1 == 1).collect(), None)
            }
            Kind::Subset => {
                let mut rng = self.rng(kind, n);
                ((0..len).filter(|_| rng.next_u32() & 1 == 1).collect(), None)
            }
        };
        Some(Candidate {
            epoch: self.epoch,
            kind,
            n,
            writes,
            tear,
        })
    }

    /// A generator keyed by (seed, epoch, kind, n) alone: any candidate can be rebuilt
    /// without drawing the ones before it.
    fn rng(&self, kind: Kind, n: u64) -> ChaCha8Rng {
        let mut key = blake3::Hasher::new();
        key.update(b"blkdebugfs explore v1");
        key.update(&self.seed.to_le_bytes());
        key.update(&(self.epoch as u64).to_le_bytes());
        key.update(kind.name().as_bytes());
        key.update(&n.to_le_bytes());
        ChaCha8Rng::from_seed(*key.finalize().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn shape(units: &[usize]) -> Shape<'_> {
        Shape {
            epoch: 3,
            units,
            seed: 42,
        }
    }

    #[test]
    fn ids_round_trip() {
        let c = shape(&[1, 1]).candidate(Kind::Omit, 1).unwrap();
        assert_eq!(c.id(), "3.omit.1");
        assert_eq!(parse_id("3.omit.1"), Some((3, Kind::Omit, 1)));
        assert_eq!(parse_id("3.omit"), None);
        assert_eq!(parse_id("3.nope.1"), None);
        assert_eq!(parse_id("3.omit.1.2"), None);
    }

    #[test]
    fn each_kind_is_the_set_its_name_says() {
        let s = shape(&[1, 2, 4]);
        let sets = |kind| {
            s.numbers(kind)
                .unwrap()
                .filter_map(|n| s.candidate(kind, n))
                .map(|c| c.writes)
                .collect::<Vec<_>>()
        };
        assert_eq!(sets(Kind::Durable), vec![Vec::<usize>::new()]);
        assert_eq!(sets(Kind::Prefix), vec![vec![0], vec![0, 1]]);
        assert_eq!(s.candidate(Kind::Prefix, 3), None);
        assert_eq!(sets(Kind::Omit), vec![vec![1, 2], vec![0, 2], vec![0, 1]]);
        assert_eq!(sets(Kind::Full), vec![vec![0, 1, 2]]);
        // Torn: write 0 has one unit and cannot tear; then prefixes of 2 and 3, then the
        // omit sets whose last write tears.
        let torn: Vec<(Vec<usize>, usize)> = (0..5)
            .filter_map(|n| s.candidate(Kind::Torn, n))
            .map(|c| (c.writes.clone(), c.tear.unwrap().write))
            .collect();
        assert_eq!(
            torn,
            vec![
                (vec![0, 1], 1),
                (vec![0, 1, 2], 2),
                (vec![1, 2], 2),
                (vec![0, 2], 2),
            ]
        );
    }

    #[test]
    fn a_tear_keeps_some_units_never_none_or_all_and_replays() {
        let units = [8usize];
        let s = shape(&units);
        let t = s.candidate(Kind::Torn, 0).unwrap().tear.unwrap();
        assert!(!t.kept.is_empty() && t.kept.len() < 8, "{t:?}");
        assert_eq!(s.candidate(Kind::Torn, 0).unwrap().tear.unwrap(), t);
        // Another seed draws on its own.
        let other: Vec<Vec<usize>> = (0..20)
            .map(|seed| {
                Shape {
                    epoch: 3,
                    units: &units,
                    seed,
                }
                .candidate(Kind::Torn, 0)
                .unwrap()
                .tear
                .unwrap()
                .kept
            })
            .collect();
        assert!(other.iter().collect::<BTreeSet<_>>().len() > 1);
    }

    #[test]
    fn small_epochs_give_every_subset_exactly_once() {
        for n in 0..=ALL_SUBSETS_UP_TO {
            let units = vec![1; n];
            let s = shape(&units);
            let subsets: BTreeSet<Vec<usize>> = s
                .numbers(Kind::Subset)
                .unwrap()
                .map(|i| s.candidate(Kind::Subset, i).unwrap().writes)
                .collect();
            assert_eq!(subsets.len(), 1 << n);
        }
    }

    #[test]
    fn large_epochs_draw_subsets_reproducibly() {
        let units = vec![1; 20];
        let s = shape(&units);
        assert_eq!(s.numbers(Kind::Subset), None);
        assert_eq!(s.candidate(Kind::Prefix, 0), None, "prefixes count from 1");
        let a: Vec<_> = (0..10)
            .map(|i| s.candidate(Kind::Subset, i).unwrap())
            .collect();
        let b: Vec<_> = (0..10)
            .map(|i| s.candidate(Kind::Subset, i).unwrap())
            .collect();
        assert_eq!(a, b);
        assert!(a.iter().map(|c| &c.writes).collect::<BTreeSet<_>>().len() > 5);
    }
}
