//! QEMU's blkdebug INI dialect: lines, `[section]` headers, `key = "value"` (quoted or
//! not), `#` comments; bytes as QEMU reads them. Each section is handed to `keys.rs`.

use std::path::Path;

use super::keys::{BadSpec, Entry, Group, Parsed, build_section};
use super::{ConfigError, Location, Problem, Source};
use crate::engine::{Origin, Rule};

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
