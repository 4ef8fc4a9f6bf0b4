//! Rule configuration: QEMU's blkdebug INI dialect, the sections of `spec/faults.md`,
//! command-line rules, `blkdebug:CONF:IMG` and the limit options, parsed at the edge into a
//! validated [`RuleSet`] and [`Limits`].
//!
//! # File syntax (QEMU's, plus unquoted values)
//!
//! ```ini
//! # a comment (a line whose first non-blank character is '#')
//! [inject-error]          # one section per rule, in file order; sections repeat
//! event = "read_aio"      # one of the 48 blkdebug event names (none: a standing rule)
//! state = "2"             # 0 (default) = any state
//! errno = "ENOSPC"        # 0..511 or a name; default 5 (EIO); 0 = exempt, hide later rules
//! sector = "2048"         # the byte sector*512 must lie in the request; default any
//! once = "on"             # delete the rule when it fails a request; default off
//! immediately = "off"     # accepted; changes nothing observable through FUSE
//! iotype = "read|write"   # read, write, write-zeroes, discard, flush, block-status
//!                         # (default: all but block-status); list with '|' or ','
//!
//! [set-state]
//! event = "write_aio"
//! state = "1"             # 0 (default) = any state
//! new_state = "2"         # default 0
//! ```
//!
//! # The sections of `spec/faults.md`
//!
//! Every request-checked section (`[inject-error]` and the seven below) takes the match
//! keys: `event` (optional: without it the rule is *standing*, armed from the start),
//! `state`, one of `sector`, `sectors` (`"2048-2055, 10000"`: the request overlaps one) or
//! `range` (bytes, END exclusive: `"0-64M"`, the sectors the bytes touch), `iotype`,
//! `probability` (`0.05` or `5%`), `skip`, `every`, `count` and `once` (`count = 1`). In
//! these sections and `[power-cut]`/`[bad-sectors]` a repeated key is an error (QEMU's two
//! sections keep the last value, as QEMU does).
//!
//! ```ini
//! [delay]                 # latency (required), jitter (0), errno (0: then proceed)
//! latency = "5ms"         # 250us, 5ms, 1.5s; a bare number is milliseconds
//! [corrupt]               # mode flip|zero|random (flip), bits (1, flip), bytes (512)
//! iotype = "read"
//! [drop-write]            # no keys of its own
//! sectors = "0-2047"
//! [torn-write]            # keep (random), mode prefix|sectors (prefix), unit (512), errno
//! keep = "4k"             # sizes: bytes, or with k, M, G
//! [short-io]              # length (random multiple of 512 below the request's)
//! [misdirect-write]       # shift (required, may be negative)
//! shift = "-8k"
//! [suspend]               # tag (required): park matching requests until `resume TAG`
//! tag = "w"
//!
//! [power-cut]             # event (required), state, mode lose|keep|random|sectors,
//! event = "flush_to_disk" # and the counting keys, counted over the event's firings;
//! skip = "199"            # cuts once unless `count` or `every` is given
//!
//! [bad-sectors]           # media, not a rule: sectors and/or file (badblocks output),
//! sectors = "2048-2055"   # errno (EIO), heal-on-write (on), write-errno (0)
//! ```
//!
//! Numbers take decimal, `0x` hex and leading-`0` octal (`sector = -1` means any, as in
//! QEMU). Booleans take `on/yes/true/y` and `off/no/false/n`. Values may be quoted (QEMU) or
//! not; keys are case-sensitive. Dotted event names of QEMU 2.x are aliases.
//!
//! Command-line rules use the same keys: `--inject-error event=read_aio,errno=28,sector=8`,
//! `--rule delay:latency=5ms,sectors=0-7` (`,,` is a literal comma). Range lists are joined
//! with `+` there (`sectors=0-7+100`; `+` also works in the file), and a part that is not
//! `KEY=VALUE` is an error that says so. They come after the file's rules, in the order
//! given; errors name `--rule #N` (the Nth `--rule`). `ctl` takes the same text, plus
//! `first` or `before=N` ([`parse_rule_command`]).
//!
//! Every error names where it was (file and line, or which command-line rule), the section,
//! the key and the offending value; nothing is mounted when one is found.

// `rust-ini` is not used: it reports no line numbers, and every error here names its line
// (and it reads text, where QEMU reads bytes).
//
// Errors are built once, at load, and carry where they were: their size does not matter.
#![allow(clippy::result_large_err)]

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::engine::errno;
use crate::engine::faults::CutMode;
use crate::engine::faults::{CorruptMode, Fault, TornMode};
pub use crate::engine::ranges::MAX_SECTOR;
use crate::engine::ranges::{RangeError, SECTOR, SectorSet};
use crate::engine::units;
pub use crate::engine::units::parse_size;
use crate::engine::{
    Action, Counting, Event, IoType, IoTypes, Origin, Placement, Range, RequestMatch, Rule, RuleId,
    applicable_iotypes,
};
use crate::media::BadSettings;

/// Where a piece of configuration came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    /// The n-th (1-based) `--inject-error`, `--set-state` or `--rule` option, with its text.
    Option {
        flag: &'static str,
        index: usize,
        text: String,
    },
    /// A rule sent through the control channel.
    Command(String),
    /// A limit option (`--align`, ...); the key names it.
    LimitOption,
}

/// A place in the configuration: a source and, for files, a line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub source: Source,
    pub line: Option<usize>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Source::File(p) => write!(f, "{}", p.display())?,
            Source::Option { flag, index, text } if text.is_empty() => {
                write!(f, "{flag} #{index}")?
            }
            Source::Option { flag, index, text } => write!(f, "{flag} #{index} '{text}'")?,
            Source::Command(text) => write!(f, "command '{text}'")?,
            Source::LimitOption => f.write_str("command line")?,
        }
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        Ok(())
    }
}

/// What is wrong with a piece of configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    Unreadable(String),
    /// A `[bad-sectors]` `file` that cannot be read (path and why).
    UnreadableList(String),
    /// A `[bad-sectors]` section with neither `sectors` nor `file`.
    NoBadSectors,
    Syntax,
    UnknownGroup,
    KeyOutsideGroup,
    UnknownKey {
        allowed: &'static [&'static str],
    },
    MissingEvent,
    UnknownEvent,
    BadNumber,
    BadBool,
    ErrnoOutOfRange,
    NegativeErrno,
    UnknownErrnoName,
    NegativeState,
    BadIoType,
    BadLimit(String),
    /// A line that matters (not a comment) is not UTF-8 text.
    NotText,
    /// `sector * 512` would be past the largest file offset: no request reaches it.
    SectorTooLarge,
    /// Both `sector` and `sectors` in one rule.
    SectorAndSectors,
    BadRange(RangeError),
    /// A required key of the section is missing.
    MissingKey(&'static str),
    BadDuration,
    BadSize,
    BadProbability,
    /// A count that must be at least 1 (`every`, `count`, `bits`, ...).
    Zero,
    OnceAndCount,
    /// Not one of the allowed words.
    BadChoice(&'static [&'static str]),
    /// A key that only means something in another `mode`.
    KeyNotForMode(&'static str, &'static str),
    /// An `iotype` the section's action never acts on (the ones it does are given).
    IoTypeNotForAction(String),
    BadTag,
    /// `--rule` text without `SECTION:`.
    MissingSection,
    /// A line of a bad-sector list (`file:line`) is not a sector or range.
    BadListLine(String, RangeError),
    /// Two `[bad-sectors]` sections disagree on a setting (where the other one was).
    BadSettingsDiffer(String),
    /// A `[power-cut]` rule on a mount without `--write-cache`.
    PowerCutNeedsWriteCache,
    /// `before=` of a `ctl` rule is not a rule number.
    BadPlacement,
    /// An item of `range` that is not `START-END` in bytes.
    BadByteRange(String),
    /// Command-line or `ctl` text with a part that is not `KEY=VALUE`.
    NotKeyValue,
    /// A key given twice in one of our sections (the line of the first, in a file).
    DuplicateKey(Option<usize>),
    /// A rule with a range whose iotypes are only `flush`: a flush has no range.
    FlushHasNoRange,
    /// Both `first` and `before=N` (or one twice); the one given first.
    TwoPlacements(String),
    /// `[corrupt] bits` (`bits: true`) or `bytes` beyond what the rule's range holds (its
    /// size in bytes): no request could ever be corrupted as written.
    BeyondRange {
        bytes: u64,
        bits: bool,
    },
    /// A `[torn-write] unit` that is not a whole number of sectors.
    UnitNotSectors,
    /// A value longer than its limit (in bytes).
    TooLong(usize),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Unreadable(e) => write!(f, "cannot read the config file: {e}"),
            Problem::UnreadableList(e) => write!(f, "cannot read the bad-sector list: {e}"),
            Problem::NoBadSectors => f.write_str(
                "the section names no sectors: give 'sectors' (a range list) or 'file' (a \
                 badblocks list), or both",
            ),
            Problem::Syntax => f.write_str(
                "not a '[section]' header, a 'key = \"value\"' line, a '#' comment or blank",
            ),
            Problem::UnknownGroup => write!(f, "unknown section (expected {})", Group::names()),
            Problem::KeyOutsideGroup => f.write_str("key before any [section] header"),
            Problem::UnknownKey { allowed } => {
                write!(
                    f,
                    "unknown key (this section takes: {})",
                    allowed.join(", ")
                )
            }
            Problem::MissingEvent => f.write_str("the rule has no 'event' key"),
            Problem::UnknownEvent => {
                f.write_str("unknown event (see `blkdebugfs check --list-events` for the 48 names)")
            }
            Problem::BadNumber => f.write_str("not a number (decimal, 0x hex or 0 octal)"),
            Problem::BadBool => f.write_str("not a boolean (on/yes/true/y or off/no/false/n)"),
            Problem::ErrnoOutOfRange => write!(
                f,
                "errno must be 0..{} or a name like EIO (QEMU lets 512..999 hang clients)",
                errno::MAX_INJECTABLE
            ),
            Problem::NegativeErrno => f.write_str("errno must not be negative"),
            Problem::UnknownErrnoName => f.write_str("unknown errno name"),
            Problem::NegativeState => f.write_str("a state must not be negative"),
            Problem::BadIoType => f.write_str(
                "unknown iotype (read, write, write-zeroes, discard, flush, block-status)",
            ),
            Problem::BadLimit(why) => f.write_str(why),
            Problem::NotText => f.write_str("not UTF-8 text"),
            Problem::SectorTooLarge => write!(
                f,
                "no request can reach this sector (sector * 512 must be below 2^63; the \
                 largest is {MAX_SECTOR})"
            ),
            Problem::SectorAndSectors => f.write_str(
                "give one of 'sector' (QEMU's), 'sectors' (sector ranges) or 'range' (byte \
                 ranges), not two",
            ),
            Problem::BadRange(e) => write!(f, "{e}"),
            Problem::MissingKey(key) => write!(f, "the rule has no '{key}' key (required here)"),
            Problem::BadDuration => f.write_str(
                "not a duration (250us, 5ms, 1.5s; a bare number is milliseconds; at most a day)",
            ),
            Problem::BadSize => f.write_str("not a size (bytes, or with k, M, G)"),
            Problem::BadProbability => f.write_str("not a probability (0..1, or 0%..100%)"),
            Problem::Zero => f.write_str("must be at least 1"),
            Problem::OnceAndCount => {
                f.write_str("give 'once' or 'count', not both ('once = on' is 'count = 1')")
            }
            Problem::BadChoice(choices) => write!(f, "must be one of: {}", choices.join(", ")),
            Problem::KeyNotForMode(key, mode) => {
                write!(f, "'{key}' applies only with mode = {mode}")
            }
            Problem::IoTypeNotForAction(usable) => {
                write!(
                    f,
                    "this action never acts on that iotype (it acts on: {usable})"
                )
            }
            Problem::BadTag => f.write_str("a tag is one word, not empty"),
            Problem::BadListLine(at, e) => write!(f, "{at}: {e}"),
            Problem::BadSettingsDiffer(other) => write!(
                f,
                "every [bad-sectors] section must give the same errno, heal-on-write and \
                 write-errno (they differ from the section at {other})"
            ),
            Problem::PowerCutNeedsWriteCache => f.write_str(
                "a power cut needs the write-cache model: mount with --write-cache (and give \
                 `check` --write-cache to check such rules)",
            ),
            Problem::BadByteRange(item) => write!(
                f,
                "'{item}' is not a byte range (expected START-END, END exclusive, with sizes \
                 like 0-64M; separated by ',' or '+')"
            ),
            Problem::NotKeyValue => f.write_str(
                "not KEY=VALUE: ',' separates keys here, so a list of ranges is joined with \
                 '+' (sectors=0-7+2048-2055, range=0-64M+1G-2G) or with ',,'",
            ),
            Problem::DuplicateKey(Some(line)) => {
                write!(
                    f,
                    "the key is given twice in this section (first on line {line})"
                )
            }
            Problem::DuplicateKey(None) => f.write_str("the key is given twice in this rule"),
            Problem::FlushHasNoRange => f.write_str(
                "a flush has no range, so a rule with a range never acts on one: drop the \
                 range, or add the iotypes it should act on",
            ),
            Problem::BadPlacement => f.write_str("'before' takes a rule number (see 'rules')"),
            Problem::TwoPlacements(first) => {
                write!(
                    f,
                    "the rule is placed by '{first}' already: give 'first' or one 'before=N'"
                )
            }
            Problem::BeyondRange { bytes, bits: true } => write!(
                f,
                "more bits than the rule's range can hold: the rule's range holds {bytes} \
                 bytes ({} bits)",
                bytes.saturating_mul(8)
            ),
            Problem::BeyondRange { bytes, bits: false } => write!(
                f,
                "more bytes than the rule's range can hold: the rule's range holds {bytes} bytes"
            ),
            Problem::UnitNotSectors => f.write_str(
                "a unit must be a multiple of 512 (a disk keeps or loses whole sectors)",
            ),
            Problem::TooLong(max) => write!(f, "longer than {max} bytes"),
            Problem::MissingSection => write!(
                f,
                "expected SECTION:KEY=VALUE,... with SECTION one of {}",
                Group::names()
            ),
        }
    }
}

/// A configuration error: where, which section and key, the value, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub at: Location,
    pub section: Option<String>,
    pub key: Option<String>,
    pub value: Option<String>,
    pub problem: Problem,
}

impl fmt::Display for ConfigError {
    /// `file:line: [section] key = "value": problem`, leaving out the parts it lacks.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut what = Vec::new();
        if let Some(section) = &self.section {
            what.push(format!("[{section}]"));
        }
        match (&self.key, &self.value) {
            (Some(k), Some(v)) => what.push(format!("{k} = \"{v}\"")),
            (Some(k), None) => what.push(k.clone()),
            (None, Some(v)) => what.push(format!("\"{v}\"")),
            (None, None) => {}
        }
        write!(f, "{}", self.at)?;
        if !what.is_empty() {
            write!(f, ": {}", what.join(" "))?;
        }
        write!(f, ": {}", self.problem)
    }
}

impl std::error::Error for ConfigError {}

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
const INJECT_ERROR_KEYS: &[&str] = &[
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
    fn names() -> String {
        let names: Vec<String> = Group::ALL
            .iter()
            .map(|g| format!("[{}]", g.name()))
            .collect();
        names.join(", ")
    }
}

/// One `key = value` with the line it was on.
struct Entry {
    key: String,
    value: String,
    line: Option<usize>,
    /// Command-line or `ctl` text without `=`: a word, not a key (kept for `ctl ... first`).
    bare: bool,
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
    fn new(group: Group, entries: &'a [Entry], at: &'a Location) -> Result<Self, ConfigError> {
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
    fn err(&self, e: Option<&Entry>, problem: Problem) -> ConfigError {
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
fn build_rule(
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
enum Parsed {
    Rule(Rule),
    Bad(BadSpec),
}

/// Builds a section: a rule, or (for `[bad-sectors]`) media. `base` is the directory a
/// relative `file` is read from (the config file's).
fn build_section(
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
fn flush_only_with_range(range: &Range, iotypes: IoTypes, fault: &Fault) -> bool {
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

/// A warning for a rule whose whole range lies at or past `size` (the image's end): no
/// request reaches it unless the image grows. `None` for any other rule.
pub fn past_the_end(rule: &Rule, size: u64) -> Option<String> {
    let Action::Request { matches, .. } = &rule.action else {
        return None;
    };
    let first_byte = match &matches.range {
        Range::Any => return None,
        Range::Sector(s) => s.saturating_mul(512),
        Range::Sectors(set) => set.iter().next()?.0.saturating_mul(512),
    };
    (first_byte >= size).then(|| {
        format!(
            "its range ({}) starts at byte {first_byte}, at or past the image's end ({size} \
             bytes): no request reaches it unless the image grows",
            matches.range
        )
    })
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
        let last = (end - 1) / 512;
        if last > MAX_SECTOR {
            return Err(Problem::BadRange(RangeError::TooLarge(item.to_string())));
        }
        set.insert(start / 512, last);
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

/// A duration (faults §2): see [`units::parse_duration`].
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

/// QEMU's unsigned number syntax (see [`units::parse_number`]).
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

/// Splits one INI line into `key` and `value`, accepting QEMU's `key = "value"` and the
/// unquoted superset. `None` when the line is not an assignment.
fn split_assignment(line: &str) -> Option<(String, String)> {
    let (key, value) = line.split_once('=')?;
    let key = key.trim();
    if key.is_empty() || key.contains(char::is_whitespace) {
        return None;
    }
    let value = value.trim();
    let value = if let Some(rest) = value.strip_prefix('"') {
        // QEMU reads up to the closing quote and ignores the rest of the line.
        rest.split_once('"')?.0
    } else {
        // Unquoted (our superset): a `#` after blanks starts a comment.
        match value
            .find([' ', '\t'])
            .map(|at| (at, value[at..].trim_start()))
        {
            Some((at, rest)) if rest.starts_with('#') => value[..at].trim_end(),
            _ => value,
        }
    };
    Some((key.to_string(), value.to_string()))
}

/// Parses a section header as QEMU's `qemu_config_parse` does: `[group "id"]`, or the text
/// up to the first `]` as the group name. Whatever follows the `]` is ignored (so
/// `[set-state]   # comment` is a `set-state` header). Blanks around the name are allowed
/// (QEMU would look for a group named " set-state " and fail).
fn parse_header(line: &str) -> Option<String> {
    let inner = line.strip_prefix('[')?;
    let (inner, _ignored) = inner.split_once(']')?;
    let inner = inner.trim();
    let name = match inner.split_once(char::is_whitespace) {
        // `[group "id"]`: QEMU's form with an id, which names nothing in blkdebug.
        Some((name, id)) if id.trim().starts_with('"') && id.trim().ends_with('"') => name,
        Some(_) => return Some(inner.to_string()),
        None => inner,
    };
    Some(name.to_string())
}

/// Parses a config file's text into rules, in file order.
pub fn parse_config_text(path: &Path, text: &str) -> Result<Vec<Rule>, ConfigError> {
    parse_config_bytes(path, text.as_bytes())
}

/// Parses a config file's bytes, as QEMU reads them: line by line, a UTF-8 byte-order mark
/// skipped, comments and blank lines whatever bytes they hold; only a line that carries a
/// header, key or value must be UTF-8 text.
pub fn parse_config_bytes(path: &Path, bytes: &[u8]) -> Result<Vec<Rule>, ConfigError> {
    parse_config_sections(path, bytes).map(|(rules, _)| rules)
}

/// [`parse_config_bytes`], with the `[bad-sectors]` sections too (media, not rules).
pub fn parse_config_sections(
    path: &Path,
    bytes: &[u8],
) -> Result<(Vec<Rule>, Vec<BadSpec>), ConfigError> {
    let source = Source::File(path.to_path_buf());
    let at = |line: usize| Location {
        source: source.clone(),
        line: Some(line),
    };
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    // (group, line of header, entries)
    let mut sections: Vec<(Group, usize, Vec<Entry>)> = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let lineno = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let blank = raw.trim_ascii();
        if blank.is_empty() || blank.starts_with(b"#") {
            continue;
        }
        let text;
        let raw = match std::str::from_utf8(raw) {
            Ok(t) => t,
            // QEMU ignores what follows a header's `]` or a value's closing quote: bytes
            // there need not be text. Anything else must be.
            Err(e) => {
                let valid = &raw[..e.valid_up_to()];
                let ignorable = valid.trim_ascii_start().starts_with(b"[") && valid.contains(&b']')
                    || valid.iter().filter(|&&b| b == b'"').count() >= 2;
                if !ignorable {
                    return Err(ConfigError {
                        at: at(lineno),
                        section: sections.last().map(|s| s.0.name().to_string()),
                        key: None,
                        value: Some(String::from_utf8_lossy(raw).into_owned()),
                        problem: Problem::NotText,
                    });
                }
                text = String::from_utf8_lossy(valid).into_owned();
                text.as_str()
            }
        };
        let line = raw.trim();
        if line.starts_with('[') {
            let name = parse_header(line).ok_or_else(|| ConfigError {
                at: at(lineno),
                section: None,
                key: None,
                value: Some(raw.to_string()),
                problem: Problem::Syntax,
            })?;
            let group = Group::from_name(&name).ok_or_else(|| ConfigError {
                at: at(lineno),
                section: Some(name.clone()),
                key: None,
                value: None,
                problem: Problem::UnknownGroup,
            })?;
            sections.push((group, lineno, Vec::new()));
            continue;
        }
        let (key, value) = split_assignment(line).ok_or_else(|| ConfigError {
            at: at(lineno),
            section: sections.last().map(|s| s.0.name().to_string()),
            key: None,
            value: Some(raw.to_string()),
            problem: Problem::Syntax,
        })?;
        let Some(section) = sections.last_mut() else {
            return Err(ConfigError {
                at: at(lineno),
                section: None,
                key: Some(key),
                value: Some(value),
                problem: Problem::KeyOutsideGroup,
            });
        };
        section.2.push(Entry {
            key,
            value,
            line: Some(lineno),
            bare: false,
        });
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let (mut rules, mut bad) = (Vec::new(), Vec::new());
    for (group, line, entries) in &sections {
        let origin = Origin::File {
            path: path.display().to_string(),
            line: *line,
        };
        match build_section(*group, entries, &at(*line), origin, base)? {
            Parsed::Rule(rule) => rules.push(rule),
            Parsed::Bad(spec) => bad.push(spec),
        }
    }
    Ok((rules, bad))
}

/// Reads and parses a config file: its rules and its `[bad-sectors]` sections.
pub fn load_config_file(path: &Path) -> Result<(Vec<Rule>, Vec<BadSpec>), ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| ConfigError {
        at: Location {
            source: Source::File(path.to_path_buf()),
            line: None,
        },
        section: None,
        key: None,
        value: None,
        problem: Problem::Unreadable(e.to_string()),
    })?;
    parse_config_sections(path, &bytes)
}

/// Splits QEMU option text `a=1,b=2` (`,,` is a literal comma) into key/value pairs; a part
/// without `=` has no value.
fn split_options(text: &str) -> Vec<(String, Option<String>)> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push(',');
            } else {
                parts.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    parts.push(current);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.trim().to_string(), Some(v.trim().to_string())),
            None => (p.trim().to_string(), None),
        })
        .collect()
}

/// Parses one command-line or control-channel rule in QEMU option syntax.
pub fn parse_rule_option(
    group: Group,
    text: &str,
    source: Source,
    origin: Origin,
) -> Result<Rule, ConfigError> {
    let (entries, at) = option_entries(text, source);
    build_rule(group, &entries, &at, origin)
}

/// Parses a rule sent through the control channel: [`parse_rule_option`], plus where it goes
/// in the order of checks: the word `first`, or `before=N` (rule N).
pub fn parse_rule_command(
    group: Group,
    text: &str,
    source: Source,
    origin: Origin,
) -> Result<(Rule, Placement), ConfigError> {
    let (mut entries, at) = option_entries(text, source);
    let mut placement = Placement::Last;
    let mut placed_by: Option<String> = None;
    let mut keep = Vec::with_capacity(entries.len());
    for e in entries.drain(..) {
        let here = match (e.key.as_str(), e.value.as_str()) {
            ("first", "") => Placement::First,
            ("before", n) => match n.trim().parse::<u32>() {
                Ok(n) => Placement::Before(RuleId(n)),
                Err(_) => {
                    return Err(ConfigError {
                        at,
                        section: Some(group.name().to_string()),
                        key: Some(e.key),
                        value: Some(e.value),
                        problem: Problem::BadPlacement,
                    });
                }
            },
            _ => {
                keep.push(e);
                continue;
            }
        };
        if let Some(first) = placed_by.replace(e.key.clone()) {
            return Err(ConfigError {
                at,
                section: Some(group.name().to_string()),
                key: Some(e.key),
                value: Some(e.value),
                problem: Problem::TwoPlacements(first),
            });
        }
        placement = here;
    }
    let rule = build_rule(group, &keep, &at, origin)?;
    Ok((rule, placement))
}

fn option_entries(text: &str, source: Source) -> (Vec<Entry>, Location) {
    let entries: Vec<Entry> = split_options(text)
        .into_iter()
        .map(|(key, value)| Entry {
            key,
            bare: value.is_none(),
            value: value.unwrap_or_default(),
            line: None,
        })
        .collect();
    (entries, Location { source, line: None })
}

/// QEMU's request limits for the blkdebug node (`align`, `max-transfer`, ...), validated as
/// QEMU validates them. Zero means "not set".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub align: u64,
    pub max_transfer: u64,
    pub opt_write_zero: u64,
    pub max_write_zero: u64,
    pub opt_discard: u64,
    pub max_discard: u64,
}

impl Limits {
    /// The request alignment in force (1 when `align` is not set, like a buffered file).
    pub fn request_alignment(&self) -> u64 {
        self.align.max(1)
    }

    /// QEMU's checks from `blkdebug_open`, with its rule that each limit must be a multiple
    /// of the alignment (and the max of its opt counterpart).
    pub fn validate(&self) -> Result<(), ConfigError> {
        const INT_MAX: u64 = i32::MAX as u64;
        let bad = |key: &str, value: u64, why: String| ConfigError {
            at: Location {
                source: Source::LimitOption,
                line: None,
            },
            section: None,
            key: Some(format!("--{key}")),
            value: Some(value.to_string()),
            problem: Problem::BadLimit(why),
        };
        if self.align != 0 && (self.align >= INT_MAX || !self.align.is_power_of_two()) {
            return Err(bad(
                "align",
                self.align,
                "must be a power of two below 2^31".into(),
            ));
        }
        let align = self.request_alignment();
        let multiple = |key: &str, value: u64, of: u64| {
            if value != 0 && (value >= INT_MAX || !value.is_multiple_of(of)) {
                Err(bad(
                    key,
                    value,
                    format!("must be a multiple of {of} (the alignment) below 2^31"),
                ))
            } else {
                Ok(())
            }
        };
        multiple("max-transfer", self.max_transfer, align)?;
        multiple("opt-write-zero", self.opt_write_zero, align)?;
        multiple(
            "max-write-zero",
            self.max_write_zero,
            self.opt_write_zero.max(align),
        )?;
        multiple("opt-discard", self.opt_discard, align)?;
        multiple("max-discard", self.max_discard, self.opt_discard.max(align))?;
        Ok(())
    }
}

/// A validated rule set: file rules first, then command-line rules, plus load warnings; and
/// the bad sectors of every `[bad-sectors]` section (media: not rules).
#[derive(Debug, Default)]
pub struct RuleSet {
    pub rules: Vec<Rule>,
    pub bad: Option<(SectorSet, BadSettings)>,
}

/// A rule given on the command line: the flag it came with and its text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CliRule {
    /// `--inject-error`, `--set-state` or `--rule` (whose text starts with `SECTION:`).
    pub flag: &'static str,
    pub text: String,
}

impl CliRule {
    pub fn new(flag: &'static str, text: impl Into<String>) -> CliRule {
        CliRule {
            flag,
            text: text.into(),
        }
    }
}

/// Splits `SECTION:K=V,...` (the `--rule` form) into its group and its keys.
pub fn split_section(text: &str) -> Result<(Group, &str), Problem> {
    let (section, keys) = text.split_once(':').ok_or(Problem::MissingSection)?;
    let section = section.trim().trim_start_matches('[').trim_end_matches(']');
    let group = Group::from_name(section).ok_or(Problem::MissingSection)?;
    Ok((group, keys))
}

impl RuleSet {
    /// Loads the config file (if any) and appends command-line rules in the order given.
    pub fn load(config: Option<&Path>, cli: &[CliRule]) -> Result<RuleSet, ConfigError> {
        let (mut rules, mut bad) = match config {
            Some(path) => load_config_file(path)?,
            None => (Vec::new(), Vec::new()),
        };
        for (i, rule) in cli.iter().enumerate() {
            // Numbered per flag: `--rule #2` is the second `--rule`, whatever came between.
            let index = 1 + cli[..i].iter().filter(|r| r.flag == rule.flag).count();
            let source = Source::Option {
                flag: rule.flag,
                index,
                text: rule.text.clone(),
            };
            let origin = Origin::CommandLine {
                flag: rule.flag,
                index,
            };
            let (group, text) = match rule.flag {
                "--inject-error" => (Group::InjectError, rule.text.as_str()),
                "--set-state" => (Group::SetState, rule.text.as_str()),
                _ => split_section(&rule.text).map_err(|problem| ConfigError {
                    at: Location {
                        source: source.clone(),
                        line: None,
                    },
                    section: None,
                    key: None,
                    value: Some(rule.text.clone()),
                    problem,
                })?,
            };
            let (entries, at) = option_entries(text, source);
            match build_section(group, &entries, &at, origin, Path::new("."))? {
                Parsed::Rule(rule) => rules.push(rule),
                Parsed::Bad(spec) => bad.push(spec),
            }
        }
        Ok(RuleSet {
            rules,
            bad: merge_bad(bad)?,
        })
    }

    /// Refuses `[power-cut]` rules on a mount without `--write-cache` (§5).
    pub fn check_write_cache(&self, write_cache: bool) -> Result<(), ConfigError> {
        check_write_cache(&self.rules, write_cache)
    }

    /// Warnings for rules that can never fire in a FUSE view (spec §2).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, rule) in self.rules.iter().enumerate() {
            let n = i + 1;
            if let Some(event) = rule.event
                && !event.fires_in_fuse_view()
            {
                out.push(format!(
                    "rule {n} ({}): event '{event}' is a qcow2-internal event that never fires \
                     in a FUSE view of a raw image",
                    rule.origin
                ));
            }
            if let Action::Request { matches, .. } = &rule.action {
                let discard_only = IoType::ALL
                    .iter()
                    .filter(|t| matches.iotypes.contains(**t))
                    .all(|t| *t == IoType::Discard);
                if let Action::Request { fault, matches } = &rule.action
                    && flush_only_with_range(&matches.range, matches.iotypes, fault)
                {
                    out.push(format!(
                        "rule {n} ({}): iotype=flush with a range never matches: a flush has \
                         no range",
                        rule.origin
                    ));
                }
                if discard_only {
                    out.push(format!(
                        "rule {n} ({}): iotype=discard never matches: no FUSE operation \
                         produces a discard (punch-hole is write-zeroes)",
                        rule.origin
                    ));
                }
            }
        }
        out
    }
}

/// Refuses `[power-cut]` rules among `rules` on a mount without `--write-cache` (§5).
pub fn check_write_cache(rules: &[Rule], write_cache: bool) -> Result<(), ConfigError> {
    if write_cache {
        return Ok(());
    }
    let Some(rule) = rules
        .iter()
        .find(|r| matches!(r.action, Action::PowerCut { .. }))
    else {
        return Ok(());
    };
    let (source, line) = match &rule.origin {
        Origin::File { path, line } => (Source::File(PathBuf::from(path)), Some(*line)),
        Origin::CommandLine { flag, index } => (
            Source::Option {
                flag,
                index: *index,
                text: String::new(),
            },
            None,
        ),
        Origin::Runtime => (Source::LimitOption, None),
    };
    Err(ConfigError {
        at: Location { source, line },
        section: Some("power-cut".into()),
        key: None,
        value: None,
        problem: Problem::PowerCutNeedsWriteCache,
    })
}

/// Adds up `[bad-sectors]` sections; they must agree on the settings.
fn merge_bad(specs: Vec<BadSpec>) -> Result<Option<(SectorSet, BadSettings)>, ConfigError> {
    let mut iter = specs.into_iter();
    let Some(first) = iter.next() else {
        return Ok(None);
    };
    let mut sectors = first.sectors;
    for spec in iter {
        if spec.settings != first.settings {
            return Err(ConfigError {
                at: spec.at,
                section: Some("bad-sectors".into()),
                key: None,
                value: None,
                problem: Problem::BadSettingsDiffer(first.at.to_string()),
            });
        }
        sectors.extend(&spec.sectors);
    }
    Ok(Some((sectors, first.settings)))
}

/// QEMU's `blkdebug:CONFIG:IMAGE` filename: `Some((config, image))`, config empty for none.
pub fn parse_blkdebug_filename(name: &str) -> Option<(Option<PathBuf>, PathBuf)> {
    let rest = name.strip_prefix("blkdebug:")?;
    let (config, image) = rest.split_once(':')?;
    let config = (!config.is_empty()).then(|| PathBuf::from(config));
    Some((config, PathBuf::from(image)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<Rule>, ConfigError> {
        parse_config_text(Path::new("t.ini"), text)
    }

    fn file_err(
        line: usize,
        section: Option<&str>,
        key: Option<&str>,
        value: Option<&str>,
        problem: Problem,
    ) -> ConfigError {
        ConfigError {
            at: Location {
                source: Source::File(PathBuf::from("t.ini")),
                line: Some(line),
            },
            section: section.map(String::from),
            key: key.map(String::from),
            value: value.map(String::from),
            problem,
        }
    }

    #[test]
    fn parses_every_key_of_both_groups() {
        let rules = parse(
            "# comment\n\n[inject-error]\nevent = \"read_aio\"\nstate = \"2\"\nerrno = \"28\"\n\
             sector = \"0x10\"\nonce = \"on\"\nimmediately = \"yes\"\niotype = \"read\"\n\
             [set-state]\nevent = \"write_aio\"\nstate = \"1\"\nnew_state = \"010\"\n",
        )
        .unwrap();
        assert_eq!(
            rules,
            vec![
                Rule {
                    event: Some(Event::ReadAio),
                    state: 2,
                    action: Action::Request {
                        fault: Fault::Error {
                            errno: 28,
                            immediately: true,
                        },
                        matches: RequestMatch::qemu(Some(16), IoTypes::only(IoType::Read), true),
                    },
                    origin: Origin::File {
                        path: "t.ini".into(),
                        line: 3
                    },
                },
                Rule {
                    event: Some(Event::WriteAio),
                    state: 1,
                    action: Action::SetState { new_state: 8 },
                    origin: Origin::File {
                        path: "t.ini".into(),
                        line: 11
                    },
                },
            ]
        );
    }

    #[test]
    fn defaults_match_qemu() {
        let rules = parse("[inject-error]\nevent=none\n[set-state]\nevent=read_aio\n").unwrap();
        assert_eq!(
            rules[0].action,
            Action::Request {
                fault: Fault::Error {
                    errno: libc::EIO,
                    immediately: false
                },
                matches: RequestMatch::qemu(None, IoTypes::default(), false),
            }
        );
        assert_eq!(rules[0].state, 0);
        assert_eq!(rules[1].action, Action::SetState { new_state: 0 });
    }

    #[test]
    fn accepts_unquoted_values_symbolic_errno_and_dotted_events() {
        let rules =
            parse("[inject-error \"id\"]\n  event=l2_alloc.write\nerrno = ENOSPC\nsector=-1\n")
                .unwrap();
        assert_eq!(rules[0].event, Some(Event::L2AllocWrite));
        assert!(matches!(
            &rules[0].action,
            Action::Request {
                fault: Fault::Error { errno: 28, .. },
                matches: RequestMatch {
                    range: Range::Any,
                    ..
                },
            }
        ));
    }

    #[test]
    fn every_error_names_line_section_key_and_value() {
        assert_eq!(
            parse("[bogus]\n").unwrap_err(),
            file_err(1, Some("bogus"), None, None, Problem::UnknownGroup)
        );
        assert_eq!(
            parse("event = \"read_aio\"\n").unwrap_err(),
            file_err(
                1,
                None,
                Some("event"),
                Some("read_aio"),
                Problem::KeyOutsideGroup
            )
        );
        assert_eq!(
            parse("[inject-error]\nevent=read_aio\nsectr = \"1\"\n").unwrap_err(),
            file_err(
                3,
                Some("inject-error"),
                Some("sectr"),
                Some("1"),
                Problem::UnknownKey {
                    allowed: INJECT_ERROR_KEYS
                }
            )
        );
        assert_eq!(
            parse("[set-state]\nnew_state = 2\n").unwrap_err(),
            file_err(1, Some("set-state"), None, None, Problem::MissingEvent)
        );
        assert_eq!(
            parse("[inject-error]\nevent = \"read_aoi\"\n").unwrap_err(),
            file_err(
                2,
                Some("inject-error"),
                Some("event"),
                Some("read_aoi"),
                Problem::UnknownEvent
            )
        );
        let bad = |key: &str, value: &str, problem: Problem| {
            let text = format!("[inject-error]\nevent = none\n{key} = \"{value}\"\n");
            assert_eq!(
                parse(&text).unwrap_err(),
                file_err(3, Some("inject-error"), Some(key), Some(value), problem),
                "{key} = {value}"
            );
        };
        bad("sector", "12x", Problem::BadNumber);
        bad("state", "-2", Problem::NegativeState);
        bad("once", "maybe", Problem::BadBool);
        bad("errno", "512", Problem::ErrnoOutOfRange);
        bad("errno", "999", Problem::ErrnoOutOfRange);
        bad("errno", "-5", Problem::NegativeErrno);
        bad("errno", "ENOTANERRNO", Problem::UnknownErrnoName);
        bad("iotype", "reed", Problem::BadIoType);
        assert_eq!(
            parse("[inject-error]\nthis is not ini\n").unwrap_err(),
            file_err(
                2,
                Some("inject-error"),
                None,
                Some("this is not ini"),
                Problem::Syntax
            )
        );
    }

    /// QEMU's `qemu_config_parse` ignores what follows a header's `]` and a value's closing
    /// quote: the README's own `[set-state]   # comment` must load.
    #[test]
    fn text_after_a_header_or_a_quoted_value_is_ignored_as_qemu_does() {
        let rules = parse(
            "[set-state]   # comment\nevent = \"write_aio\"  # why\nnew_state = \"2\"x\n\
             [inject-error \"id1\"]\nevent = read_aio # unquoted, comment after blanks\n",
        )
        .unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].event, Some(Event::WriteAio));
        assert_eq!(rules[0].action, Action::SetState { new_state: 2 });
        assert_eq!(rules[1].event, Some(Event::ReadAio));
        // A header without its `]` is still an error.
        let e = parse("[set-state\nevent = none\n").unwrap_err();
        assert_eq!(e.problem, Problem::Syntax);
        assert_eq!(e.at.line, Some(1));
    }

    /// QEMU reads bytes: bytes that are not UTF-8 in a comment, or after a header or a
    /// closing quote, change nothing; in a value they are an error that names the line.
    #[test]
    fn bytes_that_are_not_utf8_fail_only_where_they_matter_and_a_bom_is_skipped() {
        let ok = b"\xef\xbb\xbf# caf\xe9\n[inject-error] \xff\nevent = \"read_aio\" \xfe\n\
                   errno = \"5\"\r\n";
        let rules = parse_config_bytes(Path::new("t.ini"), ok).unwrap();
        assert_eq!(rules.len(), 1);
        let bad = b"[inject-error]\nevent = \"read_aio\"\nerrno = EI\xff\n";
        let e = parse_config_bytes(Path::new("t.ini"), bad).unwrap_err();
        assert_eq!(e.problem, Problem::NotText);
        assert_eq!(e.at.line, Some(3));
        assert_eq!(e.section.as_deref(), Some("inject-error"));
    }

    #[test]
    fn a_sector_no_request_can_reach_is_refused_and_errno_names_ignore_case() {
        let e = parse("[inject-error]\nevent = none\nsector = 18446744073709551615\n").unwrap_err();
        assert_eq!(e.problem, Problem::SectorTooLarge);
        assert_eq!(e.at.line, Some(3));
        let max = format!("[inject-error]\nevent = none\nsector = {MAX_SECTOR}\n");
        assert!(parse(&max).is_ok());
        let rules = parse("[inject-error]\nevent = none\nerrno = enospc\n").unwrap();
        assert!(matches!(
            rules[0].action,
            Action::Request {
                fault: Fault::Error { errno: 28, .. },
                ..
            }
        ));
    }

    #[test]
    fn an_unreadable_file_is_named_once_with_one_colon() {
        let e = load_config_file(Path::new("/nonexistent/f.ini")).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("/nonexistent/f.ini: cannot read the config file: "),
            "{text}"
        );
    }

    #[test]
    fn error_message_reads_well() {
        let e = parse("[inject-error]\nevent = none\nerrno = \"600\"\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.ini:3: [inject-error] errno = \"600\": errno must be 0..511 or a name like EIO \
             (QEMU lets 512..999 hang clients)"
        );
    }

    #[test]
    fn command_line_rules_follow_file_rules() {
        let set = RuleSet::load(
            None,
            &[
                CliRule::new("--inject-error", "event=read_aio,errno=ENOSPC,sector=8"),
                CliRule::new("--set-state", "event=none,new_state=3"),
            ],
        )
        .unwrap();
        assert_eq!(set.rules.len(), 2);
        assert_eq!(set.rules[1].action, Action::SetState { new_state: 3 });
        let err = RuleSet::load(
            None,
            &[CliRule::new("--inject-error", "event=read_aio,errno=x")],
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "--inject-error #1 'event=read_aio,errno=x': [inject-error] errno = \"x\": \
             unknown errno name"
        );
    }

    #[test]
    fn limits_are_validated_like_qemu() {
        let ok = Limits {
            align: 4096,
            max_transfer: 65536,
            opt_write_zero: 8192,
            max_write_zero: 16384,
            ..Limits::default()
        };
        assert_eq!(ok.validate(), Ok(()));
        let bad_align = Limits {
            align: 3000,
            ..Limits::default()
        };
        assert!(
            bad_align
                .validate()
                .unwrap_err()
                .to_string()
                .contains("power of two")
        );
        let bad_mt = Limits {
            align: 4096,
            max_transfer: 6000,
            ..Limits::default()
        };
        assert_eq!(
            bad_mt.validate().unwrap_err().key.as_deref(),
            Some("--max-transfer")
        );
        let bad_mwz = Limits {
            opt_write_zero: 8192,
            max_write_zero: 4096,
            ..Limits::default()
        };
        assert_eq!(
            bad_mwz.validate().unwrap_err().key.as_deref(),
            Some("--max-write-zero")
        );
    }

    #[test]
    fn sizes_and_filenames() {
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("1q").is_err());
        assert_eq!(
            parse_blkdebug_filename("blkdebug:r.ini:/tmp/a.img"),
            Some((Some(PathBuf::from("r.ini")), PathBuf::from("/tmp/a.img")))
        );
        assert_eq!(
            parse_blkdebug_filename("blkdebug::a.img"),
            Some((None, PathBuf::from("a.img")))
        );
        assert_eq!(parse_blkdebug_filename("a.img"), None);
    }

    #[test]
    fn every_new_section_parses_with_its_keys() {
        let rules = parse(
            "[delay]\nlatency = 1.5s\njitter = 250us\nerrno = ETIMEDOUT\nsectors = \"0-7, 100\"\n\
             [corrupt]\nevent = read_aio\nmode = zero\nbytes = 1k\niotype = read\nprobability = 5%\n\
             [drop-write]\nskip = 3\nevery = 2\ncount = 2\n\
             [torn-write]\nkeep = 4k\nunit = 4096\n\
             [torn-write]\nmode = sectors\nerrno = EIO\n\
             [short-io]\nlength = 512\nonce = on\n\
             [misdirect-write]\nshift = -8k\nstate = 2\n\
             [suspend]\ntag = hold\niotype = write\nsector = 8\n",
        )
        .unwrap();
        let shown: Vec<String> = rules.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            shown,
            vec![
                "standing state=any delay latency=1500ms jitter=250us errno=ETIMEDOUT (110) \
                 range=sectors 0-7,100 iotype=default",
                "event=read_aio state=any corrupt mode=zero bytes=1024 range=any iotype=read \
                 probability=0.05",
                "standing state=any drop-write range=any iotype=write|write-zeroes skip=3 every=2 \
                 count=2",
                "standing state=any torn-write mode=prefix keep=4096 unit=4096 range=any \
                 iotype=write",
                "standing state=any torn-write mode=sectors unit=512 errno=EIO (5) range=any \
                 iotype=write",
                "standing state=any short-io length=512 range=any iotype=read|write once=on",
                "standing state=2 misdirect-write shift=-8192 range=any iotype=write",
                "standing state=any suspend tag=hold range=sector 8 (byte 4096) iotype=write",
            ]
        );
        // QEMU's [inject-error] without an event is a standing rule here (QEMU refuses it).
        assert_eq!(parse("[inject-error]\nerrno = 5\n").unwrap()[0].event, None);
    }

    #[test]
    fn numbers_the_range_cannot_hold_and_units_of_part_sectors_are_refused() {
        let problem = |text: &str| parse(text).map(|_| ()).map_err(|e| (e.problem, e.at.line));
        let beyond = |bytes, bits| Err((Problem::BeyondRange { bytes, bits }, Some(3)));
        // A range of 8 sectors holds 4096 bytes, 32768 bits; a QEMU `sector` 512 bytes.
        assert_eq!(
            problem("[corrupt]\nsectors = 0-7\nbits = 32769\n"),
            beyond(4096, true)
        );
        assert_eq!(problem("[corrupt]\nsectors = 0-7\nbits = 32768\n"), Ok(()));
        assert_eq!(
            problem("[corrupt]\nsectors = 0, 9\nbits = 8193\n"),
            beyond(1024, true)
        );
        assert_eq!(
            problem("[corrupt]\nsector = 8\nbytes = 513\nmode = zero\n"),
            beyond(512, false)
        );
        assert_eq!(
            problem("[corrupt]\nsector = -1\nbytes = 1G\nmode = random\n"),
            Ok(()),
            "no range: each request bounds it"
        );
        assert_eq!(problem("[corrupt]\nbits = 4000000000\n"), Ok(()));
        // A range too large to count in bytes holds any number.
        assert_eq!(
            problem("[corrupt]\nsectors = 0-18014398509481983\nbits = 4000000000\n"),
            Ok(())
        );
        let e = parse("[corrupt]\nsector = 8\nbits = 4097\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "t.ini:3: [corrupt] bits = \"4097\": more bits than the rule's range can hold: \
             the rule's range holds 512 bytes (4096 bits)"
        );
        for unit in ["1", "1000", "4095"] {
            let text = format!("[torn-write]\nunit = {unit}\n");
            assert_eq!(
                problem(&text),
                Err((Problem::UnitNotSectors, Some(2))),
                "{unit}"
            );
        }
        assert_eq!(problem("[torn-write]\nmode = sectors\nunit = 4k\n"), Ok(()));
        let long = "t".repeat(MAX_TAG + 1);
        assert_eq!(
            problem(&format!("[suspend]\ntag = {long}\n")),
            Err((Problem::TooLong(MAX_TAG), Some(2)))
        );
        assert_eq!(
            problem(&format!("[suspend]\ntag = {}\n", &long[1..])),
            Ok(())
        );
    }

    #[test]
    fn new_keys_are_validated_with_line_section_key_and_value() {
        let bad = |section: &str, key: &str, value: &str, problem: Problem| {
            let required = match section {
                "delay" => "latency = 1ms\n",
                "misdirect-write" => "shift = 1\n",
                "suspend" => "tag = t\n",
                "bad-sectors" => "sectors = 1\n",
                _ => "",
            };
            let required = if required.starts_with(key) {
                ""
            } else {
                required
            };
            let text = format!("[{section}]\n{required}{key} = \"{value}\"\n");
            let line = text.lines().count();
            assert_eq!(
                parse(&text).unwrap_err(),
                file_err(line, Some(section), Some(key), Some(value), problem),
                "[{section}] {key} = {value}"
            );
        };
        bad("delay", "latency", "5 parsecs", Problem::BadDuration);
        bad("delay", "jitter", "-1ms", Problem::BadDuration);
        bad("delay", "probability", "1.5", Problem::BadProbability);
        bad("delay", "probability", "150%", Problem::BadProbability);
        bad("delay", "every", "0", Problem::Zero);
        bad("delay", "count", "0", Problem::Zero);
        bad("delay", "skip", "x", Problem::BadNumber);
        bad(
            "delay",
            "sectors",
            "9-3",
            Problem::BadRange(RangeError::Backwards("9-3".into())),
        );
        bad(
            "corrupt",
            "mode",
            "shred",
            Problem::BadChoice(&["flip", "zero", "random"]),
        );
        bad("corrupt", "bits", "0", Problem::Zero);
        bad(
            "corrupt",
            "iotype",
            "flush",
            Problem::IoTypeNotForAction("read|write".into()),
        );
        bad(
            "drop-write",
            "iotype",
            "read",
            Problem::IoTypeNotForAction("write|write-zeroes".into()),
        );
        bad("misdirect-write", "shift", "sideways", Problem::BadSize);
        bad("torn-write", "unit", "0", Problem::Zero);
        bad("short-io", "length", "lots", Problem::BadSize);
        bad("suspend", "tag", "two words", Problem::BadTag);
        bad("bad-sectors", "errno", "0", Problem::Zero);
        bad(
            "short-io",
            "latency",
            "1ms",
            Problem::UnknownKey {
                allowed: Group::ShortIo.keys(),
            },
        );
        let e = parse("[delay]\njitter = 1ms\n").unwrap_err();
        assert_eq!(
            (e.problem, e.at.line),
            (Problem::MissingKey("latency"), Some(1))
        );
        let e = parse("[drop-write]\nsector = 1\nsectors = 2\n").unwrap_err();
        assert_eq!((e.problem, e.at.line), (Problem::SectorAndSectors, Some(3)));
        let e = parse("[drop-write]\nonce = on\ncount = 2\n").unwrap_err();
        assert_eq!(e.problem, Problem::OnceAndCount);
        let e = parse("[corrupt]\nmode = flip\nbytes = 4\n").unwrap_err();
        assert_eq!(e.problem, Problem::KeyNotForMode("bytes", "zero or random"));
        let e = parse("[set-state]\nevent = none\nprobability = 1\n").unwrap_err();
        assert!(matches!(e.problem, Problem::UnknownKey { .. }));
        assert_eq!(
            parse("[delay]\nlatency = 2\n").unwrap()[0].to_string(),
            "standing state=any delay latency=2ms range=any iotype=default",
            "a bare number is milliseconds"
        );
    }

    #[test]
    fn the_rule_flag_takes_any_section_and_keeps_command_line_order() {
        let set = RuleSet::load(
            None,
            &[
                CliRule::new("--rule", "delay:latency=5ms,iotype=read"),
                CliRule::new("--inject-error", "event=none"),
                CliRule::new("--rule", "[drop-write]:sectors=1-2"),
            ],
        )
        .unwrap();
        let sections: Vec<&str> = set.rules.iter().map(|r| r.section()).collect();
        assert_eq!(sections, vec!["delay", "inject-error", "drop-write"]);
        let e = RuleSet::load(None, &[CliRule::new("--rule", "latency=5ms")]).unwrap_err();
        assert_eq!(e.problem, Problem::MissingSection);
        assert!(
            e.to_string()
                .starts_with("--rule #1 'latency=5ms': \"latency=5ms\": expected")
        );
        let e = RuleSet::load(None, &[CliRule::new("--rule", "delay:latency=soon")]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--rule #1 'delay:latency=soon': [delay] latency = \"soon\": not a duration (250us, \
             5ms, 1.5s; a bare number is milliseconds; at most a day)"
        );
    }
}
