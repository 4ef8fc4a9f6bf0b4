//! The sections and their keys (`spec/faults.md` §2–§5, QEMU's two): which keys each
//! section takes ([`Group`]), one section's entries turned into a [`Rule`] or bad sectors,
//! and the parsers of key values (probabilities, durations, sizes, errnos, iotypes).

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::{ConfigError, Location, Problem};
use crate::engine::errno;
use crate::engine::faults::{CorruptMode, CutMode, Fault, TornMode};
use crate::engine::ranges::{MAX_SECTOR, RangeError, SECTOR, SectorSet};
use crate::engine::units::{self, parse_size};
use crate::engine::{
    Action, Counting, Event, IoType, IoTypes, Origin, Range, RequestMatch, Rule, applicable_iotypes,
};
use crate::media::BadSettings;

/// The longest `[suspend] tag` (bytes).
pub const MAX_TAG: usize = 256;

/// Keys of every request-checked section (faults §1).
const MATCH_KEYS: &[&str] = &[
    "event",
    "state",
    "sector",
    "sectors",
    "range",
    "iotype",
    "probability",
    "skip",
    "every",
    "count",
    "once",
];

/// Every key each group takes, for the "this group takes" message.
pub(super) const INJECT_ERROR_KEYS: &[&str] = &[
    "event",
    "state",
    "errno",
    "sector",
    "sectors",
    "range",
    "once",
    "immediately",
    "iotype",
    "probability",
    "skip",
    "every",
    "count",
];
const SET_STATE_KEYS: &[&str] = &["event", "state", "new_state"];
// The own keys of each request-checked section; each also takes MATCH_KEYS (`Group::keys`).
const DELAY_OWN: &[&str] = &["latency", "jitter", "errno"];
const CORRUPT_OWN: &[&str] = &["mode", "bits", "bytes"];
const TORN_WRITE_OWN: &[&str] = &["keep", "mode", "unit", "errno"];
const SHORT_IO_OWN: &[&str] = &["length"];
const MISDIRECT_WRITE_OWN: &[&str] = &["shift"];
const SUSPEND_OWN: &[&str] = &["tag"];
const POWER_CUT_KEYS: &[&str] = &[
    "event",
    "state",
    "mode",
    "probability",
    "skip",
    "every",
    "count",
    "once",
];
const BAD_SECTORS_KEYS: &[&str] = &["sectors", "file", "errno", "heal-on-write", "write-errno"];

/// The groups: QEMU's two, the request-checked sections of `spec/faults.md` §3, the
/// `[power-cut]` rule and the `[bad-sectors]` media section (§4, §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    InjectError,
    SetState,
    Delay,
    Corrupt,
    DropWrite,
    TornWrite,
    ShortIo,
    MisdirectWrite,
    Suspend,
    PowerCut,
    BadSectors,
}

impl Group {
    /// Every group, in the order the README lists them.
    pub const ALL: &'static [Group] = &[
        Group::InjectError,
        Group::SetState,
        Group::Delay,
        Group::Corrupt,
        Group::DropWrite,
        Group::TornWrite,
        Group::ShortIo,
        Group::MisdirectWrite,
        Group::Suspend,
        Group::PowerCut,
        Group::BadSectors,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Group::InjectError => "inject-error",
            Group::SetState => "set-state",
            Group::Delay => "delay",
            Group::Corrupt => "corrupt",
            Group::DropWrite => "drop-write",
            Group::TornWrite => "torn-write",
            Group::ShortIo => "short-io",
            Group::MisdirectWrite => "misdirect-write",
            Group::Suspend => "suspend",
            Group::PowerCut => "power-cut",
            Group::BadSectors => "bad-sectors",
        }
    }

    pub fn from_name(name: &str) -> Option<Group> {
        Group::ALL.iter().copied().find(|g| g.name() == name)
    }

    /// Every key the group takes, for parsing and for the "this group takes" message: QEMU's
    /// two groups, `[power-cut]` and `[bad-sectors]` have their own lists; the sections of
    /// faults §3 take their own keys followed by the match keys of faults §1.
    pub fn keys(self) -> &'static [&'static str] {
        match self {
            Group::InjectError => INJECT_ERROR_KEYS,
            Group::SetState => SET_STATE_KEYS,
            Group::PowerCut => POWER_CUT_KEYS,
            Group::BadSectors => BAD_SECTORS_KEYS,
            _ => {
                // Built once per section, then borrowed for the life of the process.
                static BUILT: OnceLock<Vec<(Group, &'static [&'static str])>> = OnceLock::new();
                let built = BUILT.get_or_init(|| {
                    Group::ALL
                        .iter()
                        .map(|g| {
                            let all: Vec<&'static str> =
                                g.own_keys().iter().chain(MATCH_KEYS).copied().collect();
                            (*g, &*Box::leak(all.into_boxed_slice()))
                        })
                        .collect()
                });
                built
                    .iter()
                    .find(|(g, _)| *g == self)
                    .map_or(MATCH_KEYS, |(_, keys)| keys)
            }
        }
    }

    /// The keys of a faults §3 section's own action (its match keys apart).
    fn own_keys(self) -> &'static [&'static str] {
        match self {
            Group::Delay => DELAY_OWN,
            Group::Corrupt => CORRUPT_OWN,
            Group::TornWrite => TORN_WRITE_OWN,
            Group::ShortIo => SHORT_IO_OWN,
            Group::MisdirectWrite => MISDIRECT_WRITE_OWN,
            Group::Suspend => SUSPEND_OWN,
            _ => &[],
        }
    }

    /// The names of every group, for messages.
    pub(super) fn names() -> String {
        let names: Vec<String> = Group::ALL
            .iter()
            .map(|g| format!("[{}]", g.name()))
            .collect();
        names.join(", ")
    }
}

/// One `key = value` with the line it was on.
pub(super) struct Entry {
    pub(super) key: String,
    pub(super) value: String,
    pub(super) line: Option<usize>,
    /// Command-line or `ctl` text without `=`: a word, not a key (kept for `ctl ... first`).
    pub(super) bare: bool,
}

/// One section's entries and where they were: finds keys and builds errors that name the
/// line, section, key and value.
struct Section<'a> {
    group: Group,
    entries: &'a [Entry],
    at: &'a Location,
}

impl<'a> Section<'a> {
    /// Checks that every key is one the group takes.
    pub(super) fn new(
        group: Group,
        entries: &'a [Entry],
        at: &'a Location,
    ) -> Result<Self, ConfigError> {
        let section = Section { group, entries, at };
        for e in entries {
            if e.bare {
                // Most often the second range of a list after a comma (`sectors=0-7,16`).
                return Err(ConfigError {
                    key: None,
                    value: Some(e.key.clone()),
                    ..section.err(Some(e), Problem::NotKeyValue)
                });
            }
            if !group.keys().contains(&e.key.as_str()) {
                return Err(section.err(
                    Some(e),
                    Problem::UnknownKey {
                        allowed: group.keys(),
                    },
                ));
            }
        }
        // QEMU keeps the last value of a repeated key in its own sections (kept, see
        // `get`); in ours a repeated key is a mistake, not a silent override.
        if !matches!(group, Group::InjectError | Group::SetState) {
            for (i, e) in entries.iter().enumerate() {
                if let Some(first) = entries[..i].iter().find(|f| f.key == e.key) {
                    return Err(section.err(Some(e), Problem::DuplicateKey(first.line)));
                }
            }
        }
        Ok(section)
    }

    /// The entry of `key`; QEMU keeps the last value of a repeated key.
    fn get(&self, key: &str) -> Option<&'a Entry> {
        self.entries.iter().rev().find(|e| e.key == key)
    }

    /// An error about entry `e` (or the section as a whole).
    pub(super) fn err(&self, e: Option<&Entry>, problem: Problem) -> ConfigError {
        ConfigError {
            at: Location {
                source: self.at.source.clone(),
                line: e.and_then(|e| e.line).or(self.at.line),
            },
            section: Some(self.group.name().to_string()),
            key: e.map(|e| e.key.clone()),
            value: e.map(|e| e.value.clone()),
            problem,
        }
    }
}

/// Builds a rule from one section's entries, checking every key and value.
pub(super) fn build_rule(
    group: Group,
    entries: &[Entry],
    at: &Location,
    origin: Origin,
) -> Result<Rule, ConfigError> {
    let section = Section::new(group, entries, at)?;
    let err = |e: Option<&Entry>, problem: Problem| section.err(e, problem);
    let get = |key: &str| section.get(key);
    // Parses an optional key with `parse`, naming the entry on failure.
    fn opt<T>(
        e: Option<&Entry>,
        parse: impl Fn(&str) -> Result<T, Problem>,
        err: &impl Fn(Option<&Entry>, Problem) -> ConfigError,
    ) -> Result<Option<T>, ConfigError> {
        e.map(|e| parse(&e.value).map_err(|p| err(Some(e), p)))
            .transpose()
    }

    let event = match get("event") {
        None if matches!(group, Group::SetState | Group::PowerCut) => {
            return Err(err(None, Problem::MissingEvent));
        }
        None => None,
        Some(e) => {
            Some(Event::from_name(&e.value).ok_or_else(|| err(Some(e), Problem::UnknownEvent))?)
        }
    };
    let state = opt(get("state"), parse_state, &err)?.unwrap_or(0);
    if group == Group::SetState {
        let new_state = opt(get("new_state"), parse_state, &err)?.unwrap_or(0);
        return Ok(Rule {
            event,
            state,
            action: Action::SetState { new_state },
            origin,
        });
    }

    // The match: range, iotype and the counting keys.
    let ranges: Vec<&Entry> = ["sector", "sectors", "range"]
        .iter()
        .filter_map(|k| get(k))
        .collect();
    if let [_, second, ..] = ranges[..] {
        return Err(err(Some(second), Problem::SectorAndSectors));
    }
    let range = match ranges.first() {
        Some(e) if e.key == "sector" && e.value.trim() == "-1" => Range::Any,
        Some(e) if e.key == "sector" => {
            Range::Sector(parse_sector(&e.value).map_err(|p| err(Some(e), p))?)
        }
        Some(e) if e.key == "sectors" => Range::Sectors(Arc::new(
            SectorSet::parse(&e.value).map_err(|r| err(Some(e), Problem::BadRange(r)))?,
        )),
        Some(e) => Range::Sectors(Arc::new(
            parse_byte_ranges(&e.value).map_err(|p| err(Some(e), p))?,
        )),
        None => Range::Any,
    };
    let iotype_entry = get("iotype");
    let iotypes = opt(iotype_entry, parse_iotypes, &err)?.unwrap_or_default();
    let once = opt(get("once"), parse_bool, &err)?.unwrap_or(false);
    let count = opt(get("count"), parse_at_least_one, &err)?;
    if once && let Some(e) = get("count") {
        return Err(err(Some(e), Problem::OnceAndCount));
    }
    let counting = Counting {
        skip: opt(get("skip"), parse_number, &err)?.unwrap_or(0),
        every: opt(get("every"), parse_at_least_one, &err)?.unwrap_or(1),
        probability: opt(get("probability"), parse_probability, &err)?.unwrap_or(1.0),
        count: count.or(once.then_some(1)),
    };

    if group == Group::PowerCut {
        let mode = opt(get("mode"), |t| parse_choice(t, CutMode::NAMES), &err)?;
        let mode = CutMode::from_name(CutMode::NAMES[mode.unwrap_or(0)]).unwrap_or(CutMode::Lose);
        // A cut happens once unless `count` or `every` say otherwise (faults §5): a rule that
        // cut again after `power-on` would cut at the remount's own flush.
        let counting = Counting {
            count: match (counting.count, get("every")) {
                (None, None) => Some(1),
                (count, _) => count,
            },
            ..counting
        };
        return Ok(Rule {
            event,
            state,
            action: Action::PowerCut { mode, counting },
            origin,
        });
    }
    let errno = |default: i32| {
        Ok::<i32, ConfigError>(opt(get("errno"), parse_errno, &err)?.unwrap_or(default))
    };
    let size = |key: &str| opt(get(key), parse_size_value, &err);
    let required = |key: &'static str| get(key).ok_or_else(|| err(None, Problem::MissingKey(key)));
    let fault = match group {
        Group::SetState | Group::PowerCut | Group::BadSectors => {
            unreachable!("handled apart")
        }
        Group::InjectError => Fault::Error {
            errno: errno(libc::EIO)?,
            immediately: opt(get("immediately"), parse_bool, &err)?.unwrap_or(false),
        },
        Group::Delay => {
            let latency = required("latency")?;
            Fault::Delay {
                latency: parse_duration(&latency.value).map_err(|p| err(Some(latency), p))?,
                jitter: opt(get("jitter"), parse_duration, &err)?.unwrap_or_default(),
                errno: errno(0)?,
            }
        }
        Group::Corrupt => {
            let mode = opt(
                get("mode"),
                |t| parse_choice(t, &["flip", "zero", "random"]),
                &err,
            )?;
            let mode = match mode {
                None | Some(0) => CorruptMode::Flip,
                Some(1) => CorruptMode::Zero,
                _ => CorruptMode::Random,
            };
            let bits = opt(get("bits"), parse_at_least_one, &err)?;
            let bytes = opt(
                get("bytes"),
                |t| parse_size_value(t).and_then(at_least_one),
                &err,
            )?;
            match (mode, get("bits"), get("bytes")) {
                (CorruptMode::Flip, _, Some(e)) => {
                    return Err(err(
                        Some(e),
                        Problem::KeyNotForMode("bytes", "zero or random"),
                    ));
                }
                (CorruptMode::Zero | CorruptMode::Random, Some(e), _) => {
                    return Err(err(Some(e), Problem::KeyNotForMode("bits", "flip")));
                }
                _ => {}
            }
            // A number the rule's own range cannot hold can never act as written. Without a
            // range each request bounds it (clamped when the effect is drawn).
            let range_bytes = match &range {
                Range::Any => None,
                Range::Sector(_) => Some(SECTOR),
                Range::Sectors(set) => Some(set.sectors().saturating_mul(SECTOR)),
            };
            if let Some(held) = range_bytes {
                let beyond = |key: &str, n: Option<u64>, most: u64, bits: bool| match n {
                    Some(n) if n > most => {
                        Err(err(get(key), Problem::BeyondRange { bytes: held, bits }))
                    }
                    _ => Ok(()),
                };
                beyond("bits", bits, held.saturating_mul(8), true)?;
                beyond("bytes", bytes, held, false)?;
            }
            Fault::Corrupt {
                mode,
                bits: u32::try_from(bits.unwrap_or(1)).unwrap_or(u32::MAX),
                bytes: bytes.unwrap_or(512),
            }
        }
        Group::DropWrite => Fault::DropWrite,
        Group::TornWrite => {
            let mode = match opt(
                get("mode"),
                |t| parse_choice(t, &["prefix", "sectors"]),
                &err,
            )? {
                None | Some(0) => TornMode::Prefix,
                _ => TornMode::Sectors,
            };
            if mode == TornMode::Sectors
                && let Some(e) = get("keep")
            {
                return Err(err(Some(e), Problem::KeyNotForMode("keep", "prefix")));
            }
            // Whole sectors: a disk tears at sector boundaries, and a unit of one byte made
            // a journal entry per byte written.
            let unit = opt(
                get("unit"),
                |t| {
                    parse_size_value(t).and_then(at_least_one).and_then(|n| {
                        if !n.is_multiple_of(SECTOR) {
                            Err(Problem::UnitNotSectors)
                        } else {
                            Ok(n)
                        }
                    })
                },
                &err,
            )?;
            Fault::TornWrite {
                keep: size("keep")?,
                mode,
                unit: unit.unwrap_or(512),
                errno: errno(0)?,
            }
        }
        Group::ShortIo => Fault::ShortIo {
            length: size("length")?,
        },
        Group::MisdirectWrite => {
            let shift = required("shift")?;
            Fault::MisdirectWrite {
                shift: parse_signed_size(&shift.value).map_err(|p| err(Some(shift), p))?,
            }
        }
        Group::Suspend => {
            let tag = required("tag")?;
            if tag.value.is_empty() || tag.value.contains(char::is_whitespace) {
                return Err(err(Some(tag), Problem::BadTag));
            }
            // Copied into every request the rule parks, under the engine's lock.
            if tag.value.len() > MAX_TAG {
                return Err(err(Some(tag), Problem::TooLong(MAX_TAG)));
            }
            Fault::Suspend {
                tag: tag.value.clone(),
            }
        }
    };
    // A range on a rule that acts only on flushes never matches (QEMU's [inject-error]
    // accepts it: a warning there, see `RuleSet::warnings`).
    if let Some(e) = iotype_entry
        && group != Group::InjectError
        && flush_only_with_range(&range, iotypes, &fault)
    {
        return Err(err(Some(e), Problem::FlushHasNoRange));
    }
    // An explicit iotype the action can never act on is a mistake, not a silent no-op.
    if let Some(e) = iotype_entry {
        let usable = applicable_iotypes(&fault);
        if !IoType::ALL
            .iter()
            .any(|t| iotypes.contains(*t) && usable.contains(*t))
        {
            return Err(err(
                Some(e),
                Problem::IoTypeNotForAction(usable.to_string()),
            ));
        }
    }
    Ok(Rule {
        event,
        state,
        action: Action::Request {
            fault,
            matches: RequestMatch {
                range,
                iotypes,
                counting,
            },
        },
        origin,
    })
}

/// A `[bad-sectors]` section: sectors (from `sectors` and `file`) and their settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadSpec {
    pub sectors: SectorSet,
    pub settings: BadSettings,
    /// Where it was, for a conflict between sections.
    pub at: Location,
}

/// One parsed section.
pub(super) enum Parsed {
    Rule(Rule),
    Bad(BadSpec),
}

/// Builds a section: a rule, or (for `[bad-sectors]`) media. `base` is the directory a
/// relative `file` is read from (the config file's).
pub(super) fn build_section(
    group: Group,
    entries: &[Entry],
    at: &Location,
    origin: Origin,
    base: &Path,
) -> Result<Parsed, ConfigError> {
    if group != Group::BadSectors {
        return build_rule(group, entries, at, origin).map(Parsed::Rule);
    }
    let section = Section::new(group, entries, at)?;
    let err = |e: Option<&Entry>, problem: Problem| section.err(e, problem);
    let get = |key: &str| section.get(key);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    if let Some(e) = get("sectors") {
        let set = SectorSet::parse(&e.value).map_err(|r| err(Some(e), Problem::BadRange(r)))?;
        ranges.extend(set.iter());
    }
    if let Some(e) = get("file") {
        let path = base.join(&e.value);
        let text = std::fs::read_to_string(&path).map_err(|io| {
            err(
                Some(e),
                Problem::UnreadableList(format!("{}: {io}", path.display())),
            )
        })?;
        for (i, line) in text.lines().enumerate() {
            let range = SectorSet::parse_line(line).map_err(|r| {
                err(
                    Some(e),
                    Problem::BadListLine(format!("{}:{}", path.display(), i + 1), r),
                )
            })?;
            if let Some(range) = range {
                ranges.push(range);
            }
        }
    }
    // Built at once, not inserted line by line: a million lines load in O(n log n) into a
    // compact set.
    let sectors = SectorSet::from_ranges(ranges);
    if get("sectors").is_none() && get("file").is_none() {
        return Err(err(None, Problem::NoBadSectors));
    }
    let mut settings = BadSettings::default();
    if let Some(e) = get("errno") {
        // A medium error is an error: 0 would let the read through with no data.
        settings.errno = parse_errno(&e.value)
            .and_then(|n| if n == 0 { Err(Problem::Zero) } else { Ok(n) })
            .map_err(|p| err(Some(e), p))?;
    }
    if let Some(e) = get("heal-on-write") {
        settings.heal_on_write = parse_bool(&e.value).map_err(|p| err(Some(e), p))?;
    }
    if let Some(e) = get("write-errno") {
        settings.write_errno = parse_errno(&e.value).map_err(|p| err(Some(e), p))?;
    }
    Ok(Parsed::Bad(BadSpec {
        sectors,
        settings,
        at: at.clone(),
    }))
}

/// Whether a rule with `range` acts only on flushes, which have no range: it never acts.
pub(super) fn flush_only_with_range(range: &Range, iotypes: IoTypes, fault: &Fault) -> bool {
    let usable = applicable_iotypes(fault);
    let acts_on = || {
        IoType::ALL
            .iter()
            .filter(move |t| iotypes.contains(**t) && usable.contains(**t))
    };
    !matches!(range, Range::Any)
        && acts_on().next().is_some()
        && acts_on().all(|t| *t == IoType::Flush)
}

/// `range`: byte ranges `START-END` (END exclusive, sizes with k, M, G; `0-64M` is the first
/// 64 MiB), separated by `,` or `+`, as the set of sectors they touch.
fn parse_byte_ranges(text: &str) -> Result<SectorSet, Problem> {
    let mut set = SectorSet::new();
    for item in text
        .split([',', '+'])
        .map(str::trim)
        .filter(|i| !i.is_empty())
    {
        let bad = || Problem::BadByteRange(item.to_string());
        let (start, end) = item.split_once('-').ok_or_else(bad)?;
        let start = parse_size(start).map_err(|_| bad())?;
        let end = parse_size(end).map_err(|_| bad())?;
        if end <= start {
            return Err(Problem::BadRange(RangeError::Backwards(item.to_string())));
        }
        let last = (end - 1) / SECTOR;
        if last > MAX_SECTOR {
            return Err(Problem::BadRange(RangeError::TooLarge(item.to_string())));
        }
        set.insert(start / SECTOR, last);
    }
    if set.is_empty() {
        return Err(Problem::BadRange(RangeError::Empty));
    }
    Ok(set)
}

fn at_least_one(n: u64) -> Result<u64, Problem> {
    if n == 0 { Err(Problem::Zero) } else { Ok(n) }
}

fn parse_at_least_one(text: &str) -> Result<u64, Problem> {
    parse_number(text).and_then(at_least_one)
}

/// One of `choices`, by index.
fn parse_choice(text: &str, choices: &'static [&'static str]) -> Result<usize, Problem> {
    let t = text.trim();
    choices
        .iter()
        .position(|c| *c == t)
        .ok_or(Problem::BadChoice(choices))
}

/// A probability: `0.05`, `5%`, `1`, `0`.
pub fn parse_probability(text: &str) -> Result<f64, Problem> {
    let t = text.trim();
    let (number, scale) = match t.strip_suffix('%') {
        Some(p) => (p.trim(), 100.0),
        None => (t, 1.0),
    };
    let p: f64 = number.parse().map_err(|_| Problem::BadProbability)?;
    let p = p / scale;
    if !(0.0..=1.0).contains(&p) || !p.is_finite() {
        return Err(Problem::BadProbability);
    }
    Ok(p)
}

/// A duration (faults §2): `250us`, `5ms`, `1.5s`, or a bare number of milliseconds; at
/// most a day (`engine/units.rs`).
pub fn parse_duration(text: &str) -> Result<Duration, Problem> {
    units::parse_duration(text).ok_or(Problem::BadDuration)
}

/// A size key's value (faults §2): bytes, or `k`/`M`/`G` (powers of 1024).
fn parse_size_value(text: &str) -> Result<u64, Problem> {
    parse_size(text).map_err(|_| Problem::BadSize)
}

/// A size that may be negative (`shift = -4k`).
fn parse_signed_size(text: &str) -> Result<i64, Problem> {
    let t = text.trim();
    let (negative, magnitude) = match t.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, t),
    };
    let n = i64::try_from(parse_size_value(magnitude)?).map_err(|_| Problem::BadSize)?;
    Ok(if negative { -n } else { n })
}

/// QEMU's unsigned number syntax: decimal, `0x` hex, leading-`0` octal (`engine/units.rs`).
pub fn parse_number(text: &str) -> Result<u64, Problem> {
    units::parse_number(text).ok_or(Problem::BadNumber)
}

fn parse_sector(text: &str) -> Result<u64, Problem> {
    let n = parse_number(text)?;
    if n > MAX_SECTOR {
        return Err(Problem::SectorTooLarge);
    }
    Ok(n)
}

fn parse_state(text: &str) -> Result<i64, Problem> {
    if text.trim().starts_with('-') {
        return Err(Problem::NegativeState);
    }
    let n = parse_number(text)?;
    i64::try_from(n).map_err(|_| Problem::BadNumber)
}

/// An errno: a number in 0..=511 or a symbolic name.
pub fn parse_errno(text: &str) -> Result<i32, Problem> {
    let t = text.trim();
    if t.starts_with('-') {
        return Err(Problem::NegativeErrno);
    }
    if t.starts_with(|c: char| c.is_ascii_alphabetic()) {
        // Names are case-insensitive: `enospc` is ENOSPC.
        return errno::from_name(&t.to_ascii_uppercase()).ok_or(Problem::UnknownErrnoName);
    }
    let n = parse_number(t)?;
    if n > errno::MAX_INJECTABLE as u64 {
        return Err(Problem::ErrnoOutOfRange);
    }
    Ok(n as i32)
}

/// QEMU's boolean words.
pub fn parse_bool(text: &str) -> Result<bool, Problem> {
    match text.trim() {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(Problem::BadBool),
    }
}

fn parse_iotypes(text: &str) -> Result<IoTypes, Problem> {
    let mut set: Option<IoTypes> = None;
    for name in text.split(['|', ',']).map(str::trim) {
        let t = IoType::from_name(name).ok_or(Problem::BadIoType)?;
        set = Some(match set {
            None => IoTypes::only(t),
            Some(s) => s.with(t),
        });
    }
    set.ok_or(Problem::BadIoType)
}
