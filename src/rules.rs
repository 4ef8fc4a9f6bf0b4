//! The rule engine: QEMU blkdebug's rules and the one decision function.
//!
//! Contract (spec §1): rules belong to one [`Event`]. [`Engine::fire`] processes every rule of
//! the event whose `state` gate is 0 or equals the state from *before* the event:
//! inject-error rules replace the active list (the first one empties it), set-state rules set
//! the pending state (first written wins), suspend rules are one-shot and hand their tag back.
//! [`Engine::check`] matches a request against the active list: the first rule, in written
//! order, whose range and iotype match wins; errno 0 exempts; `once` deletes the rule.
//!
//! The engine is plain data: no FUSE, no I/O, no locks. The caller (see `mount.rs`) holds it
//! under one mutex for the duration of a single `fire` or `check` call only.
//!
//! Cost: neither call walks the rules. What a fire does in a given state (the new active
//! list, the new state) is computed once per (event, state) and cached until the rules
//! change (adding or deleting a rule, a `once` rule failing a request included, costs the
//! next fire of that event one pass over that event's rules); hit counts are derived from per-event fire counters. The active list is indexed
//! by the byte each rule names, so a check looks only at sector-less rules and at the bytes
//! inside the request. Breakpoints are few and one-shot, and are scanned.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;

/// Defines [`Event`] with its QEMU name table in one place, so the parser, `check` output and
/// log lines can never disagree on a name.
macro_rules! events {
    ($($variant:ident => $name:literal),* $(,)?) => {
        /// A blkdebug event (QEMU's `BlkdebugEvent`, all 48 names, in QEMU's order).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Event { $($variant),* }

        impl Event {
            /// Every event, in QEMU's order.
            pub const ALL: &'static [Event] = &[$(Event::$variant),*];

            /// QEMU's name of the event.
            pub fn name(self) -> &'static str {
                match self { $(Event::$variant => $name),* }
            }
        }
    };
}

events! {
    L1Update => "l1_update",
    L1GrowAllocTable => "l1_grow_alloc_table",
    L1GrowWriteTable => "l1_grow_write_table",
    L1GrowActivateTable => "l1_grow_activate_table",
    L2Load => "l2_load",
    L2Update => "l2_update",
    L2UpdateCompressed => "l2_update_compressed",
    L2AllocCowRead => "l2_alloc_cow_read",
    L2AllocWrite => "l2_alloc_write",
    ReadAio => "read_aio",
    ReadBackingAio => "read_backing_aio",
    ReadCompressed => "read_compressed",
    WriteAio => "write_aio",
    WriteCompressed => "write_compressed",
    VmstateLoad => "vmstate_load",
    VmstateSave => "vmstate_save",
    CowRead => "cow_read",
    CowWrite => "cow_write",
    ReftableLoad => "reftable_load",
    ReftableGrow => "reftable_grow",
    ReftableUpdate => "reftable_update",
    RefblockLoad => "refblock_load",
    RefblockUpdate => "refblock_update",
    RefblockUpdatePart => "refblock_update_part",
    RefblockAlloc => "refblock_alloc",
    RefblockAllocHookup => "refblock_alloc_hookup",
    RefblockAllocWrite => "refblock_alloc_write",
    RefblockAllocWriteBlocks => "refblock_alloc_write_blocks",
    RefblockAllocWriteTable => "refblock_alloc_write_table",
    RefblockAllocSwitchTable => "refblock_alloc_switch_table",
    ClusterAlloc => "cluster_alloc",
    ClusterAllocBytes => "cluster_alloc_bytes",
    ClusterFree => "cluster_free",
    FlushToOs => "flush_to_os",
    FlushToDisk => "flush_to_disk",
    PwritevRmwHead => "pwritev_rmw_head",
    PwritevRmwAfterHead => "pwritev_rmw_after_head",
    PwritevRmwTail => "pwritev_rmw_tail",
    PwritevRmwAfterTail => "pwritev_rmw_after_tail",
    Pwritev => "pwritev",
    PwritevZero => "pwritev_zero",
    PwritevDone => "pwritev_done",
    EmptyImagePrepare => "empty_image_prepare",
    L1ShrinkWriteTable => "l1_shrink_write_table",
    L1ShrinkFreeL2Clusters => "l1_shrink_free_l2_clusters",
    CorWrite => "cor_write",
    ClusterAllocSpace => "cluster_alloc_space",
    None => "none",
}

impl Event {
    /// Looks an event up by QEMU name. Dotted names of QEMU 2.x (`l1_grow.alloc_table`) are
    /// aliases of the underscore names.
    pub fn from_name(name: &str) -> Option<Event> {
        let name = name.replace('.', "_");
        Event::ALL.iter().copied().find(|e| e.name() == name)
    }

    /// Whether a FUSE view of a raw image can ever fire this event (spec §2). Rules on other
    /// events are accepted, as QEMU does, and warned about at load.
    pub fn fires_in_fuse_view(self) -> bool {
        use Event::*;
        matches!(
            self,
            None | ReadAio
                | WriteAio
                | FlushToOs
                | FlushToDisk
                | Pwritev
                | PwritevZero
                | PwritevDone
                | PwritevRmwHead
                | PwritevRmwAfterHead
                | PwritevRmwTail
                | PwritevRmwAfterTail
        )
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The type of an I/O request, as blkdebug's `iotype` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoType {
    Read,
    Write,
    WriteZeroes,
    Discard,
    Flush,
    BlockStatus,
}

impl IoType {
    pub const ALL: [IoType; 6] = [
        IoType::Read,
        IoType::Write,
        IoType::WriteZeroes,
        IoType::Discard,
        IoType::Flush,
        IoType::BlockStatus,
    ];

    pub fn name(self) -> &'static str {
        match self {
            IoType::Read => "read",
            IoType::Write => "write",
            IoType::WriteZeroes => "write-zeroes",
            IoType::Discard => "discard",
            IoType::Flush => "flush",
            IoType::BlockStatus => "block-status",
        }
    }

    pub fn from_name(name: &str) -> Option<IoType> {
        IoType::ALL.into_iter().find(|t| t.name() == name)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for IoType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of [`IoType`]s. The default is QEMU's: everything but `block-status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoTypes(u8);

impl IoTypes {
    pub fn only(t: IoType) -> IoTypes {
        IoTypes(t.bit())
    }

    pub fn with(self, t: IoType) -> IoTypes {
        IoTypes(self.0 | t.bit())
    }

    pub fn contains(self, t: IoType) -> bool {
        self.0 & t.bit() != 0
    }
}

impl Default for IoTypes {
    fn default() -> Self {
        let all = IoType::ALL.iter().fold(0, |acc, t| acc | t.bit());
        IoTypes(all & !IoType::BlockStatus.bit())
    }
}

impl fmt::Display for IoTypes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == IoTypes::default() {
            return f.write_str("default");
        }
        let names: Vec<&str> = IoType::ALL
            .iter()
            .filter(|t| self.contains(**t))
            .map(|t| t.name())
            .collect();
        f.write_str(&names.join("|"))
    }
}

/// Which requests an armed inject-error rule applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestMatch {
    /// `sector`: the byte `sector * 512` must lie inside the request. `None` matches any
    /// request, including a flush (which has no range).
    pub sector: Option<u64>,
    pub iotypes: IoTypes,
}

impl RequestMatch {
    /// QEMU's `rule_check` predicate: a zero-length request (a flush) has no range, so only
    /// sector-less rules match it. The engine answers it through [`ActiveSet`]'s index; this
    /// plain form is the reference the index is tested against.
    #[cfg(test)]
    fn matches(&self, iotype: IoType, offset: u64, len: u64) -> bool {
        let in_range = match self.sector {
            None => true,
            Some(sector) => {
                let byte = sector.saturating_mul(512);
                len > 0 && byte >= offset && byte - offset < len
            }
        };
        in_range && self.iotypes.contains(iotype)
    }
}

/// What a rule does when its event fires.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Arm an error: requests matching `matches` fail with `errno` (0: pass, and hide later
    /// rules). `once` deletes the rule when it fails a request.
    InjectError {
        errno: i32,
        matches: RequestMatch,
        once: bool,
        immediately: bool,
    },
    /// Set the state once the event has been processed.
    SetState { new_state: i64 },
    /// Park the request under `tag` (one-shot breakpoint).
    Suspend { tag: String },
}

/// Where a rule came from, for messages (`rule 3 (rules.ini:12)`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    File { path: String, line: usize },
    CommandLine { index: usize },
    Runtime,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File { path, line } => write!(f, "{path}:{line}"),
            Origin::CommandLine { index } => write!(f, "command line rule #{index}"),
            Origin::Runtime => f.write_str("added at run time"),
        }
    }
}

/// One rule: when `event` fires in `state` (0 = any), take `action`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub event: Event,
    pub state: i64,
    pub action: Action,
    pub origin: Origin,
}

impl fmt::Display for Rule {
    /// One line per rule, the shape `blkdebugfs check` prints.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = if self.state == 0 {
            "any".to_string()
        } else {
            self.state.to_string()
        };
        write!(f, "event={} state={} ", self.event, state)?;
        match &self.action {
            Action::InjectError {
                errno,
                matches,
                once,
                immediately,
            } => {
                let range = match matches.sector {
                    None => "any".to_string(),
                    Some(s) => format!("sector {s} (byte {})", s.saturating_mul(512)),
                };
                write!(
                    f,
                    "inject-error errno={} range={} iotype={} once={}",
                    crate::errno::describe(*errno),
                    range,
                    matches.iotypes,
                    if *once { "on" } else { "off" }
                )?;
                if *immediately {
                    f.write_str(" immediately=on")?;
                }
                Ok(())
            }
            Action::SetState { new_state } => write!(f, "set-state new_state={new_state}"),
            Action::Suspend { tag } => write!(f, "break tag={tag}"),
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
    /// The event replaced the active list (its inject-error rules that pass the state gate
    /// are armed now, see [`Engine::armed`]).
    pub rearmed: bool,
    /// The state before and after, when a set-state rule of the event changed it.
    pub state_change: Option<(i64, i64)>,
}

/// A rule's counters, as `rules` shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleStats {
    /// Requests the rule acted on: failed (inject-error), suspended (breakpoint), or whose
    /// event it moved the state on (set-state).
    pub hits: u64,
    /// How often its event armed it (inject-error rules only; 0 for the others).
    pub armed: u64,
}

/// The outcome of checking a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail {
        errno: i32,
        rule: RuleId,
        /// The event that armed the rule.
        event: Event,
    },
}

struct Slot {
    rule: Rule,
    /// Requests this rule acted on (see [`RuleStats::hits`]).
    hits: u64,
    /// The fire counter of the rule's (event, state gate) when the rule was added: the rule
    /// was processed once per fire since, so its hit count needs no per-fire update.
    fires_at_add: u64,
}

/// The rules of one event, split by kind, in written order, and how often the event fired.
#[derive(Default)]
struct EventRules {
    inject: Vec<Armable>,
    /// (id, state gate, new state).
    set_state: Vec<(RuleId, i64, i64)>,
    suspend: Vec<RuleId>,
    fires: u64,
    fires_in_state: HashMap<i64, u64>,
}

impl EventRules {
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
    /// The new active list, or `None` when no inject-error rule passes the state gate (the
    /// list then stays as it is).
    active: Option<Arc<ActiveSet>>,
    /// The first written set-state rule that passes the gate, and its new state.
    new_state: Option<(RuleId, i64)>,
}

/// An inject-error rule as the index needs it, kept beside its id so that compiling a plan
/// never looks rules up.
#[derive(Clone, Copy)]
struct Armable {
    id: RuleId,
    gate: i64,
    /// The byte the rule's sector names (`sector * 512`), or `None` for any request.
    byte: Option<u64>,
    iotypes: IoTypes,
}

/// An armed list of inject-error rules, indexed for [`Engine::check`]: sector-less rules in
/// written order, and rules with a sector sorted by the byte they name. A check looks at the
/// sector-less rules and at the bytes inside the request only, so its cost does not grow
/// with the number of rules elsewhere on the image.
#[derive(Clone, Default)]
struct ActiveSet {
    /// Every rule of the set, in written (= id) order.
    ids: Vec<RuleId>,
    anywhere: Vec<(RuleId, IoTypes)>,
    /// Sorted by (byte, id).
    at_byte: Vec<(u64, RuleId, IoTypes)>,
}

impl ActiveSet {
    /// `armed` in written order.
    fn build(armed: &[Armable]) -> ActiveSet {
        let mut set = ActiveSet {
            ids: armed.iter().map(|a| a.id).collect(),
            ..ActiveSet::default()
        };
        for a in armed {
            match a.byte {
                None => set.anywhere.push((a.id, a.iotypes)),
                Some(byte) => set.at_byte.push((byte, a.id, a.iotypes)),
            }
        }
        // Stable, and ids are already in order, so (byte, id) order results.
        set.at_byte.sort_by_key(|e| e.0);
        set
    }

    fn contains(&self, id: RuleId) -> bool {
        self.ids.binary_search(&id).is_ok()
    }

    /// Deletes one rule in place (a `once` rule that failed, `remove N`).
    fn remove(&mut self, id: RuleId) {
        let Ok(at) = self.ids.binary_search(&id) else {
            return;
        };
        self.ids.remove(at);
        self.anywhere.retain(|e| e.0 != id);
        self.at_byte.retain(|e| e.1 != id);
    }

    /// The first written rule matching the request (QEMU's `rule_check` predicate: a
    /// zero-length request, a flush, has no range, so only sector-less rules match it).
    fn first_match(&self, iotype: IoType, offset: u64, len: u64) -> Option<RuleId> {
        let mut best = self
            .anywhere
            .iter()
            .find(|(_, types)| types.contains(iotype))
            .map(|(id, _)| *id);
        if len > 0 {
            let start = self.at_byte.partition_point(|e| e.0 < offset);
            let end = offset.checked_add(len);
            for &(byte, id, types) in &self.at_byte[start..] {
                if end.is_some_and(|end| byte >= end) {
                    break;
                }
                if types.contains(iotype) && best.is_none_or(|b| id < b) {
                    best = Some(id);
                }
            }
        }
        best
    }
}

/// Rules, the active list and the state. See the module doc for the contract.
pub struct Engine {
    /// Every live rule by id; ids grow in written order, so map order is written order.
    rules: BTreeMap<RuleId, Slot>,
    by_event: Vec<EventRules>,
    /// The armed inject-error rules.
    active: Arc<ActiveSet>,
    /// Per (event, state): what a fire does. An event's entries are dropped whenever one of
    /// its rules is added or removed.
    compiled: HashMap<(Event, i64), Compiled>,
    state: i64,
    next_id: u32,
}

impl Default for Engine {
    fn default() -> Self {
        Engine::new(Vec::new())
    }
}

/// Bound on cached (event, state) plans: a config that walks through many states must not
/// grow the cache without limit.
const MAX_COMPILED: usize = 256;

impl Engine {
    /// Builds an engine with `rules` in written order; state 1, nothing armed. The caller fires
    /// [`Event::None`] once the mount is live.
    pub fn new(rules: Vec<Rule>) -> Engine {
        let mut engine = Engine {
            rules: BTreeMap::new(),
            by_event: (0..Event::ALL.len())
                .map(|_| EventRules::default())
                .collect(),
            active: Arc::default(),
            compiled: HashMap::new(),
            state: 1,
            next_id: 1,
        };
        for rule in rules {
            engine.add(rule);
        }
        engine
    }

    /// Adds a rule after all existing ones and returns its number.
    pub fn add(&mut self, rule: Rule) -> RuleId {
        let id = RuleId(self.next_id);
        self.next_id += 1;
        let rules = &mut self.by_event[rule.event.index()];
        match rule.action {
            Action::InjectError { matches, .. } => rules.inject.push(Armable {
                id,
                gate: rule.state,
                byte: matches.sector.map(|s| s.saturating_mul(512)),
                iotypes: matches.iotypes,
            }),
            Action::SetState { new_state } => rules.set_state.push((id, rule.state, new_state)),
            Action::Suspend { .. } => rules.suspend.push(id),
        }
        let fires_at_add = rules.fires_for(rule.state);
        self.forget_compiled(rule.event);
        self.rules.insert(
            id,
            Slot {
                rule,
                hits: 0,
                fires_at_add,
            },
        );
        id
    }

    /// Deletes a rule everywhere (its event and the active list).
    pub fn remove(&mut self, id: RuleId) -> Option<Rule> {
        let slot = self.rules.remove(&id)?;
        let rules = &mut self.by_event[slot.rule.event.index()];
        rules.inject.retain(|a| a.id != id);
        rules.set_state.retain(|e| e.0 != id);
        rules.suspend.retain(|r| *r != id);
        self.forget_compiled(slot.rule.event);
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

    /// Deletes the breakpoints (suspend rules) with `tag`; returns how many.
    pub fn remove_breakpoints(&mut self, tag: &str) -> usize {
        let ids: Vec<RuleId> = self
            .rules
            .iter()
            .filter(|(_, s)| matches!(&s.rule.action, Action::Suspend { tag: t } if t == tag))
            .map(|(id, _)| *id)
            .collect();
        for id in &ids {
            self.remove(*id);
        }
        ids.len()
    }

    /// Deletes every rule and breakpoint and returns to state 1 (the `clear` command).
    /// Rule numbers keep counting, so a stale `remove N` cannot hit a newer rule.
    pub fn clear(&mut self) {
        let next_id = self.next_id;
        *self = Engine::new(Vec::new());
        self.next_id = next_id;
    }

    /// Replaces every inject-error and set-state rule by `rules` (the `reload` command);
    /// breakpoints and the state stay, nothing is armed until an event fires.
    pub fn replace_rules(&mut self, rules: Vec<Rule>) {
        // Rebuilt in one pass (removing thousands of rules one by one would be quadratic):
        // keep the breakpoints with their numbers, drop everything else, add the new rules.
        let old = std::mem::take(&mut self.rules);
        for event in &mut self.by_event {
            event.inject.clear();
            event.set_state.clear();
            event.suspend.clear();
        }
        self.compiled.clear();
        self.active = Arc::default();
        for (id, slot) in old {
            if matches!(slot.rule.action, Action::Suspend { .. }) {
                self.by_event[slot.rule.event.index()].suspend.push(id);
                self.rules.insert(id, slot);
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

    /// The live rules in written order, with their counters.
    pub fn rules(&self) -> impl Iterator<Item = (RuleId, &Rule, RuleStats)> {
        self.rules.iter().map(|(id, s)| {
            let armed = match s.rule.action {
                // Every fire of its event in a state its gate passes re-armed it.
                Action::InjectError { .. } => {
                    self.by_event[s.rule.event.index()].fires_for(s.rule.state) - s.fires_at_add
                }
                _ => 0,
            };
            let stats = RuleStats {
                hits: s.hits,
                armed,
            };
            (*id, &s.rule, stats)
        })
    }

    /// The armed inject-error rules, in written order.
    pub fn armed(&self) -> &[RuleId] {
        &self.active.ids
    }

    /// Whether the rule is in the active list.
    pub fn is_armed(&self, id: RuleId) -> bool {
        self.active.contains(id)
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
            .inject
            .iter()
            .copied()
            .filter(|a| passes(a.gate))
            .collect();
        let compiled = Compiled {
            active: (!armed.is_empty()).then(|| Arc::new(ActiveSet::build(&armed))),
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
    /// inject-error rules that pass the state gate replace the active list, the first
    /// written set-state rule sets the state, breakpoints hit once and are deleted.
    pub fn fire(&mut self, event: Event) -> Fired {
        let state = self.state;
        let compiled = self.compiled(event);
        let mut fired = Fired::default();
        let rules = &mut self.by_event[event.index()];
        rules.fires += 1;
        *rules.fires_in_state.entry(state).or_default() += 1;
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
        if let Some(active) = compiled.active {
            self.active = active;
            fired.rearmed = true;
        }
        if let Some((id, n)) = compiled.new_state {
            self.state = n;
            fired.state_change = Some((state, n));
            if let Some(slot) = self.rules.get_mut(&id) {
                slot.hits += 1;
            }
        }
        fired
    }

    /// Checks one request against the active list (QEMU's `rule_check`).
    pub fn check(&mut self, iotype: IoType, offset: u64, len: u64) -> Verdict {
        let Some(id) = self.active.first_match(iotype, offset, len) else {
            return Verdict::Pass;
        };
        let Some(slot) = self.rules.get_mut(&id) else {
            return Verdict::Pass;
        };
        let Action::InjectError { errno, once, .. } = slot.rule.action else {
            return Verdict::Pass;
        };
        if errno == 0 {
            // An exemption: the request passes and later rules stay hidden. QEMU does not
            // delete a `once` rule here, since it did not fail anything.
            return Verdict::Pass;
        }
        slot.hits += 1;
        let event = slot.rule.event;
        if once {
            self.remove(id);
        }
        Verdict::Fail {
            errno,
            rule: id,
            event,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inject(event: Event, state: i64, errno: i32, sector: Option<u64>, once: bool) -> Rule {
        Rule {
            event,
            state,
            action: Action::InjectError {
                errno,
                matches: RequestMatch {
                    sector,
                    iotypes: IoTypes::default(),
                },
                once,
                immediately: false,
            },
            origin: Origin::Runtime,
        }
    }

    fn set_state(event: Event, state: i64, new_state: i64) -> Rule {
        Rule {
            event,
            state,
            action: Action::SetState { new_state },
            origin: Origin::Runtime,
        }
    }

    fn fail(errno: i32, rule: u32, event: Event) -> Verdict {
        Verdict::Fail {
            errno,
            rule: RuleId(rule),
            event,
        }
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
        if let Action::InjectError { matches, .. } = &mut only_write.action {
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
            event: Event::WriteAio,
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
                    event: Event::ReadAio,
                    state: 0,
                    action: Action::InjectError {
                        errno: [0, 5, 28][rng.next(3) as usize],
                        matches: RequestMatch { sector, iotypes },
                        once: false,
                        immediately: false,
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
                    matches!(&r.action, Action::InjectError { matches, .. }
                        if matches.matches(iotype, offset, len))
                });
                let expected = match scan {
                    Some((i, r)) => match r.action {
                        Action::InjectError { errno, .. } if errno != 0 => {
                            fail(errno, i as u32 + 1, Event::ReadAio)
                        }
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
            event: Event::WriteAio,
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
}
