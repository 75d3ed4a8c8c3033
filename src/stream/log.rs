//! A zone's stream log: records in segment files, checksummed.
//!
//! ```text
//! DIR/<first seq, 20 digits>.seg    one segment; the newest is appended to
//! segment: frames back to back, each
//!   [0..4)  record length n (little-endian)
//!   [4..8)  crc32c of the record
//!   [8..8+n) the record (see `record.rs`)
//! ```
//! Opening scans every segment and keeps the longest valid prefix of
//! consecutive sequence numbers, cut before the first record whose journal
//! frame did not survive the crash (its write is not in the pool, so the
//! record must not reach a replica). Retention drops whole segments from
//! the oldest; the newest is never dropped, so its name always tells the
//! next sequence number.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::record::{HEADER_LEN, MAX_RECORD_LEN};

/// Offsets of header fields the log reads without decoding a record.
const SEQ_AT: usize = 24;
const JSEQ_AT: usize = 32;
const TIME_AT: usize = 40;

fn field(rec: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(rec[at..at + 8].try_into().expect("header checked"))
}

/// A segment file.
#[derive(Clone, Debug)]
pub struct Segment {
    /// First sequence it holds (or would hold, when empty).
    pub first: u64,
    /// Last sequence it holds (`first - 1` when empty).
    pub last: u64,
    /// Path.
    pub path: PathBuf,
    /// Bytes.
    pub bytes: u64,
    /// Time of its last record, unix ms (0 when empty).
    pub last_time_ms: u64,
}

/// What opening found.
#[derive(Debug, Default, Clone)]
pub struct OpenReport {
    /// Records dropped because their journal frame was lost with a crash.
    pub unjournaled: u64,
    /// Whether a torn or damaged tail was cut.
    pub torn: bool,
}

/// The log, open for appending.
pub struct SegmentLog {
    dir: PathBuf,
    segments: Vec<Segment>,
    /// Shared with syncers, who fdatasync it without holding the log.
    active: std::sync::Arc<File>,
    segment_bytes: u64,
}

fn seg_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.seg"))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    crate::store::durable::sync_dir(dir)
}

/// Reads frames from a segment file, in order.
pub struct FrameReader {
    r: BufReader<File>,
}

impl FrameReader {
    /// Opens a segment for reading from its start.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            r: BufReader::with_capacity(1 << 20, File::open(path)?),
        })
    }

    /// The next valid record, or `None` at the end or at the first torn or
    /// damaged frame.
    pub fn next_record(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        let mut head = [0u8; 8];
        match self.r.read_exact(&mut head) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let n = u32::from_le_bytes(head[..4].try_into().expect("4")) as usize;
        let crc = u32::from_le_bytes(head[4..].try_into().expect("4"));
        if !(HEADER_LEN..=MAX_RECORD_LEN).contains(&n) {
            return Ok(None);
        }
        let mut rec = vec![0u8; n];
        match self.r.read_exact(&mut rec) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        if crc32c::crc32c(&rec) != crc {
            return Ok(None);
        }
        Ok(Some(rec))
    }
}

impl SegmentLog {
    /// Opens (or creates) the log in `dir`. Records whose journal sequence
    /// is above `journal_durable` (and not 0) are cut, with everything after.
    pub fn open(
        dir: &Path,
        journal_durable: u64,
        segment_bytes: u64,
    ) -> std::io::Result<(Self, OpenReport)> {
        std::fs::create_dir_all(dir)?;
        let mut firsts: Vec<u64> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".seg")?.parse::<u64>().ok()
            })
            .collect();
        firsts.sort_unstable();
        let mut report = OpenReport::default();
        let mut segments: Vec<Segment> = Vec::new();
        let mut cut = false;
        for first in firsts {
            let path = seg_path(dir, first);
            if cut || segments.last().is_some_and(|s| s.last + 1 != first) {
                // After a cut, or not contiguous: nothing here can be kept.
                report.torn |= !cut;
                cut = true;
                std::fs::remove_file(&path)?;
                continue;
            }
            let mut reader = FrameReader::open(&path)?;
            let mut seg = Segment {
                first,
                last: first - 1,
                path: path.clone(),
                bytes: 0,
                last_time_ms: 0,
            };
            let len = std::fs::metadata(&path)?.len();
            while let Some(rec) = reader.next_record()? {
                let seq = field(&rec, SEQ_AT);
                let jseq = field(&rec, JSEQ_AT);
                if seq != seg.last + 1 {
                    report.torn = true;
                    cut = true;
                    break;
                }
                if jseq != 0 && jseq > journal_durable {
                    report.unjournaled += 1;
                    cut = true;
                    // Count the rest as unjournaled too.
                    while reader.next_record()?.is_some() {
                        report.unjournaled += 1;
                    }
                    break;
                }
                seg.last = seq;
                seg.bytes += 8 + rec.len() as u64;
                seg.last_time_ms = field(&rec, TIME_AT);
            }
            if seg.bytes != len {
                report.torn |= !cut;
                cut = true;
                let f = OpenOptions::new().write(true).open(&path)?;
                f.set_len(seg.bytes)?;
                crate::store::durable::sync_all(&f)?;
            }
            segments.push(seg);
        }
        if segments.is_empty() {
            let path = seg_path(dir, 1);
            crate::store::durable::sync_all(&File::create(&path)?)?;
            sync_dir(dir)?;
            segments.push(Segment {
                first: 1,
                last: 0,
                path,
                bytes: 0,
                last_time_ms: 0,
            });
        }
        let active = std::sync::Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&segments.last().expect("one at least").path)?,
        );
        Ok((
            Self {
                dir: dir.to_path_buf(),
                segments,
                active,
                segment_bytes: segment_bytes.max(1 << 20),
            },
            report,
        ))
    }

    /// The last sequence in the log (0 if none ever).
    pub fn last_seq(&self) -> u64 {
        self.segments.last().map(|s| s.last).unwrap_or(0)
    }

    /// The oldest sequence still kept.
    pub fn first_seq(&self) -> u64 {
        self.segments.first().map(|s| s.first).unwrap_or(1)
    }

    /// The first sequence of the segment before the newest (or of the
    /// newest, if it is alone). A record references only records from here
    /// on, so a reference never outlives retention's oldest drops and an
    /// agent resolves it from its recent memory or one near read.
    pub fn recent_floor(&self) -> u64 {
        let n = self.segments.len();
        self.segments[n.saturating_sub(2)].first
    }

    /// Bytes kept.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// The segments, oldest first.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Appends framed records (consecutive sequence numbers from
    /// `last_seq() + 1`). Written to the page cache; [`sync`](Self::sync)
    /// makes them durable.
    pub fn append(&mut self, records: &[Vec<u8>]) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(records.iter().map(|r| r.len() + 8).sum());
        for rec in records {
            if self.segments.last().expect("one").bytes + buf.len() as u64 >= self.segment_bytes
                && self.segments.last().expect("one").last
                    >= self.segments.last().expect("one").first
            {
                self.flush_buf(&mut buf)?;
                self.roll()?;
            }
            let seq = field(rec, SEQ_AT);
            let seg = self.segments.last_mut().expect("one");
            debug_assert_eq!(seq, seg.last + 1);
            buf.extend_from_slice(&(rec.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32c::crc32c(rec).to_le_bytes());
            buf.extend_from_slice(rec);
            seg.last = seq;
            seg.last_time_ms = field(rec, TIME_AT);
        }
        self.flush_buf(&mut buf)
    }

    fn flush_buf(&mut self, buf: &mut Vec<u8>) -> std::io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let seg = self.segments.last_mut().expect("one");
        self.active.write_all_at(buf, seg.bytes)?;
        seg.bytes += buf.len() as u64;
        buf.clear();
        Ok(())
    }

    /// Closes the active segment (durably) and starts the next.
    fn roll(&mut self) -> std::io::Result<()> {
        crate::store::durable::sync_data(&self.active)?;
        let first = self.last_seq() + 1;
        let path = seg_path(&self.dir, first);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        sync_dir(&self.dir)?;
        self.active = std::sync::Arc::new(f);
        self.segments.push(Segment {
            first,
            last: first - 1,
            path,
            bytes: 0,
            last_time_ms: 0,
        });
        Ok(())
    }

    /// Makes everything appended durable.
    pub fn sync(&self) -> std::io::Result<()> {
        crate::store::durable::sync_data(&self.active)
    }

    /// The active segment, to fdatasync without holding the log: segments
    /// before it were synced when it was started, so syncing it makes
    /// everything appended so far durable.
    pub fn sync_handle(&self) -> std::sync::Arc<File> {
        self.active.clone()
    }

    /// The segment holding `seq`, if it is kept.
    pub fn locate(&self, seq: u64) -> Option<Segment> {
        self.segments
            .iter()
            .find(|s| s.first <= seq && seq <= s.last)
            .cloned()
    }

    /// Drops the oldest segments (never the newest) while `drop` says so.
    /// Returns how many were dropped.
    pub fn trim(&mut self, mut drop: impl FnMut(&Segment, u64) -> bool) -> std::io::Result<usize> {
        let mut n = 0;
        while self.segments.len() > 1 {
            let total = self.bytes();
            if !drop(&self.segments[0], total) {
                break;
            }
            let seg = self.segments.remove(0);
            std::fs::remove_file(&seg.path)?;
            n += 1;
        }
        if n > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, jseq: u64, len: usize) -> Vec<u8> {
        let mut r = vec![0u8; HEADER_LEN + len];
        r[SEQ_AT..SEQ_AT + 8].copy_from_slice(&seq.to_le_bytes());
        r[JSEQ_AT..JSEQ_AT + 8].copy_from_slice(&jseq.to_le_bytes());
        r[TIME_AT..TIME_AT + 8].copy_from_slice(&(seq * 10).to_le_bytes());
        r
    }

    fn all(dir: &Path) -> Vec<u64> {
        let mut out = Vec::new();
        let mut paths: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        paths.sort();
        for p in paths {
            let mut r = FrameReader::open(&p).unwrap();
            while let Some(rec) = r.next_record().unwrap() {
                out.push(field(&rec, SEQ_AT));
            }
        }
        out
    }

    #[test]
    fn appends_roll_reopen_and_trim() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = SegmentLog::open(dir.path(), 0, 1 << 20).unwrap();
        assert_eq!(log.last_seq(), 0);
        for s in 1..=40u64 {
            log.append(&[rec(s, 0, 100_000)]).unwrap();
        }
        log.sync().unwrap();
        assert!(log.segments().len() > 2);
        assert_eq!(all(dir.path()), (1..=40).collect::<Vec<_>>());
        drop(log);
        let (mut log, rep) = SegmentLog::open(dir.path(), 0, 1 << 20).unwrap();
        assert!(!rep.torn);
        assert_eq!(log.last_seq(), 40);
        assert_eq!(log.locate(17).map(|s| s.first <= 17), Some(true));
        let n = log.trim(|s, _| s.last < 20).unwrap();
        assert!(n >= 1);
        assert!(log.first_seq() <= 20);
        assert!(log.locate(1).is_none());
        log.append(&[rec(41, 0, 10)]).unwrap();
        assert_eq!(log.last_seq(), 41);
    }

    #[test]
    fn a_torn_tail_and_unjournaled_records_are_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = SegmentLog::open(dir.path(), 0, 1 << 20).unwrap();
        for s in 1..=5u64 {
            log.append(&[rec(s, 100 + s, 50)]).unwrap();
        }
        drop(log);
        // Journal durable through frame 103: records 4 and 5 go.
        let (log, rep) = SegmentLog::open(dir.path(), 103, 1 << 20).unwrap();
        assert_eq!(rep.unjournaled, 2);
        assert_eq!(log.last_seq(), 3);
        drop(log);
        assert_eq!(all(dir.path()), vec![1, 2, 3]);
        // A torn frame at the end.
        let seg = seg_path(dir.path(), 1);
        let len = std::fs::metadata(&seg).unwrap().len();
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(&[1, 2, 3, 4, 5, 6, 7], len).unwrap();
        let (log, rep) = SegmentLog::open(dir.path(), 1000, 1 << 20).unwrap();
        assert!(rep.torn);
        assert_eq!(log.last_seq(), 3);
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), len);
        // A flipped byte in the middle cuts there.
        f.write_all_at(&[0xff], len / 2).unwrap();
        let (log, _) = SegmentLog::open(dir.path(), 1000, 1 << 20).unwrap();
        assert!(log.last_seq() < 3);
    }
}
