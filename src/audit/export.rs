//! Self-verifying audit bundles: a slice of the chain with the digests that
//! sign it and the public key, for an auditor who has no access to the pool.
//!
//! ```json
//! { "format": "keyturn-audit-bundle", "version": 1,
//!   "public_key": "-----BEGIN PUBLIC KEY-----\n…", "key_id": "audit-…",
//!   "from_id": 12, "prev": "<64 hex: hash of event 11, or zeros>",
//!   "records": ["<audit.log line>", …], "digests": ["<audit.digests line>", …] }
//! ```
//!
//! `records` are the log's lines verbatim, so each one's hash still checks;
//! the first links to `prev`. The slice runs on to the first signed record
//! at or after the requested end, so its last record is covered by a
//! signature. [`verify_bundle`] walks the slice and checks every digest with
//! the embedded public key, or (better) with one the auditor got separately.

use std::path::Path;
use std::time::SystemTime;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use super::sign::{self, DIGEST_FILE, Digest};
use super::signed::{SignedError, SignedReport, complete_lines, verify_segment};
use super::{AuditError, LOG_FILE, Record, ZERO_HASH};

const FORMAT: &str = "keyturn-audit-bundle";
const FORMAT_VERSION: u32 = 1;

/// One end of a range: an event id, or a time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bound {
    /// An event id (inclusive at both ends).
    Id(u64),
    /// An RFC 3339 UTC time as records write it (`from` inclusive, `to`
    /// exclusive).
    Time(String),
}

impl std::str::FromStr for Bound {
    type Err = String;

    /// An event id (digits), a date (`2026-12-06`, midnight UTC) or an
    /// RFC 3339 time (`2026-12-06T10:00:00Z`).
    fn from_str(s: &str) -> Result<Self, String> {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse()
                .map(Bound::Id)
                .map_err(|_| format!("{s:?}: event id too large"));
        }
        parse_time(s).map(|t| Bound::Time(super::rfc3339(t)))
    }
}

/// Parses a date (`YYYY-MM-DD`, midnight UTC) or an RFC 3339 time.
pub fn parse_time(s: &str) -> Result<SystemTime, String> {
    let full = if s.len() == 10 {
        format!("{s}T00:00:00Z")
    } else {
        s.to_string()
    };
    humantime::parse_rfc3339_weak(&full).map_err(|_| {
        format!("{s:?} is not an event id, a date (2026-12-06) or an RFC 3339 time (2026-12-06T10:00:00Z)")
    })
}

/// A bundle (see the module docs).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bundle {
    format: String,
    version: u32,
    /// The signing key, PEM.
    pub public_key: String,
    /// Its id.
    pub key_id: String,
    /// Id of the first record (0 when there are none).
    pub from_id: u64,
    /// Hash of the record before it.
    pub prev: String,
    /// The log lines.
    pub records: Vec<String>,
    /// The digest lines that sign them.
    pub digests: Vec<String>,
}

/// Errors of export and bundle checks.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Reading the pool's log failed, or its chain is broken.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The pool has no signing key, or a file is unreadable.
    #[error(transparent)]
    Sign(#[from] sign::SignError),
    /// The check itself failed.
    #[error(transparent)]
    Signed(#[from] SignedError),
    /// The bundle is not one, or names another key.
    #[error("{0}")]
    Invalid(String),
}

fn in_range(r: &Record, from: &Bound, to: &Bound) -> bool {
    let after = match from {
        Bound::Id(i) => r.id >= *i,
        Bound::Time(t) => r.time.as_str() >= t.as_str(),
    };
    let before = match to {
        Bound::Id(i) => r.id <= *i,
        Bound::Time(t) => r.time.as_str() < t.as_str(),
    };
    after && before
}

/// Makes a bundle of the records of the pool in `pool_dir` between `from`
/// and `to`. The whole chain is checked first (a broken chain is not
/// exported).
pub fn export(pool_dir: &Path, from: &Bound, to: &Bound) -> Result<Bundle, BundleError> {
    super::verify(pool_dir)?;
    let public = sign::public_key(pool_dir)?;
    let read = |name: &str| -> Result<Vec<u8>, BundleError> {
        let p = pool_dir.join(name);
        match std::fs::read(&p) {
            Ok(d) => Ok(d),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(AuditError::Io {
                op: "read",
                path: p,
                source,
            }
            .into()),
        }
    };
    let log = read(LOG_FILE)?;
    let digests = read(DIGEST_FILE)?;
    let digests: Vec<(Digest, &[u8])> = complete_lines(&digests)
        .into_iter()
        .filter_map(|l| serde_json::from_slice(l).ok().map(|d| (d, l)))
        .collect();
    let lines = complete_lines(&log);
    let mut prev = ZERO_HASH.to_string();
    let mut picked: Vec<(Record, &[u8])> = Vec::new();
    for l in &lines {
        let r = super::check_line(l).map_err(|why| {
            BundleError::Invalid(format!("record {:?}: {why}", super::loose_id(l)))
        })?;
        if picked.is_empty() && !in_range(&r, from, to) {
            let past_end = match to {
                Bound::Id(i) => r.id > *i,
                Bound::Time(t) => r.time.as_str() >= t.as_str(),
            };
            if past_end {
                break;
            }
            prev = r.hash.clone();
            continue;
        }
        if !picked.is_empty() && !in_range(&r, from, to) {
            // Run on to the first signed record, so the end is covered.
            let last = picked.last().map_or(0, |(r, _)| r.id);
            if digests.iter().any(|(d, _)| d.id == last) {
                break;
            }
        }
        picked.push((r, l));
    }
    let (first, last) = match (picked.first(), picked.last()) {
        (Some((f, _)), Some((l, _))) => (f.id, l.id),
        _ => (0, 0),
    };
    let to_text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ok(Bundle {
        format: FORMAT.into(),
        version: FORMAT_VERSION,
        public_key: sign::public_key_pem(&public),
        key_id: sign::key_id(&public),
        from_id: first,
        prev,
        records: picked.iter().map(|(_, l)| to_text(l)).collect(),
        digests: digests
            .iter()
            .filter(|(d, _)| first > 0 && d.id >= first && d.id <= last)
            .map(|(_, l)| to_text(l))
            .collect(),
    })
}

/// Checks a bundle's text. With `trusted`, the bundle must be signed by that
/// key; without it, by the key it carries (which proves only that the
/// bundle is consistent, not who made it).
pub fn verify_bundle(
    text: &[u8],
    trusted: Option<&VerifyingKey>,
) -> Result<SignedReport, BundleError> {
    let b: Bundle = serde_json::from_slice(text).map_err(|e| {
        BundleError::Invalid(format!(
            "not an audit bundle ({})",
            crate::keys::describe_json_error(&e)
        ))
    })?;
    if b.format != FORMAT || b.version != FORMAT_VERSION {
        return Err(BundleError::Invalid(format!(
            "not a version {FORMAT_VERSION} {FORMAT}"
        )));
    }
    let embedded = sign::parse_public_key_pem(&b.public_key)
        .map_err(|r| BundleError::Invalid(format!("the bundle's public key: {r}")))?;
    if let Some(t) = trusted
        && *t != embedded
    {
        return Err(BundleError::Invalid(format!(
            "the bundle carries key {}, not the given public key {}",
            sign::key_id(&embedded),
            sign::key_id(t)
        )));
    }
    if b.records.is_empty() {
        return Err(BundleError::Invalid("the bundle has no records".into()));
    }
    if b.records.iter().chain(&b.digests).any(|l| l.contains('\n')) {
        return Err(BundleError::Invalid(
            "a line of the bundle has a newline".into(),
        ));
    }
    let records: Vec<&[u8]> = b.records.iter().map(|s| s.as_bytes()).collect();
    let digests: Vec<&[u8]> = b.digests.iter().map(|s| s.as_bytes()).collect();
    Ok(verify_segment(
        b.from_id.max(1),
        &b.prev,
        &records,
        &digests,
        &embedded,
    )?)
}
