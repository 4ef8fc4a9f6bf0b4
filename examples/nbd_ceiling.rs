//! The fastest an NBD server can serve a file on this machine: the bound any server's IOPS
//! meet, measured rather than argued. No engine, no faults, no threads, no structured
//! replies: one connection at a time, one loop that reads everything the socket holds in one
//! `read` (up to 4 MiB), runs every whole request in it (a `pread` or `pwrite` each), and
//! sends their replies in one `write` per `NBD_CEILING_BATCH` requests (default: all of
//! them) before it reads again. Nothing a real server must do (checks, flags, parking,
//! replies out of order, a second connection, a request larger than the buffer) is here, so
//! its IOPS bound what `fio --ioengine=nbd` gets from any server on the same CPUs.
//!
//! ```text
//! cargo build --release --example nbd_ceiling
//! NBD_CEILING_BATCH=4 bash scripts/nbd-ab.sh target/release/blkdebugfs \
//!     target/release/examples/nbd_ceiling 5 6 rw16
//! ```
//!
//! A server that sleeps on its socket pays the client's wake-up on every request at depth 1
//! (tens of microseconds between CPUs here), so with `NBD_CEILING_SPIN=1` it never sleeps:
//! it spins on a non-blocking socket, the bound at depth 1 when it has a CPU to itself (and
//! no bound at all when it shares one with the client).
//!
//! It takes blkdebugfs's command line shape (`serve IMAGE --listen unix:PATH`, other
//! arguments ignored) so `nbd-ab.sh` and `bench.sh` run it as one more server. With
//! `NBD_CEILING_DISCARD=1` it skips the `pread`s and `pwrite`s: the bound set by the socket
//! and the client alone.

use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const FLAG_HAS_FLAGS: u16 = 1;
const FLAG_SEND_FLUSH: u16 = 4;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const HEADER: usize = 28;
const BUFFER: usize = 4 << 20;

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let image = args
        .get(2)
        .expect("usage: nbd_ceiling serve IMAGE --listen unix:PATH");
    let listen = args
        .iter()
        .position(|a| a == "--listen")
        .and_then(|i| args.get(i + 1))
        .and_then(|l| l.strip_prefix("unix:"))
        .expect("--listen unix:PATH");
    let env = |name| std::env::var(name).ok();
    let settings = Settings {
        discard: env("NBD_CEILING_DISCARD").is_some_and(|v| v == "1"),
        spin: env("NBD_CEILING_SPIN").is_some_and(|v| v == "1"),
        batch: env("NBD_CEILING_BATCH")
            .and_then(|b| b.parse().ok())
            .unwrap_or(usize::MAX),
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)?;
    let size = file.metadata()?.len();
    let listener = UnixListener::bind(listen)?;
    for client in listener.incoming() {
        let mut client = client?;
        // A client that breaks the protocol only ends its own connection.
        if let Err(e) =
            handshake(&mut client, size).and_then(|()| serve(&mut client, &file, &settings))
        {
            eprintln!("nbd_ceiling: connection ended: {e}");
        }
    }
    Ok(())
}

fn handshake(s: &mut UnixStream, size: u64) -> io::Result<()> {
    let mut hello = b"NBDMAGIC".to_vec();
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&3u16.to_be_bytes()); // fixed newstyle, no zeroes
    s.write_all(&hello)?;
    let mut client_flags = [0; 4];
    s.read_exact(&mut client_flags)?;
    let flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH;
    loop {
        let mut head = [0; 16];
        s.read_exact(&mut head)?;
        let option = u32::from_be_bytes(head[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(head[12..16].try_into().unwrap());
        io::copy(&mut (&mut *s).take(len.into()), &mut io::sink())?;
        match option {
            OPT_EXPORT_NAME => {
                let mut info = size.to_be_bytes().to_vec();
                info.extend_from_slice(&flags.to_be_bytes());
                return s.write_all(&info);
            }
            OPT_GO => {
                let mut export = 0u16.to_be_bytes().to_vec();
                export.extend_from_slice(&size.to_be_bytes());
                export.extend_from_slice(&flags.to_be_bytes());
                option_reply(s, option, REP_INFO, &export)?;
                return option_reply(s, option, REP_ACK, &[]);
            }
            OPT_ABORT => return Err(io::Error::other("client aborted")),
            _ => option_reply(s, option, REP_ERR_UNSUP, &[])?,
        }
    }
}

fn option_reply(s: &mut UnixStream, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut reply = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    reply.extend_from_slice(&option.to_be_bytes());
    reply.extend_from_slice(&kind.to_be_bytes());
    reply.extend_from_slice(&(data.len() as u32).to_be_bytes());
    reply.extend_from_slice(data);
    s.write_all(&reply)
}

/// Reads all the socket holds, runs every whole request in it, replies to them in one write.
/// What the environment chose (see the module doc).
struct Settings {
    discard: bool,
    spin: bool,
    batch: usize,
}

fn serve(s: &mut UnixStream, file: &std::fs::File, settings: &Settings) -> io::Result<()> {
    let &Settings {
        discard,
        spin,
        batch,
    } = settings;
    s.set_nonblocking(spin)?;
    let mut input = vec![0u8; BUFFER];
    let mut output = Vec::with_capacity(BUFFER);
    let mut filled = 0;
    loop {
        let n = match s.read(&mut input[filled..]) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::hint::spin_loop();
                continue;
            }
            r => r?,
        };
        if n == 0 {
            return Ok(());
        }
        filled += n;
        let mut at = 0;
        let mut unsent = 0;
        while filled - at >= HEADER {
            let h = &input[at..at + HEADER];
            if u32::from_be_bytes(h[0..4].try_into().unwrap()) != REQUEST_MAGIC {
                return Err(io::Error::other("bad request magic"));
            }
            let kind = u16::from_be_bytes(h[6..8].try_into().unwrap());
            let cookie: [u8; 8] = h[8..16].try_into().unwrap();
            let offset = u64::from_be_bytes(h[16..24].try_into().unwrap());
            let len = u32::from_be_bytes(h[24..28].try_into().unwrap()) as usize;
            let payload = if kind == CMD_WRITE { len } else { 0 };
            if payload > BUFFER - HEADER {
                return Err(io::Error::other("request larger than the buffer"));
            }
            if filled - at < HEADER + payload {
                break;
            }
            let mut error = 0u32;
            let reply_at = output.len();
            output.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            output.extend_from_slice(&0u32.to_be_bytes());
            output.extend_from_slice(&cookie);
            match kind {
                CMD_READ => {
                    let data_at = output.len();
                    output.resize(data_at + len, 0);
                    if !discard && file.read_exact_at(&mut output[data_at..], offset).is_err() {
                        output.truncate(data_at);
                        error = libc::EIO as u32;
                    }
                }
                CMD_WRITE => {
                    let data = &input[at + HEADER..at + HEADER + len];
                    if !discard && file.write_all_at(data, offset).is_err() {
                        error = libc::EIO as u32;
                    }
                }
                CMD_FLUSH => {
                    if file.sync_data().is_err() {
                        error = libc::EIO as u32;
                    }
                }
                CMD_DISC => return send(s, &output[..reply_at]),
                _ => error = libc::EINVAL as u32,
            }
            output[reply_at + 4..reply_at + 8].copy_from_slice(&error.to_be_bytes());
            at += HEADER + payload;
            unsent += 1;
            if unsent == batch {
                send(s, &output)?;
                output.clear();
                unsent = 0;
            }
        }
        input.copy_within(at..filled, 0);
        filled -= at;
        if !output.is_empty() {
            send(s, &output)?;
            output.clear();
        }
    }
}

/// Writes all of `data`, also to a non-blocking socket (spinning while it is full).
fn send(s: &mut UnixStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match s.write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
