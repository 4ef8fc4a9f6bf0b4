//! What the introspection commands show (`list`, `rules`, `stats`, `status`), as text or,
//! with `json`, as one JSON object.

use std::fmt::Write as _;

use serde_json::{Value, json};

use super::{Control, CtlError};
use crate::engine::Action;
use crate::mount::op_range;

impl Control {
    pub(super) fn list(&self) -> String {
        let mut out = String::new();
        let parked = self.mount.parked();
        if parked.is_empty() {
            out.push_str("no suspended requests\n");
        }
        for p in parked {
            let _ = writeln!(
                out,
                "suspended {}: tag {} {} {} at {} for {:.3}s",
                p.id,
                p.tags.join(","),
                p.cause,
                p.op.name(),
                op_range(&p.op),
                p.suspended_for.as_secs_f64()
            );
        }
        for r in self.mount.rules() {
            if let Action::Suspend { tag } = &r.rule.action {
                let event = r.rule.event.map_or("-", |e| e.name());
                let _ = writeln!(out, "breakpoint {}: {event} tag {tag}", r.id);
            }
        }
        let (delayed, _) = self.mount.parked_counts();
        if delayed > 0 {
            let _ = writeln!(out, "{delayed} delayed request(s)");
        }
        let waiters = self.mount.waiters();
        if waiters > 0 {
            let _ = writeln!(out, "{waiters} wait_break waiter(s)");
        }
        out.trim_end().to_string()
    }

    pub(super) fn rules(&self) -> String {
        let mut out = String::new();
        for r in self.mount.rules() {
            let _ = write!(out, "rule {}: {} hits={}", r.id, r.rule, r.stats.hits);
            if let Action::Request { matches, .. } = &r.rule.action {
                let counted = matches.counting != Default::default();
                if counted {
                    let _ = write!(out, " matched={}", r.stats.matched);
                }
                if r.rule.event.is_some() {
                    let _ = write!(out, " armed={}", r.stats.armed);
                    if r.armed_now {
                        out.push_str(" (armed now)");
                    }
                }
            }
            out.push('\n');
        }
        if out.is_empty() {
            out.push_str("no rules");
        }
        out.trim_end().to_string()
    }

    /// What a fresh read of the control file shows.
    pub fn status(&self) -> String {
        let log = if crate::control::logring::recent(0).is_some() {
            "log: 'log [N]' shows the last lines\n"
        } else {
            ""
        };
        format!(
            "state {}\n{}\n{}\nseed {}\n{log}",
            self.mount.state(),
            self.rules(),
            self.list(),
            self.mount.seed()
        )
    }

    /// `CMD` or `CMD json`: the text form or the JSON form (one line).
    pub(super) fn maybe_json(
        &self,
        args: &[&str],
        text: fn(&Control) -> String,
        json: fn(&Control) -> Value,
    ) -> Result<String, CtlError> {
        match args.first() {
            None => Ok(text(self)),
            Some(&"json") => Ok(json(self).to_string()),
            Some(other) => Err(CtlError::invalid(format!(
                "unknown form '{other}' (the only one is 'json')"
            ))),
        }
    }

    pub(super) fn rules_json(&self) -> Value {
        let rules: Vec<Value> = self
            .mount
            .rules()
            .into_iter()
            .map(|r| {
                json!({
                    "id": r.id.0,
                    "section": r.rule.section(),
                    "event": r.rule.event.map(|e| e.name()),
                    "state": r.rule.state,
                    "rule": r.rule.to_string(),
                    "origin": r.rule.origin.to_string(),
                    "hits": r.stats.hits,
                    "matched": r.stats.matched,
                    "armed": r.stats.armed,
                    "armed_now": r.armed_now,
                })
            })
            .collect();
        Value::Array(rules)
    }

    pub(super) fn stats(&self) -> String {
        let snap = self.mount.stats();
        let (delayed, suspended) = self.mount.parked_counts();
        let mut out = format!("seed {}\nstate {}\n", self.mount.seed(), self.mount.state());
        for (op, requests, bytes) in &snap.ops {
            let _ = writeln!(out, "{op}: {requests} request(s), {bytes} bytes");
        }
        let faults: Vec<String> = snap
            .faults
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(a, n)| format!("{a} {n}"))
            .collect();
        let faults = if faults.is_empty() {
            "none".to_string()
        } else {
            faults.join(", ")
        };
        let _ = writeln!(out, "faults: {faults}");
        let _ = writeln!(out, "delayed now {delayed}, suspended now {suspended}");
        match self.mount.unsynced() {
            Some(u) => {
                let _ = writeln!(out, "unsynced: {} write(s), {} bytes", u.writes, u.bytes);
            }
            None => out.push_str("unsynced: no write cache\n"),
        }
        let _ = write!(out, "power {}", self.mount.power_state());
        out
    }

    pub(super) fn stats_json(&self) -> Value {
        let snap = self.mount.stats();
        let (delayed, suspended) = self.mount.parked_counts();
        let ops: serde_json::Map<String, Value> = snap
            .ops
            .iter()
            .map(|(op, requests, bytes)| {
                (
                    op.to_string(),
                    json!({"requests": requests, "bytes": bytes}),
                )
            })
            .collect();
        let faults: serde_json::Map<String, Value> = snap
            .faults
            .iter()
            .map(|(a, n)| (a.to_string(), Value::from(*n)))
            .collect();
        json!({
            "seed": self.mount.seed(),
            "state": self.mount.state(),
            "ops": ops,
            "faults": faults,
            "delayed_now": delayed,
            "suspended_now": suspended,
            "unsynced_writes": self.mount.unsynced().map(|u| u.writes),
            "unsynced_bytes": self.mount.unsynced().map(|u| u.bytes),
            "power": self.mount.power_state(),
            "bad_sectors": self.mount.bad_list().0.sectors(),
        })
    }

    pub(super) fn status_json(&self) -> Value {
        let suspended: Vec<Value> = self
            .mount
            .parked()
            .into_iter()
            .map(|p| {
                let (offset, len) = p.op.range();
                json!({
                    "id": p.id,
                    "tags": p.tags,
                    "cause": p.cause,
                    "op": p.op.name(),
                    "offset": offset,
                    "len": len,
                    "suspended_for": p.suspended_for.as_secs_f64(),
                })
            })
            .collect();
        let (delayed, _) = self.mount.parked_counts();
        json!({
            "state": self.mount.state(),
            "seed": self.mount.seed(),
            "rules": self.rules_json(),
            "suspended": suspended,
            "delayed_now": delayed,
            "waiters": self.mount.waiters(),
        })
    }
}
