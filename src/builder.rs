//! The library for Rust tests: mount a faulty view from a test, drive it, unmount on drop.
//!
//! [`Builder`] takes what `blkdebugfs mount` takes (image, mount point, rules as QEMU's INI
//! text or as `SECTION:K=V,...` text or typed [`Rule`]s, options) and mounts in-process;
//! [`Mounted`] is the mount: an RAII handle that unmounts when dropped, with the control
//! commands of `blkdebugfs ctl` as methods ([`Mounted::ctl`] runs any of them, and typed
//! helpers cover the common ones). The mount behaves exactly as the binary's (same
//! [`prepare`](crate::prepare) and [`run`](crate::run)), except that nothing handles
//! signals and the log goes to whatever `log` logger the test installed (none: silent).
//!
//! Mounting needs what the binary needs: root, or `fusermount3` for other users.
//!
//! ```no_run
//! use std::os::unix::fs::FileExt;
//! use std::time::Duration;
//! use blkdebugfs::{Builder, rules::Event};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let image = dir.path().join("disk.img");
//! std::fs::write(&image, vec![0u8; 1 << 20])?;
//!
//! // Reads of sector 16 fail with EIO while the rule lives.
//! let mnt = Builder::new(&image)
//!     .rule("inject-error:event=read_aio,errno=EIO,sector=16")
//!     .seed(1)
//!     .mount()?;
//! let disk = std::fs::File::open(mnt.view())?;
//! let mut buf = [0u8; 512];
//! assert_eq!(disk.read_at(&mut buf, 16 * 512).unwrap_err().raw_os_error(), Some(libc::EIO));
//! mnt.remove(mnt.rules()[0].id).expect("rule 1 exists");
//! disk.read_exact_at(&mut buf, 16 * 512)?;
//!
//! // Suspend the next write, look while it waits, let it go.
//! mnt.break_on(Event::WriteAio, "w");
//! let view = mnt.view().to_path_buf();
//! let writer = std::thread::spawn(move || {
//!     std::fs::OpenOptions::new().write(true).open(view)?.write_all_at(b"hello", 0)
//! });
//! mnt.wait_break("w", Some(Duration::from_secs(10)))?;
//! assert!(mnt.ctl("list")?.contains("w"));
//! assert!(mnt.resume("w"));
//! writer.join().unwrap()?;
//! # drop(disk);
//! mnt.unmount()?; // or just drop it
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::{CliRule, Limits, RuleSet};
use crate::control::{Control, CtlError, ReloadSource};
use crate::engine::faults::Fault;
use crate::engine::{Action, Event, IoTypes, Origin, RequestMatch, Rule, RuleId};
use crate::mount::RuleStatus;
use crate::mount::stats::Snapshot;
use crate::{Error, MountOptions, Shutdown};

/// A rule for [`Builder::rule`] and [`Mounted::add_rule`]: text as `--rule` takes it
/// (`SECTION:K=V,...`, e.g. `"delay:latency=5ms,iotype=write"`) or a typed [`Rule`].
#[derive(Clone, Debug)]
pub enum RuleSpec {
    Text(String),
    Typed(Rule),
}

impl From<&str> for RuleSpec {
    fn from(text: &str) -> RuleSpec {
        RuleSpec::Text(text.to_string())
    }
}

impl From<String> for RuleSpec {
    fn from(text: String) -> RuleSpec {
        RuleSpec::Text(text)
    }
}

impl From<Rule> for RuleSpec {
    fn from(rule: Rule) -> RuleSpec {
        RuleSpec::Typed(rule)
    }
}

/// QEMU's `[inject-error]` as a typed rule: requests that fire `event` (in any state, of
/// any I/O type) fail with `errno`; with `sector`, only the requests that cover it.
///
/// ```
/// use blkdebugfs::{builder::inject_error, rules::Event};
/// let rule = inject_error(Event::ReadAio, libc::EIO, Some(16));
/// assert_eq!(rule.event, Some(Event::ReadAio));
/// ```
pub fn inject_error(event: Event, errno: i32, sector: Option<u64>) -> Rule {
    Rule {
        event: Some(event),
        state: 0,
        action: Action::Request {
            fault: Fault::Error {
                errno,
                immediately: false,
            },
            matches: RequestMatch::qemu(sector, IoTypes::default(), false),
        },
        origin: Origin::Runtime,
    }
}

/// Where the config (QEMU's INI dialect) comes from.
enum Config {
    Text(String),
    File(PathBuf),
}

/// Builds a mount; see the module doc. Rules apply in this order, as on the command line:
/// the config, then the text rules, then the typed ones.
pub struct Builder {
    options: MountOptions,
    mountpoint: Option<PathBuf>,
    config: Option<Config>,
    text_rules: Vec<CliRule>,
    typed_rules: Vec<Rule>,
}

impl Builder {
    /// A mount of `image` (a regular file or a block device) with no rules and the
    /// binary's defaults, at a fresh temporary directory unless [`Builder::mountpoint`]
    /// says where.
    pub fn new(image: impl Into<PathBuf>) -> Builder {
        Builder {
            options: MountOptions::new(image, PathBuf::new()),
            mountpoint: None,
            config: None,
            text_rules: Vec::new(),
            typed_rules: Vec::new(),
        }
    }

    /// Mount here: an existing directory (the view is `DIR/<image name>`, beside
    /// `.control`) or regular file (the view is the file itself).
    pub fn mountpoint(mut self, path: impl Into<PathBuf>) -> Builder {
        self.mountpoint = Some(path.into());
        self
    }

    /// Rules (and `[bad-sectors]`) in QEMU's blkdebug INI dialect, as `--config` reads them;
    /// `reload` re-reads this text.
    pub fn config(mut self, text: impl Into<String>) -> Builder {
        self.config = Some(Config::Text(text.into()));
        self
    }

    /// Rules from a config file, as `--config FILE`; `reload` re-reads the file.
    pub fn config_file(mut self, path: impl Into<PathBuf>) -> Builder {
        self.config = Some(Config::File(path.into()));
        self
    }

    /// One more rule: `SECTION:K=V,...` text (as `--rule`) or a typed [`Rule`].
    pub fn rule(mut self, rule: impl Into<RuleSpec>) -> Builder {
        match rule.into() {
            RuleSpec::Text(text) => self.text_rules.push(CliRule::new("--rule", text)),
            RuleSpec::Typed(rule) => self.typed_rules.push(rule),
        }
        self
    }

    /// `--read-only`.
    pub fn read_only(mut self, yes: bool) -> Builder {
        self.options.read_only = yes;
        self
    }

    /// `--growable`.
    pub fn growable(mut self, yes: bool) -> Builder {
        self.options.growable = yes;
        self
    }

    /// `--seed`: the same seed and the same requests give the same faults.
    pub fn seed(mut self, seed: u64) -> Builder {
        self.options.seed = Some(seed);
        self
    }

    /// `--write-cache`.
    pub fn write_cache(mut self, yes: bool) -> Builder {
        self.options.write_cache = yes;
        self
    }

    /// `--force-share`: no QEMU image locks.
    pub fn force_share(mut self, yes: bool) -> Builder {
        self.options.force_share = yes;
        self
    }

    /// `--threads`.
    pub fn threads(mut self, n: usize) -> Builder {
        self.options.threads = n;
        self
    }

    /// `--align`, `--max-transfer` and the other request limits.
    pub fn limits(mut self, limits: Limits) -> Builder {
        self.options.limits = limits;
        self
    }

    /// Any other option (`--cache`, `--trace`, `--max-suspend`, `--control`, ...).
    pub fn options(mut self, set: impl FnOnce(&mut MountOptions)) -> Builder {
        set(&mut self.options);
        self
    }

    /// Validates everything, mounts, and returns once the mount is live. Errors are the
    /// binary's (a bad rule is [`Error::Config`], an image in use [`Error::Locked`]).
    pub fn mount(self) -> Result<Mounted, Error> {
        let Builder {
            mut options,
            mountpoint,
            config,
            text_rules,
            typed_rules,
        } = self;
        let temp_dir = match &mountpoint {
            Some(_) => None,
            None => Some(tempfile::tempdir().map_err(|e| Error::Mountpoint {
                path: std::env::temp_dir(),
                why: format!("cannot make a temporary mount point: {e}"),
            })?),
        };
        options.mountpoint = match (&mountpoint, &temp_dir) {
            (Some(p), _) => p.clone(),
            (None, Some(dir)) => dir.path().to_path_buf(),
            (None, None) => unreachable!("a temporary directory was made above"),
        };
        // The config text lives in a file the handle keeps, so that `reload` works.
        let config_file = match &config {
            Some(Config::Text(text)) => {
                let file = tempfile::Builder::new()
                    .prefix("blkdebugfs-rules")
                    .suffix(".ini")
                    .tempfile()
                    .and_then(|mut f| {
                        std::io::Write::write_all(&mut f, text.as_bytes())?;
                        Ok(f)
                    })
                    .map_err(|e| Error::Usage(format!("cannot write the config text: {e}")))?;
                Some(file)
            }
            _ => None,
        };
        let config_path = match (&config, &config_file) {
            (Some(Config::File(path)), _) => Some(path.clone()),
            (_, Some(file)) => Some(file.path().to_path_buf()),
            _ => None,
        };
        let set = RuleSet::load(config_path.as_deref(), &text_rules)?;
        for w in set.warnings() {
            log::warn!("{w}");
        }
        options.rules.extend(set.rules);
        options.rules.extend(typed_rules);
        if set.bad.is_some() {
            options.bad = set.bad;
        }
        options.reload = ReloadSource {
            config: config_path,
            cli: text_rules,
        };
        let view = view_path(&options.image, &options.mountpoint);
        let mountpoint = options.mountpoint.clone();
        let prepared = crate::prepare(options)?;

        let shutdown = Shutdown::new();
        let (ready_tx, ready_rx) = mpsc::channel();
        let server = {
            let shutdown = shutdown.clone();
            std::thread::Builder::new()
                .name("blkdebugfs-mount".into())
                .spawn(move || {
                    crate::run(prepared, shutdown, move |control| {
                        let _ = ready_tx.send(control);
                    })
                })
                .map_err(|source| Error::Fuse {
                    path: mountpoint.clone(),
                    source,
                })?
        };
        match ready_rx.recv() {
            Ok(control) => Ok(Mounted {
                control,
                shutdown,
                server: Some(server),
                view,
                mountpoint,
                _config_file: config_file,
                _temp_dir: temp_dir,
            }),
            // `run` returned before the mount was live: its error says why.
            Err(_) => match server.join() {
                Ok(Err(e)) => Err(e),
                Ok(Ok(())) => Err(Error::Usage("the mount ended before it was live".into())),
                Err(_) => Err(Error::Usage("the mount thread panicked".into())),
            },
        }
    }
}

/// Where the view is: inside a directory mount point, or the file mount point itself.
fn view_path(image: &Path, mountpoint: &Path) -> PathBuf {
    match (mountpoint.is_dir(), image.file_name()) {
        (true, Some(name)) => mountpoint.join(name),
        _ => mountpoint.to_path_buf(),
    }
}

/// A live mount; unmounted when dropped (suspended requests are released first, as at any
/// shutdown). See the module doc.
pub struct Mounted {
    control: Arc<Control>,
    shutdown: Shutdown,
    server: Option<JoinHandle<Result<(), Error>>>,
    view: PathBuf,
    mountpoint: PathBuf,
    _config_file: Option<tempfile::NamedTempFile>,
    /// Removed after the unmount (fields drop after `Drop::drop` ran).
    _temp_dir: Option<tempfile::TempDir>,
}

impl Mounted {
    /// The file clients open: the faulty view of the image.
    pub fn view(&self) -> &Path {
        &self.view
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// The mount's control endpoint (what `.control` and `--control` serve).
    pub fn control(&self) -> &Arc<Control> {
        &self.control
    }

    /// Runs any control command (`help` lists them), as `blkdebugfs ctl MNT LINE` does, and
    /// returns its reply once it took effect (`wait_break` blocks until its break or
    /// timeout). A refusal is an [`Error::Command`] with the command's errno.
    pub fn ctl(&self, line: &str) -> Result<String, Error> {
        let (tx, rx) = mpsc::channel();
        self.control.run(
            line,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv()
            .unwrap_or_else(|_| Err(shutting_down()))
            .map_err(Error::Command)
    }

    /// Adds a rule (text as `--rule` takes it, or typed) and returns its number.
    pub fn add_rule(&self, rule: impl Into<RuleSpec>) -> Result<RuleId, Error> {
        let rule = match rule.into() {
            RuleSpec::Typed(rule) => rule,
            RuleSpec::Text(text) => {
                let set = RuleSet::load(None, &[CliRule::new("--rule", text.clone())])?;
                match <[Rule; 1]>::try_from(set.rules) {
                    Ok([rule]) => Rule {
                        origin: Origin::Runtime,
                        ..rule
                    },
                    Err(_) => {
                        return Err(Error::Usage(format!("'{text}' is not one rule")));
                    }
                }
            }
        };
        crate::config::check_write_cache(
            std::slice::from_ref(&rule),
            self.control.mount().has_write_cache(),
        )?;
        Ok(self.control.mount().add_rule(rule))
    }

    /// Deletes rule `id` (or breakpoint); the rule, or `None` if there was none.
    pub fn remove(&self, id: RuleId) -> Option<Rule> {
        self.control.mount().remove_rule(id)
    }

    /// QEMU's `break EVENT TAG`: suspends the next request that fires `event` under `tag`.
    pub fn break_on(&self, event: Event, tag: &str) -> RuleId {
        self.control.mount().add_rule(Rule {
            event: Some(event),
            state: 0,
            action: Action::Suspend {
                tag: tag.to_string(),
            },
            origin: Origin::Runtime,
        })
    }

    /// Waits until a request is suspended under `tag`; after `timeout`, an
    /// [`Error::Command`] with ETIMEDOUT.
    pub fn wait_break(&self, tag: &str, timeout: Option<Duration>) -> Result<(), Error> {
        let (tx, rx) = mpsc::channel();
        self.control.mount().wait_for_break(
            tag,
            timeout,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        match rx.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(libc::ETIMEDOUT)) => Err(Error::Command(CtlError {
                errno: libc::ETIMEDOUT,
                message: format!("no request was suspended under '{tag}' in time"),
            })),
            _ => Err(Error::Command(shutting_down())),
        }
    }

    /// Resumes the newest request suspended under `tag`; `false` if there is none.
    pub fn resume(&self, tag: &str) -> bool {
        self.control.mount().resume(tag)
    }

    /// Resumes every suspended request; how many continued.
    pub fn resume_all(&self) -> usize {
        self.control.mount().resume_all()
    }

    pub fn state(&self) -> i64 {
        self.control.mount().state()
    }

    pub fn set_state(&self, state: i64) {
        self.control.mount().set_state(state);
    }

    /// Requests and bytes per operation, faults per action.
    pub fn stats(&self) -> Snapshot {
        self.control.mount().stats()
    }

    /// Every live rule and breakpoint, in written order, with its counters.
    pub fn rules(&self) -> Vec<RuleStatus> {
        self.control.mount().rules()
    }

    /// The seed of every random choice (the one given, or the one drawn).
    pub fn seed(&self) -> u64 {
        self.control.mount().seed()
    }

    /// Unmounts now and says how the mount ended (dropping does the same, silently).
    pub fn unmount(mut self) -> Result<(), Error> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), Error> {
        self.shutdown.trigger();
        match self.server.take().map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(Error::Usage("the mount thread panicked".into())),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            log::warn!("unmounting {}: {e}", self.mountpoint.display());
        }
    }
}

fn shutting_down() -> CtlError {
    CtlError {
        errno: libc::ESHUTDOWN,
        message: "the mount is shutting down".into(),
    }
}
