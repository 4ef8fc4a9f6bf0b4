//! What the control table calls: rules and state, breakpoints and parked requests, the
//! write cache and the power, bad sectors. Each method takes the engine's lock at most once
//! and never across I/O; a resumed request continues on the caller's thread
//! (`executor.rs`).

use std::time::Duration;

use log::{info, warn};
use serde_json::Value;

use super::parking::{ParkedInfo, Resumed, WaiterDone, WaiterId};
use super::stats::Snapshot;
use super::{Mount, RuleStatus};
use crate::engine::faults::CutMode;
use crate::engine::ranges::SectorSet;
use crate::engine::{Event, Placement, Rule, RuleId};
use crate::fields;
use crate::media::{BadSettings, CutReport, Unsynced};

impl Mount {
    // ---- Rules and state. Each takes the engine lock once.

    /// The seed of every random choice (`--seed`).
    pub fn seed(&self) -> u64 {
        self.engine.lock().seed()
    }

    /// The counters of `stats`.
    pub fn stats(&self) -> Snapshot {
        self.stats.snapshot()
    }

    /// Requests delayed and suspended now.
    pub fn parked_counts(&self) -> (usize, usize) {
        (
            self.breakpoints.delayed_count(),
            self.breakpoints.suspended_count(),
        )
    }

    /// Writes what the trace has queued and closes it (shutdown).
    pub fn finish_trace(&self) {
        if let Some(trace) = &self.trace {
            trace.finish();
        }
    }

    pub fn add_rule(&self, rule: Rule) -> RuleId {
        self.engine.lock().add(rule)
    }

    /// Adds a rule at `at` in the order of checks; `Err(n)`: no rule `n`.
    pub fn add_rule_placed(&self, rule: Rule, at: Placement) -> Result<RuleId, RuleId> {
        self.engine.lock().add_placed(rule, at)
    }

    pub fn remove_rule(&self, id: RuleId) -> Option<Rule> {
        self.engine.lock().remove(id)
    }

    /// Deletes every rule and breakpoint; state back to 1 (numbers keep counting).
    pub fn clear_rules(&self) {
        self.engine.lock().clear();
    }

    /// Replaces the inject-error and set-state rules (`reload`); breakpoints stay.
    pub fn replace_rules(&self, rules: Vec<Rule>) {
        self.engine.lock().replace_rules(rules);
    }

    pub fn state(&self) -> i64 {
        self.engine.lock().state()
    }

    pub fn set_state(&self, state: i64) {
        self.engine.lock().set_state(state);
    }

    /// Every live rule and breakpoint in written order, with its counters.
    pub fn rules(&self) -> Vec<RuleStatus> {
        let engine = self.engine.lock();
        engine
            .rules()
            .map(|(id, rule, stats)| RuleStatus {
                id,
                rule: rule.clone(),
                stats,
                armed_now: engine.is_armed(id),
            })
            .collect()
    }

    /// Fires an event outside any request (the `none` event at mount start).
    pub fn fire(&self, event: Event) {
        let fired = self.fire_logged(event, None);
        if !fired.suspend.is_empty() {
            warn!("breakpoint on '{event}' hit outside a request: nothing to suspend");
        }
    }

    // ---- Breakpoints and parked requests.

    /// The suspended requests, oldest first.
    pub fn parked(&self) -> Vec<ParkedInfo> {
        self.breakpoints.list()
    }

    /// `wait_break`: completes `done` once a request is suspended under `tag`. The id
    /// returned while it waits cancels it ([`Self::cancel_wait`]).
    pub fn wait_for_break(
        &self,
        tag: &str,
        timeout: Option<Duration>,
        done: WaiterDone,
    ) -> Option<WaiterId> {
        self.breakpoints.wait_for(tag, timeout, done)
    }

    /// Forgets a `wait_break` whose client went away.
    pub fn cancel_wait(&self, id: WaiterId) {
        self.breakpoints.cancel_waiter(id);
    }

    /// How many `wait_break` waiters wait (for tests and `status`).
    pub fn waiters(&self) -> usize {
        self.breakpoints.waiter_count()
    }

    /// Resumes the newest request suspended under `tag`; `false` if there is none.
    pub fn resume(&self, tag: &str) -> bool {
        match self.breakpoints.resume(tag) {
            Resumed::NotFound => false,
            Resumed::Released(next) => {
                if let Some(p) = next {
                    self.drive(p);
                }
                true
            }
        }
    }

    /// Resumes every suspended request (newest first); returns how many continued.
    pub fn resume_all(&self) -> usize {
        let all = self.breakpoints.take_all();
        let n = all.len();
        for p in all {
            self.drive(p);
        }
        n
    }

    /// QEMU's `remove_break`: deletes the un-hit breakpoints with `tag` and resumes every
    /// request suspended under it. Returns how many breakpoints were deleted.
    pub fn remove_break(&self, tag: &str) -> usize {
        let deleted = self.engine.lock().remove_breakpoints(tag);
        while self.resume(tag) {}
        deleted
    }

    /// Shutdown: nothing parks any more, every parked request continues, waiters fail.
    pub fn release_everything(&self) {
        self.breakpoints.close();
        let n = self.resume_all();
        if n > 0 {
            info!("released {n} suspended request(s) for shutdown");
        }
        self.log_pending();
        self.breakpoints.cancel_waiters();
    }

    // ---- The write cache and the power.

    /// Whether the mount models a write cache (`--write-cache`).
    pub fn has_write_cache(&self) -> bool {
        self.cache.is_some()
    }

    /// The unsynced writes (`None` without `--write-cache`).
    pub fn unsynced(&self) -> Option<Unsynced> {
        self.cache.as_ref().map(|c| c.unsynced())
    }

    /// Cuts the power (§5): resolves the unsynced writes by `mode`, with `seed` or the
    /// mount's; `rule` names the `[power-cut]` rule that did it. `Err` without
    /// `--write-cache`.
    pub fn power_cut(
        &self,
        mode: CutMode,
        seed: Option<u64>,
        rule: Option<RuleId>,
    ) -> Result<CutReport, String> {
        let Some(cache) = &self.cache else {
            return Err("no write cache to lose: mount with --write-cache to cut the power".into());
        };
        let seed = seed.unwrap_or_else(|| self.seed());
        let report = cache
            .cut(&self.image, mode, seed)
            .map_err(|e| format!("the power cut failed on {}: {e}", self.image_path.display()))?;
        let by = rule.map_or(String::new(), |r| format!(" by rule {r}"));
        info!(
            "{}{by}; the device is off until power-on",
            report.summary(10)
        );
        if let Some(trace) = &self.trace {
            let ranges = |v: &[(u64, u64)]| -> Vec<Value> {
                v.iter().map(|(o, l)| Value::from(vec![*o, *l])).collect()
            };
            let torn: Vec<Value> = report
                .torn
                .iter()
                .map(|(o, l, k)| Value::from(vec![*o, *l, *k]))
                .collect();
            trace.record(fields! {
                "action" => "power-cut",
                "mode" => mode.name(),
                "seed" => seed,
                "rule" => rule.map(|r| r.0),
                "lost" => ranges(&report.lost),
                "kept" => ranges(&report.kept),
                "torn" => torn,
            });
        }
        Ok(report)
    }

    /// Turns the device back on; `Err` without `--write-cache`. `Ok(false)` when it was on.
    pub fn power_on(&self) -> Result<bool, String> {
        let Some(cache) = &self.cache else {
            return Err("the power is always on without --write-cache".into());
        };
        let was_off = cache.power_on();
        if was_off {
            info!(
                "power on: serving {} as the cut left it",
                self.image_path.display()
            );
            if let Some(trace) = &self.trace {
                trace.record(fields! {"action" => "power-on"});
            }
        }
        Ok(was_off)
    }

    // ---- Recording (`--record`, `explore`).

    /// Records a mark: data the application has acknowledged (`ctl MNT mark LABEL`).
    pub fn mark(&self, label: &str) -> Result<(), String> {
        match &self.cache {
            Some(cache) => cache.mark(label),
            None => Err("not recording (mount with --record DIR)".into()),
        }
    }

    /// Starts a recording armed to start later: a flush, after which what is on the image
    /// is the base (`explore`, after its setup).
    pub fn record_start(&self) -> Result<(), String> {
        let Some((cache, rec)) = self
            .cache
            .as_ref()
            .and_then(|c| c.recorder().map(|r| (c, r)))
        else {
            return Err("not recording (mount with --record DIR)".into());
        };
        let failed = |e: std::io::Error| format!("the flush that starts the recording failed: {e}");
        let ticket = cache.begin_flush(cache.cycle()).map_err(failed)?;
        // This flush, and no older one that happens to end after it, is the start.
        rec.arm_start(ticket.covers())?;
        self.image.sync_data().map_err(failed)?;
        cache.end_flush(ticket).map_err(failed)
    }

    /// Stops the recording (`ctl MNT record stop`); `Ok(false)` when it had stopped.
    pub fn record_stop(&self) -> Result<bool, String> {
        let Some(cache) = &self.cache else {
            return Err("not recording (mount with --record DIR)".into());
        };
        let stopped = cache
            .stop_recording()
            .map_err(|e| format!("cannot stop the recording: {e}"))?;
        if stopped {
            info!("recording stopped");
        }
        Ok(stopped)
    }

    /// `recording to DIR: N writes, N flushes, N marks (stopped)`, or `None`.
    pub fn record_status(&self) -> Option<String> {
        let rec = self.cache.as_ref()?.recorder()?;
        let (writes, flushes, marks) = rec.counts();
        Some(format!(
            "recording to {}: {writes} writes, {flushes} flushes, {marks} marks{}",
            rec.dir().display(),
            if rec.recording() { "" } else { " (stopped)" }
        ))
    }

    /// Ends the recording for good: stops it and writes its `recording.json`. Called once,
    /// when the mount ends (no write runs any more).
    pub fn finish_recording(&self) -> Result<(), String> {
        let Some(rec) = self.cache.as_ref().and_then(|c| c.recorder()) else {
            return Ok(());
        };
        self.record_stop()?;
        rec.finish(&self.image, &self.image_path, self.size())
            .map_err(|e| {
                format!(
                    "cannot finish the recording in {}: {e}",
                    rec.dir().display()
                )
            })
    }

    /// The power state as `stats` shows it.
    pub fn power_state(&self) -> &'static str {
        match &self.cache {
            None => "on (no --write-cache)",
            Some(c) if c.is_off() => "off",
            Some(_) => "on",
        }
    }

    // ---- Bad sectors.

    pub fn bad_add(&self, set: &SectorSet) {
        self.bad.add(set);
    }

    pub fn bad_remove(&self, set: &SectorSet) {
        self.bad.remove(set);
    }

    pub fn bad_clear(&self) {
        self.bad.clear();
    }

    pub fn bad_list(&self) -> (SectorSet, BadSettings) {
        (self.bad.snapshot(), self.bad.settings())
    }
}
