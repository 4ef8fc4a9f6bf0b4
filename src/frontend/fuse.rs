//! The FUSE adapter: resolves which node each kernel operation is for, calls the [`Mount`]
//! method for it, and turns the result into the reply. Nothing else lives here: no rule
//! logic, no size or growth policy, no syscall on the image.
//!
//! The mount shows either a directory holding one regular file (the image's file name), or,
//! when mounted onto a regular file, that file itself as the root (as QEMU's FUSE export
//! does). Every request gets exactly one reply; errors from the image become their errno.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};
use log::debug;

use crate::control::{CONTROL_NAME, Control};
use crate::mount::{Caller, Done, ImageStat, Mount};

/// Attributes may be cached briefly: the size only changes through this mount (or by the
/// user behind our back, which a short TTL tolerates).
const TTL: Duration = Duration::from_secs(1);
const ROOT: INodeNo = INodeNo(1);
/// The image file's inode in the directory layout.
const IMAGE: INodeNo = INodeNo(2);
/// The control file's inode in the directory layout.
const CONTROL: INodeNo = INodeNo(3);
/// Largest write the kernel may send in one request.
pub const MAX_WRITE: u32 = 1 << 20;
/// Async requests the kernel may have in flight at once (see `init`).
const MAX_BACKGROUND: u16 = 1024;

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
    /// The control endpoint behind `.control` (directory layout only). The one place a front
    /// end holds more than `Mount`: the control node's writes run commands and its reads
    /// show the status (a crossing `design.md` accepts); every image operation goes to
    /// `mount`.
    control: Arc<Control>,
    /// Per open `.control` file: the text reads return (the status, then each command's
    /// reply) and how much of it was read. Reads ignore the file offset, which a write
    /// on the same descriptor has moved.
    control_texts: Arc<parking_lot::Mutex<std::collections::HashMap<u64, (String, usize)>>>,
    next_fh: std::sync::atomic::AtomicU64,
}

/// What an inode number names. Every operation resolves it first, so that no operation
/// meant for one node can act on another (a punch-hole through a `.control` descriptor
/// must never reach the image).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Node {
    Root,
    Image,
    Control,
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

/// Who sent a kernel request, for the trace.
fn caller(req: &Request) -> Caller {
    Caller {
        pid: req.pid(),
        sends: None,
    }
}

impl BlkdebugFs {
    pub fn new(control: Arc<Control>, layout: Layout, policy: OpenPolicy) -> BlkdebugFs {
        // SAFETY: getuid/getgid cannot fail and touch no memory.
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

    /// The node `ino` names in this layout, if any.
    fn node(&self, ino: INodeNo) -> Option<Node> {
        match (&self.layout, ino) {
            (Layout::File, ROOT) => Some(Node::Image),
            (Layout::File, _) => None,
            (Layout::Directory { .. }, ROOT) => Some(Node::Root),
            (Layout::Directory { .. }, IMAGE) => Some(Node::Image),
            (Layout::Directory { .. }, CONTROL) => Some(Node::Control),
            _ => None,
        }
    }

    fn image_ino(&self) -> INodeNo {
        match self.layout {
            Layout::Directory { .. } => IMAGE,
            Layout::File => ROOT,
        }
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

    fn image_attr(&self, st: ImageStat) -> FileAttr {
        FileAttr {
            ino: self.image_ino(),
            size: st.size,
            blocks: st.blocks,
            atime: st.atime,
            mtime: st.mtime,
            ctime: st.ctime,
            crtime: st.ctime,
            kind: FileType::RegularFile,
            perm: st.perm,
            nlink: 1,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn attr(&self, node: Node) -> Result<FileAttr, Errno> {
        match node {
            Node::Image => self
                .mount
                .stat()
                .map(|st| self.image_attr(st))
                .map_err(errno),
            Node::Control => Ok(self.control_attr()),
            Node::Root => Ok(self.dir_attr()),
        }
    }

    /// One command per write(2); the write returns once the command took effect, and a
    /// later read on the same open file returns the reply text.
    fn control_write(&self, fh: FileHandle, data: &[u8], reply: ReplyWrite) {
        let len = data.len() as u32;
        let texts = self.control_texts.clone();
        let done: crate::control::CtlReply = Box::new(move |r| {
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
        });
        // A FUSE write cannot tell when its writer goes away, so a `wait_break` here is
        // never cancelled: `blkdebugfs ctl` waits in bounded slices instead.
        let _ = self.control.run_bytes(data, done);
    }
}

impl BlkdebugFs {
    /// A flush (close, fsync, fdatasync) of `ino`: a request for the image; nothing to do
    /// for the control file or the directory.
    fn flush_node(&self, req: &Request, ino: INodeNo, reply: ReplyEmpty) {
        match self.node(ino) {
            Some(Node::Image) => self.mount.flush(caller(req), empty_reply(reply)),
            _ => reply.ok(),
        }
    }
}

/// A completion that replies to an operation without data.
fn empty_reply(reply: ReplyEmpty) -> Done {
    Box::new(move |r| match r {
        Ok(()) => reply.ok(),
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
        // Async direct I/O (libaio, io_uring) arrives as background requests, of which the
        // kernel lets only `max_background` be in flight (fuser's default: 16). Delayed and
        // suspended requests hold no worker but do hold one of these places, so with the
        // default a depth-16 queue of delayed requests would stall every other async request
        // on the mount.
        let _ = config.set_max_background(MAX_BACKGROUND);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = match &self.layout {
            Layout::Directory { name: image } if parent == ROOT && name == image.as_str() => {
                Some(Node::Image)
            }
            Layout::Directory { .. } if parent == ROOT && name == CONTROL_NAME => {
                Some(Node::Control)
            }
            _ => None,
        };
        match found.map(|node| self.attr(node)) {
            Some(Ok(attr)) => reply.entry(&TTL, &attr, Generation(0)),
            Some(Err(e)) => reply.error(e),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino).map(|node| self.attr(node)) {
            Some(Ok(attr)) => reply.attr(&TTL, &attr),
            Some(Err(e)) => reply.error(e),
            None => reply.error(Errno::ENOENT),
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
        match self.node(ino) {
            Some(Node::Image) => match self.mount.set_attr(size, mode) {
                Ok(st) => reply.attr(&TTL, &self.image_attr(st)),
                Err(e) => reply.error(errno(e)),
            },
            // `echo CMD > .control`: the shell's O_TRUNC arrives as a truncation to 0,
            // which a control file has nothing to do with.
            Some(Node::Control) if mode.is_none() && matches!(size, None | Some(0)) => {
                reply.attr(&TTL, &self.control_attr())
            }
            Some(_) => reply.error(Errno::EPERM),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino) {
            Some(Node::Control) => {
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
                // The kernel holds this file's inode lock across each write (a write to an
                // empty file extends it, so it is never parallel): commands through
                // `.control` run one at a time, and `ctl wait_break` waits in short slices.
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO)
            }
            Some(Node::Image) => {
                if self.mount.read_only() && flags.acc_mode() != OpenAccMode::O_RDONLY {
                    return reply.error(Errno::EROFS);
                }
                let fopen = if self.policy.cache {
                    FopenFlags::empty()
                } else {
                    FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
                };
                reply.opened(FileHandle(0), fopen)
            }
            Some(Node::Root) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.node(ino) {
            Some(Node::Image) => self.mount.read(
                caller(req),
                offset,
                size,
                Box::new(move |r| match r {
                    Ok(buf) => reply.data(&buf),
                    Err(e) => reply.error(errno(e)),
                }),
            ),
            Some(Node::Control) => {
                let mut texts = self.control_texts.lock();
                let Some((text, cursor)) = texts.get_mut(&fh.0) else {
                    return reply.data(&[]);
                };
                let start = (*cursor).min(text.len());
                let end = (start + size as usize).min(text.len());
                *cursor = end;
                reply.data(&text.as_bytes()[start..end])
            }
            Some(Node::Root) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.node(ino) {
            Some(Node::Image) => self.mount.write(
                caller(req),
                offset,
                data,
                Box::new(move |r| match r {
                    Ok(n) => reply.written(n),
                    Err(e) => reply.error(errno(e)),
                }),
            ),
            Some(Node::Control) => self.control_write(fh, data, reply),
            Some(Node::Root) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Every close() flushes, as through QEMU's export.
        self.flush_node(req, ino, reply)
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
        if self.node(ino) == Some(Node::Control) {
            self.control_texts.lock().remove(&fh.0);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.flush_node(req, ino, reply)
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.node(ino) {
            Some(Node::Image) => {
                self.mount
                    .fallocate(caller(req), mode, offset, length, empty_reply(reply))
            }
            // Not ENOSYS: that would make the kernel stop asking for every file.
            _ => reply.error(Errno::from_i32(libc::EOPNOTSUPP)),
        }
    }

    fn lseek(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.node(ino) {
            Some(Node::Image) => self.mount.seek(
                caller(req),
                offset,
                whence,
                Box::new(move |r| match r {
                    Ok(found) => reply.offset(found),
                    Err(e) => reply.error(errno(e)),
                }),
            ),
            // The control file has no data to find: it is empty to lseek (not ENOSYS, which
            // would turn SEEK_DATA off for the image too).
            Some(Node::Control) => reply.error(Errno::from_i32(libc::ENXIO)),
            _ => reply.error(Errno::from_i32(libc::EINVAL)),
        }
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
        match self.mount.statfs() {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                st.f_bsize as u32,
                st.f_namemax as u32,
                st.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }
}
