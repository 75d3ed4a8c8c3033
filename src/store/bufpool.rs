//! A pool of aligned I/O buffers, so the hot path neither allocates nor
//! zero-fills a buffer per request.
//!
//! Buffers come back dirty. That is safe because the volume layer only ever
//! uses them for ciphertext: writes encrypt into them, reads land device
//! bytes in them and decrypt out of them into the caller's buffer. Plaintext
//! never rests in a pooled buffer.

use parking_lot::Mutex;
use rustc_hash::FxHashMap;

use super::device::AlignedBuf;
use crate::ids::BLOCK_SIZE;

/// Largest buffer (in blocks) worth keeping.
const MAX_POOLED_BLOCKS: usize = 256;
/// Most buffers of one size kept.
const MAX_PER_SIZE: usize = 64;

/// Recycles [`AlignedBuf`]s by size.
#[derive(Default)]
pub struct BufPool {
    free: Mutex<FxHashMap<usize, Vec<AlignedBuf>>>,
}

impl BufPool {
    /// A buffer of exactly `blocks` blocks, with unspecified (ciphertext) contents.
    pub fn get(&self, blocks: usize) -> AlignedBuf {
        if blocks <= MAX_POOLED_BLOCKS
            && let Some(buf) = self.free.lock().get_mut(&blocks).and_then(Vec::pop)
        {
            return buf;
        }
        AlignedBuf::zeroed(blocks * BLOCK_SIZE)
    }

    /// Returns a buffer for reuse.
    pub fn put(&self, buf: AlignedBuf) {
        let blocks = buf.len() / BLOCK_SIZE;
        if blocks == 0 || blocks > MAX_POOLED_BLOCKS {
            return;
        }
        let mut free = self.free.lock();
        let list = free.entry(blocks).or_default();
        if list.len() < MAX_PER_SIZE {
            list.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_by_size() {
        let pool = BufPool::default();
        let mut b = pool.get(2);
        assert_eq!(b.len(), 2 * BLOCK_SIZE);
        b[0] = 7;
        pool.put(b);
        assert_eq!(pool.get(2)[0], 7, "the same buffer comes back");
        assert_eq!(pool.get(2)[0], 0, "a fresh one when the pool is empty");
        assert_eq!(pool.get(3).len(), 3 * BLOCK_SIZE);
    }
}
