//! What a rule is: *when* (an [`Event`], or none), *which requests* ([`RequestMatch`]) and
//! *what* ([`Action`]), and what a decision hands back ([`Decision`], [`Verdict`], [`Plan`]).
//! The engine that decides by them is in `decide.rs`; the events in `events.rs`.

use std::fmt;
use std::sync::Arc;

use super::events::{Event, IoType, IoTypes};
use super::faults::{CutMode, Draw, Effect, Fault, resolve};
use super::ranges::{SECTOR, SectorSet};

/// Which bytes a request-checked rule applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Range {
    /// Any request, a flush included.
    Any,
    /// QEMU's `sector`: the byte `sector * 512` lies inside the request.
    Sector(u64),
    /// `sectors`: the request overlaps one of these sectors.
    Sectors(Arc<SectorSet>),
}

impl Range {
    /// The image byte ranges of `[offset, offset+len)` that the range covers, in order (the
    /// whole request for [`Range::Any`]; a QEMU `sector` covers its 512 bytes).
    pub fn covered(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let end = offset.saturating_add(len);
        match self {
            _ if len == 0 => Vec::new(),
            Range::Any => vec![(offset, end)],
            Range::Sector(s) => {
                let start = s.saturating_mul(SECTOR).max(offset);
                let stop = s.saturating_add(1).saturating_mul(SECTOR).min(end);
                if start < stop {
                    vec![(start, stop)]
                } else {
                    Vec::new()
                }
            }
            Range::Sectors(set) => set.covered(offset, len),
        }
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Range::Any => f.write_str("any"),
            Range::Sector(s) => write!(f, "sector {s} (byte {})", s.saturating_mul(SECTOR)),
            Range::Sectors(set) => write!(f, "sectors {set}"),
        }
    }
}

/// The counting keys (faults §1), applied in this order to a rule's matching requests.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Counting {
    /// The first `skip` matching requests are not acted on.
    pub skip: u64,
    /// Of the matching requests after `skip`, act on every `every`-th (at least 1).
    pub every: u64,
    /// Act with this chance (seeded); 1 always.
    pub probability: f64,
    /// Act on at most this many requests, then the rule is deleted (`once` is 1).
    pub count: Option<u64>,
}

impl Default for Counting {
    fn default() -> Self {
        Counting {
            skip: 0,
            every: 1,
            probability: 1.0,
            count: None,
        }
    }
}

impl fmt::Display for Counting {
    /// The keys that differ from their default, ` key=value` each (`count=1` apart: the
    /// caller shows it as `once`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.skip != 0 {
            write!(f, " skip={}", self.skip)?;
        }
        if self.every != 1 {
            write!(f, " every={}", self.every)?;
        }
        if self.probability != 1.0 {
            write!(f, " probability={}", self.probability)?;
        }
        if let Some(n) = self.count
            && n != 1
        {
            write!(f, " count={n}")?;
        }
        Ok(())
    }
}

/// Which requests a request-checked rule applies to.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestMatch {
    pub range: Range,
    pub iotypes: IoTypes,
    pub counting: Counting,
}

impl RequestMatch {
    /// A QEMU `[inject-error]` match: `sector` (or any), `iotype`, `once`.
    pub fn qemu(sector: Option<u64>, iotypes: IoTypes, once: bool) -> RequestMatch {
        RequestMatch {
            range: sector.map_or(Range::Any, Range::Sector),
            iotypes,
            counting: Counting {
                count: once.then_some(1),
                ..Counting::default()
            },
        }
    }

    /// QEMU's `rule_check` range and iotype predicate (a zero-length request, a flush, has no
    /// range, so only range-less rules match it). The engine answers it through
    /// [`RuleIndex`]; this plain form is the reference the index is tested against.
    #[cfg(test)]
    pub(super) fn matches(&self, iotype: IoType, offset: u64, len: u64) -> bool {
        let in_range = match &self.range {
            Range::Any => true,
            Range::Sector(sector) => {
                let byte = sector.saturating_mul(512);
                len > 0 && byte >= offset && byte - offset < len
            }
            Range::Sectors(set) => set.overlaps(offset, len),
        };
        in_range && self.iotypes.contains(iotype)
    }
}

/// The iotypes an action can act on: a fault that cannot apply to a request (a flush has no
/// bytes to corrupt) does not match it (faults §3).
pub fn applicable_iotypes(fault: &Fault) -> IoTypes {
    use IoType::*;
    let of = |types: &[IoType]| {
        types
            .iter()
            .fold(IoTypes(0), |acc: IoTypes, t| acc.with(*t))
    };
    match fault {
        Fault::Error { .. } | Fault::Delay { .. } | Fault::Suspend { .. } => of(&IoType::ALL),
        Fault::Corrupt { .. } | Fault::ShortIo { .. } => of(&[Read, Write]),
        Fault::DropWrite => of(&[Write, WriteZeroes]),
        Fault::TornWrite { .. } | Fault::MisdirectWrite { .. } => of(&[Write]),
    }
}

/// What a rule does.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// A request-checked rule (`[inject-error]` and the sections of faults §3): requests that
    /// match `matches` get `fault`.
    Request { fault: Fault, matches: RequestMatch },
    /// Set the state once the event has been processed.
    SetState { new_state: i64 },
    /// Park the request that fires the event under `tag` (QEMU's one-shot `break`).
    Suspend { tag: String },
    /// `[power-cut]`: cut the power when the event fires (the counting keys count the
    /// firings), resolving unsynced writes by `mode`.
    PowerCut { mode: CutMode, counting: Counting },
}

/// Where a rule came from, for messages (`rule 3 (rules.ini:12)`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    File {
        path: String,
        line: usize,
    },
    /// The `index`-th (1-based) rule given with `flag` (`--rule`, `--inject-error`, ...).
    CommandLine {
        flag: &'static str,
        index: usize,
    },
    Runtime,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, line } => write!(f, "{path}:{line}"),
            Origin::CommandLine { flag, index } => write!(f, "{flag} #{index}"),
            Origin::Runtime => f.write_str("added at run time"),
        }
    }
}

/// One rule: when `event` fires (or always, for a standing rule) in `state` (0 = any), take
/// `action`. Set-state rules and breakpoints always have an event.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub event: Option<Event>,
    pub state: i64,
    pub action: Action,
    pub origin: Origin,
}

impl Rule {
    /// The section the rule was written in (`inject-error`, `set-state`, `delay`, ...).
    pub fn section(&self) -> &'static str {
        match &self.action {
            Action::Request { fault, .. } => fault.section(),
            Action::SetState { .. } => "set-state",
            Action::Suspend { .. } => "break",
            Action::PowerCut { .. } => "power-cut",
        }
    }
}

impl fmt::Display for Rule {
    /// One line per rule, the shape `blkdebugfs check` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.state == 0 {
            "any".to_string()
        } else {
            self.state.to_string()
        };
        match self.event {
            Some(event) => write!(f, "event={event} state={state} ")?,
            None => write!(f, "standing state={state} ")?,
        }
        match &self.action {
            Action::Request { fault, matches } => {
                let once = if matches.counting.count == Some(1) {
                    "on"
                } else {
                    "off"
                };
                match fault {
                    Fault::Error { immediately, .. } => {
                        write!(
                            f,
                            "inject-error {fault} range={} iotype={} once={once}",
                            matches.range, matches.iotypes
                        )?;
                        if *immediately {
                            f.write_str(" immediately=on")?;
                        }
                    }
                    _ => {
                        write!(f, "{}", fault.section())?;
                        let keys = fault.to_string();
                        if !keys.is_empty() {
                            write!(f, " {keys}")?;
                        }
                        // The iotypes it can act on, as the engine narrows them.
                        let acts_on = IoTypes(matches.iotypes.0 & applicable_iotypes(fault).0);
                        write!(f, " range={} iotype={acts_on}", matches.range)?;
                        if once == "on" {
                            f.write_str(" once=on")?;
                        }
                    }
                }
                write!(f, "{}", matches.counting)
            }
            Action::SetState { new_state } => write!(f, "set-state new_state={new_state}"),
            Action::Suspend { tag } => write!(f, "break tag={tag}"),
            Action::PowerCut { mode, counting } => {
                write!(f, "power-cut mode={}", mode.name())?;
                if counting.count == Some(1) {
                    f.write_str(" once=on")?;
                }
                write!(f, "{counting}")
            }
        }
    }
}

/// A rule's number: its position in written order, stable for the life of the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleId(pub u32);

impl fmt::Display for RuleId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What firing an event did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fired {
    /// Tags of the breakpoints that hit: the request is to be parked under each.
    pub suspend: Vec<String>,
    /// The event replaced the active list (its request-checked rules that pass the state
    /// gate are armed now, see [`Engine::armed`](super::Engine::armed)).
    pub rearmed: bool,
    /// The state before and after, and the set-state rule that moved it.
    pub state_change: Option<(i64, i64)>,
    pub state_rule: Option<RuleId>,
    /// A `[power-cut]` rule of the event acted: cut the power with this mode.
    pub power_cut: Option<(RuleId, CutMode)>,
}

/// A rule's counters, as `rules` shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleStats {
    /// Requests the rule acted on (failed, delayed, corrupted, ..., suspended), or events it
    /// moved the state on (set-state).
    pub hits: u64,
    /// Requests that matched its range and iotype (acted on or not: the count `skip`,
    /// `every` and the seeded draws are keyed by).
    pub matched: u64,
    /// How often its event armed it (request-checked rules with an event only).
    pub armed: u64,
}

/// What a rule decided for a request: with [`Engine::decide`](super::Engine::decide) the [`Plan`] of its effect,
/// with [`Engine::check`](super::Engine::check) the effect itself.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision<E = Effect> {
    pub rule: RuleId,
    /// The event that armed the rule (`None`: a standing rule).
    pub armed_by: Option<Event>,
    /// The rule's section (`inject-error`, `delay`, ...): the action's name.
    pub action: &'static str,
    /// The fault made concrete for this request (or its plan).
    pub effect: E,
    /// For a `[delay]` that acted (without `errno`): what the first later rule that acted
    /// decided, to apply after the wait (faults §1, "a delay composes"); `None`: no later
    /// rule acted, the request goes on untouched after the wait.
    pub then: Option<Box<Decision<E>>>,
}

/// Where a rule added at run time goes in the order of checks (`ctl ... first`,
/// `before=N`); rules go last by default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Placement {
    #[default]
    Last,
    /// Before every rule.
    First,
    /// Just before rule N.
    Before(RuleId),
}

/// The outcome of checking a request.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict<E = Effect> {
    /// No rule acted (or an `errno = 0` rule exempted the request).
    Pass,
    Act(Decision<E>),
}

impl Verdict<Plan> {
    /// Makes the acting rule's fault concrete (see [`Plan::effect`]).
    pub fn resolved(self) -> Verdict {
        match self {
            Verdict::Pass => Verdict::Pass,
            Verdict::Act(d) => Verdict::Act(d.resolved()),
        }
    }
}

impl Decision<Plan> {
    /// Makes the fault concrete, and that of the decision that follows a delay.
    pub fn resolved(self) -> Decision {
        Decision {
            rule: self.rule,
            armed_by: self.armed_by,
            action: self.action,
            effect: self.effect.effect(),
            then: self.then.map(|t| Box::new(t.resolved())),
        }
    }
}

/// A fault that a rule decided to apply to one request, not yet made concrete: the fault,
/// the request, the rule's range and the key of its seeded draw. Deciding is cheap (a clone
/// of the fault and of the range's `Arc`) and happens under the engine's lock; making it
/// concrete ([`Plan::effect`]) costs up to the request's size or the rule's own numbers
/// (`bits`, `bytes`, sectors of a torn write), so the caller does it after the lock is
/// released. The effect is a pure function of the plan: where it is computed changes
/// nothing a seed replays.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub(super) fault: Fault,
    pub(super) range: Range,
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) seed: u64,
    pub(super) rule: u32,
    pub(super) nth: u64,
}

impl Plan {
    /// The rule's fault, as written.
    pub fn fault(&self) -> &Fault {
        &self.fault
    }

    /// The fault made concrete for the request (`faults::resolve`, on the part of the
    /// request that the rule's range covers).
    pub fn effect(&self) -> Effect {
        resolve(
            &self.fault,
            self.offset,
            self.len,
            &self.range.covered(self.offset, self.len),
            &mut Draw::new(self.seed, self.rule, self.nth, 1),
        )
    }
}
