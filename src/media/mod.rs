//! The media model between the executor and the image file (`spec/faults.md` §4 and §5):
//! the image file itself (size and zeroing of block devices, QEMU's image locks, format
//! sniffing, read buffers and mapped read windows), bad sectors, and the volatile write
//! cache that a power cut resolves.
//!
//! Contract: the media owns the bytes' fate (what is durable, what is unsynced, which
//! sectors are bad); it decides nothing about rules. Each type states its own lock rule;
//! none of them takes the engine's lock or calls back into the mount.
//!
//! May import: `engine/` (its vocabulary: [`CutMode`], seeded draws, sector sets). Nothing
//! else of the crate.
//!
//! - `bad.rs`: bad sectors
//! - `cache.rs`: the write cache, its undo journal and power cuts
//! - `device.rs`: block devices as the image
//! - `lock.rs`: QEMU's image locks
//! - `imagefmt.rs`: format sniffing
//! - `buffers.rs`: read buffers and mapped read windows
//! - `record.rs`: recordings (`--record`, `explore`): the write cache's journal kept whole

mod bad;
pub(crate) mod buffers;
mod cache;
pub(crate) mod device;
pub(crate) mod imagefmt;
pub(crate) mod lock;
pub mod record;

/// The vocabulary of power cuts, defined by the engine (re-exported here, where the cache
/// applies it).
pub use crate::engine::faults::CutMode;
pub use bad::{BadSectors, BadSettings, WriteCheck};
pub use cache::{CutReport, FlushTicket, PowerCycle, Unsynced, WriteCache, is_power_lost};
pub(crate) use cache::{data_extents as cache_data_extents, read_full};
