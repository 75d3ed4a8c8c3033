//! Serving a volume as an NBD export.

use super::{BS, Volume, io_err};
use crate::ids::{BLOCK_SIZE, Lba};
use crate::nbd::export::{Export, ExportError, Extent};

/// Largest range one block-status answer covers.
const STATUS_MAX_BLOCKS: u64 = 1 << 18;

impl Export for Volume {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        let len = buf.len() as u64;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let blocks = Self::block_range(offset, len);
        let _guard = self.locks.lock(blocks.clone(), false).await;
        if offset.is_multiple_of(BS) && len.is_multiple_of(BS) {
            return self.read_blocks(blocks.start, buf).await;
        }
        let mut tmp = vec![0u8; ((blocks.end - blocks.start) * BS) as usize];
        self.read_blocks(blocks.start, &mut tmp).await?;
        let skip = (offset - blocks.start * BS) as usize;
        buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
        Ok(())
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        self.check_writable()?;
        if len == 0 {
            return Ok(());
        }
        let blocks = Self::block_range(offset, len);
        let guard = self.locks.lock(blocks.clone(), true).await;
        let seq = if offset.is_multiple_of(BS) && len.is_multiple_of(BS) {
            self.write_blocks(blocks.start, data).await?
        } else {
            // Read-modify-write of the partial blocks at either end, under the lock.
            let mut tmp = vec![0u8; ((blocks.end - blocks.start) * BS) as usize];
            let head = blocks.start;
            let tail = blocks.end - 1;
            if !offset.is_multiple_of(BS) || (head == tail && !len.is_multiple_of(BS)) {
                self.read_blocks(head, &mut tmp[..BLOCK_SIZE]).await?;
            }
            if tail != head && !(offset + len).is_multiple_of(BS) {
                let at = ((tail - head) * BS) as usize;
                self.read_blocks(tail, &mut tmp[at..at + BLOCK_SIZE])
                    .await?;
            }
            let skip = (offset - head * BS) as usize;
            tmp[skip..skip + data.len()].copy_from_slice(data);
            self.write_blocks(head, &tmp).await?
        };
        drop(guard);
        if fua {
            self.journal.commit(seq).await.map_err(io_err)?;
        }
        Ok(())
    }

    async fn write_batch(&self, writes: &[(u64, &[u8])]) -> Vec<Result<(), ExportError>> {
        self.write_batch_of(writes).await
    }

    async fn flush(&self) -> Result<(), ExportError> {
        // The journal is shared by the whole pool, so this makes every
        // completed write on every connection durable (multi-conn consistency).
        self.journal
            .commit(self.journal.last_appended())
            .await
            .map_err(io_err)
    }

    async fn trim(&self, offset: u64, length: u64, fua: bool) -> Result<(), ExportError> {
        self.zero_range(offset, length, fua, false).await
    }

    async fn write_zeroes(&self, offset: u64, length: u64, fua: bool) -> Result<(), ExportError> {
        self.zero_range(offset, length, fua, true).await
    }

    async fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>, ExportError> {
        self.check_range(offset, length)?;
        let end = offset + length.min(STATUS_MAX_BLOCKS * BS);
        if end == offset {
            return Err(ExportError::Invalid("zero-length block status".into()));
        }
        let blocks = Self::block_range(offset, end - offset);
        let mapped: Vec<bool> = {
            let meta = self.zone.meta.lock();
            let map = meta.volumes.get(&self.id).ok_or(ExportError::Shutdown)?;
            blocks.clone().map(|b| map.get(Lba(b)).is_some()).collect()
        };
        let mut extents: Vec<Extent> = Vec::new();
        for (i, &m) in mapped.iter().enumerate() {
            let b = blocks.start + i as u64;
            let from = (b * BS).max(offset);
            let to = ((b + 1) * BS).min(end);
            match extents.last_mut() {
                Some(e) if e.hole != m => e.length += to - from,
                _ => extents.push(Extent {
                    length: to - from,
                    hole: !m,
                    zero: !m,
                }),
            }
        }
        Ok(extents)
    }
}
