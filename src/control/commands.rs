//! The command table: every control command's name, arguments, help line and handler
//! ([`COMMANDS`]), and the handlers that change things (breakpoints, rules, state, power,
//! bad sectors, `reload`). Each handler reaches the mount only through `Mount`'s methods
//! and replies once the change has taken effect.

use std::fmt::Write as _;
use std::time::Duration;

use super::{Control, CtlError, CtlReply, help};
use crate::config::{self, Group, RuleSet, Source};
use crate::engine::faults::CutMode;
use crate::engine::ranges::SectorSet;
use crate::engine::{Action, Event, Origin, Placement, Rule, RuleId};
use crate::mount::WaiterId;

/// A command that completes before it returns: `(control, args, whole line)`.
pub(super) type NowFn = fn(&Control, &[&str], &str) -> Result<String, CtlError>;

/// A command that completes later (`wait_break`); returns its waiter while it waits.
pub(super) type LaterFn = fn(&Control, &[&str], CtlReply) -> Option<WaiterId>;

pub(super) enum Handler {
    Now(NowFn),
    Later(LaterFn),
}

/// One control command: its name, arguments, help line and handler.
pub struct CommandSpec {
    pub name: &'static str,
    pub args: &'static str,
    pub help: &'static str,
    pub(super) min_args: usize,
    pub(super) max_args: usize,
    pub(super) handler: Handler,
}

const fn cmd(
    name: &'static str,
    args: &'static str,
    (min_args, max_args): (usize, usize),
    help: &'static str,
    handler: NowFn,
) -> CommandSpec {
    CommandSpec {
        name,
        args,
        help,
        min_args,
        max_args,
        handler: Handler::Now(handler),
    }
}

/// Most words a rule command takes (`K=V` pairs may be given as separate words).
pub(super) const MAX_KEYS: usize = 64;

/// The longest label a mark may have.
pub(super) const MAX_LABEL: usize = 256;

/// Default and largest number of lines `log` returns.
pub(super) const LOG_LINES: usize = 50;

/// Every command. `help` prints this table; the parser checks arity against it.
pub const COMMANDS: &[CommandSpec] = &[
    cmd(
        "break",
        "EVENT TAG",
        (2, 2),
        "suspend the next request that fires EVENT, under TAG (one-shot, any state)",
        Control::cmd_break,
    ),
    cmd(
        "remove_break",
        "TAG",
        (1, 1),
        "delete breakpoints with TAG and resume requests suspended under it (ENOENT if no breakpoint was deleted)",
        Control::cmd_remove_break,
    ),
    cmd(
        "resume",
        "TAG",
        (1, 1),
        "resume the newest request suspended under TAG (ENOENT if none)",
        Control::cmd_resume,
    ),
    cmd(
        "resume_all",
        "",
        (0, 0),
        "resume every suspended request and end every delay now (a request whose delay is followed by a [suspend] rule then parks under its tag)",
        Control::cmd_resume_all,
    ),
    CommandSpec {
        name: "wait_break",
        args: "TAG [TIMEOUT_MS]",
        help: "return once a request is suspended under TAG (ETIMEDOUT after TIMEOUT_MS)",
        min_args: 1,
        max_args: 2,
        handler: Handler::Later(Control::cmd_wait_break),
    },
    cmd(
        "list",
        "",
        (0, 0),
        "suspended requests and pending breakpoints",
        |c, _, _| Ok(c.list()),
    ),
    cmd(
        "rules",
        "[json]",
        (0, 1),
        "the rules, numbered: hits = requests acted on, matched = requests that matched, armed = times its event armed it",
        |c, args, _| c.maybe_json(args, Control::rules, Control::rules_json),
    ),
    cmd(
        "stats",
        "[json]",
        (0, 1),
        "requests and bytes per operation, faults per action, delayed and suspended now, seed",
        |c, args, _| c.maybe_json(args, Control::stats, Control::stats_json),
    ),
    cmd(
        "status",
        "[json]",
        (0, 1),
        "state, seed, rules and suspended requests (what a fresh read of .control shows)",
        |c, args, _| c.maybe_json(args, Control::status, Control::status_json),
    ),
    cmd("state", "", (0, 0), "the current state", |c, _, _| {
        Ok(format!("state {}", c.mount.state()))
    }),
    cmd(
        "set_state",
        "N",
        (1, 1),
        "set the current state",
        Control::cmd_set_state,
    ),
    cmd(
        "inject-error",
        "K=V,... [first|before=N]",
        (1, MAX_KEYS),
        "add an inject-error rule (same keys as the config file)",
        |c, args, line| c.add_rule(Group::InjectError, args, line),
    ),
    cmd(
        "set-state",
        "K=V,... [first|before=N]",
        (1, MAX_KEYS),
        "add a set-state rule (same keys as the config file)",
        |c, args, line| c.add_rule(Group::SetState, args, line),
    ),
    cmd(
        "delay",
        "K=V,... [first|before=N]",
        (1, MAX_KEYS),
        "add a [delay] rule: latency=5ms[,jitter=1ms][,errno=ETIMEDOUT] + match keys",
        |c, args, line| c.add_rule(Group::Delay, args, line),
    ),
    cmd(
        "corrupt",
        "[K=V,...] [first|before=N]",
        (0, MAX_KEYS),
        "add a [corrupt] rule: [mode=flip|zero|random][,bits=N][,bytes=N] + match keys",
        |c, args, line| c.add_rule(Group::Corrupt, args, line),
    ),
    cmd(
        "drop-write",
        "[K=V,...] [first|before=N]",
        (0, MAX_KEYS),
        "add a [drop-write] rule: writes report success and store nothing (match keys)",
        |c, args, line| c.add_rule(Group::DropWrite, args, line),
    ),
    cmd(
        "torn-write",
        "[K=V,...] [first|before=N]",
        (0, MAX_KEYS),
        "add a [torn-write] rule: [keep=N][,mode=prefix|sectors][,unit=N][,errno=E] + match keys",
        |c, args, line| c.add_rule(Group::TornWrite, args, line),
    ),
    cmd(
        "short-io",
        "[K=V,...] [first|before=N]",
        (0, MAX_KEYS),
        "add a [short-io] rule: [length=N] + match keys",
        |c, args, line| c.add_rule(Group::ShortIo, args, line),
    ),
    cmd(
        "misdirect-write",
        "K=V,... [first|before=N]",
        (1, MAX_KEYS),
        "add a [misdirect-write] rule: shift=N (may be negative) + match keys",
        |c, args, line| c.add_rule(Group::MisdirectWrite, args, line),
    ),
    cmd(
        "suspend",
        "K=V,... [first|before=N]",
        (1, MAX_KEYS),
        "add a [suspend] rule: tag=T + match keys (parks matching requests; resume TAG)",
        |c, args, line| c.add_rule(Group::Suspend, args, line),
    ),
    cmd(
        "unsynced",
        "",
        (0, 0),
        "the writes a power cut could lose now (--write-cache): count, bytes, sectors",
        Control::cmd_unsynced,
    ),
    cmd(
        "power-cut",
        "[MODE] [seed=N] [on]",
        (0, 3),
        "cut the power (--write-cache): MODE lose (default), keep, random or sectors resolves the unsynced writes; every request then fails with EIO until power-on ('on': at once)",
        Control::cmd_power_cut,
    ),
    cmd(
        "power-on",
        "",
        (0, 0),
        "turn the device back on after a power cut, serving the image as the cut left it",
        Control::cmd_power_on,
    ),
    cmd(
        "mark",
        "LABEL",
        (1, MAX_KEYS),
        "put a mark in the recording (--record, explore): data the application has acknowledged; LABEL is the rest of the line",
        Control::cmd_mark,
    ),
    cmd(
        "record",
        "start|stop|status",
        (1, 1),
        "the recording (--record, explore): start one armed to start later (a flush: what is on the image is the base), stop it (later writes are not part of it), or show its counts",
        Control::cmd_record,
    ),
    cmd(
        "bad",
        "add|remove RANGES | list | clear",
        (1, MAX_KEYS),
        "the bad sectors: add or remove sector ranges (A-B,C), list them, or clear them all",
        Control::cmd_bad,
    ),
    cmd(
        "remove",
        "N",
        (1, 1),
        "delete rule N (numbers are never reused in a mount's life)",
        Control::cmd_remove,
    ),
    cmd(
        "clear",
        "",
        (0, 0),
        "delete every rule and breakpoint; state back to 1 (numbering goes on)",
        |c, _, _| {
            c.mount.clear_rules();
            Ok("cleared: no rules, no breakpoints, state 1".to_string())
        },
    ),
    cmd(
        "reload",
        "",
        (0, 0),
        "re-read the config file; a bad file is refused and the old rules stay",
        |c, _, _| c.reload(),
    ),
    cmd(
        "log",
        "[N]",
        (0, 1),
        "the daemon's last N log lines (default 50), also when --daemonize discards stderr",
        Control::cmd_log,
    ),
    cmd("help", "", (0, 0), "this list", |_, _, _| Ok(help())),
];

/// The refusal of a power command on a mount without `--write-cache`.
pub(super) fn no_write_cache() -> CtlError {
    CtlError::new(
        libc::EOPNOTSUPP,
        "this mount has no write cache: mount with --write-cache to use power-cut, power-on and unsynced",
    )
}

/// `text`, cut to `max` characters with `...` when longer (a million ranges make no reply).
pub(super) fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}... (cut at {max} characters)", &text[..at]),
        None => text.to_string(),
    }
}

impl Control {
    pub(super) fn cmd_break(&self, args: &[&str], _: &str) -> Result<String, CtlError> {
        let event = Event::from_name(args[0])
            .ok_or_else(|| CtlError::new(libc::ENOENT, format!("unknown event '{}'", args[0])))?;
        let id = self.mount.add_rule(Rule {
            event: Some(event),
            state: 0,
            action: Action::Suspend {
                tag: args[1].to_string(),
            },
            origin: Origin::Runtime,
        });
        Ok(format!("breakpoint {id}: {event} tag {}", args[1]))
    }

    pub(super) fn cmd_remove_break(&self, args: &[&str], _: &str) -> Result<String, CtlError> {
        match self.mount.remove_break(args[0]) {
            0 => Err(CtlError::new(
                libc::ENOENT,
                format!("no breakpoint with tag '{}'", args[0]),
            )),
            n => Ok(format!("removed {n} breakpoint(s) with tag '{}'", args[0])),
        }
    }

    pub(super) fn cmd_resume(&self, args: &[&str], _: &str) -> Result<String, CtlError> {
        if self.mount.resume(args[0]) {
            Ok(format!("resumed a request suspended under '{}'", args[0]))
        } else {
            Err(CtlError::new(
                libc::ENOENT,
                format!("no request suspended under '{}'", args[0]),
            ))
        }
    }

    pub(super) fn cmd_resume_all(&self, _: &[&str], _: &str) -> Result<String, CtlError> {
        Ok(format!("resumed {} request(s)", self.mount.resume_all()))
    }

    pub(super) fn cmd_set_state(&self, args: &[&str], _: &str) -> Result<String, CtlError> {
        let n = config::parse_number(args[0])
            .ok()
            .and_then(|n| i64::try_from(n).ok())
            .ok_or_else(|| CtlError::invalid(format!("not a state: '{}'", args[0])))?;
        self.mount.set_state(n);
        Ok(format!("state {n}"))
    }

    /// Adds a rule from its keys: one `K=V,...` word, or several words (joined by commas);
    /// `first` or `before=N` place it in the order of checks (default: last).
    pub(super) fn add_rule(
        &self,
        group: Group,
        args: &[&str],
        line: &str,
    ) -> Result<String, CtlError> {
        let text = args.join(",");
        let (rule, placement) = config::parse_rule_command(
            group,
            &text,
            Source::Command(line.trim().to_string()),
            Origin::Runtime,
        )
        .map_err(|e| CtlError::invalid(e.to_string()))?;
        let shown = rule.to_string();
        let past_end = config::past_the_end(&rule, self.mount.size());
        let id = self.mount.add_rule_placed(rule, placement).map_err(|n| {
            CtlError::new(
                libc::ENOENT,
                format!("no rule {n} to place the rule before"),
            )
        })?;
        let place = match placement {
            Placement::Last => String::new(),
            Placement::First => " (checked first)".to_string(),
            Placement::Before(n) => format!(" (checked before rule {n})"),
        };
        let mut reply = format!("added rule {id}{place}: {shown}");
        if let Some(why) = past_end {
            let _ = write!(reply, "\nwarning: {why}");
        }
        Ok(reply)
    }

    pub(super) fn cmd_unsynced(&self, _: &[&str], _: &str) -> Result<String, CtlError> {
        let u = self.mount.unsynced().ok_or_else(no_write_cache)?;
        if u.writes == 0 {
            return Ok("nothing unsynced".to_string());
        }
        Ok(format!(
            "{} unsynced write(s), {} bytes, in sectors {}",
            u.writes,
            u.bytes,
            shorten(&u.sectors.to_string(), 4000)
        ))
    }

    pub(super) fn cmd_power_cut(&self, args: &[&str], _: &str) -> Result<String, CtlError> {
        let (mut mode, mut seed, mut on) = (CutMode::Lose, None, false);
        for arg in args {
            if let Some(n) = arg.strip_prefix("seed=") {
                seed = Some(
                    config::parse_number(n)
                        .map_err(|_| CtlError::invalid(format!("not a seed: '{n}'")))?,
                );
            } else if *arg == "on" {
                on = true;
            } else if let Some((key, _)) = arg.split_once('=') {
                // `event=`, `skip=`, ...: the user wants a rule, which this command is not.
                return Err(CtlError::invalid(format!(
                    "power-cut cuts now and takes [MODE] [seed=N] [on], not '{key}=': a cut at \
                     an event is a rule, and rules go in a [power-cut] section (the config \
                     file, or --rule power-cut:event=flush_to_disk,skip=N at mount)"
                )));
            } else {
                mode = CutMode::from_name(arg).ok_or_else(|| {
                    CtlError::invalid(format!(
                        "unknown mode '{arg}' (one of: {})",
                        CutMode::NAMES.join(", ")
                    ))
                })?;
            }
        }
        if !self.mount.has_write_cache() {
            return Err(no_write_cache());
        }
        let report = self
            .mount
            .power_cut(mode, seed, None)
            .map_err(|e| CtlError::new(libc::EIO, e))?;
        let mut text = report.summary(50);
        if on {
            let _ = self.mount.power_on();
            text.push_str("; power is on again");
        } else {
            text.push_str("; the device is off until power-on");
        }
        Ok(text)
    }

    pub(super) fn cmd_power_on(&self, _: &[&str], _: &str) -> Result<String, CtlError> {
        match self.mount.power_on() {
            Ok(true) => Ok("power on".to_string()),
            Ok(false) => Ok("power was already on".to_string()),
            Err(_) => Err(no_write_cache()),
        }
    }

    pub(super) fn cmd_mark(&self, _: &[&str], line: &str) -> Result<String, CtlError> {
        let label = line.trim().strip_prefix("mark").unwrap_or_default().trim();
        if label.is_empty() {
            return Err(CtlError::invalid("usage: mark LABEL (a label is needed)"));
        }
        if label.len() > MAX_LABEL {
            return Err(CtlError::invalid(format!(
                "a mark's label is at most {MAX_LABEL} bytes (got {})",
                label.len()
            )));
        }
        self.mount
            .mark(label)
            .map(|()| format!("marked {label}"))
            .map_err(CtlError::invalid)
    }

    pub(super) fn cmd_record(&self, args: &[&str], _: &str) -> Result<String, CtlError> {
        match args[0] {
            "stop" => match self.mount.record_stop() {
                Ok(true) => Ok("recording stopped".to_string()),
                Ok(false) => Ok("the recording had stopped already".to_string()),
                Err(e) => Err(CtlError::invalid(e)),
            },
            "start" => self
                .mount
                .record_start()
                .map(|()| "recording started".to_string())
                .map_err(CtlError::invalid),
            "status" => self
                .mount
                .record_status()
                .ok_or_else(|| CtlError::invalid("not recording (mount with --record DIR)")),
            other => Err(CtlError::invalid(format!(
                "usage: record start|stop|status (got '{other}')"
            ))),
        }
    }

    pub(super) fn cmd_bad(&self, args: &[&str], _: &str) -> Result<String, CtlError> {
        let ranges = || {
            let text = args[1..].join(",");
            SectorSet::parse(&text).map_err(|e| CtlError::invalid(format!("bad {}: {e}", args[0])))
        };
        match args[0] {
            "add" => {
                let set = ranges()?;
                self.mount.bad_add(&set);
                Ok(format!("added {} bad sector(s): {set}", set.sectors()))
            }
            "remove" => {
                let set = ranges()?;
                self.mount.bad_remove(&set);
                Ok(format!("removed bad sectors {set}"))
            }
            "list" | "clear" if args.len() > 1 => Err(CtlError::invalid(format!(
                "usage: bad {} (no ranges)",
                args[0]
            ))),
            "list" => {
                let (set, settings) = self.mount.bad_list();
                if set.is_empty() {
                    return Ok("no bad sectors".to_string());
                }
                Ok(format!(
                    "{} bad sector(s) in {} range(s): {} (errno {}, heal-on-write {}, write-errno {})",
                    set.sectors(),
                    set.intervals(),
                    shorten(&set.to_string(), 4000),
                    crate::engine::errno::describe(settings.errno),
                    if settings.heal_on_write { "on" } else { "off" },
                    crate::engine::errno::describe(settings.write_errno),
                ))
            }
            "clear" => {
                self.mount.bad_clear();
                Ok("no bad sectors".to_string())
            }
            other => Err(CtlError::invalid(format!(
                "unknown 'bad {other}' (add, remove, list or clear)"
            ))),
        }
    }

    pub(super) fn cmd_remove(&self, args: &[&str], _: &str) -> Result<String, CtlError> {
        let n: u32 = args[0]
            .parse()
            .map_err(|_| CtlError::invalid(format!("not a rule number: '{}'", args[0])))?;
        match self.mount.remove_rule(RuleId(n)) {
            Some(rule) => Ok(format!("removed rule {n}: {rule}")),
            None => Err(CtlError::new(libc::ENOENT, format!("no rule {n}"))),
        }
    }

    pub(super) fn cmd_log(&self, args: &[&str], _: &str) -> Result<String, CtlError> {
        let n = match args.first() {
            None => LOG_LINES,
            Some(t) => t
                .parse::<usize>()
                .map_err(|_| CtlError::invalid(format!("not a number of lines: '{t}'")))?,
        };
        let lines = crate::control::logring::recent(n).ok_or_else(|| {
            CtlError::new(
                libc::ENODATA,
                "this process keeps no log in memory (only the blkdebugfs command does)",
            )
        })?;
        if lines.is_empty() {
            return Ok("no log lines yet".to_string());
        }
        Ok(lines.join("\n"))
    }

    pub(super) fn cmd_wait_break(&self, args: &[&str], reply: CtlReply) -> Option<WaiterId> {
        let timeout = match args.get(1) {
            None => None,
            Some(ms) => match ms.parse::<u64>() {
                Ok(ms) => Some(Duration::from_millis(ms)),
                Err(_) => {
                    reply(Err(CtlError::invalid(format!(
                        "not a timeout in milliseconds: '{ms}'"
                    ))));
                    return None;
                }
            },
        };
        let tag = args[0].to_string();
        self.mount.wait_for_break(
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
        )
    }

    /// `reload`: re-reads the config and the command-line rules; all or nothing.
    pub fn reload(&self) -> Result<String, CtlError> {
        let set = RuleSet::load(self.reload.config.as_deref(), &self.reload.cli)
            .map_err(|e| CtlError::invalid(e.to_string()))?;
        set.check_write_cache(self.mount.has_write_cache())
            .map_err(|e| CtlError::invalid(e.to_string()))?;
        let n = set.rules.len();
        self.mount.replace_rules(set.rules);
        Ok(format!("reloaded {n} rule(s)"))
    }
}
