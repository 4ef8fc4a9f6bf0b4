//! The executor: walks a request's plan (`plan.rs`) against the mount. Events go to the
//! engine, checks to a decision (drawn after the engine's lock is released), I/O to the
//! media; a breakpoint, `[suspend]` rule or delay parks the request (`parking.rs`) and the
//! worker returns at once. See the module doc of `mount/` for the lock rule and what a
//! check's decision applies to.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::{debug, warn};
use serde_json::Value;

use super::logging::{LogKey, errno_field, request_fields, sent_field};
use super::plan::{Op, Step, plan};
use super::{Caller, Finish, Mount, Outcome};
use crate::engine::errno;
use crate::engine::faults::{Edit, Effect};
use crate::engine::{Decision, Event, Fired, IoType, Plan, RuleId, Verdict};
use crate::media::buffers::{MAPPED_READ_MIN, ReadBuf};
use crate::media::record::Content;
use crate::media::{PowerCycle, WriteCheck, read_full};

/// A request in flight: its plan, where it is in it, and everything it owns.
pub struct Pending<'a> {
    pub(super) op: Op,
    /// The request's id and sender, for the trace and logs.
    pub(super) id: u64,
    pub(super) caller: Caller,
    pub(super) steps: Vec<Step>,
    pub(super) pc: usize,
    pub(super) failed: Option<i32>,
    /// Generations captured by the flush gates, recorded if the flush succeeds.
    pub(super) raw_gen: Option<u64>,
    pub(super) node_gen: Option<u64>,
    pub(super) read_buf: ReadBuf,
    /// Borrowed from the FUSE worker's buffer until the request parks.
    pub(super) write_data: Cow<'a, [u8]>,
    /// What the last check decided for the I/O steps after it (corrupt, drop, tear,
    /// misdirect); cleared at the next check.
    pub(super) effect: Option<Effect>,
    /// A short transfer stops at this image offset.
    pub(super) short_end: Option<u64>,
    /// The events fired, for `--trace-all` (empty otherwise).
    pub(super) events: Vec<Event>,
    /// The power cycle the request began in (with `--write-cache`): the media fails its
    /// writes and flushes if a cut comes before they reach it.
    pub(super) power: Option<PowerCycle>,
    /// A `[suspend]` rule that acted after a delay: park under its tag once the wait is over.
    pub(super) suspend_after_delay: Option<(String, RuleId)>,
    pub(super) done: Finish,
}

impl Pending<'_> {
    /// Takes ownership of the write payload so the request can outlive the worker's buffer.
    pub(super) fn into_owned(self) -> Pending<'static> {
        Pending {
            op: self.op,
            id: self.id,
            caller: self.caller,
            steps: self.steps,
            pc: self.pc,
            failed: self.failed,
            raw_gen: self.raw_gen,
            node_gen: self.node_gen,
            read_buf: self.read_buf,
            write_data: Cow::Owned(self.write_data.into_owned()),
            effect: self.effect,
            short_end: self.short_end,
            events: self.events,
            power: self.power,
            suspend_after_delay: self.suspend_after_delay,
            done: self.done,
        }
    }
}

pub(super) enum Advance {
    Finished(Result<(), i32>),
    /// Park under `tags` (a breakpoint's event, or a `[suspend]` rule: `cause` says which).
    Parked {
        tags: Vec<String>,
        cause: String,
    },
    /// Hold for this long (a `[delay]` rule), then go on.
    Delayed(Duration),
}

impl Advance {
    /// Parked by the `[suspend]` rule `rule` under `tag`.
    pub(super) fn suspended(tag: String, rule: RuleId) -> Advance {
        Advance::Parked {
            tags: vec![tag],
            cause: format!("rule {rule}"),
        }
    }
}

/// What a check decided, for the executor.
pub(super) enum Checked {
    Pass,
    Fail(i32),
    /// Wait this long, then apply `then` (a delay with `errno` is followed by `Fail`; a
    /// delay composes with the first later rule that acted: faults §1). `then` is never a
    /// `Delay`.
    Delay {
        wait: Duration,
        then: Box<Checked>,
    },
    Suspend {
        tag: String,
        rule: RuleId,
    },
    /// Applies to the I/O steps up to the next check.
    Effect(Effect),
}

impl Mount {
    /// Starts one client operation: walks its plan until it finishes (and `done` replies) or
    /// a breakpoint or delay parks it. Either way the calling worker returns at once: a
    /// parked request owns its buffer and reply, and continues on whichever thread resumes
    /// it.
    pub(super) fn submit(&self, caller: Caller, op: Op, write_data: &[u8], done: Finish) {
        let bytes = match op {
            Op::BlockStatus { .. } => 0,
            op => op.range().1,
        };
        self.stats.request(op.kind(), bytes);
        // Read before the power check: a cut that starts in between is then seen by both.
        let power = self.cache.as_ref().map(|c| c.cycle());
        if self.powered_off() {
            // While off, every request fails and fires nothing.
            return done(Err(libc::EIO));
        }
        let pending = Pending {
            op,
            id: self.next_request.fetch_add(1, Ordering::Relaxed),
            caller,
            steps: plan(op, self.limits),
            pc: 0,
            failed: None,
            raw_gen: None,
            node_gen: None,
            // Allocated at the first read step, so a request parked before it holds none.
            read_buf: ReadBuf::pooled(0),
            write_data: Cow::Borrowed(write_data),
            effect: None,
            short_end: None,
            events: Vec::new(),
            power,
            suspend_after_delay: None,
            done,
        };
        self.drive(pending);
    }

    /// Walks `p` on from its current step; parks it when a breakpoint, `[suspend]` rule or
    /// delay says so.
    pub(super) fn drive(&self, mut p: Pending<'_>) {
        match self.advance(&mut p) {
            Advance::Finished(result) => {
                if result.is_ok() {
                    // A successful flush of each node records the generation it saw.
                    if let Some(g) = p.raw_gen {
                        self.raw_node.record_flushed(g);
                    }
                    if let Some(g) = p.node_gen {
                        self.blkdebug_node.record_flushed(g);
                    }
                }
                if let Some(trace) = self.trace.as_ref().filter(|t| t.all()) {
                    let mut f = request_fields(&p);
                    let events: Vec<Value> = p.events.iter().map(|e| e.name().into()).collect();
                    f.insert("events".into(), Value::Array(events));
                    f.insert("result".into(), errno_field(result.err()));
                    sent_field(&mut f, &p, result.err());
                    if let Some(end) = p.short_end {
                        f.insert("transferred".into(), transferred(&p.op, end).into());
                    }
                    trace.record(f);
                }
                let Pending {
                    mut read_buf,
                    short_end,
                    op,
                    done,
                    ..
                } = p;
                let transferred = short_end.map(|end| transferred(&op, end));
                if let Some(n) = transferred {
                    read_buf.truncate(n as usize);
                }
                done(result.map(|()| Outcome {
                    data: read_buf,
                    transferred,
                }));
            }
            Advance::Parked { tags, cause } => {
                // Parking is refused once shutting down: then continue right away.
                let op = p.op;
                if let Some(p) = self.breakpoints.park(p.into_owned(), op, tags, cause) {
                    self.drive(p);
                }
            }
            Advance::Delayed(wait) => {
                let now = Instant::now();
                let due = now.checked_add(wait).unwrap_or(now);
                if let Some(p) = self.breakpoints.delay(p.into_owned(), due) {
                    self.drive(p);
                }
            }
        }
    }

    /// Runs steps until the plan ends or a breakpoint, `[suspend]` rule or delay parks it.
    pub(super) fn advance(&self, p: &mut Pending<'_>) -> Advance {
        if let Some((tag, rule)) = p.suspend_after_delay.take() {
            // The delay is over; the `[suspend]` that acted after it parks the request now.
            return Advance::suspended(tag, rule);
        }
        loop {
            let step = p.steps[p.pc];
            p.pc += 1;
            match step {
                Step::Event(event) => {
                    if self.trace.as_ref().is_some_and(|t| t.all()) {
                        p.events.push(event);
                    }
                    let fired = self.fire_logged(event, Some(&*p));
                    if let Some((rule, mode)) = fired.power_cut {
                        // The cut happens before the request that fired it goes on, and that
                        // request fails.
                        if let Err(e) = self.power_cut(mode, None, Some(rule)) {
                            warn!("rule {rule}: {e}");
                        }
                        return Advance::Finished(Err(libc::EIO));
                    }
                    if !fired.suspend.is_empty() {
                        // Parked after the whole event, state updated (as QEMU 6.1+).
                        return Advance::Parked {
                            tags: fired.suspend,
                            cause: format!("event {event}"),
                        };
                    }
                }
                Step::Check {
                    iotype,
                    offset,
                    len,
                    on_fail,
                } => {
                    p.effect = None;
                    // What follows a delay is applied now and takes effect after the wait
                    // (the steps after this one run once the timer continues the request).
                    let (wait, checked) = after_delay(self.check(p, iotype, offset, len, ""));
                    match checked {
                        Checked::Pass | Checked::Delay { .. } => {}
                        Checked::Fail(errno) => {
                            p.failed = Some(errno);
                            p.pc = on_fail;
                        }
                        Checked::Suspend { tag, rule } => return p.suspend(wait, tag, rule),
                        Checked::Effect(effect) => p.take_effect(effect),
                    }
                    if let Some(wait) = wait {
                        return Advance::Delayed(wait);
                    }
                }
                Step::RmwCheck {
                    offset,
                    len,
                    on_fail,
                } => {
                    let note = "; ignored, as QEMU ignores read-modify-write read errors";
                    let (wait, checked) =
                        after_delay(self.check(p, IoType::Read, offset, len, note));
                    match checked {
                        Checked::Fail(_) => p.pc = on_fail,
                        // The padding read's bytes are never used (see plan.rs), so only the
                        // parking actions change anything here; an error after a delay is
                        // ignored like any padding read error.
                        Checked::Suspend { tag, rule } => return p.suspend(wait, tag, rule),
                        Checked::Pass | Checked::Effect(_) | Checked::Delay { .. } => {}
                    }
                    if let Some(wait) = wait {
                        return Advance::Delayed(wait);
                    }
                }
                Step::ZeroesCheck {
                    offset,
                    len,
                    on_fail,
                    on_enotsup,
                } => {
                    p.effect = None;
                    let fail = |p: &mut Pending<'_>, errno: i32| match on_enotsup {
                        Some(fallback) if errno == libc::EOPNOTSUPP => p.pc = fallback,
                        _ => {
                            p.failed = Some(errno);
                            p.pc = on_fail;
                        }
                    };
                    let (wait, checked) =
                        after_delay(self.check(p, IoType::WriteZeroes, offset, len, ""));
                    match checked {
                        Checked::Pass | Checked::Delay { .. } => {}
                        Checked::Fail(errno) => fail(p, errno),
                        Checked::Suspend { tag, rule } => return p.suspend(wait, tag, rule),
                        Checked::Effect(effect) => p.take_effect(effect),
                    }
                    if let Some(wait) = wait {
                        return Advance::Delayed(wait);
                    }
                }
                Step::Jump { to } => p.pc = to,
                Step::Read { offset, len, at } => {
                    let total = p.op.range().1;
                    // A short read stops at its end: later bytes are never read.
                    let len = p.clip(offset, len);
                    if p.read_buf.is_empty() {
                        // A large read done in one step that nothing can park after (the
                        // next step is the end) and that no fault edits may reply straight
                        // from the mapping.
                        let whole_and_last = at == 0
                            && len == total
                            && len >= MAPPED_READ_MIN
                            && p.effect.is_none()
                            && matches!(p.steps.get(p.pc), Some(Step::Done));
                        let window = match &self.map {
                            Some(map) if whole_and_last => map.window(&self.image, offset, len),
                            _ => None,
                        };
                        p.read_buf = window.unwrap_or_else(|| ReadBuf::pooled(total as usize));
                    }
                    if len == 0 {
                        continue;
                    }
                    if self.powered_off() {
                        return Advance::Finished(Err(libc::EIO));
                    }
                    if let Some((errno, sector)) = self.bad.check_read(offset, len) {
                        // A medium error fails the whole command.
                        self.bad_sector_hit(p, sector, errno);
                        return Advance::Finished(Err(errno));
                    }
                    let edits = match &p.effect {
                        Some(Effect::Corrupt { edits }) => Some(edits.as_slice()),
                        _ => None,
                    };
                    if let Some(buf) = p.read_buf.as_mut() {
                        let dst = &mut buf[at..at + len as usize];
                        if let Err(e) = read_full(&self.image, dst, offset) {
                            return Advance::Finished(Err(self.io_failed("read", offset, len, e)));
                        }
                        if let Some(edits) = edits {
                            Edit::apply_all(edits, dst, offset);
                        }
                    }
                }
                Step::Write { offset, len, at } => {
                    let len = p.clip(offset, len);
                    let src = &p.write_data[at..at + len as usize];
                    if let Err(errno) = self.write_with_effect(p, src, offset) {
                        return Advance::Finished(Err(errno));
                    }
                    if let Some(Effect::Torn { errno, .. }) = p.effect
                        && errno != 0
                    {
                        p.failed = Some(errno);
                    }
                }
                Step::Zero { offset, len, punch } => {
                    let dropped = matches!(p.effect, Some(Effect::DropWrite));
                    if len > 0
                        && !dropped
                        && let Err(errno) =
                            self.store(p, offset, len, "zero", Content::Zeroes, || {
                                match self.device_block {
                                    Some(block) => crate::media::device::zero(
                                        &self.image,
                                        offset,
                                        len,
                                        punch,
                                        block,
                                    ),
                                    None => zero_range(&self.image, offset, len, punch),
                                }
                            })
                    {
                        return Advance::Finished(Err(errno));
                    }
                }
                Step::RawWritten => self.raw_node.bump(),
                Step::NodeWritten => self.blkdebug_node.bump(),
                Step::RawFlushGate { skip_to } => {
                    p.raw_gen = self.raw_node.dirty();
                    if p.raw_gen.is_none() {
                        p.pc = skip_to;
                    }
                }
                Step::NodeFlushGate { skip_to } => {
                    p.node_gen = self.blkdebug_node.dirty();
                    if p.node_gen.is_none() {
                        p.pc = skip_to;
                    }
                }
                Step::Flush => {
                    if let Err(errno) = self.flush_media(p) {
                        return Advance::Finished(Err(errno));
                    }
                }
                Step::FailWith { errno } => p.failed = Some(errno),
                Step::StopIfFailed { to } => {
                    if p.failed.is_some() {
                        p.pc = to;
                    }
                }
                Step::Done => return Advance::Finished(p.failed.map_or(Ok(()), Err)),
            }
        }
    }

    /// Fires `event`; at debug level, says what it armed and how the state moved, so that
    /// "why did my rule not fire?" has an answer in the log.
    pub(super) fn fire_logged(&self, event: Event, request: Option<&Pending<'_>>) -> Fired {
        let mut engine = self.engine.lock();
        let fired = engine.fire(event);
        if let Some(trace) = &self.trace
            && (fired.state_change.is_some() || !fired.suspend.is_empty())
        {
            let mut f = request.map(request_fields).unwrap_or_default();
            f.insert("event".into(), event.name().into());
            if let (Some((from, to)), Some(rule)) = (fired.state_change, fired.state_rule) {
                let mut g = f.clone();
                g.insert("action".into(), "set-state".into());
                g.insert("rule".into(), rule.0.into());
                g.insert("from".into(), from.into());
                g.insert("state".into(), to.into());
                trace.record(g);
            }
            if !fired.suspend.is_empty() {
                f.insert("action".into(), "break".into());
                f.insert("tags".into(), fired.suspend.clone().into());
                f.insert("state".into(), engine.state().into());
                trace.record(f);
            }
        }
        for _ in &fired.suspend {
            self.stats.fault("break");
        }
        if log::log_enabled!(log::Level::Debug) {
            let state = engine.state();
            let armed = fired.rearmed.then(|| {
                let ids: Vec<String> = engine.armed().iter().map(|id| id.to_string()).collect();
                ids.join(", ")
            });
            drop(engine);
            match (armed, fired.state_change) {
                (None, None) => debug!("event {event} fired (state {state})"),
                (armed, change) => {
                    let mut text = format!("event {event} fired");
                    if let Some(ids) = armed {
                        if ids.is_empty() {
                            text.push_str(", active list now empty");
                        } else {
                            let _ = write!(text, ", armed rule(s) {ids}");
                        }
                    }
                    match change {
                        Some((from, to)) => {
                            let _ = write!(text, ", state {from} -> {to}");
                        }
                        None => {
                            let _ = write!(text, " (state {state})");
                        }
                    }
                    debug!("{text}");
                }
            }
        }
        fired
    }

    /// Checks one request against the rules; logs, counts and traces what acted, and says
    /// what the executor must do.
    pub(super) fn check(
        &self,
        p: &Pending<'_>,
        iotype: IoType,
        offset: u64,
        len: u64,
        note: &str,
    ) -> Checked {
        let (verdict, state) = {
            let mut engine = self.engine.lock();
            if !engine.has_checks() {
                return Checked::Pass;
            }
            // Only the decision under the lock: its effect (which bits, which sectors) costs
            // up to the request's size or the rule's numbers, and is drawn below.
            let verdict = engine.decide(iotype, offset, len);
            (verdict, engine.state())
        };
        let Verdict::Act(decision) = verdict else {
            return Checked::Pass;
        };
        self.decided(p, decision, state, iotype, offset, len, note)
    }

    /// Logs, counts and traces one rule's decision, and what follows it after a delay.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn decided(
        &self,
        p: &Pending<'_>,
        decision: Decision<Plan>,
        state: i64,
        iotype: IoType,
        offset: u64,
        len: u64,
        note: &str,
    ) -> Checked {
        self.stats.fault(decision.action);
        let range = if len == 0 {
            String::new()
        } else {
            format!(" at offset {offset}, {len} bytes")
        };
        // `into write_aio (write at ...)`, but `into flush` when the names agree.
        let op = p.op;
        let what = if op.name() == iotype.name() {
            format!("{}{range}", op.name())
        } else {
            format!("{} ({iotype}{range})", op.name())
        };
        let Decision {
            rule,
            armed_by,
            action,
            effect: plan,
            then,
        } = decision;
        let effect = plan.effect();
        let by = match armed_by {
            Some(event) => format!("armed by {event}"),
            None => "(standing)".to_string(),
        };
        let mut f = request_fields(p);
        f.insert("iotype".into(), iotype.name().into());
        f.insert("rule".into(), rule.0.into());
        f.insert("action".into(), action.into());
        f.insert("armed_by".into(), armed_by.map(|e| e.name()).into());
        f.insert("state".into(), state.into());
        let mut errno_of_effect = None;
        let mut follow = None;
        let mut checked = match effect {
            Effect::Fail { errno } => {
                self.log_limited(
                    LogKey::Rule(rule),
                    || {
                        format!(
                            "injecting {} into {what} for rule {rule} {by}{note}",
                            errno::describe(errno),
                        )
                    },
                    || format!("injected {} into", errno::describe(errno)),
                );
                errno_of_effect = Some(errno);
                Checked::Fail(errno)
            }
            Effect::Delay { wait, errno } => {
                self.log_limited(
                    LogKey::Rule(rule),
                    || {
                        format!(
                            "delaying {what} by {} for rule {rule} {by}{}",
                            crate::engine::units::duration_text(wait),
                            if errno != 0 {
                                format!(", then failing it with {}", errno::describe(errno))
                            } else {
                                String::new()
                            }
                        )
                    },
                    || match errno {
                        0 => "delayed".to_string(),
                        e => format!("delayed (then failed with {})", errno::describe(e)),
                    },
                );
                f.insert("delay_us".into(), (wait.as_micros() as u64).into());
                errno_of_effect = (errno != 0).then_some(errno);
                // What a later rule decided is logged and traced after the delay's line,
                // below, and applied when the wait is over.
                follow = then;
                Checked::Delay {
                    wait,
                    then: Box::new(match errno {
                        0 => Checked::Pass,
                        errno => Checked::Fail(errno),
                    }),
                }
            }
            Effect::Suspend { tag } => {
                f.insert("tag".into(), tag.clone().into());
                Checked::Suspend { tag, rule }
            }
            effect => {
                let detail = match &effect {
                    Effect::Corrupt { edits } => {
                        let offsets: Vec<Value> = edits.iter().map(|e| e.offset().into()).collect();
                        let text = format!(
                            "corrupting {} byte(s) from offset {}",
                            edits.len(),
                            edits.first().map_or(0, |e| e.offset())
                        );
                        f.insert("corrupted".into(), Value::Array(offsets));
                        text
                    }
                    Effect::DropWrite => "dropping".to_string(),
                    Effect::Torn { kept, errno } => {
                        let ranges: Vec<Value> = kept
                            .iter()
                            .map(|(s, e)| Value::from(vec![*s, *e]))
                            .collect();
                        let bytes: u64 = kept.iter().map(|(s, e)| e - s).sum();
                        f.insert("kept".into(), Value::Array(ranges));
                        f.insert("kept_bytes".into(), bytes.into());
                        errno_of_effect = (*errno != 0).then_some(*errno);
                        format!("tearing (keeping {bytes} of {len} bytes)")
                    }
                    Effect::Short { end } => {
                        let n = end.saturating_sub(offset);
                        f.insert("transferred".into(), transferred(&op, *end).into());
                        format!("shortening to {n} bytes")
                    }
                    Effect::Misdirect { shift } => {
                        let landed = misdirected(offset, len, *shift, self.size());
                        f.insert("landed".into(), landed.into());
                        format!("misdirecting to offset {landed}")
                    }
                    _ => String::new(),
                };
                let done = match &effect {
                    Effect::Corrupt { .. } => "corrupted",
                    Effect::DropWrite => "dropped",
                    Effect::Torn { .. } => "tore",
                    Effect::Short { .. } => "shortened",
                    Effect::Misdirect { .. } => "misdirected",
                    _ => "acted on",
                };
                self.log_limited(
                    LogKey::Rule(rule),
                    || format!("{detail} {what} for rule {rule} {by}{note}"),
                    || done.to_string(),
                );
                Checked::Effect(effect)
            }
        };
        f.insert("errno".into(), errno_field(errno_of_effect));
        sent_field(&mut f, p, errno_of_effect);
        if let Some(trace) = &self.trace {
            trace.record(f);
        }
        if let (Checked::Delay { then, .. }, Some(next)) = (&mut checked, follow) {
            **then = self.decided(p, *next, state, iotype, offset, len, note);
        }
        checked
    }

    /// The flush itself: `fdatasync` of the image, ordered against power cuts by the write
    /// cache (which alone decides whether a flush that overlapped a cut succeeded).
    pub(super) fn flush_media(&self, p: &Pending<'_>) -> Result<(), i32> {
        let failed = |e| self.io_failed("fdatasync", 0, 0, e);
        let ticket = match (&self.cache, p.power) {
            (Some(cache), Some(begun)) => Some(cache.begin_flush(begun).map_err(failed)?),
            _ => None,
        };
        self.image.sync_data().map_err(failed)?;
        match (&self.cache, ticket) {
            (Some(cache), Some(ticket)) => cache.end_flush(ticket).map_err(failed),
            _ => Ok(()),
        }
    }

    /// Stores the client's bytes `src`, aimed at `offset`, as the check's `effect` says.
    pub(super) fn write_with_effect(
        &self,
        p: &Pending<'_>,
        src: &[u8],
        offset: u64,
    ) -> Result<(), i32> {
        let len = src.len() as u64;
        if len == 0 {
            return Ok(());
        }
        let store = |bytes: &[u8], at: u64, what: &'static str| {
            self.store(
                p,
                at,
                bytes.len() as u64,
                what,
                Content::Bytes(bytes),
                || self.image.write_all_at(bytes, at),
            )
        };
        match &p.effect {
            Some(Effect::DropWrite) => Ok(()),
            Some(Effect::Corrupt { edits }) => {
                let mut copy = src.to_vec();
                Edit::apply_all(edits, &mut copy, offset);
                store(&copy, offset, "write")
            }
            Some(Effect::Torn { kept, .. }) => {
                for &(s, e) in kept {
                    let (s, e) = (s.max(offset), e.min(offset + len));
                    if s < e {
                        store(
                            &src[(s - offset) as usize..(e - offset) as usize],
                            s,
                            "torn write",
                        )?;
                    }
                }
                Ok(())
            }
            Some(Effect::Misdirect { shift }) => {
                let at = misdirected(offset, len, *shift, self.size());
                store(src, at, "misdirected write")
            }
            _ => store(src, offset, "write"),
        }
    }

    /// Changes image bytes `[at, at+len)` by `io` through the media: bad sectors decide
    /// first (a write may heal them or fail on them), then the write cache journals the
    /// before-image (and refuses while the power is off), then `io` runs.
    pub(super) fn store(
        &self,
        p: &Pending<'_>,
        at: u64,
        len: u64,
        what: &'static str,
        content: Content<'_>,
        io: impl FnOnce() -> io::Result<()>,
    ) -> Result<(), i32> {
        let heal = match self.bad.check_write(at, len) {
            WriteCheck::Fail(errno, sector) => {
                self.bad_sector_hit(p, sector, errno);
                return Err(errno);
            }
            WriteCheck::Heal(ranges) => Some(ranges),
            WriteCheck::Clean | WriteCheck::StaysBad => None,
        };
        let done = match (&self.cache, p.power) {
            (Some(cache), Some(begun)) => cache.write(&self.image, at, len, begun, content, io),
            _ => io(),
        };
        if let Err(e) = done {
            return Err(self.io_failed(what, at, len, e));
        }
        self.note_extent(at + len);
        if let Some(ranges) = heal {
            self.log_limited(
                LogKey::Healed,
                || format!("healed bad sector(s) {ranges:?} by a {what} at offset {at}"),
                || "were healed by".to_string(),
            );
            self.bad.heal(&ranges);
        }
        Ok(())
    }

    /// Logs, counts and traces a request that a bad sector failed.
    pub(super) fn bad_sector_hit(&self, p: &Pending<'_>, sector: u64, errno: i32) {
        self.log_limited(
            LogKey::BadSector,
            || {
                format!(
                    "{} at offset {}: bad sector {sector}, failing with {}",
                    p.op.name(),
                    p.op.range().0,
                    errno::describe(errno)
                )
            },
            || "failed".to_string(),
        );
        self.stats.fault("bad-sector");
        if let Some(trace) = &self.trace {
            let mut f = request_fields(p);
            f.insert("action".into(), "bad-sector".into());
            f.insert("sector".into(), sector.into());
            f.insert("errno".into(), errno_field(Some(errno)));
            sent_field(&mut f, p, Some(errno));
            trace.record(f);
        }
    }

    /// Whether the device is off (after a power cut, until power-on).
    pub(super) fn powered_off(&self) -> bool {
        self.cache.as_ref().is_some_and(|c| c.is_off())
    }
}

/// Splits a check's delay from what follows it: the wait (if any) and the decision to apply.
pub(super) fn after_delay(checked: Checked) -> (Option<Duration>, Checked) {
    match checked {
        Checked::Delay { wait, then } => (Some(wait), *then),
        other => (None, other),
    }
}

impl Pending<'_> {
    /// Parks the request under a `[suspend]` rule's tag: now, or once `wait` is over.
    pub(super) fn suspend(&mut self, wait: Option<Duration>, tag: String, rule: RuleId) -> Advance {
        match wait {
            None => Advance::suspended(tag, rule),
            Some(wait) => {
                self.suspend_after_delay = Some((tag, rule));
                Advance::Delayed(wait)
            }
        }
    }

    /// Takes a check's effect for the I/O steps up to the next check.
    pub(super) fn take_effect(&mut self, effect: Effect) {
        if let Effect::Short { end } = effect {
            self.short_end = Some(self.short_end.map_or(end, |s| s.min(end)));
        }
        self.effect = Some(effect);
    }

    /// `len` bytes at `offset`, cut at a short transfer's end.
    pub(super) fn clip(&self, offset: u64, len: u64) -> u64 {
        match self.short_end {
            Some(end) => len.min(end.saturating_sub(offset)),
            None => len,
        }
    }
}

/// The bytes of `op` before a short transfer's `end`.
pub(super) fn transferred(op: &Op, end: u64) -> u64 {
    let (offset, len) = op.range();
    end.saturating_sub(offset).min(len)
}

/// Where a write of `len` bytes aimed at `offset` lands when shifted by `shift`, clamped so
/// that it stays inside an image of `size` bytes.
pub(super) fn misdirected(offset: u64, len: u64, shift: i64, size: u64) -> u64 {
    let target = i128::from(offset) + i128::from(shift);
    let last_start = i128::from(size.saturating_sub(len));
    target.clamp(0, last_start.max(0)) as u64
}

/// Zeroes a range, keeping the size. Punching keeps sparse images sparse; zero-range falls
/// back to punching, then to writing zeroes, on filesystems that lack it.
pub(super) fn zero_range(file: &File, offset: u64, len: u64, punch: bool) -> io::Result<()> {
    let fd = file.as_raw_fd();
    let try_mode = |mode: i32| {
        // SAFETY: fallocate on an owned, open descriptor; no memory is passed.
        let r = unsafe { libc::fallocate(fd, mode, offset as i64, len as i64) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    let unsupported = |e: &io::Error| e.raw_os_error() == Some(libc::EOPNOTSUPP);
    if !punch {
        match try_mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE) {
            Err(e) if unsupported(&e) => {}
            other => return other,
        }
    }
    match try_mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) {
        Err(e) if unsupported(&e) => {}
        other => return other,
    }
    crate::media::device::write_zeroes(file, offset, len)
}
