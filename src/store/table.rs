//! Memory-mapped checkpoint tables: fixed-size little-endian records in a
//! file, indexed by id.
//!
//! A table holds the state as of the last checkpoint, never anything newer
//! than the durable journal: changes since then live in an in-memory overlay
//! (see `zone`), and the checkpoint copies only durable entries in. So the
//! kernel may write a page back at any time without exposing a record that a
//! crash could orphan.
//!
//! File layout (every table):
//! ```text
//! offset 0     : header, 64 bytes
//!                [0..8)   magic  b"KTTABLE1"
//!                [8..12)  record size, u32 LE
//!                [12..16) reserved, zero
//!                [16..64) six u64 LE words for the table's owner (zero when new)
//! offset 4096  : record 0, record 1, ... (record size bytes each)
//! ```
//! A record of all zeros means "empty" for every record type.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::MmapMut;

const MAGIC: &[u8; 8] = b"KTTABLE1";
const HEADER: u64 = 4096;

/// Errors from table files.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// The file could not be opened, grown, mapped or synced.
    #[error("table {path}: {op}: {source}")]
    Io {
        /// Table file.
        path: PathBuf,
        /// Operation.
        op: &'static str,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a table of the expected record size.
    #[error("table {path} is not a keyturn table with {record} byte records")]
    Format {
        /// Table file.
        path: PathBuf,
        /// Expected record size.
        record: usize,
    },
}

/// A file of fixed-size records, memory-mapped.
pub struct Table {
    path: PathBuf,
    file: Arc<File>,
    map: MmapMut,
    record: usize,
    /// Number of records the file holds.
    len: u64,
}

impl Table {
    fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> TableError + 'a {
        move |source| TableError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }

    /// Creates a table file with room for `len` records (sparse).
    pub fn create(path: &Path, record: usize, len: u64) -> Result<Self, TableError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(Self::io(path, "create"))?;
        let mut header = [0u8; 64];
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&(record as u32).to_le_bytes());
        std::os::unix::fs::FileExt::write_all_at(&file, &header, 0)
            .map_err(Self::io(path, "write header"))?;
        Self::extend(&file, path, HEADER, len * record as u64)?;
        super::durable::sync_all(&file).map_err(Self::io(path, "sync"))?;
        drop(file);
        // The new name too: a table whose entry a power loss dropped would
        // leave its zone or volume without one.
        let dir = path.parent().unwrap_or(Path::new("."));
        super::durable::sync_dir(dir).map_err(Self::io(dir, "sync directory"))?;
        Self::open(path, record)
    }

    /// Opens an existing table.
    pub fn open(path: &Path, record: usize) -> Result<Self, TableError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(Self::io(path, "open"))?;
        let size = file.metadata().map_err(Self::io(path, "stat"))?.len();
        let mut header = [0u8; 64];
        if size < HEADER
            || std::os::unix::fs::FileExt::read_exact_at(&file, &mut header, 0).is_err()
            || &header[..8] != MAGIC
            || u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize != record
        {
            return Err(TableError::Format {
                path: path.to_path_buf(),
                record,
            });
        }
        // Tables made sparse (by an older keyturn) get their blocks now; if
        // the filesystem is full, serving goes on as before, with a warning.
        if let Err(e) = super::backing::allocate(&file, HEADER, size - HEADER) {
            tracing::warn!(table = %path.display(), error = %e, "cannot allocate a sparse table's blocks; a full metadata filesystem would stop the server");
        }
        let map = Self::map(&file, path)?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Arc::new(file),
            map,
            record,
            len: (size - HEADER) / record as u64,
        })
    }

    fn map(file: &File, path: &Path) -> Result<MmapMut, TableError> {
        // SAFETY: the mapping is of a file in the pool's metadata directory,
        // which one process at a time holds open (the pool lock). Nothing
        // truncates it while mapped: `grow` only extends, and remaps after.
        unsafe { MmapMut::map_mut(file) }.map_err(Self::io(path, "mmap"))
    }

    /// Number of records the file holds.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the table holds no records.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Owner word `i` (0..6) of the header: state that is checkpointed with
    /// the table (a zone keeps its active key version here).
    pub fn header_word(&self, i: usize) -> u64 {
        assert!(i < 6, "a table header has six owner words");
        u64::from_le_bytes(
            self.map[16 + 8 * i..24 + 8 * i]
                .try_into()
                .expect("8 bytes"),
        )
    }

    /// Sets owner word `i`; it reaches the disk with the next [`sync`](Self::sync).
    pub fn set_header_word(&mut self, i: usize, v: u64) {
        assert!(i < 6, "a table header has six owner words");
        self.map[16 + 8 * i..24 + 8 * i].copy_from_slice(&v.to_le_bytes());
    }

    /// Record `index`, or `None` past the end (which reads as empty).
    pub fn get(&self, index: u64) -> Option<&[u8]> {
        if index >= self.len {
            return None;
        }
        let at = (HEADER + index * self.record as u64) as usize;
        Some(&self.map[at..at + self.record])
    }

    /// Writes record `index`, growing the file if needed.
    pub fn put(&mut self, index: u64, bytes: &[u8]) -> Result<(), TableError> {
        debug_assert_eq!(bytes.len(), self.record);
        if index >= self.len {
            self.grow(index + 1)?;
        }
        let at = (HEADER + index * self.record as u64) as usize;
        self.map[at..at + self.record].copy_from_slice(bytes);
        Ok(())
    }

    /// Grows to at least `len` records, with headroom.
    fn grow(&mut self, len: u64) -> Result<(), TableError> {
        let len = len.max(self.len + self.len / 2).max(1024);
        super::durable::sync_with(&self.file, || self.map.flush())
            .map_err(Self::io(&self.path, "msync"))?;
        let from = HEADER + self.len * self.record as u64;
        Self::extend(
            &self.file,
            &self.path,
            from,
            (len - self.len) * self.record as u64,
        )?;
        self.map = Self::map(&self.file, &self.path)?;
        self.len = len;
        Ok(())
    }

    /// Extends the file by `len` bytes at `from` (its end), with its blocks
    /// allocated: a table is never sparse, because touching a hole through
    /// the map on a full filesystem is SIGBUS (see `backing`). Where the
    /// filesystem cannot allocate ahead, the file is extended sparse.
    fn extend(file: &File, path: &Path, from: u64, len: u64) -> Result<(), TableError> {
        if !super::backing::allocate(file, from, len).map_err(Self::io(path, "allocate"))? {
            file.set_len(from + len).map_err(Self::io(path, "size"))?;
        }
        Ok(())
    }

    /// msync: every `put` so far is on disk.
    pub fn sync(&self) -> Result<(), TableError> {
        self.map.flush().map_err(Self::io(&self.path, "msync"))?;
        super::durable::sync_all(&self.file).map_err(Self::io(&self.path, "fsync"))
    }

    /// Iterates over `(index, record)` for every non-empty record.
    pub fn iter_nonempty(&self) -> impl Iterator<Item = (u64, &[u8])> + '_ {
        let body = &self.map[HEADER as usize..];
        body.chunks_exact(self.record)
            .enumerate()
            .filter(|(_, r)| r.iter().any(|&b| b != 0))
            .map(|(i, r)| (i as u64, r))
    }

    /// A handle that makes every `put` so far durable without borrowing
    /// the table, so a checkpoint can sync after it let writers go on.
    pub fn syncer(&self) -> TableSync {
        TableSync {
            path: self.path.clone(),
            file: self.file.clone(),
        }
    }
}

/// Syncs a table from outside it (see [`Table::syncer`]).
pub struct TableSync {
    path: PathBuf,
    file: Arc<File>,
}

impl TableSync {
    /// fsync of the table's file. On Linux that writes back the pages
    /// dirtied through the shared mapping as well (a write through a
    /// shared mapping dirties the page-cache page, and `msync(MS_SYNC)`
    /// is itself an fsync of the range), so every `put` made before this
    /// call is on disk when it returns. `put`s made meanwhile may or may
    /// not be.
    pub fn sync(&self) -> Result<(), TableError> {
        super::durable::sync_all(&self.file).map_err(Table::io(&self.path, "fsync"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_grow_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let mut t = Table::create(&p, 16, 4).unwrap();
        assert_eq!(t.get(2), Some(&[0u8; 16][..]));
        t.put(2, &[7; 16]).unwrap();
        t.put(5000, &[9; 16]).unwrap();
        assert!(t.len() > 5000);
        t.sync().unwrap();
        drop(t);
        let t = Table::open(&p, 16).unwrap();
        assert_eq!(t.get(2), Some(&[7u8; 16][..]));
        assert_eq!(t.get(5000), Some(&[9u8; 16][..]));
        let ids: Vec<u64> = t.iter_nonempty().map(|(i, _)| i).collect();
        assert_eq!(ids, vec![2, 5000]);
        assert!(matches!(Table::open(&p, 8), Err(TableError::Format { .. })));
        let mut t = Table::open(&p, 16).unwrap();
        assert_eq!(t.header_word(0), 0);
        t.set_header_word(0, 42);
        t.sync().unwrap();
        drop(t);
        assert_eq!(Table::open(&p, 16).unwrap().header_word(0), 42);
    }

    #[test]
    fn syncer_outlives_a_borrow_and_growth() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t");
        let mut t = Table::create(&p, 16, 4).unwrap();
        t.put(1, &[3; 16]).unwrap();
        let sync = t.syncer();
        // Growth remaps; the handle still names the same file.
        t.put(9000, &[4; 16]).unwrap();
        sync.sync().unwrap();
        drop(t);
        let t = Table::open(&p, 16).unwrap();
        assert_eq!(t.get(1), Some(&[3u8; 16][..]));
        assert_eq!(t.get(9000), Some(&[4u8; 16][..]));
    }
}
