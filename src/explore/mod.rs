//! `blkdebugfs explore` (`spec/explore.md`): record one run of a workload through the view,
//! then check every crash state a disk with a volatile write cache could have left at each
//! moment of it.
//!
//! Three separate parts, as CrashMonkey keeps them:
//! - **Recording** (`media/record.rs` writes it, the write cache orders it;
//!   `recording.rs` reads it into epochs and marks).
//! - **Enumeration** (`enumerate.rs`: which candidates an epoch has, a pure seeded function
//!   of its shape; `states.rs`: the ordered, deduplicated list of states to check, a function
//!   of the recording, the seed and the options alone, so shards and replays agree).
//! - **Checking** (`overlay.rs`: a state's bytes as layers over the base image;
//!   `serve.rs`: states served as files by a FUSE filesystem of their own, with a
//!   copy-on-write layer for the check's writes; `run.rs`: the run, the loop devices and
//!   mounts, the checks, the report).
//!
//! May import: `engine/` (sectors), `media/` (the recording format, image helpers) and, in
//! `run.rs` only, the crate's [`Builder`](crate::Builder) to mount the view it records.
//! Nothing imports `explore/` but `main.rs` and the crate root, so it is the top of the
//! house, beside the front ends.

pub mod enumerate;
pub mod overlay;
pub mod recording;
pub mod run;
pub mod serve;
pub mod states;

pub use run::{ExploreError, ExploreOptions, FsSpec, Outcome, run};
