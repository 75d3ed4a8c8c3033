//! `keyturn check`: the metadata consistency check.

use crate::ids::{Cbid, ZoneId};

use super::{CheckReport, Pool};

impl Pool {
    /// Checks the metadata: every mapped block has a live content block,
    /// every refcount equals the number of blocks mapped to it, and no data
    /// slot is claimed twice. Returns the problems found (empty: consistent).
    pub fn check(&self) -> CheckReport {
        let mut report = CheckReport::default();
        let catalog = self.catalog.lock().clone();
        let zones = self.zones.read();
        let mut slot_owner: rustc_hash::FxHashMap<u64, (ZoneId, Cbid)> = Default::default();
        // Every zone's lock, in id order, held to the end (as a checkpoint
        // takes them): on a served pool, a slot freed in one zone while
        // another is scanned would look referenced but not allocated.
        let metas: Vec<_> = zones.values().map(|z| (z, z.meta.lock())).collect();
        for (zone, meta) in &metas {
            let mut refs: rustc_hash::FxHashMap<Cbid, u32> = Default::default();
            for v in catalog.volumes.iter().filter(|v| v.zone == zone.id) {
                let Some(map) = meta.volumes.get(&v.id) else {
                    continue;
                };
                for (lba, cbid) in map.mapped() {
                    report.mapped_blocks += 1;
                    if meta.cb(cbid).is_none() {
                        report.problems.push(format!(
                            "volume {} block {lba} maps to content block {cbid}, which has no record",
                            v.name
                        ));
                    }
                    *refs.entry(cbid).or_default() += 1;
                }
            }
            for (cbid, rec) in meta.live_records() {
                report.content_blocks += 1;
                let n = refs.remove(&cbid).unwrap_or(0);
                if n != rec.refcount {
                    report.problems.push(format!(
                        "zone {} content block {cbid}: refcount {} but {n} blocks map to it",
                        zone.name, rec.refcount
                    ));
                }
                if let Some((z, other)) = slot_owner.insert(rec.slot.0, (zone.id, cbid)) {
                    report.problems.push(format!(
                        "slot {} is claimed by content block {cbid} of zone {} and {other} of zone {z}",
                        rec.slot, zone.name
                    ));
                }
            }
        }
        report.used_slots = self.storage.slots.lock().used();
        if report.used_slots < slot_owner.len() as u64 {
            report.problems.push(format!(
                "the allocator counts {} slots in use but {} are referenced",
                report.used_slots,
                slot_owner.len()
            ));
        }
        report
    }
}
