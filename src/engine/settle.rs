//! What a crash leaves of the writes a disk's volatile cache held: one rule, shared by the
//! power cut (`media/cache.rs`, `spec/faults.md` §5) and crash-state exploration
//! (`explore/overlay.rs`, `spec/explore.md` §2), so the two can never disagree.
//!
//! The writes are given in completion order, each cut into the disk's atomic units
//! ([`atomic_units`] of `unit` bytes: a 512-byte sector, or a physical sector). A unit either
//! reached the disk or did not. A block (the `unit` bytes an atomic unit lies in) ends as
//! the content the newest write that reached it left there (the cache's copy of the block as
//! that write completed: older writes' bytes in the same block included, since a disk writes
//! whole blocks), or, when none reached it, as it was durable: an older write is never
//! applied over a newer one that reached the disk.
//!
//! [`settle`] walks the writes newest first and, within a write, its units in order; it asks
//! `reached` about every unit in exactly that order (a caller that draws its answers from a
//! seeded generator, as the power cut does, replays the same draws), and tells `visible`
//! about every unit whose block no newer reached write decided: a reached unit is where the
//! block ends as this write left it; a unit that did not reach the disk is where its bytes
//! must go back to what they were before this write (an older write may then decide the
//! block).

use super::ranges::{SectorSet, atomic_units};

/// Walks `writes` (`(offset, len)` in completion order) newest first; see the module doc.
/// `reached(write, unit, offset, len)` answers for each atomic unit of `unit` bytes;
/// `visible(write, offset, len, reached)` gets each unit whose block no newer reached write
/// decided, in the same order.
pub fn settle(
    writes: &[(u64, u64)],
    unit: u64,
    mut reached: impl FnMut(usize, usize, u64, u64) -> bool,
    mut visible: impl FnMut(usize, u64, u64, bool),
) {
    // Blocks a newer write that reached the disk decided: no older write changes them.
    let mut settled = SectorSet::new();
    for (i, &(offset, len)) in writes.iter().enumerate().rev() {
        for (u, (s, l)) in atomic_units(offset, len, unit).into_iter().enumerate() {
            let r = reached(i, u, s, l);
            // A unit lies in one block: units are cut at the blocks' boundaries.
            let block = s / unit;
            if !settled.contains(block) {
                visible(i, s, l, r);
            }
            if r {
                settled.insert(block, block);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ranges::SECTOR;

    fn size_of(writes: &[(u64, u64)], unit: u64) -> u64 {
        writes
            .iter()
            .map(|(o, l)| o + l)
            .max()
            .unwrap_or(0)
            .div_ceil(unit)
            * unit
    }

    /// Applies the rule byte by byte, the slow way: each block as the newest reached write
    /// with a unit in it left it (all writes up to that one applied in order), else
    /// untouched (0).
    fn model(writes: &[(u64, u64)], unit: u64, reached: &dyn Fn(usize, usize) -> bool) -> Vec<u8> {
        let size = size_of(writes, unit);
        let mut out = vec![0u8; size as usize];
        for block in 0..size / unit {
            let (a, b) = (block * unit, (block + 1) * unit);
            let newest = (0..writes.len()).rev().find(|&i| {
                let (o, l) = writes[i];
                atomic_units(o, l, unit)
                    .iter()
                    .enumerate()
                    .any(|(u, &(s, n))| reached(i, u) && s < b && a < s + n)
            });
            if let Some(k) = newest {
                for (i, &(o, l)) in writes.iter().enumerate().take(k + 1) {
                    for x in o.max(a)..(o + l).min(b) {
                        out[x as usize] = i as u8 + 1;
                    }
                }
            }
        }
        out
    }

    /// The same as the power cut does it: the image holds the newest bytes (every write
    /// applied); a unit that did not reach the disk goes back to what was there before its
    /// write, newest write first.
    fn through_settle(
        writes: &[(u64, u64)],
        unit: u64,
        reached: &dyn Fn(usize, usize) -> bool,
    ) -> Vec<u8> {
        let size = size_of(writes, unit);
        // The content after each write, to restore "before write i" from.
        let mut snapshots = vec![vec![0u8; size as usize]];
        for (i, &(o, l)) in writes.iter().enumerate() {
            let mut next = snapshots.last().unwrap().clone();
            next[o as usize..(o + l) as usize].fill(i as u8 + 1);
            snapshots.push(next);
        }
        let mut image = snapshots.last().unwrap().clone();
        settle(
            writes,
            unit,
            |i, u, _, _| reached(i, u),
            |i, at, n, r| {
                if !r {
                    let (a, b) = (at as usize, (at + n) as usize);
                    image[a..b].copy_from_slice(&snapshots[i][a..b]);
                }
            },
        );
        image
    }

    #[test]
    fn a_block_ends_as_the_newest_write_that_reached_it_left_it() {
        // Overlapping, unaligned and aligned writes; every reached pattern, at sector and
        // at 1 KiB units (where two writes to the two sectors of one block land together).
        let writes = [(0, 1024), (100, 300), (512, 1024), (1000, 48), (1536, 512)];
        for unit in [SECTOR, 1024] {
            let units: Vec<usize> = writes
                .iter()
                .map(|&(o, l)| atomic_units(o, l, unit).len())
                .collect();
            let total: usize = units.iter().sum();
            for mask in 0u32..1 << total {
                let reached = |i: usize, u: usize| {
                    let bit = units[..i].iter().sum::<usize>() + u;
                    mask >> bit & 1 == 1
                };
                assert!(
                    through_settle(&writes, unit, &reached) == model(&writes, unit, &reached),
                    "unit {unit}, reached mask {mask:b}"
                );
            }
        }
    }

    #[test]
    fn a_write_to_one_sector_of_a_physical_block_carries_the_other() {
        // 4 KiB physical sectors: the second write alone reaching the disk writes the
        // whole block, the first write's sector included.
        let mut visible = Vec::new();
        settle(
            &[(0, 512), (512, 512)],
            4096,
            |i, _, _, _| i == 1,
            |i, at, n, r| visible.push((i, at, n, r)),
        );
        assert_eq!(visible, vec![(1, 512, 512, true)]);
    }

    #[test]
    fn reached_is_asked_newest_write_first_units_in_order() {
        let mut asked = Vec::new();
        settle(
            &[(0, 1024), (4096, 512)],
            SECTOR,
            |i, u, _, _| {
                asked.push((i, u));
                false
            },
            |_, _, _, _| {},
        );
        assert_eq!(asked, vec![(1, 0), (0, 0), (0, 1)]);
    }
}
