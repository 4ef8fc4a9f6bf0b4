//! Rules as command-line and `ctl` text: `--inject-error K=V,...`, `--rule SECTION:K=V,...`
//! (`,,` a literal comma), and `ctl`'s placement words (`first`, `before=N`).

use super::keys::{Entry, Group, build_rule};
use super::{ConfigError, Location, Problem, Source};
use crate::engine::{Origin, Placement, Rule, RuleId};

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

pub(super) fn option_entries(text: &str, source: Source) -> (Vec<Entry>, Location) {
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
