//! Real clients through real mounts: the tools people point at a disk image (qemu-img,
//! qemu-io, fio, mmap, a loop device with ext4 on it, a sparse 1 TiB image), each with and
//! without faults. The VM case is `scripts/vm-test.sh`, run by `vm_boots_from_the_view`.
//!
//! Kernel-side objects (loop devices, filesystem mounts) are held by the RAII guards of
//! `util.rs`, which detach them even when an assertion fails.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use crate::util::*;

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ---------------------------------------------------------------------------------- qemu-img

#[test]
fn qemu_img_info_and_convert_both_ways_with_and_without_the_page_cache() {
    let s = Scratch::new(4 * MIB);
    let d = mount(&s, &[]);
    let view = s.view();
    let info = tool_ok("qemu-img", &["info", "-f", "raw", path(&view)]);
    assert!(info.contains("virtual size: 4 MiB"), "{info}");
    for cache in ["none", "writeback"] {
        // Out of the view: -T is the source's cache mode.
        let copy = s.dir.path().join(format!("copy-{cache}.raw"));
        tool_ok(
            "qemu-img",
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                "-T",
                cache,
                path(&view),
                path(&copy),
            ],
        );
        assert!(
            std::fs::read(&copy).unwrap() == pattern(4 * MIB),
            "copy out ({cache})"
        );
        // Back into the view (-n: the target exists; -t: its cache mode), with different
        // bytes and a zeroed stretch, which qemu-img writes as zeroes (fallocate).
        let mut other: Vec<u8> = pattern(4 * MIB).iter().map(|b| b ^ 0x5a).collect();
        other[MIB..2 * MIB].fill(0);
        let src = s.dir.path().join(format!("other-{cache}.raw"));
        std::fs::write(&src, &other).unwrap();
        tool_ok(
            "qemu-img",
            &[
                "convert",
                "-n",
                "-f",
                "raw",
                "-O",
                "raw",
                "-t",
                cache,
                path(&src),
                path(&view),
            ],
        );
        assert!(
            std::fs::read(&view).unwrap() == other,
            "copy in ({cache}), view"
        );
        assert!(s.image_bytes() == other, "copy in ({cache}), image");
        std::fs::write(&s.image, pattern(4 * MIB)).unwrap();
    }
    assert!(d.stop().success());
}

// ----------------------------------------------------------------------------------- qemu-io

fn qemu_io(view: &Path, cache: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw", "-t", cache];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(path(view));
    // qemu-io exits 0 even when a command fails; its output says what happened.
    let (_, out, err) = run_tool("qemu-io", &args);
    out + &err
}

#[test]
fn qemu_io_reads_writes_and_flushes_through_the_view() {
    let s = Scratch::new(MIB);
    let d = mount(&s, &[]);
    for (cache, byte) in [("none", "0xab"), ("writeback", "0xcd")] {
        let out = qemu_io(
            &s.view(),
            cache,
            &[
                &format!("write -P {byte} 0 4k"),
                &format!("read -P {byte} 0 4k"),
                &format!("aio_write -P {byte} 8k 4k"),
                "aio_flush",
                &format!("aio_read -P {byte} 8k 4k"),
                "aio_flush",
                "flush",
            ],
        );
        assert!(!out.contains("failed"), "{cache}: {out}");
        assert_eq!(out.matches("wrote 4096/4096 bytes").count(), 2, "{out}");
        assert_eq!(out.matches("read 4096/4096 bytes").count(), 2, "{out}");
    }
    assert!(d.stop().success());
    let img = s.image_bytes();
    assert!(img[..4096].iter().all(|&b| b == 0xcd));
    assert!(img[8192..12288].iter().all(|&b| b == 0xcd));
    assert!(img[4096..8192] == pattern(MIB)[4096..8192]);
}

#[test]
fn qemu_io_reports_an_armed_rule_as_its_own_error_at_the_offset() {
    let s = Scratch::new(MIB);
    let d = mount(
        &s,
        &[
            "--inject-error",
            "event=read_aio,errno=EIO,sector=16",
            "--inject-error",
            "event=write_aio,errno=ENOSPC,sector=64",
        ],
    );
    for cache in ["none", "writeback"] {
        let out = qemu_io(
            &s.view(),
            cache,
            &["read 0 4k", "read 8k 4k", "write 28k 4k", "write 32k 4k"],
        );
        let lines: Vec<&str> = out.lines().filter(|l| !l.starts_with(' ')).collect();
        // read 0: sector 16 (byte 8192) is outside, ok; read 8k covers it: EIO. The write
        // rule is armed by the first write: 28k..32k misses byte 32768, 32k hits it.
        assert!(
            lines[0].starts_with("read 4096/4096 bytes at offset 0"),
            "{out}"
        );
        assert_eq!(lines[2], "read failed: Input/output error", "{out}");
        assert!(
            lines[3].starts_with("wrote 4096/4096 bytes at offset 28672"),
            "{out}"
        );
        assert_eq!(lines[5], "write failed: No space left on device", "{out}");
    }
    assert!(d.stop().success());
}

// --------------------------------------------------------------------------------------- fio

#[test]
fn fio_verifies_with_psync_libaio_and_io_uring() {
    let s = Scratch::new(4 * MIB);
    let d = mount(&s, &["--threads", "2"]);
    for engine in ["psync", "libaio", "io_uring"] {
        let (code, out) = fio(
            &s.view(),
            engine,
            &[
                "--iodepth=16",
                "--rw=randwrite",
                "--verify=crc32c",
                // No verify state file in the working directory.
                "--verify_state_save=0",
                "--do_verify=1",
                "--verify_fatal=1",
            ],
        );
        assert_eq!(code, 0, "fio {engine}:\n{out}");
        assert!(out.contains("err= 0"), "fio {engine}:\n{out}");
        assert!(!out.contains("verify:"), "fio {engine}:\n{out}");
    }
    assert!(d.stop().success());
}

#[test]
fn fio_reports_the_injected_errno_at_the_rule_offset() {
    let s = Scratch::new(4 * MIB);
    // Sector 2056 is byte 1052672: the 4 KiB block at offset 1052672 (257 * 4096).
    let d = mount(
        &s,
        &["--inject-error", "event=read_aio,errno=EIO,sector=2056"],
    );
    for engine in ["psync", "libaio", "io_uring"] {
        let (code, out) = fio(&s.view(), engine, &["--iodepth=16", "--rw=read"]);
        assert_ne!(code, 0, "fio {engine} should fail:\n{out}");
        assert!(
            out.contains("Input/output error: read offset=1052672, buflen=4096"),
            "fio {engine}:\n{out}"
        );
    }
    assert!(d.stop().success());
}

// -------------------------------------------------------------------------------------- mmap

struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn shared(f: &std::fs::File, len: usize) -> Mapping {
        // SAFETY: a fresh shared mapping of an open file; checked for MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            ptr,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        Mapping {
            ptr: ptr.cast(),
            len,
        }
    }

    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is valid for len bytes until drop.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    fn sync(&self) {
        // SAFETY: msync on our live mapping.
        let r = unsafe { libc::msync(self.ptr.cast(), self.len, libc::MS_SYNC) };
        assert_eq!(r, 0, "msync: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping we created.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

#[test]
fn mmap_shared_reads_and_writes_in_the_default_direct_io_mode() {
    let s = Scratch::new(MIB);
    let d = mount(&s, &[]);
    {
        let f = open_rw(&s.view());
        let mut map = Mapping::shared(&f, MIB);
        assert!(map.bytes() == pattern(MIB).as_slice());
        map.bytes()[4096..8192].fill(0x77);
        map.bytes()[100] = 0x01;
        map.sync();
        // msync wrote through the daemon: the image has the bytes now, before any unmount.
        let img = s.image_bytes();
        assert!(img[4096..8192].iter().all(|&b| b == 0x77));
        assert_eq!(img[100], 0x01);
        // A write through the file is seen by a fresh mapping.
        f.write_all_at(&[0x99; 512], 65536).unwrap();
        let mut fresh = Mapping::shared(&f, MIB);
        assert!(fresh.bytes()[65536..66048].iter().all(|&b| b == 0x99));
    }
    assert!(d.stop().success());
}

#[test]
fn mmap_of_a_faulted_page_delivers_sigbus() {
    let s = Scratch::new(MIB);
    let d = mount(
        &s,
        &["--inject-error", "event=read_aio,errno=EIO,sector=256"],
    );
    // In a child process: the page fault's read fails, and the kernel answers with SIGBUS.
    let script = format!(
        "import mmap, os\n\
         f = os.open('{}', os.O_RDWR)\n\
         m = mmap.mmap(f, 1 << 20, mmap.MAP_SHARED)\n\
         assert m[0] == 1\n\
         print('page 0 ok', flush=True)\n\
         m[256 * 512]\n\
         print('no fault')\n",
        path(&s.view())
    );
    let out = output(
        std::process::Command::new("python3").args(["-c", &script]),
        "python3",
    );
    let text = text(&out);
    use std::os::unix::process::ExitStatusExt;
    assert!(text.contains("page 0 ok"), "{text}");
    assert_eq!(out.status.signal(), Some(libc::SIGBUS), "{text}");
    let log = d.stderr_with("injecting EIO (5) into read at offset");
    assert!(
        log.contains("injecting EIO (5) into read at offset"),
        "{log}"
    );
    assert!(d.stop().success());
}

// ------------------------------------------------------------------------- loop device, ext4

#[test]
fn ext4_on_a_loop_device_with_and_without_direct_io() {
    for direct_io in [false, true] {
        let s = Scratch::new(64 * MIB);
        let d = mount(&s, &["--threads", "2"]);
        let lo = LoopDevice::attach(&s.view(), direct_io);
        tool_ok("mkfs.ext4", &["-q", "-F", &lo.0]);
        let fs = FsMount::mount(&lo.0, &s.dir.path().join("fs"));
        let data: Vec<u8> = (0..3 * MIB).map(|i| (i * 7 % 253) as u8).collect();
        for i in 0..5 {
            std::fs::write(fs.0.join(format!("file{i}")), &data[i * 1000..]).unwrap();
        }
        tool_ok("sync", &[]);
        fs.unmount();
        let (code, out, err) = run_tool("fsck.ext4", &["-n", "-f", &lo.0]);
        assert_eq!(code, 0, "fsck (direct_io={direct_io}):\n{out}{err}");
        // Mounted again, the files are there, byte for byte.
        let fs = FsMount::mount(&lo.0, &s.dir.path().join("fs"));
        for i in 0..5 {
            assert!(std::fs::read(fs.0.join(format!("file{i}"))).unwrap() == data[i * 1000..]);
        }
        fs.unmount();
        drop(lo);
        assert!(d.stop().success());
    }
}

#[test]
fn ext4_reports_an_injected_write_error_and_the_daemon_keeps_serving() {
    let s = Scratch::new(64 * MIB);
    let d = mount(&s, &["--threads", "2"]);
    let lo = LoopDevice::attach(&s.view(), true);
    tool_ok("mkfs.ext4", &["-q", "-F", "-b", "4096", &lo.0]);
    let fs = FsMount::mount(&lo.0, &s.dir.path().join("fs"));
    let file = fs.0.join("victim");
    std::fs::write(&file, vec![0x11u8; 64 * 1024]).unwrap();
    tool_ok("sync", &[]);
    // The file's first block, from the filesystem's own map: physical block * 8 sectors.
    let map = tool_ok("filefrag", &["-v", "-b4096", path(&file)]);
    let block: u64 = map
        .lines()
        .find_map(|l| {
            let cols: Vec<&str> = l.split(':').map(str::trim).collect();
            (cols.len() >= 3 && cols[0] == "0")
                .then(|| cols[2].split("..").next().unwrap().parse().unwrap())
        })
        .unwrap_or_else(|| panic!("no extent in filefrag output:\n{map}"));
    let sector = block * 8;
    let rule = format!("event=write_aio,errno=EIO,sector={sector}");
    ctl(&s.mnt, &["inject-error", &rule]);
    let mark = kernel_log_mark();
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.write_all_at(&[0x22; 4096], 0).unwrap();
    assert_eq!(
        fsync(&f),
        Err(libc::EIO),
        "ext4's fsync reports the failed write-back"
    );
    drop(f);
    let log = kernel_log_since(&mark);
    let dev = lo.0.trim_start_matches("/dev/");
    assert!(
        log.contains(&format!(
            "I/O error, dev {dev}, sector {sector} op 0x1:(WRITE)"
        )),
        "kernel log after the mark:\n{log}"
    );
    let daemon_log = d.stderr_with(&format!("at offset {}", sector * 512));
    assert!(
        daemon_log.contains(&format!("at offset {}", sector * 512)),
        "{daemon_log}"
    );
    // The daemon goes on serving: control, and I/O through the filesystem once cleared.
    ctl(&s.mnt, &["clear"]);
    std::fs::write(fs.0.join("after"), b"still serving").unwrap();
    tool_ok("sync", &[]);
    assert_eq!(std::fs::read(fs.0.join("after")).unwrap(), b"still serving");
    fs.unmount();
    drop(lo);
    assert!(d.stop().success());
}

// ---------------------------------------------------------------------- sparse 1 TiB image

#[test]
fn a_sparse_terabyte_image_stays_sparse_and_reports_its_holes() {
    const TIB: u64 = 1 << 40;
    let s = Scratch::new(0);
    std::fs::File::options()
        .write(true)
        .open(&s.image)
        .unwrap()
        .set_len(TIB)
        .unwrap();
    let d = mount(&s, &["--growable"]);
    let f = open_direct(&s.view());
    assert_eq!(f.metadata().unwrap().len(), TIB);
    let near_end = TIB - 8192;
    assert_eq!(
        pwrite(&f, AlignedBuf::filled(4096, 0xee).as_ref(), near_end),
        Ok(4096)
    );
    // Growable: a write past the end grows the image.
    assert_eq!(
        pwrite(&f, AlignedBuf::filled(4096, 0xef).as_ref(), TIB + 4096),
        Ok(4096)
    );
    assert_eq!(f.metadata().unwrap().len(), TIB + 8192);
    assert_eq!(lseek(&f, 0, libc::SEEK_DATA), Ok(near_end as usize));
    assert_eq!(
        lseek(&f, near_end, libc::SEEK_HOLE),
        Ok((near_end + 4096) as usize)
    );
    assert_eq!(
        lseek(&f, near_end + 4096, libc::SEEK_DATA),
        Ok((TIB + 4096) as usize)
    );
    let mut buf = AlignedBuf::new(4096);
    assert_eq!(pread(&f, buf.as_mut(), near_end), Ok(4096));
    assert!(buf.as_ref().iter().all(|&b| b == 0xee));
    assert_eq!(pread(&f, buf.as_mut(), 1 << 39), Ok(4096));
    assert!(buf.as_ref().iter().all(|&b| b == 0));
    drop(f);
    assert!(d.stop().success());
    let md = std::fs::metadata(&s.image).unwrap();
    assert_eq!(md.len(), TIB + 8192);
    assert!(
        md.blocks() * 512 <= 64 * 1024,
        "backing file allocated {} bytes",
        md.blocks() * 512
    );
}

// ---------------------------------------------------------------------------------------- VM

/// `scripts/vm-test.sh` with this build: a Debian kernel and a busybox initramfs boot in
/// qemu-system-x86_64 with the view as a virtio disk (cache=none), write and read it, and
/// with a read rule at a sector the guest kernel logs the I/O error at exactly that sector.
/// The script installs what it needs and checks everything itself; it takes under a minute.
#[test]
fn vm_boots_from_the_view_and_sees_an_injected_read_error() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/vm-test.sh");
    let mut cmd = std::process::Command::new("bash");
    cmd.arg(&script).env("BLKDEBUGFS", BIN);
    let out = output(&mut cmd, "scripts/vm-test.sh");
    let text = text(&out);
    assert!(out.status.success(), "vm-test.sh failed:\n{text}");
    assert!(text.contains("vm-test: PASS"), "{text}");
    assert!(!text.contains("FAIL "), "{text}");
}
