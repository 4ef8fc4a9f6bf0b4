//! Image locking, QEMU's way, so that QEMU, `qemu-img`, `qemu-io` and a second blkdebugfs
//! mount see that an image is in use (`--force-share` skips it).
//!
//! QEMU's file driver (`block/file-posix.c`: `raw_apply_lock_bytes`, `raw_check_lock_bytes`)
//! marks an open image with shared (`F_RDLCK`) open-file-description locks, one byte per
//! block permission: byte `100 + i` while it *has* permission bit `i`, byte `200 + i` while
//! it *does not share* it. The bits (`include/block/block-common.h`, QEMU 10) are:
//! `consistent read` (0), `write` (1), `write unchanged` (2), `resize` (3). Opening, it
//! takes its bytes and then tests with `F_OFD_GETLK` for a write lock: for each permission
//! it wants, whether anyone locks `200 + i` (someone refuses to share it: `Failed to get
//! "write" lock`); for each it does not share, whether anyone locks `100 + i` (someone has
//! it: `Failed to get shared "write" lock`). Shared locks never conflict with each other,
//! so only these tests refuse.
//!
//! A mount takes what a QEMU 10 guest disk takes (measured on a paused VM with a
//! virtio-blk disk): permissions `consistent read` and `write` (bytes 100, 101) and not
//! sharing `write` (byte 201); a read-only one has `consistent read` only (bytes 100,
//! 201); a `--growable` one also has `resize` (byte 103). So, as against that VM, a writing
//! `qemu-io` or VM is refused with `Failed to get "write" lock`, `qemu-io -r`,
//! `qemu-img info` and `-U` readers go on, and read-only mounts coexist with each other but
//! not with a writing one.
//!
//! The locks live on a descriptor of their own (open-file-description locks are not lost
//! when another descriptor of the same file is closed) and go with it: on drop, or when
//! the process ends however it ends.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

/// QEMU's block permissions, a bit each (`BLK_PERM_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Perms(u8);

impl Perms {
    #[cfg(test)]
    pub const NONE: Perms = Perms(0);
    pub const CONSISTENT_READ: Perms = Perms(0x1);
    pub const WRITE: Perms = Perms(0x2);
    pub const WRITE_UNCHANGED: Perms = Perms(0x4);
    pub const RESIZE: Perms = Perms(0x8);
    pub const ALL: Perms = Perms(0xf);

    #[cfg(test)]
    pub fn contains(self, other: Perms) -> bool {
        self.0 & other.0 == other.0
    }

    /// Bit `i` of each permission in `self`, with QEMU's name for it.
    fn bits(self) -> impl Iterator<Item = (i64, &'static str)> {
        NAMES
            .iter()
            .enumerate()
            .filter(move |(i, _)| self.0 & (1 << i) != 0)
            .map(|(i, name)| (i as i64, *name))
    }
}

impl std::ops::BitOr for Perms {
    type Output = Perms;
    fn bitor(self, other: Perms) -> Perms {
        Perms(self.0 | other.0)
    }
}

impl std::ops::Not for Perms {
    type Output = Perms;
    fn not(self) -> Perms {
        Perms(!self.0 & Perms::ALL.0)
    }
}

/// `bdrv_perm_names`, by bit.
const NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
/// `RAW_LOCK_PERM_BASE` and `RAW_LOCK_SHARED_BASE`.
const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// The permissions a mount has and shares (see the module doc).
pub fn mount_perms(read_only: bool, growable: bool) -> (Perms, Perms) {
    let mut have = Perms::CONSISTENT_READ;
    if !read_only {
        have = have | Perms::WRITE;
    }
    if growable && !read_only {
        have = have | Perms::RESIZE;
    }
    let shared = Perms::CONSISTENT_READ | Perms::WRITE_UNCHANGED | Perms::RESIZE;
    (have, shared)
}

/// Why the image could not be locked.
#[derive(Debug)]
pub enum LockError {
    /// Another user's locks conflict: QEMU's own words (`Failed to get "write" lock`).
    Conflict(String),
    /// This filesystem or kernel has no open-file-description locks (QEMU then goes on
    /// without locking, as its `locking=auto` does).
    Unsupported(io::Error),
    /// Opening or locking failed otherwise.
    Io(io::Error),
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::Conflict(what) => f.write_str(what),
            LockError::Unsupported(e) => write!(f, "image locks are not supported here ({e})"),
            LockError::Io(e) => write!(f, "cannot lock: {e}"),
        }
    }
}

/// QEMU's locks on an image, held until dropped.
#[derive(Debug)]
pub struct ImageLock {
    /// Holds the locks (closing it releases them).
    _file: File,
}

impl ImageLock {
    /// Takes the bytes for `have` and not-`shared` and checks that no one else's conflict,
    /// as QEMU does when it opens `path`.
    pub fn acquire(path: &Path, have: Perms, shared: Perms) -> Result<ImageLock, LockError> {
        let file = File::open(path).map_err(LockError::Io)?;
        let fd = file.as_raw_fd();
        let wanted = have
            .bits()
            .map(|(i, name)| (PERM_BASE + i, SHARED_BASE + i, format!("\"{name}\"")));
        let unshared = (!shared)
            .bits()
            .map(|(i, name)| (SHARED_BASE + i, PERM_BASE + i, format!("shared \"{name}\"")));
        let bytes: Vec<(i64, i64, String)> = wanted.chain(unshared).collect();
        for (take, _, what) in &bytes {
            set_shared_lock(fd, *take).map_err(|e| match e.raw_os_error() {
                // Someone holds a write lock there (QEMU never does; another program may).
                Some(libc::EAGAIN | libc::EACCES) => {
                    LockError::Conflict(format!("Failed to get {what} lock"))
                }
                _ => classify(e),
            })?;
        }
        for (_, test, what) in &bytes {
            if write_lock_held(fd, *test).map_err(classify)? {
                return Err(LockError::Conflict(format!("Failed to get {what} lock")));
            }
        }
        Ok(ImageLock { _file: file })
    }
}

/// Errors that say "no such locks here" apart from real failures.
fn classify(e: io::Error) -> LockError {
    match e.raw_os_error() {
        Some(libc::EINVAL | libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS) => {
            LockError::Unsupported(e)
        }
        _ => LockError::Io(e),
    }
}

fn flock_at(kind: i32, byte: i64) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value (and l_pid must be 0 for
    // the OFD commands).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

/// `qemu_lock_fd(fd, byte, 1, false)`.
fn set_shared_lock(fd: i32, byte: i64) -> io::Result<()> {
    let fl = flock_at(libc::F_RDLCK, byte);
    // SAFETY: fcntl reads the flock we own.
    if unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `qemu_lock_fd_test(fd, byte, 1, true)`: whether anyone else's lock on `byte` would
/// refuse a write lock.
fn write_lock_held(fd: i32, byte: i64) -> io::Result<bool> {
    let mut fl = flock_at(libc::F_WRLCK, byte);
    // SAFETY: fcntl reads and fills the flock we own.
    if unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// The other processes that hold `path` open with locks on it (best effort, from
/// `/proc/PID/fdinfo`): `qemu-system-x86 pid 1234`. For messages only.
pub fn holders(path: &Path) -> Vec<String> {
    let Ok(md) = std::fs::metadata(path) else {
        return Vec::new();
    };
    let same = |other: &std::fs::Metadata| {
        if md.file_type().is_block_device() {
            other.file_type().is_block_device() && other.rdev() == md.rdev()
        } else {
            other.dev() == md.dev() && other.ino() == md.ino()
        }
    };
    let me = std::process::id();
    let mut found = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in procs.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        let holds = fds.flatten().any(|fd| {
            std::fs::metadata(fd.path()).is_ok_and(|m| same(&m))
                && std::fs::read_to_string(entry.path().join("fdinfo").join(fd.file_name()))
                    .is_ok_and(|info| info.contains("lock:"))
        });
        if holds {
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            found.push(format!("{} pid {pid}", comm.trim()));
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes someone holds on `path`, as another open file sees them.
    fn locked_bytes(path: &Path) -> Vec<i64> {
        let probe = File::open(path).unwrap();
        (0..300)
            .filter(|&b| write_lock_held(probe.as_raw_fd(), b).unwrap())
            .collect()
    }

    fn image() -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(1 << 20).unwrap();
        f
    }

    fn lock(path: &Path, read_only: bool) -> Result<ImageLock, LockError> {
        let (have, shared) = mount_perms(read_only, false);
        ImageLock::acquire(path, have, shared)
    }

    fn conflict(r: Result<ImageLock, LockError>) -> String {
        match r {
            Err(LockError::Conflict(what)) => what,
            other => panic!("expected a conflict, got {other:?}"),
        }
    }

    /// The bytes a paused QEMU 10 VM holds for a writable and a read-only virtio-blk disk
    /// (read off /proc/locks): 100-101 and 201, and 100 and 201.
    #[test]
    fn a_mount_locks_the_bytes_a_qemu_guest_disk_locks() {
        let img = image();
        let writer = lock(img.path(), false).unwrap();
        assert_eq!(locked_bytes(img.path()), vec![100, 101, 201]);
        drop(writer);
        assert_eq!(
            locked_bytes(img.path()),
            Vec::<i64>::new(),
            "released on drop"
        );
        let _reader = lock(img.path(), true).unwrap();
        assert_eq!(locked_bytes(img.path()), vec![100, 201]);
        let (have, shared) = mount_perms(false, true);
        assert!(have.contains(Perms::RESIZE) && shared.contains(Perms::RESIZE));
    }

    /// Two writers, or a writer and a reader, refuse each other with QEMU's messages;
    /// readers coexist. (Open-file-description locks conflict inside one process too.)
    #[test]
    fn writers_exclude_each_other_and_readers_coexist() {
        let img = image();
        let writer = lock(img.path(), false).unwrap();
        assert_eq!(
            conflict(lock(img.path(), false)),
            "Failed to get \"write\" lock"
        );
        assert_eq!(
            conflict(lock(img.path(), true)),
            "Failed to get shared \"write\" lock"
        );
        drop(writer);
        let r1 = lock(img.path(), true).unwrap();
        let r2 = lock(img.path(), true).unwrap();
        assert_eq!(
            conflict(lock(img.path(), false)),
            "Failed to get \"write\" lock"
        );
        drop((r1, r2));
        lock(img.path(), false).unwrap();
    }

    #[test]
    fn permission_sets_complement_within_qemus_bits() {
        assert_eq!(!Perms::ALL, Perms::NONE);
        assert_eq!(
            (!(Perms::CONSISTENT_READ | Perms::WRITE_UNCHANGED | Perms::RESIZE))
                .bits()
                .collect::<Vec<_>>(),
            vec![(1, "write")]
        );
    }
}
