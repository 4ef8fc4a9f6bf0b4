//! Front ends: the protocols a client reaches the mount through. Today FUSE (`fuse.rs`, the
//! adapter, and `mounttable.rs`, the mount table and the watch that ends the daemon when its
//! mount goes); NBD lands here next (`nbd/`).
//!
//! Contract: a front end translates its protocol's requests into [`Mount`](crate::mount::Mount)
//! verbs and their outcomes into replies, and nothing else: no rule logic, no size or
//! growth policy, no syscall on the image. Every request gets exactly one reply.
//!
//! May import: `mount/` (the `Mount` type and its verbs) and `control/` (the command table,
//! for a control node only). Not `engine/`, `media/` or `config/`.

pub(crate) mod fuse;
pub(crate) mod mounttable;
