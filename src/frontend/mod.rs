//! Front ends: the FUSE adapter and the mount-table watch.

pub(crate) mod fuse;
pub(crate) mod mounttable;
