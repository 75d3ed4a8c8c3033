//! TLS for every listener that leaves the host: X.509 certificates from
//! files named in `pool.toml` (`[tls]`), loaded into rustls, swapped in
//! whole on SIGHUP.
//!
//! One [`ServerTls`] serves the NBD listener (after `NBD_OPT_STARTTLS`), the
//! admin API (HTTPS) and the change-stream listener, so a certificate
//! renewal reaches all three with one signal. With a CA configured, client
//! certificates are required and verified against it (mutual TLS), and
//! [`peer_names`] gives the names an access rule can match.
//!
//! rustls rather than OpenSSL: it is memory-safe, needs no system library,
//! and keyturn has no use for TLS-PSK (the one thing rustls lacks): client
//! identity comes from certificates.

#![forbid(unsafe_code)]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// When the NBD server offers or insists on TLS (like nbdkit `--tls`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// No TLS: `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY`.
    #[default]
    Off,
    /// TLS when the client asks for it (the spec's SELECTIVETLS).
    Optional,
    /// Every option before `NBD_OPT_STARTTLS` but `NBD_OPT_ABORT` gets
    /// `NBD_REP_ERR_TLS_REQD` (the spec's FORCEDTLS).
    Required,
}

/// `[tls]` in `pool.toml`. Relative paths are relative to the pool directory.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// Server certificate chain (PEM), leaf first.
    pub cert: Option<PathBuf>,
    /// The server certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
    /// CA certificate(s) (PEM) that client certificates must chain to. Set:
    /// every TLS client must present a valid certificate (mutual TLS).
    pub ca: Option<PathBuf>,
    /// The NBD listener's mode.
    pub nbd: TlsMode,
    /// Serve NBD in plaintext on an address beyond loopback anyway.
    pub allow_plaintext: bool,
    /// TLS on the change-stream listener even on loopback (beyond
    /// loopback it is always on when a certificate is configured).
    pub stream: bool,
}

impl TlsSection {
    /// Whether nothing is configured (so `pool.toml` need not show it).
    pub fn is_unset(&self) -> bool {
        *self == Self::default()
    }

    /// The certificate files, resolved against the pool directory, if a
    /// certificate and key are both named.
    pub fn files(&self, pool_dir: &Path) -> Result<Option<TlsFiles>, TlsError> {
        let at = |p: &PathBuf| pool_dir.join(p);
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Ok(Some(TlsFiles {
                cert: at(cert),
                key: at(key),
                ca: self.ca.as_ref().map(at),
            })),
            (None, None) if self.ca.is_none() => Ok(None),
            _ => Err(TlsError::Incomplete),
        }
    }
}

/// Where a server's certificate, key and client CA are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// Client CA (PEM); `None`: no client certificates asked for.
    pub ca: Option<PathBuf>,
}

/// Why TLS could not be set up. Never carries key bytes.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file holds no usable PEM item of the kind expected.
    #[error("{path}: {what}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was expected or wrong.
        what: String,
    },
    /// `cert` and `key` must be named together.
    #[error("[tls] needs both cert and key (and ca only with them)")]
    Incomplete,
    /// rustls refused the material (key does not match, bad CA, …).
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client CA could not be turned into a verifier.
    #[error("client CA: {0}")]
    Verifier(String),
    /// A server name for the client side is not a DNS name or address.
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
}

/// The *ring* provider: already a dependency, and it builds without a C
/// toolchain's cmake (aws-lc-rs needs one). rustls deprecates it for lacking
/// post-quantum key exchange; classical X25519/P-256 stays.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Zeroizing<Vec<u8>>, TlsError> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|source| TlsError::Read {
            path: path.into(),
            source,
        })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.into(),
            what: format!("bad PEM certificate: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.into(),
            what: "no CERTIFICATE in the file".into(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    // The parse error names the PEM problem, never the key's bytes.
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| TlsError::Pem {
        path: path.into(),
        what: format!("no usable private key: {e}"),
    })
}

fn roots(path: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(path)? {
        roots.add(c)?;
    }
    Ok(roots)
}

fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = match &files.ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)?),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(certs(&files.cert)?, private_key(&files.key)?)?;
    Ok(Arc::new(config))
}

/// A server's TLS configuration, replaced whole by [`ServerTls::reload`].
/// Connections already running keep the configuration they started with.
pub struct ServerTls {
    files: TlsFiles,
    current: RwLock<Arc<rustls::ServerConfig>>,
}

impl std::fmt::Debug for ServerTls {
    // Names the files only: the configuration holds the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the certificate, key and client CA.
    pub fn load(files: TlsFiles) -> Result<Self, TlsError> {
        let current = RwLock::new(server_config(&files)?);
        Ok(ServerTls { files, current })
    }

    /// Reads the files again. On any error the old configuration stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = server_config(&self.files)?;
        *self.current.write() = fresh;
        Ok(())
    }

    /// Whether clients must present a certificate (a CA is configured).
    pub fn mutual(&self) -> bool {
        self.files.ca.is_some()
    }

    /// The files this configuration comes from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// An acceptor with the current configuration.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.read().clone())
    }
}

/// The names a verified client certificate carries: the subject's common
/// names, then its DNS, e-mail, URI and IP subject alternative names.
/// Empty when the client sent no certificate.
pub fn peer_names(certs: Option<&[CertificateDer<'_>]>) -> Vec<String> {
    let Some(leaf) = certs.and_then(|c| c.first()) else {
        return Vec::new();
    };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(leaf.as_ref()) else {
        return Vec::new();
    };
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        use x509_parser::extensions::GeneralName;
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => {
                    names.push((*s).to_owned())
                }
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*b).ok().map(IpAddr::from),
                        _ => None,
                    };
                    names.extend(ip.map(|ip| ip.to_string()));
                }
                _ => {}
            }
        }
    }
    names
}

/// A client-side TLS configuration (the replication agent's).
#[derive(Clone)]
pub struct ClientTls(Arc<rustls::ClientConfig>);

impl std::fmt::Debug for ClientTls {
    // The configuration may hold a client key: show nothing of it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls(..)")
    }
}

impl ClientTls {
    /// Trusts the CA in `ca`, and presents `cert`/`key` when given (for a
    /// server that asks for client certificates).
    pub fn load(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Self, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots(ca)?);
        let config = match identity {
            Some((cert, key)) => builder.with_client_auth_cert(certs(cert)?, private_key(key)?)?,
            None => builder.with_no_client_auth(),
        };
        Ok(ClientTls(Arc::new(config)))
    }

    /// The rustls configuration (for a blocking client).
    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        self.0.clone()
    }

    /// A connector with this configuration.
    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.0.clone())
    }
}

/// The name to check a server's certificate against, from a host string.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_owned()).map_err(|_| TlsError::ServerName(host.to_owned()))
}

/// Whether a listen address (`host:port`, `[v6]:port`, or a Unix socket
/// path) stays on this host. Names other than `localhost` count as beyond.
pub fn is_local_listen(addr: &str) -> bool {
    if addr.starts_with("unix:") || addr.contains('/') {
        return true;
    }
    let host = match addr.rsplit_once(':') {
        Some((h, _)) => h,
        None => addr,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_listen_addresses() {
        assert!(is_local_listen("127.0.0.1:10809"));
        assert!(is_local_listen("127.3.0.1:0"));
        assert!(is_local_listen("[::1]:10809"));
        assert!(is_local_listen("localhost:1"));
        assert!(is_local_listen("unix:/tmp/x.sock"));
        assert!(!is_local_listen("0.0.0.0:10809"));
        assert!(!is_local_listen("[::]:10809"));
        assert!(!is_local_listen("10.0.0.1:10809"));
        assert!(!is_local_listen("storage.example:10809"));
    }

    #[test]
    fn incomplete_section_is_an_error() {
        let only_cert = TlsSection {
            cert: Some("c.pem".into()),
            ..TlsSection::default()
        };
        assert!(matches!(
            only_cert.files(Path::new("/p")),
            Err(TlsError::Incomplete)
        ));
        assert!(
            TlsSection::default()
                .files(Path::new("/p"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn missing_files_name_the_path() {
        let files = TlsFiles {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            ca: None,
        };
        let e = ServerTls::load(files).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/cert.pem") || e.contains("/nonexistent/key.pem"));
    }

    #[test]
    fn garbage_key_file_is_a_clear_error_without_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWJ5dGVz\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = match private_key(&key) {
            Ok(_) => String::from("accepted"),
            Err(e) => e.to_string(),
        };
        // Whatever rustls thinks of it, the message never echoes the content.
        assert!(!e.contains("c2VjcmV0"), "{e}");
    }
}
