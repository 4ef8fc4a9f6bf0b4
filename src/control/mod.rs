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
//! through `Mount`'s methods.
//!
//! May import: `mount/` (the `Mount` type and what it re-exports), `config/` (rule text ->
//! rules), `engine/` (the vocabulary); nothing above it, not even the crate root
//! (`socket.rs` returns its errors as text, which the caller makes a usage error).
//! Never `frontend/`: front ends call this table, not the other way round.
//!
//! - `mod.rs`: the line protocol (one command per line, replies encoded on one line),
//!   [`Control`], [`CtlError`], [`CONTROL_NAME`]
//! - `commands.rs`: the table and the handlers that change things
//! - `views.rs`: what `list`, `rules`, `stats` and `status` show
//! - `socket.rs`: the `--control` socket
//! - `logring.rs`: the process's logger and its in-memory tail (`ctl log`)

use std::fmt::Write as _;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::CliRule;
use crate::mount::{Mount, WaiterId};

mod commands;
pub mod logring;
pub mod socket;
mod views;

use commands::Handler;
pub use commands::{COMMANDS, CommandSpec};

/// The control file's name in the mount's directory (`MOUNTPOINT/.control`).
pub const CONTROL_NAME: &str = ".control";

/// Longest command line accepted (a rule is a few hundred bytes).
pub const MAX_LINE: usize = 64 << 10;

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
