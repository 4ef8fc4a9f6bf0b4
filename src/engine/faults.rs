//! What a request-checked rule does (`spec/faults.md` §3), and the seeded draws behind every
//! random choice.
//!
//! Contract: a [`Fault`] is what the user wrote (`[corrupt] bits = 3`); an [`Effect`] is that
//! fault made concrete for one request (these three bits of these bytes), by [`resolve`], a
//! pure function of the fault, the request, the part of it the rule's range covers and a
//! [`Draw`]. A draw is keyed by (seed, rule number, the rule's match count) and nothing else:
//! no generator state is kept between requests, so the same seed and the same sequence of
//! requests give the same effects whatever the thread count or timing.
//!
//! [`CutMode`] is here too: how a power cut (a `[power-cut]` rule's action, or `ctl
//! power-cut`) resolves the unsynced writes is part of the vocabulary of actions; the media
//! model (`media/`) applies it.
//!
//! Why `rand_chacha`: ChaCha addresses its output by (key, stream, word position), which is
//! exactly a keyed, stateless generator: the seed is the key, the rule the stream, the match
//! count the position. Its output is fixed by its specification (the crate promises value
//! stability), so a seed printed today replays the same faults after an upgrade.
//!
//! One question is asked far more often than the others: does a rule with `probability` act
//! on this match? It is asked under the engine's lock for every matching request, so it uses
//! [`acts`], a keyed 64-bit mix (SplitMix64's finaliser, three rounds: a few nanoseconds)
//! instead of a ChaCha block (about 150 ns). Everything an effect draws (which bits, how
//! long, which sectors) still comes from [`Draw`].
//!
//! Cost: [`resolve`] takes time and memory linear in what it produces (the bits or bytes it
//! damages, the pieces a torn write keeps), never more than the request holds: `bits` and
//! `bytes` are clamped to the covered bytes, and distinct positions are drawn by
//! [`distinct_below`], linear even when every bit of the request is asked for. It may still
//! cost as much as the request, so the engine never calls it under its lock: the engine
//! decides a `rules::Plan`, and the executor resolves it after the lock is released.

use std::fmt;
use std::time::Duration;

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use super::ranges::SECTOR;
use super::units::duration_text;

/// How `[corrupt]` damages bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CorruptMode {
    /// Flip `bits` distinct bits.
    Flip,
    /// Overwrite `bytes` bytes with zeroes.
    Zero,
    /// Overwrite `bytes` bytes with seeded random bytes.
    Random,
}

impl CorruptMode {
    pub fn name(self) -> &'static str {
        match self {
            CorruptMode::Flip => "flip",
            CorruptMode::Zero => "zero",
            CorruptMode::Random => "random",
        }
    }
}

/// How `[torn-write]` chooses what it keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TornMode {
    /// A prefix of `keep` bytes.
    Prefix,
    /// Each `unit` independently kept or not.
    Sectors,
}

impl TornMode {
    pub fn name(self) -> &'static str {
        match self {
            TornMode::Prefix => "prefix",
            TornMode::Sectors => "sectors",
        }
    }
}

/// How a power cut resolves each unsynced write (faults §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutMode {
    /// Every unsynced write is lost.
    Lose,
    /// Every unsynced write is kept.
    Keep,
    /// Each write kept, lost or torn (a seeded subset of its sectors kept).
    Random,
    /// Each sector of each write independently old or new.
    Sectors,
}

impl CutMode {
    pub const NAMES: &'static [&'static str] = &["lose", "keep", "random", "sectors"];

    pub fn name(self) -> &'static str {
        match self {
            CutMode::Lose => "lose",
            CutMode::Keep => "keep",
            CutMode::Random => "random",
            CutMode::Sectors => "sectors",
        }
    }

    pub fn from_name(name: &str) -> Option<CutMode> {
        match name {
            "lose" => Some(CutMode::Lose),
            "keep" => Some(CutMode::Keep),
            "random" => Some(CutMode::Random),
            "sectors" => Some(CutMode::Sectors),
            _ => None,
        }
    }
}

/// The action of a request-checked rule, as configured.
#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// `[inject-error]`: fail with `errno` (0: pass untouched and hide later rules).
    Error { errno: i32, immediately: bool },
    /// `[delay]`: wait `latency` ± `jitter` holding no worker, then go on (or fail).
    Delay {
        latency: Duration,
        jitter: Duration,
        errno: i32,
    },
    /// `[corrupt]`: damage the bytes read (image unchanged) or stored (client sees success).
    Corrupt {
        mode: CorruptMode,
        bits: u32,
        bytes: u64,
    },
    /// `[drop-write]`: report success, store nothing.
    DropWrite,
    /// `[torn-write]`: store part of the write.
    TornWrite {
        keep: Option<u64>,
        mode: TornMode,
        unit: u64,
        errno: i32,
    },
    /// `[short-io]`: transfer only the first `length` bytes and return that count.
    ShortIo { length: Option<u64> },
    /// `[misdirect-write]`: store the data `shift` bytes away from where it was aimed.
    MisdirectWrite { shift: i64 },
    /// `[suspend]`: park the request under `tag` until resumed.
    Suspend { tag: String },
}

impl Fault {
    /// The section name, which is also the action's name in logs, the trace and `stats`.
    pub fn section(&self) -> &'static str {
        match self {
            Fault::Error { .. } => "inject-error",
            Fault::Delay { .. } => "delay",
            Fault::Corrupt { .. } => "corrupt",
            Fault::DropWrite => "drop-write",
            Fault::TornWrite { .. } => "torn-write",
            Fault::ShortIo { .. } => "short-io",
            Fault::MisdirectWrite { .. } => "misdirect-write",
            Fault::Suspend { .. } => "suspend",
        }
    }
}

impl fmt::Display for Fault {
    /// The action's own keys, `key=value` separated by spaces (the section name apart).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Error { errno, .. } => write!(f, "errno={}", super::errno::describe(*errno)),
            Fault::Delay {
                latency,
                jitter,
                errno,
            } => {
                write!(f, "latency={}", duration_text(*latency))?;
                if !jitter.is_zero() {
                    write!(f, " jitter={}", duration_text(*jitter))?;
                }
                if *errno != 0 {
                    write!(f, " errno={}", super::errno::describe(*errno))?;
                }
                Ok(())
            }
            Fault::Corrupt { mode, bits, bytes } => match mode {
                CorruptMode::Flip => write!(f, "mode=flip bits={bits}"),
                m => write!(f, "mode={} bytes={bytes}", m.name()),
            },
            Fault::DropWrite => Ok(()),
            Fault::TornWrite {
                keep,
                mode,
                unit,
                errno,
            } => {
                write!(f, "mode={}", mode.name())?;
                match keep {
                    Some(k) => write!(f, " keep={k}")?,
                    None if *mode == TornMode::Prefix => f.write_str(" keep=random")?,
                    None => {}
                }
                write!(f, " unit={unit}")?;
                if *errno != 0 {
                    write!(f, " errno={}", super::errno::describe(*errno))?;
                }
                Ok(())
            }
            Fault::ShortIo { length } => match length {
                Some(l) => write!(f, "length={l}"),
                None => f.write_str("length=random"),
            },
            Fault::MisdirectWrite { shift } => write!(f, "shift={shift}"),
            Fault::Suspend { tag } => write!(f, "tag={tag}"),
        }
    }
}

/// One change to a buffer: image byte `offset` XORed with `xor` (flip) or set to `set`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edit {
    Xor { offset: u64, mask: u8 },
    Set { offset: u64, byte: u8 },
}

impl Edit {
    pub fn offset(&self) -> u64 {
        match *self {
            Edit::Xor { offset, .. } | Edit::Set { offset, .. } => offset,
        }
    }

    /// Applies the edits that fall inside `buf`, which holds image bytes from `base` on.
    pub fn apply_all(edits: &[Edit], buf: &mut [u8], base: u64) {
        for e in edits {
            let Some(at) = e.offset().checked_sub(base) else {
                continue;
            };
            let Some(b) = buf.get_mut(at as usize) else {
                continue;
            };
            match *e {
                Edit::Xor { mask, .. } => *b ^= mask,
                Edit::Set { byte, .. } => *b = byte,
            }
        }
    }
}

/// A fault made concrete for one request (see [`resolve`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    Fail {
        errno: i32,
    },
    /// Hold the request this long, then continue (or fail with `errno` when non-zero).
    Delay {
        wait: Duration,
        errno: i32,
    },
    /// Apply these edits to the bytes read or stored (image offsets).
    Corrupt {
        edits: Vec<Edit>,
    },
    DropWrite,
    /// Store only these image byte ranges of the write; then succeed or fail with `errno`.
    Torn {
        kept: Vec<(u64, u64)>,
        errno: i32,
    },
    /// Transfer only up to image byte `end` and return the count up to it.
    Short {
        end: u64,
    },
    /// Store the data `shift` bytes away (clamped into the image by the executor).
    Misdirect {
        shift: i64,
    },
    Suspend {
        tag: String,
    },
}

/// SplitMix64's finaliser: a bijection of `u64` that mixes every input bit into every output
/// bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Whether a rule with probability `p` acts on its `nth` match under `seed`: a pure function
/// of its arguments (see the module doc).
pub fn acts(seed: u64, rule: u32, nth: u64, p: f64) -> bool {
    if p <= 0.0 {
        return false;
    }
    if p >= 1.0 {
        return true;
    }
    let h = mix(mix(mix(seed) ^ u64::from(rule)) ^ nth);
    ((h >> 11) as f64 / (1u64 << 53) as f64) < p
}

/// A seeded, stateless stream of random numbers for one (seed, rule, match count).
pub struct Draw(ChaCha8Rng);

/// The word position of a match's stream: each match owns 2^32 words, far more than any
/// effect draws, so two matches of one rule never share a number.
const WORDS_PER_MATCH: u128 = 1 << 32;

impl Draw {
    /// The stream for the `nth` match of rule `rule` under `seed`. `purpose` separates the
    /// draws made for different questions (whether to act, and how) about one match.
    pub fn new(seed: u64, rule: u32, nth: u64, purpose: u8) -> Draw {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&seed.to_le_bytes());
        let mut rng = ChaCha8Rng::from_seed(key);
        rng.set_stream(u64::from(rule) << 8 | u64::from(purpose));
        rng.set_word_pos(u128::from(nth) * WORDS_PER_MATCH);
        Draw(rng)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in `[0, 1)` with 53 bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[0, n)` (`n > 0`), without modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        // Lemire's multiply-shift with rejection.
        loop {
            let x = self.next_u64();
            let m = u128::from(x) * u128::from(n);
            let low = m as u64;
            if low >= n || low >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }

    /// Whether an event of probability `p` happens.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// Makes `fault` concrete for a request at `[offset, offset+len)` (a flush has `len` 0), of
/// which the rule's range covers the byte ranges `covered` (the whole request when the rule
/// has no range). Pure: everything random comes from `draw`.
pub fn resolve(
    fault: &Fault,
    offset: u64,
    len: u64,
    covered: &[(u64, u64)],
    draw: &mut Draw,
) -> Effect {
    match fault {
        Fault::Error { errno, .. } => Effect::Fail { errno: *errno },
        Fault::Delay {
            latency,
            jitter,
            errno,
        } => {
            let wait = if jitter.is_zero() {
                *latency
            } else {
                // Uniform in latency ± jitter (microseconds), never below 0.
                let j = jitter.as_micros().min(u64::MAX as u128 / 4) as u64;
                let l = latency.as_micros().min(u64::MAX as u128 / 4) as u64;
                let us = (l + draw.below(2 * j + 1)).saturating_sub(j);
                Duration::from_micros(us)
            };
            Effect::Delay {
                wait,
                errno: *errno,
            }
        }
        Fault::Corrupt { mode, bits, bytes } => Effect::Corrupt {
            edits: corrupt_edits(*mode, *bits, *bytes, covered, draw),
        },
        Fault::DropWrite => Effect::DropWrite,
        Fault::TornWrite {
            keep,
            mode,
            unit,
            errno,
        } => {
            let kept = match mode {
                TornMode::Prefix => {
                    let n = match keep {
                        Some(k) => (*k).min(len),
                        // A random multiple of `unit` below the length.
                        None => match len.saturating_sub(1) / unit {
                            0 => 0,
                            units => draw.below(units + 1) * unit,
                        },
                    };
                    if n == 0 {
                        vec![]
                    } else {
                        vec![(offset, offset + n)]
                    }
                }
                TornMode::Sectors => {
                    let mut kept: Vec<(u64, u64)> = Vec::new();
                    let mut at = offset;
                    let end = offset + len;
                    while at < end {
                        // Units follow the image's own grid, as a disk's sectors do.
                        let next = ((at / unit) + 1).saturating_mul(*unit).min(end);
                        if draw.chance(0.5) {
                            match kept.last_mut() {
                                Some(last) if last.1 == at => last.1 = next,
                                _ => kept.push((at, next)),
                            }
                        }
                        at = next;
                    }
                    kept
                }
            };
            Effect::Torn {
                kept,
                errno: *errno,
            }
        }
        Fault::ShortIo { length } => {
            let n = match length {
                // A length at or past the request's moves all of it: nothing to shorten.
                Some(l) => (*l).min(len),
                // A random multiple of 512 below the length (at least one sector when the
                // request has more than one).
                None => match len.saturating_sub(1) / SECTOR {
                    0 => 0,
                    sectors => (1 + draw.below(sectors)) * SECTOR,
                },
            };
            Effect::Short { end: offset + n }
        }
        Fault::MisdirectWrite { shift } => Effect::Misdirect { shift: *shift },
        Fault::Suspend { tag } => Effect::Suspend { tag: tag.clone() },
    }
}

/// `k` distinct positions below `n` (`k` is clamped to `n`: asking for every position
/// gets every position), drawn from `draw` in time and memory linear in `k`.
///
/// Up to half of the positions, each is drawn uniformly and redrawn when already taken:
/// the draw sequence blkdebugfs always used, so a seed printed by an older version replays
/// the same positions; since at least half of the positions are free at every draw, it
/// takes fewer than `2k` draws on average. Beyond half, the positions *left out* are drawn
/// the same way (`n - k < k` of them) and the others taken: redrawing into a nearly full
/// set would take `n log n` draws (and the old `Vec::contains` check made each draw cost
/// `k`: minutes, or forever, under the engine's lock). Few positions are kept in a hash set;
/// many (at least one in 64) in a bitmap of `n` bits, which costs no more than `k` words.
pub fn distinct_below(k: u64, n: u64, draw: &mut Draw) -> Distinct {
    let k = k.min(n);
    if k.saturating_mul(64) <= n {
        let mut taken = std::collections::HashSet::with_capacity(k as usize);
        while (taken.len() as u64) < k {
            taken.insert(draw.below(n));
        }
        let mut picked: Vec<u64> = taken.into_iter().collect();
        picked.sort_unstable();
        return Distinct::Few(picked);
    }
    let words = n.div_ceil(64) as usize;
    let mut bits = vec![0u64; words];
    if k <= n / 2 {
        let mut set = 0;
        while set < k {
            let p = draw.below(n);
            let (w, b) = ((p / 64) as usize, p % 64);
            if bits[w] & (1 << b) == 0 {
                bits[w] |= 1 << b;
                set += 1;
            }
        }
    } else {
        bits.fill(u64::MAX);
        if !n.is_multiple_of(64) {
            bits[words - 1] = (1 << (n % 64)) - 1;
        }
        let mut cleared = 0;
        while cleared < n - k {
            let p = draw.below(n);
            let (w, b) = ((p / 64) as usize, p % 64);
            if bits[w] & (1 << b) != 0 {
                bits[w] &= !(1 << b);
                cleared += 1;
            }
        }
    }
    Distinct::Many(bits)
}

/// Distinct positions drawn by [`distinct_below`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Distinct {
    /// In increasing order.
    Few(Vec<u64>),
    /// Bit `p % 64` of word `p / 64` is set for each position `p`.
    Many(Vec<u64>),
}

impl Distinct {
    /// Calls `f` with each position, in increasing order.
    pub fn for_each(&self, mut f: impl FnMut(u64)) {
        match self {
            Distinct::Few(v) => v.iter().for_each(|p| f(*p)),
            Distinct::Many(bits) => {
                for (w, word) in bits.iter().enumerate() {
                    let mut word = *word;
                    while word != 0 {
                        f(w as u64 * 64 + u64::from(word.trailing_zeros()));
                        word &= word - 1;
                    }
                }
            }
        }
    }

    /// The positions, in increasing order.
    pub fn positions(&self) -> Vec<u64> {
        let mut v = Vec::new();
        self.for_each(|p| v.push(p));
        v
    }
}

/// Maps positions in the covered bytes taken in order (position 0 is the first covered byte)
/// to image offsets. Positions must come in increasing order: each call walks on from the
/// piece the last one was in, so mapping `k` positions costs `k` plus the number of pieces.
struct Covered<'a> {
    pieces: &'a [(u64, u64)],
    /// The piece the last position was in, and the position its first byte has.
    piece: usize,
    first: u64,
}

impl<'a> Covered<'a> {
    fn new(pieces: &'a [(u64, u64)]) -> Self {
        Covered {
            pieces,
            piece: 0,
            first: 0,
        }
    }

    fn offset(&mut self, i: u64) -> u64 {
        loop {
            let (s, e) = self.pieces[self.piece];
            if i < self.first + (e - s) {
                return s + (i - self.first);
            }
            self.first += e - s;
            self.piece += 1;
        }
    }
}

/// Picks the places `[corrupt]` damages, inside `covered` (image byte ranges), in time
/// linear in what it damages (at most the covered bytes: `bits` and `bytes` are clamped to
/// what the request holds).
fn corrupt_edits(
    mode: CorruptMode,
    bits: u32,
    bytes: u64,
    covered: &[(u64, u64)],
    draw: &mut Draw,
) -> Vec<Edit> {
    let total: u64 = covered.iter().map(|(s, e)| e - s).sum();
    if total == 0 {
        return Vec::new();
    }
    let mut at = Covered::new(covered);
    match mode {
        CorruptMode::Flip => {
            let picked = distinct_below(u64::from(bits), total.saturating_mul(8), draw);
            let mut edits: Vec<Edit> = Vec::new();
            picked.for_each(|bit| {
                let offset = at.offset(bit / 8);
                let mask = 1u8 << (bit % 8);
                match edits.last_mut() {
                    Some(Edit::Xor { offset: o, mask: m }) if *o == offset => *m |= mask,
                    _ => edits.push(Edit::Xor { offset, mask }),
                }
            });
            edits
        }
        CorruptMode::Zero | CorruptMode::Random => {
            let n = bytes.min(total);
            let start = draw.below(total - n + 1);
            (start..start + n)
                .map(|i| Edit::Set {
                    offset: at.offset(i),
                    byte: match mode {
                        CorruptMode::Zero => 0,
                        _ => draw.next_u64() as u8,
                    },
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(nth: u64) -> Draw {
        Draw::new(42, 1, nth, 0)
    }

    #[test]
    fn draws_depend_only_on_their_key() {
        let a: Vec<u64> = (0..4).map(|_| draw(7).next_u64()).collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]), "same key, same number");
        assert_ne!(draw(7).next_u64(), draw(8).next_u64());
        assert_ne!(draw(7).next_u64(), Draw::new(43, 1, 7, 0).next_u64());
        assert_ne!(draw(7).next_u64(), Draw::new(42, 2, 7, 0).next_u64());
        assert_ne!(draw(7).next_u64(), Draw::new(42, 1, 7, 1).next_u64());
        let mut d = draw(0);
        for _ in 0..1000 {
            assert!(d.below(10) < 10);
            let u = d.unit();
            assert!((0.0..1.0).contains(&u));
        }
    }

    #[test]
    fn acts_is_keyed_and_keeps_its_rate() {
        let rate = |seed: u64, rule: u32, p: f64| {
            (0..100_000u64).filter(|n| acts(seed, rule, *n, p)).count()
        };
        // Binomial(100000, p): the bands are more than 6 standard deviations wide.
        assert!(
            (4_870..=5_130).contains(&rate(1, 1, 0.05)),
            "{}",
            rate(1, 1, 0.05)
        );
        assert!((49_050..=50_950).contains(&rate(2, 7, 0.5)));
        assert_eq!(rate(1, 1, 0.0), 0);
        assert_eq!(rate(1, 1, 1.0), 100_000);
        let picks = |seed: u64, rule: u32| -> Vec<u64> {
            (0..1000u64).filter(|n| acts(seed, rule, *n, 0.1)).collect()
        };
        assert_eq!(picks(3, 1), picks(3, 1));
        assert_ne!(picks(3, 1), picks(4, 1));
        assert_ne!(picks(3, 1), picks(3, 2));
    }

    #[test]
    fn delay_jitter_stays_in_its_band_and_never_below_zero() {
        let f = Fault::Delay {
            latency: Duration::from_millis(1),
            jitter: Duration::from_millis(2),
            errno: 0,
        };
        for n in 0..500 {
            let Effect::Delay { wait, .. } = resolve(&f, 0, 512, &[(0, 512)], &mut draw(n)) else {
                panic!()
            };
            assert!(wait <= Duration::from_millis(3), "{wait:?}");
        }
    }

    #[test]
    fn flips_are_distinct_bits_inside_the_covered_part() {
        let f = Fault::Corrupt {
            mode: CorruptMode::Flip,
            bits: 8,
            bytes: 512,
        };
        for n in 0..200 {
            let Effect::Corrupt { edits } = resolve(&f, 0, 8192, &[(4096, 4608)], &mut draw(n))
            else {
                panic!()
            };
            let flipped: u32 = edits
                .iter()
                .map(|e| match e {
                    Edit::Xor { offset, mask } => {
                        assert!((4096..4608).contains(offset));
                        mask.count_ones()
                    }
                    Edit::Set { .. } => panic!("flip sets nothing"),
                })
                .sum();
            assert_eq!(flipped, 8);
        }
        // One byte covered: at most 8 bits can flip.
        let f = Fault::Corrupt {
            mode: CorruptMode::Flip,
            bits: 100,
            bytes: 0,
        };
        let Effect::Corrupt { edits } = resolve(&f, 0, 1, &[(0, 1)], &mut draw(0)) else {
            panic!()
        };
        assert_eq!(
            edits,
            vec![Edit::Xor {
                offset: 0,
                mask: 0xff
            }]
        );
    }

    #[test]
    fn distinct_positions_are_exact_distinct_sorted_and_keyed_by_the_seed() {
        for (k, n) in [
            (0, 10),
            (1, 1),
            (3, 10),
            (5, 10),
            (6, 10),
            (9, 10),
            (10, 10),
            (2, 1000),
            (700, 1000),
            (999, 1000),
        ] {
            for nth in 0..20 {
                let got = distinct_below(k, n, &mut draw(nth)).positions();
                assert_eq!(got.len() as u64, k, "k {k} of n {n}");
                assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
                assert!(got.iter().all(|p| *p < n), "{got:?}");
                let again = distinct_below(k, n, &mut draw(nth)).positions();
                assert_eq!(got, again, "same key, same draw");
            }
        }
        // More than there are: every position, once.
        assert_eq!(
            distinct_below(50, 4, &mut draw(0)).positions(),
            vec![0, 1, 2, 3]
        );
        // The seed decides: another match count or another seed draws another set.
        for k in [100, 10_000, 30_000] {
            let a = distinct_below(k, 32_768, &mut draw(1));
            assert_ne!(a, distinct_below(k, 32_768, &mut draw(2)));
            assert_ne!(a, distinct_below(k, 32_768, &mut Draw::new(43, 1, 1, 0)));
        }
        // Every bit of a 1 MiB request, and all but one: the draws near `n` end (a quadratic
        // or coupon-collector draw here took hours under the engine's lock).
        let n = 8 << 20;
        assert_eq!(
            distinct_below(n, n, &mut draw(3)).positions().len() as u64,
            n
        );
        let all_but_one = distinct_below(n - 1, n, &mut draw(3)).positions();
        assert_eq!(all_but_one.len() as u64, n - 1);
        assert!(all_but_one.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn small_draws_replay_the_positions_of_earlier_versions() {
        // The rejection draw with `Vec::contains` that blkdebugfs used before: a seed printed
        // then must replay the same bits now.
        let old = |k: u64, n: u64, d: &mut Draw| {
            let mut picked: Vec<u64> = Vec::new();
            while (picked.len() as u64) < k {
                let p = d.below(n);
                if !picked.contains(&p) {
                    picked.push(p);
                }
            }
            picked.sort_unstable();
            picked
        };
        for nth in 0..50 {
            // Few (a hash set) and many (a bitmap), up to half of the positions.
            for (k, n) in [(1, 4096), (8, 4096), (64, 4096), (100, 512), (256, 512)] {
                assert_eq!(
                    distinct_below(k, n, &mut draw(nth)).positions(),
                    old(k, n, &mut draw(nth))
                );
            }
        }
    }

    #[test]
    fn flips_across_many_pieces_land_in_them() {
        // Every other sector of 64 KiB: 64 pieces, every bit of them flipped.
        let covered: Vec<(u64, u64)> = (0..64).map(|i| (i * 1024, i * 1024 + 512)).collect();
        let f = Fault::Corrupt {
            mode: CorruptMode::Flip,
            bits: u32::MAX,
            bytes: 0,
        };
        let Effect::Corrupt { edits } = resolve(&f, 0, 65536, &covered, &mut draw(0)) else {
            panic!()
        };
        let want: Vec<Edit> = covered
            .iter()
            .flat_map(|(s, e)| *s..*e)
            .map(|offset| Edit::Xor { offset, mask: 0xff })
            .collect();
        assert_eq!(edits, want);
    }

    #[test]
    fn zero_mode_overwrites_a_run_across_covered_pieces() {
        let f = Fault::Corrupt {
            mode: CorruptMode::Zero,
            bits: 1,
            bytes: 600,
        };
        let covered = [(0, 512), (4096, 4608)];
        let Effect::Corrupt { edits } = resolve(&f, 0, 8192, &covered, &mut draw(3)) else {
            panic!()
        };
        assert_eq!(edits.len(), 600);
        let mut buf = vec![0xaau8; 8192];
        Edit::apply_all(&edits, &mut buf, 0);
        assert_eq!(buf.iter().filter(|b| **b == 0).count(), 600);
        assert!(buf[512..4096].iter().all(|b| *b == 0xaa), "outside stays");
    }

    #[test]
    fn torn_prefix_and_sectors() {
        let prefix = Fault::TornWrite {
            keep: Some(1000),
            mode: TornMode::Prefix,
            unit: 512,
            errno: 0,
        };
        assert_eq!(
            resolve(&prefix, 4096, 4096, &[], &mut draw(0)),
            Effect::Torn {
                kept: vec![(4096, 5096)],
                errno: 0
            }
        );
        let random = Fault::TornWrite {
            keep: None,
            mode: TornMode::Prefix,
            unit: 512,
            errno: 0,
        };
        for n in 0..100 {
            let Effect::Torn { kept, .. } = resolve(&random, 0, 4096, &[], &mut draw(n)) else {
                panic!()
            };
            if let Some(&(s, e)) = kept.first() {
                assert_eq!(s, 0);
                assert!(e < 4096 && e % 512 == 0, "{e}");
            }
        }
        let sectors = Fault::TornWrite {
            keep: None,
            mode: TornMode::Sectors,
            unit: 512,
            errno: 5,
        };
        let Effect::Torn { kept, errno } = resolve(&sectors, 256, 4096, &[], &mut draw(1)) else {
            panic!()
        };
        assert_eq!(errno, 5);
        for (s, e) in &kept {
            assert!(*s == 256 || s % 512 == 0);
            assert!(*e == 4352 || e % 512 == 0);
        }
    }

    #[test]
    fn short_is_below_the_length() {
        let f = Fault::ShortIo { length: None };
        for n in 0..100 {
            let Effect::Short { end } = resolve(&f, 8192, 4096, &[], &mut draw(n)) else {
                panic!()
            };
            let got = end - 8192;
            assert!((512..4096).contains(&got) && got % 512 == 0, "{got}");
        }
        let fixed = Fault::ShortIo { length: Some(100) };
        assert_eq!(
            resolve(&fixed, 0, 4096, &[], &mut draw(0)),
            Effect::Short { end: 100 }
        );
        assert_eq!(
            resolve(&fixed, 0, 50, &[], &mut draw(0)),
            Effect::Short { end: 50 }
        );
    }

    #[test]
    fn durations_print_in_their_unit() {
        assert_eq!(duration_text(Duration::from_millis(5)), "5ms");
        assert_eq!(duration_text(Duration::from_micros(250)), "250us");
        assert_eq!(duration_text(Duration::from_millis(1500)), "1500ms");
        assert_eq!(duration_text(Duration::from_secs(2)), "2s");
    }
}
