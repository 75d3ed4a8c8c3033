//! Checking the audit chain and its signed digests with the public key
//! alone (see [`super::sign`] for what is signed).
//!
//! The check, in order, stops at the first finding:
//! 1. the hash chain: every record's hash, ids and links (and, for a pool,
//!    the anchor), as [`super::verify`] does;
//! 2. every digest's signature, under the given public key (`forged`);
//! 3. every digest's hash against the record it names (`altered`: the
//!    record, or one before it since the last matching digest, was rewritten
//!    with recomputed hashes; a digest naming a record past the end of the
//!    log means the tail was cut, `truncated`);
//! 4. coverage: records after the last matching digest were appended by
//!    someone without the signing key (`unsigned`).
//!
//! Each finding names the first record concerned.

use std::collections::HashMap;
use std::path::Path;

use base64ct::{Base64, Encoding};
use ed25519_dalek::{Signature, VerifyingKey};
use serde::Serialize;

use super::sign::{DIGEST_FILE, DIGEST_TAG, Digest, SIG_MEMBER, key_id};
use super::{AuditError, Break, LOG_FILE, check_line, loose_id};

/// Why a signed check failed: the first record (or digest) concerned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{reason}")]
pub struct Finding {
    /// Short machine-readable kind: a chain break's kind (`edited`,
    /// `deleted`, `reordered`, `inserted`, …), or `forged`, `altered`,
    /// `truncated`, `unsigned`, `bad-digest`, `wrong-key`.
    pub kind: String,
    /// The first event id concerned, when known.
    pub id: Option<u64>,
    /// Its line in the log (1-based; in a bundle, in its records), when known.
    pub line: Option<u64>,
    /// Human-readable explanation.
    pub reason: String,
}

/// Errors of a signed check.
#[derive(Debug, thiserror::Error)]
pub enum SignedError {
    /// The log or digests could not be read, or the anchor is unusable.
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// The digest file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The chain or its signatures are not intact.
    #[error("audit chain check failed: {0}")]
    Failed(Finding),
}

/// What a successful signed check found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SignedReport {
    /// Records checked.
    pub records: u64,
    /// First and last event id checked (0 when none).
    pub first_id: u64,
    /// Last event id.
    pub last_id: u64,
    /// Hash of the last record.
    pub last_hash: String,
    /// Digests whose signature verified and whose hash matched.
    pub digests: u64,
    /// The id of the signing key.
    pub key_id: String,
}

fn finding(kind: &str, id: Option<u64>, line: Option<u64>, reason: String) -> SignedError {
    SignedError::Failed(Finding {
        kind: kind.into(),
        id,
        line,
        reason,
    })
}

/// Checks the chain of the pool in `pool_dir` (with its anchor) and its
/// digests under `public`. Reads `audit.log`, `audit.head` and
/// `audit.digests` only.
pub fn verify_pool(pool_dir: &Path, public: &VerifyingKey) -> Result<SignedReport, SignedError> {
    match super::verify(pool_dir) {
        Ok(_) => {}
        Err(AuditError::Broken { line, id, why, .. }) => {
            return Err(finding(
                why.kind(),
                id,
                Some(line),
                format!("line {line}: {why}"),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    let log_path = pool_dir.join(LOG_FILE);
    let data = std::fs::read(&log_path).map_err(|source| SignedError::Io {
        path: log_path.clone(),
        source,
    })?;
    let dig_path = pool_dir.join(DIGEST_FILE);
    let digests = match std::fs::read(&dig_path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(SignedError::Io {
                path: dig_path,
                source,
            });
        }
    };
    let lines = complete_lines(&data);
    let digest_lines = complete_lines(&digests);
    verify_segment(1, super::ZERO_HASH, &lines, &digest_lines, public)
}

/// The complete lines of `data` (a torn last line, never acknowledged, is
/// left out: the chain check reports it for the log).
pub(crate) fn complete_lines(data: &[u8]) -> Vec<&[u8]> {
    let mut lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    lines.pop();
    lines
}

/// Checks records `lines` (the first has id `start_id` and links to
/// `start_prev`) and digest lines `digests` under `public`.
pub fn verify_segment(
    start_id: u64,
    start_prev: &str,
    lines: &[&[u8]],
    digests: &[&[u8]],
    public: &VerifyingKey,
) -> Result<SignedReport, SignedError> {
    let hashes = walk(start_id, start_prev, lines)?;
    let last_id = start_id + hashes.len() as u64 - u64::from(!hashes.is_empty());
    let kid = key_id(public);
    let mut good: Vec<Digest> = Vec::new();
    for (i, l) in digests.iter().enumerate() {
        let n = i as u64 + 1;
        let d = check_digest(l, public, &kid).map_err(|(kind, why)| {
            finding(
                kind,
                loose_id(l),
                None,
                format!("audit.digests line {n}: {why}"),
            )
        })?;
        if d.id >= start_id {
            good.push(d);
        }
    }
    good.sort_by_key(|d| d.id);
    let mut signed_up_to = start_id - 1;
    let mut matched = 0;
    for d in &good {
        if d.id > last_id {
            return Err(finding(
                "truncated",
                Some(last_id + 1),
                Some(last_id + 2 - start_id),
                format!(
                    "a signed digest covers event {} but the log ends at event {last_id}: records were cut from the end",
                    d.id
                ),
            ));
        }
        let idx = (d.id - start_id) as usize;
        if hashes[idx] != d.hash {
            let first = signed_up_to + 1;
            let which = if first == d.id {
                format!("event {first}")
            } else {
                format!("one of events {first} to {}", d.id)
            };
            return Err(finding(
                "altered",
                Some(first),
                Some(first - start_id + 1),
                format!(
                    "event {} does not match its signed digest: {which} was altered, deleted or reordered (and the hashes recomputed)",
                    d.id
                ),
            ));
        }
        signed_up_to = signed_up_to.max(d.id);
        matched += 1;
    }
    if last_id > signed_up_to {
        let first = signed_up_to + 1;
        return Err(finding(
            "unsigned",
            Some(first),
            Some(first - start_id + 1),
            format!(
                "event {first} is the first record no signature covers (events {first} to {last_id}): appended without the audit signing key"
            ),
        ));
    }
    Ok(SignedReport {
        records: hashes.len() as u64,
        first_id: if hashes.is_empty() { 0 } else { start_id },
        last_id: if hashes.is_empty() { 0 } else { last_id },
        last_hash: hashes.last().cloned().unwrap_or_default(),
        digests: matched,
        key_id: kid,
    })
}

/// Checks one digest line's shape and signature.
fn check_digest(
    line: &[u8],
    public: &VerifyingKey,
    kid: &str,
) -> Result<Digest, (&'static str, String)> {
    let bad = |why: &str| ("bad-digest", why.to_string());
    let cut = line
        .windows(SIG_MEMBER.len())
        .rposition(|w| w == SIG_MEMBER)
        .filter(|_| line.ends_with(b"\"}"))
        .ok_or_else(|| bad("not a digest (no sig member at its end)"))?;
    let d: Digest = serde_json::from_slice(line).map_err(|_| bad("not a valid digest"))?;
    if d.digest != DIGEST_TAG {
        return Err(bad("not a keyturn audit digest"));
    }
    if d.key != kid {
        return Err((
            "wrong-key",
            format!(
                "signed by key {} (event {}), not by the given public key {kid}",
                d.key, d.id
            ),
        ));
    }
    let forged = || {
        (
            "forged",
            format!(
                "the signature over event {} does not verify under the public key {kid}: forged or altered digest",
                d.id
            ),
        )
    };
    let sig = Base64::decode_vec(&d.sig).map_err(|_| forged())?;
    let sig = Signature::from_slice(&sig).map_err(|_| forged())?;
    let mut signed = line[..cut].to_vec();
    signed.push(b'}');
    public.verify_strict(&signed, &sig).map_err(|_| forged())?;
    Ok(d)
}

/// Walks the chain of `lines` from `start_id`/`start_prev`; returns each
/// record's hash, or the first break (classified as [`super::verify`] does).
fn walk(start_id: u64, start_prev: &str, lines: &[&[u8]]) -> Result<Vec<String>, SignedError> {
    let checked: Vec<_> = lines.iter().map(|l| check_line(l)).collect();
    let mut first_line_of = HashMap::new();
    for (i, r) in checked.iter().enumerate() {
        if let Ok(rec) = r {
            first_line_of.entry(rec.id).or_insert(i as u64 + 1);
        }
    }
    let mut hashes = Vec::with_capacity(lines.len());
    let mut prev_id = start_id - 1;
    let mut prev_hash = start_prev.to_string();
    for (i, r) in checked.into_iter().enumerate() {
        let n = i as u64 + 1;
        let expected = prev_id + 1;
        let rec = r.map_err(|why| {
            let id = loose_id(lines[i]);
            finding(why.kind(), id, Some(n), format!("line {n}: {why}"))
        })?;
        if rec.id != expected || rec.prev != prev_hash {
            let why = if rec.id < expected {
                match first_line_of.get(&rec.id) {
                    Some(&first) if first < n => Break::Duplicate {
                        id: rec.id,
                        first_line: first,
                    },
                    _ => Break::IdGap { expected },
                }
            } else if rec.id > expected {
                match first_line_of.get(&expected) {
                    Some(&at) if at > n => Break::Reordered {
                        expected,
                        at_line: at,
                    },
                    _ => Break::Deleted {
                        from: expected,
                        to: rec.id - 1,
                    },
                }
            } else {
                Break::Unlinked
            };
            return Err(finding(
                why.kind(),
                Some(rec.id),
                Some(n),
                format!("line {n} (event {}): {why}", rec.id),
            ));
        }
        prev_id = rec.id;
        prev_hash = rec.hash.clone();
        hashes.push(rec.hash);
    }
    Ok(hashes)
}
