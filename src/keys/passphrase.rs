//! The passphrase that seals the root key file, and where it comes from.
//!
//! Sources, first match wins: a passphrase file (best: its permissions can be
//! restricted and it never shows in `ps` or `/proc/*/environ`), the
//! `KEYTURN_PASSPHRASE` environment variable (convenient, but readable by
//! anything that can read the process environment), then a prompt on the
//! terminal.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use zeroize::{Zeroize, Zeroizing};

use super::KeyError;
use super::fsutil;

/// The environment variable consulted by default.
pub const PASSPHRASE_ENV: &str = "KEYTURN_PASSPHRASE";

/// Largest passphrase file read; a bigger file is surely the wrong file.
const MAX_PASSPHRASE_FILE: u64 = 64 * 1024;

/// A passphrase: zeroized on drop, redacted in `Debug`, never `Display`.
pub struct Passphrase(Zeroizing<String>);

impl std::fmt::Debug for Passphrase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passphrase(<redacted>)")
    }
}

impl Passphrase {
    /// Takes ownership of `s`. An empty passphrase is refused.
    pub fn new(s: String) -> Result<Self, KeyError> {
        Self::from_string(s, "the caller")
    }

    /// The passphrase's bytes, for the KDF only.
    pub fn expose(&self) -> &str {
        &self.0
    }

    fn from_string(s: String, origin: &str) -> Result<Self, KeyError> {
        let s = Zeroizing::new(s);
        if s.is_empty() {
            return Err(KeyError::BadPassphrase {
                origin: origin.to_string(),
                reason: "it is empty",
            });
        }
        Ok(Self(s))
    }

    fn from_bytes(bytes: Zeroizing<Vec<u8>>, origin: &str) -> Result<Self, KeyError> {
        if std::str::from_utf8(&bytes).is_err() {
            return Err(KeyError::BadPassphrase {
                origin: origin.to_string(),
                reason: "it is not valid UTF-8",
            });
        }
        let mut bytes = bytes;
        match String::from_utf8(std::mem::take(&mut *bytes)) {
            Ok(s) => Self::from_string(s, origin),
            // Checked above; wipe the bytes the error carries all the same.
            Err(e) => {
                e.into_bytes().zeroize();
                Err(KeyError::BadPassphrase {
                    origin: origin.to_string(),
                    reason: "it is not valid UTF-8",
                })
            }
        }
    }

    /// Finds the passphrase: the file if given (one trailing newline
    /// stripped), else the environment variable `env_var` if set, else a
    /// prompt on the terminal if `allow_prompt` and stdin is a terminal.
    /// Otherwise [`KeyError::NoPassphrase`], which says how to supply one.
    pub fn resolve(
        file: Option<&Path>,
        env_var: &str,
        allow_prompt: bool,
    ) -> Result<Passphrase, KeyError> {
        resolve_from(
            file,
            env_var,
            std::env::var_os(env_var),
            allow_prompt && std::io::stdin().is_terminal(),
            || prompt("Passphrase for the keyturn root key: "),
        )
    }

    /// Like [`resolve`](Self::resolve), for a passphrase being chosen (a new
    /// root key file): a terminal prompt asks twice and insists they match.
    pub fn resolve_new(
        file: Option<&Path>,
        env_var: &str,
        allow_prompt: bool,
    ) -> Result<Passphrase, KeyError> {
        resolve_from(
            file,
            env_var,
            std::env::var_os(env_var),
            allow_prompt && std::io::stdin().is_terminal(),
            || {
                let first = prompt("New passphrase for the keyturn root key: ")?;
                let second = prompt("Repeat the passphrase: ")?;
                if first.expose() != second.expose() {
                    return Err(KeyError::BadPassphrase {
                        origin: "terminal".into(),
                        reason: "the two entries differ",
                    });
                }
                Ok(first)
            },
        )
    }
}

fn prompt(text: &str) -> Result<Passphrase, KeyError> {
    // rpassword reads from /dev/tty with echo off.
    let s = rpassword::prompt_password(text).map_err(|source| KeyError::Io {
        op: "read a passphrase from",
        path: "/dev/tty".into(),
        source,
    })?;
    Passphrase::from_string(s, "terminal")
}

/// [`Passphrase::resolve`] with its environment passed in, so tests need not
/// touch the process environment or a terminal.
fn resolve_from(
    file: Option<&Path>,
    env_var: &str,
    env_value: Option<OsString>,
    can_prompt: bool,
    prompt: impl FnOnce() -> Result<Passphrase, KeyError>,
) -> Result<Passphrase, KeyError> {
    if let Some(path) = file {
        let mut bytes = Zeroizing::new(fsutil::read_limited(
            "passphrase file",
            path,
            MAX_PASSPHRASE_FILE,
        )?);
        // Editors and `echo` add a newline that is not part of the passphrase.
        // (Zeroizing wipes the whole capacity on drop, truncated bytes too.)
        let len = bytes.len();
        if bytes.ends_with(b"\r\n") {
            bytes.truncate(len - 2);
        } else if bytes.ends_with(b"\n") {
            bytes.truncate(len - 1);
        }
        return Passphrase::from_bytes(bytes, &format!("file {}", path.display()));
    }
    if let Some(v) = env_value {
        let origin = format!("environment variable {env_var}");
        return Passphrase::from_bytes(Zeroizing::new(v.into_vec()), &origin);
    }
    if can_prompt {
        return prompt();
    }
    Err(KeyError::NoPassphrase {
        env_var: env_var.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_prompt() -> Result<Passphrase, KeyError> {
        panic!("must not prompt")
    }

    #[test]
    fn file_wins_and_loses_one_newline() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pass");
        std::fs::write(&p, "correct horse\n\n").unwrap();
        let got = resolve_from(Some(&p), "X", Some("env".into()), true, no_prompt).unwrap();
        assert_eq!(got.expose(), "correct horse\n");
        std::fs::write(&p, "battery\r\n").unwrap();
        let got = resolve_from(Some(&p), "X", None, false, no_prompt).unwrap();
        assert_eq!(got.expose(), "battery");
    }

    #[test]
    fn env_then_prompt_then_error() {
        let got = resolve_from(None, "X", Some("from env".into()), true, no_prompt).unwrap();
        assert_eq!(got.expose(), "from env");
        let got = resolve_from(None, "X", None, true, || Passphrase::new("typed".into())).unwrap();
        assert_eq!(got.expose(), "typed");
        let e = resolve_from(None, "KEYTURN_PASSPHRASE", None, false, no_prompt).unwrap_err();
        assert!(matches!(e, KeyError::NoPassphrase { .. }));
        let msg = e.to_string();
        assert!(
            msg.contains("KEYTURN_PASSPHRASE") && msg.contains("passphrase file"),
            "{msg}"
        );
    }

    #[test]
    fn empty_is_refused_everywhere() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pass");
        std::fs::write(&p, "\n").unwrap();
        assert!(matches!(
            resolve_from(Some(&p), "X", None, false, no_prompt),
            Err(KeyError::BadPassphrase { .. })
        ));
        assert!(matches!(
            resolve_from(None, "X", Some("".into()), false, no_prompt),
            Err(KeyError::BadPassphrase { .. })
        ));
        assert!(matches!(
            Passphrase::new(String::new()),
            Err(KeyError::BadPassphrase { .. })
        ));
    }

    #[test]
    fn missing_file_and_bad_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nope");
        let e = resolve_from(Some(&p), "X", None, false, no_prompt).unwrap_err();
        assert!(matches!(e, KeyError::NotFound { .. }), "{e}");
        std::fs::write(&p, [0xff, 0xfe, b'a']).unwrap();
        let e = resolve_from(Some(&p), "X", None, false, no_prompt).unwrap_err();
        assert!(e.to_string().contains("UTF-8"), "{e}");
    }

    #[test]
    fn debug_redacts() {
        let p = Passphrase::new("hunter2".into()).unwrap();
        assert_eq!(format!("{p:?}"), "Passphrase(<redacted>)");
    }
}
