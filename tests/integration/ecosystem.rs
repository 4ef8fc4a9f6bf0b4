//! The QEMU and Linux tool ecosystem (issue 11): image locking, block devices, completions and
//! the man page, the library for Rust tests.

#[allow(unused_imports)]
use crate::util::*;
