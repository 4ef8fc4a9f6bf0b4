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

use crate::engine::errno;
pub use crate::engine::ranges::MAX_SECTOR;
use crate::engine::ranges::{RangeError, SECTOR, SectorSet};
pub use crate::engine::units::parse_size;
use crate::engine::{Action, IoType, Origin, Range, Rule};
use crate::media::BadSettings;

mod cli;
mod ini;
mod keys;

use cli::option_entries;
use keys::{Parsed, build_section, flush_only_with_range};

pub use cli::{CliRule, parse_rule_command, parse_rule_option, split_section};
pub use ini::{load_config_file, parse_config_bytes, parse_config_sections, parse_config_text};
pub use keys::{
    BadSpec, Group, MAX_TAG, parse_bool, parse_duration, parse_errno, parse_number,
    parse_probability,
};

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
            if let Action::Request { fault, matches } = &rule.action {
                let discard_only = IoType::ALL
                    .iter()
                    .filter(|t| matches.iotypes.contains(**t))
                    .all(|t| *t == IoType::Discard);
                if flush_only_with_range(&matches.range, matches.iotypes, fault) {
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

/// A warning for a rule whose whole range lies at or past `size` (the image's end): no
/// request reaches it unless the image grows. `None` for any other rule.
pub fn past_the_end(rule: &Rule, size: u64) -> Option<String> {
    let Action::Request { matches, .. } = &rule.action else {
        return None;
    };
    let first_byte = match &matches.range {
        Range::Any => return None,
        Range::Sector(s) => s.saturating_mul(SECTOR),
        Range::Sectors(set) => set.iter().next()?.0.saturating_mul(SECTOR),
    };
    (first_byte >= size).then(|| {
        format!(
            "its range ({}) starts at byte {first_byte}, at or past the image's end ({size} \
             bytes): no request reaches it unless the image grows",
            matches.range
        )
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
    use super::keys::INJECT_ERROR_KEYS;
    use super::*;
    use crate::engine::faults::Fault;
    use crate::engine::{Event, IoTypes, RequestMatch};

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
