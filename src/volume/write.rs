//! The write path: planning a write under the zone lock (zero blocks,
//! dedup, fresh CBIDs), then placing and recording it.

use super::{Volume, io_err};
use crate::crypto::tag::Tag;
use crate::ids::{Cbid, JournalSeq, KeyVersion, Lba, Slot};
use crate::nbd::export::ExportError;
use crate::zone::ZoneMeta;
use crate::zone::change::ZoneChange;
use crate::zone::mac::WriteTags;

/// A new content block a write creates.
pub(super) struct NewCb {
    pub(super) cbid: Cbid,
    pub(super) slot: Slot,
    /// Staging slot for the copy under the next key, during a window.
    pub(super) staged: Option<Slot>,
    pub(super) tag: Tag,
    /// Index (into the request's blocks) of its plaintext.
    pub(super) block: usize,
}

/// Where each block of a write goes.
#[derive(Clone, Copy)]
pub(super) enum Target {
    /// An all-zero block: unmapped.
    Zero,
    /// A new content block (index into `WritePlan::new`).
    New(usize),
    /// An existing content block with equal content (dedup).
    Shared(Cbid),
}

/// The logical blocks a write's plaintext blocks go to, in order.
#[derive(Clone, Copy)]
pub(super) enum Lbas<'a> {
    /// Consecutive blocks from this one: one request.
    Run(u64),
    /// One logical block per plaintext block, no block twice: the requests
    /// of a batch (see `batch`).
    Each(&'a [u64]),
}

impl Lbas<'_> {
    /// The logical block of plaintext block `i`.
    pub(super) fn at(self, i: usize) -> u64 {
        match self {
            Lbas::Run(first) => first + i as u64,
            Lbas::Each(lbas) => lbas[i],
        }
    }

    /// The runs of consecutive logical blocks among `n` blocks, as
    /// (index of the run's first block, its length).
    fn runs(self, n: usize) -> Vec<(usize, usize)> {
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for i in 0..n {
            match runs.last_mut() {
                Some((start, len)) if self.at(*start) + *len as u64 == self.at(i) => *len += 1,
                _ => runs.push((i, 1)),
            }
        }
        runs
    }
}

/// What a write decided under the zone lock before doing any I/O.
pub(super) struct WritePlan {
    pub(super) targets: Vec<Target>,
    pub(super) new: Vec<NewCb>,
    /// DEK version of the data-device copies.
    pub(super) active: KeyVersion,
    /// DEK version of the staged copies (the window's next key).
    pub(super) window: Option<KeyVersion>,
    /// Version of the MAC key the new blocks' tags were made under.
    pub(super) mac: u32,
    /// Blocks shared with a content block whose tag is under a retired MAC
    /// key: the (tag, version) it had when found.
    pub(super) shared_under: rustc_hash::FxHashMap<usize, (Tag, u32)>,
    /// How many of `new` hold data (and staging) slots.
    pub(super) placed: usize,
}

impl Volume {
    /// Decides where each block of a write goes, under the zone lock:
    /// all-zero blocks unmap, blocks equal to a live content block share it
    /// (dedup), the rest get fresh CBIDs. Registers the write as in flight
    /// under the active key.
    /// `None` when the MAC key of `tagged` is no longer held.
    pub(super) fn plan_write(
        &self,
        tagged: &WriteTags,
        dedup: bool,
    ) -> Result<Option<WritePlan>, ExportError> {
        let (tags, mac) = (&tagged.tags, tagged.mac);
        let mut meta = self.zone.meta.lock();
        // Under the zone lock, where a MAC key is dropped (see `rotation::mac`).
        if self.zone.crypto().tagger_for(mac).is_none() {
            return Ok(None);
        }
        let mut shared_under = rustc_hash::FxHashMap::default();
        let dedup = dedup && meta.dedup_enabled();
        let mut targets = Vec::with_capacity(tags.len());
        let mut new: Vec<NewCb> = Vec::with_capacity(tags.len());
        // Sized for the whole request up front: grown one insert at a time,
        // a 1 MiB write's 256 tags rehashed it seven times.
        let mut in_request: rustc_hash::FxHashMap<Tag, usize> = if dedup {
            rustc_hash::FxHashMap::with_capacity_and_hasher(tags.len(), Default::default())
        } else {
            Default::default()
        };
        for (i, tag) in tags.iter().enumerate() {
            let Some(tag) = tag else {
                targets.push(Target::Zero);
                continue;
            };
            if dedup {
                let found = meta.find_by_tag(tag, mac).or_else(|| {
                    tagged
                        .old
                        .iter()
                        .find_map(|(v, old)| old[i].as_ref().and_then(|t| meta.find_by_tag(t, *v)))
                });
                if let Some((cbid, r)) = found
                    && r.refcount < u32::MAX / 2
                {
                    if r.mac != mac {
                        shared_under.insert(i, (r.tag, r.mac));
                    }
                    targets.push(Target::Shared(cbid));
                    continue;
                }
                if let Some(&k) = in_request.get(tag) {
                    targets.push(Target::New(k));
                    continue;
                }
                in_request.insert(*tag, new.len());
            }
            targets.push(Target::New(new.len()));
            new.push(NewCb {
                cbid: Cbid(0),
                slot: Slot(0),
                staged: None,
                tag: *tag,
                block: i,
            });
        }
        let mut k = 0;
        while k < new.len() {
            let (f, c) = meta
                .cbids
                .alloc_run((new.len() - k) as u64)
                .ok_or_else(|| io_err("out of CBIDs"))?;
            for id in f..f + c {
                new[k].cbid = Cbid(id);
                k += 1;
            }
        }
        let active = meta.active;
        *meta.writers.entry(active).or_default() += 1;
        Ok(Some(WritePlan {
            targets,
            new,
            active,
            window: meta.window,
            mac,
            shared_under,
            placed: 0,
        }))
    }

    /// Ends a write's registration as in flight (see [`ZoneMeta::writers`]).
    pub(super) fn unregister_writer(meta: &mut ZoneMeta, active: KeyVersion) {
        if let Some(n) = meta.writers.get_mut(&active) {
            *n -= 1;
            if *n == 0 {
                meta.writers.remove(&active);
            }
        }
    }

    /// Writes whole blocks of plaintext `plain` starting at block `first`,
    /// and returns the journal frame that records them. The caller holds the
    /// range lock exclusively.
    pub(super) async fn write_blocks(
        &self,
        first: u64,
        plain: &[u8],
    ) -> Result<JournalSeq, ExportError> {
        self.write_blocks_to(Lbas::Run(first), plain, None).await
    }

    /// Writes whole blocks of plaintext `plain` to the logical blocks
    /// `lbas` in one journal frame, with `applied` (a replica's stream
    /// position) journaled in the same frame. The caller holds the range
    /// locks of `lbas` exclusively.
    pub(super) async fn write_blocks_to(
        &self,
        lbas: Lbas<'_>,
        plain: &[u8],
        applied: Option<u64>,
    ) -> Result<JournalSeq, ExportError> {
        self.zone.note_io();
        // All-zero blocks are unmapped rather than stored: they read as zeros
        // without touching a device, and block status can say so truthfully.
        let mut tagged = WriteTags::of(&self.zone.crypto(), plain);
        // A streaming zone gets its own copy of the blocks, made before the
        // zone lock; a full stream backlog holds writers back here.
        let sink = self.zone.sink();
        if let Some(sink) = &sink {
            while !sink.has_room() {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
        }
        // One stream record per run of consecutive blocks: (first block, copy).
        let n = plain.len() / crate::ids::BLOCK_SIZE;
        let mut copy = sink.as_ref().map(|_| {
            lbas.runs(n)
                .into_iter()
                .map(|(i, len)| {
                    let bytes =
                        &plain[i * crate::ids::BLOCK_SIZE..(i + len) * crate::ids::BLOCK_SIZE];
                    (i, crate::crypto::wipe::Wiped::from(bytes.to_vec()))
                })
                .collect::<Vec<_>>()
        });
        // A MAC key retired and destroyed since the tags were made (a MAC
        // rotation that ended meanwhile): tag again under the keys held.
        let mut plan = loop {
            match self.plan_write(&tagged, true)? {
                Some(plan) => break plan,
                None => tagged = WriteTags::of(&self.zone.crypto(), plain),
            }
        };
        let tags = &tagged.tags;
        let mut written = 0;
        loop {
            if let Err(e) = self.place_and_write(plain, &mut plan, written).await {
                self.abandon(&plan);
                return Err(e);
            }
            written = plan.new.len();
            // Under the zone lock: every shared block must still be live with
            // the same content; one freed meanwhile is written after all.
            let mut meta = self.zone.meta.lock();
            let mut lost = false;
            for (i, tag) in tags.iter().enumerate() {
                if let Target::Shared(cbid) = plan.targets[i]
                    && meta.cb(cbid).is_none_or(|r| {
                        let expect = plan.shared_under.get(&i).copied();
                        let expect = expect.or(tag.map(|t| (t, plan.mac)));
                        Some((r.tag, r.mac)) != expect
                    })
                {
                    let tag = tag.expect("shared blocks are non-zero");
                    let Some((f, _)) = meta.cbids.alloc_run(1) else {
                        drop(meta);
                        self.abandon(&plan);
                        return Err(io_err("out of CBIDs"));
                    };
                    plan.targets[i] = Target::New(plan.new.len());
                    plan.new.push(NewCb {
                        cbid: Cbid(f),
                        slot: Slot(0),
                        staged: None,
                        tag,
                        block: i,
                    });
                    lost = true;
                }
            }
            if !lost {
                let changes = match (&sink, copy.take()) {
                    (Some(sink), Some(runs)) => {
                        let changes = runs
                            .into_iter()
                            .map(|(i, plain)| {
                                let len = plain.len() / crate::ids::BLOCK_SIZE;
                                ZoneChange::Write {
                                    volume: self.id,
                                    first: Lba(lbas.at(i)),
                                    tags: tags[i..i + len].to_vec(),
                                    plain,
                                }
                            })
                            .collect();
                        Some((sink.as_ref(), changes))
                    }
                    _ => None,
                };
                return self.record_write(&mut meta, lbas, &plan, changes, applied);
            }
        }
    }

    /// Gives back everything a failed write reserved: nothing durable points to it.
    pub(super) fn abandon(&self, plan: &WritePlan) {
        let mut meta = self.zone.meta.lock();
        for nc in &plan.new {
            meta.cbids.release_now(nc.cbid.0, 1);
        }
        Self::unregister_writer(&mut meta, plan.active);
        drop(meta);
        let placed = &plan.new[..plan.placed];
        let mut alloc = self.storage.slots.lock();
        for nc in placed {
            alloc.release_now(nc.slot.0, 1);
        }
        drop(alloc);
        if let Some(staging) = &self.storage.staging {
            let staged: Vec<Slot> = placed.iter().filter_map(|nc| nc.staged).collect();
            staging.release_now(&staged);
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use crate::ids::BLOCK_SIZE;
    use crate::nbd::export::Export;

    /// One write mixing all-zero blocks (unmapped, never tagged) with runs
    /// of data blocks (tagged a run at a time): every block reads back, in
    /// one read and block by block, and only data blocks take space.
    /// A fresh pool with zone "z" and a 1 MiB volume "v" in it, opened
    /// (the temporary directory and the pool must outlive the volume).
    pub(in crate::volume) fn one_volume() -> (
        tempfile::TempDir,
        crate::pool::Pool,
        std::sync::Arc<crate::volume::Volume>,
    ) {
        use crate::config::Profile;
        use crate::nbd::export::ExportCatalog;
        use crate::pool::Pool;

        let (dir, pdir, pass) = crate::rotation::tests::new_pool();
        let profile = Profile::load("ci-2core").unwrap();
        let pool = Pool::open(&pdir, &pass, &profile).unwrap();
        pool.create_zone("z").unwrap();
        pool.create_volume("v", "z", 1 << 20).unwrap();
        let vol = pool.open("v").unwrap();
        (dir, pool, vol)
    }

    #[test]
    fn a_write_mixing_zero_and_data_blocks_reads_back() {
        let (_dir, _pool, vol) = one_volume();
        // Zero at 0, 3, 4 and 9: data runs of 2, 4 and 2 blocks between.
        let zero = [0, 3, 4, 9];
        let mut data = vec![0u8; 12 * BLOCK_SIZE];
        for (i, b) in data.chunks_exact_mut(BLOCK_SIZE).enumerate() {
            if !zero.contains(&i) {
                b.fill(i as u8 + 1);
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            vol.write(BLOCK_SIZE as u64, &data, true).await.unwrap();
            let mut back = vec![0xffu8; data.len()];
            vol.read(BLOCK_SIZE as u64, &mut back).await.unwrap();
            assert!(back == data, "one read");
            for (i, want) in data.chunks_exact(BLOCK_SIZE).enumerate() {
                let mut b = vec![0xffu8; BLOCK_SIZE];
                vol.read(((i + 1) * BLOCK_SIZE) as u64, &mut b)
                    .await
                    .unwrap();
                assert!(b == want, "block {i}");
            }
        });
        let meta = vol.zone.meta.lock();
        let mapped = meta.volumes.get(&vol.id).unwrap().mapped();
        assert_eq!(mapped.len(), 12 - zero.len());
    }
}
