//! Writes that arrived together, applied together: the blocks of a batch of
//! requests get consecutive slots, so they reach the device as one write,
//! and are recorded in one journal frame. A request is never split across
//! frames, so after a crash each one is there whole or not at all.

use std::ops::Range;

use super::write::Lbas;
use super::{BS, Volume};
use crate::ids::BLOCK_SIZE;
use crate::nbd::export::ExportError;

/// A request of a batch, and the group it went into.
struct Member {
    index: usize,
    blocks: Range<u64>,
}

impl Volume {
    /// Applies `writes` (none with FUA), one result per write. Whole-block
    /// writes go in groups with no block written twice, each group one
    /// device write per run of slots and one frame; a write that overlaps
    /// an earlier one of its group starts the next group, so later writes
    /// still win. Partial-block writes go one at a time, after the groups.
    pub(super) async fn write_batch_of(
        &self,
        writes: &[(u64, &[u8])],
    ) -> Vec<Result<(), ExportError>> {
        let mut results: Vec<Result<(), ExportError>> = (0..writes.len()).map(|_| Ok(())).collect();
        let mut group: Vec<Member> = Vec::new();
        let mut taken = rustc_hash::FxHashSet::default();
        let mut partial = Vec::new();
        for (index, &(offset, data)) in writes.iter().enumerate() {
            let len = data.len() as u64;
            if let Err(e) = self.check_range(offset, len) {
                results[index] = Err(e);
                continue;
            }
            if len == 0 {
                continue;
            }
            if !offset.is_multiple_of(BS) || !len.is_multiple_of(BS) {
                partial.push(index);
                continue;
            }
            let blocks = Self::block_range(offset, len);
            if blocks.clone().any(|b| taken.contains(&b)) {
                self.write_group(writes, &group, &mut results).await;
                group.clear();
                taken.clear();
            }
            taken.extend(blocks.clone());
            group.push(Member { index, blocks });
        }
        self.write_group(writes, &group, &mut results).await;
        for index in partial {
            let (offset, data) = writes[index];
            results[index] = crate::nbd::export::Export::write(self, offset, data, false).await;
        }
        results
    }

    /// Writes one group of non-overlapping whole-block writes in one frame;
    /// every member gets the group's outcome.
    async fn write_group(
        &self,
        writes: &[(u64, &[u8])],
        group: &[Member],
        results: &mut [Result<(), ExportError>],
    ) {
        if group.is_empty() {
            return;
        }
        let outcome = async {
            self.check_writable()?;
            let ranges: Vec<Range<u64>> = group.iter().map(|m| m.blocks.clone()).collect();
            let _guard = self.locks.lock_all(&ranges, true).await;
            let blocks: usize = ranges.iter().map(|r| (r.end - r.start) as usize).sum();
            let mut plain = Vec::with_capacity(blocks * BLOCK_SIZE);
            let mut lbas = Vec::with_capacity(blocks);
            for m in group {
                plain.extend_from_slice(writes[m.index].1);
                lbas.extend(m.blocks.clone());
            }
            let written = self.write_blocks_to(Lbas::Each(&lbas), &plain, None).await;
            crate::crypto::wipe::wipe(&mut plain);
            written.map(|_| ())
        }
        .await;
        if let Err(e) = outcome {
            for m in group {
                results[m.index] = Err(e.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::ids::BLOCK_SIZE;
    use crate::nbd::export::Export;

    /// A batch with writes that overlap and one partial-block write reads
    /// back as the writes applied in order, and takes one journal frame per
    /// group of non-overlapping whole-block writes.
    #[test]
    fn a_batch_reads_back_as_its_writes_in_order_one_frame_per_group() {
        let (_dir, _pool, vol) = crate::volume::write::tests::one_volume();
        let bs = BLOCK_SIZE;
        let block = |fill: u8, n: usize| vec![fill; n * bs];
        // (offset, data): A (blocks 0-1), B (block 4), C (block 1: overlaps
        // A, so a second group), E (block 0, joins C's group), D partial.
        let a = block(0xa1, 2);
        let b = block(0xb2, 1);
        let c = block(0xc3, 1);
        let e = block(0xe5, 1);
        let d = vec![0xd4u8; 50];
        let writes: Vec<(u64, &[u8])> = vec![
            (0, &a),
            (4 * bs as u64, &b),
            (bs as u64, &c),
            (0, &e),
            ((8 * bs + 100) as u64, &d),
        ];
        let mut model = vec![0u8; 16 * bs];
        for &(off, data) in &writes {
            model[off as usize..off as usize + data.len()].copy_from_slice(data);
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let before = vol.journal.last_appended();
            let results = vol.write_batch(&writes).await;
            assert!(results.iter().all(|r| r.is_ok()), "every write succeeds");
            let frames = vol.journal.last_appended().0 - before.0;
            assert_eq!(frames, 3, "two groups and the partial write");
            let mut back = vec![0xffu8; model.len()];
            vol.read(0, &mut back).await.unwrap();
            assert!(back == model, "the batch reads back as its writes in order");
        });
    }
}
