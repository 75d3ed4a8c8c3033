//! Replicated writes and unmaps, applied with the source's stream position
//! journaled in the same frame.

use super::{BS, Volume};
use crate::ids::{BLOCK_SIZE, Lba};
use crate::nbd::export::ExportError;

impl Volume {
    /// Applies a replicated write of whole blocks from block `first`, with
    /// `applied` (the source stream record) journaled in the same frame.
    pub async fn apply_write(
        &self,
        first: u64,
        plain: &[u8],
        applied: u64,
    ) -> Result<(), ExportError> {
        if plain.is_empty() || !plain.len().is_multiple_of(BLOCK_SIZE) {
            return Err(ExportError::Invalid(
                "a replicated write is whole blocks".into(),
            ));
        }
        self.check_range(first * BS, plain.len() as u64)?;
        let blocks = first..first + (plain.len() / BLOCK_SIZE) as u64;
        let _guard = self.locks.lock(blocks, true).await;
        self.write_blocks_to(super::write::Lbas::Run(first), plain, Some(applied))
            .await?;
        Ok(())
    }

    /// Applies replicated trims or write-zeroes (`zero`), with `applied`
    /// journaled in the frame of the last run.
    pub async fn apply_unmap(
        &self,
        runs: &[(Lba, u32)],
        zero: bool,
        applied: u64,
    ) -> Result<(), ExportError> {
        for (i, &(lba, n)) in runs.iter().enumerate() {
            self.check_range(lba.0 * BS, u64::from(n) * BS)?;
            if n == 0 {
                return Err(ExportError::Invalid("an empty run".into()));
            }
            let blocks = lba.0..lba.0 + u64::from(n);
            let _guard = self.locks.lock(blocks.clone(), true).await;
            let last = i + 1 == runs.len();
            self.unmap_blocks(blocks, zero, last.then_some(applied))?;
        }
        Ok(())
    }
}
