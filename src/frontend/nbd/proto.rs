//! The NBD wire format (NetworkBlockDevice `doc/proto.md`): constants, and the pure encoding
//! and decoding of the messages this server reads and writes. No I/O here: the handshake and
//! the connection feed it bytes and send what it builds. Every integer is big-endian.

/// `NBDMAGIC`: the first 8 bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// The magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types; errors have bit 31 set.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) | 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) | 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;

// `NBD_INFO_*` items of an INFO/GO reply.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

/// The magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// A request header's size on the wire.
pub const REQUEST_LEN: usize = 28;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_ERROR: u16 = (1 << 15) | 1;
pub const CHUNK_ERROR_OFFSET: u16 = (1 << 15) | 2;

// `base:allocation` status bits.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context served, and the id it is given.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;

/// The errors NBD carries (`proto.md`, "Error values"), with the same numbers as Linux's.
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ESHUTDOWN: u32 = 108;
/// Only for a `FAST_ZERO` write-zeroes that would not be fast (`proto.md`).
pub const NBD_ENOTSUP: u32 = 95;

/// The NBD error an errno is sent as: the seven NBD knows pass, a full quota or file is a
/// full disk, anything else is an I/O error.
pub fn nbd_error(errno: i32) -> u32 {
    match errno {
        libc::EPERM => NBD_EPERM,
        libc::EIO => NBD_EIO,
        libc::ENOMEM => NBD_ENOMEM,
        libc::EINVAL => NBD_EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NBD_ENOSPC,
        libc::EOVERFLOW => NBD_EOVERFLOW,
        libc::ESHUTDOWN => NBD_ESHUTDOWN,
        _ => NBD_EIO,
    }
}

/// A transmission request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

/// Decodes a request header; `None` on a bad magic (the stream cannot be trusted after it).
pub fn decode_request(b: &[u8; REQUEST_LEN]) -> Option<Request> {
    if be32(&b[0..4]) != REQUEST_MAGIC {
        return None;
    }
    Some(Request {
        flags: be16(&b[4..6]),
        kind: be16(&b[6..8]),
        cookie: be64(&b[8..16]),
        offset: be64(&b[16..24]),
        len: be32(&b[24..28]),
    })
}

/// A command's name for log lines.
pub fn command_name(kind: u16) -> &'static str {
    match kind {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        5 => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        8 => "RESIZE",
        _ => "unknown",
    }
}

/// The flags each command may carry; others get EINVAL.
pub fn allowed_flags(kind: u16) -> u16 {
    match kind {
        CMD_READ => CMD_FLAG_DF,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => 0,
    }
}

/// A simple reply: header only (the read data, if any, follows it).
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk's header; `len` is the length of the payload after it.
pub fn chunk_header(cookie: u64, flags: u16, kind: u16, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// The header of an `OFFSET_DATA` chunk carrying `len` data bytes from `offset`, followed
/// by the chunk's own offset field: send the data right after it.
pub fn data_chunk_header(cookie: u64, done: bool, offset: u64, len: usize) -> [u8; 28] {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let mut b = [0u8; 28];
    b[..20].copy_from_slice(&chunk_header(
        cookie,
        flags,
        CHUNK_OFFSET_DATA,
        (8 + len) as u32,
    ));
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    b
}

/// A whole error chunk (the last of its reply): `ERROR`, or `ERROR_OFFSET` when the error
/// is about the bytes from `offset` on.
pub fn error_chunk(cookie: u64, error: u32, message: &str, offset: Option<u64>) -> Vec<u8> {
    let message = &message.as_bytes()[..message.len().min(4096)];
    let mut payload = Vec::with_capacity(6 + message.len() + 8);
    payload.extend_from_slice(&error.to_be_bytes());
    payload.extend_from_slice(&(message.len() as u16).to_be_bytes());
    payload.extend_from_slice(message);
    let kind = match offset {
        Some(offset) => {
            payload.extend_from_slice(&offset.to_be_bytes());
            CHUNK_ERROR_OFFSET
        }
        None => CHUNK_ERROR,
    };
    let mut b = chunk_header(cookie, REPLY_FLAG_DONE, kind, payload.len() as u32).to_vec();
    b.extend_from_slice(&payload);
    b
}

/// A `NONE` chunk: the end of a reply that carries nothing (a read of 0 bytes).
pub fn none_chunk(cookie: u64) -> [u8; 20] {
    chunk_header(cookie, REPLY_FLAG_DONE, CHUNK_NONE, 0)
}

/// A whole `BLOCK_STATUS` chunk for the `base:allocation` context: `(length, status)`
/// extents.
pub fn block_status_chunk(cookie: u64, extents: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * extents.len();
    let mut b = chunk_header(cookie, REPLY_FLAG_DONE, CHUNK_BLOCK_STATUS, len as u32).to_vec();
    b.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
    for (length, status) in extents {
        b.extend_from_slice(&length.to_be_bytes());
        b.extend_from_slice(&status.to_be_bytes());
    }
    b
}

/// The server's first message: `NBDMAGIC`, `IHAVEOPT`, the handshake flags.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// An option reply with its data.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b
}

/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    for v in [min, preferred, max] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b
}

/// `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`: a string item.
pub fn info_text(kind: u16, text: &str) -> Vec<u8> {
    let mut b = kind.to_be_bytes().to_vec();
    b.extend_from_slice(text.as_bytes());
    b
}

/// `NBD_REP_SERVER` data for `LIST`: the export's name.
pub fn server_entry(name: &str) -> Vec<u8> {
    let mut b = (name.len() as u32).to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b
}

/// `NBD_REP_META_CONTEXT` data: the context's id and name.
pub fn meta_context_entry(id: u32, name: &str) -> Vec<u8> {
    let mut b = id.to_be_bytes().to_vec();
    b.extend_from_slice(name.as_bytes());
    b
}

/// The data of an `INFO` or `GO` option: the export name and the information requested.
#[derive(Debug, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub items: Vec<u16>,
}

/// Decodes `INFO`/`GO` data; `None` if its lengths disagree with its size.
pub fn decode_info_request(data: &[u8]) -> Option<InfoRequest> {
    let mut r = Reader(data);
    let name = r.string()?;
    let n = r.u16()? as usize;
    let mut items = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        items.push(r.u16()?);
    }
    r.end()?;
    Some(InfoRequest { name, items })
}

/// The data of `LIST_META_CONTEXT`/`SET_META_CONTEXT`: the export name and the queries.
#[derive(Debug, PartialEq, Eq)]
pub struct MetaRequest {
    pub name: String,
    pub queries: Vec<String>,
}

/// Decodes meta-context option data; `None` if its lengths disagree with its size.
pub fn decode_meta_request(data: &[u8]) -> Option<MetaRequest> {
    let mut r = Reader(data);
    let name = r.string()?;
    let n = r.u32()? as usize;
    let mut queries = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        queries.push(r.string()?);
    }
    r.end()?;
    Some(MetaRequest { name, queries })
}

/// Whether a meta-context query selects `base:allocation` (its whole name, or a prefix of
/// the `base:` namespace, which only `LIST` may use).
pub fn query_matches(query: &str, list: bool) -> bool {
    query == BASE_ALLOCATION || (list && query == "base:")
}

/// Reads length-prefixed fields off option data.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(be16)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(be32)
    }

    /// A u32 length then that many bytes of UTF-8 (at most 4096, as `proto.md` bounds
    /// strings).
    fn string(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        if len > 4096 {
            return None;
        }
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }

    fn end(&self) -> Option<()> {
        self.0.is_empty().then_some(())
    }
}

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

pub fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_bytes(
        magic: u32,
        flags: u16,
        kind: u16,
        cookie: u64,
        off: u64,
        len: u32,
    ) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&magic.to_be_bytes());
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&kind.to_be_bytes());
        b[8..16].copy_from_slice(&cookie.to_be_bytes());
        b[16..24].copy_from_slice(&off.to_be_bytes());
        b[24..28].copy_from_slice(&len.to_be_bytes());
        b
    }

    #[test]
    fn a_request_decodes_and_a_bad_magic_does_not() {
        let b = request_bytes(REQUEST_MAGIC, CMD_FLAG_FUA, CMD_WRITE, 7, 4096, 512);
        assert_eq!(
            decode_request(&b),
            Some(Request {
                flags: CMD_FLAG_FUA,
                kind: CMD_WRITE,
                cookie: 7,
                offset: 4096,
                len: 512
            })
        );
        let b = request_bytes(0x2560_9514, 0, CMD_READ, 7, 0, 512);
        assert_eq!(decode_request(&b), None);
    }

    #[test]
    fn errnos_map_onto_the_seven_nbd_knows() {
        assert_eq!(nbd_error(libc::EIO), NBD_EIO);
        assert_eq!(nbd_error(libc::ENOSPC), NBD_ENOSPC);
        assert_eq!(nbd_error(libc::EDQUOT), NBD_ENOSPC);
        assert_eq!(nbd_error(libc::EFBIG), NBD_ENOSPC);
        assert_eq!(nbd_error(libc::EPERM), NBD_EPERM);
        assert_eq!(nbd_error(libc::EINVAL), NBD_EINVAL);
        assert_eq!(nbd_error(libc::ENOMEM), NBD_ENOMEM);
        assert_eq!(nbd_error(libc::EOVERFLOW), NBD_EOVERFLOW);
        assert_eq!(nbd_error(libc::ESHUTDOWN), NBD_ESHUTDOWN);
        assert_eq!(nbd_error(libc::EROFS), NBD_EIO);
        assert_eq!(nbd_error(libc::ENOTSUP), NBD_EIO);
        assert_eq!(nbd_error(libc::ETIMEDOUT), NBD_EIO);
    }

    #[test]
    fn replies_have_their_fixed_layout() {
        assert_eq!(
            simple_reply(0x0102_0304_0506_0708, 5).to_vec(),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 1, 2, 3, 4, 5, 6, 7, 8].to_vec()
        );
        let chunk = error_chunk(9, NBD_EIO, "bad", Some(4096));
        assert_eq!(chunk.len(), 20 + 4 + 2 + 3 + 8);
        assert_eq!(be32(&chunk[0..4]), STRUCTURED_REPLY_MAGIC);
        assert_eq!(be16(&chunk[4..6]), REPLY_FLAG_DONE);
        assert_eq!(be16(&chunk[6..8]), CHUNK_ERROR_OFFSET);
        assert_eq!(be64(&chunk[8..16]), 9);
        assert_eq!(be32(&chunk[16..20]), 4 + 2 + 3 + 8);
        assert_eq!(be32(&chunk[20..24]), NBD_EIO);
        assert_eq!(be16(&chunk[24..26]), 3);
        assert_eq!(&chunk[26..29], b"bad");
        assert_eq!(be64(&chunk[29..37]), 4096);
        let data = data_chunk_header(3, true, 512, 100);
        assert_eq!(be16(&data[4..6]), REPLY_FLAG_DONE);
        assert_eq!(be16(&data[6..8]), CHUNK_OFFSET_DATA);
        assert_eq!(be32(&data[16..20]), 108);
        assert_eq!(be64(&data[20..28]), 512);
        let bs = block_status_chunk(4, &[(4096, STATE_HOLE | STATE_ZERO)]);
        assert_eq!(be32(&bs[16..20]), 12);
        assert_eq!(be32(&bs[20..24]), BASE_ALLOCATION_ID);
        assert_eq!(be32(&bs[24..28]), 4096);
        assert_eq!(be32(&bs[28..32]), 3);
    }

    #[test]
    fn option_data_decodes_and_lies_about_lengths_do_not() {
        let mut d = Vec::new();
        d.extend_from_slice(&4u32.to_be_bytes());
        d.extend_from_slice(b"disk");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            decode_info_request(&d),
            Some(InfoRequest {
                name: "disk".into(),
                items: vec![INFO_BLOCK_SIZE, INFO_NAME]
            })
        );
        // One byte too many, one too few, a name longer than the data.
        let mut long = d.clone();
        long.push(0);
        assert_eq!(decode_info_request(&long), None);
        assert_eq!(decode_info_request(&d[..d.len() - 1]), None);
        assert_eq!(decode_info_request(&[0, 0, 1, 0]), None);

        let mut m = Vec::new();
        m.extend_from_slice(&0u32.to_be_bytes());
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&15u32.to_be_bytes());
        m.extend_from_slice(b"base:allocation");
        assert_eq!(
            decode_meta_request(&m),
            Some(MetaRequest {
                name: String::new(),
                queries: vec![BASE_ALLOCATION.into()]
            })
        );
        assert_eq!(decode_meta_request(&m[..m.len() - 2]), None);
        assert!(query_matches("base:allocation", false));
        assert!(query_matches("base:", true));
        assert!(!query_matches("base:", false));
        assert!(!query_matches("qemu:dirty-bitmap:x", true));
    }

    #[test]
    fn the_greeting_offers_fixed_newstyle_without_zeroes() {
        let g = greeting();
        assert_eq!(be64(&g[0..8]), NBDMAGIC);
        assert_eq!(be64(&g[8..16]), IHAVEOPT);
        assert_eq!(be16(&g[16..18]), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    }
}
