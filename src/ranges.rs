//! Sets of 512-byte sectors as disjoint, merged inclusive intervals: the `sectors` key of a
//! rule (`"2048-2055, 10000"`) and, for the media model, the bad-sector set.
//!
//! Contract: a [`SectorSet`] never holds two touching or overlapping intervals, so a lookup is
//! one ordered-map search (`O(log n)` in the number of intervals, never in the number of
//! sectors): a million bad sectors in a few ranges cost a few map entries, and a million
//! scattered ones a million entries but still a logarithmic lookup. Byte ranges are
//! half-open `[start, end)`; sector `s` is bytes `[s*512, s*512+512)`.

use std::collections::BTreeMap;
use std::fmt;

/// Bytes per sector, as blkdebug and `badblocks -b 512` count them.
pub const SECTOR: u64 = 512;

/// The largest sector whose bytes are file offsets (`sector * 512` below 2^63).
pub const MAX_SECTOR: u64 = (i64::MAX as u64) / SECTOR;

/// A set of sectors. See the module doc.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SectorSet {
    /// start sector -> last sector (inclusive); disjoint and never touching.
    spans: BTreeMap<u64, u64>,
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
        let mut set = SectorSet::new();
        // `+` also separates, so that a list needs no comma on a command line, where the
        // comma separates keys (`sectors=0-7+2048-2055`).
        for item in text
            .split([',', '+'])
            .map(str::trim)
            .filter(|i| !i.is_empty())
        {
            let (first, last) = parse_item(item)?;
            set.insert(first, last);
        }
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

    pub fn is_empty(&self) -> bool {
        self.spans.is_empty()
    }

    /// Number of intervals.
    pub fn intervals(&self) -> usize {
        self.spans.len()
    }

    /// Number of sectors (saturating).
    pub fn sectors(&self) -> u64 {
        self.spans
            .iter()
            .fold(0u64, |n, (a, b)| n.saturating_add(b - a + 1))
    }

    /// The intervals, in order, as inclusive `(first, last)` sectors.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.spans.iter().map(|(a, b)| (*a, *b))
    }

    /// Adds sectors `first..=last`, merging with neighbours.
    pub fn insert(&mut self, first: u64, last: u64) {
        debug_assert!(first <= last);
        let (mut first, mut last) = (first, last);
        // An interval starting at or before `first` that reaches it (or touches it).
        if let Some((&a, &b)) = self.spans.range(..=first).next_back()
            && b.saturating_add(1) >= first
        {
            first = a;
            last = last.max(b);
            self.spans.remove(&a);
        }
        // Intervals starting inside (or touching the end of) the new one.
        let upto = last.saturating_add(1);
        let inside: Vec<(u64, u64)> = self
            .spans
            .range(first..=upto)
            .map(|(a, b)| (*a, *b))
            .collect();
        for (a, b) in inside {
            last = last.max(b);
            self.spans.remove(&a);
        }
        self.spans.insert(first, last);
    }

    /// Removes sectors `first..=last`, splitting intervals as needed.
    pub fn remove(&mut self, first: u64, last: u64) {
        let mut touched: Vec<(u64, u64)> = Vec::new();
        if let Some((&a, &b)) = self.spans.range(..first).next_back()
            && b >= first
        {
            touched.push((a, b));
        }
        touched.extend(self.spans.range(first..=last).map(|(a, b)| (*a, *b)));
        for (a, b) in touched {
            self.spans.remove(&a);
            if a < first {
                self.spans.insert(a, first - 1);
            }
            if b > last {
                self.spans.insert(last + 1, b);
            }
        }
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
        if let Some((&a, &b)) = self.spans.range(..=first).next_back()
            && b >= first
        {
            return Some((a, b));
        }
        self.spans.range(first..=last).next().map(|(a, b)| (*a, *b))
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
        let before = self
            .spans
            .range(..first)
            .next_back()
            .filter(|(_, b)| **b >= first);
        for (&a, &b) in before.into_iter().chain(self.spans.range(first..=last)) {
            let s = a.saturating_mul(SECTOR).max(offset);
            let e = b.saturating_add(1).saturating_mul(SECTOR).min(end);
            if s < e {
                out.push((s, e));
            }
        }
        out
    }

    /// Whether sector `s` is in the set.
    pub fn contains(&self, s: u64) -> bool {
        self.spans
            .range(..=s)
            .next_back()
            .is_some_and(|(_, b)| *b >= s)
    }
}

fn parse_item(item: &str) -> Result<(u64, u64), RangeError> {
    let num = |t: &str| {
        let n = crate::config::parse_number(t).map_err(|_| RangeError::Syntax(item.into()))?;
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

    #[test]
    fn badblocks_lines() {
        assert_eq!(SectorSet::parse_line("  # x"), Ok(None));
        assert_eq!(SectorSet::parse_line("12 # bad"), Ok(Some((12, 12))));
        assert_eq!(SectorSet::parse_line("3-4"), Ok(Some((3, 4))));
        assert!(SectorSet::parse_line("3 4").is_err());
    }
}
