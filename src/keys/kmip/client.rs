//! A blocking KMIP 1.4 client over mutual TLS: just the operations the root
//! key provider needs (Create, Activate, Locate, Encrypt, Decrypt).
//!
//! One TLS connection per operation: the root key is used a few times per
//! KEK rotation or zone creation, so a kept-open connection would only add a
//! stale-connection case to handle. Requests are sent as KMIP 1.4, the first
//! version with authenticated-encryption additional data and tags.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use zeroize::Zeroizing;

use super::ttlv::{self, Item};

/// How long to wait for a TCP connection to the KMS.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for the KMS to answer.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest server message quoted in an error.
const MAX_REASON: usize = 200;

/// KMIP tags used here (KMIP 1.4 §9.1.3.1).
pub(super) mod tag {
    pub const ATTRIBUTE: u32 = 0x420008;
    pub const ATTRIBUTE_NAME: u32 = 0x42000A;
    pub const ATTRIBUTE_VALUE: u32 = 0x42000B;
    pub const BATCH_COUNT: u32 = 0x42000D;
    pub const BATCH_ITEM: u32 = 0x42000F;
    pub const BLOCK_CIPHER_MODE: u32 = 0x420011;
    pub const CRYPTOGRAPHIC_ALGORITHM: u32 = 0x420028;
    pub const CRYPTOGRAPHIC_PARAMETERS: u32 = 0x42002B;
    pub const IV_COUNTER_NONCE: u32 = 0x42003D;
    pub const NAME_TYPE: u32 = 0x420054;
    pub const NAME_VALUE: u32 = 0x420055;
    pub const OBJECT_TYPE: u32 = 0x420057;
    pub const OPERATION: u32 = 0x42005C;
    pub const PROTOCOL_VERSION: u32 = 0x420069;
    pub const PROTOCOL_VERSION_MAJOR: u32 = 0x42006A;
    pub const PROTOCOL_VERSION_MINOR: u32 = 0x42006B;
    pub const REQUEST_HEADER: u32 = 0x420077;
    pub const REQUEST_MESSAGE: u32 = 0x420078;
    pub const REQUEST_PAYLOAD: u32 = 0x420079;
    pub const RESPONSE_PAYLOAD: u32 = 0x42007C;
    pub const RESULT_MESSAGE: u32 = 0x42007D;
    pub const RESULT_REASON: u32 = 0x42007E;
    pub const RESULT_STATUS: u32 = 0x42007F;
    pub const TAG_LENGTH: u32 = 0x4200CE;
    pub const TEMPLATE_ATTRIBUTE: u32 = 0x420091;
    pub const UNIQUE_IDENTIFIER: u32 = 0x420094;
    pub const DATA: u32 = 0x4200C2;
    pub const AE_ADDITIONAL_DATA: u32 = 0x4200FE;
    pub const AE_TAG: u32 = 0x4200FF;
}

/// KMIP operations (enumeration values).
mod op {
    pub const CREATE: u32 = 0x01;
    pub const LOCATE: u32 = 0x08;
    pub const ACTIVATE: u32 = 0x12;
    pub const ENCRYPT: u32 = 0x1F;
    pub const DECRYPT: u32 = 0x20;
}

/// Enumeration values sent.
mod value {
    pub const SYMMETRIC_KEY: u32 = 0x02;
    pub const AES: u32 = 0x03;
    pub const GCM: u32 = 0x09;
    pub const UNINTERPRETED_TEXT: u32 = 0x01;
    /// Cryptographic Usage Mask: Encrypt | Decrypt.
    pub const USAGE_ENCRYPT_DECRYPT: i32 = 0x04 | 0x08;
}

/// What went wrong talking to the KMS, sorted by what the caller can do.
#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    /// No answer: connection refused, TLS handshake failed, timeout, reset.
    /// Worth retrying while serving.
    #[error("{0}")]
    Unreachable(String),
    /// The KMS answered and refused (result status not Success).
    #[error("the KMS refused: {0}")]
    Refused(String),
    /// The KMS answered something this client cannot read.
    #[error("bad answer from the KMS: {0}")]
    Protocol(String),
}

/// GCM output of an Encrypt: IV, ciphertext, tag.
pub struct Sealed {
    /// 96-bit IV used.
    pub iv: Vec<u8>,
    /// Ciphertext (same length as the plaintext).
    pub ciphertext: Vec<u8>,
    /// 128-bit authentication tag.
    pub tag: Vec<u8>,
}

/// A KMS address and the TLS identity to reach it with.
#[derive(Clone)]
pub struct KmipClient {
    addr: String,
    tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for KmipClient {
    // The TLS configuration holds the client's private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmipClient")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn short(s: &str) -> String {
    s.chars().take(MAX_REASON).collect()
}

impl KmipClient {
    /// A client for the KMS at `addr` (`host:port`) with this TLS setup.
    pub fn new(addr: &str, tls: Arc<rustls::ClientConfig>) -> Self {
        Self {
            addr: addr.to_string(),
            tls,
        }
    }

    /// The KMS address, as configured.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Creates an AES-256 key named `name` usable for Encrypt and Decrypt,
    /// and returns its unique identifier. The key is left pre-active.
    pub fn create_aes256(&self, name: &str) -> Result<String, KmsError> {
        let attr = |n: &str, v: Item| {
            Item::structure(tag::ATTRIBUTE, vec![Item::text(tag::ATTRIBUTE_NAME, n), v])
        };
        let payload = vec![
            Item::enumeration(tag::OBJECT_TYPE, value::SYMMETRIC_KEY),
            Item::structure(
                tag::TEMPLATE_ATTRIBUTE,
                vec![
                    attr(
                        "Cryptographic Algorithm",
                        Item::enumeration(tag::ATTRIBUTE_VALUE, value::AES),
                    ),
                    attr(
                        "Cryptographic Length",
                        Item::integer(tag::ATTRIBUTE_VALUE, 256),
                    ),
                    attr(
                        "Cryptographic Usage Mask",
                        Item::integer(tag::ATTRIBUTE_VALUE, value::USAGE_ENCRYPT_DECRYPT),
                    ),
                    attr("Name", name_value(name)),
                ],
            ),
        ];
        let resp = self.call(op::CREATE, payload)?;
        unique_id(&resp)
    }

    /// Moves key `id` to the Active state (KMIP refuses Encrypt otherwise).
    pub fn activate(&self, id: &str) -> Result<(), KmsError> {
        self.call(op::ACTIVATE, vec![Item::text(tag::UNIQUE_IDENTIFIER, id)])?;
        Ok(())
    }

    /// The unique identifiers of the objects named `name`.
    pub fn locate(&self, name: &str) -> Result<Vec<String>, KmsError> {
        let resp = self.call(
            op::LOCATE,
            vec![Item::structure(
                tag::ATTRIBUTE,
                vec![Item::text(tag::ATTRIBUTE_NAME, "Name"), name_value(name)],
            )],
        )?;
        resp.children(tag::UNIQUE_IDENTIFIER)
            .map(|i| {
                i.as_text()
                    .map(str::to_string)
                    .ok_or_else(|| KmsError::Protocol("unique identifier is not text".into()))
            })
            .collect()
    }

    /// AES-256-GCM encryption inside the KMS under key `id`, with the
    /// caller's 96-bit IV and additional data, and a 128-bit tag.
    pub fn encrypt_gcm(
        &self,
        id: &str,
        iv: &[u8],
        aad: &[u8],
        plaintext: &[u8],
    ) -> Result<Sealed, KmsError> {
        let resp = self.call(
            op::ENCRYPT,
            vec![
                Item::text(tag::UNIQUE_IDENTIFIER, id),
                gcm_params(),
                Item::bytes(tag::DATA, plaintext),
                Item::bytes(tag::IV_COUNTER_NONCE, iv),
                Item::bytes(tag::AE_ADDITIONAL_DATA, aad),
            ],
        )?;
        let field = |t: u32, what: &str| {
            resp.child(t)
                .and_then(Item::as_bytes)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| KmsError::Protocol(format!("Encrypt response has no {what}")))
        };
        let ciphertext = field(tag::DATA, "data")?;
        let tag_bytes = field(tag::AE_TAG, "authentication tag")?;
        // A server that picked its own IV says so; we sent one, so it must
        // be ours or absent.
        if let Some(sent_back) = resp.child(tag::IV_COUNTER_NONCE).and_then(Item::as_bytes)
            && sent_back != iv
        {
            return Err(KmsError::Protocol(
                "the KMS used another IV than the one sent".into(),
            ));
        }
        if ciphertext.len() != plaintext.len() || tag_bytes.len() != 16 {
            return Err(KmsError::Protocol(format!(
                "Encrypt returned {} ciphertext bytes and a {}-byte tag for {} plaintext bytes",
                ciphertext.len(),
                tag_bytes.len(),
                plaintext.len()
            )));
        }
        Ok(Sealed {
            iv: iv.to_vec(),
            ciphertext,
            tag: tag_bytes,
        })
    }

    /// AES-256-GCM decryption inside the KMS: the plaintext, or
    /// [`KmsError::Refused`] when the tag does not verify.
    pub fn decrypt_gcm(
        &self,
        id: &str,
        iv: &[u8],
        aad: &[u8],
        ciphertext: &[u8],
        tag_bytes: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let resp = self.call(
            op::DECRYPT,
            vec![
                Item::text(tag::UNIQUE_IDENTIFIER, id),
                gcm_params(),
                Item::bytes(tag::DATA, ciphertext),
                Item::bytes(tag::IV_COUNTER_NONCE, iv),
                Item::bytes(tag::AE_ADDITIONAL_DATA, aad),
                Item::bytes(tag::AE_TAG, tag_bytes),
            ],
        )?;
        resp.child(tag::DATA)
            .and_then(Item::as_bytes)
            .map(|b| Zeroizing::new(b.to_vec()))
            .ok_or_else(|| KmsError::Protocol("Decrypt response has no data".into()))
    }

    /// Sends one request with one batch item; returns the response payload.
    fn call(&self, operation: u32, payload: Vec<Item>) -> Result<Item, KmsError> {
        let request = Item::structure(
            tag::REQUEST_MESSAGE,
            vec![
                Item::structure(
                    tag::REQUEST_HEADER,
                    vec![protocol_version(), Item::integer(tag::BATCH_COUNT, 1)],
                ),
                Item::structure(
                    tag::BATCH_ITEM,
                    vec![
                        Item::enumeration(tag::OPERATION, operation),
                        Item::structure(tag::REQUEST_PAYLOAD, payload),
                    ],
                ),
            ],
        );
        let response = self.exchange(&request.encode())?;
        payload_of(&response)
    }

    /// Connects, sends `request`, reads one whole TTLV message back.
    fn exchange(&self, request: &[u8]) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let unreachable = |what: &str, e: &dyn std::fmt::Display| {
            KmsError::Unreachable(format!("{what}: {}", short(&e.to_string())))
        };
        let host = self
            .addr
            .rsplit_once(':')
            .map_or(self.addr.as_str(), |(h, _)| h);
        let name =
            crate::tls::server_name(host).map_err(|e| KmsError::Unreachable(e.to_string()))?;
        let sockaddrs: Vec<_> = self
            .addr
            .to_socket_addrs()
            .map_err(|e| unreachable("cannot resolve the address", &e))?
            .collect();
        let mut last = None;
        let mut tcp = None;
        for a in &sockaddrs {
            match TcpStream::connect_timeout(a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    tcp = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let tcp = match (tcp, last) {
            (Some(s), _) => s,
            (None, Some(e)) => return Err(unreachable("cannot connect", &e)),
            (None, None) => {
                return Err(KmsError::Unreachable(
                    "the address resolves to nothing".into(),
                ));
            }
        };
        tcp.set_read_timeout(Some(IO_TIMEOUT))
            .and_then(|()| tcp.set_write_timeout(Some(IO_TIMEOUT)))
            .map_err(|e| unreachable("cannot set socket timeouts", &e))?;
        let conn = rustls::ClientConnection::new(self.tls.clone(), name)
            .map_err(|e| unreachable("TLS setup", &e))?;
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        stream
            .write_all(request)
            .and_then(|()| stream.flush())
            .map_err(|e| unreachable("TLS handshake or send failed", &e))?;
        let mut header = [0u8; 8];
        stream
            .read_exact(&mut header)
            .map_err(|e| unreachable("no answer", &e))?;
        let total = ttlv::message_len(&header).map_err(|e| KmsError::Protocol(e.to_string()))?;
        let mut buf = Zeroizing::new(vec![0u8; total]);
        buf[..8].copy_from_slice(&header);
        stream
            .read_exact(&mut buf[8..])
            .map_err(|e| unreachable("answer cut short", &e))?;
        stream.conn.send_close_notify();
        let _ = stream.flush();
        Ok(buf)
    }
}

/// The payload of a response message's one batch item, or why there is none
/// (the KMS's result reason and message when it refused).
fn payload_of(response: &[u8]) -> Result<Item, KmsError> {
    let msg = Item::decode(response).map_err(|e| KmsError::Protocol(e.to_string()))?;
    let batch = msg
        .child(tag::BATCH_ITEM)
        .ok_or_else(|| KmsError::Protocol("response has no batch item".into()))?;
    let status = batch
        .child(tag::RESULT_STATUS)
        .and_then(Item::as_enum)
        .ok_or_else(|| KmsError::Protocol("response has no result status".into()))?;
    if status != 0 {
        let reason = batch
            .child(tag::RESULT_REASON)
            .and_then(Item::as_enum)
            .map_or_else(String::new, |r| format!("result reason {r:#x}"));
        let message = batch
            .child(tag::RESULT_MESSAGE)
            .and_then(Item::as_text)
            .map(short)
            .unwrap_or_default();
        return Err(KmsError::Refused(format!(
            "status {status}, {reason}: {message}"
        )));
    }
    Ok(batch
        .child(tag::RESPONSE_PAYLOAD)
        .cloned()
        .unwrap_or_else(|| Item::structure(tag::RESPONSE_PAYLOAD, Vec::new())))
}

fn protocol_version() -> Item {
    Item::structure(
        tag::PROTOCOL_VERSION,
        vec![
            Item::integer(tag::PROTOCOL_VERSION_MAJOR, 1),
            Item::integer(tag::PROTOCOL_VERSION_MINOR, 4),
        ],
    )
}

fn gcm_params() -> Item {
    // Order matters to strict decoders: KMIP lists Block Cipher Mode before
    // Cryptographic Algorithm before Tag Length.
    Item::structure(
        tag::CRYPTOGRAPHIC_PARAMETERS,
        vec![
            Item::enumeration(tag::BLOCK_CIPHER_MODE, value::GCM),
            Item::enumeration(tag::CRYPTOGRAPHIC_ALGORITHM, value::AES),
            Item::integer(tag::TAG_LENGTH, 16),
        ],
    )
}

fn name_value(name: &str) -> Item {
    Item::structure(
        tag::ATTRIBUTE_VALUE,
        vec![
            Item::text(tag::NAME_VALUE, name),
            Item::enumeration(tag::NAME_TYPE, value::UNINTERPRETED_TEXT),
        ],
    )
}

fn unique_id(payload: &Item) -> Result<String, KmsError> {
    payload
        .child(tag::UNIQUE_IDENTIFIER)
        .and_then(Item::as_text)
        .map(str::to_string)
        .ok_or_else(|| KmsError::Protocol("response has no unique identifier".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESPONSE_MESSAGE: u32 = 0x42007B;

    fn response(batch: Vec<Item>) -> Vec<u8> {
        Item::structure(
            RESPONSE_MESSAGE,
            vec![Item::structure(tag::BATCH_ITEM, batch)],
        )
        .encode()
        .to_vec()
    }

    #[test]
    fn a_success_gives_the_payload() {
        let bytes = response(vec![
            Item::enumeration(tag::OPERATION, op::ENCRYPT),
            Item::enumeration(tag::RESULT_STATUS, 0),
            Item::structure(
                tag::RESPONSE_PAYLOAD,
                vec![Item::text(tag::UNIQUE_IDENTIFIER, "7")],
            ),
        ]);
        let p = payload_of(&bytes).unwrap();
        assert_eq!(unique_id(&p).unwrap(), "7");
    }

    #[test]
    fn a_refusal_names_reason_and_message() {
        let bytes = response(vec![
            Item::enumeration(tag::RESULT_STATUS, 1),
            Item::enumeration(tag::RESULT_REASON, 0x1),
            Item::text(tag::RESULT_MESSAGE, "Not found"),
        ]);
        match payload_of(&bytes) {
            Err(KmsError::Refused(m)) => {
                assert!(
                    m.contains("status 1") && m.contains("0x1") && m.contains("Not found"),
                    "{m}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nonsense_is_a_protocol_error() {
        assert!(matches!(payload_of(&[0u8; 8]), Err(KmsError::Protocol(_))));
        let no_status = response(vec![Item::enumeration(tag::OPERATION, op::DECRYPT)]);
        assert!(matches!(payload_of(&no_status), Err(KmsError::Protocol(_))));
        let no_batch = Item::structure(RESPONSE_MESSAGE, vec![]).encode();
        assert!(matches!(payload_of(&no_batch), Err(KmsError::Protocol(_))));
    }

    #[test]
    fn requests_carry_key_bytes_only_in_their_data_item() {
        // The wire form of an Encrypt request names the key id and holds the
        // plaintext once, in Data; Debug of it shows neither.
        let secret = [0x5Au8; 32];
        let req = Item::structure(
            tag::REQUEST_PAYLOAD,
            vec![
                Item::text(tag::UNIQUE_IDENTIFIER, "1"),
                gcm_params(),
                Item::bytes(tag::DATA, &secret),
            ],
        );
        let shown = format!("{req:?}");
        assert!(!shown.contains("90, 90"), "{shown}");
        let wire = req.encode();
        assert_eq!(
            wire.windows(32).filter(|w| *w == secret).count(),
            1,
            "the plaintext appears once"
        );
    }

    #[test]
    // The ring provider, as src/tls.rs uses (deprecated for lacking post-quantum exchange).
    #[allow(deprecated)]
    fn an_unreachable_kms_is_reported_as_unreachable() {
        // A port nothing listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let c = KmipClient::new(&format!("127.0.0.1:{port}"), std::sync::Arc::new(tls));
        match c.activate("1") {
            Err(KmsError::Unreachable(m)) => assert!(m.contains("cannot connect"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
