//! The media model, timed without FUSE (`spec/faults.md` §4, §5): what `--write-cache` costs
//! per write, how long a power cut of 1 GiB unsynced over a 1 TiB sparse image takes, how
//! long a million bad sectors take to load and what a request outside them pays. This is a
//! measurement, not a test: nothing here asserts a time. `BENCH_GIB` (default 1) sets the
//! unsynced size (16 MiB when run by `cargo test`). It also times what recording (`--record`,
//! `explore`) adds to the write cache on 4 KiB random writes. The journal lives beside a sparse image in a temporary directory under
//! `BENCH_DIR` (default the system's temporary directory: put it on the disk you care about).

use std::hint::black_box;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::time::Instant;

use blkdebugfs::media::record::{Content, Recorder};
use blkdebugfs::media::{BadSectors, BadSettings, CutMode, WriteCache};
use blkdebugfs::ranges::SectorSet;

const TIB: u64 = 1 << 40;
const CHUNK: u64 = 1 << 20;

fn main() {
    // `cargo bench` passes `--bench`; without it (`cargo test --all-targets`) this is a smoke
    // run: 16 MiB unsynced instead of BENCH_GIB (default 1) GiB.
    let full = std::env::args().any(|a| a == "--bench");
    let gib: u64 = std::env::var("BENCH_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let unsynced_mib = if full { gib * 1024 } else { 16 };
    let base =
        std::env::var("BENCH_DIR").unwrap_or_else(|_| std::env::temp_dir().display().to_string());
    let dir = tempfile::tempdir_in(&base).expect("temporary directory");
    let path = dir.path().join("sparse.img");
    let image = std::fs::File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .expect("image");
    image.set_len(TIB).expect("1 TiB sparse image");
    let cache = WriteCache::new(&path, None).expect("journal");

    // 4 KiB writes over data (the common case: the before-image is real data).
    let block = vec![0x5au8; 4096];
    let plain_n = 20_000u64;
    let t = Instant::now();
    for i in 0..plain_n {
        image.write_all_at(&block, i * 4096).unwrap();
    }
    let plain = t.elapsed().as_nanos() as f64 / plain_n as f64;
    let t = Instant::now();
    for i in 0..plain_n {
        let at = i * 4096;
        cache
            .write(
                &image,
                at,
                4096,
                cache.cycle(),
                Content::Bytes(&block),
                || image.write_all_at(&block, at),
            )
            .unwrap();
    }
    let journaled = t.elapsed().as_nanos() as f64 / plain_n as f64;
    println!(
        "write-cache 4k write over data: {journaled:.0} ns/write (plain pwrite {plain:.0} ns, \
         {:.2}x)",
        journaled / plain
    );
    let ticket = cache.begin_flush(cache.cycle()).unwrap();
    cache.end_flush(ticket).unwrap();

    // Recording on top of the cache: 4 KiB writes at random places over the data written
    // above (the first write to a sector also keeps its before-image), a flush every 64.
    let random_writes = |cache: &WriteCache| {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let t = Instant::now();
        for i in 0..plain_n {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x % plain_n) * 4096;
            cache
                .write(
                    &image,
                    at,
                    4096,
                    cache.cycle(),
                    Content::Bytes(&block),
                    || image.write_all_at(&block, at),
                )
                .unwrap();
            if i % 64 == 63 {
                let ticket = cache.begin_flush(cache.cycle()).unwrap();
                cache.end_flush(ticket).unwrap();
            }
        }
        t.elapsed().as_nanos() as f64 / plain_n as f64
    };
    let alone = random_writes(&cache);
    let rec_dir = dir.path().join("recording");
    let recorder = Recorder::create(&rec_dir, None).expect("recording");
    recorder.arm_start(0).expect("a new recording");
    let recording = WriteCache::new(&path, Some(recorder)).expect("journal");
    let ticket = recording.begin_flush(recording.cycle()).unwrap();
    recording.end_flush(ticket).unwrap();
    let recorded = random_writes(&recording);
    println!(
        "recording: 4k random writes (a flush every 64): {recorded:.0} ns/write, the write \
         cache alone {alone:.0} ns ({:.2}x)",
        recorded / alone
    );
    drop(recording);

    // 1 GiB unsynced in 1 MiB writes spread over the terabyte (holes before each).
    let data = vec![0xa5u8; CHUNK as usize];
    let writes = unsynced_mib;
    let stride = TIB / writes;
    let t = Instant::now();
    for i in 0..writes {
        let at = i * stride;
        cache
            .write(
                &image,
                at,
                CHUNK,
                cache.cycle(),
                Content::Bytes(&data),
                || image.write_all_at(&data, at),
            )
            .unwrap();
    }
    let wrote = t.elapsed();
    let u = cache.unsynced();
    let t = Instant::now();
    let report = cache.cut(&image, CutMode::Lose, 1).expect("cut");
    let cut = t.elapsed();
    let allocated = std::fs::metadata(&path).unwrap().blocks() * 512;
    println!(
        "power cut (lose) of {} unsynced write(s), {} MiB over a 1 TiB sparse image: {:.2} s \
         (writing them took {:.2} s; {} lost; image allocation after the cut {} MiB)",
        u.writes,
        u.bytes >> 20,
        cut.as_secs_f64(),
        wrote.as_secs_f64(),
        report.lost.len(),
        allocated >> 20
    );
    cache.power_on();

    // A million scattered bad sectors: load, then check requests outside and inside them.
    let t = Instant::now();
    let mut set = SectorSet::new();
    for i in 0..1_000_000u64 {
        set.insert(1_000_000 + 2 * i, 1_000_000 + 2 * i);
    }
    let bad = BadSectors::new(set, BadSettings::default());
    println!(
        "1,000,000 bad sectors loaded in {:.3} s",
        t.elapsed().as_secs_f64()
    );
    for (what, offset) in [("outside", 0u64), ("among", 1_000_001 * 512)] {
        let n = 1_000_000u64;
        let t = Instant::now();
        for i in 0..n {
            black_box(bad.check_read(black_box(offset), 4096));
            let _ = i;
        }
        println!(
            "bad-sector check of a 4k read {what} them: {:.0} ns",
            t.elapsed().as_nanos() as f64 / n as f64
        );
    }
    let empty = BadSectors::default();
    let n = 1_000_000u64;
    let t = Instant::now();
    for i in 0..n {
        black_box(empty.check_read(black_box(i * 4096), 4096));
    }
    println!(
        "bad-sector check with none: {:.1} ns",
        t.elapsed().as_nanos() as f64 / n as f64
    );
}
