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

use std::collections::BTreeMap;
use std::fmt;

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
    /// sector-less rules match it.
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
    hits: u64,
}

/// Rules, the active list and the state. See the module doc for the contract.
pub struct Engine {
    /// Every live rule by id; ids grow in written order, so map order is written order.
    rules: BTreeMap<RuleId, Slot>,
    /// Rule ids per event, in written order.
    by_event: Vec<Vec<RuleId>>,
    /// The armed inject-error rules, in written order.
    active: Vec<RuleId>,
    state: i64,
    next_id: u32,
}

impl Default for Engine {
    fn default() -> Self {
        Engine::new(Vec::new())
    }
}

impl Engine {
    /// Builds an engine with `rules` in written order; state 1, nothing armed. The caller fires
    /// [`Event::None`] once the mount is live.
    pub fn new(rules: Vec<Rule>) -> Engine {
        let mut engine = Engine {
            rules: BTreeMap::new(),
            by_event: vec![Vec::new(); Event::ALL.len()],
            active: Vec::new(),
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
        self.by_event[rule.event.index()].push(id);
        self.rules.insert(id, Slot { rule, hits: 0 });
        id
    }

    /// Deletes a rule everywhere (its event and the active list).
    pub fn remove(&mut self, id: RuleId) -> Option<Rule> {
        let slot = self.rules.remove(&id)?;
        self.by_event[slot.rule.event.index()].retain(|r| *r != id);
        self.active.retain(|r| *r != id);
        Some(slot.rule)
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
    pub fn clear(&mut self) {
        self.rules.clear();
        self.by_event.iter_mut().for_each(Vec::clear);
        self.active.clear();
        self.state = 1;
    }

    /// Replaces every inject-error and set-state rule by `rules` (the `reload` command);
    /// breakpoints and the state stay, nothing is armed until an event fires.
    pub fn replace_rules(&mut self, rules: Vec<Rule>) {
        let old: Vec<RuleId> = self
            .rules
            .iter()
            .filter(|(_, s)| !matches!(s.rule.action, Action::Suspend { .. }))
            .map(|(id, _)| *id)
            .collect();
        for id in old {
            self.remove(id);
        }
        self.active.clear();
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

    /// The live rules in written order, with how often each fired (armed, set the state,
    /// suspended or failed a request).
    pub fn rules(&self) -> impl Iterator<Item = (RuleId, &Rule, u64)> {
        self.rules.iter().map(|(id, s)| (*id, &s.rule, s.hits))
    }

    /// Whether the rule is in the active list.
    pub fn is_armed(&self, id: RuleId) -> bool {
        self.active.contains(&id)
    }

    /// Processes every rule of `event` against the state from before the event (spec §1).
    pub fn fire(&mut self, event: Event) -> Fired {
        let mut fired = Fired::default();
        let mut new_state = None;
        let mut replaced = false;
        let mut one_shot = Vec::new();
        for &id in &self.by_event[event.index()] {
            let Some(slot) = self.rules.get_mut(&id) else {
                continue;
            };
            if slot.rule.state != 0 && slot.rule.state != self.state {
                continue;
            }
            match &slot.rule.action {
                Action::InjectError { .. } => {
                    if !replaced {
                        self.active.clear();
                        replaced = true;
                    }
                    self.active.push(id);
                }
                Action::SetState { new_state: n } => {
                    // The first written rule wins, as in QEMU.
                    new_state.get_or_insert(*n);
                }
                Action::Suspend { tag } => {
                    fired.suspend.push(tag.clone());
                    one_shot.push(id);
                }
            }
            slot.hits += 1;
        }
        for id in one_shot {
            self.remove(id);
        }
        if let Some(n) = new_state {
            self.state = n;
        }
        fired
    }

    /// Checks one request against the active list (QEMU's `rule_check`).
    pub fn check(&mut self, iotype: IoType, offset: u64, len: u64) -> Verdict {
        let winner = self.active.iter().copied().find(|id| {
            matches!(
                self.rules.get(id).map(|s| &s.rule.action),
                Some(Action::InjectError { matches, .. }) if matches.matches(iotype, offset, len)
            )
        });
        let Some(id) = winner else {
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
}
