//! How a Rust test suite uses blkdebugfs as a library: mount a faulty view of an image
//! in-process, check that the code under test reports each fault, and let the handle unmount.
//!
//! The "code under test" here is `save`, which writes a record and makes it durable; a
//! storage engine's tests would call their own code instead. Run as root (FUSE mounts):
//!
//! ```text
//! cargo run --example fault_injection
//! ```

use std::error::Error;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use blkdebugfs::Builder;
use blkdebugfs::builder::inject_error;
use blkdebugfs::rules::Event;

/// The code under test: writes `record` at `offset` and makes it durable.
fn save(disk: &Path, offset: u64, record: &[u8]) -> io::Result<()> {
    let f = OpenOptions::new().write(true).open(disk)?;
    f.write_all_at(record, offset)?;
    f.sync_data()
}

/// A flush that reaches the disk fails once, in QEMU's blkdebug syntax.
const FLUSH_FAILS_ONCE: &str = "
[inject-error]
event = \"flush_to_disk\"
errno = \"5\"
once = \"on\"
";

fn errno(r: io::Result<()>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

fn main() -> Result<(), Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20])?;

    let mnt = Builder::new(&image)
        .config(FLUSH_FAILS_ONCE)
        .seed(7)
        .mount()?;
    println!(
        "mounted {} at {}",
        image.display(),
        mnt.mountpoint().display()
    );
    let disk = mnt.view().to_path_buf();

    // 1. The failed flush is reported, once; the retry succeeds.
    assert_eq!(errno(save(&disk, 0, b"first")), Some(libc::EIO));
    save(&disk, 0, b"first")?;
    println!("1. a failed flush is reported as EIO, and the retry succeeds");

    // 2. A typed rule added while mounted: writes covering sector 8 fail with ENOSPC.
    let rule = mnt.add_rule(inject_error(Event::WriteAio, libc::ENOSPC, Some(8)))?;
    assert_eq!(errno(save(&disk, 8 * 512, b"second")), Some(libc::ENOSPC));
    save(&disk, 0, b"elsewhere")?;
    mnt.remove(rule).ok_or("rule vanished")?;
    save(&disk, 8 * 512, b"second")?;
    println!("2. rule {rule}: ENOSPC at sector 8 only, until removed");

    // 3. A breakpoint: the next write waits until the test lets it go.
    mnt.break_on(Event::WriteAio, "hold");
    let writer = {
        let disk = disk.clone();
        std::thread::spawn(move || save(&disk, 4096, b"third"))
    };
    mnt.wait_break("hold", Some(Duration::from_secs(30)))?;
    println!("3. suspended: {}", mnt.ctl("list")?.replace('\n', "; "));
    assert!(mnt.resume("hold"));
    writer.join().map_err(|_| "writer panicked")??;

    let stats = mnt.stats();
    println!("stats: {stats:?}");
    mnt.unmount()?;
    let bytes = std::fs::read(&image)?;
    assert_eq!(&bytes[4096..4101], b"third");
    println!("unmounted; the image holds every record that reported success");
    Ok(())
}
