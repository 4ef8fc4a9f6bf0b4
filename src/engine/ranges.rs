//! Sets of 512-byte sectors as disjoint, merged inclusive intervals: the `sectors` key of a
//! rule (`"2048-2055, 10000"`) and, for the media model, the bad-sector set.
//!
//! Contract: a [`SectorSet`] never holds two touching or overlapping intervals, kept in
//! order in chunks of at most [`CHUNK_MAX`] intervals, 16 bytes each: a million scattered
//! bad sectors cost about 16 MB, not the ~100 bytes of an ordered-map node apiece. A lookup
//! is two binary searches (the chunk, then inside it): `O(log n)` in the number of
//! intervals, never in the number of sectors. An insert or removal moves at most one
//! chunk's worth of intervals (a few KiB) plus the chunk index, so healing a sector by a
//! write costs about the same with a million bad sectors as with ten. Byte ranges are
//! half-open `[start, end)`; sector `s` is bytes `[s*512, s*512+512)`.

use std::fmt;

/// Bytes per sector, as blkdebug and `badblocks -b 512` count them.
pub const SECTOR: u64 = 512;

/// The largest sector whose bytes are file offsets (`sector * 512` below 2^63).
pub const MAX_SECTOR: u64 = (i64::MAX as u64) / SECTOR;

/// The most intervals one chunk holds before it splits in two (16 KiB of intervals): large
/// enough that the chunk index stays small, small enough that an insert's move is cheap.
pub const CHUNK_MAX: usize = 1024;

/// The pieces of `[offset, offset+len)` cut at multiples of `unit`: what a disk writes
/// atomically, so what a power cut (per sector) or a torn crash state (per physical sector,
/// `explore --physical-sector`) keeps or loses whole. One function, so the two can never
/// disagree on where a write may tear.
pub fn atomic_units(offset: u64, len: u64, unit: u64) -> Vec<(u64, u64)> {
    let end = offset + len;
    let mut out = Vec::new();
    let mut at = offset;
    while at < end {
        let next = ((at / unit) + 1).saturating_mul(unit).min(end);
        out.push((at, next - at));
        at = next;
    }
    out
}

/// A set of sectors. See the module doc.
#[derive(Clone, Default)]
pub struct SectorSet {
    /// Inclusive `(first, last)` sector intervals in order, disjoint and never touching,
    /// split into non-empty chunks of at most [`CHUNK_MAX`].
    chunks: Vec<Vec<(u64, u64)>>,
}

/// Where an interval is: chunk and index in it. Canonical: `i` is inside its chunk, except
/// at the end of the set, which is `(last chunk, its length)` (`(0, 0)` when empty), so two
/// equal positions are equal pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pos {
    chunk: usize,
    i: usize,
}

impl PartialEq for SectorSet {
    fn eq(&self, other: &SectorSet) -> bool {
        self.iter().eq(other.iter())
    }
}

impl Eq for SectorSet {}

impl fmt::Debug for SectorSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SectorSet({self})")
    }
}

/// Why a range list did not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RangeError {
    /// Not `N` or `A-B` (the item is given).
    Syntax(String),
    /// `A-B` with `B < A`.
    Backwards(String),
    /// A sector past [`MAX_SECTOR`].
    TooLarge(String),
    /// Nothing at all.
    Empty,
}

impl fmt::Display for RangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RangeError::Syntax(item) => write!(
                f,
                "'{item}' is not a sector or a range (expected N or A-B, separated by ',' or '+')"
            ),
            RangeError::Backwards(item) => write!(f, "'{item}' ends before it starts"),
            RangeError::TooLarge(item) => write!(
                f,
                "'{item}' is past the last sector a request can reach ({MAX_SECTOR})"
            ),
            RangeError::Empty => f.write_str("no sectors given"),
        }
    }
}

impl SectorSet {
    pub fn new() -> SectorSet {
        SectorSet::default()
    }

    /// Parses `A-B, C, ...` (inclusive sectors; decimal, `0x` hex or leading-`0` octal).
    pub fn parse(text: &str) -> Result<SectorSet, RangeError> {
        let mut ranges = Vec::new();
        // `+` also separates, so that a list needs no comma on a command line, where the
        // comma separates keys (`sectors=0-7+2048-2055`).
        for item in text
            .split([',', '+'])
            .map(str::trim)
            .filter(|i| !i.is_empty())
        {
            ranges.push(parse_item(item)?);
        }
        let set = SectorSet::from_ranges(ranges);
        if set.is_empty() {
            return Err(RangeError::Empty);
        }
        Ok(set)
    }

    /// Parses one line of a `badblocks` list: a sector, `A-B`, blank or `#` comment.
    pub fn parse_line(line: &str) -> Result<Option<(u64, u64)>, RangeError> {
        let item = line.split('#').next().unwrap_or("").trim();
        if item.is_empty() {
            return Ok(None);
        }
        parse_item(item).map(Some)
    }

    /// The set of the inclusive `(first, last)` intervals `ranges`, in any order, overlapping
    /// or not: sorted and merged at once (`O(n log n)`), in full chunks with no spare
    /// capacity. The way to load a long list (a `badblocks` file): inserting one by one
    /// would leave the heap fragmented by chunk splits.
    pub fn from_ranges(mut ranges: Vec<(u64, u64)>) -> SectorSet {
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        let mut chunks = Vec::new();
        for (a, b) in ranges {
            debug_assert!(a <= b);
            match merged.last_mut() {
                Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                _ => {
                    if merged.len() == CHUNK_MAX {
                        chunks.push(std::mem::replace(
                            &mut merged,
                            Vec::with_capacity(CHUNK_MAX),
                        ));
                    }
                    merged.push((a, b));
                }
            }
        }
        if !merged.is_empty() {
            merged.shrink_to_fit();
            chunks.push(merged);
        }
        chunks.shrink_to_fit();
        SectorSet { chunks }
    }

    /// Adds every sector of `other` (one by one when it is short, else by a rebuild).
    pub fn extend(&mut self, other: &SectorSet) {
        if other.intervals() <= 64 {
            for (a, b) in other.iter() {
                self.insert(a, b);
            }
        } else {
            let all: Vec<(u64, u64)> = self.iter().chain(other.iter()).collect();
            *self = SectorSet::from_ranges(all);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Number of intervals.
    pub fn intervals(&self) -> usize {
        self.chunks.iter().map(Vec::len).sum()
    }

    /// Number of sectors (saturating).
    pub fn sectors(&self) -> u64 {
        self.iter()
            .fold(0u64, |n, (a, b)| n.saturating_add(b - a + 1))
    }

    /// The intervals, in order, as inclusive `(first, last)` sectors.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.chunks.iter().flatten().copied()
    }

    /// Bytes of memory the set holds (its intervals and chunk index).
    pub fn memory(&self) -> usize {
        self.chunks.capacity() * std::mem::size_of::<Vec<(u64, u64)>>()
            + self
                .chunks
                .iter()
                .map(|c| c.capacity() * std::mem::size_of::<(u64, u64)>())
                .sum::<usize>()
    }

    /// Adds sectors `first..=last`, merging with neighbours.
    pub fn insert(&mut self, first: u64, last: u64) {
        debug_assert!(first <= last);
        // Every interval that overlaps or touches `first..=last` merges with it: those
        // ending at or after `first - 1` and starting at or before `last + 1`.
        let lo = self.first_ending_at_or_after(first.saturating_sub(1));
        let hi = self.first_starting_after(last.saturating_add(1));
        let merged = if lo == hi {
            (first, last)
        } else {
            let a = self.at(lo);
            let b = self.at(self.before(hi));
            (first.min(a.0), last.max(b.1))
        };
        self.splice(lo, hi, &[merged]);
    }

    /// Removes sectors `first..=last`, splitting intervals as needed.
    pub fn remove(&mut self, first: u64, last: u64) {
        let lo = self.first_ending_at_or_after(first);
        let hi = self.first_starting_after(last);
        if lo == hi {
            return;
        }
        let (a, b) = (self.at(lo), self.at(self.before(hi)));
        let mut kept = Vec::with_capacity(2);
        if a.0 < first {
            kept.push((a.0, first - 1));
        }
        if b.1 > last {
            kept.push((last + 1, b.1));
        }
        self.splice(lo, hi, &kept);
    }

    /// Whether any sector of the set overlaps bytes `[offset, offset+len)`.
    pub fn overlaps(&self, offset: u64, len: u64) -> bool {
        self.first_overlap(offset, len).is_some()
    }

    /// The first interval (inclusive sectors) overlapping bytes `[offset, offset+len)`.
    pub fn first_overlap(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 {
            return None;
        }
        let first = offset / SECTOR;
        let last = (offset.saturating_add(len) - 1) / SECTOR;
        let iv = self.get(self.first_ending_at_or_after(first))?;
        (iv.0 <= last).then_some(iv)
    }

    /// The parts of bytes `[offset, offset+len)` inside the set, as byte ranges in order.
    pub fn covered(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if len == 0 {
            return out;
        }
        let end = offset.saturating_add(len);
        let first = offset / SECTOR;
        let last = (end - 1) / SECTOR;
        let mut pos = self.first_ending_at_or_after(first);
        while let Some((a, b)) = self.get(pos).filter(|iv| iv.0 <= last) {
            let s = a.saturating_mul(SECTOR).max(offset);
            let e = b.saturating_add(1).saturating_mul(SECTOR).min(end);
            if s < e {
                out.push((s, e));
            }
            pos = self.after(pos);
        }
        out
    }

    /// Whether sector `s` is in the set.
    pub fn contains(&self, s: u64) -> bool {
        self.get(self.first_ending_at_or_after(s))
            .is_some_and(|(a, _)| a <= s)
    }

    // ---- Positions (see [`Pos`]).

    fn end(&self) -> Pos {
        match self.chunks.len() {
            0 => Pos { chunk: 0, i: 0 },
            n => Pos {
                chunk: n - 1,
                i: self.chunks[n - 1].len(),
            },
        }
    }

    /// `(chunk, i)` made canonical: past the end of a chunk is the start of the next one.
    fn canonical(&self, chunk: usize, i: usize) -> Pos {
        if chunk >= self.chunks.len() {
            return self.end();
        }
        if i >= self.chunks[chunk].len() && chunk + 1 < self.chunks.len() {
            return Pos {
                chunk: chunk + 1,
                i: 0,
            };
        }
        Pos { chunk, i }
    }

    fn get(&self, pos: Pos) -> Option<(u64, u64)> {
        self.chunks.get(pos.chunk)?.get(pos.i).copied()
    }

    /// The interval at `pos`, which is not the end.
    fn at(&self, pos: Pos) -> (u64, u64) {
        self.chunks[pos.chunk][pos.i]
    }

    fn after(&self, pos: Pos) -> Pos {
        self.canonical(pos.chunk, pos.i + 1)
    }

    /// The position before `pos`, which is not the start.
    fn before(&self, pos: Pos) -> Pos {
        if pos.i > 0 {
            Pos {
                chunk: pos.chunk,
                i: pos.i - 1,
            }
        } else {
            let chunk = pos.chunk - 1;
            Pos {
                chunk,
                i: self.chunks[chunk].len() - 1,
            }
        }
    }

    /// The first interval whose last sector is `>= s` (the ends are in order too).
    fn first_ending_at_or_after(&self, s: u64) -> Pos {
        let chunk = self.chunks.partition_point(|c| c[c.len() - 1].1 < s);
        if chunk == self.chunks.len() {
            return self.end();
        }
        let i = self.chunks[chunk].partition_point(|iv| iv.1 < s);
        self.canonical(chunk, i)
    }

    /// The first interval whose first sector is `> s`.
    fn first_starting_after(&self, s: u64) -> Pos {
        let chunk = self.chunks.partition_point(|c| c[0].0 <= s);
        if chunk == 0 {
            return self.canonical(0, 0);
        }
        let i = self.chunks[chunk - 1].partition_point(|iv| iv.0 <= s);
        self.canonical(chunk - 1, i)
    }

    /// Replaces the intervals in `[lo, hi)` by `with` (in order, fitting between their
    /// neighbours), then keeps the chunks non-empty and at most [`CHUNK_MAX`] long.
    fn splice(&mut self, lo: Pos, hi: Pos, with: &[(u64, u64)]) {
        if self.chunks.is_empty() {
            if !with.is_empty() {
                self.chunks.push(with.to_vec());
            }
            return;
        }
        if lo.chunk == hi.chunk {
            self.chunks[lo.chunk].splice(lo.i..hi.i, with.iter().copied());
        } else {
            self.chunks[hi.chunk].drain(..hi.i);
            let head = &mut self.chunks[lo.chunk];
            head.truncate(lo.i);
            head.extend_from_slice(with);
            self.chunks.drain(lo.chunk + 1..hi.chunk);
        }
        // Only the chunk at `lo` and the one after it can have emptied or grown.
        for c in [lo.chunk + 1, lo.chunk] {
            if self.chunks.get(c).is_some_and(Vec::is_empty) {
                self.chunks.remove(c);
            }
        }
        if let Some(chunk) = self.chunks.get_mut(lo.chunk)
            && chunk.len() > CHUNK_MAX
        {
            // The left half sized exactly, the right one with room to grow: appends in
            // order (a badblocks list) leave full chunks with no spare capacity.
            let half = chunk.len() / 2;
            let mut right = Vec::with_capacity(CHUNK_MAX + 1);
            right.extend_from_slice(&chunk[half..]);
            chunk.truncate(half);
            chunk.shrink_to_fit();
            self.chunks.insert(lo.chunk + 1, right);
        }
    }
}

fn parse_item(item: &str) -> Result<(u64, u64), RangeError> {
    let num = |t: &str| {
        let n = super::units::parse_number(t).ok_or_else(|| RangeError::Syntax(item.into()))?;
        if n > MAX_SECTOR {
            return Err(RangeError::TooLarge(item.into()));
        }
        Ok(n)
    };
    let (first, last) = match item.split_once('-') {
        Some((a, b)) => (num(a)?, num(b)?),
        None => {
            let n = num(item)?;
            (n, n)
        }
    };
    if last < first {
        return Err(RangeError::Backwards(item.into()));
    }
    Ok((first, last))
}

impl fmt::Display for SectorSet {
    /// `2048-2055,10000`: parses back to the same set.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (a, b)) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if a == b {
                write!(f, "{a}")?;
            } else {
                write!(f, "{a}-{b}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(text: &str) -> SectorSet {
        SectorSet::parse(text).unwrap()
    }

    #[test]
    fn parses_merges_and_prints_back() {
        let s = set("10, 2048-2055, 2056, 0x10 , 9");
        assert_eq!(s.to_string(), "9-10,16,2048-2056");
        assert_eq!(s.sectors(), 2 + 1 + 9);
        assert_eq!(SectorSet::parse(&s.to_string()).unwrap(), s);
        assert_eq!(SectorSet::parse(""), Err(RangeError::Empty));
        assert_eq!(
            SectorSet::parse("5-3"),
            Err(RangeError::Backwards("5-3".into()))
        );
        assert_eq!(SectorSet::parse("x"), Err(RangeError::Syntax("x".into())));
        assert!(matches!(
            SectorSet::parse("99999999999999999999"),
            Err(RangeError::Syntax(_))
        ));
        assert_eq!(
            SectorSet::parse(&format!("{}", MAX_SECTOR + 1)),
            Err(RangeError::TooLarge((MAX_SECTOR + 1).to_string()))
        );
    }

    #[test]
    fn overlap_and_cover_in_bytes() {
        let s = set("8, 16-17");
        assert!(!s.overlaps(0, 4096));
        assert!(s.overlaps(4095, 2));
        assert!(s.overlaps(4096 + 511, 1));
        assert!(!s.overlaps(4096 + 512, 4096 - 512));
        assert_eq!(s.covered(0, 20 * 512), vec![(4096, 4608), (8192, 9216)]);
        assert_eq!(s.covered(8500, 100), vec![(8500, 8600)]);
        assert_eq!(s.first_overlap(8500, 100), Some((16, 17)));
        assert!(s.covered(0, 0).is_empty());
    }

    #[test]
    fn remove_splits_and_insert_merges() {
        let mut s = set("0-99");
        s.remove(10, 19);
        assert_eq!(s.to_string(), "0-9,20-99");
        s.remove(0, 0);
        s.remove(99, 200);
        assert_eq!(s.to_string(), "1-9,20-98");
        s.insert(10, 19);
        assert_eq!(s.to_string(), "1-98");
        assert!(s.contains(1) && s.contains(98) && !s.contains(0) && !s.contains(99));
        s.remove(0, u64::MAX - 1);
        assert!(s.is_empty());
    }

    #[test]
    fn a_million_scattered_sectors_stay_logarithmic() {
        let mut s = SectorSet::new();
        for i in 0..1_000_000u64 {
            s.insert(i * 2, i * 2);
        }
        assert_eq!(s.intervals(), 1_000_000);
        assert!(s.overlaps(2 * 500_000 * 512, 512));
        assert!(!s.overlaps((2 * 500_000 + 1) * 512, 512));
    }

    /// Checks the representation's invariants: chunks non-empty and at most `CHUNK_MAX`,
    /// intervals in order, disjoint and never touching.
    fn check_invariants(s: &SectorSet) {
        assert!(
            s.chunks
                .iter()
                .all(|c| !c.is_empty() && c.len() <= CHUNK_MAX)
        );
        let all: Vec<(u64, u64)> = s.iter().collect();
        for w in all.windows(2) {
            assert!(w[0].0 <= w[0].1 && w[0].1 + 1 < w[1].0, "{w:?}");
        }
    }

    /// Random inserts and removals over many chunks, against a bitmap of the sectors.
    #[test]
    fn inserts_and_removals_match_a_bitmap_across_chunks() {
        const N: usize = 40_000;
        let mut model = vec![false; N];
        let mut s = SectorSet::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..30_000 {
            let first = next() % N as u64;
            let last = (first + next() % 6).min(N as u64 - 1);
            // Mostly inserts early (to grow past many chunks), mixed later.
            let insert = next() % 10 < if round < 15_000 { 8 } else { 4 };
            for b in &mut model[first as usize..=last as usize] {
                *b = insert;
            }
            if insert {
                s.insert(first, last);
            } else {
                s.remove(first, last);
            }
            if round % 1000 == 0 {
                check_invariants(&s);
            }
        }
        check_invariants(&s);
        assert!(s.chunks.len() > 3, "the test must span chunks");
        let mut want = SectorSet::new();
        for (i, _) in model.iter().enumerate().filter(|(_, b)| **b) {
            want.insert(i as u64, i as u64);
        }
        assert_eq!(s, want);
        for (sector, bad) in model.iter().enumerate() {
            assert_eq!(s.contains(sector as u64), *bad, "sector {sector}");
            let at = sector as u64 * SECTOR;
            assert_eq!(s.overlaps(at, SECTOR), *bad);
        }
        // first_overlap and covered over ranges that span chunks.
        for _ in 0..2_000 {
            let first = next() % N as u64;
            let len = 1 + next() % 3000;
            let got = s.covered(first * SECTOR, len * SECTOR);
            let mut expect: Vec<(u64, u64)> = Vec::new();
            for sec in first..(first + len).min(N as u64) {
                if model[sec as usize] {
                    match expect.last_mut() {
                        Some(l) if l.1 == sec * SECTOR => l.1 += SECTOR,
                        _ => expect.push((sec * SECTOR, (sec + 1) * SECTOR)),
                    }
                }
            }
            assert_eq!(got, expect);
            assert_eq!(
                s.first_overlap(first * SECTOR, len * SECTOR).is_some(),
                !expect.is_empty()
            );
        }
        // Removing everything empties it.
        s.remove(0, u64::MAX);
        assert!(s.is_empty() && s.chunks.is_empty());
    }

    #[test]
    fn from_ranges_sorts_merges_and_equals_inserting() {
        let ranges = vec![
            (10, 12),
            (0, 3),
            (4, 4),
            (11, 20),
            (30, 30),
            (22, 25),
            (21, 21),
        ];
        let mut by_insert = SectorSet::new();
        for (a, b) in &ranges {
            by_insert.insert(*a, *b);
        }
        let built = SectorSet::from_ranges(ranges);
        assert_eq!(built.to_string(), "0-4,10-25,30");
        assert_eq!(built, by_insert);
        let many: Vec<(u64, u64)> = (0..5000u64).rev().map(|i| (i * 2, i * 2)).collect();
        let mut big = SectorSet::from_ranges(many);
        check_invariants(&big);
        assert_eq!(big.intervals(), 5000);
        big.extend(&SectorSet::from_ranges(
            (0..5000u64).map(|i| (i * 2 + 1, i * 2 + 1)).collect(),
        ));
        assert_eq!(big.to_string(), "0-9999");
        big.extend(&set("20000, 30000-30001"));
        assert_eq!(big.to_string(), "0-9999,20000,30000-30001");
    }

    /// Issue 15 §4: a million scattered sectors in 16 bytes each (plus chunk slack), and a
    /// badblocks-style load in order leaves no spare capacity to speak of.
    #[test]
    fn a_million_scattered_sectors_cost_about_16_bytes_each() {
        let mut inserted = SectorSet::new();
        for i in 0..1_000_000u64 {
            inserted.insert(i * 3, i * 3);
        }
        let built = SectorSet::from_ranges((0..1_000_000u64).map(|i| (i * 3, i * 3)).collect());
        assert_eq!(inserted, built);
        for (how, s) in [("inserted in order", &inserted), ("built", &built)] {
            let bytes = s.memory();
            assert!(
                bytes < 17_000_000,
                "{how}: {bytes} bytes for a million intervals (16 MB of intervals)"
            );
        }
    }

    #[test]
    fn badblocks_lines() {
        assert_eq!(SectorSet::parse_line("  # x"), Ok(None));
        assert_eq!(SectorSet::parse_line("12 # bad"), Ok(Some((12, 12))));
        assert_eq!(SectorSet::parse_line("3-4"), Ok(Some((3, 4))));
        assert!(SectorSet::parse_line("3 4").is_err());
    }
}
