//! The tamper-evident audit log: `POOL/audit.log` and its anchor `POOL/audit.head`.
//!
//! # Records
//!
//! `audit.log` is append-only JSON lines, one record per event, each ending
//! in `\n`. Every record has all of these members, always in this order
//! (absent optional values are `null`, never omitted, so the order and the
//! set of members never vary):
//!
//! ```text
//! {"id":7,"time":"2025-01-31T09:30:00.123Z","zone":"prod","volume":null,"key_id":"z3-dek-v2",
//!  "key_version":2,"action":"key.create","outcome":"ok","duration_ms":4,"count":null,
//!  "approvers":[],"error":null,"prev":"<64 hex>","hash":"<64 hex>"}
//! ```
//! (shown wrapped; on disk it is one line, compact, no spaces.)
//!
//! - `id`: 1, 2, 3, … with no gaps.
//! - `time`: RFC 3339, UTC, milliseconds (`Z` suffix), from a [`Clock`].
//! - `zone`, `volume`, `key_id`, `key_version`, `count`, `error`: optional
//!   (`volume` names the volume of `volume.*` events).
//! - `action`: a fixed name such as `pool.init`, `zone.create`, `key.create`,
//!   `kek.rotate`, `key.destroy`, `approval.refused`.
//! - `outcome`: `ok`, `refused` or `failed`.
//! - `approvers`: operator key ids, possibly empty.
//! - `prev`: the `hash` of the previous record; 64 zeros for record 1.
//! - `hash`: see below.
//!
//! # Canonical encoding and hash
//!
//! The canonical encoding of a record is **the exact bytes of its line with
//! the final member `,"hash":"<64 hex>"` removed** (and without the newline):
//! i.e. the line up to the byte before `,"hash":"`, followed by `}`.
//! `hash` is the lowercase hex of the plain (unkeyed) BLAKE3-256 hash of
//! those bytes. The writer produces the canonical encoding with serde_json
//! (compact) from a struct whose field order is the order above, then
//! splices `,"hash":"…"` in before the closing brace.
//!
//! Because the hash covers the bytes on disk rather than a re-serialisation
//! of parsed values, a verifier in another language needs no JSON
//! canonicalisation, and any byte changed anywhere in a record (even one that
//! decodes to the same value, such as a different string escape) is caught:
//!
//! ```sh
//! line=$(sed -n 3p audit.log)
//! printf '%s}' "${line%,\"hash\":*}" | b3sum   # equals the line's "hash"
//! ```
//!
//! # The anchor
//!
//! A hash chain alone does not reveal a cut tail: the records that remain
//! still link. So after every append, `audit.head` is replaced atomically
//! (temp file, fsync, rename, fsync of the directory) with the id and hash of
//! the last record: `{"id":7,"hash":"<64 hex>"}`. [`verify`] checks that the
//! chain ends exactly there. The log is fdatasync'ed before the anchor moves,
//! so a crash between the two leaves at most one record past the anchor;
//! [`verify`] accepts that one record (reporting it as
//! [`VerifyReport::unanchored`]) and [`AuditLog::open`] moves the anchor up to
//! it. A crash in the middle of a write leaves an incomplete last line that
//! was never acknowledged; [`AuditLog::open`] cuts it off (only when the last
//! complete record is the anchored one), [`verify`] reports it until then.
//!
//! # What this does and does not protect against
//!
//! It detects, and names the first record affected by: an edited byte in any
//! record, a deleted, inserted, duplicated or reordered record, a cut tail,
//! and garbage in the file, when done by someone who changes the files
//! without recomputing hashes, or who rewrites `audit.log` but not
//! `audit.head` (or the reverse).
//!
//! It does **not** stop someone who can write both files and recomputes the
//! hashes: the chain is unkeyed, so they can rewrite history from any point,
//! or delete both files. It also cannot tell which of two conflicting records
//! is the forgery: it names the first record at which the chain stops being
//! consistent. Future work: sign the anchor (and periodic checkpoints) with a
//! key the host cannot use freely (an HSM through PKCS#11, or an operator's
//! Ed25519 key), and ship anchors to a remote append-only store, so a
//! rewrite needs that key or that store as well.
//!
//! # No key material
//!
//! [`AuditEvent`] has no field that takes bytes: key fields are filled from a
//! [`KeyLabel`] (id and version), `action` is a `&'static str` chosen in
//! code, and identifiers are checked to be short printable text. Error text
//! comes from this crate's errors, which by DESIGN invariant 8 carry no key
//! bytes.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::keys::KeyLabel;

pub mod export;
pub mod sign;
pub mod signed;
pub mod tail;

/// File name of the log inside the pool directory.
pub const LOG_FILE: &str = "audit.log";
/// File name of the anchor inside the pool directory.
pub const HEAD_FILE: &str = "audit.head";
/// `prev` of the first record.
pub const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The member the canonical encoding leaves out; everything from here to the
/// end of the line is `,"hash":"` + 64 hex + `"}`.
const HASH_MEMBER: &[u8] = b",\"hash\":\"";
const HASH_SUFFIX_LEN: usize = HASH_MEMBER.len() + 64 + 2;
/// How much of the log's end `open` reads to find the last record. Records
/// are bounded (see the limits below) to well under this.
const TAIL_BYTES: u64 = 64 * 1024;
const MAX_IDENT_LEN: usize = 128;
const MAX_APPROVERS: usize = 16;
const MAX_ERROR_LEN: usize = 2000;
/// Largest anchor file accepted (it is ~90 bytes).
const MAX_HEAD_LEN: u64 = 4096;

/// Where the current time comes from (tests use a fixed clock).
pub trait Clock: Send + Sync {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The system clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Result of an audited operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// It was done.
    Ok,
    /// A policy check refused it (missing approvals, illegal transition, …).
    Refused,
    /// It was attempted and failed.
    Failed,
}

/// One event to record. Built with the constructors and setters below; it
/// has no field that could hold key bytes (see the module docs).
#[derive(Clone, Debug)]
pub struct AuditEvent {
    action: &'static str,
    outcome: Outcome,
    zone: Option<String>,
    volume: Option<String>,
    key_id: Option<String>,
    key_version: Option<u32>,
    duration_ms: u64,
    count: Option<u64>,
    approvers: Vec<String>,
    error: Option<String>,
    actor: Option<String>,
}

impl AuditEvent {
    /// An event with `outcome` for `action` (e.g. `"kek.rotate"`).
    pub fn new(action: &'static str, outcome: Outcome) -> Self {
        Self {
            action,
            outcome,
            zone: None,
            volume: None,
            key_id: None,
            key_version: None,
            duration_ms: 0,
            count: None,
            approvers: Vec::new(),
            error: None,
            actor: None,
        }
    }

    /// Who acted (a replication agent's name).
    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    /// A key named by id alone (a stream window key).
    pub fn key_id(mut self, id: impl Into<String>) -> Self {
        self.key_id = Some(id.into());
        self
    }

    /// A successful `action`.
    pub fn ok(action: &'static str) -> Self {
        Self::new(action, Outcome::Ok)
    }

    /// A refused `action`, with the reason.
    pub fn refused(action: &'static str, reason: &dyn std::fmt::Display) -> Self {
        Self::new(action, Outcome::Refused).error(reason)
    }

    /// A failed `action`, with the error.
    pub fn failed(action: &'static str, error: &dyn std::fmt::Display) -> Self {
        Self::new(action, Outcome::Failed).error(error)
    }

    /// The zone (its name).
    pub fn zone(mut self, zone: impl Into<String>) -> Self {
        self.zone = Some(zone.into());
        self
    }

    /// The volume (its name).
    pub fn volume(mut self, volume: impl Into<String>) -> Self {
        self.volume = Some(volume.into());
        self
    }

    /// The key the event is about: its id and version, from its label.
    pub fn key(mut self, label: &KeyLabel) -> Self {
        self.key_id = Some(label.key_id.clone());
        self.key_version = Some(label.version);
        self
    }

    /// How long the operation took.
    pub fn duration(mut self, d: Duration) -> Self {
        self.duration_ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// How many keys or blocks were affected.
    pub fn count(mut self, n: u64) -> Self {
        self.count = Some(n);
        self
    }

    /// The operators (key ids) whose approvals were presented.
    pub fn approvers<I, S>(mut self, ids: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.approvers = ids.into_iter().map(Into::into).collect();
        self
    }

    /// Error text (cut to 2000 characters; newlines are escaped by JSON).
    pub fn error(mut self, error: &dyn std::fmt::Display) -> Self {
        let mut text = error.to_string();
        if let Some((cut, _)) = text.char_indices().nth(MAX_ERROR_LEN) {
            text.truncate(cut);
            text.push('…');
        }
        self.error = Some(text);
        self
    }

    /// The action name.
    pub fn action(&self) -> &'static str {
        self.action
    }

    fn validate(&self) -> Result<(), AuditError> {
        fn ident(what: &str, s: &str) -> Result<(), AuditError> {
            // Short printable text: ids and names, not blobs, and nothing that
            // could fake a line break or a terminal escape in a viewer.
            if s.is_empty() || s.len() > MAX_IDENT_LEN || s.chars().any(char::is_control) {
                return Err(AuditError::Invalid(format!(
                    "{what} must be 1 to {MAX_IDENT_LEN} bytes of printable text"
                )));
            }
            Ok(())
        }
        ident("action", self.action)?;
        if let Some(z) = &self.zone {
            ident("zone", z)?;
        }
        if let Some(v) = &self.volume {
            ident("volume", v)?;
        }
        if let Some(k) = &self.key_id {
            ident("key id", k)?;
        }
        if let Some(a) = &self.actor {
            ident("actor", a)?;
        }
        if self.approvers.len() > MAX_APPROVERS {
            return Err(AuditError::Invalid(format!(
                "at most {MAX_APPROVERS} approvers per event"
            )));
        }
        for a in &self.approvers {
            ident("approver id", a)?;
        }
        Ok(())
    }
}

/// The hashed part of a record: field order here is the on-disk order.
#[derive(Serialize)]
struct Body<'a> {
    id: u64,
    time: &'a str,
    zone: Option<&'a str>,
    volume: Option<&'a str>,
    key_id: Option<&'a str>,
    key_version: Option<u32>,
    action: &'a str,
    outcome: Outcome,
    duration_ms: u64,
    count: Option<u64>,
    approvers: &'a [String],
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    actor: Option<&'a str>,
    prev: &'a str,
}

/// A record as read back from the log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// Event id.
    pub id: u64,
    /// RFC 3339 UTC time.
    pub time: String,
    /// Zone name.
    pub zone: Option<String>,
    /// Volume name.
    pub volume: Option<String>,
    /// Key id.
    pub key_id: Option<String>,
    /// Key version.
    pub key_version: Option<u32>,
    /// Action name.
    pub action: String,
    /// Outcome.
    pub outcome: Outcome,
    /// Duration in milliseconds.
    pub duration_ms: u64,
    /// Keys or blocks affected.
    pub count: Option<u64>,
    /// Operator key ids.
    pub approvers: Vec<String>,
    /// Error text.
    pub error: Option<String>,
    /// Who acted, where it is not an operator's approval (a replication
    /// agent); absent in records made before the field existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// Hash of the previous record.
    pub prev: String,
    /// Hash of this record's canonical encoding.
    pub hash: String,
}

/// `audit.head`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Head {
    id: u64,
    hash: String,
}

/// Why a record breaks the chain.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Break {
    /// The line is not a well-formed record.
    #[error("not a valid record ({0})")]
    BadJson(String),
    /// The stored hash does not match the record's bytes.
    #[error("hash mismatch: the record was edited (stored {stored}, computed {computed})")]
    Edited {
        /// Hash on the line.
        stored: String,
        /// Hash of its canonical encoding.
        computed: String,
    },
    /// Records before this one are missing.
    #[error(
        "{} missing before it (deleted): its prev does not match the previous record",
        if from == to { format!("event {from} is") } else { format!("events {from} to {to} are") }
    )]
    Deleted {
        /// First missing id.
        from: u64,
        /// Last missing id.
        to: u64,
    },
    /// The record expected here comes later in the file.
    #[error("out of order (reordered): expected event {expected} here, which is at line {at_line}")]
    Reordered {
        /// Id expected at this line.
        expected: u64,
        /// Where that id is.
        at_line: u64,
    },
    /// The same id appeared earlier: a record was inserted or replayed.
    #[error(
        "event id {id} already appears at line {first_line}: a record was inserted, replayed or forked"
    )]
    Duplicate {
        /// The repeated id.
        id: u64,
        /// Its first line.
        first_line: u64,
    },
    /// The id follows on but `prev` does not name the previous record.
    #[error("prev does not match the previous record's hash: a record was inserted or replaced")]
    Unlinked,
    /// The id is not the next one, for no reason found above.
    #[error("event id is not consecutive (expected {expected})")]
    IdGap {
        /// Expected id.
        expected: u64,
    },
    /// The log ends before the record the anchor names.
    #[error("the log ends at event {last} but audit.head names event {anchor}: the tail was cut")]
    Truncated {
        /// Last id in the log.
        last: u64,
        /// Id in the anchor.
        anchor: u64,
    },
    /// The anchored id is present but its hash differs from the anchor's.
    #[error("this record's hash differs from the one in audit.head: the tail was rewritten")]
    AnchorMismatch,
    /// More than one record past the anchor (a crash leaves at most one).
    #[error("records past the one audit.head names (event {anchor}): appended outside keyturn")]
    PastAnchor {
        /// Id in the anchor.
        anchor: u64,
    },
    /// The last line has no newline: a write was cut short.
    #[error("incomplete last line (a crash during an append, or a cut)")]
    Incomplete,
}

impl Break {
    /// A short machine-readable name of the kind of break.
    pub fn kind(&self) -> &'static str {
        match self {
            Break::BadJson(_) => "bad-json",
            Break::Edited { .. } => "edited",
            Break::Deleted { .. } => "deleted",
            Break::Reordered { .. } => "reordered",
            Break::Duplicate { .. } => "inserted",
            Break::Unlinked => "inserted",
            Break::IdGap { .. } => "id-gap",
            Break::Truncated { .. } => "truncated",
            Break::AnchorMismatch => "anchor-mismatch",
            Break::PastAnchor { .. } => "past-anchor",
            Break::Incomplete => "incomplete",
        }
    }
}

/// Errors of the audit log.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// A file could not be read or written.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// File.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The chain is broken at this record.
    #[error("audit log {} is broken at line {line} (event id {}): {why}",
        path.display(), id.map_or_else(|| "unknown".to_string(), |i| i.to_string()))]
    Broken {
        /// The log file.
        path: PathBuf,
        /// 1-based line number of the first broken record (one past the
        /// last line when records are missing at the end).
        line: u64,
        /// Its event id, when it could be read (else the id expected there).
        id: Option<u64>,
        /// Why.
        why: Break,
    },
    /// `audit.head` is missing or unreadable while the log has records, or
    /// the log is missing.
    #[error("{}: {reason}", path.display())]
    Anchor {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// An earlier append failed part way; this handle appends no more.
    #[error("an earlier append to the audit log failed; reopen the pool to continue the chain")]
    Poisoned,
    /// Another process appended since this handle read the tail.
    #[error("audit log {} changed under this process; refusing to fork the chain", path.display())]
    Changed {
        /// The log file.
        path: PathBuf,
    },
    /// The event is malformed.
    #[error("invalid audit event: {0}")]
    Invalid(String),
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> AuditError + 'a {
    move |source| AuditError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn hex(hash: &blake3::Hash) -> String {
    hash.to_hex().to_string()
}

fn is_hex64(s: &[u8]) -> bool {
    s.len() == 64 && s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Formats `t` as RFC 3339 UTC with milliseconds (`1970-01-01T00:00:00.000Z`).
pub fn rfc3339(t: SystemTime) -> String {
    // Times before 1970 do not occur on a working clock; clamp rather than fail.
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (H. Hinnant's algorithm), proleptic Gregorian.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Checks one line (without its newline) on its own: shape, JSON, hash.
/// Returns the record; its `hash` is verified.
fn check_line(line: &[u8]) -> Result<Record, Break> {
    let bad = |what: &str| Break::BadJson(what.to_string());
    if line.len() < HASH_SUFFIX_LEN + 2 || !line.ends_with(b"\"}") {
        return Err(bad("does not end with a hash member"));
    }
    let cut = line.len() - HASH_SUFFIX_LEN;
    if &line[cut..cut + HASH_MEMBER.len()] != HASH_MEMBER {
        return Err(bad("does not end with a hash member"));
    }
    let stored = &line[cut + HASH_MEMBER.len()..line.len() - 2];
    if !is_hex64(stored) {
        return Err(bad("hash is not 64 lowercase hex digits"));
    }
    let record: Record = serde_json::from_slice(line).map_err(|e| {
        // serde_json quotes the offending input; give kind and column only.
        Break::BadJson(
            crate::keys::describe_json_error(&e)
                .replace(" at line 1,", " at")
                .to_string(),
        )
    })?;
    if !is_hex64(record.prev.as_bytes()) {
        return Err(bad("prev is not 64 lowercase hex digits"));
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update(&line[..cut]);
    hasher.update(b"}");
    let computed = hex(&hasher.finalize());
    if computed.as_bytes() != stored {
        return Err(Break::Edited {
            stored: String::from_utf8_lossy(stored).into_owned(),
            computed,
        });
    }
    Ok(record)
}

/// The `id` of a line that failed its check, if it still has a readable one.
fn loose_id(line: &[u8]) -> Option<u64> {
    serde_json::from_slice::<serde_json::Value>(line)
        .ok()?
        .get("id")?
        .as_u64()
}

/// Encodes a record: returns the line (with `\n`) and its hash.
fn encode(id: u64, time: &str, prev: &str, e: &AuditEvent) -> (Vec<u8>, String) {
    let body = Body {
        id,
        time,
        zone: e.zone.as_deref(),
        volume: e.volume.as_deref(),
        key_id: e.key_id.as_deref(),
        key_version: e.key_version,
        action: e.action,
        outcome: e.outcome,
        duration_ms: e.duration_ms,
        count: e.count,
        approvers: &e.approvers,
        error: e.error.as_deref(),
        actor: e.actor.as_deref(),
        prev,
    };
    let mut line = serde_json::to_vec(&body).expect("audit record serialises");
    let hash = hex(&blake3::hash(&line));
    line.pop(); // the closing brace
    line.extend_from_slice(HASH_MEMBER);
    line.extend_from_slice(hash.as_bytes());
    line.extend_from_slice(b"\"}\n");
    (line, hash)
}

fn read_head(path: &Path) -> Result<Option<Head>, AuditError> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("open", path)(e)),
    };
    let mut buf = Vec::new();
    f.take(MAX_HEAD_LEN)
        .read_to_end(&mut buf)
        .map_err(io("read", path))?;
    let head: Head = serde_json::from_slice(&buf).map_err(|e| AuditError::Anchor {
        path: path.to_path_buf(),
        reason: format!(
            "not a valid anchor ({})",
            crate::keys::describe_json_error(&e)
        ),
    })?;
    if !is_hex64(head.hash.as_bytes()) || (head.id == 0) != (head.hash == ZERO_HASH) {
        return Err(AuditError::Anchor {
            path: path.to_path_buf(),
            reason: "not a valid anchor (bad hash)".into(),
        });
    }
    Ok(Some(head))
}

/// Replaces the anchor: temp file, fsync, rename, fsync the directory.
fn write_head(dir: &Path, head: &Head) -> Result<(), AuditError> {
    let path = dir.join(HEAD_FILE);
    let tmp = dir.join(format!(".{HEAD_FILE}.tmp-{}", std::process::id()));
    let mut bytes = serde_json::to_vec(head).expect("anchor serialises");
    bytes.push(b'\n');
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(io("create", &tmp))?;
    f.write_all(&bytes).map_err(io("write", &tmp))?;
    crate::store::durable::sync_all(&f).map_err(io("fsync", &tmp))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(io("rename into", &path))?;
    crate::store::durable::sync_dir(dir).map_err(io("fsync directory", dir))
}

/// flock on the log: exclusive for an append, shared for a verify, so a
/// verify never sees half an append (log written, anchor not yet moved).
fn flock(f: &File, path: &Path, exclusive: bool) -> Result<(), AuditError> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    loop {
        // SAFETY: flock only reads the integer fd, which `f` keeps open.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(io("lock", path)(e));
        }
    }
}

fn funlock(f: &File) {
    // SAFETY: as above. Closing the file would release it too.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
}

/// What a full check of the log found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// Records in the log.
    pub records: u64,
    /// Id of the last record (0 when empty).
    pub last_id: u64,
    /// Hash of the last record (64 zeros when empty).
    pub last_hash: String,
    /// Records past the anchor: 0, or 1 after a crash between writing a
    /// record and moving the anchor (the next open moves it).
    pub unanchored: u64,
}

/// Checks the whole chain of the pool in `pool_dir` and that it ends at the
/// anchor. Reads only `audit.log` and `audit.head`: needs no key. The error
/// names the first broken record.
pub fn verify(pool_dir: &Path) -> Result<VerifyReport, AuditError> {
    let log_path = pool_dir.join(LOG_FILE);
    let head_path = pool_dir.join(HEAD_FILE);
    let mut f = File::open(&log_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            AuditError::Anchor {
                path: log_path.clone(),
                reason: "no audit log (deleted, or the pool predates it)".into(),
            }
        } else {
            io("open", &log_path)(e)
        }
    })?;
    flock(&f, &log_path, false)?;
    let head = read_head(&head_path);
    let mut data = Vec::new();
    let read = f.read_to_end(&mut data).map_err(io("read", &log_path));
    funlock(&f);
    let head = head?;
    read?;
    verify_bytes(&log_path, &data, head.as_ref(), &head_path)
}

fn verify_bytes(
    log_path: &Path,
    data: &[u8],
    head: Option<&Head>,
    head_path: &Path,
) -> Result<VerifyReport, AuditError> {
    let broken = |line: u64, id: Option<u64>, why: Break| AuditError::Broken {
        path: log_path.to_path_buf(),
        line,
        id,
        why,
    };
    let mut lines: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    // split leaves an empty piece after a final newline; anything else there
    // is a line that was never finished.
    let torn = match lines.pop() {
        Some(last) if !last.is_empty() => Some(last),
        _ => None,
    };
    // First pass: each line on its own. Ids are collected so a record out of
    // place can be told apart from a missing one.
    let mut checked = Vec::with_capacity(lines.len());
    let mut first_line_of = std::collections::HashMap::new();
    for (i, l) in lines.iter().enumerate() {
        let r = check_line(l);
        if let Ok(rec) = &r {
            first_line_of.entry(rec.id).or_insert(i as u64 + 1);
        }
        checked.push(r);
    }
    let mut prev_id = 0u64;
    let mut prev_hash = ZERO_HASH.to_string();
    for (i, r) in checked.into_iter().enumerate() {
        let n = i as u64 + 1;
        let expected = prev_id + 1;
        let rec = r.map_err(|why| broken(n, loose_id(lines[i]), why))?;
        let id = Some(rec.id);
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
            return Err(broken(n, id, why));
        }
        prev_id = rec.id;
        prev_hash = rec.hash;
        // The anchored record must be exactly this one.
        if let Some(h) = head
            && h.id == rec.id
            && h.hash != prev_hash
        {
            return Err(broken(n, id, Break::AnchorMismatch));
        }
    }
    let records = lines.len() as u64;
    if torn.is_some() {
        return Err(broken(records + 1, None, Break::Incomplete));
    }
    let anchor = match head {
        Some(h) => h.id,
        None if records == 0 => 0,
        None => {
            return Err(AuditError::Anchor {
                path: head_path.to_path_buf(),
                reason: format!(
                    "missing, but the log has {records} records: cannot tell whether its tail was cut"
                ),
            });
        }
    };
    if prev_id < anchor {
        return Err(broken(
            records + 1,
            Some(prev_id + 1),
            Break::Truncated {
                last: prev_id,
                anchor,
            },
        ));
    }
    if prev_id > anchor + 1 {
        // Line of event anchor + 2: ids are consecutive from 1 here.
        return Err(broken(
            anchor + 2,
            Some(anchor + 2),
            Break::PastAnchor { anchor },
        ));
    }
    Ok(VerifyReport {
        records,
        last_id: prev_id,
        last_hash: prev_hash,
        unanchored: prev_id - anchor,
    })
}

struct State {
    file: File,
    /// Log length after our last append: a different length means someone
    /// else wrote to it.
    len: u64,
    last_id: u64,
    last_hash: String,
    poisoned: bool,
}

/// The pool's audit log, open for appending. Thread-safe.
pub struct AuditLog {
    dir: PathBuf,
    log_path: PathBuf,
    clock: Arc<dyn Clock>,
    state: Mutex<State>,
    /// Signs the chain head after every append, once the pool's audit
    /// signing key is unlocked (see [`sign`]).
    signer: std::sync::OnceLock<Arc<sign::Signer>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.log_path)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens the log of the pool in `pool_dir` to continue its chain, with the
    /// system clock. Both files must exist (see [`AuditLog::create_or_open`]).
    ///
    /// Checks that the last record is intact and is the anchored one (or the
    /// one after it, left by a crash: the anchor is moved up). An incomplete
    /// last line after the anchored record, left by a crash mid-write, was
    /// never acknowledged and is cut off. Anything else is refused: appending
    /// to a damaged log would fork the chain. Run [`verify`] for the whole
    /// chain.
    pub fn open(pool_dir: &Path) -> Result<Self, AuditError> {
        Self::open_with_clock(pool_dir, Arc::new(SystemClock))
    }

    /// Like [`AuditLog::open`], creating an empty log and anchor if neither
    /// exists (a new pool).
    pub fn create_or_open(pool_dir: &Path) -> Result<Self, AuditError> {
        let log_path = pool_dir.join(LOG_FILE);
        let head_path = pool_dir.join(HEAD_FILE);
        if !log_path.exists() && !head_path.exists() {
            OpenOptions::new()
                .append(true)
                .create_new(true)
                .mode(0o644)
                .open(&log_path)
                .map_err(io("create", &log_path))?;
            write_head(
                pool_dir,
                &Head {
                    id: 0,
                    hash: ZERO_HASH.into(),
                },
            )?;
        }
        Self::open(pool_dir)
    }

    /// [`AuditLog::open`] with a given clock.
    pub fn open_with_clock(pool_dir: &Path, clock: Arc<dyn Clock>) -> Result<Self, AuditError> {
        let log_path = pool_dir.join(LOG_FILE);
        let head_path = pool_dir.join(HEAD_FILE);
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    AuditError::Anchor {
                        path: log_path.clone(),
                        reason: "no audit log (deleted, or the pool predates it)".into(),
                    }
                } else {
                    io("open", &log_path)(e)
                }
            })?;
        flock(&file, &log_path, true)?;
        let r = Self::read_tail(pool_dir, &log_path, &head_path, &file);
        funlock(&file);
        let (len, last_id, last_hash) = r?;
        Ok(Self {
            dir: pool_dir.to_path_buf(),
            log_path,
            clock,
            state: Mutex::new(State {
                file,
                len,
                last_id,
                last_hash,
                poisoned: false,
            }),
            signer: std::sync::OnceLock::new(),
        })
    }

    /// Signs every record from now on with `signer`, and signs the current
    /// head at once if no digest covers it yet (records appended by a
    /// process without the key). A second signer is ignored.
    pub fn set_signer(&self, signer: Arc<sign::Signer>) -> Result<(), sign::SignError> {
        let st = self.state.lock();
        if self.signer.set(signer.clone()).is_err() {
            return Ok(());
        }
        signer.sign_head(st.last_id, &st.last_hash, &rfc3339(self.clock.now()))
    }

    /// Reads and checks the end of the log (under the exclusive lock);
    /// returns (length, last id, last hash).
    fn read_tail(
        dir: &Path,
        log_path: &Path,
        head_path: &Path,
        file: &File,
    ) -> Result<(u64, u64, String), AuditError> {
        let head = read_head(head_path)?.ok_or_else(|| AuditError::Anchor {
            path: head_path.to_path_buf(),
            reason: "missing: cannot tell whether the log's tail was cut".into(),
        })?;
        let mut f = file;
        let len = f.metadata().map_err(io("stat", log_path))?.len();
        let start = len.saturating_sub(TAIL_BYTES);
        f.seek(SeekFrom::Start(start))
            .map_err(io("seek", log_path))?;
        let mut tail = Vec::new();
        f.read_to_end(&mut tail).map_err(io("read", log_path))?;
        // Offset in the file of the first byte after the last newline.
        let end_complete = tail
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(start, |p| start + p as u64 + 1);
        let complete = &tail[..(end_complete - start) as usize];
        let mut lines = complete.split(|&b| b == b'\n');
        lines.next_back(); // the empty piece after the last newline
        // Only whole lines count: when the tail starts mid-file, its first
        // piece may be a fragment, so never look further back than the last.
        let last = lines.next_back().filter(|l| start == 0 || !l.is_empty());
        let broken = |why: Break, id: Option<u64>| AuditError::Broken {
            path: log_path.to_path_buf(),
            // Line numbers are not known from the tail alone.
            line: 0,
            id,
            why,
        };
        let (last_id, last_hash, prev) = match last {
            None if start == 0 => (0, ZERO_HASH.to_string(), None),
            None => return Err(broken(Break::BadJson("record too long".into()), None)),
            Some(l) => {
                let rec = check_line(l).map_err(|why| broken(why, loose_id(l)))?;
                (rec.id, rec.hash, Some(rec.prev))
            }
        };
        let head_ok = if last_id == head.id {
            if last_hash != head.hash {
                return Err(broken(Break::AnchorMismatch, Some(last_id)));
            }
            true
        } else if last_id == head.id + 1 && prev.as_deref() == Some(head.hash.as_str()) {
            false
        } else if last_id < head.id {
            return Err(broken(
                Break::Truncated {
                    last: last_id,
                    anchor: head.id,
                },
                Some(last_id + 1),
            ));
        } else {
            return Err(broken(Break::PastAnchor { anchor: head.id }, Some(last_id)));
        };
        if end_complete < len {
            // Never acknowledged: the fdatasync of that append did not return.
            tracing::warn!(path = %log_path.display(), bytes = len - end_complete,
                "audit log ends in an incomplete record from an interrupted append; removing it");
            file.set_len(end_complete)
                .and_then(|()| crate::store::durable::sync_all(file))
                .map_err(io("truncate", log_path))?;
        }
        if !head_ok {
            tracing::warn!(path = %log_path.display(), id = last_id,
                "audit anchor was one record behind (interrupted append); moving it up");
            write_head(
                dir,
                &Head {
                    id: last_id,
                    hash: last_hash.clone(),
                },
            )?;
        }
        Ok((end_complete, last_id, last_hash))
    }

    /// The log file.
    pub fn path(&self) -> &Path {
        &self.log_path
    }

    /// Id of the last record written (0 when empty).
    pub fn last_id(&self) -> u64 {
        self.state.lock().last_id
    }

    /// Appends `event` as the next record: one O_APPEND write, fdatasync,
    /// then the anchor is replaced. Returns the new event id once all of that
    /// is durable.
    pub fn append(&self, mut event: AuditEvent) -> Result<u64, AuditError> {
        // An API request's token name, where the event names no actor.
        if event.actor.is_none() {
            event.actor = crate::actor::current();
        }
        event.validate()?;
        let mut st = self.state.lock();
        if st.poisoned {
            return Err(AuditError::Poisoned);
        }
        flock(&st.file, &self.log_path, true)?;
        let r = self.append_locked(&mut st, &event);
        funlock(&st.file);
        r
    }

    fn append_locked(&self, st: &mut State, event: &AuditEvent) -> Result<u64, AuditError> {
        let len = st
            .file
            .metadata()
            .map_err(io("stat", &self.log_path))?
            .len();
        if len != st.len {
            return Err(AuditError::Changed {
                path: self.log_path.clone(),
            });
        }
        let id = st.last_id + 1;
        let time = rfc3339(self.clock.now());
        let (line, hash) = encode(id, &time, &st.last_hash, event);
        // From here a failure may leave part of a line or a stale anchor:
        // stop appending until a reopen has looked at the tail.
        st.poisoned = true;
        st.file
            .write_all(&line)
            .map_err(io("append to", &self.log_path))?;
        crate::store::durable::sync_data(&st.file).map_err(io("fdatasync", &self.log_path))?;
        write_head(
            &self.dir,
            &Head {
                id,
                hash: hash.clone(),
            },
        )?;
        st.len = len + line.len() as u64;
        st.last_id = id;
        st.poisoned = false;
        if let Some(signer) = self.signer.get()
            && let Err(e) = signer.sign_head(id, &hash, &time)
        {
            // The record is durable; the next digest covers it.
            tracing::error!(error = %e, id, "cannot sign the audit chain head");
        }
        st.last_hash = hash;
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ZoneId;
    use crate::keys::Purpose;

    struct FixedClock;
    impl Clock for FixedClock {
        fn now(&self) -> SystemTime {
            UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)
        }
    }

    fn new_log(dir: &Path) -> AuditLog {
        AuditLog::create_or_open(dir).unwrap();
        AuditLog::open_with_clock(dir, Arc::new(FixedClock)).unwrap()
    }

    /// A log with `n` records of assorted shapes.
    fn log_with(n: u64) -> (tempfile::TempDir, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let log = new_log(dir.path());
        for i in 1..=n {
            let label = KeyLabel::new(ZoneId(1), Purpose::Dek, i as u32);
            let ev = match i % 3 {
                0 => AuditEvent::ok("key.create").zone("z1").key(&label),
                1 => AuditEvent::ok("zone.create").zone("z1").count(3),
                _ => AuditEvent::refused("kek.rotate", &"one approval of two")
                    .zone("z1")
                    .approvers(["op-alice"]),
            };
            assert_eq!(
                log.append(ev.duration(Duration::from_millis(i))).unwrap(),
                i
            );
        }
        (dir, log)
    }

    fn lines(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join(LOG_FILE))
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn write_lines(dir: &Path, lines: &[String]) {
        let mut s = lines.join("\n");
        s.push('\n');
        std::fs::write(dir.join(LOG_FILE), s).unwrap();
    }

    /// The (line, id, kind) of the first break.
    fn broken_at(dir: &Path) -> (u64, Option<u64>, &'static str) {
        match verify(dir) {
            Err(AuditError::Broken { line, id, why, .. }) => (line, id, why.kind()),
            other => panic!("expected a broken chain, got {other:?}"),
        }
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_millis(1_700_000_000_123)),
            "2023-11-14T22:13:20.123Z"
        );
        // A leap day.
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }

    #[test]
    fn chain_round_trip() {
        let (dir, log) = log_with(7);
        let report = verify(dir.path()).unwrap();
        assert_eq!(report.records, 7);
        assert_eq!(report.last_id, 7);
        assert_eq!(report.unanchored, 0);
        let ls = lines(dir.path());
        let first: Record = serde_json::from_str(&ls[0]).unwrap();
        assert_eq!(first.prev, ZERO_HASH);
        assert_eq!(first.time, "2023-11-14T22:13:20.123Z");
        assert_eq!(first.outcome, Outcome::Ok);
        let third: Record = serde_json::from_str(&ls[2]).unwrap();
        assert_eq!(third.key_id.as_deref(), Some("z1-dek-v3"));
        assert_eq!(third.key_version, Some(3));
        let last: Record = serde_json::from_str(&ls[6]).unwrap();
        assert_eq!(report.last_hash, last.hash);
        // The documented rule: hash = BLAKE3(line without the hash member, plus "}").
        let cut = ls[1].rfind(",\"hash\":\"").unwrap();
        let canon = format!("{}}}", &ls[1][..cut]);
        let second: Record = serde_json::from_str(&ls[1]).unwrap();
        assert_eq!(
            blake3::hash(canon.as_bytes()).to_hex().as_str(),
            second.hash
        );
        assert_eq!(second.prev, first.hash);
        // Field order is fixed.
        assert!(ls[0].starts_with("{\"id\":1,\"time\":"), "{}", ls[0]);
        // Reopening continues the chain.
        drop(log);
        let log = AuditLog::open(dir.path()).unwrap();
        assert_eq!(log.append(AuditEvent::ok("volume.create")).unwrap(), 8);
        assert_eq!(verify(dir.path()).unwrap().records, 8);
    }

    #[test]
    fn empty_log_verifies() {
        let dir = tempfile::tempdir().unwrap();
        AuditLog::create_or_open(dir.path()).unwrap();
        let r = verify(dir.path()).unwrap();
        assert_eq!(
            (r.records, r.last_id, r.last_hash.as_str()),
            (0, 0, ZERO_HASH)
        );
    }

    #[test]
    fn edited_field_is_named() {
        let (dir, _log) = log_with(6);
        let mut ls = lines(dir.path());
        ls[3] = ls[3].replace("\"duration_ms\":4", "\"duration_ms\":5");
        write_lines(dir.path(), &ls);
        assert_eq!(broken_at(dir.path()), (4, Some(4), "edited"));
        // The appender refuses only if the damage is at the tail; the whole
        // check is verify's job. An edit in the last record blocks appends.
        let mut ls = lines(dir.path());
        ls[3] = ls[3].replace("\"duration_ms\":5", "\"duration_ms\":4");
        ls[5] = ls[5].replace("\"z1\"", "\"z2\"");
        write_lines(dir.path(), &ls);
        assert_eq!(broken_at(dir.path()), (6, Some(6), "edited"));
        assert!(matches!(
            AuditLog::open(dir.path()),
            Err(AuditError::Broken {
                why: Break::Edited { .. },
                ..
            })
        ));
    }

    #[test]
    fn deleted_middle_record_is_named() {
        let (dir, _log) = log_with(6);
        let mut ls = lines(dir.path());
        ls.remove(2);
        write_lines(dir.path(), &ls);
        assert_eq!(broken_at(dir.path()), (3, Some(4), "deleted"));
    }

    #[test]
    fn swapped_records_are_named() {
        let (dir, _log) = log_with(6);
        let mut ls = lines(dir.path());
        ls.swap(2, 3);
        write_lines(dir.path(), &ls);
        assert_eq!(broken_at(dir.path()), (3, Some(4), "reordered"));
        let err = verify(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("line 3") && err.contains("event id 4"),
            "{err}"
        );
    }

    #[test]
    fn inserted_records_are_named() {
        // A replayed copy of an earlier record.
        let (dir, _log) = log_with(6);
        let mut ls = lines(dir.path());
        let copy = ls[1].clone();
        ls.insert(3, copy);
        write_lines(dir.path(), &ls);
        assert_eq!(broken_at(dir.path()), (4, Some(2), "inserted"));

        // A forged record with a valid hash, linked to its predecessor: the
        // chain forks at the genuine record that follows it.
        let (dir, _log) = log_with(6);
        let mut ls = lines(dir.path());
        let r3: Record = serde_json::from_str(&ls[2]).unwrap();
        let (forged, _) = encode(
            4,
            "2023-11-14T22:13:20.123Z",
            &r3.hash,
            &AuditEvent::ok("x"),
        );
        ls.insert(3, String::from_utf8(forged).unwrap().trim_end().to_string());
        write_lines(dir.path(), &ls);
        assert_eq!(broken_at(dir.path()), (5, Some(4), "inserted"));
    }

    #[test]
    fn truncated_tail_is_named() {
        let (dir, log) = log_with(6);
        let mut ls = lines(dir.path());
        ls.truncate(4);
        write_lines(dir.path(), &ls);
        assert_eq!(broken_at(dir.path()), (5, Some(5), "truncated"));
        drop(log);
        assert!(matches!(
            AuditLog::open(dir.path()),
            Err(AuditError::Broken {
                why: Break::Truncated { last: 4, anchor: 6 },
                ..
            })
        ));
        // Truncating to nothing is caught as well.
        std::fs::write(dir.path().join(LOG_FILE), b"").unwrap();
        assert_eq!(broken_at(dir.path()), (1, Some(1), "truncated"));
        // And so is a deleted anchor.
        write_lines(dir.path(), &lines_of(&ls));
        std::fs::remove_file(dir.path().join(HEAD_FILE)).unwrap();
        assert!(matches!(verify(dir.path()), Err(AuditError::Anchor { .. })));
    }

    fn lines_of(ls: &[String]) -> Vec<String> {
        ls.to_vec()
    }

    #[test]
    fn garbage_line_is_named() {
        let (dir, _log) = log_with(5);
        let mut ls = lines(dir.path());
        ls[1] = "hello, I am not JSON".into();
        write_lines(dir.path(), &ls);
        assert_eq!(broken_at(dir.path()), (2, None, "bad-json"));
        // A blank line counts as a line too.
        let (dir, _log) = log_with(5);
        let mut ls = lines(dir.path());
        ls.insert(2, String::new());
        write_lines(dir.path(), &ls);
        assert_eq!(broken_at(dir.path()), (3, None, "bad-json"));
    }

    #[test]
    fn crash_windows_recover() {
        // Record written, anchor not moved: verify accepts one unanchored
        // record, open moves the anchor.
        let (dir, log) = log_with(3);
        let old_head = std::fs::read(dir.path().join(HEAD_FILE)).unwrap();
        log.append(AuditEvent::ok("volume.create")).unwrap();
        std::fs::write(dir.path().join(HEAD_FILE), &old_head).unwrap();
        let r = verify(dir.path()).unwrap();
        assert_eq!((r.last_id, r.unanchored), (4, 1));
        drop(log);
        let log = AuditLog::open(dir.path()).unwrap();
        assert_eq!(verify(dir.path()).unwrap().unanchored, 0);
        // Half a line: reported by verify, cut off by open.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(LOG_FILE))
            .unwrap();
        f.write_all(b"{\"id\":5,\"ti").unwrap();
        assert_eq!(broken_at(dir.path()), (5, None, "incomplete"));
        drop(log);
        let log = AuditLog::open(dir.path()).unwrap();
        assert_eq!(log.append(AuditEvent::ok("volume.delete")).unwrap(), 5);
        assert_eq!(verify(dir.path()).unwrap().records, 5);
    }

    #[test]
    fn appends_from_a_stale_handle_are_refused() {
        let (dir, a) = log_with(2);
        let b = AuditLog::open(dir.path()).unwrap();
        b.append(AuditEvent::ok("serve.start")).unwrap();
        assert!(matches!(
            a.append(AuditEvent::ok("serve.stop")),
            Err(AuditError::Changed { .. })
        ));
        assert_eq!(verify(dir.path()).unwrap().records, 3);
    }

    #[test]
    fn bad_identifiers_are_refused() {
        let (_dir, log) = log_with(0);
        assert!(matches!(
            log.append(AuditEvent::ok("zone.create").zone("a\nb")),
            Err(AuditError::Invalid(_))
        ));
        assert!(matches!(
            log.append(AuditEvent::ok("zone.create").zone("x".repeat(200))),
            Err(AuditError::Invalid(_))
        ));
        // Newlines in error text are escaped, so the record stays one line.
        log.append(AuditEvent::failed("key.destroy", &"a\nb"))
            .unwrap();
        assert_eq!(verify(_dir.path()).unwrap().records, 1);
    }

    #[test]
    fn concurrent_appends_keep_one_chain() {
        let (dir, log) = log_with(0);
        let log = Arc::new(log);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for _ in 0..10 {
                        log.append(AuditEvent::ok("volume.create")).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(verify(dir.path()).unwrap().records, 40);
    }

    #[test]
    fn no_key_bytes_reach_the_log() {
        use crate::keys::secret::DataKey;
        use base64ct::{Base64, Encoding};
        let (dir, log) = log_with(0);
        let keys: Vec<DataKey> = (0..8).map(|_| DataKey::generate()).collect();
        for (v, _key) in keys.iter().enumerate() {
            let label = KeyLabel::new(ZoneId(3), Purpose::Dek, v as u32 + 1);
            log.append(AuditEvent::ok("key.create").zone("prod").key(&label))
                .unwrap();
            log.append(
                AuditEvent::refused("key.destroy", &format!("cannot destroy {label}"))
                    .zone("prod")
                    .key(&label)
                    .approvers(["op-alice", "op-bob"]),
            )
            .unwrap();
        }
        let text = std::fs::read(dir.path().join(LOG_FILE)).unwrap();
        for key in &keys {
            let raw = key.expose();
            let hex_lower: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            let b64 = Base64::encode_string(raw);
            // Raw bytes, hex, base64, and 8-byte windows of the raw bytes.
            for needle in [&raw[..], hex_lower.as_bytes(), b64.as_bytes()] {
                assert!(!contains(&text, needle));
            }
            for w in raw.windows(8) {
                assert!(!contains(&text, w));
            }
            for w in hex_lower.as_bytes().windows(16) {
                assert!(!contains(&text, w));
            }
        }
        assert_eq!(verify(dir.path()).unwrap().records, 16);
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }
}
