//! Heat: a decaying access counter per content block, so a rotation can
//! stage the blocks in use first.
//!
//! Counters are one byte each in a fixed array indexed by CBID modulo its
//! size (CBIDs are dense, so collisions are rare and only blur priorities).
//! A touch is one relaxed atomic add on the I/O path; `decay` halves every
//! counter, so a block's heat is roughly its accesses over the last few
//! decay periods.
//!
//! Heat is saved to a file so a restart keeps the rotation planner's view
//! of what is hot (see [`Heat::save`]). The file is sparse, little-endian:
//!
//! ```text
//! [0..8)   magic "KTHEAT1\0"
//! [8..12)  n: number of entries (u32)
//! then n × 5 bytes: counter index (u32), heat (u8)
//! ```

use std::path::Path;
use std::sync::atomic::{AtomicU8, Ordering};

use crate::ids::Cbid;

/// Number of counters per zone (1 MiB).
const SLOTS: usize = 1 << 20;
const MAGIC: &[u8; 8] = b"KTHEAT1\0";

/// Decaying per-content-block access counters.
pub struct Heat {
    counters: Box<[AtomicU8]>,
}

impl Default for Heat {
    fn default() -> Self {
        Self {
            counters: (0..SLOTS).map(|_| AtomicU8::new(0)).collect(),
        }
    }
}

impl Heat {
    fn slot(&self, cbid: Cbid) -> &AtomicU8 {
        &self.counters[(cbid.0 as usize) & (SLOTS - 1)]
    }

    /// Counts one access (saturating).
    pub fn touch(&self, cbid: Cbid) {
        let c = self.slot(cbid);
        // Racy read-then-add is fine: a lost increment only blurs a hint.
        if c.load(Ordering::Relaxed) < u8::MAX {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The block's current heat.
    pub fn get(&self, cbid: Cbid) -> u8 {
        self.slot(cbid).load(Ordering::Relaxed)
    }

    /// Writes the non-zero counters to `path` (atomically replaced).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut entries = Vec::new();
        for (i, c) in self.counters.iter().enumerate() {
            let v = c.load(Ordering::Relaxed);
            if v != 0 {
                entries.extend_from_slice(&(i as u32).to_le_bytes());
                entries.push(v);
            }
        }
        let mut out = Vec::with_capacity(12 + entries.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&((entries.len() / 5) as u32).to_le_bytes());
        out.extend_from_slice(&entries);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        crate::pool::write_atomic(path, &out).map_err(|e| std::io::Error::other(e.to_string()))
    }

    /// Raises each counter to the value saved in `path` (a missing file
    /// loads nothing). A damaged file is refused whole: heat is a hint.
    pub fn load(&self, path: &Path) -> std::io::Result<usize> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not a heat file");
        if bytes.len() < 12 || &bytes[..8] != MAGIC {
            return Err(bad());
        }
        let n = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
        let body = &bytes[12..];
        if body.len() != n.checked_mul(5).ok_or_else(bad)? {
            return Err(bad());
        }
        for e in body.chunks_exact(5) {
            let i = u32::from_le_bytes(e[..4].try_into().expect("4 bytes")) as usize;
            let c = self.counters.get(i).ok_or_else(bad)?;
            c.fetch_max(e[4], Ordering::Relaxed);
        }
        Ok(n)
    }

    /// Halves every counter.
    pub fn decay(&self) {
        for c in self.counters.iter() {
            let v = c.load(Ordering::Relaxed);
            if v != 0 {
                c.store(v / 2, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touches_count_and_decay_halves() {
        let h = Heat::default();
        for _ in 0..10 {
            h.touch(Cbid(5));
        }
        h.touch(Cbid(6));
        assert_eq!(h.get(Cbid(5)), 10);
        assert_eq!(h.get(Cbid(6)), 1);
        h.decay();
        assert_eq!(h.get(Cbid(5)), 5);
        assert_eq!(h.get(Cbid(6)), 0);
        for _ in 0..1000 {
            h.touch(Cbid(7));
        }
        assert_eq!(h.get(Cbid(7)), u8::MAX, "saturates");
    }

    #[test]
    fn heat_survives_a_save_and_load_and_a_damaged_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("heat").join("zone-1.bin");
        let h = Heat::default();
        for _ in 0..9 {
            h.touch(Cbid(3));
        }
        h.touch(Cbid(SLOTS as u64 + 4));
        h.save(&path).unwrap();
        let back = Heat::default();
        assert_eq!(back.load(&path).unwrap(), 2);
        assert_eq!(back.get(Cbid(3)), 9);
        assert_eq!(back.get(Cbid(4)), 1);
        assert_eq!(back.get(Cbid(5)), 0);
        assert_eq!(Heat::default().load(&dir.path().join("none")).unwrap(), 0);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 1);
        std::fs::write(&path, &bytes).unwrap();
        assert!(Heat::default().load(&path).is_err());
    }
}
