//! The FUSE adapter: translates kernel operations into [`Op`]s for [`Mount::submit`] and
//! results into replies. Nothing else lives here: no rule logic, no policy.
//!
//! The mount shows either a directory holding one regular file (the image's file name), or,
//! when mounted onto a regular file, that file itself as the root (as QEMU's FUSE export
//! does). Every request gets exactly one reply; errors from the image become their errno.

use std::ffi::OsStr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};
use log::{debug, warn};

use crate::control::Control;
use crate::mount::{Completion, Mount};
use crate::ops::Op;

/// Attributes may be cached briefly: the size only changes through this mount (or by the
/// user behind our back, which a short TTL tolerates).
const TTL: Duration = Duration::from_secs(1);
const ROOT: INodeNo = INodeNo(1);
/// The image file's inode in the directory layout.
const IMAGE: INodeNo = INodeNo(2);
/// The control file's inode in the directory layout.
const CONTROL: INodeNo = INodeNo(3);
/// The control file's name in the mount's directory.
pub const CONTROL_NAME: &str = ".control";
/// Largest write the kernel may send in one request.
pub const MAX_WRITE: u32 = 1 << 20;

/// What the mount point shows.
#[derive(Clone, Debug)]
pub enum Layout {
    /// A directory containing the image under `name`.
    Directory { name: String },
    /// The mount point is a regular file and is the image itself.
    File,
}

/// How files are opened.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenPolicy {
    /// Let the page cache serve reads (`--cache`); otherwise every open is direct I/O so that
    /// every request reaches the rules.
    pub cache: bool,
}

pub struct BlkdebugFs {
    mount: Arc<Mount>,
    layout: Layout,
    policy: OpenPolicy,
    uid: u32,
    gid: u32,
    /// The control endpoint behind `.control` (directory layout only).
    control: Arc<Control>,
    /// Per open `.control` file: the text reads return (the status, then each command's
    /// reply) and how much of it was read. Reads ignore the file offset, which a write
    /// on the same descriptor has moved.
    control_texts: Arc<parking_lot::Mutex<std::collections::HashMap<u64, (String, usize)>>>,
    next_fh: std::sync::atomic::AtomicU64,
}

/// Replies to a FUSE request with an errno from a plan.
fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

impl BlkdebugFs {
    pub fn new(control: Arc<Control>, layout: Layout, policy: OpenPolicy) -> BlkdebugFs {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        BlkdebugFs {
            mount: control.mount().clone(),
            layout,
            policy,
            uid,
            gid,
            control,
            control_texts: Default::default(),
            next_fh: std::sync::atomic::AtomicU64::new(1),
        }
    }

    fn has_control(&self) -> bool {
        matches!(self.layout, Layout::Directory { .. })
    }

    /// Whether `ino` is the control file (which exists in the directory layout only).
    fn is_control(&self, ino: INodeNo) -> bool {
        ino == CONTROL && self.has_control()
    }

    fn control_attr(&self) -> FileAttr {
        FileAttr {
            ino: CONTROL,
            kind: FileType::RegularFile,
            perm: 0o600,
            nlink: 1,
            ..self.dir_attr()
        }
    }

    fn image_ino(&self) -> INodeNo {
        match self.layout {
            Layout::Directory { .. } => IMAGE,
            Layout::File => ROOT,
        }
    }

    fn is_image(&self, ino: INodeNo) -> bool {
        ino == self.image_ino()
    }

    fn dir_attr(&self) -> FileAttr {
        let now = SystemTime::now();
        FileAttr {
            ino: ROOT,
            size: 0,
            blocks: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind: FileType::Directory,
            perm: 0o755,
            nlink: 2,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn image_attr(&self) -> Result<FileAttr, Errno> {
        let md = self.mount.image().metadata().map_err(|e| {
            warn!("stat of {} failed: {e}", self.mount.image_path.display());
            Errno::from(e)
        })?;
        let time = |secs: i64, nsecs: i64| {
            UNIX_EPOCH + Duration::new(secs.max(0) as u64, nsecs.clamp(0, 999_999_999) as u32)
        };
        let mut perm = (md.mode() & 0o7777) as u16;
        if self.mount.mode.read_only {
            perm &= !0o222;
        }
        Ok(FileAttr {
            ino: self.image_ino(),
            size: self.mount.size(),
            blocks: md.blocks(),
            atime: time(md.atime(), md.atime_nsec()),
            mtime: time(md.mtime(), md.mtime_nsec()),
            ctime: time(md.ctime(), md.ctime_nsec()),
            crtime: time(md.ctime(), md.ctime_nsec()),
            kind: FileType::RegularFile,
            perm,
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    fn attr(&self, ino: INodeNo) -> Result<FileAttr, Errno> {
        if self.is_image(ino) {
            self.image_attr()
        } else if self.is_control(ino) {
            Ok(self.control_attr())
        } else if ino == ROOT {
            Ok(self.dir_attr())
        } else {
            Err(Errno::ENOENT)
        }
    }

    fn flush(&self, reply: ReplyEmpty) {
        self.mount.submit(Op::Flush, &[], empty_reply(reply));
    }

    /// One command per write(2); the write returns once the command took effect, and a
    /// later read on the same open file returns the reply text.
    fn control_write(&self, fh: FileHandle, data: &[u8], reply: ReplyWrite) {
        let line = String::from_utf8_lossy(data).trim().to_string();
        let len = data.len() as u32;
        let texts = self.control_texts.clone();
        self.control.run(
            &line,
            Box::new(move |r| {
                // Store the text before replying, so a read right after the write sees it.
                match r {
                    Ok(text) => {
                        texts.lock().insert(fh.0, (format!("{text}\n"), 0));
                        reply.written(len);
                    }
                    Err(e) => {
                        texts
                            .lock()
                            .insert(fh.0, (format!("error: {}\n", e.message), 0));
                        reply.error(errno(e.errno));
                    }
                }
            }),
        );
    }
}

/// A completion that replies to an operation without data.
fn empty_reply(reply: ReplyEmpty) -> Completion {
    Box::new(move |r| match r {
        Ok(_) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    })
}

impl Filesystem for BlkdebugFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Without async DIO the kernel serialises an O_DIRECT aio submission into one request
        // at a time; mmap in direct-I/O mode needs the kernel's explicit allowance.
        for cap in [
            InitFlags::FUSE_ASYNC_DIO,
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
        ] {
            if let Err(missing) = config.add_capabilities(cap) {
                debug!("kernel lacks FUSE capability {missing:?}");
            }
        }
        if let Err(nearest) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(nearest);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match &self.layout {
            Layout::Directory { name: image } if parent == ROOT && name == image.as_str() => {
                match self.image_attr() {
                    Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
                    Err(e) => reply.error(e),
                }
            }
            Layout::Directory { .. } if parent == ROOT && name == CONTROL_NAME => {
                reply.entry(&TTL, &self.control_attr(), Generation(0))
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if !self.is_image(ino) {
            return reply.error(Errno::EPERM);
        }
        if size.is_some() && self.mount.mode.read_only {
            return reply.error(Errno::EROFS);
        }
        if let Some(size) = size
            && let Err(e) = self.mount.set_size(size)
        {
            warn!(
                "truncate of {} to {size} failed: {e}",
                self.mount.image_path.display()
            );
            return reply.error(Errno::from(e));
        }
        if let Some(mode) = mode {
            // SAFETY: fchmod on our own open descriptor.
            let r = unsafe { libc::fchmod(self.mount.image().as_raw_fd(), mode & 0o7777) };
            if r != 0 {
                return reply.error(Errno::from(std::io::Error::last_os_error()));
            }
        }
        match self.image_attr() {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.is_control(ino) {
            // Only the mounting user, even with --allow-other.
            if req.uid() != self.uid {
                return reply.error(Errno::EACCES);
            }
            let fh = self
                .next_fh
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.control_texts
                .lock()
                .insert(fh, (self.control.status(), 0));
            return reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
        }
        if !self.is_image(ino) {
            return reply.error(Errno::EISDIR);
        }
        if self.mount.mode.read_only && flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let fopen = if self.policy.cache {
            FopenFlags::empty()
        } else {
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
        };
        reply.opened(FileHandle(0), fopen);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if self.is_control(ino) {
            let mut texts = self.control_texts.lock();
            let Some((text, cursor)) = texts.get_mut(&fh.0) else {
                return reply.data(&[]);
            };
            let start = (*cursor).min(text.len());
            let end = (start + size as usize).min(text.len());
            *cursor = end;
            return reply.data(&text.as_bytes()[start..end]);
        }
        let image_size = self.mount.size();
        // Like QEMU's export: reads stop at the end of the image.
        let len = (size as u64).min(image_size.saturating_sub(offset));
        if len == 0 {
            return reply.data(&[]);
        }
        self.mount.submit(
            Op::Read { offset, len },
            &[],
            Box::new(move |r| match r {
                Ok(buf) => reply.data(&buf),
                Err(e) => reply.error(errno(e)),
            }),
        );
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if self.is_control(ino) {
            return self.control_write(fh, data, reply);
        }
        if self.mount.mode.read_only {
            return reply.error(Errno::EROFS);
        }
        let image_size = self.mount.size();
        let end = offset + data.len() as u64;
        let len = if end <= image_size {
            data.len() as u64
        } else if self.mount.mode.growable {
            if let Err(e) = self.mount.grow_to(end) {
                warn!("growing {} failed: {e}", self.mount.image_path.display());
                return reply.error(Errno::from(e));
            }
            data.len() as u64
        } else if offset >= image_size {
            // A disk has no room past its end.
            return reply.error(Errno::from_i32(libc::ENOSPC));
        } else {
            image_size - offset
        };
        if len == 0 {
            return reply.written(0);
        }
        let written = len as u32;
        self.mount.submit(
            Op::Write { offset, len },
            &data[..len as usize],
            Box::new(move |r| match r {
                Ok(_) => reply.written(written),
                Err(e) => reply.error(errno(e)),
            }),
        );
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        if self.is_control(ino) {
            return reply.ok();
        }
        // Every close() flushes, as through QEMU's export.
        BlkdebugFs::flush(self, reply);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if self.is_control(ino) {
            self.control_texts.lock().remove(&fh.0);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if self.is_control(ino) {
            return reply.ok();
        }
        BlkdebugFs::flush(self, reply);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if self.mount.mode.read_only {
            return reply.error(Errno::EROFS);
        }
        let image_size = self.mount.size();
        let keep_size = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        let known =
            libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE;
        if mode & !known != 0 || (punch && zero) {
            return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
        }
        if !punch && !zero {
            // Plain allocation: no request reaches blkdebug; allocate in the image itself.
            return match self.mount.allocate(mode, offset, length) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(Errno::from(e)),
            };
        }
        let end = offset.saturating_add(length);
        let len = if keep_size || end <= image_size {
            end.min(image_size).saturating_sub(offset)
        } else {
            // ZERO_RANGE without KEEP_SIZE may extend the image, like fallocate(2) does.
            if let Err(e) = self.mount.grow_to(end) {
                return reply.error(Errno::from(e));
            }
            length
        };
        if len == 0 {
            return reply.ok();
        }
        self.mount
            .submit(Op::Zero { offset, len, punch }, &[], empty_reply(reply));
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        if whence != libc::SEEK_DATA && whence != libc::SEEK_HOLE {
            return reply.error(Errno::from_i32(libc::EINVAL));
        }
        let size = self.mount.size();
        let start = offset.max(0) as u64;
        if start >= size {
            return reply.error(Errno::from_i32(libc::ENXIO));
        }
        let op = Op::BlockStatus {
            offset: start,
            len: size - start,
        };
        let mount = self.mount.clone();
        self.mount.submit(
            op,
            &[],
            Box::new(move |r| {
                if let Err(e) = r {
                    return reply.error(errno(e));
                }
                // The backing file knows where its holes are; positional I/O never uses its
                // file offset, so sharing the descriptor is safe.
                // SAFETY: lseek on the mount's open descriptor.
                let r = unsafe { libc::lseek(mount.image().as_raw_fd(), offset, whence) };
                if r < 0 {
                    reply.error(Errno::from(std::io::Error::last_os_error()))
                } else {
                    reply.offset(r)
                }
            }),
        );
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let Layout::Directory { name } = &self.layout else {
            return reply.error(Errno::ENOTDIR);
        };
        if ino != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (IMAGE, FileType::RegularFile, name.as_str()),
            (CONTROL, FileType::RegularFile, CONTROL_NAME),
        ];
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
        // No extended attributes (answered quietly: the kernel asks on every write).
        reply.error(Errno::from_i32(libc::ENODATA));
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // A regular file answers no ioctl. QEMU probes BLKSSZGET and XFS_IOC_DIOINFO on
        // every open to find the O_DIRECT alignment; it falls back to a safe 4096 bytes.
        debug!("ioctl {cmd:#x}: ENOTTY");
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatvfs fills the struct we own.
        let r = unsafe { libc::fstatvfs(self.mount.image().as_raw_fd(), &mut st) };
        if r != 0 {
            return reply.error(Errno::from(std::io::Error::last_os_error()));
        }
        reply.statfs(
            st.f_blocks,
            st.f_bfree,
            st.f_bavail,
            st.f_files,
            st.f_ffree,
            st.f_bsize as u32,
            st.f_namemax as u32,
            st.f_frsize as u32,
        );
    }
}
