//! The run (`spec/explore.md` §1, §3, §4): record a workload through the view, then check
//! the states, with a line per epoch, the first failure and the command that rebuilds it.
//!
//! Every temporary thing (the image's working copy, mount points, loop devices, mounted
//! filesystems, child processes) is an RAII guard, so an error or a panic anywhere leaves
//! nothing behind; a check's whole process group is killed at its timeout.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal};
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use log::{debug, warn};
use parking_lot::Mutex;

use super::enumerate::{Kind, Shape, parse_id};
use super::recording::Recording;
use super::serve::{Slot, Slots, StatesMount};
use super::states::{self, Planned, Priors};
use crate::media::record::{ImageInfo, data_blocks, image_hash};

/// `--fs TYPE[:OPTIONS]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsSpec {
    pub kind: String,
    pub options: Option<String>,
}

impl FsSpec {
    pub fn parse(text: &str) -> Result<FsSpec, String> {
        let (kind, options) = match text.split_once(':') {
            Some((k, o)) => (k, Some(o.to_string()).filter(|o| !o.is_empty())),
            None => (text, None),
        };
        if kind.is_empty() || !kind.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(format!(
                "--fs {text}: TYPE must be a filesystem name such as ext4"
            ));
        }
        Ok(FsSpec {
            kind: kind.to_string(),
            options,
        })
    }

    /// The filesystem's own read-only checker (`None`: none known, or `--no-fsck`).
    fn fsck(&self, dev: &str) -> Option<Vec<String>> {
        let args: &[&str] = match self.kind.as_str() {
            "ext2" | "ext3" | "ext4" => &["e2fsck", "-fn"],
            "xfs" => &["xfs_repair", "-n"],
            "btrfs" => &["btrfs", "check", "--readonly"],
            _ => return None,
        };
        let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        v.push(dev.to_string());
        Some(v)
    }
}

/// Everything `explore` takes.
#[derive(Clone, Debug)]
pub struct ExploreOptions {
    pub image: Option<PathBuf>,
    pub workload: Option<String>,
    pub check: Option<String>,
    pub fs: Option<FsSpec>,
    pub setup: Option<String>,
    pub record: Option<PathBuf>,
    pub from: Option<PathBuf>,
    pub base: Option<PathBuf>,
    pub seed: Option<u64>,
    pub jobs: usize,
    pub per_epoch: usize,
    pub budget: Option<Duration>,
    pub kinds: Vec<Kind>,
    pub stop_at_first: bool,
    /// `(K, N)`: the K-th (1-based) of N slices.
    pub shard: Option<(usize, usize)>,
    pub report: Option<PathBuf>,
    pub timeout: Duration,
    pub no_fsck: bool,
    pub state: Option<String>,
    pub image_out: Option<PathBuf>,
    /// The disk's atomic write unit in bytes (`--physical-sector`, default 512).
    pub physical_sector: u64,
}

/// How a run ended when it ran to its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No state failed (exit 0).
    Clean,
    /// A state failed (exit 1).
    Failed,
}

/// Why a run could not run (exit 2) or broke (exit 3).
#[derive(Debug)]
pub enum ExploreError {
    Usage(String),
    Run(String),
}

impl ExploreError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ExploreError::Usage(_) => 2,
            ExploreError::Run(_) => 3,
        }
    }
}

impl std::fmt::Display for ExploreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExploreError::Usage(m) | ExploreError::Run(m) => f.write_str(m),
        }
    }
}

fn run_err(what: &str) -> impl FnOnce(io::Error) -> ExploreError + '_ {
    move |e| ExploreError::Run(format!("{what}: {e}"))
}

/// Runs `explore` as the options say; prints as it goes.
pub fn run(opts: ExploreOptions) -> Result<Outcome, ExploreError> {
    validate(&opts)?;
    let work = tempfile::Builder::new()
        .prefix("blkdebugfs-explore.")
        .tempdir()
        .map_err(run_err("cannot make a working directory"))?;
    let seed = opts.seed.unwrap_or_else(crate::random_seed);
    let (rec_dir, verified_base) = match &opts.from {
        Some(dir) => (dir.clone(), None),
        None => {
            let dir = match &opts.record {
                Some(d) => std::path::absolute(d).map_err(run_err("--record"))?,
                None => work.path().join("recording"),
            };
            let base = record(&opts, work.path(), &dir, seed)?;
            (dir, Some(base))
        }
    };
    let rec = Arc::new(Recording::open(&rec_dir).map_err(|e| ExploreError::Usage(e.to_string()))?);
    let base_path = match (&verified_base, &opts.base, &opts.image) {
        (Some(p), _, _) => p.clone(),
        (None, Some(p), _) | (None, None, Some(p)) => p.clone(),
        (None, None, None) => rec.image.path.clone(),
    };
    let base_file = File::open(&base_path).map_err(|e| {
        ExploreError::Usage(format!(
            "the recording's base image {}: {e} (--base PATH names a copy)",
            base_path.display()
        ))
    })?;
    if verified_base.is_none() {
        let hash = image_hash(&base_file).map_err(run_err("hashing the base image"))?;
        if hash != rec.image.hash {
            return Err(ExploreError::Usage(format!(
                "{} is not the image the recording {} was made over (its content changed \
                 since, or it is another image; --base PATH names the right copy)",
                base_path.display(),
                rec_dir.display()
            )));
        }
    }
    let base_file = Arc::new(base_file);
    let priors = Arc::new(Priors::new(rec.clone(), opts.physical_sector));

    if let Some(id) = &opts.state {
        return one_state(
            &opts,
            &rec,
            &priors,
            &base_file,
            id,
            seed,
            work.path(),
            &rec_dir,
        );
    }
    let Some(check) = opts.check.clone() else {
        return Err(ExploreError::Usage(
            "explore needs --check CMD (or --state ID --image-out FILE)".into(),
        ));
    };
    let started = Instant::now();
    let list = states::plan(
        &rec,
        &base_file,
        &states::Options {
            seed,
            per_epoch: opts.per_epoch,
            kinds: opts.kinds.clone(),
            unit: opts.physical_sector,
        },
    )
    .map_err(run_err("building the crash states"))?;
    let skipped_total: usize = list.skipped.iter().sum();
    let mut planned: Vec<Planned> = list.states;
    if let Some((k, n)) = opts.shard {
        planned = planned
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % n == k - 1)
            .map(|(_, p)| p)
            .collect();
    }
    println!(
        "explore: {} epochs, {} writes, {} marks; {} states to check{}, {} duplicates skipped \
         (seed {seed}, planned in {:.2}s)",
        rec.epochs.len(),
        rec.writes(),
        rec.marks.len(),
        planned.len(),
        opts.shard
            .map_or(String::new(), |(k, n)| format!(" in shard {k}/{n}")),
        skipped_total,
        started.elapsed().as_secs_f64()
    );
    let checker = Checker {
        check,
        fs: opts.fs.clone(),
        no_fsck: opts.no_fsck,
        timeout: opts.timeout,
        marks: rec.marks.clone(),
    };
    let results = check_all(
        &opts,
        &rec,
        &priors,
        &base_file,
        &planned,
        &checker,
        work.path(),
        &list.skipped,
    )?;
    report(
        &opts,
        &rec,
        &rec_dir,
        seed,
        &planned,
        &results,
        &list.skipped,
        started,
    )
}

fn validate(opts: &ExploreOptions) -> Result<(), ExploreError> {
    let usage = |m: &str| Err(ExploreError::Usage(m.to_string()));
    if opts.from.is_none() {
        if opts.image.is_none() {
            return usage("explore needs IMAGE (or --from DIR to explore a recording)");
        }
        if opts.workload.is_none() {
            return usage("explore needs --workload CMD (or --from DIR to explore a recording)");
        }
    } else if opts.workload.is_some() || opts.setup.is_some() || opts.record.is_some() {
        return usage("--from explores a recording: --workload, --setup and --record make one");
    }
    if opts.image_out.is_some() && opts.state.is_none() {
        return usage("--image-out needs --state ID");
    }
    if opts.state.is_some() && opts.image_out.is_none() && opts.check.is_none() {
        return usage("--state ID needs --image-out FILE or --check CMD");
    }
    if let Some(id) = &opts.state
        && parse_id(id).is_none()
    {
        return Err(ExploreError::Usage(format!(
            "--state {id}: an ID is EPOCH.KIND.N, e.g. 12.omit.3"
        )));
    }
    if opts.physical_sector < 512
        || !opts.physical_sector.is_power_of_two()
        || opts.physical_sector > 1 << 20
    {
        return Err(ExploreError::Usage(format!(
            "--physical-sector {}: a power of two from 512 to 1M bytes",
            opts.physical_sector
        )));
    }
    if opts.jobs == 0 {
        return usage("--jobs must be at least 1");
    }
    if opts.kinds.is_empty() {
        return usage("--strategies names no kind");
    }
    if let Some((k, n)) = opts.shard
        && (n == 0 || k == 0 || k > n)
    {
        return usage("--shard K/N needs 1 <= K <= N");
    }
    if let Some(fs) = &opts.fs {
        which(&["mount", "umount", "losetup"])?;
        if !opts.no_fsck
            && let Some(cmd) = fs.fsck("/dev/null")
        {
            which(&[cmd[0].as_str()])?;
        }
    }
    Ok(())
}

fn which(tools: &[&str]) -> Result<(), ExploreError> {
    for tool in tools {
        let found = std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(tool).is_file()));
        if !found {
            return Err(ExploreError::Usage(format!("{tool} is not installed")));
        }
    }
    Ok(())
}

// ---- Recording.

/// Records the workload into `dir`; returns the base image (IMAGE, already hashed).
fn record(
    opts: &ExploreOptions,
    work: &Path,
    dir: &Path,
    seed: u64,
) -> Result<PathBuf, ExploreError> {
    let image = opts.image.clone().expect("validated");
    let source = File::open(&image)
        .map_err(|e| ExploreError::Usage(format!("image {}: {e}", image.display())))?;
    if !source.metadata().map_err(run_err("image"))?.is_file() {
        return Err(ExploreError::Usage(format!(
            "image {}: explore needs a regular file",
            image.display()
        )));
    }
    let info = ImageInfo {
        path: std::fs::canonicalize(&image).unwrap_or(image.clone()),
        size: source.metadata().map_err(run_err("image"))?.len(),
        hash: image_hash(&source).map_err(run_err("hashing the image"))?,
    };
    // IMAGE is never changed: the view works on a sparse copy.
    let name = image
        .file_name()
        .map_or("disk.img".into(), |n| n.to_owned());
    let copy_dir = work.join("copy");
    std::fs::create_dir(&copy_dir).map_err(run_err("working directory"))?;
    let copy = copy_dir.join(&name);
    sparse_copy(&source, &copy).map_err(run_err("copying the image"))?;
    let view_dir = work.join("view");
    std::fs::create_dir(&view_dir).map_err(run_err("working directory"))?;
    let record = crate::mount::RecordSetup {
        dir: dir.to_path_buf(),
        image: Some(info),
        start_now: false,
    };
    let mounted = crate::Builder::new(&copy)
        .mountpoint(&view_dir)
        .seed(seed)
        .options(move |o| o.record = Some(record))
        .mount()
        .map_err(|e| ExploreError::Run(format!("mounting the view: {e}")))?;
    let view = mounted.view().to_path_buf();
    let scratch = work.join("scratch");
    std::fs::create_dir(&scratch).map_err(run_err("working directory"))?;
    let mut env: Vec<(&str, String)> = vec![
        ("BLKDEBUGFS_VIEW", view.display().to_string()),
        ("BLKDEBUGFS_MNT", view_dir.display().to_string()),
    ];
    let log = work.join("workload.log");
    let mut cwd = scratch.clone();
    let loop_dev = match &opts.fs {
        Some(_) => {
            let dev = LoopDev::attach(&view).map_err(run_err("attaching a loop device"))?;
            env.push(("BLKDEBUGFS_DEV", dev.dev.clone()));
            Some(dev)
        }
        None => None,
    };
    if let Some(setup) = &opts.setup {
        // The setup runs where explore was started (it may want files from there); the
        // workload and the checks run in the filesystem (or a scratch directory).
        let here = std::env::current_dir().unwrap_or(scratch.clone());
        let r = run_sh(setup, &here, &env, None, &log).map_err(run_err("running --setup"))?;
        if r.rc != Some(0) {
            return Err(ExploreError::Run(format!(
                "--setup exited {}:\n{}",
                rc_text(&r),
                r.tail
            )));
        }
    }
    let fs_mount = match (&opts.fs, &loop_dev) {
        (Some(fs), Some(dev)) => {
            let dir = work.join("fs");
            std::fs::create_dir(&dir).map_err(run_err("working directory"))?;
            let m = FsMount::mount(fs, &dev.dev, &dir)
                .map_err(|e| ExploreError::Run(format!("mounting the filesystem: {e}")))?;
            env.push(("BLKDEBUGFS_FS", dir.display().to_string()));
            cwd = dir;
            // What the mount wrote (a journal, a mount count) belongs to the base too.
            sync_fs(&m.dir);
            Some(m)
        }
        _ => None,
    };
    // Everything before this moment is the base: what the filesystem and the loop device
    // still hold in memory goes to the view first.
    if let Some(m) = &fs_mount {
        sync_fs(&m.dir);
    }
    if let Some(dev) = &loop_dev {
        dev.sync();
    }
    mounted
        .ctl("record start")
        .map_err(|e| ExploreError::Run(format!("starting the recording: {e}")))?;
    let workload = opts.workload.as_deref().expect("validated");
    let r = run_sh(workload, &cwd, &env, None, &log).map_err(run_err("running --workload"))?;
    mounted
        .ctl("record stop")
        .map_err(|e| ExploreError::Run(format!("stopping the recording: {e}")))?;
    if r.rc != Some(0) {
        return Err(ExploreError::Run(format!(
            "--workload exited {}:\n{}",
            rc_text(&r),
            r.tail
        )));
    }
    drop(fs_mount);
    drop(loop_dev);
    mounted
        .unmount()
        .map_err(|e| ExploreError::Run(format!("unmounting the view: {e}")))?;
    Ok(image)
}

/// Copies `source` to a new sparse file `to`: only its data, zero blocks left as holes.
fn sparse_copy(source: &File, to: &Path) -> io::Result<()> {
    let out = OpenOptions::new().write(true).create_new(true).open(to)?;
    let size = source.metadata()?.len();
    out.set_len(size)?;
    data_blocks(source, size, |at, bytes| out.write_all_at(bytes, at))
}

fn sync_fs(dir: &Path) {
    if let Ok(f) = File::open(dir) {
        use std::os::fd::AsRawFd;
        // SAFETY: syncfs on a descriptor we own.
        unsafe { libc::syncfs(f.as_raw_fd()) };
    }
}

// ---- One state.

#[allow(clippy::too_many_arguments)]
fn one_state(
    opts: &ExploreOptions,
    rec: &Arc<Recording>,
    priors: &Arc<Priors>,
    base_file: &Arc<File>,
    id: &str,
    seed: u64,
    work: &Path,
    rec_dir: &Path,
) -> Result<Outcome, ExploreError> {
    let (epoch, kind, n) = parse_id(id).expect("validated");
    let Some(e) = rec.epochs.get(epoch) else {
        return Err(ExploreError::Usage(format!(
            "--state {id}: the recording has {} epochs (0 to {})",
            rec.epochs.len(),
            rec.epochs.len().saturating_sub(1)
        )));
    };
    let units = states::epoch_units(rec, epoch, opts.physical_sector);
    let shape = Shape {
        epoch,
        units: &units,
        seed,
    };
    let Some(candidate) = shape.candidate(kind, n) else {
        return Err(ExploreError::Usage(format!(
            "--state {id}: epoch {epoch} has no such state"
        )));
    };
    let state = priors.state(base_file, &candidate);
    if let Some(out) = &opts.image_out {
        refuse_overwriting_inputs(out, base_file, rec)?;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(out)
            .map_err(|e| ExploreError::Usage(format!("--image-out {}: {e}", out.display())))?;
        state
            .write_image(&f)
            .map_err(run_err("writing the state"))?;
        println!("wrote {id} ({} bytes) to {}", state.size(), out.display());
        if opts.check.is_none() {
            return Ok(Outcome::Clean);
        }
    }
    let marks = match kind {
        Kind::Full if epoch + 1 == rec.epochs.len() => rec.marks.len(),
        _ => e.marks,
    };
    let planned = vec![Planned {
        candidate,
        hash: None,
        marks,
    }];
    let checker = Checker {
        check: opts.check.clone().expect("validated"),
        fs: opts.fs.clone(),
        no_fsck: opts.no_fsck,
        timeout: opts.timeout,
        marks: rec.marks.clone(),
    };
    let results = check_all(opts, rec, priors, base_file, &planned, &checker, work, &[])?;
    report(
        opts,
        rec,
        rec_dir,
        seed,
        &planned,
        &results,
        &[],
        Instant::now(),
    )
}

/// `--image-out` must not name the base image or a file of the recording: opening it for
/// writing would truncate what the state is read from.
fn refuse_overwriting_inputs(out: &Path, base: &File, rec: &Recording) -> Result<(), ExploreError> {
    use std::os::unix::fs::MetadataExt;
    let Ok(target) = std::fs::metadata(out) else {
        return Ok(());
    };
    let same = |md: &std::fs::Metadata| md.dev() == target.dev() && md.ino() == target.ino();
    let base_is_it = base.metadata().is_ok_and(|md| same(&md));
    let rec_has_it = std::fs::read_dir(&rec.dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.metadata().is_ok_and(|md| same(&md)))
    });
    if base_is_it || rec_has_it {
        return Err(ExploreError::Usage(format!(
            "--image-out {} is the {} the state is read from: name another file",
            out.display(),
            if base_is_it {
                "base image"
            } else {
                "recording"
            }
        )));
    }
    Ok(())
}

// ---- Checking.

/// How a state fared.
#[derive(Clone, Debug)]
pub struct Checked {
    pub result: Verdict,
    pub rc: Option<i32>,
    pub tail: String,
    pub seconds: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    Unmountable,
    Fsck,
    Timeout,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Unmountable => "unmountable",
            Verdict::Fsck => "fsck",
            Verdict::Timeout => "timeout",
        }
    }
}

struct Checker {
    check: String,
    fs: Option<FsSpec>,
    no_fsck: bool,
    timeout: Duration,
    marks: Vec<String>,
}

/// One worker's slot: its state file, loop device and mount point.
struct Worker {
    k: usize,
    file: PathBuf,
    /// Replaced when a check leaves its filesystem busy (see `Checker::check`). Only this
    /// worker's thread takes the lock.
    dev: Mutex<Option<LoopDev>>,
    fs_dir: PathBuf,
    marks_file: PathBuf,
    scratch: PathBuf,
    log: PathBuf,
    states_dir: PathBuf,
}

impl Checker {
    fn check(&self, w: &Worker, p: &Planned) -> io::Result<Checked> {
        let started = Instant::now();
        let id = p.candidate.id();
        let required = &self.marks[..p.marks];
        let mut text = required.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        std::fs::write(&w.marks_file, text)?;
        let mut env: Vec<(&str, String)> = vec![
            ("BLKDEBUGFS_VIEW", w.file.display().to_string()),
            ("BLKDEBUGFS_MNT", w.states_dir.display().to_string()),
            ("BLKDEBUGFS_STATE", id),
            (
                "BLKDEBUGFS_ACKED",
                required.last().cloned().unwrap_or_default(),
            ),
            ("BLKDEBUGFS_MARKS", w.marks_file.display().to_string()),
        ];
        let done = |result, rc, tail| Checked {
            result,
            rc,
            tail,
            seconds: started.elapsed().as_secs_f64(),
        };
        let mut dev_slot = w.dev.lock();
        let (Some(fs), Some(dev)) = (&self.fs, dev_slot.as_ref()) else {
            let r = run_sh(&self.check, &w.scratch, &env, Some(self.timeout), &w.log)?;
            return Ok(done(verdict_of(&r), r.rc, r.tail));
        };
        dev.flush_buffers();
        env.push(("BLKDEBUGFS_DEV", dev.dev.clone()));
        env.push(("BLKDEBUGFS_FS", w.fs_dir.display().to_string()));
        let mut mounted = match FsMount::mount(fs, &dev.dev, &w.fs_dir) {
            Ok(m) => m,
            Err(why) => return Ok(done(Verdict::Unmountable, None, why)),
        };
        let r = run_sh(&self.check, &w.fs_dir, &env, Some(self.timeout), &w.log)?;
        if !mounted.release() {
            // Something the check started still holds the filesystem: it was detached, and
            // lives on on this loop device, where its writeback would land in the next
            // state. The next state gets a fresh device; this one goes when it is free.
            *dev_slot = Some(LoopDev::attach(&w.file)?);
            let tail = format!(
                "{}
(the filesystem stayed busy after the check, a process left in it: it \
                 was detached, not checked by fsck, and this worker's loop device replaced)",
                r.tail
            );
            return Ok(done(verdict_of(&r), r.rc, tail));
        }
        dev.flush_buffers();
        let verdict = verdict_of(&r);
        if verdict != Verdict::Pass || self.no_fsck {
            return Ok(done(verdict, r.rc, r.tail));
        }
        if let Some(cmd) = fs.fsck(&dev.dev) {
            let line = cmd.join(" ");
            let f = run_sh(&line, &w.scratch, &env, Some(self.timeout), &w.log)?;
            dev.flush_buffers();
            if f.rc != Some(0) {
                let tail = format!("{line} exited {}:\n{}", rc_text(&f), f.tail);
                let v = match f.timed_out {
                    true => Verdict::Timeout,
                    false => Verdict::Fsck,
                };
                return Ok(done(v, f.rc, tail));
            }
        }
        Ok(done(Verdict::Pass, r.rc, r.tail))
    }
}

fn verdict_of(r: &ShResult) -> Verdict {
    match (r.timed_out, r.rc) {
        (true, _) => Verdict::Timeout,
        (false, Some(0)) => Verdict::Pass,
        _ => Verdict::Fail,
    }
}

/// Checks `planned` with `--jobs` workers, in list order; returns each state's result
/// (`None`: not checked, past a failure with `--stop-at-first` or past `--budget`).
#[allow(clippy::too_many_arguments)]
fn check_all(
    opts: &ExploreOptions,
    rec: &Arc<Recording>,
    priors: &Arc<Priors>,
    base_file: &Arc<File>,
    planned: &[Planned],
    checker: &Checker,
    work: &Path,
    skipped: &[usize],
) -> Result<Vec<Option<Checked>>, ExploreError> {
    if planned.is_empty() {
        return Ok(Vec::new());
    }
    let jobs = opts.jobs.min(planned.len());
    let states_dir = work.join("states");
    std::fs::create_dir_all(&states_dir).map_err(run_err("working directory"))?;
    let slots = Slots::new(jobs, rec.size);
    let served = StatesMount::start(&states_dir, slots.clone(), jobs + 1).map_err(|e| {
        ExploreError::Run(format!(
            "serving the states at {}: {e}",
            states_dir.display()
        ))
    })?;
    wait_for_file(&served.path(0)).map_err(run_err("serving the states"))?;
    let mut workers = Vec::new();
    for k in 0..jobs {
        let dir = work.join(format!("job-{k}"));
        std::fs::create_dir_all(dir.join("fs")).map_err(run_err("working directory"))?;
        std::fs::create_dir_all(dir.join("scratch")).map_err(run_err("working directory"))?;
        let file = served.path(k);
        let dev = Mutex::new(match &checker.fs {
            Some(_) => Some(LoopDev::attach(&file).map_err(run_err("attaching a loop device"))?),
            None => None,
        });
        workers.push(Worker {
            k,
            file,
            dev,
            fs_dir: dir.join("fs"),
            marks_file: dir.join("marks"),
            scratch: dir.join("scratch"),
            log: dir.join("check.log"),
            states_dir: states_dir.clone(),
        });
    }
    let next = AtomicUsize::new(0);
    let first_failure = AtomicUsize::new(usize::MAX);
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let (tx, rx) = mpsc::channel::<(usize, io::Result<Checked>)>();
    let mut results: Vec<Option<Checked>> = vec![None; planned.len()];
    let mut error = None;
    std::thread::scope(|scope| {
        for w in &workers {
            let tx = tx.clone();
            let (next, first_failure, stop, slots) = (&next, &first_failure, &stop, &slots);
            scope.spawn(move || {
                loop {
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::AcqRel);
                    if i >= planned.len() {
                        return;
                    }
                    if opts.stop_at_first && i > first_failure.load(Ordering::Acquire) {
                        return;
                    }
                    if opts.budget.is_some_and(|b| started.elapsed() >= b) {
                        return;
                    }
                    let p = &planned[i];
                    slots.set(w.k, Some(Slot::new(priors.state(base_file, &p.candidate))));
                    let r = checker.check(w, p);
                    slots.set(w.k, None);
                    if let Ok(c) = &r
                        && c.result != Verdict::Pass
                    {
                        first_failure.fetch_min(i, Ordering::AcqRel);
                    }
                    if tx.send((i, r)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(tx);
        let mut printer = Printer::new(rec, planned, skipped, opts.shard.is_some());
        let tty = io::stderr().is_terminal();
        let mut last_progress = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_millis(250)) {
                Ok((i, Ok(c))) => {
                    results[i] = Some(c);
                    printer.advance(&results);
                }
                Ok((i, Err(e))) => {
                    error = Some(format!("checking {}: {e}", planned[i].candidate.id()));
                    stop.store(true, Ordering::Release);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if tty && last_progress.elapsed() >= Duration::from_millis(250) {
                last_progress = Instant::now();
                let done = results.iter().filter(|r| r.is_some()).count();
                let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3);
                eprint!(
                    "\r  {done}/{} states checked, {rate:.1}/s   ",
                    planned.len()
                );
            }
        }
        if tty {
            eprint!("\r\x1b[K");
        }
        printer.finish(&results);
    });
    drop(workers);
    drop(served);
    match error {
        Some(e) => Err(ExploreError::Run(e)),
        None => Ok(results),
    }
}

fn wait_for_file(path: &Path) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::fs::metadata(path) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Prints a line per epoch once all its states are checked, in epoch order.
struct Printer<'a> {
    rec: &'a Recording,
    planned: &'a [Planned],
    /// Duplicates skipped per epoch.
    skipped: &'a [usize],
    /// Index of the first state of the next epoch to print.
    at: usize,
    shard: bool,
}

impl<'a> Printer<'a> {
    fn new(
        rec: &'a Recording,
        planned: &'a [Planned],
        skipped: &'a [usize],
        shard: bool,
    ) -> Printer<'a> {
        Printer {
            rec,
            planned,
            skipped,
            at: 0,
            shard,
        }
    }

    /// The next epoch's states: `(epoch, end index)`, or `None` past the last.
    fn next_epoch(&self) -> Option<(usize, usize)> {
        let epoch = self.planned.get(self.at)?.candidate.epoch;
        let end = self.planned[self.at..]
            .iter()
            .position(|p| p.candidate.epoch != epoch)
            .map_or(self.planned.len(), |n| self.at + n);
        Some((epoch, end))
    }

    /// Prints every epoch whose states are all checked, in order.
    fn advance(&mut self, results: &[Option<Checked>]) {
        while let Some((epoch, end)) = self.next_epoch() {
            if results[self.at..end].iter().any(|r| r.is_none()) {
                return;
            }
            self.line(epoch, &results[self.at..end]);
            self.at = end;
        }
    }

    fn line(&self, epoch: usize, results: &[Option<Checked>]) {
        let checked: Vec<&Checked> = results.iter().flatten().collect();
        let failed = checked.iter().filter(|c| c.result != Verdict::Pass).count();
        let e = &self.rec.epochs[epoch];
        let skipped = match self.skipped.get(epoch) {
            Some(&n) if n > 0 => format!(", {n} duplicates skipped"),
            _ => String::new(),
        };
        println!(
            "epoch {epoch}: {} writes{}, {} states{} checked: {} passed, {failed} failed{skipped}",
            e.writes.len(),
            if e.closed {
                ""
            } else {
                " (no flush after them)"
            },
            checked.len(),
            if self.shard { " of this shard" } else { "" },
            checked.len() - failed,
        );
    }

    /// Prints the epochs left, those cut short by `--stop-at-first` or `--budget`.
    fn finish(&mut self, results: &[Option<Checked>]) {
        while let Some((epoch, end)) = self.next_epoch() {
            if results[self.at..end].iter().any(|r| r.is_some()) {
                self.line(epoch, &results[self.at..end]);
            }
            self.at = end;
        }
    }
}

// ---- The report.

#[allow(clippy::too_many_arguments)]
fn report(
    opts: &ExploreOptions,
    rec: &Recording,
    rec_dir: &Path,
    seed: u64,
    planned: &[Planned],
    results: &[Option<Checked>],
    skipped: &[usize],
    started: Instant,
) -> Result<Outcome, ExploreError> {
    let checked = results.iter().flatten().count();
    let failed: Vec<usize> = (0..planned.len())
        .filter(|&i| {
            results[i]
                .as_ref()
                .is_some_and(|c| c.result != Verdict::Pass)
        })
        .collect();
    let skipped_total: usize = skipped.iter().sum();
    if let Some(path) = &opts.report {
        let mut out = String::new();
        for (p, r) in planned.iter().zip(results) {
            let Some(c) = r else { continue };
            let line = serde_json::json!({
                "state": p.candidate.id(),
                "epoch": p.candidate.epoch,
                "kind": p.candidate.kind.name(),
                "writes": p.candidate.writes,
                "torn": p.candidate.tear.as_ref().map(|t| serde_json::json!({"write": t.write, "kept_sectors": t.kept})),
                "hash": p.hash.map(|h| format!("{h:032x}")),
                "marks": rec.marks[..p.marks].last(),
                "result": c.result.name(),
                "check_rc": c.rc,
                "check_tail": c.tail,
                "seconds": (c.seconds * 1000.0).round() / 1000.0,
            });
            out.push_str(&line.to_string());
            out.push('\n');
        }
        let per_epoch: BTreeMap<String, usize> = skipped
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(e, n)| (e.to_string(), *n))
            .collect();
        let summary = serde_json::json!({
            "summary": true,
            "states": checked,
            "failed": failed.len(),
            "skipped": skipped_total,
            "skipped_per_epoch": per_epoch,
            "unchecked": planned.len() - checked,
            "seed": seed,
            "recording": rec_dir.display().to_string(),
            "shard": opts.shard.map(|(k, n)| format!("{k}/{n}")),
            "seconds": (started.elapsed().as_secs_f64() * 1000.0).round() / 1000.0,
        });
        out.push_str(&summary.to_string());
        out.push('\n');
        std::fs::write(path, out)
            .map_err(|e| ExploreError::Usage(format!("--report {}: {e}", path.display())))?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{checked} states checked in {secs:.1}s ({:.1}/s): {} passed, {} failed{}; seed {seed}",
        checked as f64 / secs.max(1e-3),
        checked - failed.len(),
        failed.len(),
        match planned.len() - checked {
            0 => String::new(),
            n => format!(", {n} not checked (--stop-at-first or --budget)"),
        }
    );
    let Some(&first) = failed.first() else {
        return Ok(Outcome::Clean);
    };
    let p = &planned[first];
    let c = results[first].as_ref().expect("failed states were checked");
    let id = p.candidate.id();
    let what = match c.result {
        Verdict::Fail => format!(
            "the check exited {}",
            c.rc.map_or("?".into(), |r| r.to_string())
        ),
        Verdict::Unmountable => "the filesystem did not mount".into(),
        Verdict::Fsck => "the filesystem's checker found errors".into(),
        Verdict::Timeout => format!("the check ran past {}s", opts.timeout.as_secs_f64()),
        Verdict::Pass => unreachable!(),
    };
    println!(
        "FAILED: state {id} ({} of epoch {}: writes {:?} of {}{}; {} marks required): {what}",
        p.candidate.kind.name(),
        p.candidate.epoch,
        p.candidate.writes,
        rec.epochs[p.candidate.epoch].writes.len(),
        p.candidate
            .tear
            .as_ref()
            .map_or(String::new(), |t| format!(", write {} torn", t.write)),
        p.marks,
    );
    for line in c.tail.lines() {
        println!("  | {line}");
    }
    let kept = opts.record.is_some() || opts.from.is_some();
    let base = match &opts.base {
        Some(b) => format!(" --base {}", shell_quote(&b.display().to_string())),
        None => String::new(),
    };
    let unit = match opts.physical_sector {
        512 => String::new(),
        n => format!(" --physical-sector {n}"),
    };
    println!(
        "rebuild it: blkdebugfs explore --from {}{base}{unit} --seed {seed} --state {id} --image-out state.img{}",
        shell_quote(&rec_dir.display().to_string()),
        if kept {
            ""
        } else {
            "   (run with --record DIR to keep the recording)"
        }
    );
    Ok(Outcome::Failed)
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

// ---- Processes, loop devices, mounts.

struct ShResult {
    rc: Option<i32>,
    timed_out: bool,
    tail: String,
}

fn rc_text(r: &ShResult) -> String {
    match (r.timed_out, r.rc) {
        (true, _) => "(killed at its timeout)".into(),
        (false, Some(rc)) => rc.to_string(),
        (false, None) => "(killed by a signal)".into(),
    }
}

/// Lines of a command's output kept for the report.
const TAIL_LINES: usize = 20;

/// Runs `sh -c cmd` in `cwd` with `env`, its output (both streams) to `log`; kills its
/// whole process group at `timeout`.
fn run_sh(
    cmd: &str,
    cwd: &Path,
    env: &[(&str, String)],
    timeout: Option<Duration>,
    log: &Path,
) -> io::Result<ShResult> {
    let out = File::create(log)?;
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(cmd)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0);
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn()?;
    let pid = child.id() as i32;
    let started = Instant::now();
    // The leader is never reaped before its group is killed: until `wait` below, its pid,
    // and so the group's id, cannot be reused by another process (another worker's check).
    let mut timed_out = false;
    loop {
        if exited_unreaped(pid)? {
            break;
        }
        if timeout.is_some_and(|t| started.elapsed() >= t) {
            timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // Whatever the group still runs (a timed-out check, what a check left behind) dies.
    // SAFETY: signalling the process group we created, whose leader is not reaped yet.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let status = child.wait()?;
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n");
    Ok(ShResult {
        rc: status.code(),
        timed_out,
        tail,
    })
}

/// Whether child `pid` has exited, leaving it unreaped (`WNOWAIT`).
fn exited_unreaped(pid: i32) -> io::Result<bool> {
    // SAFETY: siginfo_t is plain old data; all-zero is its "nothing happened" value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own child, writing into `info`, which we own.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: si_pid is set by waitid (0 when the child has not changed state).
    Ok(unsafe { info.si_pid() } != 0)
}

/// A loop device over a file, detached on drop.
struct LoopDev {
    dev: String,
}

impl LoopDev {
    fn attach(file: &Path) -> io::Result<LoopDev> {
        let try_attach = |direct: bool| {
            let mut c = Command::new("losetup");
            if direct {
                c.arg("--direct-io=on");
            }
            c.args(["--show", "-f"]).arg(file).output()
        };
        let mut out = try_attach(true)?;
        if !out.status.success() {
            debug!(
                "losetup --direct-io=on failed ({}); without it",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            out = try_attach(false)?;
        }
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "losetup {}: {}",
                file.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(LoopDev {
            dev: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        })
    }

    /// Writes what the device's page cache holds to the view and waits for it.
    fn sync(&self) {
        if let Ok(f) = File::open(&self.dev) {
            let _ = f.sync_all();
        }
    }

    /// Drops the device's cached blocks (BLKFLSBUF), so the next state is read afresh.
    fn flush_buffers(&self) {
        use std::os::fd::AsRawFd;
        if let Ok(f) = File::open(&self.dev) {
            const BLKFLSBUF: libc::c_ulong = 0x1261;
            // SAFETY: BLKFLSBUF takes no argument; the descriptor is ours.
            unsafe { libc::ioctl(f.as_raw_fd(), BLKFLSBUF as _, 0) };
        }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        for _ in 0..50 {
            match Command::new("losetup").args(["-d", &self.dev]).output() {
                Ok(o) if o.status.success() => return,
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        warn!("could not detach {}", self.dev);
    }
}

/// A mounted filesystem, unmounted on drop.
struct FsMount {
    dir: PathBuf,
    released: bool,
}

impl FsMount {
    /// Mounts; `Err` with what `mount` printed.
    fn mount(fs: &FsSpec, dev: &str, dir: &Path) -> Result<FsMount, String> {
        let mut c = Command::new("mount");
        c.args(["-t", &fs.kind]);
        let mut options: Vec<&str> = fs.options.iter().map(String::as_str).collect();
        // Every state of a run is the same XFS filesystem (one UUID), and XFS refuses a
        // second mount of a UUID already mounted: with --jobs 2 two states are.
        if fs.kind == "xfs" && !options.iter().any(|o| o.split(',').any(|x| x == "nouuid")) {
            options.push("nouuid");
        }
        if !options.is_empty() {
            c.args(["-o", &options.join(",")]);
        }
        let out = c
            .arg(dev)
            .arg(dir)
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t {} {dev}: {}",
                fs.kind,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(FsMount {
            dir: dir.to_path_buf(),
            released: false,
        })
    }

    /// Unmounts (once): `true` when it went cleanly, `false` when the filesystem stayed
    /// busy for 2 s and was detached instead (it lives on until its last user goes).
    fn release(&mut self) -> bool {
        if std::mem::replace(&mut self.released, true) {
            return true;
        }
        let Ok(c) = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        for _ in 0..100 {
            // SAFETY: umount2 with a valid, NUL-terminated path.
            if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
                return true;
            }
            if io::Error::last_os_error().raw_os_error() != Some(libc::EBUSY) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        warn!("{} is busy: detaching it", self.dir.display());
        // SAFETY: as above.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        false
    }
}

impl Drop for FsMount {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_specs_parse() {
        assert_eq!(
            FsSpec::parse("ext4:commit=1,noauto_da_alloc").unwrap(),
            FsSpec {
                kind: "ext4".into(),
                options: Some("commit=1,noauto_da_alloc".into())
            }
        );
        assert_eq!(FsSpec::parse("xfs").unwrap().options, None);
        assert!(FsSpec::parse(":x").is_err());
        assert!(FsSpec::parse("ext4;rm").is_err());
    }
}
