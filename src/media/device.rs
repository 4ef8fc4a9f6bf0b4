//! A block device as the image (`blkdebugfs mount /dev/loop3 MNT`): what differs from a
//! regular file, in one place.
//!
//! - The size is the device's (`BLKGETSIZE64`) and never changes: no growth, and a truncate
//!   to any other size is refused with EINVAL, as `ftruncate(2)` on the device refuses it.
//! - Write-zeroes and punch-hole go through the device's own zeroing: `fallocate(2)` on a
//!   block device is the kernel's `blkdev_issue_zeroout`, the path `BLKZEROOUT` takes
//!   (zero-range may fall back to writing zeroes in the kernel; punch-hole may unmap but
//!   never falls back, so it answers EOPNOTSUPP on a device that cannot unmap and zero).
//!   The kernel refuses ranges not aligned to the logical block size (EINVAL), so the
//!   aligned middle goes to the device and the unaligned edges are written as zeroes.
//!   `BLKDISCARD` is never used: a discarded range need not read back as zeroes.
//! - There are no holes: `SEEK_DATA` finds the offset itself, `SEEK_HOLE` the end (the
//!   kernel answers EINVAL to both on a block device).
//! - Plain allocation has nothing to allocate: it succeeds inside the device.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// `_IOR(0x12, 114, size_t)`: the device's size in bytes (`<linux/fs.h>`).
const BLKGETSIZE64: u64 = ioc_read(0x12, 114, std::mem::size_of::<u64>() as u64);
/// `_IO(0x12, 104)`: the logical block size, the unit of every device request.
const BLKSSZGET: u64 = (0x12 << 8) | 104;

/// The generic `_IOR` encoding (x86, Arm, RISC-V, s390: direction bits 30-31, size 16-29).
const fn ioc_read(kind: u64, nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | (kind << 8) | nr
}

/// The size of the block device `file`, in bytes: `BLKGETSIZE64`, or where that request
/// is numbered otherwise (the architectures whose `_IOR` differs), the end as `lseek` finds
/// it, which the kernel answers from the same size.
pub fn size(file: &File) -> io::Result<u64> {
    let mut bytes: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at ours.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut bytes) };
    if r == 0 {
        return Ok(bytes);
    }
    // Positional I/O never uses the descriptor's offset, so moving it disturbs nothing.
    // SAFETY: lseek on an open descriptor; no memory is passed.
    let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(end as u64)
}

/// The logical block size of the block device `file` (512 if the device will not say).
pub fn logical_block_size(file: &File) -> u64 {
    let mut size: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at ours.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET as _, &mut size) };
    match (r, u64::try_from(size)) {
        (0, Ok(n)) if n.is_power_of_two() => n,
        _ => 512,
    }
}

/// Whether another user holds the device exclusively (a mounted filesystem, a device-mapper
/// or RAID member): an `O_EXCL` open of a block device fails with EBUSY then.
pub fn claimed(path: &std::path::Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(path);
    matches!(probe, Err(e) if e.raw_os_error() == Some(libc::EBUSY))
}

/// Zeroes `[offset, offset + len)` of the block device `file` whose logical block size is
/// `block`, by the device's own zeroing where the range is aligned (see the module doc).
pub fn zero(file: &File, offset: u64, len: u64, punch: bool, block: u64) -> io::Result<()> {
    let end = offset.saturating_add(len);
    let middle_start = offset.next_multiple_of(block);
    let middle_end = end / block * block;
    if middle_start >= middle_end {
        return write_zeroes(file, offset, len);
    }
    write_zeroes(file, offset, middle_start - offset)?;
    zero_aligned(file, middle_start, middle_end - middle_start, punch)?;
    write_zeroes(file, middle_end, end - middle_end)
}

/// fallocate on an aligned range: zero-range (the kernel writes zeroes itself if the device
/// cannot), or punch-hole; either falls back to writing zeroes where the device refuses.
fn zero_aligned(file: &File, offset: u64, len: u64, punch: bool) -> io::Result<()> {
    let kind = if punch {
        libc::FALLOC_FL_PUNCH_HOLE
    } else {
        libc::FALLOC_FL_ZERO_RANGE
    };
    let mode = kind | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate on an open descriptor; no memory is passed.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as i64, len as i64) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) => write_zeroes(file, offset, len),
        _ => Err(e),
    }
}

/// Writes zeroes over `[offset, offset+len)`, a MiB at a time: the fallback where nothing
/// can zero a range for us (a file or a device that refuses fallocate).
pub(crate) fn write_zeroes(file: &File, offset: u64, len: u64) -> io::Result<()> {
    const CHUNK: u64 = 1 << 20;
    if len == 0 {
        return Ok(());
    }
    let zeroes = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK) as usize;
        file.write_all_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request numbers `<linux/fs.h>` gives on this architecture family.
    #[test]
    fn ioctl_numbers_are_the_kernels() {
        assert_eq!(BLKGETSIZE64, 0x8008_1272);
        assert_eq!(BLKSSZGET, 0x1268);
    }

    /// Where the ioctls refuse (here: a regular file), the size comes from the end and the
    /// block size is 512.
    #[test]
    fn where_the_ioctls_refuse_the_size_is_the_end() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(12345).unwrap();
        assert_eq!(size(&f).unwrap(), 12345);
        assert_eq!(logical_block_size(&f), 512);
    }

    /// The split into unaligned edges and an aligned middle keeps every byte around the
    /// range (checked on a regular file, where fallocate zero-range works the same way).
    #[test]
    fn zeroing_touches_exactly_the_range() {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(&[0xaa; 16384], 0).unwrap();
        for (offset, len) in [(100u64, 300u64), (1000, 5000), (4096, 4096), (0, 16384)] {
            f.write_all_at(&[0xaa; 16384], 0).unwrap();
            zero(&f, offset, len, false, 4096).unwrap();
            let mut back = vec![0u8; 16384];
            f.read_exact_at(&mut back, 0).unwrap();
            for (i, b) in back.iter().enumerate() {
                let inside = (i as u64) >= offset && (i as u64) < offset + len;
                assert_eq!(
                    *b,
                    if inside { 0 } else { 0xaa },
                    "byte {i} of {offset}+{len}"
                );
            }
        }
    }
}
