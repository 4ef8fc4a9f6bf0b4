//! The rule engine: QEMU blkdebug's rules, grown by `spec/faults.md`, and the one decision
//! function.
//!
//! Contract (spec §1 and faults §1): a rule is *when* (an [`Event`] with QEMU's arming, or
//! none: a *standing* rule, armed from the start), *which requests* ([`RequestMatch`]:
//! state gate, range, iotype and the counting keys) and *what* ([`Action`]). [`Engine::fire`]
//! processes every rule of the event whose `state` gate is 0 or equals the state from
//! *before* the event: request-checked rules of any kind replace the active list (the first
//! one empties it), set-state rules set the pending state (first written wins), breakpoints
//! are one-shot and hand their tag back. [`Engine::check`] takes the active list, then the
//! standing rules (whose gate is tested against the current state), each in written order;
//! each rule whose range and iotype match counts the match and applies `skip`, `every`,
//! `probability` and `count` in that order; the first rule that *acts* decides the request,
//! and a rule that matches but does not act lets later rules decide. `errno = 0` that acts
//! exempts the request and hides later rules (QEMU; it consumes no `count`, as QEMU's `once`
//! survives an exemption). A delay composes (faults §1): a `[delay]` without `errno` that
//! acts delays the request and the check goes on; the first later rule that acts decides
//! what follows the wait ([`Decision::then`]). One delay per check: once one applies, later
//! `[delay]` rules do not see the request (and do not count it). Every rule sees a request
//! at most once, so counts stay exact.
//!
//! Order: rules are checked in written order, except that a rule added at run time may be
//! placed first or before rule N ([`Placement`]). Rule numbers name rules and never change;
//! a rank per rule orders them.
//!
//! Randomness: every draw is keyed by (seed, rule number, that rule's match count) (see
//! `engine/faults.rs`), so the same seed and the same requests give the same decisions.
//!
//! Deciding is not resolving: [`Engine::decide`] says which rule acts and hands back a
//! [`Plan`] (the fault, the request, the range and the draw's key), in time that does not
//! grow with the request or the rule's numbers; [`Plan::effect`] makes it concrete (which
//! bits, which sectors), which may cost as much as the request, after the caller's lock is
//! released. [`Engine::check`] does both, for callers that hold no lock.
//!
//! The engine is plain data: no FUSE, no I/O, no locks. The caller (see `mount/`) holds it
//! under one mutex for the duration of a single `fire` or `decide` call only.
//!
//! Cost: neither call walks the rules. What a fire does in a given state (the new active
//! list, the new state) is computed once per (event, state) and cached until the rules change
//! (adding or deleting a rule, one deleted by `count`/`once` included, costs the next fire of
//! that event one pass over that event's rules); arming counts are derived from per-event fire
//! counters. The active list and the standing rules are indexed by range (the byte a QEMU
//! `sector` names, the intervals of `sectors`), so a check looks only at range-less rules and
//! at rules whose range meets the request. Breakpoints are few and one-shot, and are scanned.

use std::collections::HashMap;
use std::sync::Arc;

use super::events::{Event, IoType, IoTypes};
use super::faults::{CutMode, Fault, acts};
use super::ranges::SECTOR;
#[cfg(doc)]
use super::rules::RequestMatch;
use super::rules::{
    Action, Decision, Fired, Placement, Plan, Range, Rule, RuleId, RuleStats, Verdict,
    applicable_iotypes,
};

/// The live rules by number. Numbers are dense and never reused, so a vector indexed by
/// number finds a rule in one step (a check looks up every rule that matches); a deleted
/// rule leaves an empty box-sized hole.
#[derive(Default)]
struct Slots(Vec<Option<Box<Slot>>>);

impl Slots {
    fn insert(&mut self, id: RuleId, slot: Slot) {
        let at = id.0 as usize;
        if self.0.len() <= at {
            self.0.resize_with(at + 1, || None);
        }
        self.0[at] = Some(Box::new(slot));
    }

    fn remove(&mut self, id: &RuleId) -> Option<Slot> {
        self.0.get_mut(id.0 as usize)?.take().map(|b| *b)
    }

    fn get(&self, id: &RuleId) -> Option<&Slot> {
        self.0.get(id.0 as usize)?.as_deref()
    }

    fn get_mut(&mut self, id: &RuleId) -> Option<&mut Slot> {
        self.0.get_mut(id.0 as usize)?.as_deref_mut()
    }

    /// The live rules in number (= written) order.
    fn iter(&self) -> impl Iterator<Item = (RuleId, &Slot)> {
        self.0
            .iter()
            .enumerate()
            .filter_map(|(i, s)| Some((RuleId(i as u32), s.as_deref()?)))
    }
}

struct Slot {
    rule: Rule,
    /// The rule's place in the order of checks: rules are taken by increasing rank. Written
    /// order gives increasing ranks; `ctl ... first` / `before=N` give one in between.
    rank: u64,
    /// Requests this rule acted on (see [`RuleStats::hits`]).
    hits: u64,
    /// Requests that matched it (see [`RuleStats::matched`]).
    matched: u64,
    /// The fire counter of the rule's (event, state gate) when the rule was added: the rule
    /// was processed once per fire since, so its arming count needs no per-fire update.
    fires_at_add: u64,
}

/// The rules of one event, split by kind, in written order, and how often the event fired.
#[derive(Default)]
struct EventRules {
    checked: Vec<Armable>,
    /// (id, state gate, new state).
    set_state: Vec<(RuleId, i64, i64)>,
    suspend: Vec<RuleId>,
    power_cut: Vec<RuleId>,
    fires: u64,
    fires_in_state: HashMap<i64, u64>,
}

impl EventRules {
    /// Whether the event has no rule of any kind.
    fn is_empty(&self) -> bool {
        self.checked.is_empty()
            && self.set_state.is_empty()
            && self.suspend.is_empty()
            && self.power_cut.is_empty()
    }

    /// How often a rule with state gate `gate` has been processed: every fire for gate 0,
    /// the fires in that state otherwise.
    fn fires_for(&self, gate: i64) -> u64 {
        if gate == 0 {
            self.fires
        } else {
            self.fires_in_state.get(&gate).copied().unwrap_or(0)
        }
    }
}

/// A rule's `state` gate passes in `state` when it is 0 (any) or equal to it.
fn gate_passes(gate: i64, state: i64) -> bool {
    gate == 0 || gate == state
}

/// What firing one event in one state does, computed once per (event, state) and cached
/// until the rules change, so a fire never walks the event's rules.
#[derive(Clone)]
struct Compiled {
    /// The new active list, or `None` when no request-checked rule passes the state gate
    /// (the list then stays as it is).
    active: Option<Arc<RuleIndex>>,
    /// The first written set-state rule that passes the gate, and its new state.
    new_state: Option<(RuleId, i64)>,
}

/// A request-checked rule as the index needs it, kept beside its id so that compiling a plan
/// never looks rules up.
#[derive(Clone)]
struct Armable {
    id: RuleId,
    gate: i64,
    range: Range,
    /// The rule's `iotype` narrowed to what its action can act on.
    iotypes: IoTypes,
}

impl Armable {
    fn of(id: RuleId, rule: &Rule) -> Option<Armable> {
        let Action::Request { fault, matches } = &rule.action else {
            return None;
        };
        Some(Armable {
            id,
            gate: rule.state,
            range: matches.range.clone(),
            iotypes: IoTypes(matches.iotypes.0 & applicable_iotypes(fault).0),
        })
    }
}

/// One interval of a `sectors` rule, in bytes `[start, end)`.
#[derive(Clone, Copy)]
struct Span {
    start: u64,
    end: u64,
    id: RuleId,
    iotypes: IoTypes,
    gate: i64,
}

/// A list of request-checked rules, indexed for [`Engine::check`]: range-less rules in
/// written order, QEMU `sector` rules sorted by the byte they name, and `sectors` intervals
/// sorted by start with a running maximum of their ends. A check looks at the range-less
/// rules and at the ranges meeting the request only, so its cost does not grow with the
/// number of rules elsewhere on the image.
#[derive(Clone, Default)]
struct RuleIndex {
    /// Every rule of the list, in written (= id) order.
    ids: Vec<RuleId>,
    anywhere: Vec<(RuleId, IoTypes, i64)>,
    /// Sorted by (byte, id).
    at_byte: Vec<(u64, RuleId, IoTypes, i64)>,
    /// Sorted by start; `max_end[i]` is the largest end among `spans[..=i]`.
    spans: Vec<Span>,
    max_end: Vec<u64>,
}

impl RuleIndex {
    /// `rules` in written order.
    fn build(rules: &[Armable]) -> RuleIndex {
        let mut index = RuleIndex::default();
        for a in rules {
            index.push(a);
        }
        index.finish();
        index
    }

    fn push(&mut self, a: &Armable) {
        self.ids.push(a.id);
        match &a.range {
            Range::Any => self.anywhere.push((a.id, a.iotypes, a.gate)),
            Range::Sector(s) => {
                self.at_byte
                    .push((s.saturating_mul(SECTOR), a.id, a.iotypes, a.gate))
            }
            Range::Sectors(set) => {
                for (first, last) in set.iter() {
                    self.spans.push(Span {
                        start: first.saturating_mul(SECTOR),
                        end: last.saturating_add(1).saturating_mul(SECTOR),
                        id: a.id,
                        iotypes: a.iotypes,
                        gate: a.gate,
                    });
                }
            }
        }
    }

    /// Restores the orders after pushes (stable sorts: ids were pushed in order).
    fn finish(&mut self) {
        self.ids.sort_unstable();
        self.anywhere.sort_by_key(|e| e.0);
        self.at_byte.sort_by_key(|e| (e.0, e.1));
        self.spans.sort_by_key(|s| (s.start, s.id));
        let mut max = 0;
        self.max_end = self
            .spans
            .iter()
            .map(|s| {
                max = max.max(s.end);
                max
            })
            .collect();
    }

    fn contains(&self, id: RuleId) -> bool {
        self.ids.binary_search(&id).is_ok()
    }

    fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Deletes one rule in place.
    fn remove(&mut self, id: RuleId) {
        let Ok(at) = self.ids.binary_search(&id) else {
            return;
        };
        self.ids.remove(at);
        self.anywhere.retain(|e| e.0 != id);
        self.at_byte.retain(|e| e.1 != id);
        if self.spans.iter().any(|s| s.id == id) {
            self.spans.retain(|s| s.id != id);
            self.finish();
        }
    }

    /// Appends the rules whose range and iotype match the request to `out` (unordered, maybe
    /// repeated). `state`: test each rule's gate against it (standing rules); `None` when the
    /// gate was tested when the list was armed.
    fn candidates(
        &self,
        iotype: IoType,
        offset: u64,
        len: u64,
        state: Option<i64>,
        out: &mut Vec<RuleId>,
    ) {
        let ok = |types: IoTypes, gate: i64| {
            types.contains(iotype) && state.is_none_or(|s| gate_passes(gate, s))
        };
        out.extend(
            self.anywhere
                .iter()
                .filter(|(_, types, gate)| ok(*types, *gate))
                .map(|e| e.0),
        );
        if len == 0 {
            return;
        }
        // Every byte from `offset` on is inside when the end overflows.
        let exact_end = offset.checked_add(len);
        let end = exact_end.unwrap_or(u64::MAX);
        let from = self.at_byte.partition_point(|e| e.0 < offset);
        for &(byte, id, types, gate) in &self.at_byte[from..] {
            if exact_end.is_some_and(|e| byte >= e) {
                break;
            }
            if ok(types, gate) {
                out.push(id);
            }
        }
        let upto = self.spans.partition_point(|s| s.start < end);
        for i in (0..upto).rev() {
            if self.max_end[i] <= offset {
                break;
            }
            let s = self.spans[i];
            if s.end > offset && ok(s.iotypes, s.gate) {
                out.push(s.id);
            }
        }
    }
}

/// Rules, the active list, the standing rules and the state. See the module doc.
pub struct Engine {
    /// Every live rule by id; ids grow in written order, so map order is written order.
    rules: Slots,
    by_event: Vec<EventRules>,
    /// The armed rules (QEMU's active list).
    active: Arc<RuleIndex>,
    /// The standing rules (no event): always armed, gated by the current state.
    standing: RuleIndex,
    /// Per (event, state): what a fire does. An event's entries are dropped whenever one of
    /// its rules is added or removed.
    compiled: HashMap<(Event, i64), Compiled>,
    state: i64,
    next_id: u32,
    /// The seed of every draw.
    seed: u64,
    /// The candidates buffer of [`Engine::check`], reused.
    scratch: Vec<RuleId>,
    /// The rank the next rule added last gets.
    next_rank: u64,
    /// Some rule was placed out of written order: number order is no longer check order,
    /// so checks sort candidates by rank (a lookup each) instead of by number.
    placed: bool,
}

/// Gap between the ranks of rules added last: room for 32 placements between two
/// neighbours before the ranks are renumbered.
const RANK_STEP: u64 = 1 << 32;

impl Default for Engine {
    fn default() -> Self {
        Engine::new(Vec::new())
    }
}

/// Bound on cached (event, state) plans: a config that walks through many states must not
/// grow the cache without limit.
const MAX_COMPILED: usize = 256;

impl Engine {
    /// Builds an engine with `rules` in written order; state 1, nothing armed, seed 0. The
    /// caller fires [`Event::None`] once the mount is live.
    pub fn new(rules: Vec<Rule>) -> Engine {
        Engine::with_seed(rules, 0)
    }

    /// [`Engine::new`] with the seed of every draw.
    pub fn with_seed(rules: Vec<Rule>, seed: u64) -> Engine {
        let mut engine = Engine {
            rules: Slots::default(),
            by_event: (0..Event::ALL.len())
                .map(|_| EventRules::default())
                .collect(),
            active: Arc::default(),
            standing: RuleIndex::default(),
            compiled: HashMap::new(),
            state: 1,
            next_id: 1,
            seed,
            scratch: Vec::new(),
            next_rank: RANK_STEP,
            placed: false,
        };
        for rule in rules {
            engine.add(rule);
        }
        engine
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Adds a rule after all existing ones and returns its number.
    pub fn add(&mut self, rule: Rule) -> RuleId {
        let rank = self.next_rank;
        self.next_rank += RANK_STEP;
        self.insert(rule, rank)
    }

    /// Adds a rule at `at` in the order of checks and returns its number (always a new,
    /// larger one: numbers name rules, ranks order them). `Err(n)`: there is no rule `n` to
    /// place it before.
    pub fn add_placed(&mut self, rule: Rule, at: Placement) -> Result<RuleId, RuleId> {
        let rank = match at {
            Placement::Last => return Ok(self.add(rule)),
            Placement::First => {
                let first = self.rules.iter().map(|(_, s)| s.rank).min();
                match first {
                    None => return Ok(self.add(rule)),
                    Some(r) if r >= 2 => r / 2,
                    Some(_) => {
                        self.renumber_ranks();
                        RANK_STEP / 2
                    }
                }
            }
            Placement::Before(n) => {
                let mut rank = self.rules.get(&n).ok_or(n)?.rank;
                let mut below = self.rank_below(rank);
                if rank - below < 2 {
                    self.renumber_ranks();
                    rank = self.rules.get(&n).ok_or(n)?.rank;
                    below = self.rank_below(rank);
                }
                below + (rank - below) / 2
            }
        };
        self.placed = true;
        let id = self.insert(rule, rank);
        // The per-event lists whose order decides (first set-state, first power cut).
        if let Some(event) = self.rules.get(&id).and_then(|s| s.rule.event) {
            let rules = &mut self.by_event[event.index()];
            let slots = &self.rules;
            let rank_of = |id: &RuleId| slots.get(id).map_or(u64::MAX, |s| s.rank);
            rules.set_state.sort_by_key(|e| rank_of(&e.0));
            rules.power_cut.sort_by_key(rank_of);
        }
        Ok(id)
    }

    /// The largest rank below `rank` among the live rules (0 when none).
    fn rank_below(&self, rank: u64) -> u64 {
        self.rules
            .iter()
            .map(|(_, s)| s.rank)
            .filter(|r| *r < rank)
            .max()
            .unwrap_or(0)
    }

    /// Spreads the ranks out again, keeping their order (placements used up a gap).
    fn renumber_ranks(&mut self) {
        let mut order: Vec<(u64, RuleId)> = self.rules.iter().map(|(id, s)| (s.rank, id)).collect();
        order.sort_unstable();
        for (k, (_, id)) in order.iter().enumerate() {
            if let Some(s) = self.rules.get_mut(id) {
                s.rank = (k as u64 + 1) * RANK_STEP;
            }
        }
        self.next_rank = (order.len() as u64 + 1) * RANK_STEP;
    }

    fn insert(&mut self, rule: Rule, rank: u64) -> RuleId {
        let id = RuleId(self.next_id);
        self.next_id += 1;
        let mut fires_at_add = 0;
        match rule.event {
            None => {
                // A standing rule (set-state rules and breakpoints always have an event).
                if let Some(a) = Armable::of(id, &rule) {
                    self.standing.push(&a);
                    self.standing.finish();
                }
            }
            Some(event) => {
                let rules = &mut self.by_event[event.index()];
                match &rule.action {
                    Action::Request { .. } => rules.checked.extend(Armable::of(id, &rule)),
                    Action::SetState { new_state } => {
                        rules.set_state.push((id, rule.state, *new_state))
                    }
                    Action::Suspend { .. } => rules.suspend.push(id),
                    Action::PowerCut { .. } => rules.power_cut.push(id),
                }
                fires_at_add = rules.fires_for(rule.state);
                self.forget_compiled(event);
            }
        }
        self.rules.insert(
            id,
            Slot {
                rule,
                rank,
                hits: 0,
                matched: 0,
                fires_at_add,
            },
        );
        id
    }

    /// Deletes a rule everywhere (its event, the active list, the standing rules).
    pub fn remove(&mut self, id: RuleId) -> Option<Rule> {
        let slot = self.rules.remove(&id)?;
        match slot.rule.event {
            None => self.standing.remove(id),
            Some(event) => {
                let rules = &mut self.by_event[event.index()];
                rules.checked.retain(|a| a.id != id);
                rules.set_state.retain(|e| e.0 != id);
                rules.suspend.retain(|r| *r != id);
                rules.power_cut.retain(|r| *r != id);
                self.forget_compiled(event);
            }
        }
        if self.active.contains(id) {
            // The cached plans that shared this list are gone, so this rarely copies.
            Arc::make_mut(&mut self.active).remove(id);
        }
        Some(slot.rule)
    }

    /// Drops the cached plans of `event`: its rules changed. Costs the next fire of the event
    /// one pass over its rules.
    fn forget_compiled(&mut self, event: Event) {
        self.compiled.retain(|(e, _), _| *e != event);
    }

    /// Deletes the breakpoints (`break` rules) with `tag`; returns how many.
    pub fn remove_breakpoints(&mut self, tag: &str) -> usize {
        let ids: Vec<RuleId> = self
            .rules
            .iter()
            .filter(|(_, s)| matches!(&s.rule.action, Action::Suspend { tag: t } if t == tag))
            .map(|(id, _)| id)
            .collect();
        for id in &ids {
            self.remove(*id);
        }
        ids.len()
    }

    /// Deletes every rule and breakpoint and returns to state 1 (the `clear` command).
    /// Rule numbers keep counting, so a stale `remove N` cannot hit a newer rule; the seed
    /// stays.
    pub fn clear(&mut self) {
        let next_id = self.next_id;
        *self = Engine::with_seed(Vec::new(), self.seed);
        self.next_id = next_id;
    }

    /// Replaces every rule but the breakpoints by `rules` (the `reload` command); breakpoints
    /// and the state stay, nothing is armed until an event fires.
    pub fn replace_rules(&mut self, rules: Vec<Rule>) {
        // Rebuilt in one pass (removing thousands of rules one by one would be quadratic):
        // keep the breakpoints with their numbers, drop everything else, add the new rules.
        let old = std::mem::take(&mut self.rules);
        for event in &mut self.by_event {
            event.checked.clear();
            event.set_state.clear();
            event.suspend.clear();
            event.power_cut.clear();
        }
        self.compiled.clear();
        self.active = Arc::default();
        self.standing = RuleIndex::default();
        for (i, slot) in old.0.into_iter().enumerate() {
            let (id, Some(slot)) = (RuleId(i as u32), slot) else {
                continue;
            };
            if let (Action::Suspend { .. }, Some(event)) = (&slot.rule.action, slot.rule.event) {
                self.by_event[event.index()].suspend.push(id);
                self.rules.insert(id, *slot);
            }
        }
        for rule in rules {
            self.add(rule);
        }
    }

    pub fn state(&self) -> i64 {
        self.state
    }

    pub fn set_state(&mut self, state: i64) {
        self.state = state;
    }

    /// The live rules in the order of checks (written order unless `ctl` placed one), with
    /// their counters.
    pub fn rules(&self) -> impl Iterator<Item = (RuleId, &Rule, RuleStats)> {
        let mut order: Vec<(u64, RuleId, &Slot)> =
            self.rules.iter().map(|(id, s)| (s.rank, id, s)).collect();
        if self.placed {
            order.sort_unstable_by_key(|e| e.0);
        }
        order.into_iter().map(|(_, id, s)| {
            let armed = match (&s.rule.action, s.rule.event) {
                // Every fire of its event in a state its gate passes re-armed it.
                (Action::Request { .. }, Some(event)) => {
                    self.by_event[event.index()].fires_for(s.rule.state) - s.fires_at_add
                }
                _ => 0,
            };
            let stats = RuleStats {
                hits: s.hits,
                matched: s.matched,
                armed,
            };
            (id, &s.rule, stats)
        })
    }

    /// The armed rules of the active list, in written order.
    pub fn armed(&self) -> &[RuleId] {
        &self.active.ids
    }

    /// Whether the rule is in the active list.
    pub fn is_armed(&self, id: RuleId) -> bool {
        self.active.contains(id)
    }

    /// Whether any request-checked rule could act on a request now (the executor's fast
    /// path: with nothing armed and no standing rule, a check is skipped).
    pub fn has_checks(&self) -> bool {
        !self.active.is_empty() || !self.standing.is_empty()
    }

    /// What firing `event` in the current state does (cached).
    fn compiled(&mut self, event: Event) -> Compiled {
        let key = (event, self.state);
        if let Some(c) = self.compiled.get(&key) {
            return c.clone();
        }
        let state = self.state;
        let passes = |gate: i64| gate_passes(gate, state);
        let rules = &self.by_event[event.index()];
        let armed: Vec<Armable> = rules
            .checked
            .iter()
            .filter(|a| passes(a.gate))
            .cloned()
            .collect();
        let compiled = Compiled {
            active: (!armed.is_empty()).then(|| Arc::new(RuleIndex::build(&armed))),
            new_state: rules
                .set_state
                .iter()
                .find(|e| passes(e.1))
                .map(|e| (e.0, e.2)),
        };
        if self.compiled.len() >= MAX_COMPILED {
            self.compiled.clear();
        }
        self.compiled.insert(key, compiled.clone());
        compiled
    }

    /// Processes every rule of `event` against the state from before the event (spec §1):
    /// request-checked rules that pass the state gate replace the active list, the first
    /// written set-state rule sets the state, breakpoints hit once and are deleted.
    pub fn fire(&mut self, event: Event) -> Fired {
        let state = self.state;
        let rules = &mut self.by_event[event.index()];
        rules.fires += 1;
        if rules.is_empty() {
            // The common case (most events have no rule): nothing to process, and the count
            // per state is read only as a difference from a rule's `fires_at_add`, so a
            // count no rule of the event sees need not move.
            return Fired::default();
        }
        *rules.fires_in_state.entry(state).or_default() += 1;
        let compiled = self.compiled(event);
        let mut fired = Fired::default();
        let rules = &mut self.by_event[event.index()];
        if !rules.suspend.is_empty() {
            let hit: Vec<RuleId> = rules
                .suspend
                .iter()
                .copied()
                .filter(|id| {
                    self.rules
                        .get(id)
                        .is_some_and(|s| gate_passes(s.rule.state, state))
                })
                .collect();
            for id in hit {
                if let Some(Rule {
                    action: Action::Suspend { tag },
                    ..
                }) = self.remove(id)
                {
                    fired.suspend.push(tag);
                }
            }
        }
        if !self.by_event[event.index()].power_cut.is_empty() {
            fired.power_cut = self.power_cut_rule(event, state);
        }
        if let Some(active) = compiled.active {
            self.active = active;
            fired.rearmed = true;
        }
        if let Some((id, n)) = compiled.new_state {
            self.state = n;
            fired.state_change = Some((state, n));
            fired.state_rule = Some(id);
            if let Some(slot) = self.rules.get_mut(&id) {
                slot.hits += 1;
            }
        }
        fired
    }

    /// The first `[power-cut]` rule of `event` that acts on this firing (its counting keys
    /// count the firings in a state its gate passes); later ones do not see the firing.
    fn power_cut_rule(&mut self, event: Event, state: i64) -> Option<(RuleId, CutMode)> {
        let ids = self.by_event[event.index()].power_cut.clone();
        for id in ids {
            let seed = self.seed;
            let Some(slot) = self.rules.get_mut(&id) else {
                continue;
            };
            let Action::PowerCut { mode, counting: c } = slot.rule.action else {
                continue;
            };
            if !gate_passes(slot.rule.state, state) {
                continue;
            }
            slot.matched += 1;
            let nth = slot.matched;
            if nth <= c.skip || !(nth - c.skip).is_multiple_of(c.every.max(1)) {
                continue;
            }
            if c.probability < 1.0 && !acts(seed, id.0, nth, c.probability) {
                continue;
            }
            slot.hits += 1;
            if c.count.is_some_and(|n| slot.hits >= n) {
                self.remove(id);
            }
            return Some((id, mode));
        }
        None
    }

    /// Checks one request: the active list, then the standing rules, each in the order of
    /// checks; the first rule that acts decides, except that a `[delay]` without `errno`
    /// that acts lets the check go on and carries what the first later rule that acts
    /// decided in [`Decision::then`] (see the module doc). The effect is made concrete
    /// here: a caller that holds the engine under a lock uses [`Engine::decide`] instead.
    pub fn check(&mut self, iotype: IoType, offset: u64, len: u64) -> Verdict {
        self.decide(iotype, offset, len).resolved()
    }

    /// [`Engine::check`] without making the effect concrete: the decision, in time that does
    /// not grow with the request or with the acting rule's numbers (see [`Plan`]).
    pub fn decide(&mut self, iotype: IoType, offset: u64, len: u64) -> Verdict<Plan> {
        // One buffer for the candidates, kept between checks: no allocation per request.
        let mut candidates = std::mem::take(&mut self.scratch);
        let mut delay = None;
        candidates.clear();
        self.active
            .candidates(iotype, offset, len, None, &mut candidates);
        let mut verdict = self.first_to_act(&mut candidates, offset, len, true, &mut delay);
        if verdict.is_none() {
            candidates.clear();
            self.standing
                .candidates(iotype, offset, len, Some(self.state), &mut candidates);
            verdict = self.first_to_act(&mut candidates, offset, len, false, &mut delay);
        }
        self.scratch = candidates;
        let verdict = verdict.unwrap_or(Verdict::Pass);
        match delay {
            None => verdict,
            Some(mut d) => {
                if let Verdict::Act(then) = verdict {
                    d.then = Some(Box::new(then));
                }
                Verdict::Act(d)
            }
        }
    }

    /// Offers the request to `candidates` in the order of checks; the first that acts
    /// decides. A delay that acts (without `errno`) goes to `delay` and the offer goes on;
    /// once a delay applies, later `[delay]` rules do not see the request.
    fn first_to_act(
        &mut self,
        candidates: &mut [RuleId],
        offset: u64,
        len: u64,
        from_active_list: bool,
        delay: &mut Option<Decision<Plan>>,
    ) -> Option<Verdict<Plan>> {
        if self.placed {
            // Some rule is out of number order: order by rank (one lookup per candidate).
            let slots = &self.rules;
            candidates.sort_unstable_by_key(|id| slots.get(id).map_or(u64::MAX, |s| s.rank));
        } else if !candidates.is_sorted() {
            // Range-less rules come in written order already; rules found by range may not.
            candidates.sort_unstable();
        }
        let mut last = None;
        for &id in candidates.iter() {
            if last == Some(id) {
                continue; // a rule whose several intervals meet the request
            }
            last = Some(id);
            match self.offer(id, offset, len, from_active_list, delay.is_some()) {
                Some(Verdict::Act(d))
                    if delay.is_none()
                        && matches!(d.effect.fault(), Fault::Delay { errno: 0, .. }) =>
                {
                    *delay = Some(d);
                }
                Some(v) => return Some(v),
                None => {}
            }
        }
        None
    }

    /// One matching rule sees the request: counts the match, applies the counting keys and,
    /// if it acts, plans its fault (see [`Plan`]). `None`: it does not act (later rules
    /// decide). `delayed`: a delay applies already, so a `[delay]` rule does not see the
    /// request.
    fn offer(
        &mut self,
        id: RuleId,
        offset: u64,
        len: u64,
        armed: bool,
        delayed: bool,
    ) -> Option<Verdict<Plan>> {
        let seed = self.seed;
        let slot = self.rules.get_mut(&id)?;
        let Action::Request { fault, matches } = &slot.rule.action else {
            return None;
        };
        if delayed && matches!(fault, Fault::Delay { .. }) {
            return None;
        }
        slot.matched += 1;
        let nth = slot.matched;
        let c = matches.counting;
        if nth <= c.skip || !(nth - c.skip).is_multiple_of(c.every.max(1)) {
            return None;
        }
        if c.probability < 1.0 && !acts(seed, id.0, nth, c.probability) {
            return None;
        }
        if let Fault::Error { errno: 0, .. } = fault {
            // An exemption: the request passes and later rules stay hidden. QEMU does not
            // delete a `once` rule here, since it did not fail anything.
            return Some(Verdict::Pass);
        }
        slot.hits += 1;
        let effect = Plan {
            fault: fault.clone(),
            range: matches.range.clone(),
            offset,
            len,
            seed,
            rule: id.0,
            nth,
        };
        let decision = Decision {
            rule: id,
            armed_by: if armed { slot.rule.event } else { None },
            action: fault.section(),
            effect,
            then: None,
        };
        if c.count.is_some_and(|n| slot.hits >= n) {
            self.remove(id);
        }
        Some(Verdict::Act(decision))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::faults::Effect;
    use crate::engine::ranges::SectorSet;
    use crate::engine::rules::{Counting, Origin, RequestMatch};

    fn inject(event: Event, state: i64, errno: i32, sector: Option<u64>, once: bool) -> Rule {
        Rule {
            event: Some(event),
            state,
            action: Action::Request {
                fault: Fault::Error {
                    errno,
                    immediately: false,
                },
                matches: RequestMatch::qemu(sector, IoTypes::default(), once),
            },
            origin: Origin::Runtime,
        }
    }

    fn set_state(event: Event, state: i64, new_state: i64) -> Rule {
        Rule {
            event: Some(event),
            state,
            action: Action::SetState { new_state },
            origin: Origin::Runtime,
        }
    }

    fn fail(errno: i32, rule: u32, event: Event) -> Verdict {
        Verdict::Act(Decision {
            rule: RuleId(rule),
            armed_by: Some(event),
            action: "inject-error",
            effect: Effect::Fail { errno },
            then: None,
        })
    }

    #[test]
    fn there_are_48_events_with_unique_names() {
        assert_eq!(Event::ALL.len(), 48);
        for e in Event::ALL {
            assert_eq!(Event::from_name(e.name()), Some(*e));
        }
        assert_eq!(
            Event::from_name("l1_grow.alloc_table"),
            Some(Event::L1GrowAllocTable)
        );
        assert_eq!(Event::from_name("read-aio"), Option::None);
    }

    #[test]
    fn nothing_fails_before_an_event_arms_the_rule() {
        let mut e = Engine::new(vec![inject(Event::ReadAio, 0, 5, None, false)]);
        assert_eq!(e.check(IoType::Read, 0, 512), Verdict::Pass);
        e.fire(Event::ReadAio);
        assert_eq!(e.check(IoType::Read, 0, 512), fail(5, 1, Event::ReadAio));
    }

    #[test]
    fn active_list_is_sticky_across_events_and_iotypes() {
        let mut e = Engine::new(vec![inject(Event::ReadAio, 0, 28, None, false)]);
        e.fire(Event::ReadAio);
        // write_aio has no rule: the list stays armed and fails writes and flushes too.
        e.fire(Event::WriteAio);
        assert_eq!(e.check(IoType::Write, 0, 512), fail(28, 1, Event::ReadAio));
        assert_eq!(e.check(IoType::Flush, 0, 0), fail(28, 1, Event::ReadAio));
        // A failed request disarms nothing.
        assert_eq!(e.check(IoType::Read, 0, 512), fail(28, 1, Event::ReadAio));
    }

    #[test]
    fn an_event_with_matching_rules_replaces_the_active_list() {
        let mut e = Engine::new(vec![
            inject(Event::ReadAio, 0, 5, None, false),
            inject(Event::WriteAio, 0, 28, Some(8), false),
        ]);
        e.fire(Event::ReadAio);
        e.fire(Event::WriteAio);
        // The read_aio rule is no longer armed: only sector 8 fails now.
        assert_eq!(e.check(IoType::Read, 0, 512), Verdict::Pass);
        assert_eq!(
            e.check(IoType::Read, 4096, 512),
            fail(28, 2, Event::WriteAio)
        );
    }

    #[test]
    fn an_event_whose_rules_are_state_gated_out_leaves_the_list_alone() {
        let mut e = Engine::new(vec![
            inject(Event::ReadAio, 0, 5, None, false),
            inject(Event::WriteAio, 7, 28, None, false),
        ]);
        e.fire(Event::ReadAio);
        e.fire(Event::WriteAio);
        assert_eq!(e.check(IoType::Write, 0, 512), fail(5, 1, Event::ReadAio));
    }

    #[test]
    fn sector_must_lie_inside_the_request() {
        let mut e = Engine::new(vec![inject(Event::ReadAio, 0, 5, Some(8), false)]);
        e.fire(Event::ReadAio);
        assert_eq!(e.check(IoType::Read, 0, 4096), Verdict::Pass); // ends at byte 4096
        assert_eq!(e.check(IoType::Read, 0, 4097), fail(5, 1, Event::ReadAio));
        assert_eq!(e.check(IoType::Read, 4096, 1), fail(5, 1, Event::ReadAio));
        assert_eq!(e.check(IoType::Read, 4097, 100), Verdict::Pass);
        // A flush has no range: ranged rules never match it.
        assert_eq!(e.check(IoType::Flush, 0, 0), Verdict::Pass);
    }

    #[test]
    fn first_written_matching_rule_wins() {
        let mut e = Engine::new(vec![
            inject(Event::ReadAio, 0, 5, Some(0), false),
            inject(Event::ReadAio, 0, 28, None, false),
        ]);
        e.fire(Event::ReadAio);
        assert_eq!(e.check(IoType::Read, 0, 512), fail(5, 1, Event::ReadAio));
        assert_eq!(e.check(IoType::Read, 512, 512), fail(28, 2, Event::ReadAio));
    }

    #[test]
    fn errno_zero_exempts_and_hides_later_rules() {
        let mut e = Engine::new(vec![
            inject(Event::ReadAio, 0, 0, Some(0), true),
            inject(Event::ReadAio, 0, 5, None, false),
        ]);
        e.fire(Event::ReadAio);
        assert_eq!(e.check(IoType::Read, 0, 512), Verdict::Pass);
        // The exempting `once` rule did not fail anything, so it stays.
        assert_eq!(e.check(IoType::Read, 0, 512), Verdict::Pass);
        assert_eq!(e.check(IoType::Read, 512, 512), fail(5, 2, Event::ReadAio));
    }

    #[test]
    fn once_deletes_only_the_rule_that_fired() {
        let mut e = Engine::new(vec![
            inject(Event::ReadAio, 0, 28, Some(0), true),
            inject(Event::ReadAio, 0, 5, Some(1), false),
        ]);
        e.fire(Event::ReadAio);
        assert_eq!(e.check(IoType::Read, 0, 1024), fail(28, 1, Event::ReadAio));
        assert_eq!(e.check(IoType::Read, 0, 1024), fail(5, 2, Event::ReadAio));
        // Deleted for good: re-arming does not bring it back.
        e.fire(Event::ReadAio);
        assert_eq!(e.check(IoType::Read, 0, 512), Verdict::Pass);
        assert_eq!(e.rules().count(), 1);
    }

    #[test]
    fn iotype_filters_and_block_status_is_excluded_by_default() {
        let mut only_write = inject(Event::None, 0, 5, None, false);
        if let Action::Request { matches, .. } = &mut only_write.action {
            matches.iotypes = IoTypes::only(IoType::Write);
        }
        let mut e = Engine::new(vec![only_write]);
        e.fire(Event::None);
        assert_eq!(e.check(IoType::Read, 0, 512), Verdict::Pass);
        assert_eq!(e.check(IoType::Write, 0, 512), fail(5, 1, Event::None));

        let mut e = Engine::new(vec![inject(Event::None, 0, 5, None, false)]);
        e.fire(Event::None);
        assert_eq!(e.check(IoType::BlockStatus, 0, 512), Verdict::Pass);
        assert_eq!(
            e.check(IoType::WriteZeroes, 0, 512),
            fail(5, 1, Event::None)
        );
    }

    #[test]
    fn state_machine_evaluates_against_the_state_before_the_event() {
        // The spec's worked example: the second write fails.
        let mut e = Engine::new(vec![
            set_state(Event::WriteAio, 1, 2),
            inject(Event::WriteAio, 2, 5, None, false),
            set_state(Event::WriteAio, 2, 3),
        ]);
        e.fire(Event::WriteAio);
        assert_eq!(e.state(), 2);
        assert_eq!(e.check(IoType::Write, 0, 512), Verdict::Pass);
        e.fire(Event::WriteAio);
        assert_eq!(e.state(), 3);
        assert_eq!(e.check(IoType::Write, 0, 512), fail(5, 2, Event::WriteAio));
    }

    #[test]
    fn first_written_set_state_wins() {
        let mut e = Engine::new(vec![
            set_state(Event::ReadAio, 0, 5),
            set_state(Event::ReadAio, 0, 9),
        ]);
        e.fire(Event::ReadAio);
        assert_eq!(e.state(), 5);
    }

    #[test]
    fn state_zero_leaves_only_stateless_rules() {
        let mut e = Engine::new(vec![
            set_state(Event::ReadAio, 1, 0),
            inject(Event::WriteAio, 1, 5, None, false),
            inject(Event::FlushToOs, 0, 28, None, false),
        ]);
        e.fire(Event::ReadAio);
        assert_eq!(e.state(), 0);
        e.fire(Event::WriteAio);
        assert_eq!(e.check(IoType::Write, 0, 512), Verdict::Pass);
        e.fire(Event::FlushToOs);
        assert_eq!(e.check(IoType::Flush, 0, 0), fail(28, 3, Event::FlushToOs));
    }

    #[test]
    fn breakpoints_are_one_shot_and_processed_after_state() {
        let mut e = Engine::new(vec![set_state(Event::WriteAio, 1, 2)]);
        e.add(Rule {
            event: Some(Event::WriteAio),
            state: 0,
            action: Action::Suspend { tag: "a".into() },
            origin: Origin::Runtime,
        });
        let fired = e.fire(Event::WriteAio);
        assert_eq!(fired.suspend, vec!["a".to_string()]);
        assert_eq!(e.state(), 2);
        assert_eq!(e.fire(Event::WriteAio), Fired::default());
    }

    /// A tiny deterministic generator, so the property test needs no extra crate.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self, bound: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % bound
        }
    }

    #[test]
    fn the_index_answers_exactly_like_a_scan_of_the_active_list() {
        let mut rng = Lcg(7);
        for round in 0..200 {
            let mut rules = Vec::new();
            for _ in 0..rng.next(40) + 1 {
                let mut iotypes = IoTypes::only(IoType::ALL[rng.next(6) as usize]);
                if rng.next(2) == 0 {
                    iotypes = iotypes.with(IoType::ALL[rng.next(6) as usize]);
                }
                let sector = (rng.next(4) != 0).then(|| rng.next(64));
                rules.push(Rule {
                    event: Some(Event::ReadAio),
                    state: 0,
                    action: Action::Request {
                        fault: Fault::Error {
                            errno: [0, 5, 28][rng.next(3) as usize],
                            immediately: false,
                        },
                        matches: RequestMatch::qemu(sector, iotypes, false),
                    },
                    origin: Origin::Runtime,
                });
            }
            let mut e = Engine::new(rules.clone());
            e.fire(Event::ReadAio);
            for _ in 0..200 {
                let iotype = IoType::ALL[rng.next(6) as usize];
                let offset = rng.next(64 * 512 + 1024);
                let len = [0, 1, 511, 512, 4096, 16384][rng.next(6) as usize];
                let scan = rules.iter().enumerate().find(|(_, r)| {
                    matches!(&r.action, Action::Request { matches, .. }
                        if matches.matches(iotype, offset, len))
                });
                let expected = match scan {
                    Some((i, r)) => match r.action {
                        Action::Request {
                            fault: Fault::Error { errno, .. },
                            ..
                        } if errno != 0 => fail(errno, i as u32 + 1, Event::ReadAio),
                        _ => Verdict::Pass,
                    },
                    None => Verdict::Pass,
                };
                assert_eq!(
                    e.check(iotype, offset, len),
                    expected,
                    "round {round}: {iotype} at {offset}+{len}"
                );
            }
        }
    }

    /// `hits` counts the requests a rule acted on, `armed` the fires that armed it: one
    /// failing read is `hits=1`, however many events armed the rule before it.
    #[test]
    fn hits_count_requests_acted_on_and_arming_is_counted_apart() {
        let mut e = Engine::new(vec![
            inject(Event::ReadAio, 0, 5, Some(0), false),
            inject(Event::ReadAio, 2, 5, Some(0), false),
            set_state(Event::WriteAio, 1, 2),
            set_state(Event::WriteAio, 0, 7),
        ]);
        let stats = |e: &Engine| {
            e.rules()
                .map(|(_, _, s)| (s.hits, s.armed))
                .collect::<Vec<_>>()
        };
        let fired = e.fire(Event::ReadAio);
        assert!(fired.rearmed && fired.state_change.is_none());
        assert_eq!(stats(&e), vec![(0, 1), (0, 0), (0, 0), (0, 0)]);
        assert_eq!(e.check(IoType::Read, 0, 512), fail(5, 1, Event::ReadAio));
        // A request elsewhere is not acted on.
        assert_eq!(e.check(IoType::Read, 4096, 512), Verdict::Pass);
        assert_eq!(stats(&e), vec![(1, 1), (0, 0), (0, 0), (0, 0)]);
        // The first written set-state rule acts; the second is shadowed.
        let fired = e.fire(Event::WriteAio);
        assert_eq!(fired.state_change, Some((1, 2)));
        assert!(!fired.rearmed);
        e.fire(Event::ReadAio);
        assert_eq!(stats(&e), vec![(1, 2), (0, 1), (1, 0), (0, 0)]);
        assert_eq!(e.armed(), &[RuleId(1), RuleId(2)]);
        // A rule added later counts only the fires after it.
        let id = e.add(inject(Event::ReadAio, 0, 5, None, false));
        e.fire(Event::ReadAio);
        assert_eq!(e.rules().find(|(i, _, _)| *i == id).unwrap().2.armed, 1);
    }

    /// An event with no rule takes a short way that keeps no count per state; a rule added
    /// to it later, gated on a state the event fired in meanwhile, still counts exactly the
    /// fires after it, and so does one added after that rule was removed.
    #[test]
    fn a_rule_added_to_an_event_without_rules_counts_only_the_fires_after_it() {
        let mut e = Engine::new(vec![set_state(Event::WriteAio, 0, 2)]);
        e.fire(Event::WriteAio);
        assert_eq!(e.state(), 2);
        for _ in 0..3 {
            assert_eq!(e.fire(Event::ReadAio), Fired::default());
        }
        let armed = |e: &Engine, id: RuleId| e.rules().find(|(i, _, _)| *i == id).unwrap().2.armed;
        let first = e.add(inject(Event::ReadAio, 2, 5, Some(0), false));
        assert_eq!(armed(&e, first), 0);
        e.fire(Event::ReadAio);
        e.fire(Event::ReadAio);
        assert_eq!(armed(&e, first), 2);
        assert_eq!(
            e.check(IoType::Read, 0, 512),
            fail(5, first.0, Event::ReadAio)
        );
        e.remove(first);
        e.fire(Event::ReadAio);
        let second = e.add(inject(Event::ReadAio, 2, 5, Some(0), false));
        e.fire(Event::ReadAio);
        assert_eq!(armed(&e, second), 1);
    }

    #[test]
    fn removing_an_armed_rule_disarms_only_it() {
        let mut e = Engine::new(vec![
            inject(Event::ReadAio, 0, 5, Some(0), false),
            inject(Event::ReadAio, 0, 28, Some(0), false),
        ]);
        e.fire(Event::ReadAio);
        assert!(e.remove(RuleId(1)).is_some());
        assert!(!e.is_armed(RuleId(1)) && e.is_armed(RuleId(2)));
        assert_eq!(e.check(IoType::Read, 0, 512), fail(28, 2, Event::ReadAio));
        // The cached plan of read_aio was rebuilt without the removed rule.
        e.fire(Event::ReadAio);
        assert_eq!(e.check(IoType::Read, 0, 512), fail(28, 2, Event::ReadAio));
    }

    #[test]
    fn ten_thousand_rules_elsewhere_do_not_change_the_verdict() {
        let mut rules: Vec<Rule> = (0..10_000)
            .map(|i| inject(Event::ReadAio, 0, 5, Some(1 << 40 | i), false))
            .collect();
        rules.push(inject(Event::ReadAio, 0, 28, Some(8), false));
        let mut e = Engine::new(rules);
        e.fire(Event::ReadAio);
        assert_eq!(e.check(IoType::Read, 0, 4096), Verdict::Pass);
        assert_eq!(
            e.check(IoType::Read, 4096, 4096),
            fail(28, 10_001, Event::ReadAio)
        );
    }

    #[test]
    fn the_index_handles_the_ends_of_the_address_space() {
        let huge = u64::MAX / 512; // sector * 512 stays below u64::MAX
        let mut e = Engine::new(vec![
            inject(Event::ReadAio, 0, 5, Some(huge), false),
            inject(Event::ReadAio, 0, 28, Some(u64::MAX), false), // byte saturates
        ]);
        e.fire(Event::ReadAio);
        let byte = huge * 512;
        assert_eq!(e.check(IoType::Read, byte, 1), fail(5, 1, Event::ReadAio));
        assert_eq!(e.check(IoType::Read, byte - 512, 512), Verdict::Pass);
        // offset + len overflows: every byte from offset on is inside.
        assert_eq!(
            e.check(IoType::Read, u64::MAX - 10, 100),
            fail(28, 2, Event::ReadAio)
        );
        assert_eq!(e.check(IoType::Read, u64::MAX - 10, 0), Verdict::Pass);
    }

    #[test]
    fn clear_and_reload_keep_numbering_and_breakpoints() {
        let mut e = Engine::new(vec![inject(Event::ReadAio, 0, 5, None, false)]);
        e.add(Rule {
            event: Some(Event::WriteAio),
            state: 0,
            action: Action::Suspend { tag: "t".into() },
            origin: Origin::Runtime,
        });
        e.fire(Event::ReadAio);
        e.replace_rules(vec![inject(Event::ReadAio, 0, 28, None, false)]);
        let ids: Vec<u32> = e.rules().map(|(id, _, _)| id.0).collect();
        assert_eq!(
            ids,
            vec![2, 3],
            "the breakpoint keeps its number, the new rule is 3"
        );
        assert_eq!(
            e.check(IoType::Read, 0, 512),
            Verdict::Pass,
            "nothing armed"
        );
        e.fire(Event::ReadAio);
        assert_eq!(e.check(IoType::Read, 0, 512), fail(28, 3, Event::ReadAio));
        assert_eq!(e.fire(Event::WriteAio).suspend, vec!["t".to_string()]);
        e.clear();
        assert_eq!(e.add(inject(Event::ReadAio, 0, 5, None, false)), RuleId(4));
    }

    // ---- faults.md §1: standing rules, ranges and the counting keys.

    fn rule(event: Option<Event>, state: i64, fault: Fault, matches: RequestMatch) -> Rule {
        Rule {
            event,
            state,
            action: Action::Request { fault, matches },
            origin: Origin::Runtime,
        }
    }

    fn eio() -> Fault {
        Fault::Error {
            errno: 5,
            immediately: false,
        }
    }

    fn counted(skip: u64, every: u64, probability: f64, count: Option<u64>) -> RequestMatch {
        RequestMatch {
            range: Range::Any,
            iotypes: IoTypes::default(),
            counting: Counting {
                skip,
                every,
                probability,
                count,
            },
        }
    }

    fn acted(v: &Verdict) -> bool {
        matches!(v, Verdict::Act(_))
    }

    fn standing_fail(errno: i32, rule: u32) -> Verdict {
        Verdict::Act(Decision {
            rule: RuleId(rule),
            armed_by: Option::None,
            action: "inject-error",
            effect: Effect::Fail { errno },
            then: None,
        })
    }

    #[test]
    fn a_standing_rule_acts_from_the_start_and_no_event_replaces_it() {
        let mut e = Engine::new(vec![
            rule(Option::None, 0, eio(), counted(0, 1, 1.0, Option::None)),
            inject(Event::ReadAio, 0, 0, Option::None, false),
        ]);
        assert_eq!(e.check(IoType::Read, 0, 512), standing_fail(5, 1));
        // An event that arms an exemption hides the standing rule (active list first) ...
        e.fire(Event::ReadAio);
        assert_eq!(e.check(IoType::Read, 0, 512), Verdict::Pass);
        // ... and the standing rule is never replaced: an empty active list leaves it.
        assert_eq!(e.armed(), &[RuleId(2)]);
        e.remove(RuleId(2));
        assert_eq!(e.check(IoType::Read, 0, 512), standing_fail(5, 1));
    }

    #[test]
    fn a_standing_rules_state_gate_is_tested_at_each_request() {
        let mut e = Engine::new(vec![
            rule(Option::None, 2, eio(), counted(0, 1, 1.0, Option::None)),
            set_state(Event::WriteAio, 1, 2),
        ]);
        assert_eq!(e.check(IoType::Read, 0, 512), Verdict::Pass);
        e.fire(Event::WriteAio);
        assert_eq!(e.check(IoType::Read, 0, 512), standing_fail(5, 1));
        e.set_state(3);
        assert_eq!(e.check(IoType::Read, 0, 512), Verdict::Pass);
    }

    #[test]
    fn skip_every_count_act_on_the_5th_and_7th_match_then_the_rule_is_gone() {
        // The spec's example: skip = 3, every = 2, count = 2.
        let mut e = Engine::new(vec![rule(
            Option::None,
            0,
            eio(),
            counted(3, 2, 1.0, Some(2)),
        )]);
        let acts: Vec<bool> = (0..10)
            .map(|_| acted(&e.check(IoType::Read, 0, 512)))
            .collect();
        assert_eq!(
            acts,
            vec![
                false, false, false, false, true, false, true, false, false, false
            ]
        );
        assert_eq!(e.rules().count(), 0, "count reached: deleted");
    }

    #[test]
    fn a_rule_that_matches_but_does_not_act_lets_later_rules_decide() {
        let mut e = Engine::new(vec![
            rule(Option::None, 0, eio(), counted(1, 1, 1.0, Option::None)),
            rule(
                Option::None,
                0,
                Fault::Error {
                    errno: 28,
                    immediately: false,
                },
                counted(0, 1, 1.0, Option::None),
            ),
        ]);
        assert_eq!(e.check(IoType::Read, 0, 512), standing_fail(28, 2));
        assert_eq!(e.check(IoType::Read, 0, 512), standing_fail(5, 1));
        let stats: Vec<(u64, u64)> = e.rules().map(|(_, _, s)| (s.hits, s.matched)).collect();
        assert_eq!(stats, vec![(1, 2), (1, 1)]);
    }

    #[test]
    fn probability_is_seeded_by_rule_and_match_count() {
        let run = |seed: u64| {
            let mut e = Engine::with_seed(
                vec![rule(
                    Option::None,
                    0,
                    eio(),
                    counted(0, 1, 0.05, Option::None),
                )],
                seed,
            );
            (0..10_000)
                .map(|i| acted(&e.check(IoType::Read, i * 512, 512)))
                .collect::<Vec<bool>>()
        };
        let a = run(7);
        assert_eq!(a, run(7), "same seed, same decisions");
        assert_ne!(a, run(8), "another seed, other decisions");
        // Binomial(10000, 0.05): mean 500, sd 21.8; the band is more than 6 sd wide.
        let n = a.iter().filter(|x| **x).count();
        assert!((370..=630).contains(&n), "{n} of 10000 at p = 0.05");
        // Probability 0 never acts, 1 always does.
        let mut never = Engine::new(vec![rule(
            Option::None,
            0,
            eio(),
            counted(0, 1, 0.0, Option::None),
        )]);
        assert!((0..100).all(|_| !acted(&never.check(IoType::Read, 0, 512))));
    }

    #[test]
    fn sectors_ranges_match_by_overlap_and_flushes_never() {
        let set = Arc::new(SectorSet::parse("8-15, 100").unwrap());
        let matches = RequestMatch {
            range: Range::Sectors(set),
            iotypes: IoTypes::default(),
            counting: Counting::default(),
        };
        let mut e = Engine::new(vec![rule(Option::None, 0, eio(), matches)]);
        assert_eq!(e.check(IoType::Read, 0, 4096), Verdict::Pass);
        assert_eq!(e.check(IoType::Read, 4095, 2), standing_fail(5, 1));
        assert_eq!(e.check(IoType::Write, 8191, 1), standing_fail(5, 1));
        assert_eq!(e.check(IoType::Read, 8192, 100 * 512 - 8192), Verdict::Pass);
        assert_eq!(
            e.check(IoType::Read, 100 * 512 + 511, 1),
            standing_fail(5, 1)
        );
        assert_eq!(e.check(IoType::Flush, 0, 0), Verdict::Pass);
    }

    #[test]
    fn an_event_armed_rule_of_any_section_replaces_the_active_list() {
        let delay = Fault::Delay {
            latency: std::time::Duration::from_millis(5),
            jitter: std::time::Duration::ZERO,
            errno: 0,
        };
        let mut e = Engine::new(vec![
            inject(Event::ReadAio, 0, 5, Option::None, false),
            rule(
                Some(Event::WriteAio),
                0,
                delay,
                counted(0, 1, 1.0, Option::None),
            ),
        ]);
        e.fire(Event::ReadAio);
        e.fire(Event::WriteAio);
        assert_eq!(e.armed(), &[RuleId(2)], "the delay rule emptied the list");
        let Verdict::Act(d) = e.check(IoType::Read, 0, 512) else {
            panic!("the delay acts on reads too")
        };
        assert_eq!(d.armed_by, Some(Event::WriteAio));
        assert_eq!(d.action, "delay");
    }

    #[test]
    fn actions_only_match_requests_they_can_apply_to() {
        let m = || counted(0, 1, 1.0, Option::None);
        let mut e = Engine::new(vec![
            rule(Option::None, 0, Fault::DropWrite, m()),
            rule(
                Option::None,
                0,
                Fault::Corrupt {
                    mode: crate::engine::faults::CorruptMode::Flip,
                    bits: 1,
                    bytes: 512,
                },
                m(),
            ),
        ]);
        let action = |e: &mut Engine, t: IoType, len: u64| match e.check(t, 0, len) {
            Verdict::Act(d) => Some(d.action),
            Verdict::Pass => Option::None,
        };
        assert_eq!(action(&mut e, IoType::Write, 512), Some("drop-write"));
        assert_eq!(action(&mut e, IoType::WriteZeroes, 512), Some("drop-write"));
        assert_eq!(action(&mut e, IoType::Read, 512), Some("corrupt"));
        assert_eq!(action(&mut e, IoType::Flush, 0), Option::None);
    }

    #[test]
    fn every_action_resolves_for_its_request() {
        use crate::engine::faults::{CorruptMode, TornMode};
        let cases: Vec<(Fault, IoType)> = vec![
            (
                Fault::Delay {
                    latency: std::time::Duration::from_millis(2),
                    jitter: std::time::Duration::ZERO,
                    errno: 110,
                },
                IoType::Flush,
            ),
            (
                Fault::Corrupt {
                    mode: CorruptMode::Random,
                    bits: 1,
                    bytes: 16,
                },
                IoType::Read,
            ),
            (Fault::DropWrite, IoType::Write),
            (
                Fault::TornWrite {
                    keep: Some(1024),
                    mode: TornMode::Prefix,
                    unit: 512,
                    errno: 0,
                },
                IoType::Write,
            ),
            (Fault::ShortIo { length: Some(512) }, IoType::Read),
            (Fault::MisdirectWrite { shift: -4096 }, IoType::Write),
            (Fault::Suspend { tag: "t".into() }, IoType::Write),
        ];
        for (fault, iotype) in cases {
            let name = fault.section();
            let mut e = Engine::new(vec![rule(
                Option::None,
                0,
                fault,
                counted(0, 1, 1.0, Option::None),
            )]);
            let len = if iotype == IoType::Flush { 0 } else { 4096 };
            let Verdict::Act(d) = e.check(iotype, 8192, len) else {
                panic!("{name} did not act")
            };
            assert_eq!(d.action, name);
            let ok = match (name, &d.effect) {
                ("delay", Effect::Delay { wait, errno }) => {
                    *wait == std::time::Duration::from_millis(2) && *errno == 110
                }
                ("corrupt", Effect::Corrupt { edits }) => {
                    edits.len() == 16 && edits.iter().all(|e| (8192..12288).contains(&e.offset()))
                }
                ("drop-write", Effect::DropWrite) => true,
                ("torn-write", Effect::Torn { kept, errno }) => {
                    kept == &vec![(8192, 9216)] && *errno == 0
                }
                ("short-io", Effect::Short { end }) => *end == 8192 + 512,
                ("misdirect-write", Effect::Misdirect { shift }) => *shift == -4096,
                ("suspend", Effect::Suspend { tag }) => tag == "t",
                _ => false,
            };
            assert!(ok, "{name}: {:?}", d.effect);
        }
    }

    fn delay(ms: u64, errno: i32) -> Fault {
        Fault::Delay {
            latency: std::time::Duration::from_millis(ms),
            jitter: std::time::Duration::ZERO,
            errno,
        }
    }

    fn hits(e: &Engine) -> Vec<(u32, u64, u64)> {
        e.rules()
            .map(|(id, _, s)| (id.0, s.hits, s.matched))
            .collect()
    }

    #[test]
    fn a_delay_composes_with_the_first_later_rule_that_acts() {
        let m = || counted(0, 1, 1.0, Option::None);
        let mut e = Engine::new(vec![rule(Option::None, 0, delay(5, 0), m())]);
        // A suspend added later is not hidden by the standing delay.
        e.add(rule(
            Option::None,
            0,
            Fault::Suspend { tag: "S".into() },
            counted(0, 1, 1.0, Some(1)),
        ));
        let Verdict::Act(d) = e.check(IoType::Write, 0, 4096) else {
            panic!("the delay acts")
        };
        assert_eq!(d.action, "delay");
        let then = d.then.expect("the suspend decides what follows the wait");
        assert_eq!(then.rule, RuleId(2));
        assert_eq!(then.effect, Effect::Suspend { tag: "S".into() });
        // Each rule saw the request once; the suspend (count = 1) is gone.
        assert_eq!(hits(&e), vec![(1, 1, 1)]);
        let Verdict::Act(d) = e.check(IoType::Write, 0, 4096) else {
            panic!("the delay acts")
        };
        assert_eq!(
            d.then,
            Option::None,
            "nothing after the delay acts: untouched"
        );
    }

    #[test]
    fn one_delay_per_check_and_a_delay_with_errno_ends_the_check() {
        let m = || counted(0, 1, 1.0, Option::None);
        let mut e = Engine::new(vec![
            rule(Option::None, 0, delay(5, 0), m()),
            rule(Option::None, 0, delay(7, 110), m()),
            rule(Option::None, 0, eio(), m()),
        ]);
        let Verdict::Act(d) = e.check(IoType::Read, 0, 512) else {
            panic!("the delay acts")
        };
        assert_eq!(d.rule, RuleId(1));
        // The second delay does not see the request; the error decides after the wait.
        assert_eq!(d.then.as_ref().map(|t| t.rule), Some(RuleId(3)));
        assert_eq!(hits(&e), vec![(1, 1, 1), (2, 0, 0), (3, 1, 1)]);
        // Without the first delay, the timeout ends the check: the error is hidden.
        e.remove(RuleId(1));
        let Verdict::Act(d) = e.check(IoType::Read, 0, 512) else {
            panic!("the timeout acts")
        };
        assert_eq!(d.rule, RuleId(2));
        assert_eq!(d.then, Option::None);
        assert_eq!(hits(&e), vec![(2, 1, 1), (3, 1, 1)]);
    }

    #[test]
    fn an_exemption_after_a_delay_lets_the_request_go_on_after_the_wait() {
        let m = || counted(0, 1, 1.0, Option::None);
        let mut e = Engine::new(vec![
            rule(Option::None, 0, delay(5, 0), m()),
            rule(
                Option::None,
                0,
                Fault::Error {
                    errno: 0,
                    immediately: false,
                },
                m(),
            ),
            rule(Option::None, 0, eio(), m()),
        ]);
        let Verdict::Act(d) = e.check(IoType::Read, 0, 512) else {
            panic!("the delay acts")
        };
        assert_eq!((d.rule, d.then), (RuleId(1), Option::None));
        assert_eq!(hits(&e)[2], (3, 0, 0), "hidden by the exemption");
    }

    #[test]
    fn a_rule_placed_first_or_before_n_is_checked_there_and_keeps_a_new_number() {
        let m = || counted(0, 1, 1.0, Option::None);
        let errno = |n: i32| Fault::Error {
            errno: n,
            immediately: false,
        };
        let mut e = Engine::new(vec![
            rule(Option::None, 0, errno(5), m()),
            rule(Option::None, 0, errno(28), m()),
        ]);
        assert_eq!(e.check(IoType::Read, 0, 512), standing_fail(5, 1));
        let r3 = e
            .add_placed(rule(Option::None, 0, errno(61), m()), Placement::First)
            .unwrap();
        assert_eq!(r3, RuleId(3));
        assert_eq!(e.check(IoType::Read, 0, 512), standing_fail(61, 3));
        e.remove(r3);
        let r4 = e
            .add_placed(
                rule(Option::None, 0, errno(22), m()),
                Placement::Before(RuleId(2)),
            )
            .unwrap();
        assert_eq!(r4, RuleId(4));
        e.remove(RuleId(1));
        assert_eq!(e.check(IoType::Read, 0, 512), standing_fail(22, 4));
        let order: Vec<u32> = e.rules().map(|(id, _, _)| id.0).collect();
        assert_eq!(order, vec![4, 2], "listed in the order of checks");
        assert_eq!(
            e.add_placed(
                rule(Option::None, 0, eio(), m()),
                Placement::Before(RuleId(9))
            ),
            Err(RuleId(9))
        );
        // Many placements at one spot outrun the gap between ranks: renumbered, in order.
        for _ in 0..100 {
            e.add_placed(
                rule(Option::None, 0, eio(), m()),
                Placement::Before(RuleId(2)),
            )
            .unwrap();
        }
        let order: Vec<u32> = e.rules().map(|(id, _, _)| id.0).collect();
        assert_eq!(order.first(), Some(&4));
        assert_eq!(order.last(), Some(&2));
        assert!(order[1..order.len() - 1].is_sorted(), "{order:?}");
    }

    #[test]
    fn rules_print_their_new_keys_and_qemu_rules_print_as_before() {
        let r = inject(Event::ReadAio, 0, 5, Some(8), true);
        assert_eq!(
            r.to_string(),
            "event=read_aio state=any inject-error errno=EIO (5) range=sector 8 (byte 4096) \
             iotype=default once=on"
        );
        let m = RequestMatch {
            range: Range::Sectors(Arc::new(SectorSet::parse("0-7").unwrap())),
            iotypes: IoTypes::only(IoType::Read),
            counting: Counting {
                skip: 1,
                every: 2,
                probability: 0.5,
                count: Some(3),
            },
        };
        let d = rule(
            Option::None,
            2,
            Fault::Delay {
                latency: std::time::Duration::from_millis(5),
                jitter: std::time::Duration::from_micros(250),
                errno: 0,
            },
            m,
        );
        assert_eq!(
            d.to_string(),
            "standing state=2 delay latency=5ms jitter=250us range=sectors 0-7 iotype=read \
             skip=1 every=2 probability=0.5 count=3"
        );
    }
}
