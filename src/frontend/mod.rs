//! Front ends: the protocols a client reaches the mount through: FUSE (`fuse.rs`, the
//! adapter, and `mounttable.rs`, the mount table and the watch that ends the daemon when its
//! mount goes) and NBD (`nbd/`, a server on unix and TCP sockets). Both can serve one `Mount`
//! at once.
//!
//! Contract: a front end translates its protocol's requests into [`Mount`](crate::mount::Mount)
//! verbs and their outcomes into replies, and nothing else: no rule logic, no size or
//! growth policy, no syscall on the image. Every request gets exactly one reply.
//!
//! May import: `mount/` (the `Mount` type and its verbs) and `control/` (the command table,
//! for a control node only). Not `engine/`, `media/` or `config/`, nor the crate root: the
//! [`Shutdown`] flag the daemon stops by lives here, and the root re-exports it.

pub(crate) mod fuse;
pub(crate) mod mounttable;
pub(crate) mod nbd;

use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

/// A one-way "stop now" flag that threads can wait on. Cloning shares it.
#[derive(Clone, Default)]
pub struct Shutdown(Arc<(Mutex<bool>, Condvar)>);

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    pub fn trigger(&self) {
        *self.0.0.lock() = true;
        self.0.1.notify_all();
    }

    pub fn is_triggered(&self) -> bool {
        *self.0.0.lock()
    }

    pub fn wait(&self) {
        let mut stop = self.0.0.lock();
        while !*stop {
            self.0.1.wait(&mut stop);
        }
    }
}
