//! The fixed newstyle handshake of one connection: option haggling,
//! `NBD_OPT_STARTTLS` (the upgrade of the byte stream to TLS), and the
//! access check of every export a client lists or opens.
//!
//! TLS modes follow the spec's names: *off* is NOTLS (STARTTLS refused with
//! `NBD_REP_ERR_POLICY`), *optional* is SELECTIVETLS with every export
//! allowed either way (access rules may still require a certificate
//! name), *required* is FORCEDTLS: before TLS every option but STARTTLS and
//! ABORT gets `NBD_REP_ERR_TLS_REQD`, and `NBD_OPT_EXPORT_NAME` (which
//! cannot be answered with an error) closes the connection. After the
//! upgrade the client starts over: structured replies and metadata
//! contexts negotiated in plaintext are forgotten, as the spec requires.
//!
//! The protocol codec ([`super::proto`]) stays free of TLS: here the stream
//! is a boxed byte stream that is plaintext or TLS.

#![forbid(unsafe_code)]

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf};

use super::access::{Access, Client, Gate};
use super::export::{Export, ExportCatalog};
use super::proto::{self, ClientFlags, ClientOption, OptionHeader, OptionReply, RepError};
use super::server::{
    BASE_ALLOCATION_ID, ClientLog, Fatal, ServerConfig, drain, read_full, read_or_eof,
};
use crate::tls::{ServerTls, TlsMode};

/// A connection's byte stream: a socket, or TLS over one.
pub(super) trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// The boxed stream: one type whether or not TLS was started.
pub(super) type Io = Box<dyn Stream>;
/// The buffered read side of a connection.
pub(super) type Rd = BufReader<ReadHalf<Io>>;
/// The buffered write side of a connection.
pub(super) type Wr = BufWriter<WriteHalf<Io>>;

const BUF: usize = 64 << 10;

/// The socket read buffer below TLS. rustls reads the socket at most
/// 4 KiB at a time (up to one record), so without it a 4 KiB NBD write cost
/// more than one `recv` over TLS (1.39 a request, against 0.13 in
/// plaintext, where [`BUF`] takes many requests a call), and 4 KiB random
/// writes ran at half the plaintext rate (docs/benchmarks.md, TLS).
const TLS_READ_BUF: usize = 64 << 10;

fn split(io: Io) -> (Rd, Wr) {
    let (rd, wr) = tokio::io::split(io);
    (
        BufReader::with_capacity(BUF, rd),
        BufWriter::with_capacity(BUF, wr),
    )
}

/// TLS and access control for one listener. `Default` is plaintext with
/// every export open to every client, which is what a Unix socket or a
/// test server wants.
#[derive(Clone, Default)]
pub struct Security {
    /// The TLS mode. Anything but `Off` needs `tls`.
    pub mode: TlsMode,
    /// Certificates (shared with the other listeners, reloaded on SIGHUP).
    pub tls: Option<Arc<ServerTls>>,
    /// Who may open what; `None`: everyone everything, nothing audited.
    pub gate: Option<Arc<dyn Gate>>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("mode", &self.mode)
            .field("tls", &self.tls)
            .field("gate", &self.gate.is_some())
            .finish()
    }
}

impl Security {
    fn mode(&self) -> TlsMode {
        if self.tls.is_some() {
            self.mode
        } else {
            TlsMode::Off
        }
    }

    fn access(&self, client: &Client, export: &str) -> Option<Access> {
        match &self.gate {
            Some(g) => g.access(client, export),
            None => Some(Access::ReadWrite),
        }
    }
}

/// The outcome of a successful handshake.
pub(super) struct Negotiated<E> {
    pub export: Arc<E>,
    pub structured: bool,
    pub meta_context: Option<u32>,
    pub read_only: bool,
}

/// Export names come from the peer: quote and cut them for the log.
fn quoted(name: &str) -> String {
    let mut s: String = name.chars().take(64).collect();
    if s.len() < name.len() {
        s.push('…');
    }
    format!("{s:?}")
}

async fn send_replies<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    replies: &[OptionReply<'_>],
) -> io::Result<()> {
    let mut out = Vec::new();
    for r in replies {
        r.encode(option, &mut out);
    }
    wr.write_all(&out).await?;
    wr.flush().await
}

fn flags_for(structured: bool, access: Access) -> u16 {
    let flags = proto::transmission_flags(structured);
    match access {
        Access::ReadOnly => flags | proto::TF_READ_ONLY,
        Access::ReadWrite => flags,
    }
}

/// Runs the handshake on `stream`. `Ok(None)`: the client left (or
/// aborted) without entering transmission. On success the (possibly TLS)
/// stream comes back split and buffered for the transmission phase.
pub(super) async fn negotiate<C: ExportCatalog>(
    stream: Io,
    catalog: &C,
    config: &ServerConfig,
    security: &Security,
    client: &mut Client,
    log: &mut ClientLog,
) -> Result<Option<(Negotiated<C::Export>, Rd, Wr)>, Fatal> {
    let (mut rd, mut wr) = split(stream);
    wr.write_all(&proto::server_greeting()).await?;
    wr.flush().await?;
    let mut flags = [0u8; proto::CLIENT_FLAGS_LEN];
    if !read_or_eof(&mut rd, &mut flags, "client flags").await? {
        return Ok(None);
    }
    let client_flags = ClientFlags::parse(flags)?;
    let mode = security.mode();
    let mut structured = false;
    // The export for which base:allocation is selected, if any.
    let mut meta_export: Option<String> = None;
    loop {
        let mut header = [0u8; proto::OPTION_HEADER_LEN];
        if !read_or_eof(&mut rd, &mut header, "option header").await? {
            return Ok(None);
        }
        let header = OptionHeader::parse(&header)?;
        let code = header.code;
        if header.length > config.max_option_length {
            if code == proto::OPT_EXPORT_NAME {
                // EXPORT_NAME cannot be answered with an error.
                return Err(Fatal::Violation(format!(
                    "NBD_OPT_EXPORT_NAME with a {}-byte name",
                    header.length
                )));
            }
            if header.length > config.max_drain {
                return Err(Fatal::Violation(format!(
                    "option {code} with a {}-byte payload",
                    header.length
                )));
            }
            drain(&mut rd, header.length, "option payload").await?;
            log.note(format_args!(
                "option {code} with a {}-byte payload",
                header.length
            ));
            let reply = OptionReply::Error(RepError::TooBig, "option payload too large");
            send_replies(&mut wr, code, &[reply]).await?;
            continue;
        }
        // Bounded by max_option_length just above.
        let mut payload = vec![0u8; usize::try_from(header.length).unwrap_or(0)];
        read_full(&mut rd, &mut payload, "option payload").await?;
        let option = match ClientOption::parse(code, &payload) {
            Ok(o) => o,
            Err(e) if code == proto::OPT_EXPORT_NAME => {
                return Err(Fatal::Violation(format!("NBD_OPT_EXPORT_NAME: {e}")));
            }
            Err(e) => {
                log.note(format_args!("option {code}: {e}"));
                let msg = e.to_string();
                let reply = OptionReply::Error(RepError::Invalid, &msg);
                send_replies(&mut wr, code, &[reply]).await?;
                continue;
            }
        };
        if mode == TlsMode::Required && !client.tls {
            match option {
                ClientOption::StartTls | ClientOption::Abort => {}
                ClientOption::ExportName(_) => {
                    return Err(Fatal::Violation(
                        "NBD_OPT_EXPORT_NAME before STARTTLS on a TLS-only server".into(),
                    ));
                }
                _ => {
                    log.note(format_args!("option {code} before STARTTLS"));
                    let reply = OptionReply::Error(
                        RepError::TlsReqd,
                        "TLS is required: send NBD_OPT_STARTTLS first",
                    );
                    send_replies(&mut wr, code, &[reply]).await?;
                    continue;
                }
            }
        }
        match option {
            ClientOption::ExportName(name) => {
                let access = security.access(client, &name);
                let export = access.and_then(|_| catalog.open(&name));
                let (Some(export), Some(access)) = (export, access) else {
                    if access.is_none() {
                        log.refuse(&name);
                    }
                    return Err(Fatal::Violation(format!(
                        "NBD_OPT_EXPORT_NAME for unknown or forbidden export {}",
                        quoted(&name)
                    )));
                };
                let flags = flags_for(structured, access);
                let reply = proto::export_name_reply(export.size(), flags, client_flags.no_zeroes);
                wr.write_all(&reply).await?;
                wr.flush().await?;
                let meta_context = selected_context(structured, &meta_export, &name);
                let session = Negotiated {
                    export,
                    structured,
                    meta_context,
                    read_only: access == Access::ReadOnly,
                };
                return Ok(Some((session, rd, wr)));
            }
            ClientOption::Abort => {
                // The client may already have closed: ignore a failed ACK.
                let _ = send_replies(&mut wr, code, &[OptionReply::Ack]).await;
                return Ok(None);
            }
            ClientOption::List => {
                // Only what this client may open: the others are not its business.
                let exports: Vec<_> = catalog
                    .list()
                    .into_iter()
                    .filter(|e| security.access(client, &e.name).is_some())
                    .collect();
                let mut replies: Vec<OptionReply<'_>> = exports
                    .iter()
                    .map(|e| OptionReply::Server {
                        name: &e.name,
                        description: &e.description,
                    })
                    .collect();
                replies.push(OptionReply::Ack);
                send_replies(&mut wr, code, &replies).await?;
            }
            ClientOption::StartTls => {
                let tls = match (&security.tls, mode) {
                    (_, TlsMode::Off) | (None, _) => {
                        let reply = OptionReply::Error(RepError::Policy, "TLS is not offered");
                        send_replies(&mut wr, code, &[reply]).await?;
                        continue;
                    }
                    (Some(_), _) if client.tls => {
                        log.note("STARTTLS on a TLS connection");
                        let reply = OptionReply::Error(RepError::Invalid, "TLS is already on");
                        send_replies(&mut wr, code, &[reply]).await?;
                        continue;
                    }
                    (Some(tls), _) => tls,
                };
                send_replies(&mut wr, code, &[OptionReply::Ack]).await?;
                if !rd.buffer().is_empty() {
                    // MUST NOT send anything between STARTTLS and the handshake.
                    return Err(Fatal::Violation("data sent after NBD_OPT_STARTTLS".into()));
                }
                let plain = BufReader::with_capacity(
                    TLS_READ_BUF,
                    rd.into_inner().unsplit(wr.into_inner()),
                );
                let stream = match tls.acceptor().accept(plain).await {
                    Ok(s) => s,
                    Err(e) => {
                        // No certificate, another CA, expired: nothing more to say to it.
                        log.refuse(&format!("TLS handshake: {e}"));
                        return Err(Fatal::Tls(e.to_string()));
                    }
                };
                client.names = crate::tls::peer_names(stream.get_ref().1.peer_certificates());
                client.tls = true;
                tracing::debug!(peer = %log.peer, identity = client.identity(), "NBD client started TLS");
                (rd, wr) = split(Box::new(stream));
                // Nothing negotiated in plaintext carries over.
                structured = false;
                meta_export = None;
            }
            ClientOption::Info(req) | ClientOption::Go(req) => {
                let Some(access) = security.access(client, &req.name) else {
                    log.refuse(&req.name);
                    let reply = OptionReply::Error(
                        RepError::Policy,
                        "access to this export is not granted",
                    );
                    send_replies(&mut wr, code, &[reply]).await?;
                    continue;
                };
                let Some(export) = catalog.open(&req.name) else {
                    log.note(format_args!("unknown export {}", quoted(&req.name)));
                    let reply = OptionReply::Error(RepError::Unknown, "no such export");
                    send_replies(&mut wr, code, &[reply]).await?;
                    continue;
                };
                // INFO and GO answer from the same state, so they agree (MUST).
                let flags = flags_for(structured, access);
                let description = if req.requests.contains(&proto::INFO_DESCRIPTION) {
                    catalog
                        .list()
                        .into_iter()
                        .find(|e| e.name == req.name)
                        .map(|e| e.description)
                        .filter(|d| !d.is_empty())
                        .unwrap_or_else(|| config.default_description.clone())
                } else {
                    String::new()
                };
                let mut replies = vec![
                    OptionReply::InfoExport {
                        size: export.size(),
                        flags,
                    },
                    // Always sent: minimum 1 means any alignment is accepted,
                    // so clients that did not ask lose nothing.
                    OptionReply::InfoBlockSize {
                        minimum: 1,
                        preferred: config.preferred_block_size,
                        maximum: config.max_payload,
                    },
                ];
                if req.requests.contains(&proto::INFO_NAME) {
                    replies.push(OptionReply::InfoName(&req.name));
                }
                if req.requests.contains(&proto::INFO_DESCRIPTION) {
                    replies.push(OptionReply::InfoDescription(&description));
                }
                replies.push(OptionReply::Ack);
                send_replies(&mut wr, code, &replies).await?;
                if code == proto::OPT_GO {
                    let meta_context = selected_context(structured, &meta_export, &req.name);
                    let session = Negotiated {
                        export,
                        structured,
                        meta_context,
                        read_only: access == Access::ReadOnly,
                    };
                    return Ok(Some((session, rd, wr)));
                }
            }
            ClientOption::StructuredReply => {
                structured = true;
                send_replies(&mut wr, code, &[OptionReply::Ack]).await?;
            }
            ClientOption::ListMetaContext(q) | ClientOption::SetMetaContext(q) => {
                let set = code == proto::OPT_SET_META_CONTEXT;
                if set {
                    // SET replaces the previous selection, even when it fails.
                    meta_export = None;
                }
                if !structured {
                    log.note("metadata context option before structured replies");
                    let reply =
                        OptionReply::Error(RepError::Invalid, "negotiate structured replies first");
                    send_replies(&mut wr, code, &[reply]).await?;
                    continue;
                }
                if security.access(client, &q.export).is_none() {
                    log.refuse(&q.export);
                    let reply = OptionReply::Error(
                        RepError::Policy,
                        "access to this export is not granted",
                    );
                    send_replies(&mut wr, code, &[reply]).await?;
                    continue;
                }
                if catalog.open(&q.export).is_none() {
                    log.note(format_args!("unknown export {}", quoted(&q.export)));
                    let reply = OptionReply::Error(RepError::Unknown, "no such export");
                    send_replies(&mut wr, code, &[reply]).await?;
                    continue;
                }
                let matches = if set {
                    q.queries.iter().any(|s| s == proto::BASE_ALLOCATION)
                } else {
                    // LIST: no query means everything; a bare namespace means
                    // everything in it. Other namespaces are ignored (MUST).
                    q.queries.is_empty()
                        || q.queries
                            .iter()
                            .any(|s| s == "base:" || s == proto::BASE_ALLOCATION)
                };
                let mut replies = Vec::new();
                if matches {
                    replies.push(OptionReply::MetaContext {
                        id: if set { BASE_ALLOCATION_ID } else { 0 },
                        name: proto::BASE_ALLOCATION,
                    });
                    if set {
                        meta_export = Some(q.export.clone());
                    }
                }
                replies.push(OptionReply::Ack);
                send_replies(&mut wr, code, &replies).await?;
            }
            ClientOption::Unsupported(code) => {
                tracing::debug!(peer = %log.peer, option = code, "unsupported option");
                let reply = OptionReply::Error(RepError::Unsup, "option not supported");
                send_replies(&mut wr, code, &[reply]).await?;
            }
        }
    }
}

/// Contexts apply only to the export they were selected for.
fn selected_context(structured: bool, meta_export: &Option<String>, name: &str) -> Option<u32> {
    (structured && meta_export.as_deref() == Some(name)).then_some(BASE_ALLOCATION_ID)
}
