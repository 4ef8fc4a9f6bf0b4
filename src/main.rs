//! The `blkdebugfs` command line: parse, validate, run, exit once with a documented code.
//!
//! Exit codes: 0 success; 1 runtime failure (image missing, unreadable or in use, bad mount
//! point, already mounted, FUSE mount refused, NBD address in use); 2 usage or configuration
//! error (bad option, bad rule, bad config file, a remote NBD address without
//! `--allow-remote`). Errors are printed once, on stderr, before anything is
//! mounted.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};

use std::sync::{Arc, OnceLock};

use blkdebugfs::config::{self, CliRule, Limits, RuleSet};
use blkdebugfs::control::{Control, ReloadSource};
use blkdebugfs::{Error, MountOptions, Shutdown, errno, rules::Event};

const EXIT_CODES: &str = "Exit codes: 0 success; 1 runtime failure (image missing, \
unreadable or in use by QEMU or another mount, bad mount point, already mounted, FUSE mount \
refused, NBD address in use; ctl: the command was refused or failed); 2 usage or configuration \
error (bad option, rule or config file, a remote NBD address without --allow-remote; nothing \
is mounted).";

/// Serve a faulty view of a disk image: QEMU blkdebug's fault-injection rules over FUSE or NBD.
#[derive(Parser)]
#[command(name = "blkdebugfs", version, after_help = EXIT_CODES)]
struct Cli {
    /// More log output (-v debug, -vv trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mount IMAGE at MOUNTPOINT with fault-injection rules (with --listen, serve it over NBD
    /// too).
    Mount(MountArgs),
    /// Serve IMAGE over NBD with fault-injection rules: no FUSE, no root (needs --listen).
    Serve(ServeArgs),
    /// Validate rules without mounting and print them as understood.
    Check(CheckArgs),
    /// Run a self-contained demonstration on a temporary image.
    Demo,
    /// Send one control command to a mount (its directory, or its --control socket).
    Ctl(CtlArgs),
    /// Record one run of a workload through the view, then check every crash state a disk
    /// with a volatile write cache could have left (exit 0: none failed, 1: a state failed,
    /// 2: usage, 3: the run itself failed).
    Explore(ExploreArgs),
    /// Print a shell completion script (e.g. `source <(blkdebugfs completions bash)`).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print a man page (roff) to stdout: blkdebugfs.1, or with --section 5 blkdebugfs.ini.5
    /// (rule sections and keys, control commands, power cuts, the trace), as committed.
    Manpage {
        /// Which page: 1 (the command) or 5 (the rules and the trace).
        #[arg(long, value_name = "N", default_value = "1", value_parser = ["1", "5"])]
        section: String,
    },
}

#[derive(Args)]
struct ExploreArgs {
    /// The image to start from (never changed: the run works on a sparse copy). With
    /// --from, the recording's base image (default: the path the recording names).
    image: Option<PathBuf>,
    /// The workload, run with `sh -c` (cwd: the mounted filesystem with --fs).
    #[arg(long, value_name = "CMD")]
    workload: Option<String>,
    /// The check of each crash state, run with `sh -c`; exit 0 means the state is fine.
    #[arg(long, value_name = "CMD")]
    check: Option<String>,
    /// Put a loop device over the view and mount TYPE with OPTIONS for the workload and
    /// each check (then the filesystem's read-only fsck runs too).
    #[arg(long, value_name = "TYPE[:OPTIONS]", value_parser = blkdebugfs::explore::FsSpec::parse)]
    fs: Option<blkdebugfs::explore::FsSpec>,
    /// Run before recording starts, in the current directory (make the filesystem,
    /// populate it).
    #[arg(long, value_name = "CMD")]
    setup: Option<String>,
    /// Keep the recording in DIR (for --from, --state, another machine).
    #[arg(long, value_name = "DIR")]
    record: Option<PathBuf>,
    /// Explore a recording made before (by --record or `mount --record`).
    #[arg(long, value_name = "DIR")]
    from: Option<PathBuf>,
    /// The recording's base image is at PATH (a copy elsewhere).
    #[arg(long, value_name = "PATH")]
    base: Option<PathBuf>,
    /// Seed of every choice (torn sectors, drawn subsets). Default: random, printed.
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Check N states at once.
    #[arg(long, value_name = "N", default_value = "1", value_parser = clap::value_parser!(u16).range(1..=64))]
    jobs: u16,
    /// States checked per epoch at most (`full` always).
    #[arg(long, value_name = "N", default_value = "64", value_parser = clap::value_parser!(u32).range(1..))]
    per_epoch: u32,
    /// Stop checking after this long (e.g. 10m); the states not reached are reported.
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    budget: Option<std::time::Duration>,
    /// Which kinds of state, in order: durable,prefix,omit,torn,subset,full.
    #[arg(long, value_name = "LIST", default_value = "durable,prefix,omit,torn,subset,full", value_parser = kinds)]
    strategies: Kinds,
    /// End at the first failing state.
    #[arg(long)]
    stop_at_first: bool,
    /// Check only the K-th of N disjoint slices of the state list (1 <= K <= N).
    #[arg(long, value_name = "K/N", value_parser = shard)]
    shard: Option<(usize, usize)>,
    /// Write one JSON object per state checked, then a summary, to FILE.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Kill a check (its whole process group) that runs longer (the state is `timeout`).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = duration)]
    timeout: std::time::Duration,
    /// Skip the filesystem's read-only fsck after each check.
    #[arg(long)]
    no_fsck: bool,
    /// One state, by its ID (EPOCH.KIND.N): write it with --image-out, or check it.
    #[arg(long, value_name = "ID")]
    state: Option<String>,
    /// With --state: write that crash image to FILE (sparse), byte for byte.
    #[arg(long, value_name = "FILE")]
    image_out: Option<PathBuf>,
    /// The disk's atomic write unit: a torn write keeps or loses whole units of BYTES
    /// (512: any sector may tear apart from its neighbours; 4096 for 4Kn and 512e disks).
    #[arg(long, value_name = "BYTES", default_value = "512", value_parser = size)]
    physical_sector: u64,
}

#[derive(Clone)]
struct Kinds(Vec<blkdebugfs::explore::enumerate::Kind>);

fn kinds(text: &str) -> Result<Kinds, String> {
    use blkdebugfs::explore::enumerate::Kind;
    let mut out = Vec::new();
    for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let kind = Kind::parse(name).ok_or_else(|| {
            format!("'{name}' is not a kind (durable, prefix, omit, torn, subset, full)")
        })?;
        if out.contains(&kind) {
            return Err(format!("'{name}' is named twice"));
        }
        out.push(kind);
    }
    if out.is_empty() {
        return Err("name at least one kind".into());
    }
    Ok(Kinds(out))
}

fn shard(text: &str) -> Result<(usize, usize), String> {
    let (k, n) = text
        .split_once('/')
        .ok_or_else(|| format!("'{text}' is not K/N"))?;
    let (k, n): (usize, usize) = (
        k.parse().map_err(|_| format!("'{k}' is not a number"))?,
        n.parse().map_err(|_| format!("'{n}' is not a number"))?,
    );
    if n == 0 || k == 0 || k > n {
        return Err(format!("'{text}': K/N needs 1 <= K <= N"));
    }
    Ok((k, n))
}

/// `500ms`, `30s`, `10m`, `2h` (a bare number is seconds).
fn duration(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let (number, unit) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (t, 1.0)
    };
    let bad = || format!("'{text}' is not a duration such as 500ms, 30s, 10m or 2h");
    let secs = number.trim().parse::<f64>().map_err(|_| bad())? * unit;
    if !(secs > 0.0 && secs <= MAX_SECONDS) {
        return Err(bad());
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

fn explore(args: ExploreArgs) -> ExitCode {
    use blkdebugfs::explore::{ExploreOptions, Outcome};
    let options = ExploreOptions {
        image: args.image,
        workload: args.workload,
        check: args.check,
        fs: args.fs,
        setup: args.setup,
        record: args.record,
        from: args.from,
        base: args.base,
        seed: args.seed,
        jobs: args.jobs as usize,
        per_epoch: args.per_epoch as usize,
        budget: args.budget,
        kinds: args.strategies.0,
        stop_at_first: args.stop_at_first,
        shard: args.shard,
        report: args.report,
        timeout: args.timeout,
        no_fsck: args.no_fsck,
        state: args.state,
        image_out: args.image_out,
        physical_sector: args.physical_sector,
    };
    let result = blkdebugfs::explore::run(options);
    blkdebugfs::logring::finish(std::time::Duration::from_secs(2));
    match result {
        Ok(Outcome::Clean) => ExitCode::SUCCESS,
        Ok(Outcome::Failed) => ExitCode::from(1),
        Err(e) => {
            eprintln!("blkdebugfs explore: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

#[derive(Args)]
struct CtlArgs {
    /// The mount point (its .control file is used) or a --control socket path.
    target: PathBuf,
    /// The command and its arguments, e.g. `break write_aio A` (`help` lists them).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// Rule sources, shared by `mount` and `check`.
#[derive(Args)]
struct RuleArgs {
    /// blkdebug config file (QEMU's INI dialect).
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Add an inject-error rule, e.g. event=read_aio,errno=ENOSPC,sector=8 (repeatable).
    #[arg(long = "inject-error", value_name = "K=V,...")]
    inject_error: Vec<String>,
    /// Add a set-state rule, e.g. event=write_aio,state=1,new_state=2 (repeatable).
    #[arg(long = "set-state", value_name = "K=V,...")]
    set_state: Vec<String>,
    // The help is built from the parser's own list of sections (`rule_help`), so a section
    // added there is named here.
    #[arg(long = "rule", value_name = "SECTION:K=V,...", help = rule_help())]
    rule: Vec<String>,
    /// The command-line rules in the order given (filled from the matches after parsing).
    #[arg(skip)]
    ordered: Vec<CliRule>,
    /// Request alignment in bytes (power of two); unaligned writes read-modify-write.
    #[arg(long, value_name = "BYTES", value_parser = size)]
    align: Option<u64>,
    /// Split requests larger than this (multiple of align), one event per chunk.
    #[arg(long = "max-transfer", value_name = "BYTES", value_parser = size)]
    max_transfer: Option<u64>,
    /// Preferred write-zeroes alignment; smaller zero-writes fall back to writes.
    #[arg(long = "opt-write-zero", value_name = "BYTES", value_parser = size)]
    opt_write_zero: Option<u64>,
    /// Largest write-zeroes request.
    #[arg(long = "max-write-zero", value_name = "BYTES", value_parser = size)]
    max_write_zero: Option<u64>,
    /// Preferred discard alignment (accepted and validated; no FUSE operation discards).
    #[arg(long = "opt-discard", value_name = "BYTES", value_parser = size)]
    opt_discard: Option<u64>,
    /// Largest discard (accepted and validated; no FUSE operation discards).
    #[arg(long = "max-discard", value_name = "BYTES", value_parser = size)]
    max_discard: Option<u64>,
}

/// `--rule`'s help: every section `config::split_section` accepts, from `Group::ALL`.
fn rule_help() -> String {
    let sections: Vec<&str> = config::Group::ALL.iter().map(|g| g.name()).collect();
    format!(
        "Add a rule of any section, e.g. delay:latency=5ms,range=0-64M or \
         corrupt:iotype=read,sectors=0-7+2048-2055,probability=1% (repeatable; ranges joined \
         with +; sections: {}; keys in blkdebugfs.ini(5)).",
        sections.join(", ")
    )
}

/// Longest duration a command-line option takes: ten years, far past any test, and far
/// inside what `Instant` arithmetic can hold.
const MAX_SECONDS: f64 = 10.0 * 365.0 * 86_400.0;

fn seconds(text: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("'{text}' is not a number of seconds"))?;
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("'{text}' must be a positive number of seconds"));
    }
    if secs > MAX_SECONDS {
        return Err(format!(
            "'{text}' is more than ten years ({MAX_SECONDS} seconds)"
        ));
    }
    std::time::Duration::try_from_secs_f64(secs).map_err(|e| format!("'{text}': {e}"))
}

fn size(text: &str) -> Result<u64, String> {
    config::parse_size(text)
}

impl RuleArgs {
    fn limits(&self) -> Limits {
        Limits {
            align: self.align.unwrap_or(0),
            max_transfer: self.max_transfer.unwrap_or(0),
            opt_write_zero: self.opt_write_zero.unwrap_or(0),
            max_write_zero: self.max_write_zero.unwrap_or(0),
            opt_discard: self.opt_discard.unwrap_or(0),
            max_discard: self.max_discard.unwrap_or(0),
        }
    }

    /// Where the rules come from: `extra_config` (from `blkdebug:CONF:IMG`) or `--config`,
    /// then the command-line rules.
    fn source(&self, extra_config: Option<&Path>) -> Result<ReloadSource, Error> {
        let config = match (extra_config, &self.config) {
            (Some(_), Some(_)) => {
                return Err(Error::Usage(
                    "give the config either in blkdebug:CONFIG:IMAGE or with --config, not both"
                        .into(),
                ));
            }
            (Some(c), None) => Some(c.to_path_buf()),
            (None, c) => c.clone(),
        };
        Ok(ReloadSource {
            config,
            cli: self.ordered.clone(),
        })
    }

    fn load(&self, extra_config: Option<&Path>) -> Result<(RuleSet, ReloadSource), Error> {
        let source = self.source(extra_config)?;
        let set = RuleSet::load(source.config.as_deref(), &source.cli)?;
        Ok((set, source))
    }
}

#[derive(Args)]
struct MountArgs {
    /// The backing image (a regular file or a block device, e.g. /dev/loop3), or QEMU's
    /// blkdebug:CONFIG:IMAGE (CONFIG may be empty).
    image: String,
    /// An existing directory (the image appears inside it) or regular file (the image is
    /// mounted onto it).
    mountpoint: PathBuf,
    #[command(flatten)]
    rules: RuleArgs,
    #[command(flatten)]
    daemon: DaemonArgs,
    /// Let the kernel page cache serve reads (faster; cached reads never reach the rules).
    #[arg(long)]
    cache: bool,
    /// FUSE worker threads (default: number of CPUs).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: Option<u16>,
    /// Let other users access the mount (needs user_allow_other for non-root).
    #[arg(long)]
    allow_other: bool,
    #[command(flatten)]
    nbd: NbdArgs,
}

#[derive(Args)]
struct ServeArgs {
    /// The backing image (a regular file or a block device, e.g. /dev/loop3), or QEMU's
    /// blkdebug:CONFIG:IMAGE (CONFIG may be empty).
    image: String,
    #[command(flatten)]
    rules: RuleArgs,
    #[command(flatten)]
    daemon: DaemonArgs,
    #[command(flatten)]
    nbd: NbdArgs,
}

/// The NBD server's options, shared by `serve` (which needs --listen) and `mount`.
#[derive(Args)]
struct NbdArgs {
    /// Serve the image over NBD on ADDR: unix:PATH (a socket, mode 0600, removed on exit) or
    /// tcp:HOST:PORT (repeatable).
    #[arg(long, value_name = "ADDR", value_parser = clap::value_parser!(blkdebugfs::Listen))]
    listen: Vec<blkdebugfs::Listen>,
    /// Serve NBD on TCP addresses other than loopback. NBD has no authentication here:
    /// anyone who reaches the port can read and write the image.
    #[arg(long)]
    allow_remote: bool,
    /// The NBD export's name (default: the image's file name; the empty name works too).
    #[arg(long, value_name = "NAME")]
    export: Option<String>,
}

/// What `mount` and `serve` share: the image's mode, the daemon, the rules' runtime.
#[derive(Args)]
struct DaemonArgs {
    /// Serve the image read-only.
    #[arg(long)]
    read_only: bool,
    /// Writes past the end grow the image.
    #[arg(long)]
    growable: bool,
    /// Return once the mount is live (exit 0) or has failed (non-zero), serving in the
    /// background.
    #[arg(long)]
    daemonize: bool,
    /// Write the serving process's PID to FILE once the mount is live.
    #[arg(long, value_name = "FILE")]
    pidfile: Option<PathBuf>,
    /// Also serve control commands on a UNIX socket at PATH (the way to reach `serve`, or a
    /// mount onto a regular file, which has no directory for .control).
    #[arg(long = "control", value_name = "PATH")]
    control_socket: Option<PathBuf>,
    /// Resume, with a warning, any request suspended longer than SECS.
    #[arg(long = "max-suspend", value_name = "SECS", value_parser = seconds)]
    max_suspend: Option<std::time::Duration>,
    /// With --daemonize: append the log to FILE (otherwise it is discarded).
    #[arg(long, value_name = "FILE", requires = "daemonize")]
    log_file: Option<PathBuf>,
    /// Seed of every random choice (probability, jitter, which bits, which sectors); the
    /// same seed and the same requests give the same faults. Default: random, logged.
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Write a JSON Lines trace of every request a rule acted on (and of state changes,
    /// breakpoint hits) to FILE.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,
    /// With --trace: one line for every request, with the events it fired.
    #[arg(long, requires = "trace")]
    trace_all: bool,
    /// Model the disk's volatile write cache: writes since the last successful flush are
    /// unsynced, and `ctl power-cut` or a [power-cut] rule can lose them.
    #[arg(long)]
    write_cache: bool,
    /// Record the run into DIR for `explore --from DIR` (implies --write-cache): every
    /// write with its bytes, the flushes, and marks (`ctl MNT mark LABEL`), from the mount
    /// to its end or to `ctl MNT record stop`.
    #[arg(long, value_name = "DIR")]
    record: Option<PathBuf>,
    /// Take no QEMU image locks and check none: mount even while QEMU, qemu-img or another
    /// mount uses the image (by default the mount holds the locks a QEMU writer holds, or a
    /// reader's with --read-only, and refuses an image in use).
    #[arg(long, short = 'U')]
    force_share: bool,
}

#[derive(Args)]
struct CheckArgs {
    #[command(flatten)]
    rules: RuleArgs,
    /// Also list the 48 event names and whether each can fire in a FUSE view.
    #[arg(long)]
    list_events: bool,
    /// Check the rules for a mount with --write-cache ([power-cut] rules are refused
    /// without it, as `mount` refuses them).
    #[arg(long)]
    write_cache: bool,
}

/// The rule flags of `sub` in the order they were given, whichever flag each used: rules
/// apply in written order, so `--rule A --inject-error B` must keep A before B.
fn ordered_rules(sub: &ArgMatches) -> Vec<CliRule> {
    let mut found: Vec<(usize, CliRule)> = Vec::new();
    for (id, flag) in [
        ("inject_error", "--inject-error"),
        ("set_state", "--set-state"),
        ("rule", "--rule"),
    ] {
        if let (Some(indices), Some(values)) = (sub.indices_of(id), sub.get_many::<String>(id)) {
            found.extend(
                indices
                    .zip(values)
                    .map(|(i, v)| (i, CliRule::new(flag, v.clone()))),
            );
        }
    }
    found.sort_by_key(|(i, _)| *i);
    found.into_iter().map(|(_, r)| r).collect()
}

fn main() -> ExitCode {
    use_one_malloc_arena();
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // explore speaks for itself; its view's mount logs only what went wrong.
    init_logging(match cli.command {
        Command::Explore(_) if cli.verbose == 0 => None,
        _ => Some(cli.verbose),
    });
    let sub = matches.subcommand().map(|(_, m)| m);
    if !matches!(
        cli.command,
        Command::Mount(_) | Command::Serve(_) | Command::Demo
    ) {
        // A command that only prints ends quietly when its reader goes away (`check | head`),
        // as command-line tools do; Rust ignores SIGPIPE, which makes `println!` panic. Not
        // for the daemon: a client that hangs up its control socket must not end the mount.
        // SAFETY: restoring a signal's default disposition touches no memory.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Mount(mut args) => {
            args.rules.ordered = sub.map(ordered_rules).unwrap_or_default();
            mount(args)
        }
        Command::Serve(mut args) => {
            args.rules.ordered = sub.map(ordered_rules).unwrap_or_default();
            serve(args)
        }
        Command::Check(mut args) => {
            args.rules.ordered = sub.map(ordered_rules).unwrap_or_default();
            check(args)
        }
        Command::Demo => blkdebugfs::demo::run().map_err(Error::Usage),
        Command::Ctl(args) => ctl(args),
        Command::Explore(args) => return explore(args),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "blkdebugfs",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Manpage { section } => match section.as_str() {
            "5" => blkdebugfs::manpage::render_rules_page(),
            _ => blkdebugfs::manpage::render(Cli::command()),
        }
        .and_then(|page| std::io::stdout().write_all(&page))
        .map_err(|e| Error::Usage(format!("writing the man page: {e}"))),
    };
    // The last lines (shutdown) go out before the process ends, unless stderr is a pipe
    // nobody reads: then they are lost after a bounded wait, and the exit is not.
    blkdebugfs::logring::finish(std::time::Duration::from_secs(2));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("blkdebugfs: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// `text`, cut to `max` characters with `...` when longer.
fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_string(),
    }
}

/// `None`: warnings only.
fn init_logging(verbose: Option<u8>) {
    let level = match verbose {
        None => "warn",
        Some(0) => "info",
        Some(1) => "debug",
        Some(_) => "trace",
    };
    // fuser logs every unimplemented or unusual request at warn/debug; keep it quieter. Its
    // session also warns "Failed to umount filesystem: EINVAL" whenever the mount was ended
    // by `umount` (the normal way to stop us): nothing failed, so only its errors show.
    let default = format!("{level},fuser=warn,fuser::session=error,fuser::mnt=error");
    blkdebugfs::logring::install(&default);
}

/// The daemon allocates from glibc's main arena only. The write cache frees up to 64 MiB of
/// before-images at each flush, allocated by whichever FUSE workers wrote; in per-thread
/// arenas that memory sinks into each arena's top chunk, which `malloc_trim` does not return
/// (glibc trims only the main arena's top), and the daemon grew by tens of MiB per arena
/// over repeated runs. Small allocations still come from per-thread caches without a lock;
/// `scripts/bench.sh` showed no change in its rows.
fn use_one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called first thing in main, before
    // any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn check(args: CheckArgs) -> Result<(), Error> {
    args.rules.limits().validate()?;
    let (set, _) = args.rules.load(None)?;
    set.check_write_cache(args.write_cache)?;
    if set.rules.is_empty() && set.bad.is_none() && !args.list_events {
        println!("no rules");
    }
    for (i, rule) in set.rules.iter().enumerate() {
        println!("rule {:>3}: {rule}  ({})", i + 1, rule.origin);
    }
    if let Some((sectors, settings)) = &set.bad {
        println!(
            "bad sectors: {} sector(s) in {} range(s): {} (errno {}, heal-on-write {}, \
             write-errno {})",
            sectors.sectors(),
            sectors.intervals(),
            shorten(&sectors.to_string(), 200),
            errno::describe(settings.errno),
            if settings.heal_on_write { "on" } else { "off" },
            errno::describe(settings.write_errno)
        );
    }
    for w in set.warnings() {
        println!("warning: {w}");
    }
    if args.list_events {
        for e in Event::ALL {
            let fires = if e.fires_in_fuse_view() {
                "fires"
            } else {
                "never fires (qcow2-internal)"
            };
            println!("event {:<28} {fires}", e.name());
        }
        println!(
            "errno names: EIO = {}, ENOSPC = {}, ... (any Linux name, or 0..{})",
            libc::EIO,
            libc::ENOSPC,
            errno::MAX_INJECTABLE
        );
    }
    Ok(())
}

fn mount(args: MountArgs) -> Result<(), Error> {
    let (set, reload, image) = load_rules(&args.image, &args.rules)?;
    let mut options = MountOptions::new(image, &args.mountpoint);
    options.cache = args.cache;
    options.allow_other = args.allow_other;
    if let Some(n) = args.threads {
        options.threads = n as usize;
    }
    start(options, set, reload, &args.rules, &args.daemon, &args.nbd)
}

fn serve(args: ServeArgs) -> Result<(), Error> {
    if args.nbd.listen.is_empty() {
        return Err(Error::Usage(
            "serve needs --listen unix:PATH or --listen tcp:HOST:PORT".into(),
        ));
    }
    let (set, reload, image) = load_rules(&args.image, &args.rules)?;
    let options = MountOptions::serve(image, Vec::new());
    start(options, set, reload, &args.rules, &args.daemon, &args.nbd)
}

/// The image path and the rules of `mount` and `serve`: IMAGE may be QEMU's
/// `blkdebug:CONFIG:IMAGE`.
fn load_rules(image: &str, rules: &RuleArgs) -> Result<(RuleSet, ReloadSource, PathBuf), Error> {
    let (extra_config, image) = match config::parse_blkdebug_filename(image) {
        Some((conf, image)) => (conf, image),
        None => (None, PathBuf::from(image)),
    };
    let (set, reload) = rules.load(extra_config.as_deref())?;
    for w in set.warnings() {
        log::warn!("{w}");
    }
    Ok((set, reload, image))
}

/// Prepares, daemonizes if asked, and serves until a signal: `mount` and `serve` alike.
fn start(
    mut options: MountOptions,
    set: RuleSet,
    reload: ReloadSource,
    rules: &RuleArgs,
    args: &DaemonArgs,
    nbd: &NbdArgs,
) -> Result<(), Error> {
    options.rules = set.rules;
    options.limits = rules.limits();
    options.read_only = args.read_only;
    options.growable = args.growable;
    options.control_socket = args.control_socket.clone();
    options.max_suspend = args.max_suspend;
    options.reload = reload;
    options.seed = args.seed;
    options.trace = args.trace.clone();
    options.trace_all = args.trace_all;
    options.write_cache = args.write_cache;
    options.record = args.record.clone().map(|dir| blkdebugfs::RecordSetup {
        dir: std::path::absolute(&dir).unwrap_or(dir),
        image: None,
        start_now: true,
    });
    options.bad = set.bad;
    options.force_share = args.force_share;
    options.nbd = blkdebugfs::NbdOptions {
        listen: nbd.listen.clone(),
        allow_remote: nbd.allow_remote,
        export: nbd.export.clone(),
    };
    let prepared = blkdebugfs::prepare(options)?;

    // Daemonize before any thread exists: the parent waits for the child's verdict.
    let ready_pipe = if args.daemonize {
        match daemonize(args.log_file.as_deref())? {
            Parent::Exit(code) => std::process::exit(code),
            Parent::Child(fd) => Some(fd),
        }
    } else {
        None
    };

    // From here on no worker waits for stderr: log lines go through a queue and a writer
    // thread (started after the fork: a thread does not survive it).
    if let Err(e) = blkdebugfs::logring::start_writer() {
        log::warn!("no log writer thread ({e}): log lines are written by the thread that logs");
    }
    let shutdown = Shutdown::new();
    let control = Arc::new(OnceLock::new());
    let signals = watch_signals(shutdown.clone(), control.clone())
        .map_err(|e| Error::Usage(e.to_string()))?;
    let pidfile = args.pidfile.clone();
    let result = blkdebugfs::run(prepared, shutdown.clone(), |ctl| {
        let _ = control.set(ctl);
        if let Some(path) = &pidfile
            && let Err(e) = write_pidfile(path)
        {
            log::warn!("cannot write pidfile {}: {e}", path.display());
        }
        if let Some(fd) = &ready_pipe {
            report_to_parent(fd, b"ok\n");
        }
    });
    signals.close();
    if let Some(path) = &args.pidfile {
        let _ = std::fs::remove_file(path);
    }
    if let (Err(e), Some(fd)) = (&result, &ready_pipe) {
        report_to_parent(fd, format!("{e}\n").as_bytes());
    }
    result
}

/// SIGINT and SIGTERM: clean shutdown (suspended requests complete first). SIGUSR1: resume
/// every suspended request. SIGHUP: reload the rules.
fn watch_signals(
    shutdown: Shutdown,
    control: Arc<OnceLock<Arc<Control>>>,
) -> std::io::Result<signal_hook::iterator::Handle> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGUSR1, SIGHUP])?;
    let handle = signals.handle();
    std::thread::Builder::new()
        .name("blkdebugfs-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                match (sig, control.get()) {
                    (SIGUSR1, Some(c)) => {
                        let n = c.mount().resume_all();
                        log::info!("SIGUSR1: resumed {n} suspended request(s)");
                    }
                    (SIGHUP, Some(c)) => match c.reload() {
                        Ok(text) => log::info!("SIGHUP: {text}"),
                        Err(e) => {
                            log::warn!("SIGHUP: reload refused, old rules stay: {}", e.message)
                        }
                    },
                    (SIGUSR1 | SIGHUP, None) => {
                        log::warn!("signal {sig} before the mount is live: ignored")
                    }
                    _ => {
                        log::info!("signal {sig}: shutting down");
                        shutdown.trigger();
                        break;
                    }
                }
            }
        })?;
    Ok(handle)
}

/// `blkdebugfs ctl TARGET COMMAND...`: through TARGET/.control, or a --control socket.
fn ctl(args: CtlArgs) -> Result<(), Error> {
    let line = args.command.join(" ");
    let text = if args.command[0] == "wait_break" && (2..=3).contains(&args.command.len()) {
        wait_break_in_slices(&args.target, &args.command[1], args.command.get(2), &line)
    } else {
        send_command(&args.target, &line)
    }
    .map_err(|(errno, message)| {
        // The reply's errno by name, as the control protocol names it (not Rust's
        // "(os error 22)").
        Error::Ctl(match errno.and_then(errno::name) {
            Some(name) => format!("{message} ({name})"),
            None => message,
        })
    })?;
    if !text.is_empty() {
        println!("{text}");
    }
    Ok(())
}

/// Longest single wait the CLI asks the daemon for. A process writing to `.control` waits
/// in the kernel, where no signal reaches it, until the daemon replies: waiting in slices
/// keeps `ctl wait_break` killable (within one slice) whatever its timeout.
const WAIT_SLICE_MS: u64 = 500;

/// `wait_break TAG [TIMEOUT_MS]`, as slices of at most [`WAIT_SLICE_MS`] until a request is
/// suspended under TAG or the whole timeout (none: forever) has passed.
fn wait_break_in_slices(
    target: &Path,
    tag: &str,
    timeout: Option<&String>,
    line: &str,
) -> Result<String, (Option<i32>, String)> {
    let total = match timeout {
        None => None,
        Some(ms) => match ms.parse::<u64>() {
            Ok(ms) => Some(ms),
            // Let the daemon word the error.
            Err(_) => return send_command(target, line),
        },
    };
    let start = std::time::Instant::now();
    loop {
        let waited = start.elapsed().as_millis() as u64;
        let slice = match total {
            Some(total) => total.saturating_sub(waited).min(WAIT_SLICE_MS),
            None => WAIT_SLICE_MS,
        };
        match send_command(target, &format!("wait_break {tag} {slice}")) {
            Err((Some(libc::ETIMEDOUT), message)) => {
                if total.is_some_and(|t| start.elapsed().as_millis() as u64 >= t) {
                    return Err((Some(libc::ETIMEDOUT), message));
                }
            }
            other => return other,
        }
    }
}

/// An I/O error's text without Rust's " (os error N)": the caller names the errno.
fn text(e: &std::io::Error) -> String {
    let full = e.to_string();
    match full.rfind(" (os error ") {
        Some(at) => full[..at].to_string(),
        None => full,
    }
}

/// Sends one command; its reply text, or the errno (when known) and the message.
fn send_command(target: &Path, line: &str) -> Result<String, (Option<i32>, String)> {
    use std::io::{BufRead, Read};
    use std::os::unix::fs::FileTypeExt;
    let at = |e: std::io::Error| {
        (
            e.raw_os_error(),
            format!("{}: {}", target.display(), text(&e)),
        )
    };
    let md = std::fs::metadata(target).map_err(at)?;
    if md.file_type().is_socket() {
        let mut conn = std::os::unix::net::UnixStream::connect(target).map_err(at)?;
        // A daemon that refuses the connection (another user, too many) answers and closes
        // at once, maybe before our line is written: read its answer even then.
        let sent = writeln!(conn, "{line}");
        let mut answer = String::new();
        let read = std::io::BufReader::new(conn).read_line(&mut answer);
        if answer.is_empty() {
            sent.map_err(at)?;
            read.map_err(at)?;
            return Err((None, "the daemon closed the connection".into()));
        }
        blkdebugfs::control::decode_reply(&answer).map_err(|e| (Some(e.errno), e.message))
    } else if md.is_dir() {
        let path = target.join(blkdebugfs::control::CONTROL_NAME);
        let at = |e: std::io::Error| {
            (
                e.raw_os_error(),
                format!("{}: {}", path.display(), text(&e)),
            )
        };
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(at)?;
        let wrote = f.write(line.as_bytes());
        let mut text = String::new();
        f.read_to_string(&mut text).map_err(at)?;
        match wrote {
            Ok(_) => Ok(text.trim_end().to_string()),
            Err(e) => Err((
                e.raw_os_error(),
                text.trim_end().trim_start_matches("error: ").to_string(),
            )),
        }
    } else {
        Err((
            None,
            format!(
                "{}: neither a mount point directory nor a control socket",
                target.display()
            ),
        ))
    }
}

enum Parent {
    Exit(i32),
    Child(std::os::fd::OwnedFd),
}

/// Forks; the parent waits until the child reports "ok" (exit 0) or an error (printed, exit
/// 1). The child starts a new session and keeps the pipe's write end.
fn daemonize(log_file: Option<&Path>) -> Result<Parent, Error> {
    use std::io::BufRead;
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Error::Usage(format!(
            "pipe: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: both are fresh descriptors owned by nobody else.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // Open the log before forking so that an unwritable path is reported by the parent.
    let log = match log_file {
        Some(path) => Some(open_log_file(path)?),
        None => None,
    };
    // SAFETY: no other thread exists yet (logging and signals start after this).
    match unsafe { libc::fork() } {
        -1 => Err(Error::Usage(format!(
            "fork: {}",
            std::io::Error::last_os_error()
        ))),
        0 => {
            drop(read_end);
            // Detach from the caller's terminal and pipes: a caller that waits for our
            // stdout/stderr to close (a test, `$(...)`) must not wait for the daemon's exit.
            // SAFETY: setsid and dup2 on descriptors we own, in the single-threaded child.
            unsafe {
                libc::setsid();
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                if null >= 0 {
                    libc::dup2(null, 0);
                    libc::dup2(null, 1);
                    libc::dup2(null, 2);
                    libc::close(null);
                }
                if let Some(log) = &log {
                    use std::os::fd::AsRawFd;
                    libc::dup2(log.as_raw_fd(), 2);
                }
            }
            Ok(Parent::Child(write_end))
        }
        _child => {
            drop(write_end);
            // One line: "ok" or the error. The child keeps the pipe open while it serves.
            let mut answer = String::new();
            let _ = std::io::BufReader::new(std::fs::File::from(read_end)).read_line(&mut answer);
            if answer.starts_with("ok") {
                Ok(Parent::Exit(0))
            } else {
                let msg = if answer.is_empty() {
                    "the daemon exited before the mount was live".to_string()
                } else {
                    answer.trim().to_string()
                };
                eprintln!("blkdebugfs: {msg}");
                Ok(Parent::Exit(1))
            }
        }
    }
}

fn report_to_parent(fd: &std::os::fd::OwnedFd, msg: &[u8]) {
    let Ok(dup) = fd.try_clone() else { return };
    let mut f = std::fs::File::from(dup);
    let _ = f.write_all(msg);
}

/// Opens the `--log-file` for appending, never through a symbolic link (in a world-writable
/// directory, a link planted there would send our log, as root, into any file), and only
/// if it is a regular file.
fn open_log_file(path: &Path) -> Result<std::fs::File, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let bad = |why: String| Error::Usage(format!("log file {}: {why}", path.display()));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => bad("is a symbolic link (refused: give the real path)".into()),
            _ => bad(e.to_string()),
        })?;
    let md = file.metadata().map_err(|e| bad(e.to_string()))?;
    if !md.file_type().is_file() {
        return Err(bad("is not a regular file".into()));
    }
    Ok(file)
}

/// Writes our PID to `path` atomically: into a new file beside it (created exclusively,
/// never following a link), then renamed over `path`. A symbolic link planted at `path` is
/// replaced, never followed.
fn write_pidfile(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&temp)?;
        writeln!(f, "{}", std::process::id())?;
        f.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}
