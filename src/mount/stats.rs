//! Counters for `ctl stats`: requests and bytes per operation, faults per action.
//!
//! Contract: counting is a relaxed atomic add on the request path (no lock); a snapshot reads
//! each counter once, so a snapshot taken under load is consistent per counter, not across
//! counters.

use std::sync::atomic::{AtomicU64, Ordering};

/// The operations counted, as `stats` names them.
pub const OPS: [&str; 5] = ["read", "write", "write-zeroes", "flush", "lseek"];

/// The actions counted, as `stats` and the trace name them (a rule's section, `break` for
/// QEMU breakpoints, `bad-sector` for the media).
pub const ACTIONS: [&str; 10] = [
    "inject-error",
    "delay",
    "corrupt",
    "drop-write",
    "torn-write",
    "short-io",
    "misdirect-write",
    "suspend",
    "break",
    "bad-sector",
];

/// See the module doc.
#[derive(Default)]
pub struct Stats {
    requests: [AtomicU64; OPS.len()],
    bytes: [AtomicU64; OPS.len()],
    faults: [AtomicU64; ACTIONS.len()],
}

/// A copy of the counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// (operation, requests, bytes), in [`OPS`] order.
    pub ops: Vec<(&'static str, u64, u64)>,
    /// (action, requests acted on), in [`ACTIONS`] order.
    pub faults: Vec<(&'static str, u64)>,
}

impl Stats {
    /// Counts one request of operation `op` (a name of [`OPS`]) moving `bytes`.
    pub fn request(&self, op: &str, bytes: u64) {
        if let Some(i) = OPS.iter().position(|o| *o == op) {
            self.requests[i].fetch_add(1, Ordering::Relaxed);
            self.bytes[i].fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Counts one request acted on by `action` (a name of [`ACTIONS`]).
    pub fn fault(&self, action: &str) {
        if let Some(i) = ACTIONS.iter().position(|a| *a == action) {
            self.faults[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            ops: OPS
                .iter()
                .enumerate()
                .map(|(i, op)| (*op, load(&self.requests[i]), load(&self.bytes[i])))
                .collect(),
            faults: ACTIONS
                .iter()
                .enumerate()
                .map(|(i, a)| (*a, load(&self.faults[i])))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_name_and_ignores_unknown_names() {
        let s = Stats::default();
        s.request("read", 4096);
        s.request("read", 512);
        s.request("nonsense", 1);
        s.fault("delay");
        s.fault("nonsense");
        let snap = s.snapshot();
        assert_eq!(snap.ops[0], ("read", 2, 4608));
        assert_eq!(snap.ops[1], ("write", 0, 0));
        assert_eq!(snap.faults[1], ("delay", 1));
        assert_eq!(snap.faults.iter().map(|f| f.1).sum::<u64>(), 1);
    }
}
