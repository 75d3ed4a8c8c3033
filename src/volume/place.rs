//! Placing a write: reserving data and staging slots, encrypting the new
//! content blocks and writing them to the devices.

use futures::future::join_all;

use super::write::{NewCb, WritePlan};
use super::{Volume, io_err};
use crate::ids::{BLOCK_SIZE, KeyVersion, Slot};
use crate::nbd::export::ExportError;
use crate::store::Storage;

impl Volume {
    /// Allocates slots for the new content blocks from `from` on, encrypts
    /// them (under both keys in a window) and writes them.
    pub(super) async fn place_and_write(
        &self,
        plain: &[u8],
        plan: &mut WritePlan,
        from: usize,
    ) -> Result<(), ExportError> {
        let count = plan.new.len() - from;
        if count == 0 {
            return Ok(());
        }
        let slots = self.allocate_slots_waiting(count).await?;
        for (nc, slot) in plan.new[from..].iter_mut().zip(slots) {
            nc.slot = slot;
        }
        plan.placed = plan.new.len();
        if let (Some(next), Some(staging)) = (plan.window, &self.storage.staging) {
            let mut staged = staging.alloc_foreground(count as u64);
            if staged.len() < count
                && let Some(bound) = self.zone.staging_wait.bound()
            {
                crate::zone::staging_wait::wait_for_staging(
                    &self.zone,
                    staging,
                    next,
                    &mut staged,
                    count,
                    bound,
                )
                .await;
            }
            if (staged.len()) < count {
                self.zone.stats.unstaged.fetch_add(
                    (count - staged.len()) as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            for (nc, slot) in plan.new[from..].iter_mut().zip(staged) {
                nc.staged = Some(slot);
            }
        }
        self.encrypt_and_write(plain, plan, from).await
    }

    /// [`allocate_slots`](Self::allocate_slots), but a full device whose
    /// frees are waiting for durability commits the journal and tries again
    /// rather than failing: copy-on-write frees the slots an overwrite
    /// replaces only once its record is durable, so a device with little
    /// headroom is full for a moment under sustained overwrites, and a
    /// client must not see ENOSPC for that.
    pub(super) async fn allocate_slots_waiting(&self, n: usize) -> Result<Vec<Slot>, ExportError> {
        // Each commit frees whatever was pending when it started; more
        // than a few rounds means other writers keep taking the space.
        const COMMITS: usize = 4;
        let mut commits = 0;
        loop {
            match self.allocate_slots(n) {
                Err(ExportError::NoSpace(_))
                    if commits < COMMITS && self.storage.slots.lock().pending_frees() > 0 =>
                {
                    commits += 1;
                    self.journal
                        .commit(self.journal.last_appended())
                        .await
                        .map_err(io_err)?;
                }
                r => return r,
            }
        }
    }

    /// Reserves `n` data slots (in as few runs as the allocator gives).
    pub(super) fn allocate_slots(&self, n: usize) -> Result<Vec<Slot>, ExportError> {
        let mut slots = Vec::with_capacity(n);
        let mut alloc = self.storage.slots.lock();
        while slots.len() < n {
            match alloc.alloc_run((n - slots.len()) as u64) {
                Some((f, c)) => slots.extend((f..f + c).map(Slot)),
                None => {
                    for s in &slots {
                        alloc.release_now(s.0, 1);
                    }
                    return Err(ExportError::NoSpace("the data device is full".into()));
                }
            }
        }
        Ok(slots)
    }

    /// Encrypts the new content blocks from `from` on into their slots and
    /// writes them, one device write per run of consecutive slots; in a
    /// window also under the next key to their staging slots. A staging
    /// failure is counted and the copy dropped: the write still succeeds
    /// on the data device (migration re-encrypts the block after the flip).
    pub(super) async fn encrypt_and_write(
        &self,
        plain: &[u8],
        plan: &mut WritePlan,
        from: usize,
    ) -> Result<(), ExportError> {
        let new = &plan.new[from..];
        if let Some(end) = new.iter().map(|nc| nc.slot.0 + 1).max() {
            self.storage.ensure_slots(end).map_err(|e| match e {
                crate::store::device::DeviceError::OutOfRange { .. } => {
                    ExportError::NoSpace(e.to_string())
                }
                e => io_err(e),
            })?;
        }
        let crypto = self.zone.crypto();
        let key = |v: KeyVersion| {
            crypto.xts(v).ok_or_else(|| {
                io_err(format!(
                    "key version {v} of zone {} is not available",
                    self.zone.name
                ))
            })
        };
        let xts = key(plan.active)?;
        let staging = self
            .storage
            .staging
            .as_ref()
            .filter(|_| plan.window.is_some());
        let next = match plan.window {
            Some(v) if staging.is_some() => Some(key(v)?),
            _ => None,
        };
        let src = |nc: &NewCb| &plain[nc.block * BLOCK_SIZE..(nc.block + 1) * BLOCK_SIZE];
        let max_run = self.storage.max_run_blocks();
        let mut data_writes = Vec::new();
        for (start, len) in runs(new.iter().map(|nc| Some(nc.slot)), max_run) {
            let mut buf = self.storage.bufs.get(len);
            for (j, nc) in new[start..start + len].iter().enumerate() {
                xts.encrypt(
                    nc.cbid.0,
                    src(nc),
                    &mut buf[j * BLOCK_SIZE..(j + 1) * BLOCK_SIZE],
                );
            }
            data_writes.push(self.storage.write_data_run(new[start].slot, len, buf));
        }
        let mut staging_writes = Vec::new();
        let mut staging_runs = Vec::new();
        if let (Some(staging), Some(next)) = (staging, next) {
            if let Some(end) = new.iter().filter_map(|nc| nc.staged).map(|s| s.0 + 1).max()
                && staging.ensure_slots(end).is_err()
            {
                // Treated like a failed staging write below.
            }
            for (start, len) in runs(new.iter().map(|nc| nc.staged), max_run) {
                let mut buf = self.storage.bufs.get(len);
                for (j, nc) in new[start..start + len].iter().enumerate() {
                    next.encrypt(
                        nc.cbid.0,
                        src(nc),
                        &mut buf[j * BLOCK_SIZE..(j + 1) * BLOCK_SIZE],
                    );
                }
                let slot = new[start].staged.expect("runs skip unstaged blocks");
                staging_runs.push((start, len));
                staging_writes.push(staging.device.write_at(Storage::offset(slot), buf));
            }
        }
        let (data_results, staging_results) =
            futures::future::join(join_all(data_writes), join_all(staging_writes)).await;
        let mut outcome = Ok(());
        for (res, buf) in data_results {
            if let Err(e) = res {
                // A full device is NBD_ENOSPC (the spec's answer), not EIO.
                outcome = Err(if crate::store::full::is_no_space(&e) {
                    ExportError::NoSpace(e.to_string())
                } else {
                    io_err(e)
                });
            }
            self.storage.bufs.put(buf);
        }
        let mut failed = Vec::new();
        for ((start, len), (res, buf)) in staging_runs.into_iter().zip(staging_results) {
            if let Err(e) = res {
                tracing::warn!(zone = %self.zone.name, error = %e, blocks = len,
                    "staging write failed; the blocks stay under the active key until migration");
                self.zone
                    .stats
                    .staging_errors
                    .fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
                for nc in &mut plan.new[from + start..from + start + len] {
                    failed.extend(nc.staged.take());
                }
            }
            self.storage.bufs.put(buf);
        }
        if let Some(staging) = &self.storage.staging {
            staging.release_now(&failed);
        }
        outcome
    }
}

/// Groups consecutive slots into runs `(start index, length)`; `None`
/// entries belong to no run.
fn runs(slots: impl Iterator<Item = Option<Slot>>, max: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize, u64)> = Vec::new();
    for (i, s) in slots.enumerate() {
        let Some(s) = s else { continue };
        match out.last_mut() {
            Some((start, len, first))
                if *start + *len == i && *len < max && *first + *len as u64 == s.0 =>
            {
                *len += 1
            }
            _ => out.push((i, 1, s.0)),
        }
    }
    out.into_iter().map(|(s, l, _)| (s, l)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::export::Export;

    #[test]
    fn runs_break_at_gaps_holes_and_the_cap() {
        let slots = |v: &[Option<u64>]| v.iter().map(|s| s.map(Slot)).collect::<Vec<_>>();
        let v = slots(&[Some(5), Some(6), Some(7), None, Some(8), Some(10), Some(11)]);
        assert_eq!(runs(v.iter().copied(), 100), [(0, 3), (4, 1), (5, 2)]);
        let v = slots(&[Some(1), Some(2), Some(3), Some(4), Some(5)]);
        assert_eq!(runs(v.iter().copied(), 2), [(0, 2), (2, 2), (4, 1)]);
        assert_eq!(runs(v.iter().copied(), 1).len(), 5);
        assert!(runs(std::iter::empty(), 4).is_empty());
    }

    /// A raw device with little headroom beyond its volume: overwrites
    /// without a flush free their old slots only at the next commit, and
    /// must wait for it, not fail with ENOSPC. A volume that really does
    /// not fit still gets ENOSPC.
    #[test]
    fn overwrites_on_a_full_device_wait_for_frees_instead_of_failing() {
        use crate::config::Profile;
        use crate::nbd::export::ExportCatalog;
        use crate::pool::Pool;

        const BLOCKS: usize = 256;
        let (_dir, pdir, pass) = crate::rotation::tests::new_pool();
        let profile = Profile::load("ci-2core").unwrap();
        let pool = Pool::open(&pdir, &pass, &profile).unwrap();
        pool.create_zone("z").unwrap();
        pool.create_volume("v", "z", (2 * BLOCKS * BLOCK_SIZE) as u64)
            .unwrap();
        // As if the data device were a raw device of BLOCKS + 32 slots.
        pool.storage.slots.lock().set_limit(BLOCKS as u64 + 32);
        let vol = pool.open("v").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let pass_data = |pass: usize| {
            let mut data = vec![0u8; BLOCKS * BLOCK_SIZE];
            for (i, b) in data.chunks_exact_mut(BLOCK_SIZE).enumerate() {
                b.fill((pass * 7 + i) as u8 | 1);
            }
            data
        };
        rt.block_on(async {
            // Every pass replaces all BLOCKS blocks, 16 at a time, well
            // within one commit interval.
            for pass in 0..6 {
                let data = pass_data(pass);
                for (i, chunk) in data.chunks(16 * BLOCK_SIZE).enumerate() {
                    let at = (i * 16 * BLOCK_SIZE) as u64;
                    vol.write(at, chunk, false)
                        .await
                        .unwrap_or_else(|e| panic!("pass {pass} write {i}: {e}"));
                }
            }
            let mut back = vec![0u8; BLOCKS * BLOCK_SIZE];
            vol.read(0, &mut back).await.unwrap();
            assert!(back == pass_data(5), "the last pass reads back");
            // The second half of the volume does not fit: ENOSPC, no hang.
            let more = pass_data(9);
            let at = (BLOCKS * BLOCK_SIZE) as u64;
            let err = vol.write(at, &more, false).await.unwrap_err();
            assert!(matches!(err, ExportError::NoSpace(_)), "{err}");
            vol.read(0, &mut back).await.unwrap();
            assert!(back == pass_data(5), "a failed write changes nothing");
        });
    }
}
