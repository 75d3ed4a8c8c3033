//! The last records of the audit log, for the dashboard's list of recent
//! events: read from the end of the file, so the cost does not grow with
//! the log. What it returns is what the log holds: no key material.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use super::{LOG_FILE, Record};

/// Bytes read from the end of the log: far more than the records asked for
/// need (a record is a few hundred bytes).
const TAIL_BYTES: u64 = 256 * 1024;

/// The last `limit` records of the pool's audit log, oldest first. Lines
/// that do not parse (a torn tail) are skipped; the chain check is
/// `keyturn audit verify`'s job, not this list's.
pub fn recent(pool_dir: &Path, limit: usize) -> std::io::Result<Vec<Record>> {
    let mut file = match std::fs::File::open(pool_dir.join(LOG_FILE)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = file.metadata()?.len();
    let start = len.saturating_sub(TAIL_BYTES);
    file.seek(SeekFrom::Start(start))?;
    let mut text = String::new();
    file.take(TAIL_BYTES).read_to_string(&mut text)?;
    let mut lines: Vec<&str> = text.lines().collect();
    if start > 0 && !lines.is_empty() {
        // The first line read is cut.
        lines.remove(0);
    }
    let records: Vec<Record> = lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let skip = records.len().saturating_sub(limit);
    Ok(records.into_iter().skip(skip).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditEvent, AuditLog};

    #[test]
    fn gives_the_last_records_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        assert!(recent(dir.path(), 5).unwrap().is_empty());
        let log = AuditLog::create_or_open(dir.path()).unwrap();
        for z in ["a", "b", "c", "d"] {
            log.append(AuditEvent::ok("zone.create").zone(z)).unwrap();
        }
        let got = recent(dir.path(), 2).unwrap();
        let zones: Vec<_> = got.iter().map(|r| r.zone.clone().unwrap()).collect();
        assert_eq!(zones, ["c", "d"]);
        assert!(got[0].id < got[1].id);
        assert_eq!(recent(dir.path(), 100).unwrap().len(), 4);
    }
}
