//! The man pages: `blkdebugfs.1`, generated from the clap definitions of `main.rs`
//! (`blkdebugfs manpage`), and `blkdebugfs.ini.5`, the rule file, the control commands and
//! the trace (`blkdebugfs manpage --section 5`).
//!
//! One section-1 page for the whole command, so that `man ./blkdebugfs.1` shows every
//! subcommand's options: clap_mangen renders the top-level sections, then each subcommand
//! gets a section of its own (its synopsis, description and options, from clap_mangen's
//! renderers with their headings demoted).
//!
//! The section-5 page is built from the tables the code parses with: the sections and their
//! keys ([`Group::ALL`], [`Group::keys`]), the events ([`Event::ALL`]), the control commands
//! ([`COMMANDS`]), the power-cut modes ([`CutMode::NAMES`]) and the trace's fields
//! ([`trace::FIELDS`]). What a key means is written here ([`KEY_DOCS`]); a unit test fails
//! when a section, key or mode of those tables has no text, so a key added to the parser
//! cannot reach the page undocumented.
//!
//! Both committed pages are this output; tests compare them, so a change without
//! regenerating fails (`cargo run -q -- manpage > blkdebugfs.1` and `cargo run -q --
//! manpage --section 5 > blkdebugfs.ini.5` regenerate them).

use std::io::{self, Write};

use clap_mangen::Man;

use crate::config::Group;
use crate::control::COMMANDS;
use crate::engine::faults::CutMode;
use crate::engine::{Event, IoType};
use crate::trace;

/// The roff text of the page for `cmd` (the built `blkdebugfs` command).
pub fn render(cmd: clap::Command) -> io::Result<Vec<u8>> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let man = Man::new(cmd.clone());
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    writeln!(out, ".SH COMMANDS")?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = sub.get_bin_name().unwrap_or_else(|| sub.get_name());
        writeln!(out, ".SS \"{}\"", name.replace('"', ""))?;
        let sub_man = Man::new(sub.clone());
        out.extend(body(|w| sub_man.render_synopsis_section(w))?);
        writeln!(out, ".PP")?;
        out.extend(body(|w| sub_man.render_description_section(w))?);
        if sub.get_arguments().any(|a| !a.is_hide_set()) {
            writeln!(out, ".PP\n\\fBOptions:\\fR")?;
            out.extend(body(|w| sub_man.render_options_section(w))?);
        }
    }
    if cmd.get_after_help().is_some() {
        writeln!(out, ".SH \"EXIT STATUS\"")?;
        out.extend(body(|w| man.render_extra_section(w))?);
    }
    man.render_version_section(&mut out)?;
    writeln!(
        out,
        ".SH \"SEE ALSO\"\n\\fB{RULES_PAGE}\\fR(5): the rule file's sections and keys, the control \
         commands, the power\\-cut model and the trace."
    )?;
    Ok(once_preamble(&out))
}

/// The name of the section-5 page (`man 5 blkdebugfs.ini`).
pub const RULES_PAGE: &str = "blkdebugfs.ini";

/// What each section is for, in [`Group::ALL`] order.
const SECTION_DOCS: &[(&str, &str)] = &[
    (
        "inject-error",
        "QEMU's rule: fail a matching request with errno. Armed by its event (it then replaces \
         the active list of inject-error rules, which stays armed until another event with such \
         rules fires), or standing when it has no event.",
    ),
    (
        "set-state",
        "QEMU's rule: when event fires in state (0: any), move the state machine to new_state. \
         The state starts at 1; ctl set_state moves it by hand.",
    ),
    (
        "delay",
        "The request waits (holding no FUSE worker), then goes on, or fails with errno. Acts on \
         every iotype, flush included.",
    ),
    (
        "corrupt",
        "Other bytes: a read returns damaged bytes (the image is unchanged), a write stores \
         them (the client sees success). The places are seeded and lie inside the part of the \
         request that the rule's range covers.",
    ),
    (
        "drop-write",
        "A matching write or write-zeroes reports success and stores nothing. No keys of its \
         own.",
    ),
    (
        "torn-write",
        "Part of a write is stored; the client sees success, or errno.",
    ),
    (
        "short-io",
        "Only the first length bytes of a read or write move, and the call returns that count.",
    ),
    (
        "misdirect-write",
        "The write's data lands shift bytes away (clamped inside the image); the aimed range \
         keeps its old bytes and the client sees success.",
    ),
    (
        "suspend",
        "A matching request is parked under tag until ctl resume TAG (or resume_all, \
         --max-suspend, shutdown), as a breakpoint parks it; unlike break it parks every \
         matching request until count or once say otherwise.",
    ),
    (
        "power-cut",
        "Cut the power when event fires (see POWER CUTS): the request that fired it fails with \
         EIO. Needs --write-cache; ctl cannot add one (put it in the file and reload, \
         gated by a state).",
    ),
    (
        "bad-sectors",
        "Media, not a rule: sectors that fail reads until a write covering a whole one heals \
         it. Sections add up; their settings must agree. Events, clear and reload leave the \
         set alone; ctl bad changes it.",
    ),
];

/// What a key means: `(section, key, text)`, where section `*` is the match keys' meaning,
/// shared by every request-checked section (listed once, under MATCH KEYS). A section's own
/// entry wins over the shared one.
pub const KEY_DOCS: &[(&str, &str, &str)] = &[
    (
        "*",
        "event",
        "One of the 48 event names (see EVENTS). QEMU's arming: the rule joins the active list \
         when the event fires. Without it the rule is standing: armed from mount start, \
         checked after the active list.",
    ),
    (
        "*",
        "state",
        "The state gate: 0 (default) = any; a standing rule tests it at each request.",
    ),
    (
        "*",
        "sector",
        "QEMU's: the byte sector*512 lies inside the request (default: any; -1 = any). A rule \
         with a range never matches a flush.",
    ),
    (
        "*",
        "sectors",
        "Inclusive 512-byte sector ranges, \"2048-2055, 10000\" (or joined with +, as on a \
         command line where the comma separates keys: 2048-2055+10000): the request overlaps \
         one. Not with sector or range.",
    ),
    (
        "*",
        "range",
        "Byte ranges START-END with sizes (k, M, G: powers of 1024), END exclusive, several \
         joined with + or commas: 0-64M is the first 64 MiB; the rule means the sectors the \
         ranges touch. Not with sector or sectors.",
    ),
    (
        "*",
        "iotype",
        "read, write, write-zeroes, discard, flush, block-status, several with | (default: all \
         but block-status). Only the iotypes the section acts on match; naming another is an \
         error.",
    ),
    (
        "*",
        "probability",
        "0.01 or 1%: a matching request is acted on with this chance, seeded (default 1).",
    ),
    (
        "*",
        "skip",
        "The first N matching requests are not acted on (default 0).",
    ),
    (
        "*",
        "every",
        "Of the matching requests after skip, act on the Nth, 2Nth, ... (default 1).",
    ),
    (
        "*",
        "count",
        "Act on at most N requests, then the rule is deleted (default: unlimited).",
    ),
    ("*", "once", "on is count = 1 (not both); default off."),
    (
        "inject-error",
        "errno",
        "0..511 or a name (EIO, ENOSPC, ...); default 5 (EIO). 0 passes the request untouched \
         and hides later rules.",
    ),
    (
        "inject-error",
        "once",
        "on: delete the rule when it fails a request (count = 1; not both); default off.",
    ),
    (
        "inject-error",
        "immediately",
        "Accepted for QEMU; changes nothing observable through FUSE.",
    ),
    (
        "set-state",
        "event",
        "Required: the event that moves the state.",
    ),
    (
        "set-state",
        "state",
        "The state the rule acts in; 0 (default) = any.",
    ),
    (
        "set-state",
        "new_state",
        "The state to move to (default 0).",
    ),
    (
        "delay",
        "latency",
        "Required: the wait, a duration (250us, 5ms, 1.5s; a bare number is milliseconds).",
    ),
    (
        "delay",
        "jitter",
        "The wait is uniform in latency plus or minus jitter, never below 0, seeded (default 0).",
    ),
    (
        "delay",
        "errno",
        "0 (default): the request proceeds after the wait; otherwise it fails with errno \
         without doing its I/O.",
    ),
    (
        "corrupt",
        "mode",
        "flip (default: flip bits distinct bits), zero or random (overwrite bytes consecutive \
         bytes with zeroes or seeded random bytes).",
    ),
    (
        "corrupt",
        "bits",
        "flip: how many distinct bits to flip (default 1).",
    ),
    (
        "corrupt",
        "bytes",
        "zero and random: how many consecutive bytes to overwrite (default 512).",
    ),
    (
        "torn-write",
        "keep",
        "Bytes of the write stored, as a prefix (default: a seeded multiple of unit below the \
         write's length, 0 included).",
    ),
    (
        "torn-write",
        "mode",
        "prefix (default) or sectors: each unit of the image's grid that the write covers is \
         kept or not, independently, seeded (no keep).",
    ),
    (
        "torn-write",
        "unit",
        "The grain of keep and of sectors mode (default 512).",
    ),
    (
        "torn-write",
        "errno",
        "0 (default): the client sees success; otherwise the kept part is stored and the \
         write fails with errno.",
    ),
    (
        "short-io",
        "length",
        "Bytes to transfer (default: a seeded multiple of 512 below the request's length).",
    ),
    (
        "misdirect-write",
        "shift",
        "Required: a size, may be negative (-4k): where the data lands, from where it was \
         aimed.",
    ),
    (
        "suspend",
        "tag",
        "Required, one word: the tag to park matching requests under.",
    ),
    (
        "power-cut",
        "event",
        "Required: the cut happens when this event fires, before the request that fired it \
         goes on.",
    ),
    ("power-cut", "state", "The state gate; 0 (default) = any."),
    (
        "power-cut",
        "mode",
        "What becomes of the unsynced writes: lose (default), keep, random or sectors (see \
         POWER CUTS).",
    ),
    (
        "power-cut",
        "probability",
        "A firing of the event cuts with this chance, seeded (default 1).",
    ),
    (
        "power-cut",
        "skip",
        "The first N firings do not cut (default 0).",
    ),
    (
        "power-cut",
        "every",
        "Of the firings after skip, cut at the Nth, 2Nth, ... (default 1).",
    ),
    (
        "power-cut",
        "count",
        "Cut at most N times, then the rule is deleted.",
    ),
    ("power-cut", "once", "on is count = 1 (not both)."),
    (
        "bad-sectors",
        "sectors",
        "Inclusive 512-byte sector ranges, \"2048-2055, 10000\". A section needs sectors or \
         file (or both).",
    ),
    (
        "bad-sectors",
        "file",
        "A list of bad sectors: one sector or A-B range per line, # comments (badblocks -b 512 \
         -o FILE writes one). Relative to the config file's directory (the current directory \
         for --rule).",
    ),
    (
        "bad-sectors",
        "errno",
        "What a read of a bad sector gets (default EIO; 0 is an error).",
    ),
    (
        "bad-sectors",
        "heal-on-write",
        "on (default): a write covering a whole bad sector stores it and heals it; off: it \
         stays bad.",
    ),
    (
        "bad-sectors",
        "write-errno",
        "Non-zero: every write touching a bad sector fails with it and heals nothing \
         (default 0).",
    ),
];

/// What each power-cut mode does to each unsynced write, in [`CutMode::NAMES`] order.
const CUT_MODE_DOCS: &[(&str, &str)] = &[
    (
        "lose",
        "(default) lost: its sectors hold what they held at the last successful flush",
    ),
    ("keep", "kept"),
    (
        "random",
        "kept, lost or torn (a seeded subset of its 512-byte sectors kept), one chance in \
         three each",
    ),
    (
        "sectors",
        "each of its 512-byte sectors kept or lost independently (seeded, even odds)",
    ),
];

/// The text of `key` in `section`: its own entry, else the shared match-key one (`*`).
fn key_doc(section: &str, key: &str) -> Option<(bool, &'static str)> {
    let find = |s: &str| {
        KEY_DOCS
            .iter()
            .find(|(sec, k, _)| *sec == s && *k == key)
            .map(|(_, _, doc)| *doc)
    };
    find(section)
        .map(|d| (true, d))
        .or_else(|| find("*").map(|d| (false, d)))
}

/// The shared match keys, in the order the request-checked sections list them.
fn match_keys() -> Vec<&'static str> {
    KEY_DOCS
        .iter()
        .filter(|(sec, _, _)| *sec == "*")
        .map(|(_, k, _)| *k)
        .collect()
}

/// `text` as roff body text: backslashes and hyphens escaped, and a line that would start
/// with a control character (`.` or `'`) made plain. Text written here with its own roff
/// escapes (`\fB`) keeps them.
fn roff(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                out.push('\\');
                if let Some(n) = chars.next() {
                    out.push(n);
                }
            }
            '-' => out.push_str("\\-"),
            _ => out.push(c),
        }
    }
    if out.starts_with('.') || out.starts_with('\'') {
        out.insert_str(0, "\\&");
    }
    out
}

/// The roff text of `blkdebugfs.ini(5)`, from the code's tables (see the module doc).
pub fn render_rules_page() -> io::Result<Vec<u8>> {
    let mut o = Vec::new();
    let version = env!("CARGO_PKG_VERSION");
    writeln!(o, ".TH {RULES_PAGE} 5 \"\" \"blkdebugfs {version}\"")?;
    writeln!(o, ".SH NAME")?;
    writeln!(
        o,
        "{RULES_PAGE} \\- blkdebugfs rules (config file, \\-\\-rule, ctl), control commands, \
         power cuts and the trace"
    )?;
    writeln!(o, ".SH SYNOPSIS")?;
    for line in [
        "\\fBblkdebugfs mount\\fR [\\fB\\-c\\fR \\fIFILE\\fR] \
         [\\fB\\-\\-rule\\fR \\fISECTION\\fR:\\fIK\\fR=\\fIV\\fR,...]... \
         \\fIIMAGE\\fR \\fIMOUNTPOINT\\fR",
        "\\fBblkdebugfs check\\fR [\\fB\\-c\\fR \\fIFILE\\fR] \
         [\\fB\\-\\-rule\\fR \\fISECTION\\fR:\\fIK\\fR=\\fIV\\fR,...]...",
        "\\fBblkdebugfs ctl\\fR \\fIMOUNTPOINT\\fR \\fICOMMAND\\fR [\\fIARGS\\fR]...",
    ] {
        writeln!(o, "{line}\n.br")?;
    }
    writeln!(o, ".SH DESCRIPTION")?;
    for para in [
        "A rule file is QEMU blkdebug's INI dialect: each [section] is one rule, in file order, \
         and sections repeat. Lines are a [section] header, key = \"value\" (quoted as QEMU \
         writes it, or not), a comment (first non-blank character #) or blank. Keys are \
         case-sensitive. QEMU's own configs work unchanged.",
        "The same rules come from the command line, after the file's, in the order given: \
         --inject-error K=V,..., --set-state K=V,... and, for any section, \
         --rule SECTION:K=V,... (,, is a literal comma). ctl adds a rule to a live mount \
         with the section's name as the command and the same keys (ctl MNT delay \
         latency=5ms,sectors=0-7).",
        "Rules are checked per request: the active list first (rules armed by events, as QEMU \
         arms them), then the standing rules (rules without event), each in written order; \
         the first rule that acts decides. A rule that matches but does not act (skipped, not \
         its turn, not drawn) lets later rules decide. A bad rule is refused before anything \
         is mounted (exit 2), with the file, line, section, key and value; a bad ctl rule gets \
         an error reply and changes nothing.",
    ] {
        writeln!(o, ".PP\n{}", roff(para))?;
    }
    writeln!(o, ".SH VALUES")?;
    for (what, text) in [
        ("numbers", "decimal, 0x hex or leading-0 octal"),
        ("booleans", "on, yes, true, y or off, no, false, n"),
        (
            "errno",
            "0..511 or a Linux name in any case (EIO, ENOSPC, enospc)",
        ),
        (
            "durations",
            "250us, 5ms, 1.5s; a bare number is milliseconds",
        ),
        ("sizes", "bytes, or with k, M, G (powers of 1024)"),
        ("probabilities", "0.01 or 1%"),
        (
            "sector ranges",
            "512-byte sectors, inclusive: \"2048-2055, 10000\"",
        ),
    ] {
        writeln!(o, ".TP\n\\fI{what}\\fR\n{}", roff(text))?;
    }
    writeln!(o, ".SH SECTIONS")?;
    let shared = match_keys();
    for group in Group::ALL {
        let name = group.name();
        let doc = SECTION_DOCS
            .iter()
            .find(|(s, _)| *s == name)
            .map_or("", |(_, d)| *d);
        writeln!(o, ".SS \"[{}]\"\n{}", roff(name), roff(doc))?;
        let mut matched = Vec::new();
        for key in group.keys() {
            match key_doc(name, key) {
                Some((true, doc)) => writeln!(o, ".TP\n\\fB{}\\fR\n{}", roff(key), roff(doc))?,
                Some((false, _)) if shared.contains(key) => matched.push(*key),
                _ => writeln!(o, ".TP\n\\fB{}\\fR\n(undocumented)", roff(key))?,
            }
        }
        if !matched.is_empty() {
            writeln!(o, ".PP\nAnd the match keys: {}.", roff(&matched.join(", ")))?;
        }
    }
    writeln!(o, ".SH \"MATCH KEYS\"")?;
    writeln!(
        o,
        "{}",
        roff(
            "Taken by every request-checked section, QEMU's inject-error included, with \
             these meanings unless the section says otherwise:"
        )
    )?;
    for key in &shared {
        if let Some((_, doc)) = key_doc("*", key) {
            writeln!(o, ".TP\n\\fB{}\\fR\n{}", roff(key), roff(doc))?;
        }
    }
    writeln!(
        o,
        ".PP\nThe iotypes: {}.",
        roff(
            &IoType::ALL
                .iter()
                .map(|t| t.name())
                .collect::<Vec<_>>()
                .join(", ")
        )
    )?;
    writeln!(o, ".SH EVENTS")?;
    writeln!(
        o,
        "{}",
        roff(
            "What each client operation fires: read: read_aio; write: write_aio, pwritev, the \
             check, pwritev_done; punch-hole and zero-range: pwritev_zero; fsync, \
             fdatasync and every close(): flush_to_os, then flush_to_disk only if something \
             was written since the last successful flush. none fires once at mount. The other \
             names are QEMU's qcow2 internals: accepted, warned about, never fired."
        )
    )?;
    let (fires, never): (Vec<Event>, Vec<Event>) =
        Event::ALL.iter().partition(|e| e.fires_in_fuse_view());
    for (label, events) in [("Fire here", fires), ("Never fire here", never)] {
        let names: Vec<&str> = events.iter().map(|e| e.name()).collect();
        writeln!(o, ".TP\n\\fI{label}\\fR\n{}", roff(&names.join(", ")))?;
    }
    writeln!(o, ".SH \"CONTROL COMMANDS\"")?;
    writeln!(
        o,
        "{}",
        roff(
            "blkdebugfs ctl MNT COMMAND, a write to MNT/.control (one command per write; a read \
             on the same open file returns the reply), or a line on the --control socket \
             (the reply is ok TEXT or error ERRNO TEXT). A command replies once it has taken \
             effect; a refused one fails with EINVAL (bad syntax or rule), ENOENT (unknown \
             event, tag or rule) or ETIMEDOUT (wait_break), and the mount goes on."
        )
    )?;
    for c in COMMANDS {
        let usage = format!("{} {}", c.name, c.args);
        writeln!(
            o,
            ".TP\n\\fB{}\\fR\n{}",
            roff(usage.trim_end()),
            roff(c.help)
        )?;
    }
    writeln!(o, ".SH \"POWER CUTS\"")?;
    for para in [
        "With --write-cache the view models a disk's volatile write cache. A write \
         (write-zeroes, torn or misdirected write: what it stored) acknowledged since the \
         last successful flush is unsynced. A flush that succeeds makes every write that had \
         completed when it started durable; a flush failed by a rule makes nothing durable. \
         Reads always see the newest data. Every fsync, fdatasync and close() of the view \
         sends a flush.",
        "A cut is a point in time: ctl power-cut, or a [power-cut] rule when its event \
         fires. It resolves every unsynced write by its mode, leaves the backing file as the \
         crash image and turns the device off: every request fails with EIO and fires no \
         event until ctl power-on; .control keeps working. A flush whose reply went out \
         before the cut made its writes durable; a flush in flight at the cut, or arriving \
         during it, fails with EIO.",
        "The modes (the draws are keyed by the seed, default the mount's --seed, and the \
         cut's number in the mount's life):",
    ] {
        writeln!(o, ".PP\n{}", roff(para))?;
    }
    for mode in CutMode::NAMES {
        let doc = CUT_MODE_DOCS
            .iter()
            .find(|(m, _)| m == mode)
            .map_or("", |(_, d)| *d);
        writeln!(o, ".TP\n\\fB{}\\fR\n{}", roff(mode), roff(doc))?;
    }
    writeln!(
        o,
        ".PP\n{}",
        roff(
            "Overlapping writes resolve only to states a disk could produce: a sector ends as \
             its durable content or as what one of its writes left. After kill -9 of the \
             daemon the image holds every acknowledged write (the keep crash image)."
        )
    )?;
    writeln!(o, ".SH TRACE")?;
    writeln!(
        o,
        "{}",
        roff(
            "--trace FILE writes JSON Lines: one object per request a rule acted on, per \
             state change, breakpoint hit, power cut, power-on and request a bad sector \
             failed; --trace-all adds one per request, with the events it fired and \
             its result. The fields:"
        )
    )?;
    for (field, doc) in trace::FIELDS {
        writeln!(o, ".TP\n\\fB{}\\fR\n{}", roff(field), roff(doc))?;
    }
    writeln!(o, ".SH EXAMPLES")?;
    writeln!(
        o,
        ".nf\n{}\n.fi",
        roff(
            "[inject-error]          # reads covering sector 2048 fail with ENOSPC
event = \"read_aio\"
sector = \"2048\"
errno = \"ENOSPC\"

[delay]                 # standing: reads of the first MiB take 5 ms, give or take 2
sectors = \"0-2047\"
iotype = \"read\"
latency = \"5ms\"
jitter = \"2ms\"

[power-cut]             # needs --write-cache: the 200th flush that reaches the disk cuts
event = \"flush_to_disk\"
skip = \"199\"
once = \"on\""
        )
        .replace("\n.", "\n\\&.")
    )?;
    writeln!(
        o,
        ".PP\n{}",
        roff("blkdebugfs check -c FILE prints the rules as understood, and its warnings.")
    )?;
    writeln!(o, ".SH \"SEE ALSO\"")?;
    writeln!(
        o,
        "\\fBblkdebugfs\\fR(1), the README's Rules, Power cuts and Control sections"
    )?;
    Ok(o)
}

/// Each renderer starts with roff's two-line `Aq` definition; the page needs it once.
fn once_preamble(text: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(text);
    let mut seen = std::collections::HashSet::new();
    let mut out = String::new();
    for line in text.lines() {
        let preamble = line.starts_with(".ie \\n(.g .ds Aq") || line.starts_with(".el .ds Aq");
        if !preamble || seen.insert(line) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.into_bytes()
}

/// A section rendered by `render`, without its `.SH` heading lines (the caller gives it
/// a heading of its own).
fn body(render: impl FnOnce(&mut Vec<u8>) -> io::Result<()>) -> io::Result<Vec<u8>> {
    let mut text = Vec::new();
    render(&mut text)?;
    let text = String::from_utf8_lossy(&text);
    let mut out = String::new();
    for line in text.lines().filter(|l| !l.starts_with(".SH")) {
        out.push_str(line);
        out.push('\n');
    }
    Ok(out.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every section, key and mode the parser takes has its text: a key added to a table of
    /// `config.rs` fails here until this module says what it means.
    #[test]
    fn every_section_key_and_mode_of_the_parser_is_documented() {
        for group in Group::ALL {
            assert!(
                SECTION_DOCS.iter().any(|(s, _)| *s == group.name()),
                "[{}] has no SECTION_DOCS entry",
                group.name()
            );
            for key in group.keys() {
                assert!(
                    key_doc(group.name(), key).is_some(),
                    "[{}] {key} has no KEY_DOCS entry",
                    group.name()
                );
            }
        }
        for mode in CutMode::NAMES {
            assert!(CUT_MODE_DOCS.iter().any(|(m, _)| m == mode), "{mode}");
        }
        for (section, key, _) in KEY_DOCS {
            let group = Group::from_name(section);
            assert!(
                *section == "*" || group.is_some_and(|g| g.keys().contains(key)),
                "KEY_DOCS documents [{section}] {key}, which the parser does not take"
            );
        }
    }

    #[test]
    fn the_rules_page_lists_every_section_key_event_command_mode_and_trace_field() {
        let page = String::from_utf8(render_rules_page().unwrap()).unwrap();
        assert!(page.starts_with(".TH blkdebugfs.ini 5 "), "{page}");
        assert!(!page.contains("(undocumented)"), "{page}");
        let has = |word: &str| page.contains(&roff(word));
        for group in Group::ALL {
            assert!(page.contains(&format!(".SS \"[{}]\"", roff(group.name()))));
            for key in group.keys() {
                assert!(has(key), "[{}] {key}", group.name());
            }
        }
        for e in Event::ALL {
            assert!(has(e.name()), "{}", e.name());
        }
        for c in COMMANDS {
            assert!(
                page.contains(&format!("\\fB{}", roff(c.name))),
                "{}",
                c.name
            );
            assert!(has(c.help), "{}", c.help);
        }
        for mode in CutMode::NAMES {
            assert!(page.contains(&format!("\\fB{mode}\\fR")), "{mode}");
        }
        for (field, _) in trace::FIELDS {
            assert!(
                page.contains(&format!("\\fB{}\\fR", roff(field))),
                "{field}"
            );
        }
        // Nothing roff would take as a request: a body line never starts with '.' or '\''
        // unless it is one of ours.
        for line in page.lines() {
            if let Some(word) = line.strip_prefix('.') {
                let request = word.split_whitespace().next().unwrap_or("");
                assert!(
                    ["TH", "SH", "SS", "PP", "TP", "br", "nf", "fi"].contains(&request),
                    "{line}"
                );
            }
            assert!(!line.starts_with('\''), "{line}");
        }
    }

    #[test]
    fn roff_escapes_hyphens_and_backslashes_and_leading_dots() {
        assert_eq!(roff("--rule a-b"), "\\-\\-rule a\\-b");
        assert_eq!(roff(".hidden"), "\\&.hidden");
        assert_eq!(roff("\\fBx\\fR"), "\\fBx\\fR");
    }

    #[test]
    fn every_subcommand_and_its_options_are_on_the_one_page() {
        let cmd = clap::Command::new("tool")
            .version("1.0")
            .about("Does things.")
            .after_help("Exit codes: 0 fine.")
            .subcommand(
                clap::Command::new("go")
                    .about("Goes somewhere.")
                    .arg(clap::Arg::new("fast").long("fast").help("Go fast.")),
            );
        let page = String::from_utf8(render(cmd).unwrap()).unwrap();
        assert!(page.contains("\n.TH tool 1"), "{page}");
        assert_eq!(
            page.matches(".ds Aq").count(),
            2,
            "the preamble once:\n{page}"
        );
        for wanted in [
            ".SS \"tool go\"",
            "Goes somewhere.",
            "fast",
            "Go fast.",
            ".SH \"EXIT STATUS\"",
            "Exit codes: 0 fine.",
        ] {
            assert!(page.contains(wanted), "{wanted} missing:\n{page}");
        }
        assert_eq!(page.matches(".SH SYNOPSIS").count(), 1, "{page}");
    }
}
