//! Serving crash states as files (`spec/explore.md` §3): a small FUSE filesystem of its own,
//! a directory of slot files `state-K.img`, one per `--jobs` worker. A worker puts a state
//! in its slot, checks it through the file (a loop device, `sqlite3`, `qemu-img`), and
//! takes it out. Reads resolve through the state's layers (`overlay.rs`); writes (a
//! journal replay, `fsck -y`) go to the slot's copy-on-write sectors, dropped with the
//! state. Files are opened in direct-I/O mode, so no page cache outlives a state.
//!
//! Lock rule: a slot's lock is held to swap its state or to look it up; its copy-on-write
//! map's lock across one request's sectors (memory only, no I/O under it but reads of the
//! recording for a partly written sector).

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};
use log::{debug, warn};
use parking_lot::Mutex;

use super::overlay::StateImage;
use crate::engine::ranges::SECTOR;

const TTL: Duration = Duration::from_secs(0);
const ROOT: INodeNo = INodeNo(1);

/// A state in a slot, with the check's own writes.
pub struct Slot {
    pub image: StateImage,
    cow: Mutex<BTreeMap<u64, Box<[u8]>>>,
}

impl Slot {
    pub fn new(image: StateImage) -> Slot {
        Slot {
            image,
            cow: Mutex::new(BTreeMap::new()),
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.image.read(offset, buf)?;
        let end = offset + buf.len() as u64;
        let cow = self.cow.lock();
        for (&sector, bytes) in cow.range(offset / SECTOR..end.div_ceil(SECTOR)) {
            let (s, e) = (
                (sector * SECTOR).max(offset),
                ((sector + 1) * SECTOR).min(end),
            );
            if s < e {
                let from = (s - sector * SECTOR) as usize;
                buf[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&bytes[from..from + (e - s) as usize]);
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let end = offset + data.len() as u64;
        let mut cow = self.cow.lock();
        let mut sector = offset / SECTOR;
        while sector * SECTOR < end {
            let base = sector * SECTOR;
            let (s, e) = (base.max(offset), (base + SECTOR).min(end));
            let bytes = match cow.entry(sector) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    let mut bytes = vec![0u8; SECTOR as usize].into_boxed_slice();
                    // A partial sector starts from the state's bytes.
                    if e - s < SECTOR {
                        self.image.read(base, &mut bytes)?;
                    }
                    v.insert(bytes)
                }
            };
            bytes[(s - base) as usize..(e - base) as usize]
                .copy_from_slice(&data[(s - offset) as usize..(e - offset) as usize]);
            sector += 1;
        }
        Ok(())
    }
}

/// The slots, shared by the filesystem and the workers.
pub struct Slots {
    slots: Vec<Mutex<Option<Arc<Slot>>>>,
    size: u64,
}

impl Slots {
    pub fn new(count: usize, size: u64) -> Arc<Slots> {
        Arc::new(Slots {
            slots: (0..count).map(|_| Mutex::new(None)).collect(),
            size,
        })
    }

    /// Puts a state in slot `k` (`None`: empties it; reads then fail with EIO).
    pub fn set(&self, k: usize, slot: Option<Slot>) {
        *self.slots[k].lock() = slot.map(Arc::new);
    }

    fn get(&self, ino: INodeNo) -> Option<Arc<Slot>> {
        let k = (ino.0 as usize).checked_sub(2)?;
        self.slots.get(k)?.lock().clone()
    }

    /// The file name of slot `k`.
    pub fn name(k: usize) -> String {
        format!("state-{k}.img")
    }
}

struct StatesFs {
    slots: Arc<Slots>,
    uid: u32,
    gid: u32,
}

impl StatesFs {
    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, size, perm) = if ino == ROOT {
            (FileType::Directory, 0, 0o755)
        } else if (ino.0 as usize) >= 2 && (ino.0 as usize) < 2 + self.slots.slots.len() {
            (FileType::RegularFile, self.slots.size, 0o644)
        } else {
            return None;
        };
        let now = SystemTime::now();
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind,
            perm,
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

impl Filesystem for StatesFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(missing) = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO) {
            debug!("kernel lacks FUSE capability {missing:?}");
        }
        if let Err(nearest) = config.set_max_write(1 << 20) {
            let _ = config.set_max_write(nearest);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = (parent == ROOT)
            .then(|| (0..self.slots.slots.len()).find(|k| name == Slots::name(*k).as_str()))
            .flatten()
            .and_then(|k| self.attr(INodeNo(2 + k as u64)));
        match found {
            Some(attr) => reply.entry(&TTL, &attr, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.attr(ino) {
            Some(a) if a.kind == FileType::RegularFile => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
            ),
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(slot) = self.slots.get(ino) else {
            return reply.error(Errno::EIO);
        };
        let end = (offset + size as u64).min(self.slots.size);
        if offset >= end {
            return reply.data(&[]);
        }
        let mut buf = vec![0u8; (end - offset) as usize];
        match slot.read(offset, &mut buf) {
            Ok(()) => reply.data(&buf),
            Err(e) => {
                warn!("reading a crash state at {offset}: {e}");
                reply.error(Errno::EIO)
            }
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(slot) = self.slots.get(ino) else {
            return reply.error(Errno::EIO);
        };
        if offset + data.len() as u64 > self.slots.size {
            return reply.error(Errno::ENOSPC);
        }
        match slot.write(offset, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => {
                warn!("writing a crash state at {offset}: {e}");
                reply.error(Errno::EIO)
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let mut entries = vec![
            (ROOT, FileType::Directory, ".".to_string()),
            (ROOT, FileType::Directory, "..".to_string()),
        ];
        for k in 0..self.slots.slots.len() {
            entries.push((INodeNo(2 + k as u64), FileType::RegularFile, Slots::name(k)));
        }
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(Errno::from_i32(libc::ENODATA));
    }
}

/// The states' mount: unmounted when dropped.
pub struct StatesMount {
    dir: PathBuf,
    unmounter: fuser::SessionUnmounter,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StatesMount {
    /// Mounts `slots` at `dir` (an empty directory) and serves it on its own threads.
    pub fn start(dir: &Path, slots: Arc<Slots>, workers: usize) -> std::io::Result<StatesMount> {
        let fs = StatesFs {
            slots,
            // SAFETY: getuid/getgid cannot fail.
            uid: unsafe { libc::getuid() },
            // SAFETY: as above.
            gid: unsafe { libc::getgid() },
        };
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("blkdebugfs-explore".into()),
            fuser::MountOption::Subtype("blkdebugfs".into()),
            fuser::MountOption::DefaultPermissions,
        ];
        config.n_threads = Some(workers.max(1));
        config.clone_fd = true;
        let mut session = fuser::Session::new(fs, dir, &config)?;
        let unmounter = session.unmount_callable();
        let thread = std::thread::Builder::new()
            .name("explore-states".into())
            .spawn(move || {
                if let Err(e) = session.run() {
                    debug!("the states' session ended: {e}");
                }
            })?;
        Ok(StatesMount {
            dir: dir.to_path_buf(),
            unmounter,
            thread: Some(thread),
        })
    }

    pub fn path(&self, k: usize) -> PathBuf {
        self.dir.join(Slots::name(k))
    }
}

impl Drop for StatesMount {
    fn drop(&mut self) {
        if let Err(e) = self.unmounter.unmount() {
            // Busy: a loop device a lazily detached filesystem still holds. Detach the
            // states too, and do not wait for a session that ends only when that goes.
            warn!("unmounting {}: {e}; detaching it", self.dir.display());
            if let Ok(c) = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes()) {
                // SAFETY: umount2 with a valid, NUL-terminated path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
            return;
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
