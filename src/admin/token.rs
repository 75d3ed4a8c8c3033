//! The admin API's bearer token: made at `keyturn init`, kept in a file of
//! mode 0600 in the pool directory, read by the server and by the CLI.
//!
//! The token never appears in a log, an error or a Debug string: both
//! [`fmt::Debug`] and [`fmt::Display`] print `AdminToken(<redacted>)`, and
//! comparison takes constant time.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rand::RngCore;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::keys::KeyError;
use crate::keys::fsutil::{Replace, read_limited, write_private_atomic};

/// Random bytes in a fresh token (hex encoded in the file).
const TOKEN_BYTES: usize = 32;
/// A token shorter than this is refused (a typed-in weak secret).
const MIN_LEN: usize = 32;
/// A token file larger than this is not a token file.
const MAX_FILE: u64 = 4096;

/// Errors reading or writing a token file.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file could not be read or written.
    #[error(transparent)]
    File(#[from] KeyError),
    /// The file holds something that cannot be a token (the contents are not shown).
    #[error("{path}: {reason}")]
    Invalid {
        /// Token file.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The admin API bearer token (zeroized on drop; never printed).
#[derive(Clone)]
pub struct AdminToken(Zeroizing<String>);

impl AdminToken {
    /// A fresh token: 32 random bytes from the OS, as 64 hex digits.
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; TOKEN_BYTES]);
        rand::rngs::OsRng.fill_bytes(&mut bytes[..]);
        let mut hex = Zeroizing::new(String::with_capacity(TOKEN_BYTES * 2));
        for b in bytes.iter() {
            hex.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            hex.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
        }
        AdminToken(hex)
    }

    /// A token from text (surrounding white space is dropped). It must be
    /// at least 32 printable ASCII characters with no space inside, so that
    /// it fits an HTTP header as it is.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if t.len() < MIN_LEN {
            return Err(format!(
                "a token must be at least {MIN_LEN} characters (this one has {})",
                t.len()
            ));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("a token may hold only printable ASCII characters, no spaces".into());
        }
        Ok(AdminToken(Zeroizing::new(t.to_owned())))
    }

    /// Writes a fresh token to `path` (mode 0600, atomically, replacing any
    /// token there) and returns it.
    pub fn create(path: &Path) -> Result<Self, TokenError> {
        let token = Self::generate();
        let mut text = Zeroizing::new(token.0.to_string());
        text.push('\n');
        write_private_atomic("admin token", path, text.as_bytes(), Replace::Allow)?;
        Ok(token)
    }

    /// Reads the token in `path`. A file that others (not owner or group)
    /// may read or write is refused: anyone who can read it can rotate keys.
    pub fn load(path: &Path) -> Result<Self, TokenError> {
        let invalid = |reason: String| TokenError::Invalid {
            path: path.display().to_string(),
            reason,
        };
        let bytes = Zeroizing::new(read_limited("admin token", path, MAX_FILE)?);
        let mode = std::fs::metadata(path)
            .map_err(|source| KeyError::Io {
                op: "stat",
                path: path.to_path_buf(),
                source,
            })?
            .permissions()
            .mode();
        if mode & 0o007 != 0 {
            return Err(invalid(format!(
                "mode {:o} lets every user use the admin API; chmod 600 it",
                mode & 0o777
            )));
        }
        let text = std::str::from_utf8(&bytes).map_err(|_| invalid("not UTF-8 text".into()))?;
        Self::parse(text).map_err(invalid)
    }

    /// The token in `path`, or a fresh one written there if there is no file.
    pub fn load_or_create(path: &Path) -> Result<Self, TokenError> {
        match Self::load(path) {
            Err(TokenError::File(KeyError::NotFound { .. })) => Self::create(path),
            other => other,
        }
    }

    /// The token text, for an `Authorization` header. Keep it out of logs.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this token, in time that does not depend on
    /// where the two differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        self.0.as_bytes().ct_eq(presented).into()
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

impl fmt::Display for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_fresh_hex_and_redacted() {
        let a = AdminToken::generate();
        let b = AdminToken::generate();
        assert_eq!(a.expose().len(), 64);
        assert!(a.expose().bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a.expose(), b.expose());
        for shown in [format!("{a:?}"), format!("{a}"), format!("{:?}", Some(&a))] {
            assert!(!shown.contains(a.expose()), "{shown}");
            assert!(shown.contains("redacted"), "{shown}");
        }
    }

    #[test]
    fn matches_only_the_same_token() {
        let t = AdminToken::parse("0123456789abcdef0123456789abcdef").unwrap();
        assert!(t.matches(b"0123456789abcdef0123456789abcdef"));
        assert!(!t.matches(b"0123456789abcdef0123456789abcdeF"));
        assert!(!t.matches(b"0123456789abcdef0123456789abcde"));
        assert!(!t.matches(b""));
    }

    #[test]
    fn parse_refuses_weak_or_unprintable_tokens() {
        assert!(AdminToken::parse("short").is_err());
        assert!(AdminToken::parse(&format!("{}\u{7}", "a".repeat(40))).is_err());
        assert!(AdminToken::parse(&format!("{} {}", "a".repeat(20), "b".repeat(20))).is_err());
        let t = AdminToken::parse(&format!("  {}\n", "x".repeat(40))).unwrap();
        assert_eq!(t.expose(), "x".repeat(40));
    }

    #[test]
    fn file_round_trip_mode_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.token");
        let made = AdminToken::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let read = AdminToken::load_or_create(&path).unwrap();
        assert_eq!(read.expose(), made.expose(), "an existing token is kept");
        let fresh = AdminToken::create(&path).unwrap();
        assert_ne!(fresh.expose(), made.expose(), "create replaces the token");
        assert_eq!(AdminToken::load(&path).unwrap().expose(), fresh.expose());

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = AdminToken::load(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        assert!(!err.contains(fresh.expose()), "{err}");

        std::fs::write(&path, "tiny").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = AdminToken::load(&path).unwrap_err().to_string();
        assert!(err.contains("at least 32"), "{err}");
        assert!(matches!(
            AdminToken::load(&dir.path().join("none")),
            Err(TokenError::File(KeyError::NotFound { .. }))
        ));
    }
}
