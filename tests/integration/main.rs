//! Integration tests: every test mounts the real `blkdebugfs` binary on a temporary image
//! and drives real I/O through the kernel. One scenario per test.

mod bounded;
mod clients;
mod control;
mod differential;
mod ecosystem;
mod explore;
mod fault_clients;
mod faults;
mod hardening;
mod memory;
mod nbd;
mod newuser;
mod power;
mod power_clients;
mod power_race;
mod util;

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use util::*;

#[test]
fn plain_mount_serves_the_image_bytes() {
    let s = Scratch::new(MIB);
    let d = mount(&s, &[]);
    let names: Vec<String> = std::fs::read_dir(&s.mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    // The view, and the control file (a dot file, so `ls` and globs skip it).
    assert_eq!(names, vec!["disk.img".to_string(), ".control".to_string()]);
    assert_eq!(std::fs::metadata(s.view()).unwrap().len(), MIB as u64);
    assert_eq!(std::fs::read(s.view()).unwrap(), pattern(MIB));
    // O_DIRECT and buffered writes both land on the image.
    let f = open_direct(&s.view());
    pwrite(&f, AlignedBuf::filled(8192, 0x11).as_ref(), 4096).unwrap();
    let g = open_rw(&s.view());
    g.write_all_at(b"hello", 100_001).unwrap();
    fsync(&g).unwrap();
    drop((f, g));
    let mut expect = pattern(MIB);
    expect[4096..12288].fill(0x11);
    expect[100_001..100_006].copy_from_slice(b"hello");
    assert_eq!(std::fs::read(s.view()).unwrap(), expect);
    assert!(d.stop().success());
    assert_eq!(s.image_bytes(), expect);
    assert!(!is_mounted(&s.mnt));
}

#[test]
fn read_error_at_a_sector_with_direct_and_buffered_io() {
    let s = Scratch::new(MIB);
    let conf = s.config("[inject-error]\nevent = \"read_aio\"\nsector = \"16\"\nerrno = \"28\"\n");
    let d = mount(&s, &["--config", conf.to_str().unwrap()]);
    let direct = open_direct(&s.view());
    let mut b = AlignedBuf::new(4096);
    assert_eq!(pread(&direct, b.as_mut(), 0), Ok(4096));
    assert_eq!(pread(&direct, b.as_mut(), 8192), Err(libc::ENOSPC));
    assert_eq!(pread(&direct, b.as_mut(), 12288), Ok(4096));
    // Buffered reads reach the rules too (direct I/O is the default), every time.
    let buffered = open_rw(&s.view());
    let mut v = vec![0u8; 512];
    for _ in 0..3 {
        assert_eq!(pread(&buffered, &mut v, 8192), Err(libc::ENOSPC));
    }
    assert_eq!(pread(&buffered, &mut v, 8704), Ok(512));
    assert_eq!(v, pattern(MIB)[8704..9216]);
    drop((direct, buffered));
    assert!(
        d.stderr_with("injecting ENOSPC (28) into read")
            .contains("injecting ENOSPC (28) into read"),
        "{}",
        d.stderr()
    );
    assert!(d.stop().success());
}

#[test]
fn a_failed_write_changes_nothing_and_pwritev_done_still_fires() {
    let s = Scratch::new(MIB);
    // pwritev fails the first write; pwritev_done (which fires even then) disarms via a
    // state change, so the second write passes.
    let conf = s.config(
        "[inject-error]\nevent = \"pwritev\"\nstate = \"1\"\nerrno = \"5\"\n\
         [set-state]\nevent = \"pwritev_done\"\nstate = \"1\"\nnew_state = \"2\"\n\
         [inject-error]\nevent = \"pwritev_done\"\nstate = \"1\"\nerrno = \"0\"\n",
    );
    let d = mount(&s, &["-c", conf.to_str().unwrap()]);
    let f = open_direct(&s.view());
    let data = AlignedBuf::filled(4096, 0x77);
    assert_eq!(pwrite(&f, data.as_ref(), 0), Err(libc::EIO));
    let mut b = AlignedBuf::new(4096);
    pread(&f, b.as_mut(), 0).unwrap();
    assert_eq!(
        b.as_ref(),
        &pattern(MIB)[..4096],
        "a failed write must not land"
    );
    assert_eq!(pwrite(&f, data.as_ref(), 0), Ok(4096));
    pread(&f, b.as_mut(), 0).unwrap();
    assert_eq!(b.as_ref(), data.as_ref());
    drop(f);
    assert!(d.stop().success());
}

#[test]
fn state_machine_fails_the_second_write() {
    let s = Scratch::new(MIB);
    let d = mount(
        &s,
        &[
            "--set-state",
            "event=write_aio,state=1,new_state=2",
            "--inject-error",
            "event=write_aio,state=2,errno=ENOSPC,once=on",
        ],
    );
    let f = open_direct(&s.view());
    let data = AlignedBuf::filled(512, 1);
    assert_eq!(pwrite(&f, data.as_ref(), 0), Ok(512));
    assert_eq!(pwrite(&f, data.as_ref(), 0), Err(libc::ENOSPC));
    assert_eq!(pwrite(&f, data.as_ref(), 0), Ok(512));
    drop(f);
    assert!(d.stop().success());
}

#[test]
fn flush_errors_reach_fsync_fdatasync_and_close_only_after_writes() {
    let s = Scratch::new(MIB);
    let conf = s.config("[inject-error]\nevent = \"flush_to_disk\"\nerrno = \"5\"\n");
    let d = mount(&s, &["-c", conf.to_str().unwrap()]);
    let f = open_direct(&s.view());
    // Nothing written: flush_to_disk never fires, nothing to fail.
    assert_eq!(fsync(&f), Ok(0));
    pwrite(&f, AlignedBuf::filled(512, 2).as_ref(), 0).unwrap();
    assert_eq!(fsync(&f), Err(libc::EIO));
    // A failed flush records nothing: the next one fails again, also via fdatasync...
    assert_eq!(fdatasync(&f), Err(libc::EIO));
    // ... and via the flush of close().
    assert_eq!(close(f), Err(libc::EIO));
    assert!(d.stop().success());
}

#[test]
fn punch_hole_and_zero_range_are_write_zeroes() {
    let s = Scratch::new(MIB);
    let conf = s.config(
        "[inject-error]\nevent = \"pwritev_zero\"\nsector = \"64\"\nerrno = \"28\"\n\
         iotype = \"write-zeroes\"\n",
    );
    let d = mount(&s, &["-c", conf.to_str().unwrap()]);
    let f = open_direct(&s.view());
    assert_eq!(fallocate(&f, PUNCH, 0, 8192), Ok(0));
    assert_eq!(fallocate(&f, ZERO, 16384, 4096), Ok(0));
    assert_eq!(fallocate(&f, PUNCH, 32768, 4096), Err(libc::ENOSPC));
    assert_eq!(fallocate(&f, ZERO, 32768, 512), Err(libc::ENOSPC));
    drop(f);
    assert!(d.stop().success());
    let img = s.image_bytes();
    let mut expect = pattern(MIB);
    expect[..8192].fill(0);
    expect[16384..20480].fill(0);
    assert_eq!(img, expect);
}

#[test]
fn seek_data_and_hole_follow_the_backing_file_and_block_status_rules() {
    let s = Scratch::new(0);
    // A sparse 64 MiB image with data only at 32 MiB.
    let img = std::fs::OpenOptions::new()
        .write(true)
        .open(&s.image)
        .unwrap();
    img.set_len(64 << 20).unwrap();
    img.write_all_at(&[9u8; 4096], 32 << 20).unwrap();
    drop(img);
    let conf = s.config(
        "[inject-error]\nevent = \"none\"\nsector = \"131072\"\nerrno = \"5\"\n\
         iotype = \"block-status\"\n",
    );
    let d = mount(&s, &["-c", conf.to_str().unwrap()]);
    let f = open_rw(&s.view());
    // The rule's byte 64 MiB is past the end: never matches; 0 is a hole here.
    assert_eq!(lseek(&f, 0, libc::SEEK_DATA), Ok(32 << 20));
    assert_eq!(lseek(&f, 32 << 20, libc::SEEK_HOLE), Ok((32 << 20) + 4096));
    drop(f);
    assert!(d.stop().success());

    let conf = s.config(
        "[inject-error]\nevent = \"none\"\nsector = \"2048\"\nerrno = \"5\"\n\
         iotype = \"block-status\"\n",
    );
    let d = mount(&s, &["-c", conf.to_str().unwrap()]);
    let f = open_rw(&s.view());
    // [0, end) contains byte 1 MiB: SEEK_DATA from 0 fails; from 2 MiB it does not.
    assert_eq!(lseek(&f, 0, libc::SEEK_DATA), Err(libc::EIO));
    assert_eq!(lseek(&f, 2 << 20, libc::SEEK_DATA), Ok(32 << 20));
    // Reads are not block-status: unaffected.
    let mut v = [0u8; 512];
    assert_eq!(pread(&f, &mut v, 1 << 20), Ok(512));
    drop(f);
    assert!(d.stop().success());
}

#[test]
fn unaligned_writes_read_modify_write_with_align() {
    let s = Scratch::new(MIB);
    // The read-modify-write read of the head block (sector 8 = byte 4096) fails.
    let conf = s.config(
        "[inject-error]\nevent = \"pwritev_rmw_head\"\nsector = \"8\"\nerrno = \"5\"\n\
         iotype = \"read\"\n",
    );
    let d = mount(&s, &["-c", conf.to_str().unwrap(), "--align", "4096"]);
    let f = open_rw(&s.view());
    // QEMU ignores a failed read-modify-write read (the write succeeds); so do we, but we
    // never write back bytes we failed to read.
    assert_eq!(pwrite(&f, b"abc", 4096 + 100), Ok(3));
    assert!(
        d.stderr_with("ignored, as QEMU ignores")
            .contains("ignored, as QEMU ignores"),
        "{}",
        d.stderr()
    );
    // The tail-only write touches no head block; the sticky rule only matches sector 8.
    assert_eq!(pwrite(&f, b"xyz", 8192), Ok(3));
    assert_eq!(pwrite(&f, b"q", 0), Ok(1));
    drop(f);
    assert!(d.stop().success());
    let mut expect = pattern(MIB);
    expect[4196..4199].copy_from_slice(b"abc");
    expect[8192..8195].copy_from_slice(b"xyz");
    expect[0] = b'q';
    assert_eq!(s.image_bytes(), expect);
}

#[test]
fn max_transfer_splits_reads_into_chunks_with_one_event_each() {
    let s = Scratch::new(MIB);
    // Fail only the third read_aio: two set-state steps count the chunks.
    let conf = s.config(
        "[set-state]\nevent = \"read_aio\"\nstate = \"1\"\nnew_state = \"2\"\n\
         [set-state]\nevent = \"read_aio\"\nstate = \"2\"\nnew_state = \"3\"\n\
         [inject-error]\nevent = \"read_aio\"\nstate = \"3\"\nerrno = \"28\"\n",
    );
    let d = mount(
        &s,
        &["-c", conf.to_str().unwrap(), "--max-transfer", "4096"],
    );
    let f = open_direct(&s.view());
    let mut b = AlignedBuf::new(16384);
    // Chunks 1 and 2 pass; chunk 3 (the third read_aio) fails the whole read.
    assert_eq!(pread(&f, b.as_mut(), 0), Err(libc::ENOSPC));
    drop(f);
    assert!(d.stop().success());
}

#[test]
fn truncate_and_growable_writes_change_the_size() {
    let s = Scratch::new(MIB);
    let d = mount(&s, &["--growable"]);
    let f = open_rw(&s.view());
    f.write_all_at(b"end", (2 * MIB) as u64).unwrap();
    assert_eq!(
        std::fs::metadata(s.view()).unwrap().len(),
        2 * MIB as u64 + 3
    );
    f.set_len(4096).unwrap();
    assert_eq!(std::fs::metadata(&s.image).unwrap().len(), 4096);
    drop(f);
    assert!(d.stop().success());

    // Without --growable a write past the end is short, and at the end it is ENOSPC.
    let d = mount(&s, &[]);
    let f = open_rw(&s.view());
    assert_eq!(pwrite(&f, &[1u8; 100], 4096 - 10), Ok(10));
    assert_eq!(pwrite(&f, &[1u8; 100], 4096), Err(libc::ENOSPC));
    drop(f);
    assert!(d.stop().success());
}

#[test]
fn read_only_mount_refuses_writes() {
    let s = Scratch::new(MIB);
    let d = mount(&s, &["--read-only"]);
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(s.view())
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS));
    assert_eq!(std::fs::read(s.view()).unwrap(), pattern(MIB));
    assert!(d.stop().success());
}

#[test]
fn mounting_onto_a_regular_file_and_blkdebug_filename_syntax() {
    let s = Scratch::new(MIB);
    let conf = s.config("[inject-error]\nevent = \"read_aio\"\nerrno = \"ENOSPC\"\n");
    let target = s.dir.path().join("export");
    std::fs::write(&target, b"").unwrap();
    let spec = format!("blkdebug:{}:{}", conf.display(), s.image.display());
    let d = Daemon::start(&target, &[&spec, target.to_str().unwrap()]);
    assert_eq!(std::fs::metadata(&target).unwrap().len(), MIB as u64);
    let f = open_rw(&target);
    let mut v = [0u8; 512];
    assert_eq!(pread(&f, &mut v, 0), Err(libc::ENOSPC));
    drop(f);
    assert!(d.stop().success());
    assert_eq!(std::fs::metadata(&target).unwrap().len(), 0);
}

#[test]
fn concurrent_readers_and_writers_see_consistent_bytes() {
    let s = Scratch::new(8 * MIB);
    let d = mount(&s, &["--threads", "4"]);
    let view = Arc::new(s.view());
    let handles: Vec<_> = (0..6u8)
        .map(|t| {
            let view = view.clone();
            std::thread::spawn(move || {
                let f = if t % 2 == 0 {
                    open_direct(&view)
                } else {
                    open_rw(&view)
                };
                let region = t as u64 * MIB as u64;
                let mut buf = AlignedBuf::new(65536);
                for i in 0..16u64 {
                    let off = region + i * 65536;
                    let data = AlignedBuf::filled(65536, t * 16 + i as u8 + 1);
                    assert_eq!(pwrite(&f, data.as_ref(), off), Ok(65536));
                    assert_eq!(pread(&f, buf.as_mut(), off), Ok(65536));
                    assert_eq!(buf.as_ref(), data.as_ref(), "thread {t} chunk {i}");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("worker thread");
    }
    assert!(d.stop().success());
    let img = s.image_bytes();
    let mut expect = pattern(8 * MIB);
    for t in 0..6u8 {
        for i in 0..16usize {
            let off = t as usize * MIB + i * 65536;
            expect[off..off + 65536].fill(t * 16 + i as u8 + 1);
        }
    }
    assert!(img == expect, "image differs from what the threads wrote");
}

#[test]
fn sigterm_sigint_and_umount_each_end_the_daemon_cleanly() {
    let s = Scratch::new(MIB);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        let mut d = mount(&s, &[]);
        // A client holding the file open must not keep the daemon alive.
        let f = open_rw(&s.view());
        d.signal(sig);
        let status = d.wait_exit();
        assert!(status.success(), "signal {sig}: {status}\n{}", d.stderr());
        assert!(!is_mounted(&s.mnt));
        drop(f);
    }
    let mut d = mount(&s, &[]);
    let st = std::process::Command::new("umount")
        .arg(&s.mnt)
        .status()
        .unwrap();
    assert!(st.success());
    assert!(d.wait_exit().success());
}

#[test]
fn daemonize_returns_once_mounted_and_writes_a_pidfile() {
    let s = Scratch::new(MIB);
    let pidfile = s.dir.path().join("pid");
    let (code, _, err) = run_cli(&[
        "mount",
        s.image.to_str().unwrap(),
        s.mnt.to_str().unwrap(),
        "--daemonize",
        "--pidfile",
        pidfile.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(is_mounted(&s.mnt), "not mounted when --daemonize returned");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(std::fs::read(s.view()).unwrap().len(), MIB);
    // SAFETY: SIGTERM to the daemon this test started (its PID from the pidfile).
    unsafe { libc::kill(pid, libc::SIGTERM) };
    assert!(wait_for(DEADLINE, || !is_mounted(&s.mnt)));
    assert!(wait_for(DEADLINE, || !pidfile.exists()));
    // A daemonize that cannot mount says why and fails.
    let (code, _, err) = run_cli(&[
        "mount",
        "/nonexistent/img",
        s.mnt.to_str().unwrap(),
        "--daemonize",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/img"), "{err}");
}

#[test]
fn bad_rules_exit_2_naming_file_line_section_key_and_value() {
    let s = Scratch::new(4096);
    let conf = s.config("[inject-error]\nevent = \"read_aio\"\nerrno = \"600\"\n");
    let (code, _, err) = run_cli(&[
        "mount",
        s.image.to_str().unwrap(),
        s.mnt.to_str().unwrap(),
        "-c",
        conf.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    let expected = format!(
        "{}:3: [inject-error] errno = \"600\": errno must be 0..511",
        conf.display()
    );
    assert!(err.contains(&expected), "{err}");
    assert!(!is_mounted(&s.mnt));

    for (args, needle) in [
        (
            vec!["--inject-error", "event=nope"],
            "event = \"nope\": unknown event",
        ),
        (
            vec!["--inject-error", "event=read_aio,errno=-1"],
            "must not be negative",
        ),
        (vec!["--set-state", "event=none,new_stat=2"], "new_stat"),
        (vec!["--align", "3000"], "power of two"),
        (
            vec!["--align", "4096", "--max-transfer", "5000"],
            "--max-transfer",
        ),
        (vec!["-c", "/nonexistent.ini"], "/nonexistent.ini"),
    ] {
        let mut full = vec!["mount", s.image.to_str().unwrap(), s.mnt.to_str().unwrap()];
        full.extend(args.iter());
        let (code, _, err) = run_cli(&full);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let (code, _, err) = run_cli(&["mount", "/nonexistent.img", s.mnt.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("/nonexistent.img") && err.contains("No such file"),
        "{err}"
    );
    let (code, _, err) = run_cli(&["mount", s.image.to_str().unwrap(), "/nonexistent-dir"]);
    assert_eq!(code, 1);
    assert!(err.contains("mount point /nonexistent-dir"), "{err}");
    assert!(!is_mounted(&s.mnt));
}

#[test]
fn a_second_mount_on_the_same_mount_point_is_refused() {
    let s = Scratch::new(MIB);
    let d = mount(&s, &[]);
    let (code, _, err) = run_cli(&["mount", s.image.to_str().unwrap(), s.mnt.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("already a mount point"), "{err}");
    assert!(d.stop().success());
}

#[test]
fn check_prints_rules_and_warns_about_rules_that_never_fire() {
    let s = Scratch::new(4096);
    let conf = s.config(
        "[inject-error]\nevent = \"l2_load\"\n[inject-error]\nevent = \"read_aio\"\n\
         iotype = \"discard\"\nsector = \"8\"\nonce = \"on\"\n",
    );
    let (code, out, err) = run_cli(&["check", "-c", conf.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("rule   1: event=l2_load state=any inject-error errno=EIO (5)"),
        "{out}"
    );
    assert!(
        out.contains("rule   2: event=read_aio state=any inject-error errno=EIO (5) range=sector 8 (byte 4096) iotype=discard once=on"),
        "{out}"
    );
    assert!(
        out.contains("warning: rule 1") && out.contains("never fires"),
        "{out}"
    );
    assert!(
        out.contains("warning: rule 2") && out.contains("discard"),
        "{out}"
    );
}

/// Large reads are answered from a mapping of the image (one copy instead of two). On a
/// tmpfs image: the bytes are right, holes read as zeroes and stay holes, reads after a
/// shrink see the new end, and rules still see every request.
#[test]
fn large_reads_match_the_image_and_keep_a_tmpfs_image_sparse() {
    use std::os::unix::fs::MetadataExt;
    let s = Scratch::new(0);
    let Ok(shm) = tempfile::tempdir_in("/dev/shm") else {
        eprintln!("no /dev/shm here: nothing to test");
        return;
    };
    let image = shm.path().join("disk.img");
    let data = pattern(4 * MIB);
    std::fs::write(&image, &data).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(8 * MIB as u64)
        .unwrap();
    let blocks = std::fs::metadata(&image).unwrap().blocks();
    let view = s.mnt.join("disk.img");
    let args = [
        image.to_str().unwrap(),
        s.mnt.to_str().unwrap(),
        "--inject-error",
        "event=read_aio,errno=EIO,sector=10240",
    ];
    let d = Daemon::start(&s.mnt, &args);
    let f = open_direct(&view);
    let mut buf = AlignedBuf::new(MIB);
    for i in 0..8 {
        let r = pread(&f, buf.as_mut(), (i * MIB) as u64);
        if i == 5 {
            // Sector 10240 is byte 5 MiB: the rule still sees the large read.
            assert_eq!(r, Err(libc::EIO));
            continue;
        }
        assert_eq!(r, Ok(MIB), "read {i}");
        let want: &[u8] = if i < 4 {
            &data[i * MIB..(i + 1) * MIB]
        } else {
            &[0; MIB]
        };
        assert!(buf.as_ref() == want, "bytes of read {i}");
    }
    assert_eq!(
        std::fs::metadata(&image).unwrap().blocks(),
        blocks,
        "holes stay holes"
    );
    // Shrink through the view, then read across and past the new end.
    f.set_len(3 * MIB as u64 / 2).unwrap();
    assert_eq!(pread(&f, buf.as_mut(), MIB as u64), Ok(MIB / 2));
    assert!(buf.as_ref()[..MIB / 2] == data[MIB..3 * MIB / 2]);
    assert_eq!(pread(&f, buf.as_mut(), 2 * MIB as u64), Ok(0));
    drop(f);
    assert!(d.stop().success());
}
