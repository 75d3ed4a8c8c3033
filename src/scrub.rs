//! Scrub: decrypt every copy of every content block of a zone (data and
//! staged copies) and check its tag; report each bad one by volume and LBA.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use crate::admin::{BadBlock, ScrubStatus};
use crate::ids::{BLOCK_SIZE, Cbid, KeyVersion, Lba, Slot};
use crate::store::Storage;
use crate::store::journal::Place;
use crate::zone::Zone;

/// A scrub's shared progress.
#[derive(Default)]
pub struct Scrub {
    /// Progress and findings.
    pub status: Mutex<ScrubStatus>,
    running: AtomicBool,
}

impl Scrub {
    /// Whether a scrub is running.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// Claims the scrub for a new run; false if one is running.
    pub fn claim(&self, zone: &str) -> bool {
        if self.running.swap(true, Ordering::AcqRel) {
            return false;
        }
        *self.status.lock() = ScrubStatus {
            zone: zone.into(),
            running: true,
            ..Default::default()
        };
        true
    }
}

/// Checks every copy of every live content block of `zone`. `volumes` maps
/// volume ids to names, for the report.
pub fn run(
    zone: &Zone,
    storage: &Storage,
    volumes: &[(crate::ids::VolumeId, String)],
    scrub: &Scrub,
) {
    let records = zone.meta.lock().live_records();
    // (block, device, slot, DEK version, (MAC version, tag)) of each copy.
    type Copy = (
        Cbid,
        Place,
        Slot,
        KeyVersion,
        (u32, crate::crypto::tag::Tag),
    );
    let mut copies: Vec<Copy> = Vec::new();
    for (cbid, r) in &records {
        copies.push((*cbid, Place::Data, r.slot, r.key_version, (r.mac, r.tag)));
        if let Some(s) = r.staged {
            copies.push((*cbid, Place::Staging, s.slot, s.key_version, (r.mac, r.tag)));
        }
    }
    copies.sort_unstable_by_key(|c| (c.1 == Place::Staging, c.2));
    scrub.status.lock().total = copies.len() as u64;
    let mut bad: Vec<(Cbid, Place, String)> = Vec::new();
    let mut plain = vec![0u8; BLOCK_SIZE];
    for (i, &(cbid, place, slot, version, (mac, tag))) in copies.iter().enumerate() {
        // A copy that moved since the snapshot (migration, a rewrite) is skipped.
        let current = zone.meta.lock().cb(cbid);
        let still = current.is_some_and(|r| match place {
            Place::Data => r.slot == slot && r.key_version == version,
            Place::Staging => r.staged.is_some_and(|s| s.slot == slot),
        });
        if still {
            let reason = match storage.device(place) {
                None => Some("no staging device".to_string()),
                Some(dev) => {
                    let (res, buf) = futures::executor::block_on(
                        dev.read_at(Storage::offset(slot), storage.bufs.get(1)),
                    );
                    let crypto = zone.crypto();
                    let r = match (res, crypto.xts(version)) {
                        (Err(e), _) => Some(format!("read failed: {e}")),
                        (Ok(()), None) => Some(format!("key version {version} is not available")),
                        (Ok(()), Some(xts)) => {
                            xts.decrypt(cbid.0, &buf, &mut plain);
                            (!crypto.verify_tag(mac, &plain, &tag))
                                .then(|| "integrity check failed".to_string())
                        }
                    };
                    storage.bufs.put(buf);
                    r
                }
            };
            if let Some(reason) = reason {
                let still_there = zone.meta.lock().cb(cbid) == current;
                if still_there {
                    tracing::error!(zone = %zone.name, %cbid, ?place, %reason, "scrub: bad block");
                    bad.push((cbid, place, reason));
                }
            }
        }
        if i % 256 == 0 {
            scrub.status.lock().checked = i as u64;
        }
    }
    plain.fill(0);
    // Name the logical blocks that map to the bad content blocks.
    let mut found = Vec::new();
    if !bad.is_empty() {
        let meta = zone.meta.lock();
        for (vid, name) in volumes {
            let Some(map) = meta.volumes.get(vid) else {
                continue;
            };
            for (lba, cbid) in map.mapped() {
                for (b, place, reason) in &bad {
                    if *b == cbid {
                        found.push(bad_block(name, lba, cbid, *place, reason));
                    }
                }
            }
        }
        for (b, place, reason) in &bad {
            if !found.iter().any(|f| f.cbid == b.0) {
                found.push(bad_block("", Lba(0), *b, *place, reason));
            }
        }
    }
    let mut st = scrub.status.lock();
    st.checked = copies.len() as u64;
    st.bad = found;
    st.running = false;
    st.finished_unix = Some(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    );
    drop(st);
    scrub.running.store(false, Ordering::Release);
}

fn bad_block(volume: &str, lba: Lba, cbid: Cbid, place: Place, reason: &str) -> BadBlock {
    BadBlock {
        volume: volume.into(),
        lba: lba.0,
        cbid: cbid.0,
        copy: match place {
            Place::Data => "data",
            Place::Staging => "staging",
        }
        .into(),
        reason: reason.into(),
    }
}

/// Starts a scrub of `zone` on its own thread (or reports the running one).
pub fn start(
    zone: Arc<Zone>,
    storage: Arc<Storage>,
    volumes: Vec<(crate::ids::VolumeId, String)>,
    scrub: Arc<Scrub>,
) -> ScrubStatus {
    if scrub.claim(&zone.name) {
        let s = scrub.clone();
        std::thread::Builder::new()
            .name("keyturn-scrub".into())
            .spawn(move || run(&zone, &storage, &volumes, &s))
            .expect("spawn a scrub");
    }
    scrub.status.lock().clone()
}
