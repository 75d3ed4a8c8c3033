//! Named API tokens with a role each, stored hashed in `tokens.json` in
//! the pool directory.
//!
//! A token is `kt_` and 64 hex digits (256 random bits), shown once when it
//! is made. The file keeps only its BLAKE3 hash: a high-entropy token needs
//! no slow password hash, and a leaked file lets nobody in. A presented
//! token is hashed and compared with every stored hash in constant time.
//!
//! ```json
//! { "tokens": [ { "name": "grafana", "role": "viewer",
//!                 "hash": "<64 hex: BLAKE3 of the token>",
//!                 "created_unix": 1765000000, "created_by": "admin.token" } ] }
//! ```
//!
//! The pool's own admin token file (`admin.token`) stays valid as an
//! `admin` token named [`ADMIN_FILE_TOKEN`].

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::token::AdminToken;
use crate::keys::KeyError;
use crate::keys::fsutil::{Replace, read_limited, write_private_atomic};

/// The file in the pool directory.
pub const TOKENS_FILE: &str = "tokens.json";
/// The name the pool's admin token file acts under (in the audit log).
pub const ADMIN_FILE_TOKEN: &str = "admin.token";
/// Prefix of a named token.
const PREFIX: &str = "kt_";
/// Most tokens a pool keeps.
const MAX_TOKENS: usize = 1000;
/// A tokens file larger than this is refused.
const MAX_FILE: u64 = 1 << 20;

/// What a token may do. Each role may do everything the ones before it may.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads only (`GET`).
    Viewer,
    /// Rotation control: rotations, the scheduler, the schedule.
    Operator,
    /// Zones, volumes, policies, keys, streams and tokens.
    Admin,
}

impl Role {
    /// Every role, weakest first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    /// Its name (`viewer`, `operator`, `admin`).
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Whether this role may do what `needed` may.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Role {
    type Err = TokensError;

    fn from_str(s: &str) -> Result<Self, TokensError> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| TokensError::Invalid(format!(
                "no role named {s:?}: the roles are viewer (GET only), operator (rotation control) and admin (zones, volumes, policies, keys)"
            )))
    }
}

/// Who a request acts as: a token's name and role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Actor {
    /// The token's name (what the audit log records).
    pub name: String,
    /// Its role.
    pub role: Role,
}

/// Errors of the token store.
#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    /// The file could not be read or written.
    #[error(transparent)]
    File(#[from] KeyError),
    /// The file is not a tokens file.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A bad name or role.
    #[error("{0}")]
    Invalid(String),
    /// A token of that name exists.
    #[error("a token named {0:?} exists; revoke it first or choose another name")]
    Exists(String),
    /// No token of that name.
    #[error("no token named {0:?}")]
    NotFound(String),
}

/// One stored token (no secret: its hash).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    name: String,
    role: Role,
    /// BLAKE3 of the token text, hex.
    hash: String,
    created_unix: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    created_by: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    tokens: Vec<Stored>,
}

/// A token as `token list` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// When it was made (Unix seconds).
    pub created_unix: u64,
    /// Who made it (a token name, or `local` for the command line on an
    /// unserved pool).
    pub created_by: Option<String>,
}

/// A token just made: the only time its text exists outside the client.
#[derive(Serialize, Deserialize)]
pub struct NewToken {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// The token (`kt_` + 64 hex digits).
    pub token: String,
}

impl fmt::Debug for NewToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewToken")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("token", &"<redacted>")
            .finish()
    }
}

impl Drop for NewToken {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.token);
    }
}

/// The named tokens of one pool, with the admin token file's token.
pub struct TokenStore {
    path: PathBuf,
    file: File,
    admin: Option<AdminToken>,
}

impl fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenStore")
            .field("path", &self.path)
            .field("tokens", &self.file.tokens.len())
            .finish()
    }
}

/// `name` is 1 to 64 of `A-Z a-z 0-9 . _ -`, not the admin file's name.
pub fn check_name(name: &str) -> Result<(), TokensError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        return Err(TokensError::Invalid(format!(
            "bad token name {name:?}: use 1 to 64 letters, digits, '.', '_' or '-'"
        )));
    }
    if name == ADMIN_FILE_TOKEN {
        return Err(TokensError::Invalid(format!(
            "{ADMIN_FILE_TOKEN:?} is the pool's admin token file; choose another name"
        )));
    }
    Ok(())
}

fn hash_hex(token: &[u8]) -> String {
    blake3::hash(token).to_hex().to_string()
}

impl TokenStore {
    /// The file in pool directory `dir`.
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(TOKENS_FILE)
    }

    /// Reads the tokens of pool directory `dir` (none when there is no
    /// file); `admin` is the admin token file's token, if the caller has it.
    pub fn load(dir: &Path, admin: Option<AdminToken>) -> Result<Self, TokensError> {
        let path = Self::path(dir);
        let file = match read_limited("tokens file", &path, MAX_FILE) {
            Ok(bytes) => {
                let file: File =
                    serde_json::from_slice(&bytes).map_err(|e| TokensError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                for t in &file.tokens {
                    let bad = |reason: String| TokensError::Corrupt {
                        path: path.clone(),
                        reason,
                    };
                    check_name(&t.name).map_err(|e| bad(e.to_string()))?;
                    if t.hash.len() != 64 || !t.hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(bad(format!("token {:?} has a malformed hash", t.name)));
                    }
                }
                file
            }
            Err(KeyError::NotFound { .. }) => File::default(),
            Err(e) => return Err(e.into()),
        };
        Ok(TokenStore { path, file, admin })
    }

    /// Who `presented` is, if anyone. Every stored hash is compared, each
    /// in constant time, so the answer's timing does not say which
    /// matched or how much of one did.
    pub fn authenticate(&self, presented: &[u8]) -> Option<Actor> {
        let mut found: Option<Actor> = None;
        if let Some(admin) = &self.admin
            && admin.matches(presented)
        {
            found = Some(Actor {
                name: ADMIN_FILE_TOKEN.into(),
                role: Role::Admin,
            });
        }
        let hash = hash_hex(presented);
        for t in &self.file.tokens {
            if bool::from(t.hash.as_bytes().ct_eq(hash.as_bytes())) && found.is_none() {
                found = Some(Actor {
                    name: t.name.clone(),
                    role: t.role,
                });
            }
        }
        found
    }

    /// The tokens (never their text or hash).
    pub fn list(&self) -> Vec<TokenInfo> {
        self.file
            .tokens
            .iter()
            .map(|t| TokenInfo {
                name: t.name.clone(),
                role: t.role,
                created_unix: t.created_unix,
                created_by: t.created_by.clone(),
            })
            .collect()
    }

    /// Makes a token `name` with `role`, saves the file, and returns the
    /// token's text (the only copy).
    pub fn create(
        &mut self,
        name: &str,
        role: Role,
        created_by: Option<&str>,
        now_unix: u64,
    ) -> Result<NewToken, TokensError> {
        check_name(name)?;
        if self.file.tokens.iter().any(|t| t.name == name) {
            return Err(TokensError::Exists(name.into()));
        }
        if self.file.tokens.len() >= MAX_TOKENS {
            return Err(TokensError::Invalid(format!(
                "a pool keeps at most {MAX_TOKENS} tokens; revoke some first"
            )));
        }
        let secret = AdminToken::generate();
        let text = Zeroizing::new(format!("{PREFIX}{}", secret.expose()));
        let mut next = self.file.clone();
        next.tokens.push(Stored {
            name: name.into(),
            role,
            hash: hash_hex(text.as_bytes()),
            created_unix: now_unix,
            created_by: created_by.map(Into::into),
        });
        self.save(next)?;
        Ok(NewToken {
            name: name.into(),
            role,
            token: text.to_string(),
        })
    }

    /// Removes token `name` (it stops working at once) and saves the file.
    pub fn revoke(&mut self, name: &str) -> Result<TokenInfo, TokensError> {
        let info = self
            .list()
            .into_iter()
            .find(|t| t.name == name)
            .ok_or_else(|| TokensError::NotFound(name.into()))?;
        let mut next = self.file.clone();
        next.tokens.retain(|t| t.name != name);
        self.save(next)?;
        Ok(info)
    }

    fn save(&mut self, next: File) -> Result<(), TokensError> {
        let text = serde_json::to_vec_pretty(&next).map_err(|e| TokensError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        write_private_atomic("tokens file", &self.path, &text, Replace::Allow)?;
        self.file = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stored_hashed_and_authenticate_with_their_role() {
        let dir = tempfile::tempdir().unwrap();
        let admin = AdminToken::generate();
        let mut store = TokenStore::load(dir.path(), Some(admin.clone())).unwrap();
        let v = store
            .create("grafana", Role::Viewer, Some("admin.token"), 7)
            .unwrap();
        let o = store.create("oncall", Role::Operator, None, 8).unwrap();
        assert!(v.token.starts_with("kt_") && v.token.len() == 67);
        assert!(!format!("{v:?}").contains(&v.token));
        let text = std::fs::read_to_string(TokenStore::path(dir.path())).unwrap();
        assert!(
            !text.contains(&v.token[3..]),
            "the file holds no token text"
        );
        assert!(text.contains(&hash_hex(v.token.as_bytes())));

        let reread = TokenStore::load(dir.path(), Some(admin.clone())).unwrap();
        let who = |s: &TokenStore, t: &str| s.authenticate(t.as_bytes()).map(|a| (a.name, a.role));
        assert_eq!(
            who(&reread, &v.token),
            Some(("grafana".into(), Role::Viewer))
        );
        assert_eq!(
            who(&reread, &o.token),
            Some(("oncall".into(), Role::Operator))
        );
        assert_eq!(
            who(&reread, admin.expose()),
            Some((ADMIN_FILE_TOKEN.into(), Role::Admin))
        );
        assert_eq!(who(&reread, &v.token[..66]), None);
        assert_eq!(who(&reread, ""), None);
        assert_eq!(
            reread
                .list()
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>(),
            ["grafana", "oncall"]
        );

        let mut store = reread;
        assert!(matches!(
            store.create("grafana", Role::Admin, None, 9),
            Err(TokensError::Exists(_))
        ));
        store.revoke("grafana").unwrap();
        assert_eq!(who(&store, &v.token), None);
        let reread = TokenStore::load(dir.path(), None).unwrap();
        assert_eq!(who(&reread, &v.token), None, "revocation is durable");
        assert_eq!(who(&reread, admin.expose()), None, "no admin file given");
        assert!(matches!(
            store.revoke("grafana"),
            Err(TokensError::NotFound(_))
        ));
    }

    #[test]
    fn names_roles_and_files_are_checked() {
        for bad in ["", "a b", "x/y", "admin.token", &"n".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        check_name("ci-bot_2.prod").unwrap();
        assert_eq!("operator".parse::<Role>().unwrap(), Role::Operator);
        let e = "root".parse::<Role>().unwrap_err().to_string();
        assert!(e.contains("viewer") && e.contains("admin"), "{e}");
        assert!(Role::Admin.allows(Role::Operator) && !Role::Viewer.allows(Role::Operator));

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(TokenStore::path(dir.path()), "{\"tokens\": 3}").unwrap();
        let e = TokenStore::load(dir.path(), None).unwrap_err().to_string();
        assert!(e.contains("tokens.json"), "{e}");
    }
}
