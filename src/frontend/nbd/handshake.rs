//! The fixed newstyle handshake: the greeting, then one option at a time until the client
//! picks the export (`GO` or `EXPORT_NAME`), aborts or breaks the protocol. Every option is
//! answered by the protocol's own reply or error; only what leaves the stream untrustworthy
//! (a bad magic, unknown client flags, an option too long to read) ends the connection.

use std::io::{self, Read};

use log::debug;

use super::proto::*;
use super::sock::Sock;

/// Longest option data read; longer is a broken or hostile client (real options are a few
/// hundred bytes at most: strings are bounded to 4 KiB).
const MAX_OPTION: u32 = 64 * 1024;

/// What the server offers.
pub struct Export {
    pub name: String,
    pub description: String,
    pub size: u64,
    pub read_only: bool,
}

impl Export {
    /// The transmission flags of this export.
    pub fn flags(&self) -> u16 {
        let mut flags = TF_HAS_FLAGS
            | TF_SEND_FLUSH
            | TF_SEND_FUA
            | TF_SEND_TRIM
            | TF_SEND_WRITE_ZEROES
            | TF_SEND_FAST_ZERO
            | TF_CAN_MULTI_CONN;
        if self.read_only {
            flags |= TF_READ_ONLY;
        }
        flags
    }

    /// Whether `name` names this export (the empty name is the default export).
    fn is_named(&self, name: &str) -> bool {
        name.is_empty() || name == self.name
    }
}

/// What the client negotiated, for the transmission phase.
#[derive(Clone, Copy, Debug)]
pub struct Session {
    pub structured: bool,
    pub base_allocation: bool,
    pub size: u64,
}

/// The largest request payload (a write) and read served, as `NBD_INFO_BLOCK_SIZE` says.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// How a handshake ended without a session.
#[derive(Debug)]
pub enum Ended {
    /// The client aborted, or asked for an export that does not exist by `EXPORT_NAME`.
    Quietly,
    /// The client broke the protocol (what it did, for the log).
    Broken(String),
    /// The socket failed or closed.
    Io(io::Error),
}

impl From<io::Error> for Ended {
    fn from(e: io::Error) -> Ended {
        Ended::Io(e)
    }
}

/// Runs the handshake on `sock` (`reader` reads from it); the session, or how it ended.
pub fn negotiate(sock: &Sock, reader: &mut impl Read, export: &Export) -> Result<Session, Ended> {
    sock.send_all(&[&greeting()])?;
    let mut b = [0u8; 4];
    reader.read_exact(&mut b)?;
    let client = be32(&b);
    if client & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(Ended::Broken(format!("unknown client flags {client:#x}")));
    }
    let fixed = client & CLIENT_FIXED_NEWSTYLE != 0;
    let no_zeroes = client & CLIENT_NO_ZEROES != 0;
    let mut structured = false;
    let mut base_allocation = false;
    loop {
        let mut h = [0u8; 16];
        reader.read_exact(&mut h)?;
        if be64(&h[0..8]) != IHAVEOPT {
            return Err(Ended::Broken("bad option magic".into()));
        }
        let option = be32(&h[8..12]);
        let len = be32(&h[12..16]);
        if len > MAX_OPTION {
            return Err(Ended::Broken(format!(
                "option {option} with {len} bytes of data"
            )));
        }
        let mut data = vec![0u8; len as usize];
        reader.read_exact(&mut data)?;
        debug!("NBD option {option} ({len} bytes)");
        let reply = |kind: u32, data: &[u8]| sock.send_all(&[&option_reply(option, kind, data)]);
        let refuse = |kind: u32, why: &str| reply(kind, why.as_bytes());
        if !fixed && option != OPT_EXPORT_NAME {
            // A client that did not ask for fixed newstyle cannot read an error reply.
            return Err(Ended::Broken(format!(
                "option {option} from a client without fixed newstyle"
            )));
        }
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                if !export.is_named(&name) {
                    // The protocol has no error for this option: the server closes.
                    debug!("NBD client asked for unknown export '{name}'");
                    return Err(Ended::Quietly);
                }
                let mut b = Vec::with_capacity(134);
                b.extend_from_slice(&export.size.to_be_bytes());
                b.extend_from_slice(&export.flags().to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                sock.send_all(&[&b])?;
                return Ok(Session {
                    structured,
                    base_allocation,
                    size: export.size,
                });
            }
            OPT_ABORT => {
                let _ = reply(REP_ACK, &[]);
                return Err(Ended::Quietly);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    refuse(REP_ERR_INVALID, "LIST takes no data")?;
                    continue;
                }
                reply(REP_SERVER, &server_entry(&export.name))?;
                reply(REP_ACK, &[])?;
            }
            OPT_STARTTLS => refuse(REP_ERR_POLICY, "this server has no TLS")?,
            OPT_INFO | OPT_GO => {
                let Some(req) = decode_info_request(&data) else {
                    refuse(REP_ERR_INVALID, "malformed INFO/GO data")?;
                    continue;
                };
                if !export.is_named(&req.name) {
                    refuse(
                        REP_ERR_UNKNOWN,
                        &format!(
                            "no export '{}' (this server has '{}')",
                            req.name, export.name
                        ),
                    )?;
                    continue;
                }
                reply(REP_INFO, &info_export(export.size, export.flags()))?;
                if req.items.contains(&INFO_NAME) {
                    reply(REP_INFO, &info_text(INFO_NAME, &export.name))?;
                }
                if req.items.contains(&INFO_DESCRIPTION) {
                    reply(REP_INFO, &info_text(INFO_DESCRIPTION, &export.description))?;
                }
                reply(REP_INFO, &info_block_size(1, 4096, MAX_PAYLOAD))?;
                reply(REP_ACK, &[])?;
                if option == OPT_GO {
                    return Ok(Session {
                        structured,
                        base_allocation,
                        size: export.size,
                    });
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    refuse(REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")?;
                } else if structured {
                    refuse(REP_ERR_INVALID, "structured replies are already on")?;
                } else {
                    structured = true;
                    reply(REP_ACK, &[])?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let list = option == OPT_LIST_META_CONTEXT;
                let Some(req) = decode_meta_request(&data) else {
                    refuse(REP_ERR_INVALID, "malformed meta context data")?;
                    continue;
                };
                if !list && !structured {
                    refuse(REP_ERR_INVALID, "SET_META_CONTEXT needs structured replies")?;
                    continue;
                }
                if !export.is_named(&req.name) {
                    refuse(REP_ERR_UNKNOWN, &format!("no export '{}'", req.name))?;
                    continue;
                }
                let selected = if list && req.queries.is_empty() {
                    true
                } else {
                    req.queries.iter().any(|q| query_matches(q, list))
                };
                if selected {
                    reply(
                        REP_META_CONTEXT,
                        &meta_context_entry(BASE_ALLOCATION_ID, BASE_ALLOCATION),
                    )?;
                }
                if !list {
                    base_allocation = selected;
                }
                reply(REP_ACK, &[])?;
            }
            _ => refuse(REP_ERR_UNSUP, &format!("option {option} is not supported"))?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    fn export() -> Export {
        Export {
            name: "disk.img".into(),
            description: "test".into(),
            size: 1 << 20,
            read_only: false,
        }
    }

    fn option(code: u32, data: &[u8]) -> Vec<u8> {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        b
    }

    /// Runs the handshake against the scripted client bytes; the outcome and what the
    /// server sent.
    fn run(client: &[u8]) -> (Result<Session, Ended>, Vec<u8>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let mut theirs_w = theirs.try_clone().unwrap();
        theirs_w.write_all(client).unwrap();
        theirs_w.shutdown(std::net::Shutdown::Write).unwrap();
        let sock = Sock::new(ours.into());
        let mut reader = &sock;
        let result = negotiate(&sock, &mut reader, &export());
        drop(sock);
        let mut sent = Vec::new();
        (&theirs).read_to_end(&mut sent).unwrap();
        (result, sent)
    }

    /// The option replies in `sent` after the greeting: (option, type).
    fn replies(sent: &[u8]) -> Vec<(u32, u32)> {
        let mut out = Vec::new();
        let mut at = 18;
        while at + 20 <= sent.len() {
            assert_eq!(be64(&sent[at..at + 8]), REPLY_MAGIC);
            let len = be32(&sent[at + 16..at + 20]) as usize;
            out.push((be32(&sent[at + 8..at + 12]), be32(&sent[at + 12..at + 16])));
            at += 20 + len;
        }
        out
    }

    fn go(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        option(OPT_GO, &d)
    }

    fn meta(code: u32, query: &str) -> Vec<u8> {
        let mut d = 0u32.to_be_bytes().to_vec();
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(query.len() as u32).to_be_bytes());
        d.extend_from_slice(query.as_bytes());
        option(code, &d)
    }

    #[test]
    fn structured_replies_base_allocation_and_go() {
        let mut c = 3u32.to_be_bytes().to_vec();
        c.extend(option(OPT_STRUCTURED_REPLY, &[]));
        c.extend(meta(OPT_SET_META_CONTEXT, BASE_ALLOCATION));
        c.extend(go(""));
        let (r, sent) = run(&c);
        let s = r.unwrap();
        assert!(s.structured && s.base_allocation);
        assert_eq!(s.size, 1 << 20);
        assert_eq!(
            replies(&sent),
            vec![
                (OPT_STRUCTURED_REPLY, REP_ACK),
                (OPT_SET_META_CONTEXT, REP_META_CONTEXT),
                (OPT_SET_META_CONTEXT, REP_ACK),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_ACK),
            ]
        );
    }

    #[test]
    fn unknown_options_and_exports_are_refused_and_the_handshake_goes_on() {
        let mut c = 3u32.to_be_bytes().to_vec();
        c.extend(option(99, b"xyz"));
        c.extend(meta(OPT_SET_META_CONTEXT, BASE_ALLOCATION));
        c.extend(go("other"));
        c.extend(option(OPT_INFO, &[0, 0]));
        c.extend(go("disk.img"));
        let (r, sent) = run(&c);
        let s = r.unwrap();
        assert!(!s.structured && !s.base_allocation);
        assert_eq!(
            replies(&sent),
            vec![
                (99, REP_ERR_UNSUP),
                (OPT_SET_META_CONTEXT, REP_ERR_INVALID),
                (OPT_GO, REP_ERR_UNKNOWN),
                (OPT_INFO, REP_ERR_INVALID),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_ACK),
            ]
        );
    }

    #[test]
    fn a_bad_magic_or_unknown_flags_end_the_connection() {
        let mut c = 3u32.to_be_bytes().to_vec();
        c.extend_from_slice(&[0u8; 16]);
        assert!(matches!(run(&c).0, Err(Ended::Broken(_))));
        assert!(matches!(
            run(&0x80u32.to_be_bytes()).0,
            Err(Ended::Broken(_))
        ));
        // A huge option is not read.
        let mut c = 3u32.to_be_bytes().to_vec();
        c.extend_from_slice(&IHAVEOPT.to_be_bytes());
        c.extend_from_slice(&OPT_GO.to_be_bytes());
        c.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(run(&c).0, Err(Ended::Broken(_))));
        // A client that hangs up mid-option.
        assert!(matches!(run(&3u32.to_be_bytes()).0, Err(Ended::Io(_))));
    }

    #[test]
    fn export_name_answers_with_size_and_flags_without_zeroes() {
        let mut c = 3u32.to_be_bytes().to_vec();
        c.extend(option(OPT_EXPORT_NAME, b"disk.img"));
        let (r, sent) = run(&c);
        assert!(r.is_ok());
        assert_eq!(sent.len(), 18 + 10);
        assert_eq!(be64(&sent[18..26]), 1 << 20);
        assert_eq!(be16(&sent[26..28]), export().flags());
        let mut c = 3u32.to_be_bytes().to_vec();
        c.extend(option(OPT_EXPORT_NAME, b"nope"));
        assert!(matches!(run(&c).0, Err(Ended::Quietly)));
    }
}
