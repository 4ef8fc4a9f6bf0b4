//! Where a read's bytes live between the image and the FUSE reply.
//!
//! Contract: a [`ReadBuf`] is either a vector from a small per-thread pool (filled by
//! `pread`) or a window of a read-only shared mapping of the image ([`ImageMap`]), which
//! the reply copies straight from the page cache: one copy instead of two, which is what a
//! large read costs (a 1 MiB read spends most of its time in those copies).
//!
//! A mapped window is only used when it is safe (see [`ImageMap::window`]): the range lies
//! inside the image and, on tmpfs, is all in memory (reading a hole through a mapping would
//! allocate it there, and sparse images must stay sparse) or, elsewhere, faulted in whole
//! first (`MADV_POPULATE_READ`): the storage is read there, by the request's thread, so a
//! failing read falls back to `pread`, which reports its errno as any read does; otherwise
//! it would surface only as the reply copies from the mapping (`EFAULT` half-way through a
//! reply, which ends an NBD connection), and the reply's send, under the connection's
//! writer lock, would wait on the storage. The window is released before anything
//! can shrink the image: shrinking takes the map's lock for writing, each window holds it
//! for reading until its reply is sent. Nothing can park a request while it holds a window
//! (the caller only maps a request's last read step), so a shrink never waits on a
//! suspended request.

use std::cell::RefCell;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use parking_lot::lock_api::ArcRwLockReadGuard;
use parking_lot::{RawRwLock, RwLock};

thread_local! {
    /// Read buffers, kept per worker thread between requests.
    static READ_BUFFERS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// Buffers each thread keeps, and the largest one worth keeping.
const POOLED_PER_THREAD: usize = 4;
const POOLED_MAX_BYTES: usize = 4 << 20;

/// Reads at least this large are served from the mapping when possible: below it, the
/// extra work (an `fstat`, `mincore` on tmpfs, `madvise` after the reply) costs about what
/// the saved copy does.
pub const MAPPED_READ_MIN: u64 = 128 * 1024;

/// The address space reserved for the mapping: images up to this size are mapped whole,
/// and may grow up to it without remapping (pages past the end are never touched).
const MAP_RESERVE: u64 = 1 << 40;

/// A read request's bytes. See the module doc.
pub struct ReadBuf {
    source: Source,
    len: usize,
}

enum Source {
    /// A pooled vector, fully initialised up to its own length (its high-water mark), so
    /// taking one neither allocates nor zero-fills in the steady state.
    Pooled(Vec<u8>),
    /// `len` bytes of the mapping at `offset`; the guard keeps shrinks out until dropped.
    Mapped {
        map: Arc<ImageMap>,
        offset: usize,
        _guard: ArcRwLockReadGuard<RawRwLock, ()>,
    },
}

impl ReadBuf {
    /// `len` bytes from the pool (contents unspecified: every read plan writes each byte it
    /// returns, as `mount/plan.rs` tests).
    pub fn pooled(len: usize) -> ReadBuf {
        if len == 0 {
            return ReadBuf {
                source: Source::Pooled(Vec::new()),
                len: 0,
            };
        }
        let mut bytes = READ_BUFFERS
            .try_with(|pool| pool.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_default();
        if bytes.len() < len {
            bytes.resize(len, 0);
        }
        ReadBuf {
            source: Source::Pooled(bytes),
            len,
        }
    }

    /// The writable bytes of a pooled buffer (`None` for a mapped window, which is filled
    /// already).
    pub fn as_mut(&mut self) -> Option<&mut [u8]> {
        match &mut self.source {
            Source::Pooled(bytes) => Some(&mut bytes[..self.len]),
            Source::Mapped { .. } => None,
        }
    }
}

impl ReadBuf {
    /// Keeps only the first `len` bytes (a short read).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl std::ops::Deref for ReadBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.source {
            Source::Pooled(bytes) => &bytes[..self.len],
            // SAFETY: `window` checked that [offset, offset + len) lies inside the image and
            // inside the mapping; the guard keeps the image from shrinking meanwhile, and the
            // Arc keeps the mapping alive.
            Source::Mapped { map, offset, .. } => unsafe {
                std::slice::from_raw_parts(map.ptr.add(*offset), self.len)
            },
        }
    }
}

impl Drop for ReadBuf {
    fn drop(&mut self) {
        if let Source::Mapped { map, offset, .. } = &self.source {
            map.forget_pages(*offset, self.len);
            return;
        }
        let Source::Pooled(bytes) = &mut self.source else {
            return;
        };
        if bytes.is_empty() || bytes.len() > POOLED_MAX_BYTES {
            return;
        }
        let bytes = std::mem::take(bytes);
        // During thread teardown the pool may be gone: then the buffer is simply freed.
        let _ = READ_BUFFERS.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < POOLED_PER_THREAD {
                pool.push(bytes);
            }
        });
    }
}

/// A read-only shared mapping of the image. See the module doc.
pub struct ImageMap {
    ptr: *const u8,
    reserved: usize,
    /// The image is on tmpfs, where reading a hole through the mapping would allocate it.
    on_tmpfs: bool,
    /// Read-held by every live window, write-held by a shrink.
    shrink: Arc<RwLock<()>>,
}

// SAFETY: the mapping is read-only shared memory; windows only read it, and its lifetime is
// tied to the Arc that every window holds.
unsafe impl Send for ImageMap {}
// SAFETY: as above.
unsafe impl Sync for ImageMap {}

impl ImageMap {
    /// Maps `image` (of `size` bytes) read-only, or `None` when it cannot be mapped (then
    /// every read uses `pread`).
    pub fn new(image: &File, size: u64) -> Option<Arc<ImageMap>> {
        let reserved = size.max(MAP_RESERVE).next_power_of_two();
        let reserved = usize::try_from(reserved).ok()?;
        // SAFETY: a fresh read-only shared mapping of an open file; checked for failure.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserved,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                image.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            log::debug!(
                "image cannot be mapped ({}): reads use pread",
                std::io::Error::last_os_error()
            );
            return None;
        }
        // SAFETY: statfs is plain old data; all-zero is a valid value.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatfs fills the struct we own, from an open descriptor.
        let on_tmpfs = unsafe { libc::fstatfs(image.as_raw_fd(), &mut fs) } == 0
            && fs.f_type == libc::TMPFS_MAGIC;
        // The kernel answers mincore truthfully for a file only to its owner (or root, or a
        // writer); anyone else is told every page is resident, holes included. Without a
        // truthful answer a tmpfs image is not read through the mapping.
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        if on_tmpfs && euid != 0 && image.metadata().map(|m| m.uid()).ok() != Some(euid) {
            // SAFETY: unmapping the mapping just created.
            unsafe { libc::munmap(ptr, reserved) };
            log::debug!("tmpfs image owned by another user: reads use pread");
            return None;
        }
        Some(Arc::new(ImageMap {
            ptr: ptr.cast(),
            reserved,
            on_tmpfs,
            shrink: Arc::new(RwLock::new(())),
        }))
    }

    /// Whether every page of `[offset, end)` is in memory. On tmpfs memory is the storage,
    /// so this says the range has no hole (`SEEK_HOLE` would answer too, but it walks on to
    /// the next hole, which in a fully written image is the end: far too slow per read).
    fn all_resident(&self, offset: u64, end: u64) -> bool {
        let page = page_size() as u64;
        let start = offset / page * page;
        let pages = (end - start).div_ceil(page) as usize;
        thread_local! {
            static RESIDENCY: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
        }
        RESIDENCY
            .try_with(|v| {
                let mut v = v.borrow_mut();
                v.clear();
                v.resize(pages, 0);
                // SAFETY: the range lies inside our mapping (checked by the caller), is page
                // aligned at its start, and `v` holds one byte per page.
                let r = unsafe {
                    libc::mincore(
                        self.ptr.add(start as usize) as *mut libc::c_void,
                        (end - start) as usize,
                        v.as_mut_ptr(),
                    )
                };
                r == 0 && v.iter().all(|b| b & 1 == 1)
            })
            .unwrap_or(false)
    }

    /// Reads `[offset, end)` in from the storage and maps it (`MADV_POPULATE_READ`): false
    /// when that failed (an I/O error, a truncation behind our back, a kernel before 5.14),
    /// and the read must use `pread`.
    fn populate(&self, offset: u64, end: u64) -> bool {
        let page = page_size() as u64;
        let start = offset / page * page;
        // SAFETY: a page-aligned range inside our own read-only shared file mapping (checked
        // by the caller); populating only reads the file into it, and reports a failure
        // instead of raising SIGBUS.
        let r = unsafe {
            libc::madvise(
                self.ptr.add(start as usize) as *mut libc::c_void,
                (end - start) as usize,
                libc::MADV_POPULATE_READ,
            )
        };
        if r != 0 {
            log::debug!(
                "populating the mapping at {offset} for {} bytes failed ({}): pread reads it",
                end - offset,
                std::io::Error::last_os_error()
            );
        }
        r == 0
    }

    /// Drops this process's page-table entries for a window once its reply is sent: the
    /// pages stay in the page cache (the image's data is untouched), but the daemon's
    /// resident size does not grow to the image's size as reads pass over it.
    fn forget_pages(&self, offset: usize, len: usize) {
        let page = page_size();
        let start = offset / page * page;
        let end = (offset + len).div_ceil(page) * page;
        // SAFETY: a page-aligned range inside our own read-only shared file mapping;
        // MADV_DONTNEED on it only unmaps pages, which fault back in from the file.
        unsafe {
            libc::madvise(
                self.ptr.add(start) as *mut libc::c_void,
                end - start,
                libc::MADV_DONTNEED,
            )
        };
    }

    /// Holds shrinks off while the guard lives (the caller is about to shrink the image).
    pub fn exclude_windows(&self) -> parking_lot::RwLockWriteGuard<'_, ()> {
        self.shrink.write()
    }

    /// A window on `[offset, offset + len)` of `image`, or `None` when the read must use
    /// `pread`: the range is past the mapping or the image's real end (the image was
    /// truncated behind our back), has a hole, or a shrink is under way.
    pub fn window(self: &Arc<Self>, image: &File, offset: u64, len: u64) -> Option<ReadBuf> {
        let end = offset.checked_add(len)?;
        if end > self.reserved as u64 {
            return None;
        }
        let guard = self.shrink.try_read_arc()?;
        if image.metadata().ok()?.len() < end {
            return None;
        }
        if self.on_tmpfs && !self.all_resident(offset, end) {
            return None;
        }
        if !self.on_tmpfs && !self.populate(offset, end) {
            return None;
        }
        Some(ReadBuf {
            source: Source::Mapped {
                map: self.clone(),
                offset: offset as usize,
                _guard: guard,
            },
            len: len as usize,
        })
    }
}

/// The kernel's page size.
fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 => n as usize,
        _ => 4096,
    }
}

impl Drop for ImageMap {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; no window outlives the last Arc.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.reserved) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn windows_show_the_image_and_refuse_the_end() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(8 << 20).unwrap();
        let data: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        f.write_all_at(&data, 1 << 20).unwrap();
        let map = ImageMap::new(&f, 8 << 20).expect("a regular file maps");
        let w = map.window(&f, 1 << 20, 1 << 20).expect("data range");
        assert!(*w == *data);
        assert!(
            map.window(&f, (8 << 20) - 4096, 8192).is_none(),
            "past the end"
        );
        drop(w);
    }

    #[test]
    fn on_tmpfs_holes_are_read_with_pread_so_the_image_stays_sparse() {
        let Ok(f) = tempfile::tempfile_in("/dev/shm") else {
            eprintln!("no /dev/shm here: nothing to test");
            return;
        };
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[5u8; 1 << 20], 0).unwrap();
        let map = ImageMap::new(&f, 8 << 20).unwrap();
        assert!(map.on_tmpfs);
        assert!(
            map.window(&f, 0, 1 << 20)
                .is_some_and(|w| w.iter().all(|&b| b == 5))
        );
        assert!(map.window(&f, 4 << 20, 1 << 20).is_none(), "a hole");
        assert!(
            map.window(&f, (1 << 20) - 4096, 8192).is_none(),
            "half a hole"
        );
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            f.metadata().unwrap().blocks() * 512,
            1 << 20,
            "still sparse"
        );
    }

    #[test]
    fn a_shrink_waits_for_windows_and_refuses_new_ones() {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&[7u8; 1 << 20], 0).unwrap();
        let map = ImageMap::new(&f, 1 << 20).unwrap();
        let w = map.window(&f, 0, 1 << 20).unwrap();
        assert!(
            map.shrink.try_write().is_none(),
            "a live window holds shrinks off"
        );
        drop(w);
        let shrinking = map.exclude_windows();
        assert!(map.window(&f, 0, 4096).is_none());
        drop(shrinking);
        assert!(map.window(&f, 0, 4096).is_some());
    }

    #[test]
    fn pooled_buffers_come_back_with_their_contents_initialised() {
        let mut a = ReadBuf::pooled(4096);
        a.as_mut().unwrap().fill(9);
        drop(a);
        let b = ReadBuf::pooled(8192);
        assert_eq!(b.len(), 8192);
        assert!(ReadBuf::pooled(0).is_empty());
    }
}
