//! Run-time control: breakpoints (QEMU's qemu-io vocabulary) and rule changes, from the
//! control file `MOUNTPOINT/.control`, the UNIX socket of `--control`, `blkdebugfs ctl` and
//! signals. One table ([`COMMANDS`]) holds each command's name, arguments, help line and
//! handler; parsing, dispatch and `help` all read it.
//!
//! Contract: a command replies only once it has taken effect, with `Ok(text)` or an errno
//! and a reason ([`CtlError`]): EINVAL for bad syntax or a bad rule (nothing changes),
//! ENOENT for an unknown event or tag, ETIMEDOUT for a `wait_break` that timed out. Control
//! commands never fire events or match rules. Replies are completions, not return values, so
//! `wait_break` parks its caller instead of blocking a thread. Handlers reach the mount only
//! through [`Mount`]'s methods.

pub mod logring;
pub mod socket;

use std::fmt::Write as _;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::config::{self, CliRule, Group, RuleSet, Source};
use crate::engine::faults::CutMode;
use crate::engine::ranges::SectorSet;
use crate::engine::{Action, Event, Origin, Placement, Rule, RuleId};
use crate::mount::op_range;
use crate::mount::{Mount, WaiterId};

/// A command that completes before it returns: `(control, args, whole line)`.
type NowFn = fn(&Control, &[&str], &str) -> Result<String, CtlError>;
/// A command that completes later (`wait_break`); returns its waiter while it waits.
type LaterFn = fn(&Control, &[&str], CtlReply) -> Option<WaiterId>;

enum Handler {
    Now(NowFn),
    Later(LaterFn),
}

/// One control command: its name, arguments, help line and handler.
pub struct CommandSpec {
    pub name: &'static str,
    pub args: &'static str,
    pub help: &'static str,
    min_args: usize,
    max_args: usize,
    handler: Handler,
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
const MAX_KEYS: usize = 64;

/// The control file's name in the mount's directory (`MOUNTPOINT/.control`).
pub const CONTROL_NAME: &str = ".control";

/// Longest command line accepted (a rule is a few hundred bytes).
pub const MAX_LINE: usize = 64 << 10;
/// Default and largest number of lines `log` returns.
const LOG_LINES: usize = 50;

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

    fn invalid(message: impl Into<String>) -> CtlError {
        CtlError::new(libc::EINVAL, message)
    }
}

/// The refusal of a power command on a mount without `--write-cache`.
fn no_write_cache() -> CtlError {
    CtlError::new(
        libc::EOPNOTSUPP,
        "this mount has no write cache: mount with --write-cache to use power-cut, power-on and unsynced",
    )
}

/// `text`, cut to `max` characters with `...` when longer (a million ranges make no reply).
fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}... (cut at {max} characters)", &text[..at]),
        None => text.to_string(),
    }
}

/// Receives a command's outcome, exactly once.
pub type CtlReply = Box<dyn FnOnce(Result<String, CtlError>) + Send>;

/// Where `reload` reads the rules from: the config file and the command-line rules.
#[derive(Clone, Debug, Default)]
pub struct ReloadSource {
    pub config: Option<PathBuf>,
    pub cli: Vec<CliRule>,
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

    /// Runs one command given as raw bytes (a write to `.control`): text that is not UTF-8
    /// or longer than [`MAX_LINE`] is refused with EINVAL.
    pub fn run_bytes(&self, data: &[u8], reply: CtlReply) -> Option<WaiterId> {
        if data.len() > MAX_LINE {
            reply(Err(line_too_long()));
            return None;
        }
        match std::str::from_utf8(data) {
            Ok(line) => self.run(line.trim(), reply),
            Err(_) => {
                reply(Err(not_text()));
                None
            }
        }
    }

    /// Runs one command line; `reply` is called once it has taken effect (later, for
    /// `wait_break`, which returns its waiter so that a client that goes away can cancel
    /// it with [`Control::cancel`]).
    pub fn run(&self, line: &str, reply: CtlReply) -> Option<WaiterId> {
        match Control::parse(line) {
            Err(e) => {
                reply(Err(e));
                None
            }
            Ok((spec, args)) => match spec.handler {
                Handler::Now(f) => {
                    reply(f(self, &args, line));
                    None
                }
                Handler::Later(f) => f(self, &args, reply),
            },
        }
    }

    /// Forgets a `wait_break` whose client went away.
    pub fn cancel(&self, waiter: WaiterId) {
        self.mount.cancel_wait(waiter);
    }

    /// Splits a line into its command (from [`COMMANDS`]) and arguments, checking arity.
    fn parse(line: &str) -> Result<(&'static CommandSpec, Vec<&str>), CtlError> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some((&name, args)) = words.split_first() else {
            return Err(CtlError::invalid("empty command (try 'help')"));
        };
        let spec = COMMANDS
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| CtlError::invalid(format!("unknown command '{name}' (try 'help')")))?;
        if args.len() < spec.min_args || args.len() > spec.max_args {
            return Err(CtlError::invalid(format!(
                "usage: {} {}",
                spec.name, spec.args
            )));
        }
        Ok((spec, args.to_vec()))
    }

    fn cmd_break(&self, args: &[&str], _: &str) -> Result<String, CtlError> {
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

    fn cmd_remove_break(&self, args: &[&str], _: &str) -> Result<String, CtlError> {
        match self.mount.remove_break(args[0]) {
            0 => Err(CtlError::new(
                libc::ENOENT,
                format!("no breakpoint with tag '{}'", args[0]),
            )),
            n => Ok(format!("removed {n} breakpoint(s) with tag '{}'", args[0])),
        }
    }

    fn cmd_resume(&self, args: &[&str], _: &str) -> Result<String, CtlError> {
        if self.mount.resume(args[0]) {
            Ok(format!("resumed a request suspended under '{}'", args[0]))
        } else {
            Err(CtlError::new(
                libc::ENOENT,
                format!("no request suspended under '{}'", args[0]),
            ))
        }
    }

    fn cmd_resume_all(&self, _: &[&str], _: &str) -> Result<String, CtlError> {
        Ok(format!("resumed {} request(s)", self.mount.resume_all()))
    }

    fn cmd_set_state(&self, args: &[&str], _: &str) -> Result<String, CtlError> {
        let n = config::parse_number(args[0])
            .ok()
            .and_then(|n| i64::try_from(n).ok())
            .ok_or_else(|| CtlError::invalid(format!("not a state: '{}'", args[0])))?;
        self.mount.set_state(n);
        Ok(format!("state {n}"))
    }

    /// Adds a rule from its keys: one `K=V,...` word, or several words (joined by commas);
    /// `first` or `before=N` place it in the order of checks (default: last).
    fn add_rule(&self, group: Group, args: &[&str], line: &str) -> Result<String, CtlError> {
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

    fn cmd_unsynced(&self, _: &[&str], _: &str) -> Result<String, CtlError> {
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

    fn cmd_power_cut(&self, args: &[&str], _: &str) -> Result<String, CtlError> {
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

    fn cmd_power_on(&self, _: &[&str], _: &str) -> Result<String, CtlError> {
        match self.mount.power_on() {
            Ok(true) => Ok("power on".to_string()),
            Ok(false) => Ok("power was already on".to_string()),
            Err(_) => Err(no_write_cache()),
        }
    }

    fn cmd_bad(&self, args: &[&str], _: &str) -> Result<String, CtlError> {
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

    fn cmd_remove(&self, args: &[&str], _: &str) -> Result<String, CtlError> {
        let n: u32 = args[0]
            .parse()
            .map_err(|_| CtlError::invalid(format!("not a rule number: '{}'", args[0])))?;
        match self.mount.remove_rule(RuleId(n)) {
            Some(rule) => Ok(format!("removed rule {n}: {rule}")),
            None => Err(CtlError::new(libc::ENOENT, format!("no rule {n}"))),
        }
    }

    fn cmd_log(&self, args: &[&str], _: &str) -> Result<String, CtlError> {
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

    fn cmd_wait_break(&self, args: &[&str], reply: CtlReply) -> Option<WaiterId> {
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

    fn list(&self) -> String {
        let mut out = String::new();
        let parked = self.mount.parked();
        if parked.is_empty() {
            out.push_str("no suspended requests\n");
        }
        for p in parked {
            let _ = writeln!(
                out,
                "suspended {}: tag {} {} {} at {} for {:.3}s",
                p.id,
                p.tags.join(","),
                p.cause,
                p.op.name(),
                op_range(&p.op),
                p.suspended_for.as_secs_f64()
            );
        }
        for r in self.mount.rules() {
            if let Action::Suspend { tag } = &r.rule.action {
                let event = r.rule.event.map_or("-", |e| e.name());
                let _ = writeln!(out, "breakpoint {}: {event} tag {tag}", r.id);
            }
        }
        let (delayed, _) = self.mount.parked_counts();
        if delayed > 0 {
            let _ = writeln!(out, "{delayed} delayed request(s)");
        }
        let waiters = self.mount.waiters();
        if waiters > 0 {
            let _ = writeln!(out, "{waiters} wait_break waiter(s)");
        }
        out.trim_end().to_string()
    }

    fn rules(&self) -> String {
        let mut out = String::new();
        for r in self.mount.rules() {
            let _ = write!(out, "rule {}: {} hits={}", r.id, r.rule, r.stats.hits);
            if let Action::Request { matches, .. } = &r.rule.action {
                let counted = matches.counting != Default::default();
                if counted {
                    let _ = write!(out, " matched={}", r.stats.matched);
                }
                if r.rule.event.is_some() {
                    let _ = write!(out, " armed={}", r.stats.armed);
                    if r.armed_now {
                        out.push_str(" (armed now)");
                    }
                }
            }
            out.push('\n');
        }
        if out.is_empty() {
            out.push_str("no rules");
        }
        out.trim_end().to_string()
    }

    /// What a fresh read of the control file shows.
    pub fn status(&self) -> String {
        let log = if crate::control::logring::recent(0).is_some() {
            "log: 'log [N]' shows the last lines\n"
        } else {
            ""
        };
        format!(
            "state {}\n{}\n{}\nseed {}\n{log}",
            self.mount.state(),
            self.rules(),
            self.list(),
            self.mount.seed()
        )
    }

    /// `CMD` or `CMD json`: the text form or the JSON form (one line).
    fn maybe_json(
        &self,
        args: &[&str],
        text: fn(&Control) -> String,
        json: fn(&Control) -> Value,
    ) -> Result<String, CtlError> {
        match args.first() {
            None => Ok(text(self)),
            Some(&"json") => Ok(json(self).to_string()),
            Some(other) => Err(CtlError::invalid(format!(
                "unknown form '{other}' (the only one is 'json')"
            ))),
        }
    }

    fn rules_json(&self) -> Value {
        let rules: Vec<Value> = self
            .mount
            .rules()
            .into_iter()
            .map(|r| {
                json!({
                    "id": r.id.0,
                    "section": r.rule.section(),
                    "event": r.rule.event.map(|e| e.name()),
                    "state": r.rule.state,
                    "rule": r.rule.to_string(),
                    "origin": r.rule.origin.to_string(),
                    "hits": r.stats.hits,
                    "matched": r.stats.matched,
                    "armed": r.stats.armed,
                    "armed_now": r.armed_now,
                })
            })
            .collect();
        Value::Array(rules)
    }

    fn stats(&self) -> String {
        let snap = self.mount.stats();
        let (delayed, suspended) = self.mount.parked_counts();
        let mut out = format!("seed {}\nstate {}\n", self.mount.seed(), self.mount.state());
        for (op, requests, bytes) in &snap.ops {
            let _ = writeln!(out, "{op}: {requests} request(s), {bytes} bytes");
        }
        let faults: Vec<String> = snap
            .faults
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(a, n)| format!("{a} {n}"))
            .collect();
        let faults = if faults.is_empty() {
            "none".to_string()
        } else {
            faults.join(", ")
        };
        let _ = writeln!(out, "faults: {faults}");
        let _ = writeln!(out, "delayed now {delayed}, suspended now {suspended}");
        match self.mount.unsynced() {
            Some(u) => {
                let _ = writeln!(out, "unsynced: {} write(s), {} bytes", u.writes, u.bytes);
            }
            None => out.push_str("unsynced: no write cache\n"),
        }
        let _ = write!(out, "power {}", self.mount.power_state());
        out
    }

    fn stats_json(&self) -> Value {
        let snap = self.mount.stats();
        let (delayed, suspended) = self.mount.parked_counts();
        let ops: serde_json::Map<String, Value> = snap
            .ops
            .iter()
            .map(|(op, requests, bytes)| {
                (
                    op.to_string(),
                    json!({"requests": requests, "bytes": bytes}),
                )
            })
            .collect();
        let faults: serde_json::Map<String, Value> = snap
            .faults
            .iter()
            .map(|(a, n)| (a.to_string(), Value::from(*n)))
            .collect();
        json!({
            "seed": self.mount.seed(),
            "state": self.mount.state(),
            "ops": ops,
            "faults": faults,
            "delayed_now": delayed,
            "suspended_now": suspended,
            "unsynced_writes": self.mount.unsynced().map(|u| u.writes),
            "unsynced_bytes": self.mount.unsynced().map(|u| u.bytes),
            "power": self.mount.power_state(),
            "bad_sectors": self.mount.bad_list().0.sectors(),
        })
    }

    fn status_json(&self) -> Value {
        let suspended: Vec<Value> = self
            .mount
            .parked()
            .into_iter()
            .map(|p| {
                let (offset, len) = p.op.range();
                json!({
                    "id": p.id,
                    "tags": p.tags,
                    "cause": p.cause,
                    "op": p.op.name(),
                    "offset": offset,
                    "len": len,
                    "suspended_for": p.suspended_for.as_secs_f64(),
                })
            })
            .collect();
        let (delayed, _) = self.mount.parked_counts();
        json!({
            "state": self.mount.state(),
            "seed": self.mount.seed(),
            "rules": self.rules_json(),
            "suspended": suspended,
            "delayed_now": delayed,
            "waiters": self.mount.waiters(),
        })
    }

    /// Serves a line-oriented client (the `--control` socket): one command per line in, one
    /// line out (`ok TEXT` or `error ERRNO_NAME TEXT`, newlines in TEXT escaped as `\n`). A
    /// line that is not UTF-8 or longer than [`MAX_LINE`] gets an error and the next line is
    /// served. `hung_up` tells whether the client went away, so that a `wait_break` it left
    /// behind is cancelled instead of holding this thread.
    pub fn serve_stream<R: BufRead, W: Write>(
        &self,
        mut input: R,
        mut output: W,
        hung_up: impl Fn() -> bool,
    ) -> std::io::Result<()> {
        let mut buf = Vec::new();
        loop {
            let result = match read_line_capped(&mut input, &mut buf, MAX_LINE)? {
                Line::End => return Ok(()),
                Line::TooLong => Err(line_too_long()),
                Line::Complete => match std::str::from_utf8(&buf) {
                    Err(_) => Err(not_text()),
                    Ok(line) if line.trim().is_empty() => continue,
                    Ok(line) => match self.run_and_wait(line.trim(), &hung_up) {
                        Some(result) => result,
                        // The client is gone: nobody to answer.
                        None => return Ok(()),
                    },
                },
            };
            writeln!(output, "{}", encode_reply(&result))?;
            output.flush()?;
        }
    }

    /// Runs a command and waits for its reply (this is a connection's own thread, never a
    /// FUSE worker); `None` when the client hung up first (its waiter is cancelled).
    fn run_and_wait(
        &self,
        line: &str,
        hung_up: &impl Fn() -> bool,
    ) -> Option<Result<String, CtlError>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = self.run(
            line,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(result) => return Some(result),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Some(Err(CtlError::new(
                        libc::ECANCELED,
                        "the command was dropped",
                    )));
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if hung_up() {
                        if let Some(w) = waiter {
                            self.cancel(w);
                        }
                        return None;
                    }
                }
            }
        }
    }
}

fn line_too_long() -> CtlError {
    CtlError::invalid(format!("command longer than {MAX_LINE} bytes"))
}

fn not_text() -> CtlError {
    CtlError::invalid("the command is not UTF-8 text")
}

enum Line {
    /// A line (without its newline) is in the buffer.
    Complete,
    /// The line was longer than the cap; it was read and dropped up to its newline.
    TooLong,
    /// End of input (a final line without a newline counts as complete).
    End,
}

/// Reads one line into `buf`, holding at most `cap` bytes of it: a longer line is consumed
/// and reported as [`Line::TooLong`], so that no client can grow the daemon's memory.
fn read_line_capped(
    input: &mut impl BufRead,
    buf: &mut Vec<u8>,
    cap: usize,
) -> std::io::Result<Line> {
    buf.clear();
    let mut too_long = false;
    let mut any = false;
    loop {
        let chunk = match input.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            return Ok(match (any, too_long) {
                (false, _) => Line::End,
                (true, true) => Line::TooLong,
                (true, false) => Line::Complete,
            });
        }
        any = true;
        let (part, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(at) => (&chunk[..at], Some(at + 1)),
            None => (chunk, None),
        };
        if !too_long {
            if buf.len() + part.len() > cap {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(part);
            }
        }
        let used = done.unwrap_or(chunk.len());
        input.consume(used);
        if done.is_some() {
            return Ok(if too_long {
                Line::TooLong
            } else {
                Line::Complete
            });
        }
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
            crate::engine::errno::name(e.errno).unwrap_or("EIO"),
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
        crate::engine::errno::from_name(name).unwrap_or(libc::EIO),
        unescape(text),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;
    use crate::engine::Engine;
    use crate::mount::ImageMode;
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
            None,
            Default::default(),
        )
        .unwrap();
        (img, Control::new(Arc::new(mount), ReloadSource::default()))
    }

    fn session(c: &Control, input: &str) -> Vec<String> {
        let mut out = Vec::new();
        c.serve_stream(Cursor::new(input.as_bytes()), &mut out, || false)
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
            "ok rule 1: event=read_aio state=any inject-error errno=ENOSPC (28) range=sector 8 (byte 4096) iotype=default once=off hits=0 armed=0"
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
            c.mount.expire(None);
            if let Ok(r) = rx.try_recv() {
                assert_eq!(r.unwrap_err().errno, libc::ETIMEDOUT);
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no timeout");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn bad_bytes_and_long_lines_get_an_error_and_the_stream_goes_on() {
        let (_img, c) = control();
        let mut input = b"sta\xffte\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', MAX_LINE + 1));
        input.extend_from_slice(b"\nstate\n  \nstate");
        let mut out = Vec::new();
        c.serve_stream(Cursor::new(input), &mut out, || false)
            .unwrap();
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            vec![
                "error EINVAL the command is not UTF-8 text",
                "error EINVAL command longer than 65536 bytes",
                "ok state 1",
                "ok state 1",
            ]
        );
        // The same through the control file's path.
        let (tx, rx) = std::sync::mpsc::channel();
        c.run_bytes(
            b"\xfe",
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        assert_eq!(rx.recv().unwrap().unwrap_err().errno, libc::EINVAL);
    }

    #[test]
    fn a_client_that_hangs_up_cancels_its_wait_break() {
        let (_img, c) = control();
        let mut out = Vec::new();
        // The client is gone: the waiter goes and nothing is answered.
        c.serve_stream(Cursor::new(b"wait_break t\n".to_vec()), &mut out, || true)
            .unwrap();
        assert!(out.is_empty());
        assert_eq!(c.mount.waiters(), 0);
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
