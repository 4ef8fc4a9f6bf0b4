//! The man page, generated from the clap definitions of `main.rs` (`blkdebugfs manpage`).
//!
//! One page for the whole command, so that `man ./blkdebugfs.1` shows every subcommand's
//! options: clap_mangen renders the top-level sections, then each subcommand gets a section
//! of its own (its synopsis, description and options, from clap_mangen's renderers with
//! their headings demoted). The committed `blkdebugfs.1` is this output; a test compares
//! them, so a flag changed without regenerating fails (`cargo run -q -- manpage >
//! blkdebugfs.1` regenerates it).

use std::io::{self, Write};

use clap_mangen::Man;

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
    Ok(once_preamble(&out))
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
