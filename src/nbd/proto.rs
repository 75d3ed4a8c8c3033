//! The NBD wire protocol without I/O: constants, parsers that turn client
//! bytes into typed values, and encoders for everything the server sends.
//!
//! Written from `doc/proto.md` of NetworkBlockDevice/nbd (fixed newstyle
//! handshake, structured replies, `base:allocation`). All integers on the
//! wire are big-endian. Nothing here owns a socket: the server reads the
//! fixed-size headers, asks this module how much payload follows, reads at
//! most that (after checking it against its own limits), and hands the bytes
//! back here to be parsed. So every parser works on a slice it is given and
//! never allocates more than that slice's size, whatever length fields the
//! peer wrote inside it.

#![forbid(unsafe_code)]

use std::fmt;

use super::export::Extent;

// ------------------------------------------------------------------ magics

/// `NBDMAGIC`, first word of the server greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, second word of the newstyle greeting and every option header.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// --------------------------------------------------------- handshake flags

/// Server handshake flag: fixed newstyle supported.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the 124 zero bytes after EXPORT_NAME may be omitted.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes after EXPORT_NAME.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// The handshake flags this server sends.
pub const SERVER_HANDSHAKE_FLAGS: u16 = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES;

// ----------------------------------------------------------------- options

/// `NBD_OPT_EXPORT_NAME`.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS`.
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT`.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`.
pub const REP_META_CONTEXT: u32 = 4;
const REP_FLAG_ERROR: u32 = 1 << 31;

/// `NBD_INFO_EXPORT`.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// The only metadata context this server knows.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// Longest string (export name, query) the spec allows.
pub const MAX_STRING_LEN: usize = 4096;

// ------------------------------------------------------- transmission flags

/// `NBD_FLAG_HAS_FLAGS` (always set).
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// `NBD_FLAG_READ_ONLY`.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// `NBD_FLAG_SEND_FLUSH`.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_FLAG_SEND_FUA`.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// `NBD_FLAG_SEND_TRIM`.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// `NBD_FLAG_SEND_WRITE_ZEROES`.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_FLAG_SEND_DF` (only with structured replies).
pub const TF_SEND_DF: u16 = 1 << 7;
/// `NBD_FLAG_CAN_MULTI_CONN`.
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_FLAG_SEND_CACHE`.
pub const TF_SEND_CACHE: u16 = 1 << 10;
/// `NBD_FLAG_SEND_FAST_ZERO`.
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

/// The transmission flags this server advertises. `SEND_DF` only with
/// structured replies (MUST): with them a READ is always answered by a
/// single data chunk, so "don't fragment" costs nothing. Fast zero holds
/// because keyturn zeroes by unmapping. Multi-conn holds because an
/// export's flush is global.
pub fn transmission_flags(structured: bool) -> u16 {
    let base = TF_HAS_FLAGS
        | TF_SEND_FLUSH
        | TF_SEND_FUA
        | TF_SEND_TRIM
        | TF_SEND_WRITE_ZEROES
        | TF_SEND_FAST_ZERO
        | TF_CAN_MULTI_CONN
        | TF_SEND_CACHE;
    if structured { base | TF_SEND_DF } else { base }
}

// --------------------------------------------------------------- commands

/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`.
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_CACHE`.
pub const CMD_CACHE: u16 = 5;
/// `NBD_CMD_WRITE_ZEROES`.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS`.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// `NBD_CMD_FLAG_FUA`.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_FLAG_NO_HOLE`.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// `NBD_CMD_FLAG_DF`.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// `NBD_CMD_FLAG_REQ_ONE`.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// `NBD_CMD_FLAG_FAST_ZERO`.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// `NBD_REPLY_FLAG_DONE`.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// `NBD_REPLY_TYPE_NONE`.
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// `NBD_REPLY_TYPE_ERROR`.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// `NBD_STATE_HOLE` in `base:allocation`.
pub const STATE_HOLE: u32 = 1 << 0;
/// `NBD_STATE_ZERO` in `base:allocation`.
pub const STATE_ZERO: u32 = 1 << 1;

/// Sizes of the fixed-size messages.
pub const GREETING_LEN: usize = 18;
/// Client flags word.
pub const CLIENT_FLAGS_LEN: usize = 4;
/// Option header: magic, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Structured reply chunk header.
pub const CHUNK_HEADER_LEN: usize = 20;

// ------------------------------------------------------------------ errors

/// The error values the protocol allows in replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Errno {
    /// Operation not permitted.
    Perm,
    /// Input/output error.
    Io,
    /// Cannot allocate memory.
    NoMem,
    /// Invalid argument.
    Inval,
    /// No space left on device.
    NoSpc,
    /// Value too large.
    Overflow,
    /// Operation not supported.
    NotSup,
    /// Server is shutting down.
    Shutdown,
}

impl Errno {
    /// The wire value.
    pub fn code(self) -> u32 {
        match self {
            Errno::Perm => 1,
            Errno::Io => 5,
            Errno::NoMem => 12,
            Errno::Inval => 22,
            Errno::NoSpc => 28,
            Errno::Overflow => 75,
            Errno::NotSup => 95,
            Errno::Shutdown => 108,
        }
    }

    /// A short human-readable message for error chunks. Deliberately generic:
    /// the detailed cause is logged on the server, not sent to the peer.
    pub fn message(self) -> &'static str {
        match self {
            Errno::Perm => "operation not permitted",
            Errno::Io => "input/output error",
            Errno::NoMem => "out of memory",
            Errno::Inval => "invalid argument",
            Errno::NoSpc => "no space left on device",
            Errno::Overflow => "value too large",
            Errno::NotSup => "operation not supported",
            Errno::Shutdown => "server is shutting down",
        }
    }
}

/// Option reply error types (bit 31 set on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepError {
    /// `NBD_REP_ERR_UNSUP`: option unknown to this server.
    Unsup,
    /// `NBD_REP_ERR_POLICY`: known, but forbidden by policy.
    Policy,
    /// `NBD_REP_ERR_INVALID`: syntactically invalid.
    Invalid,
    /// `NBD_REP_ERR_TLS_REQD`: TLS first (STARTTLS), then this option.
    TlsReqd,
    /// `NBD_REP_ERR_UNKNOWN`: no such export.
    Unknown,
    /// `NBD_REP_ERR_SHUTDOWN`: the server is shutting down.
    Shutdown,
    /// `NBD_REP_ERR_TOO_BIG`: request too large to process.
    TooBig,
}

impl RepError {
    /// The wire value.
    pub fn code(self) -> u32 {
        REP_FLAG_ERROR
            | match self {
                RepError::Unsup => 1,
                RepError::Policy => 2,
                RepError::Invalid => 3,
                RepError::TlsReqd => 5,
                RepError::Unknown => 6,
                RepError::Shutdown => 7,
                RepError::TooBig => 9,
            }
    }
}

/// A peer sent bytes that break the framing or a MUST of the handshake; the
/// only safe answer is to drop the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// Client flags contain bits this server does not know (MUST drop).
    #[error("unknown client flags {0:#010x}")]
    UnknownClientFlags(u32),
    /// The client did not set `NBD_FLAG_C_FIXED_NEWSTYLE`.
    #[error("client does not speak fixed newstyle (flags {0:#010x})")]
    NotFixedNewstyle(u32),
    /// An option header did not start with `IHAVEOPT`.
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
}

/// A request header with a bad magic: the stream has lost its framing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad request magic {0:#010x}")]
pub struct BadRequestMagic(pub u32);

/// Why an option payload was refused (answered with `NBD_REP_ERR_INVALID`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    /// The payload is shorter than its own length fields claim.
    #[error("option payload truncated")]
    Truncated,
    /// Bytes are left after the last field.
    #[error("option payload has trailing bytes")]
    TrailingBytes,
    /// A string is longer than 4096 bytes, not UTF-8, or contains NUL.
    #[error("invalid string in option payload")]
    BadString,
    /// The option takes no payload but got one.
    #[error("option takes no payload")]
    UnexpectedPayload,
}

// --------------------------------------------------------------- handshake

/// The greeting the server sends first: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn server_greeting() -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&SERVER_HANDSHAKE_FLAGS.to_be_bytes());
    out
}

/// What the client's flags word negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientFlags {
    /// Omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
    pub no_zeroes: bool,
}

impl ClientFlags {
    /// Parses the client flags. Unknown bits are fatal (MUST); a client
    /// without fixed newstyle is refused, since this server only speaks it.
    pub fn parse(bytes: [u8; CLIENT_FLAGS_LEN]) -> Result<Self, HandshakeError> {
        let flags = u32::from_be_bytes(bytes);
        let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
        if flags & !known != 0 {
            return Err(HandshakeError::UnknownClientFlags(flags));
        }
        if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
            return Err(HandshakeError::NotFixedNewstyle(flags));
        }
        Ok(ClientFlags {
            no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
        })
    }
}

/// An option header: which option, and how many payload bytes follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code.
    pub code: u32,
    /// Payload length in bytes (attacker-chosen: check before reading).
    pub length: u32,
}

impl OptionHeader {
    /// Parses an option header, checking its magic.
    pub fn parse(bytes: &[u8; OPTION_HEADER_LEN]) -> Result<Self, HandshakeError> {
        let mut r = Reader::new(bytes);
        // The reader cannot run short on a fixed-size array of the right length.
        let magic = r.u64().unwrap_or(0);
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic(magic));
        }
        Ok(OptionHeader {
            code: r.u32().unwrap_or(0),
            length: r.u32().unwrap_or(0),
        })
    }
}

/// The payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name ("" is the default export).
    pub name: String,
    /// Requested `NBD_INFO_*` types, in the client's order.
    pub requests: Vec<u16>,
}

/// The payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContextQuery {
    /// Export the query is about.
    pub export: String,
    /// Query strings (may be empty).
    pub queries: Vec<String>,
}

/// One client option, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`: enter transmission (cannot be answered with an error).
    ExportName(String),
    /// `NBD_OPT_ABORT`.
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`.
    Info(InfoRequest),
    /// `NBD_OPT_GO`.
    Go(InfoRequest),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaContextQuery),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaContextQuery),
    /// Any option this server does not implement (answered `ERR_UNSUP`).
    Unsupported(u32),
}

impl ClientOption {
    /// Parses an option's payload. `payload` is exactly the header's length.
    pub fn parse(code: u32, payload: &[u8]) -> Result<Self, OptionError> {
        let mut r = Reader::new(payload);
        let opt = match code {
            // The whole payload is the name: no length field, nothing after it.
            OPT_EXPORT_NAME => return Ok(ClientOption::ExportName(parse_string(payload)?)),
            OPT_ABORT => {
                // A payload on ABORT is tolerated: the spec requires an ACK
                // and the connection ends either way.
                return Ok(ClientOption::Abort);
            }
            OPT_LIST => no_payload(payload, ClientOption::List)?,
            OPT_STARTTLS => no_payload(payload, ClientOption::StartTls)?,
            OPT_STRUCTURED_REPLY => no_payload(payload, ClientOption::StructuredReply)?,
            OPT_INFO | OPT_GO => {
                let name = r.string_u32()?;
                let count = r.u16()?;
                let mut requests = Vec::new();
                for _ in 0..count {
                    requests.push(r.u16()?);
                }
                let req = InfoRequest { name, requests };
                if code == OPT_INFO {
                    ClientOption::Info(req)
                } else {
                    ClientOption::Go(req)
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let export = r.string_u32()?;
                let count = r.u32()?;
                // Not `with_capacity(count)`: the count is attacker-chosen.
                // Each query costs at least 4 payload bytes, so the loop is
                // bounded by the payload the server already limited.
                let mut queries = Vec::new();
                for _ in 0..count {
                    queries.push(r.string_u32()?);
                }
                let q = MetaContextQuery { export, queries };
                if code == OPT_LIST_META_CONTEXT {
                    ClientOption::ListMetaContext(q)
                } else {
                    ClientOption::SetMetaContext(q)
                }
            }
            other => return Ok(ClientOption::Unsupported(other)),
        };
        r.finish()?;
        Ok(opt)
    }
}

fn no_payload(payload: &[u8], opt: ClientOption) -> Result<ClientOption, OptionError> {
    if payload.is_empty() {
        Ok(opt)
    } else {
        Err(OptionError::UnexpectedPayload)
    }
}

fn parse_string(bytes: &[u8]) -> Result<String, OptionError> {
    if bytes.len() > MAX_STRING_LEN || bytes.contains(&0) {
        return Err(OptionError::BadString);
    }
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| OptionError::BadString)
}

/// A bounds-checked big-endian cursor over a borrowed slice.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], OptionError> {
        if self.buf.len() < n {
            return Err(OptionError::Truncated);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], OptionError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, OptionError> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Result<u32, OptionError> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Result<u64, OptionError> {
        self.array().map(u64::from_be_bytes)
    }

    /// A string preceded by its 32-bit length.
    fn string_u32(&mut self) -> Result<String, OptionError> {
        let len = usize::try_from(self.u32()?).map_err(|_| OptionError::Truncated)?;
        // The length is checked against the remaining slice before any copy.
        parse_string(self.take(len)?)
    }

    fn finish(&self) -> Result<(), OptionError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(OptionError::TrailingBytes)
        }
    }
}

// ----------------------------------------------------------- option replies

/// One option reply the server can send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OptionReply<'a> {
    /// `NBD_REP_ACK`.
    Ack,
    /// `NBD_REP_SERVER`: one export of a list.
    Server {
        /// Export name.
        name: &'a str,
        /// Human-readable details.
        description: &'a str,
    },
    /// `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
    InfoExport {
        /// Size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_REP_INFO` / `NBD_INFO_NAME`.
    InfoName(&'a str),
    /// `NBD_REP_INFO` / `NBD_INFO_DESCRIPTION`.
    InfoDescription(&'a str),
    /// `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
    InfoBlockSize {
        /// Minimum block size.
        minimum: u32,
        /// Preferred block size.
        preferred: u32,
        /// Maximum payload size.
        maximum: u32,
    },
    /// `NBD_REP_META_CONTEXT`.
    MetaContext {
        /// Context id (0 in LIST replies).
        id: u32,
        /// Context name.
        name: &'a str,
    },
    /// An error reply, with a message for the human at the client.
    Error(RepError, &'a str),
}

impl OptionReply<'_> {
    /// Appends this reply to `out`, as an answer to option `option`.
    pub fn encode(&self, option: u32, out: &mut Vec<u8>) {
        let mut data = Vec::new();
        let kind = match *self {
            OptionReply::Ack => REP_ACK,
            OptionReply::Server { name, description } => {
                put_str32(&mut data, name);
                data.extend_from_slice(clamp_str(description).as_bytes());
                REP_SERVER
            }
            OptionReply::InfoExport { size, flags } => {
                data.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                data.extend_from_slice(&size.to_be_bytes());
                data.extend_from_slice(&flags.to_be_bytes());
                REP_INFO
            }
            OptionReply::InfoName(name) => {
                data.extend_from_slice(&INFO_NAME.to_be_bytes());
                data.extend_from_slice(clamp_str(name).as_bytes());
                REP_INFO
            }
            OptionReply::InfoDescription(text) => {
                data.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
                data.extend_from_slice(clamp_str(text).as_bytes());
                REP_INFO
            }
            OptionReply::InfoBlockSize {
                minimum,
                preferred,
                maximum,
            } => {
                data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                data.extend_from_slice(&minimum.to_be_bytes());
                data.extend_from_slice(&preferred.to_be_bytes());
                data.extend_from_slice(&maximum.to_be_bytes());
                REP_INFO
            }
            OptionReply::MetaContext { id, name } => {
                data.extend_from_slice(&id.to_be_bytes());
                data.extend_from_slice(clamp_str(name).as_bytes());
                REP_META_CONTEXT
            }
            OptionReply::Error(err, message) => {
                data.extend_from_slice(clamp_str(message).as_bytes());
                err.code()
            }
        };
        out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        // Every field is clamped to 4096 bytes, so the length fits.
        out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
        out.extend_from_slice(&data);
    }
}

fn put_str32(out: &mut Vec<u8>, s: &str) {
    let s = clamp_str(s);
    out.extend_from_slice(&u32::try_from(s.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// Strings on the wire MUST be at most 4096 bytes; cut at a char boundary.
fn clamp_str(s: &str) -> &str {
    if s.len() <= MAX_STRING_LEN {
        return s;
    }
    let mut end = MAX_STRING_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, flags, and (unless the client
/// negotiated `NO_ZEROES`) 124 zero bytes.
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + 124);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
    out
}

// ---------------------------------------------------------------- requests

/// A request header as it came off the wire, not yet validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// Opaque cookie, echoed in the reply.
    pub cookie: u64,
    /// Offset in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
}

impl RequestHeader {
    /// Parses a request header, checking its magic.
    pub fn parse(bytes: &[u8; REQUEST_HEADER_LEN]) -> Result<Self, BadRequestMagic> {
        let mut r = Reader::new(bytes);
        // Fixed-size input: none of these reads can run short.
        let magic = r.u32().unwrap_or(0);
        if magic != REQUEST_MAGIC {
            return Err(BadRequestMagic(magic));
        }
        Ok(RequestHeader {
            flags: r.u16().unwrap_or(0),
            kind: r.u16().unwrap_or(0),
            cookie: r.u64().unwrap_or(0),
            offset: r.u64().unwrap_or(0),
            length: r.u32().unwrap_or(0),
        })
    }

    /// How many payload bytes follow this header on the wire, whether or not
    /// the request turns out valid: only a WRITE carries data.
    pub fn payload_len(&self) -> u32 {
        if self.kind == CMD_WRITE {
            self.length
        } else {
            0
        }
    }

    /// Validates the request against what was negotiated. This is the only
    /// place requests are checked: inner layers rely on the result.
    pub fn validate(&self, session: &SessionParams) -> Result<Request, Rejection> {
        let reject = |errno, reason| Rejection {
            cookie: self.cookie,
            errno,
            reason,
        };
        let Some(kind) = CommandKind::from_wire(self.kind) else {
            return Err(reject(
                Errno::Inval,
                RejectReason::UnknownCommand(self.kind),
            ));
        };
        // FUA is valid on every command once SEND_FUA is advertised (MUST
        // accept; it is ignored where nothing is written).
        let mut allowed = CMD_FLAG_FUA;
        match kind {
            CommandKind::Read if session.structured => allowed |= CMD_FLAG_DF,
            CommandKind::WriteZeroes => allowed |= CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CommandKind::BlockStatus => allowed |= CMD_FLAG_REQ_ONE,
            _ => {}
        }
        if self.flags & !allowed != 0 {
            return Err(reject(
                Errno::Inval,
                RejectReason::BadFlags {
                    command: kind,
                    flags: self.flags,
                },
            ));
        }
        let writes = matches!(
            kind,
            CommandKind::Write | CommandKind::Trim | CommandKind::WriteZeroes
        );
        if writes && session.read_only {
            // MUST fail with EPERM on an export flagged read-only.
            return Err(reject(Errno::Perm, RejectReason::ReadOnly(kind)));
        }
        if kind == CommandKind::BlockStatus && session.meta_context.is_none() {
            return Err(reject(Errno::Inval, RejectReason::NoMetaContext));
        }
        if matches!(kind, CommandKind::Read | CommandKind::Write)
            && self.length > session.max_payload
        {
            return Err(reject(
                Errno::Inval,
                RejectReason::TooLong {
                    length: self.length,
                    max: session.max_payload,
                },
            ));
        }
        let in_range = self
            .offset
            .checked_add(u64::from(self.length))
            .is_some_and(|end| end <= session.size);
        let ranged = !matches!(kind, CommandKind::Flush | CommandKind::Disc);
        if ranged && !in_range {
            // Writes past the end SHOULD fail with ENOSPC; everything else EINVAL.
            let errno = match kind {
                CommandKind::Write | CommandKind::WriteZeroes => Errno::NoSpc,
                _ => Errno::Inval,
            };
            return Err(reject(
                errno,
                RejectReason::OutOfRange {
                    offset: self.offset,
                    length: self.length,
                    size: session.size,
                },
            ));
        }
        if kind == CommandKind::BlockStatus && self.length == 0 {
            // At least one descriptor with a nonzero length is required,
            // which a zero-length query cannot have.
            return Err(reject(Errno::Inval, RejectReason::ZeroLengthBlockStatus));
        }
        let (offset, length) = (self.offset, self.length);
        let fua = self.flags & CMD_FLAG_FUA != 0;
        let command = match kind {
            CommandKind::Read => Command::Read { offset, length },
            CommandKind::Write => Command::Write {
                offset,
                length,
                fua,
            },
            CommandKind::Disc => Command::Disc,
            CommandKind::Flush => Command::Flush,
            CommandKind::Trim => Command::Trim {
                offset,
                length,
                fua,
            },
            CommandKind::Cache => Command::Cache { offset, length },
            CommandKind::WriteZeroes => Command::WriteZeroes {
                offset,
                length,
                fua,
                no_hole: self.flags & CMD_FLAG_NO_HOLE != 0,
                fast: self.flags & CMD_FLAG_FAST_ZERO != 0,
            },
            CommandKind::BlockStatus => Command::BlockStatus {
                offset,
                length,
                req_one: self.flags & CMD_FLAG_REQ_ONE != 0,
            },
        };
        Ok(Request {
            cookie: self.cookie,
            command,
        })
    }
}

/// What the handshake settled that request validation depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionParams {
    /// Export size in bytes.
    pub size: u64,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// The id of the selected `base:allocation` context, if any.
    pub meta_context: Option<u32>,
    /// Largest READ/WRITE payload accepted.
    pub max_payload: u32,
    /// The export was flagged read-only (`NBD_FLAG_READ_ONLY`).
    pub read_only: bool,
}

/// The known command types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandKind {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`.
    Write,
    /// `NBD_CMD_DISC`.
    Disc,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_CACHE`.
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
}

impl CommandKind {
    fn from_wire(kind: u16) -> Option<Self> {
        Some(match kind {
            CMD_READ => CommandKind::Read,
            CMD_WRITE => CommandKind::Write,
            CMD_DISC => CommandKind::Disc,
            CMD_FLUSH => CommandKind::Flush,
            CMD_TRIM => CommandKind::Trim,
            CMD_CACHE => CommandKind::Cache,
            CMD_WRITE_ZEROES => CommandKind::WriteZeroes,
            CMD_BLOCK_STATUS => CommandKind::BlockStatus,
            _ => return None,
        })
    }
}

impl fmt::Display for CommandKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CommandKind::Read => "READ",
            CommandKind::Write => "WRITE",
            CommandKind::Disc => "DISC",
            CommandKind::Flush => "FLUSH",
            CommandKind::Trim => "TRIM",
            CommandKind::Cache => "CACHE",
            CommandKind::WriteZeroes => "WRITE_ZEROES",
            CommandKind::BlockStatus => "BLOCK_STATUS",
        })
    }
}

/// A validated command: offsets and lengths are within the export, payload
/// lengths within the limit, flags meaningful for the command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Read `length` bytes (a DF flag needs no handling: reads are one chunk).
    Read {
        /// Offset.
        offset: u64,
        /// Length.
        length: u32,
    },
    /// Write the `length` payload bytes that follow the header.
    Write {
        /// Offset.
        offset: u64,
        /// Length of the payload.
        length: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Soft disconnect.
    Disc,
    /// Make completed writes durable.
    Flush,
    /// Discard a range.
    Trim {
        /// Offset.
        offset: u64,
        /// Length.
        length: u32,
        /// Durable before the reply.
        fua: bool,
    },
    /// Prefetch hint.
    Cache {
        /// Offset.
        offset: u64,
        /// Length.
        length: u32,
    },
    /// Make a range read as zeros.
    WriteZeroes {
        /// Offset.
        offset: u64,
        /// Length.
        length: u32,
        /// Durable before the reply.
        fua: bool,
        /// The client asked for no hole (see the server for how it is treated).
        no_hole: bool,
        /// Fail fast rather than write slowly.
        fast: bool,
    },
    /// Allocation status of a range.
    BlockStatus {
        /// Offset.
        offset: u64,
        /// Length (nonzero).
        length: u32,
        /// At most one extent.
        req_one: bool,
    },
}

/// A validated request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Cookie to echo.
    pub cookie: u64,
    /// What to do.
    pub command: Command,
}

/// A request refused at the protocol edge: answered with `errno`, the
/// connection stays open.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Cookie to echo.
    pub cookie: u64,
    /// Error for the reply.
    pub errno: Errno,
    /// Why, for the server log.
    pub reason: RejectReason,
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// Unknown command type.
    #[error("unknown command {0:#06x}")]
    UnknownCommand(u16),
    /// Flags not valid for the command.
    #[error("flags {flags:#06x} not valid for {command}")]
    BadFlags {
        /// The command.
        command: CommandKind,
        /// The flags sent.
        flags: u16,
    },
    /// BLOCK_STATUS without a negotiated metadata context.
    #[error("BLOCK_STATUS without a negotiated metadata context")]
    NoMetaContext,
    /// Payload above the advertised maximum.
    #[error("length {length} exceeds the maximum payload {max}")]
    TooLong {
        /// Requested length.
        length: u32,
        /// Maximum.
        max: u32,
    },
    /// Range not inside the export.
    #[error("range offset {offset} length {length} outside export of {size} bytes")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        length: u32,
        /// Export size.
        size: u64,
    },
    /// BLOCK_STATUS with length 0.
    #[error("zero-length BLOCK_STATUS")]
    ZeroLengthBlockStatus,
    /// A write-type command on a read-only export.
    #[error("{0} on a read-only export")]
    ReadOnly(CommandKind),
}

// ----------------------------------------------------------------- replies

/// A simple reply header (for READ, the data follows).
pub fn simple_reply(cookie: u64, error: Option<Errno>) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.map_or(0, Errno::code).to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// A structured reply chunk header.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, length: u32) -> [u8; CHUNK_HEADER_LEN] {
    let mut out = [0u8; CHUNK_HEADER_LEN];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
    out
}

/// Header of a final `NBD_REPLY_TYPE_OFFSET_DATA` chunk (chunk header plus
/// offset); `data_len` bytes of data follow. `None` if the data would not
/// fit in one chunk (more than 2^32 - 9 bytes) or is empty (a data chunk
/// must describe at least one byte).
pub fn offset_data_header(cookie: u64, offset: u64, data_len: usize) -> Option<[u8; 28]> {
    let len = u32::try_from(data_len).ok()?.checked_add(8)?;
    if data_len == 0 {
        return None;
    }
    let mut out = [0u8; 28];
    out[..CHUNK_HEADER_LEN].copy_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        len,
    ));
    out[CHUNK_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    Some(out)
}

/// A final `NBD_REPLY_TYPE_NONE` chunk.
pub fn none_chunk(cookie: u64) -> [u8; CHUNK_HEADER_LEN] {
    chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk with the errno's generic message.
pub fn error_chunk(cookie: u64, errno: Errno) -> Vec<u8> {
    let msg = errno.message().as_bytes();
    // Static messages are short; the conversions cannot fail.
    let msg_len = u16::try_from(msg.len()).unwrap_or(0);
    let msg = &msg[..usize::from(msg_len)];
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + 6 + msg.len());
    out.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + u32::from(msg_len),
    ));
    out.extend_from_slice(&errno.code().to_be_bytes());
    out.extend_from_slice(&msg_len.to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// One `base:allocation` block descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockDescriptor {
    /// Length in bytes (nonzero).
    pub length: u32,
    /// `NBD_STATE_*` flags.
    pub flags: u32,
}

/// Turns an export's extents into descriptors for a query of `requested`
/// bytes: maps hole/zero to `NBD_STATE_*`, drops empty extents, merges
/// neighbours with equal flags (SHOULD), cuts the total to `requested`
/// (MUST NOT exceed it), and keeps one descriptor for `req_one`. If the
/// export gave nothing usable, answers one descriptor of status 0 over the
/// whole range, which is always true ("allocated, contents unknown").
pub fn block_descriptors(
    extents: &[Extent],
    requested: u32,
    req_one: bool,
) -> Vec<BlockDescriptor> {
    let mut out: Vec<BlockDescriptor> = Vec::new();
    let mut left = requested;
    for e in extents {
        if left == 0 {
            break;
        }
        let len = u32::try_from(e.length).unwrap_or(u32::MAX).min(left);
        if len == 0 {
            continue;
        }
        let flags = if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 };
        left -= len;
        match out.last_mut() {
            Some(last) if last.flags == flags => last.length += len,
            _ => out.push(BlockDescriptor { length: len, flags }),
        }
    }
    if out.is_empty() {
        out.push(BlockDescriptor {
            length: requested,
            flags: 0,
        });
    }
    if req_one {
        out.truncate(1);
    }
    out
}

/// A final `NBD_REPLY_TYPE_BLOCK_STATUS` chunk for one context.
pub fn block_status_chunk(
    cookie: u64,
    context_id: u32,
    descriptors: &[BlockDescriptor],
) -> Vec<u8> {
    let payload = 4 + 8 * descriptors.len();
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + payload);
    // Descriptors are bounded by the request length (each is ≥ 1 byte of a
    // u32 range) only in theory; in practice by what the export returned.
    let len = u32::try_from(payload).unwrap_or(u32::MAX);
    out.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len,
    ));
    out.extend_from_slice(&context_id.to_be_bytes());
    for d in descriptors {
        out.extend_from_slice(&d.length.to_be_bytes());
        out.extend_from_slice(&d.flags.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&kind.to_be_bytes());
        b[8..16].copy_from_slice(&cookie.to_be_bytes());
        b[16..24].copy_from_slice(&offset.to_be_bytes());
        b[24..28].copy_from_slice(&length.to_be_bytes());
        b
    }

    fn session(structured: bool, meta: bool) -> SessionParams {
        SessionParams {
            size: 1 << 20,
            structured,
            meta_context: meta.then_some(1),
            max_payload: 32 << 20,
            read_only: false,
        }
    }

    #[test]
    fn read_only_session_refuses_writes_with_eperm() {
        let ro = SessionParams {
            read_only: true,
            ..session(true, true)
        };
        for kind in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            let h = RequestHeader::parse(&header(0, kind, 7, 0, 4096)).unwrap();
            let rej = h.validate(&ro).unwrap_err();
            assert_eq!(rej.errno, Errno::Perm);
            assert_eq!(rej.cookie, 7);
        }
        let read = RequestHeader::parse(&header(0, CMD_READ, 8, 0, 4096)).unwrap();
        assert!(read.validate(&ro).is_ok());
        assert_eq!(RepError::TlsReqd.code(), (1 << 31) | 5);
    }

    fn validate(flags: u16, kind: u16, offset: u64, length: u32) -> Result<Request, Rejection> {
        RequestHeader::parse(&header(flags, kind, 7, offset, length))
            .unwrap()
            .validate(&session(true, true))
    }

    fn str32(s: &[u8]) -> Vec<u8> {
        let mut v = (s.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(s);
        v
    }

    #[test]
    fn greeting_layout() {
        let g = server_greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
    }

    #[test]
    fn client_flags() {
        assert_eq!(
            ClientFlags::parse(3u32.to_be_bytes()),
            Ok(ClientFlags { no_zeroes: true })
        );
        assert_eq!(
            ClientFlags::parse(1u32.to_be_bytes()),
            Ok(ClientFlags { no_zeroes: false })
        );
        assert_eq!(
            ClientFlags::parse(0u32.to_be_bytes()),
            Err(HandshakeError::NotFixedNewstyle(0))
        );
        assert_eq!(
            ClientFlags::parse((1u32 | 1 << 7).to_be_bytes()),
            Err(HandshakeError::UnknownClientFlags(0x81))
        );
        assert!(ClientFlags::parse(u32::MAX.to_be_bytes()).is_err());
    }

    #[test]
    fn option_header() {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&7u32.to_be_bytes());
        b[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            OptionHeader::parse(&b),
            Ok(OptionHeader {
                code: 7,
                length: u32::MAX
            })
        );
        b[0] = b'X';
        assert!(matches!(
            OptionHeader::parse(&b),
            Err(HandshakeError::BadOptionMagic(_))
        ));
    }

    #[test]
    fn go_payload() {
        let mut p = str32(b"vol0");
        p.extend_from_slice(&2u16.to_be_bytes());
        p.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        p.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            ClientOption::parse(OPT_GO, &p),
            Ok(ClientOption::Go(InfoRequest {
                name: "vol0".into(),
                requests: vec![INFO_BLOCK_SIZE, INFO_NAME]
            }))
        );
        // Every truncation is an error, never a panic.
        for cut in 0..p.len() {
            assert!(ClientOption::parse(OPT_GO, &p[..cut]).is_err(), "cut {cut}");
            assert!(
                ClientOption::parse(OPT_INFO, &p[..cut]).is_err(),
                "cut {cut}"
            );
        }
        let mut extra = p.clone();
        extra.push(0);
        assert_eq!(
            ClientOption::parse(OPT_INFO, &extra),
            Err(OptionError::TrailingBytes)
        );
    }

    #[test]
    fn go_huge_counts_do_not_allocate() {
        // Name length claims 4 GiB, info count claims 65535: both must fail
        // on the short payload without reserving anything.
        let p = [0xff, 0xff, 0xff, 0xff];
        assert_eq!(ClientOption::parse(OPT_GO, &p), Err(OptionError::Truncated));
        let mut p = str32(b"");
        p.extend_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(ClientOption::parse(OPT_GO, &p), Err(OptionError::Truncated));
    }

    #[test]
    fn bad_strings() {
        assert_eq!(
            ClientOption::parse(OPT_EXPORT_NAME, b"a\0b"),
            Err(OptionError::BadString)
        );
        assert_eq!(
            ClientOption::parse(OPT_EXPORT_NAME, &[0xc3, 0x28]),
            Err(OptionError::BadString)
        );
        assert_eq!(
            ClientOption::parse(OPT_EXPORT_NAME, &vec![b'a'; 4097]),
            Err(OptionError::BadString)
        );
        assert_eq!(
            ClientOption::parse(OPT_EXPORT_NAME, b""),
            Ok(ClientOption::ExportName(String::new()))
        );
        assert_eq!(
            ClientOption::parse(OPT_EXPORT_NAME, b"vol0"),
            Ok(ClientOption::ExportName("vol0".into()))
        );
    }

    #[test]
    fn simple_options() {
        assert_eq!(ClientOption::parse(OPT_LIST, b""), Ok(ClientOption::List));
        assert_eq!(
            ClientOption::parse(OPT_LIST, b"junk"),
            Err(OptionError::UnexpectedPayload)
        );
        assert_eq!(
            ClientOption::parse(OPT_STRUCTURED_REPLY, b"x"),
            Err(OptionError::UnexpectedPayload)
        );
        assert_eq!(
            ClientOption::parse(OPT_ABORT, b"x"),
            Ok(ClientOption::Abort)
        );
        assert_eq!(
            ClientOption::parse(OPT_STARTTLS, b""),
            Ok(ClientOption::StartTls)
        );
        assert_eq!(
            ClientOption::parse(0x7654321, b"\x00\x01"),
            Ok(ClientOption::Unsupported(0x7654321))
        );
    }

    #[test]
    fn meta_context_payload() {
        let mut p = str32(b"vol0");
        p.extend_from_slice(&2u32.to_be_bytes());
        p.extend(str32(b"base:allocation"));
        p.extend(str32(b"x-foo:bar"));
        assert_eq!(
            ClientOption::parse(OPT_SET_META_CONTEXT, &p),
            Ok(ClientOption::SetMetaContext(MetaContextQuery {
                export: "vol0".into(),
                queries: vec!["base:allocation".into(), "x-foo:bar".into()]
            }))
        );
        for cut in 0..p.len() {
            assert!(ClientOption::parse(OPT_LIST_META_CONTEXT, &p[..cut]).is_err());
        }
        // A count of 4 billion queries in a tiny payload.
        let mut p = str32(b"");
        p.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            ClientOption::parse(OPT_SET_META_CONTEXT, &p),
            Err(OptionError::Truncated)
        );
    }

    #[test]
    fn garbage_options_never_panic() {
        // A cheap deterministic fuzz over every option code we parse.
        let mut seed = 0x1234_5678_9abc_def0u64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 40) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (seed >> (i % 8 * 8)) as u8 % 8).collect();
            for code in 1..=12 {
                let _ = ClientOption::parse(code, &bytes);
            }
            let mut h = [0u8; 28];
            for (i, b) in h.iter_mut().enumerate() {
                *b = (seed.rotate_left(i as u32)) as u8;
            }
            h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            if let Ok(r) = RequestHeader::parse(&h) {
                let _ = r.validate(&session(seed & 1 == 0, seed & 2 == 0));
            }
        }
    }

    #[test]
    fn option_reply_encoding() {
        let mut out = Vec::new();
        OptionReply::InfoExport {
            size: 4096,
            flags: 0x1234,
        }
        .encode(OPT_GO, &mut out);
        assert_eq!(&out[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[8..12], &OPT_GO.to_be_bytes());
        assert_eq!(&out[12..16], &REP_INFO.to_be_bytes());
        assert_eq!(&out[16..20], &12u32.to_be_bytes());
        assert_eq!(&out[20..22], &INFO_EXPORT.to_be_bytes());
        assert_eq!(&out[22..30], &4096u64.to_be_bytes());
        assert_eq!(&out[30..32], &0x1234u16.to_be_bytes());

        out.clear();
        OptionReply::Server {
            name: "v",
            description: "d",
        }
        .encode(OPT_LIST, &mut out);
        assert_eq!(&out[16..20], &6u32.to_be_bytes());
        assert_eq!(&out[20..], b"\0\0\0\x01vd");

        out.clear();
        OptionReply::Error(RepError::Unsup, "").encode(99, &mut out);
        assert_eq!(&out[12..16], &0x8000_0001u32.to_be_bytes());
        assert_eq!(out.len(), 20);

        out.clear();
        let long = "é".repeat(3000);
        OptionReply::InfoDescription(&long).encode(OPT_GO, &mut out);
        let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        assert!(len <= 2 + MAX_STRING_LEN);
        assert!(std::str::from_utf8(&out[22..]).is_ok());
    }

    #[test]
    fn export_name_reply_padding() {
        assert_eq!(export_name_reply(1, 1, false).len(), 134);
        assert_eq!(export_name_reply(1, 1, true).len(), 10);
    }

    #[test]
    fn request_magic() {
        let mut h = header(0, CMD_READ, 1, 0, 512);
        h[0] = 0;
        assert!(RequestHeader::parse(&h).is_err());
    }

    #[test]
    fn requests_valid() {
        assert_eq!(
            validate(0, CMD_READ, 0, 512).unwrap().command,
            Command::Read {
                offset: 0,
                length: 512
            }
        );
        assert_eq!(
            validate(CMD_FLAG_FUA, CMD_WRITE, 1 << 19, 1 << 19)
                .unwrap()
                .command,
            Command::Write {
                offset: 1 << 19,
                length: 1 << 19,
                fua: true
            }
        );
        assert_eq!(
            validate(
                CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                CMD_WRITE_ZEROES,
                0,
                4096
            )
            .unwrap()
            .command,
            Command::WriteZeroes {
                offset: 0,
                length: 4096,
                fua: false,
                no_hole: true,
                fast: true
            }
        );
        assert!(validate(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 0, 1).is_ok());
        assert!(validate(CMD_FLAG_DF, CMD_READ, 0, 1).is_ok());
        // FUA is accepted on every command.
        assert!(validate(CMD_FLAG_FUA, CMD_READ, 0, 1).is_ok());
        assert!(validate(CMD_FLAG_FUA, CMD_FLUSH, 0, 0).is_ok());
        // Zero-length requests are fine (except block status).
        assert!(validate(0, CMD_READ, 0, 0).is_ok());
        assert!(validate(0, CMD_WRITE, 1 << 20, 0).is_ok());
        assert!(validate(0, CMD_TRIM, 0, 0).is_ok());
        // Flush ignores offset/length.
        assert_eq!(
            validate(0, CMD_FLUSH, 99, 99).unwrap().command,
            Command::Flush
        );
        assert_eq!(validate(0, CMD_DISC, 0, 0).unwrap().command, Command::Disc);
    }

    #[test]
    fn requests_rejected() {
        let e = |r: Result<Request, Rejection>| r.unwrap_err().errno;
        assert_eq!(e(validate(0, 0x4242, 0, 512)), Errno::Inval);
        assert_eq!(e(validate(0, CMD_READ, (1 << 20) - 256, 512)), Errno::Inval);
        assert_eq!(e(validate(0, CMD_READ, u64::MAX - 256, 512)), Errno::Inval);
        assert_eq!(e(validate(0, CMD_READ, (1 << 20) + 1, 0)), Errno::Inval);
        assert_eq!(
            e(validate(0, CMD_WRITE, (1 << 20) - 256, 512)),
            Errno::NoSpc
        );
        assert_eq!(e(validate(0, CMD_WRITE_ZEROES, 1 << 20, 1)), Errno::NoSpc);
        assert_eq!(e(validate(0, CMD_TRIM, 1 << 20, 1)), Errno::Inval);
        assert_eq!(e(validate(0, CMD_BLOCK_STATUS, 1 << 20, 1)), Errno::Inval);
        assert_eq!(e(validate(0, CMD_BLOCK_STATUS, 0, 0)), Errno::Inval);
        assert_eq!(e(validate(0, CMD_READ, 0, (32 << 20) + 1)), Errno::Inval);
        assert_eq!(e(validate(0, CMD_WRITE, 0, u32::MAX)), Errno::Inval);
        // Flags not meant for the command, and unknown flags.
        assert_eq!(e(validate(CMD_FLAG_REQ_ONE, CMD_READ, 0, 1)), Errno::Inval);
        assert_eq!(e(validate(CMD_FLAG_NO_HOLE, CMD_WRITE, 0, 1)), Errno::Inval);
        assert_eq!(e(validate(1 << 9, CMD_READ, 0, 1)), Errno::Inval);
        // Trim/zero/block status may exceed the payload maximum (no payload).
        let big = SessionParams {
            size: 1 << 40,
            ..session(true, true)
        };
        let h = RequestHeader::parse(&header(0, CMD_TRIM, 1, 0, u32::MAX)).unwrap();
        assert!(h.validate(&big).is_ok());
        // DF needs structured replies; block status needs a context.
        let h = RequestHeader::parse(&header(CMD_FLAG_DF, CMD_READ, 1, 0, 1)).unwrap();
        assert_eq!(
            h.validate(&session(false, false)).unwrap_err().errno,
            Errno::Inval
        );
        let h = RequestHeader::parse(&header(0, CMD_BLOCK_STATUS, 1, 0, 1)).unwrap();
        let r = h.validate(&session(true, false)).unwrap_err();
        assert_eq!((r.cookie, r.reason), (1, RejectReason::NoMetaContext));
    }

    #[test]
    fn payload_len_only_for_write() {
        let h = RequestHeader::parse(&header(0, CMD_WRITE, 1, u64::MAX, 77)).unwrap();
        assert_eq!(h.payload_len(), 77);
        let h = RequestHeader::parse(&header(0, CMD_READ, 1, 0, 77)).unwrap();
        assert_eq!(h.payload_len(), 0);
    }

    #[test]
    fn reply_encoding() {
        let r = simple_reply(0xdead_beef_0000_0001, Some(Errno::NoSpc));
        assert_eq!(&r[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r[4..8], &28u32.to_be_bytes());
        assert_eq!(&r[8..16], &0xdead_beef_0000_0001u64.to_be_bytes());

        let h = offset_data_header(5, 4096, 512).unwrap();
        assert_eq!(&h[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&h[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&h[6..8], &REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        assert_eq!(&h[16..20], &520u32.to_be_bytes());
        assert_eq!(&h[20..28], &4096u64.to_be_bytes());
        assert!(offset_data_header(5, 0, 0).is_none());

        let e = error_chunk(9, Errno::Inval);
        assert_eq!(&e[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        let len = u32::from_be_bytes(e[16..20].try_into().unwrap()) as usize;
        assert_eq!(e.len(), 20 + len);
        assert_eq!(&e[20..24], &22u32.to_be_bytes());
        let mlen = u16::from_be_bytes(e[24..26].try_into().unwrap()) as usize;
        assert_eq!(mlen + 6, len);

        let n = none_chunk(3);
        assert_eq!(&n[4..8], &[0, 1, 0, 0]);
    }

    #[test]
    fn descriptors() {
        let ext = |length, hole, zero| Extent { length, hole, zero };
        let e = [
            ext(4096, true, true),
            ext(4096, true, true),
            ext(0, false, false),
            ext(8192, false, false),
            ext(1 << 40, true, true),
        ];
        assert_eq!(
            block_descriptors(&e, 10_000, false),
            vec![
                BlockDescriptor {
                    length: 8192,
                    flags: STATE_HOLE | STATE_ZERO
                },
                BlockDescriptor {
                    length: 1808,
                    flags: 0
                },
            ]
        );
        assert_eq!(block_descriptors(&e, 10_000, true).len(), 1);
        assert_eq!(
            block_descriptors(&e, 100_000, false)
                .iter()
                .map(|d| d.length as u64)
                .sum::<u64>(),
            100_000
        );
        assert_eq!(
            block_descriptors(&[], 77, false),
            vec![BlockDescriptor {
                length: 77,
                flags: 0
            }]
        );
        let c = block_status_chunk(1, 1, &block_descriptors(&e, 10_000, false));
        assert_eq!(&c[16..20], &(4 + 16u32).to_be_bytes());
        assert_eq!(c.len(), 20 + 20);
    }
}
