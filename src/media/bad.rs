//! Bad sectors (`spec/faults.md` §4).
//!
//! An interval set of sectors ([`SectorSet`]): a read that covers one fails as a whole; a
//! write that covers a whole bad sector heals it (`heal-on-write`), one that covers only part
//! of one fails as a disk's read-modify-write would, and with `write-errno` every write to a
//! bad sector fails and heals nothing. Cost outside the set: one ordered-map lookup.

use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::RwLock;

use crate::engine::ranges::{SECTOR, SectorSet};

/// The bad-sector settings of `[bad-sectors]` (one set of settings for the whole set).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadSettings {
    /// What a read of a bad sector gets.
    pub errno: i32,
    /// A write covering a whole bad sector stores it and clears it.
    pub heal_on_write: bool,
    /// Non-zero: writes to a bad sector fail with this and heal nothing.
    pub write_errno: i32,
}

impl Default for BadSettings {
    fn default() -> Self {
        BadSettings {
            errno: libc::EIO,
            heal_on_write: true,
            write_errno: 0,
        }
    }
}

/// The bad sectors: see the module doc.
#[derive(Default)]
pub struct BadSectors {
    set: RwLock<SectorSet>,
    settings: RwLock<BadSettings>,
    /// Whether the set may hold sectors: a mount without bad sectors pays one atomic load per
    /// request, no lock. Set before sectors are added, cleared after the set is emptied.
    any: AtomicBool,
}

/// What a write may do to the bad sectors it covers.
#[derive(Debug, PartialEq, Eq)]
pub enum WriteCheck {
    /// No bad sector: write.
    Clean,
    /// Write, then heal these sectors (inclusive ranges).
    Heal(Vec<(u64, u64)>),
    /// Write, and the sectors stay bad (heal-on-write off).
    StaysBad,
    /// Fail with this errno, naming the first bad sector.
    Fail(i32, u64),
}

impl BadSectors {
    pub fn new(set: SectorSet, settings: BadSettings) -> BadSectors {
        BadSectors {
            any: AtomicBool::new(!set.is_empty()),
            set: RwLock::new(set),
            settings: RwLock::new(settings),
        }
    }

    /// The errno and first bad sector of a read of `[offset, offset+len)`, if it covers one.
    pub fn check_read(&self, offset: u64, len: u64) -> Option<(i32, u64)> {
        if !self.any.load(Ordering::Acquire) {
            return None;
        }
        let set = self.set.read();
        if set.is_empty() {
            return None;
        }
        let (first, _) = set.first_overlap(offset, len)?;
        let sector = first.max(offset / SECTOR);
        Some((self.settings.read().errno, sector))
    }

    /// What a write of `[offset, offset+len)` may do.
    pub fn check_write(&self, offset: u64, len: u64) -> WriteCheck {
        if !self.any.load(Ordering::Acquire) {
            return WriteCheck::Clean;
        }
        let set = self.set.read();
        if set.is_empty() || len == 0 || !set.overlaps(offset, len) {
            return WriteCheck::Clean;
        }
        let settings = self.settings.read();
        let end = offset + len;
        let covered = set.covered(offset, len);
        let first_bad = covered[0].0 / SECTOR;
        if settings.write_errno != 0 {
            return WriteCheck::Fail(settings.write_errno, first_bad);
        }
        // A bad sector only partly written needs the disk to read it first: that fails.
        for (s, e) in &covered {
            let partial_head = s % SECTOR != 0 && *s == offset;
            let partial_tail = e % SECTOR != 0 && *e == end;
            if partial_head || partial_tail {
                let sector = if partial_head { s / SECTOR } else { e / SECTOR };
                return WriteCheck::Fail(settings.errno, sector);
            }
        }
        if !settings.heal_on_write {
            return WriteCheck::StaysBad;
        }
        WriteCheck::Heal(
            covered
                .iter()
                .map(|(s, e)| (s / SECTOR, (e - 1) / SECTOR))
                .collect(),
        )
    }

    /// Heals sectors a write stored.
    pub fn heal(&self, ranges: &[(u64, u64)]) {
        let mut set = self.set.write();
        for (a, b) in ranges {
            set.remove(*a, *b);
        }
    }

    pub fn add(&self, ranges: &SectorSet) {
        self.any.store(true, Ordering::Release);
        self.set.write().extend(ranges);
    }

    pub fn remove(&self, ranges: &SectorSet) {
        let mut set = self.set.write();
        for (a, b) in ranges.iter() {
            set.remove(a, b);
        }
    }

    pub fn clear(&self) {
        *self.set.write() = SectorSet::new();
        self.any.store(false, Ordering::Release);
    }

    /// A copy of the set (for `bad list`).
    pub fn snapshot(&self) -> SectorSet {
        self.set.read().clone()
    }

    pub fn settings(&self) -> BadSettings {
        self.settings.read().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_sectors_fail_reads_heal_on_whole_writes_and_refuse_partial_ones() {
        let bad = BadSectors::new(SectorSet::parse("8-9, 20").unwrap(), BadSettings::default());
        assert_eq!(bad.check_read(0, 4096), None);
        assert_eq!(bad.check_read(0, 4097), Some((libc::EIO, 8)));
        assert_eq!(bad.check_read(9 * 512 + 10, 1), Some((libc::EIO, 9)));
        assert_eq!(
            bad.check_write(8 * 512 + 100, 512),
            WriteCheck::Fail(libc::EIO, 8)
        );
        assert_eq!(
            bad.check_write(8 * 512, 512),
            WriteCheck::Heal(vec![(8, 8)])
        );
        bad.heal(&[(8, 8)]);
        assert_eq!(bad.snapshot().to_string(), "9,20");
        let strict = BadSectors::new(
            SectorSet::parse("3").unwrap(),
            BadSettings {
                errno: libc::ENODATA,
                heal_on_write: true,
                write_errno: libc::EROFS,
            },
        );
        assert_eq!(
            strict.check_write(0, 4096),
            WriteCheck::Fail(libc::EROFS, 3)
        );
        assert_eq!(strict.check_read(0, 4096), Some((libc::ENODATA, 3)));
    }
}
