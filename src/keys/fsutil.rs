//! Durable, private writes for key files, and bounded reads.
//!
//! A key file is replaced by writing a temporary file beside it (mode 0600,
//! created exclusively), fsyncing it, moving it into place, and fsyncing the
//! directory. A crash leaves the old file or the new one, never a torn mix,
//! and never a moment where the file is readable by others.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::KeyError;

/// Whether a write may replace an existing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Replace {
    /// Fail with [`KeyError::AlreadyExists`] if the target exists.
    Never,
    /// Atomically replace the target.
    Allow,
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> KeyError {
    let path = path.to_path_buf();
    move |source| KeyError::Io { op, path, source }
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Writes `bytes` to `path` atomically with mode 0600.
pub(crate) fn write_private_atomic(
    what: &'static str,
    path: &Path,
    bytes: &[u8],
    replace: Replace,
) -> Result<(), KeyError> {
    let dir = parent_dir(path);
    let name = path.file_name().ok_or_else(|| KeyError::Io {
        op: "write",
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
    })?;
    if replace == Replace::Never && fs::symlink_metadata(path).is_ok() {
        return Err(KeyError::AlreadyExists {
            what,
            path: path.to_path_buf(),
        });
    }

    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(
        ".tmp-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let tmp = dir.join(tmp_name);

    let result = (|| {
        // create_new: never follow or reuse something already at the temp name.
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("create", &tmp))?;
        f.write_all(bytes).map_err(io("write", &tmp))?;
        crate::store::durable::sync_all(&f).map_err(io("fsync", &tmp))?;
        drop(f);
        match replace {
            Replace::Allow => fs::rename(&tmp, path).map_err(io("rename into", path))?,
            Replace::Never => {
                // A hard link fails if the target exists, so a file created by
                // someone else since the check above is never clobbered.
                fs::hard_link(&tmp, path).map_err(|source| {
                    if source.kind() == std::io::ErrorKind::AlreadyExists {
                        KeyError::AlreadyExists {
                            what,
                            path: path.to_path_buf(),
                        }
                    } else {
                        KeyError::Io {
                            op: "link into",
                            path: path.to_path_buf(),
                            source,
                        }
                    }
                })?;
                fs::remove_file(&tmp).map_err(io("remove", &tmp))?;
            }
        }
        // The rename or link is durable only once the directory is synced.
        crate::store::durable::sync_dir(&dir).map_err(io("fsync directory", &dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Destroys a key file that is no longer needed: overwrites its bytes with
/// random ones and fsyncs them (so the old content is not merely unlinked
/// but gone from the file's blocks, as far as the file system lets a file
/// overwrite itself in place), then unlinks it and fsyncs the directory. A
/// file already gone is fine.
///
/// Copy-on-write file systems, SSD wear levelling and backups may keep old
/// blocks all the same; what protects those is the passphrase or the key
/// the file was sealed under.
pub(crate) fn destroy_file(what: &'static str, path: &Path) -> Result<(), KeyError> {
    let mut f = match OpenOptions::new().write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(KeyError::Io {
                op: "open for destruction",
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let len = f.metadata().map_err(io("stat", path))?.len();
    let len = usize::try_from(len).unwrap_or(usize::MAX).min(1 << 24);
    let mut noise = vec![0u8; len];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut noise);
    f.write_all(&noise).map_err(io("overwrite", path))?;
    crate::store::durable::sync_all(&f).map_err(io("fsync", path))?;
    drop(f);
    fs::remove_file(path).map_err(io("remove", path))?;
    let dir = parent_dir(path);
    crate::store::durable::sync_dir(&dir).map_err(io("fsync directory", &dir))?;
    tracing::debug!(what, path = %path.display(), "key file overwritten and removed");
    Ok(())
}

/// Reads a whole key file, refusing files over `limit` bytes (a key file is
/// small; a huge one is a mistake or an attack on memory).
pub(crate) fn read_limited(
    what: &'static str,
    path: &Path,
    limit: u64,
) -> Result<Vec<u8>, KeyError> {
    let f = File::open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            KeyError::NotFound {
                what,
                path: path.to_path_buf(),
            }
        } else {
            KeyError::Io {
                op: "open",
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    // Sized up front so the buffer is not regrown: a regrown buffer leaves
    // copies (of a passphrase, say) in freed memory.
    let hint = f.metadata().map(|m| m.len()).unwrap_or(0).min(limit) + 1;
    let mut buf = Vec::with_capacity(usize::try_from(hint).unwrap_or(0));
    f.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(io("read", path))?;
    if buf.len() as u64 > limit {
        return Err(KeyError::Corrupt {
            what,
            path: path.to_path_buf(),
            reason: format!("larger than {limit} bytes"),
        });
    }
    Ok(buf)
}

/// Serde helpers: binary fields as standard padded base64 (constant-time
/// codec, since some of these bytes are secret-dependent).
pub(crate) mod b64 {
    use base64ct::{Base64, Encoding};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&Base64::encode_string(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        Base64::decode_vec(&s).map_err(|_| serde::de::Error::custom("invalid base64"))
    }

    /// The same for `Option<Vec<u8>>` (absent or null is `None`).
    pub mod option {
        use super::*;

        pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
            match bytes {
                Some(b) => s.serialize_some(&Base64::encode_string(b)),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
            match Option::<String>::deserialize(d)? {
                Some(s) => Base64::decode_vec(&s)
                    .map(Some)
                    .map_err(|_| serde::de::Error::custom("invalid base64")),
                None => Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destroy_file_overwrites_then_unlinks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sealed");
        let secret = b"sealed root key bytes, 0123456789abcdef".repeat(4);
        write_private_atomic("test file", &path, &secret, Replace::Never).unwrap();
        // A second name for the same inode shows what the overwrite left.
        let witness = dir.path().join("witness");
        fs::hard_link(&path, &witness).unwrap();
        destroy_file("test file", &path).unwrap();
        assert!(!path.exists());
        let left = fs::read(&witness).unwrap();
        assert_eq!(left.len(), secret.len());
        assert_ne!(left, secret);
        assert!(
            !left.windows(8).any(|w| w == &secret[..8]),
            "content overwritten"
        );
        // Gone already: fine.
        destroy_file("test file", &path).unwrap();
    }
}
