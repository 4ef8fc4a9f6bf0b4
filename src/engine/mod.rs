//! The engine: what a rule is, the one decision function, the faults a rule can decide and
//! their seeded draws, sector ranges, errno names and units. The vocabulary every other part
//! of blkdebugfs speaks.
//!
//! Contract: pure. No I/O, no locks, no clocks, no threads; the same rules, seed and
//! requests give the same decisions. The caller (`mount/`) holds the [`Engine`] under its own
//! mutex for one `fire` or `decide` call at a time.
//!
//! May import: nothing of the crate outside `engine/` (std and the random-number crates
//! only). Everything else may import the engine.
//!
//! - `events.rs`: the 48 QEMU events and the iotypes (one name table for parser and logs)
//! - `rules.rs`: a rule (when, which requests, what) and what a decision hands back
//! - `decide.rs`: [`Engine`], its index by event and range, and the decision function
//! - `faults.rs`: what a request-checked rule does ([`faults::Fault`] -> [`faults::Effect`]),
//!   how a power cut resolves the cache ([`faults::CutMode`]), and the seeded draws
//! - `ranges.rs`: sector sets (`sectors = 0-7,100`) and a disk's atomic units
//! - `settle.rs`: what a crash leaves of cached writes (power cuts and `explore` share it)
//! - `errno.rs`: errno names and descriptions
//! - `units.rs`: QEMU numbers, sizes and durations

mod decide;
pub mod errno;
mod events;
pub mod faults;
pub mod ranges;
pub mod rules;
pub mod settle;
pub mod units;

pub use decide::Engine;
pub use events::{Event, IoType, IoTypes};
pub use rules::*;
