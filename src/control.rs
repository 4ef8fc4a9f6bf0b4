//! Run-time control: breakpoints (QEMU's qemu-io vocabulary) and rule changes, from the
//! control file `MOUNTPOINT/.control`, the UNIX socket of `--control`, `blkdebugfs ctl` and
//! signals. One table ([`COMMANDS`]) drives parsing and `help`.
//!
//! Contract: a command replies only once it has taken effect, with `Ok(text)` or an errno
//! and a reason ([`CtlError`]): EINVAL for bad syntax or a bad rule (nothing changes),
//! ENOENT for an unknown event or tag, ETIMEDOUT for a `wait_break` that timed out. Control
//! commands never fire events or match rules. Replies are completions, not return values, so
//! `wait_break` parks its caller instead of blocking a thread.

use std::fmt::Write as _;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::breakpoints::op_range;
use crate::config::{self, Group, RuleSet, Source};
use crate::mount::Mount;
use crate::rules::{Action, Event, Origin, Rule, RuleId};

/// One control command: its name, arguments and help line.
pub struct CommandSpec {
    pub name: &'static str,
    pub args: &'static str,
    pub help: &'static str,
    min_args: usize,
    max_args: usize,
}

const fn cmd(
    name: &'static str,
    args: &'static str,
    min_args: usize,
    max_args: usize,
    help: &'static str,
) -> CommandSpec {
    CommandSpec {
        name,
        args,
        help,
        min_args,
        max_args,
    }
}

/// Every command. `help` prints this table; the parser checks arity against it.
pub const COMMANDS: &[CommandSpec] = &[
    cmd(
        "break",
        "EVENT TAG",
        2,
        2,
        "suspend the next request that fires EVENT, under TAG (one-shot, any state)",
    ),
    cmd(
        "remove_break",
        "TAG",
        1,
        1,
        "delete breakpoints with TAG and resume requests suspended under it (ENOENT if no breakpoint was deleted)",
    ),
    cmd(
        "resume",
        "TAG",
        1,
        1,
        "resume the newest request suspended under TAG (ENOENT if none)",
    ),
    cmd("resume_all", "", 0, 0, "resume every suspended request"),
    cmd(
        "wait_break",
        "TAG [TIMEOUT_MS]",
        1,
        2,
        "return once a request is suspended under TAG (ETIMEDOUT after TIMEOUT_MS)",
    ),
    cmd(
        "list",
        "",
        0,
        0,
        "suspended requests and pending breakpoints",
    ),
    cmd("rules", "", 0, 0, "the rules, numbered, with hit counts"),
    cmd("state", "", 0, 0, "the current state"),
    cmd("set_state", "N", 1, 1, "set the current state"),
    cmd(
        "inject-error",
        "K=V,...",
        1,
        1,
        "add an inject-error rule (same keys as the config file)",
    ),
    cmd(
        "set-state",
        "K=V,...",
        1,
        1,
        "add a set-state rule (same keys as the config file)",
    ),
    cmd("remove", "N", 1, 1, "delete rule N"),
    cmd(
        "clear",
        "",
        0,
        0,
        "delete every rule and breakpoint; state back to 1",
    ),
    cmd(
        "reload",
        "",
        0,
        0,
        "re-read the config file; a bad file is refused and the old rules stay",
    ),
    cmd("help", "", 0, 0, "this list"),
];

/// A refused or failed command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CtlError {
    pub errno: i32,
    pub message: String,
}

impl CtlError {
    fn new(errno: i32, message: impl Into<String>) -> CtlError {
        CtlError {
            errno,
            message: message.into(),
        }
    }
}

/// Receives a command's outcome, exactly once.
pub type CtlReply = Box<dyn FnOnce(Result<String, CtlError>) + Send>;

/// Where `reload` reads the rules from: the config file and the command-line rules.
#[derive(Clone, Debug, Default)]
pub struct ReloadSource {
    pub config: Option<PathBuf>,
    pub cli: Vec<(Group, String)>,
}

/// The control endpoint of one mount.
pub struct Control {
    mount: Arc<Mount>,
    reload: ReloadSource,
}

impl Control {
    pub fn new(mount: Arc<Mount>, reload: ReloadSource) -> Control {
        Control { mount, reload }
    }

    pub fn mount(&self) -> &Arc<Mount> {
        &self.mount
    }

    /// Runs one command line; `reply` is called once it has taken effect (later, for
    /// `wait_break`).
    pub fn run(&self, line: &str, reply: CtlReply) {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some((&name, args)) = words.split_first() else {
            return reply(Err(CtlError::new(
                libc::EINVAL,
                "empty command (try 'help')",
            )));
        };
        let Some(spec) = COMMANDS.iter().find(|c| c.name == name) else {
            return reply(Err(CtlError::new(
                libc::EINVAL,
                format!("unknown command '{name}' (try 'help')"),
            )));
        };
        if args.len() < spec.min_args || args.len() > spec.max_args {
            return reply(Err(CtlError::new(
                libc::EINVAL,
                format!("usage: {} {}", spec.name, spec.args),
            )));
        }
        if name == "wait_break" {
            return self.wait_break(args, reply);
        }
        reply(self.run_now(name, args, line));
    }

    /// Every command but `wait_break`: they complete before returning.
    fn run_now(&self, name: &str, args: &[&str], line: &str) -> Result<String, CtlError> {
        let mount = &self.mount;
        match name {
            "break" => {
                let event = Event::from_name(args[0]).ok_or_else(|| {
                    CtlError::new(libc::ENOENT, format!("unknown event '{}'", args[0]))
                })?;
                let id = mount.with_engine(|e| {
                    e.add(Rule {
                        event,
                        state: 0,
                        action: Action::Suspend {
                            tag: args[1].to_string(),
                        },
                        origin: Origin::Runtime,
                    })
                });
                Ok(format!("breakpoint {id}: {event} tag {}", args[1]))
            }
            "remove_break" => {
                let deleted = mount.remove_break(args[0]);
                if deleted == 0 {
                    Err(CtlError::new(
                        libc::ENOENT,
                        format!("no breakpoint with tag '{}'", args[0]),
                    ))
                } else {
                    Ok(format!(
                        "removed {deleted} breakpoint(s) with tag '{}'",
                        args[0]
                    ))
                }
            }
            "resume" => {
                if mount.resume(args[0]) {
                    Ok(format!("resumed a request suspended under '{}'", args[0]))
                } else {
                    Err(CtlError::new(
                        libc::ENOENT,
                        format!("no request suspended under '{}'", args[0]),
                    ))
                }
            }
            "resume_all" => Ok(format!("resumed {} request(s)", mount.resume_all())),
            "list" => Ok(self.list()),
            "rules" => Ok(self.rules()),
            "state" => Ok(format!("state {}", mount.with_engine(|e| e.state()))),
            "set_state" => {
                let n = config::parse_number(args[0])
                    .ok()
                    .and_then(|n| i64::try_from(n).ok())
                    .ok_or_else(|| {
                        CtlError::new(libc::EINVAL, format!("not a state: '{}'", args[0]))
                    })?;
                mount.with_engine(|e| e.set_state(n));
                Ok(format!("state {n}"))
            }
            "inject-error" | "set-state" => {
                let group = if name == "inject-error" {
                    Group::InjectError
                } else {
                    Group::SetState
                };
                let rule = config::parse_rule_option(
                    group,
                    args[0],
                    Source::Command(line.trim().to_string()),
                    Origin::Runtime,
                )
                .map_err(|e| CtlError::new(libc::EINVAL, e.to_string()))?;
                let text = rule.to_string();
                let id = mount.with_engine(|e| e.add(rule));
                Ok(format!("added rule {id}: {text}"))
            }
            "remove" => {
                let n: u32 = args[0].parse().map_err(|_| {
                    CtlError::new(libc::EINVAL, format!("not a rule number: '{}'", args[0]))
                })?;
                match mount.with_engine(|e| e.remove(RuleId(n))) {
                    Some(rule) => Ok(format!("removed rule {n}: {rule}")),
                    None => Err(CtlError::new(libc::ENOENT, format!("no rule {n}"))),
                }
            }
            "clear" => {
                mount.with_engine(|e| e.clear());
                Ok("cleared: no rules, no breakpoints, state 1".to_string())
            }
            "reload" => self.reload(),
            "help" => Ok(help()),
            _ => Err(CtlError::new(
                libc::EINVAL,
                format!("unknown command '{name}'"),
            )),
        }
    }

    fn wait_break(&self, args: &[&str], reply: CtlReply) {
        let timeout = match args.get(1) {
            None => None,
            Some(ms) => match ms.parse::<u64>() {
                Ok(ms) => Some(Duration::from_millis(ms)),
                Err(_) => {
                    return reply(Err(CtlError::new(
                        libc::EINVAL,
                        format!("not a timeout in milliseconds: '{ms}'"),
                    )));
                }
            },
        };
        let tag = args[0].to_string();
        self.mount.breakpoints.wait_for(
            args[0],
            timeout,
            Box::new(move |r| {
                reply(match r {
                    Ok(()) => Ok(format!("a request is suspended under '{tag}'")),
                    Err(libc::ETIMEDOUT) => Err(CtlError::new(
                        libc::ETIMEDOUT,
                        format!("no request was suspended under '{tag}' in time"),
                    )),
                    Err(e) => Err(CtlError::new(e, "the mount is shutting down")),
                })
            }),
        );
    }

    /// `reload`: re-reads the config and the command-line rules; all or nothing.
    pub fn reload(&self) -> Result<String, CtlError> {
        let set = RuleSet::load(self.reload.config.as_deref(), &self.reload.cli)
            .map_err(|e| CtlError::new(libc::EINVAL, e.to_string()))?;
        let n = set.rules.len();
        self.mount.with_engine(|e| e.replace_rules(set.rules));
        Ok(format!("reloaded {n} rule(s)"))
    }

    fn list(&self) -> String {
        let mut out = String::new();
        let parked = self.mount.breakpoints.list();
        if parked.is_empty() {
            out.push_str("no suspended requests\n");
        }
        for p in parked {
            let _ = writeln!(
                out,
                "suspended {}: tag {} event {} {} at {} for {:.3}s",
                p.id,
                p.tags.join(","),
                p.event,
                p.op.name(),
                op_range(&p.op),
                p.suspended_for.as_secs_f64()
            );
        }
        self.mount.with_engine(|e| {
            for (id, rule, _) in e.rules() {
                if let Action::Suspend { tag } = &rule.action {
                    let _ = writeln!(out, "breakpoint {id}: {} tag {tag}", rule.event);
                }
            }
        });
        out.trim_end().to_string()
    }

    fn rules(&self) -> String {
        let mut out = String::new();
        self.mount.with_engine(|e| {
            for (id, rule, hits) in e.rules() {
                let armed = if e.is_armed(id) { " armed" } else { "" };
                let _ = writeln!(out, "rule {id}: {rule} hits={hits}{armed}");
            }
        });
        if out.is_empty() {
            out.push_str("no rules");
        }
        out.trim_end().to_string()
    }

    /// What a fresh read of the control file shows.
    pub fn status(&self) -> String {
        format!(
            "state {}\n{}\n{}\n",
            self.mount.with_engine(|e| e.state()),
            self.rules(),
            self.list()
        )
    }

    /// Serves line-oriented clients (the `--control` socket): one command per line in, one
    /// line out (`ok TEXT` or `error ERRNO_NAME TEXT`, newlines in TEXT escaped as `\n`).
    pub fn serve_stream<R: BufRead, W: Write>(
        &self,
        input: R,
        mut output: W,
    ) -> std::io::Result<()> {
        for line in input.lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let (tx, rx) = std::sync::mpsc::channel();
            self.run(
                &line,
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            );
            // Not a FUSE worker: this connection's thread may wait (for `wait_break`).
            let result = rx
                .recv()
                .unwrap_or_else(|_| Err(CtlError::new(libc::ECANCELED, "the command was dropped")));
            writeln!(output, "{}", encode_reply(&result))?;
            output.flush()?;
        }
        Ok(())
    }
}

/// The `help` text, from [`COMMANDS`].
pub fn help() -> String {
    let mut out = String::new();
    for c in COMMANDS {
        let usage = format!("{} {}", c.name, c.args);
        let _ = writeln!(out, "{:<32} {}", usage.trim_end(), c.help);
    }
    out.trim_end().to_string()
}

/// One socket reply line.
pub fn encode_reply(result: &Result<String, CtlError>) -> String {
    let escape = |t: &str| t.replace('\\', "\\\\").replace('\n', "\\n");
    match result {
        Ok(text) => format!("ok {}", escape(text)),
        Err(e) => format!(
            "error {} {}",
            crate::errno::name(e.errno).unwrap_or("EIO"),
            escape(&e.message)
        ),
    }
}

/// Parses a socket reply line back into a result.
pub fn decode_reply(line: &str) -> Result<String, CtlError> {
    let unescape = |t: &str| {
        let mut out = String::new();
        let mut chars = t.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                match chars.next() {
                    Some('n') => out.push('\n'),
                    Some(o) => out.push(o),
                    None => {}
                }
            } else {
                out.push(c);
            }
        }
        out
    };
    let line = line.trim_end_matches('\n');
    if let Some(text) = line.strip_prefix("ok") {
        return Ok(unescape(text.trim_start()));
    }
    let rest = line.strip_prefix("error ").unwrap_or(line);
    let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
    Err(CtlError::new(
        crate::errno::from_name(name).unwrap_or(libc::EIO),
        unescape(text),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;
    use crate::mount::ImageMode;
    use crate::rules::Engine;
    use std::io::Cursor;

    fn control() -> (tempfile::NamedTempFile, Control) {
        let img = tempfile::NamedTempFile::new().unwrap();
        img.as_file().set_len(1 << 20).unwrap();
        let file = img.reopen().unwrap();
        let mount = Mount::new(
            Engine::default(),
            file,
            img.path().to_path_buf(),
            Limits::default(),
            ImageMode::default(),
        )
        .unwrap();
        (img, Control::new(Arc::new(mount), ReloadSource::default()))
    }

    fn session(c: &Control, input: &str) -> Vec<String> {
        let mut out = Vec::new();
        c.serve_stream(Cursor::new(input.as_bytes()), &mut out)
            .unwrap();
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    #[test]
    fn commands_over_a_stream() {
        let (_img, c) = control();
        let out = session(
            &c,
            "state\nbreak write_aio a\nbreak bogus b\nlist\nresume a\nremove_break a\n\
             remove_break a\nset_state 7\nstate\nfrobnicate\nresume\n",
        );
        assert_eq!(
            out,
            vec![
                "ok state 1",
                "ok breakpoint 1: write_aio tag a",
                "error ENOENT unknown event 'bogus'",
                "ok no suspended requests\\nbreakpoint 1: write_aio tag a",
                "error ENOENT no request suspended under 'a'",
                "ok removed 1 breakpoint(s) with tag 'a'",
                "error ENOENT no breakpoint with tag 'a'",
                "ok state 7",
                "ok state 7",
                "error EINVAL unknown command 'frobnicate' (try 'help')",
                "error EINVAL usage: resume TAG",
            ]
        );
    }

    #[test]
    fn rules_can_be_added_listed_removed_and_cleared() {
        let (_img, c) = control();
        let out = session(
            &c,
            "inject-error event=read_aio,errno=ENOSPC,sector=8\n\
             inject-error event=read_aio,errno=600\nrules\nremove 1\nremove 1\nclear\nrules\n",
        );
        assert_eq!(
            out[0],
            "ok added rule 1: event=read_aio state=any inject-error errno=ENOSPC (28) range=sector 8 (byte 4096) iotype=default once=off"
        );
        assert!(out[1].starts_with("error EINVAL command 'inject-error event=read_aio,errno=600': [inject-error] errno = \"600\""), "{}", out[1]);
        assert_eq!(
            out[2],
            "ok rule 1: event=read_aio state=any inject-error errno=ENOSPC (28) range=sector 8 (byte 4096) iotype=default once=off hits=0"
        );
        assert!(out[3].starts_with("ok removed rule 1"));
        assert_eq!(out[4], "error ENOENT no rule 1");
        assert_eq!(out[5], "ok cleared: no rules, no breakpoints, state 1");
        assert_eq!(out[6], "ok no rules");
    }

    #[test]
    fn wait_break_times_out_with_etimedout() {
        let (_img, c) = control();
        let (tx, rx) = std::sync::mpsc::channel();
        c.run(
            "wait_break t 10",
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        // Nothing drives the deadline but the mount's timer; do its job here.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            c.mount.breakpoints.expire_waiters();
            if let Ok(r) = rx.try_recv() {
                assert_eq!(r.unwrap_err().errno, libc::ETIMEDOUT);
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no timeout");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn help_lists_every_command_and_replies_round_trip() {
        let h = help();
        for c in COMMANDS {
            assert!(h.contains(c.name), "{}", c.name);
        }
        let r: Result<String, CtlError> = Ok("a\nb\\c".into());
        assert_eq!(decode_reply(&encode_reply(&r)), r);
        let e: Result<String, CtlError> = Err(CtlError::new(libc::ENOENT, "x\ny"));
        assert_eq!(decode_reply(&encode_reply(&e)), e);
    }
}
