//! Per-block provenance for auditors: which content block a logical block
//! maps to, which key protects it and since when, and the stream record
//! that last wrote it.

use serde::Serialize;

use super::{Pool, PoolError, Result};
use crate::ids::{BLOCK_SIZE, Lba};
use crate::keys::wrap::Purpose;
use crate::store::journal::Place;
use crate::stream::record::{self, Body, WindowId};

/// Records the stream scan reads at most, newest first.
const SCAN_RECORDS: u64 = 1 << 16;

/// What `block show` answers.
#[derive(Clone, Debug, Serialize)]
pub struct BlockInfo {
    /// Volume.
    pub volume: String,
    /// Zone.
    pub zone: String,
    /// Logical block.
    pub lba: u64,
    /// Whether the block maps to a content block (unmapped blocks read as zeros).
    pub mapped: bool,
    /// Content block id (the XTS tweak).
    pub cbid: Option<u64>,
    /// Logical blocks sharing the content block (dedup).
    pub refcount: Option<u32>,
    /// Keyed BLAKE3 tag of the plaintext, hex.
    pub tag: Option<String>,
    /// The DEK version of the data-device copy, and its key id.
    pub dek_version: Option<u32>,
    /// Key id of that DEK.
    pub dek_key_id: Option<String>,
    /// The key's state now.
    pub dek_state: Option<String>,
    /// When that DEK became active, unix seconds.
    pub dek_active_since_unix: Option<u64>,
    /// A staged copy under the next key: its DEK version.
    pub staged_version: Option<u32>,
    /// Where reads are served from: "data" or "staging", and that copy's DEK version.
    pub live_copy: Option<(String, u32)>,
    /// The stream record that last changed this block, if the zone streams
    /// and it is among the newest records kept.
    pub stream_record: Option<u64>,
    /// Its operation.
    pub stream_op: Option<String>,
    /// Its time, unix ms.
    pub stream_time_ms: Option<u64>,
    /// The window key that sealed it.
    pub stream_window_key: Option<String>,
    /// How many stream records were read to find it.
    pub stream_records_scanned: u64,
}

impl Pool {
    /// Provenance of logical block `lba` of `volume`.
    pub fn block_info(&self, volume: &str, lba: u64) -> Result<BlockInfo> {
        let entry = self
            .catalog()
            .volumes
            .into_iter()
            .find(|v| v.name == volume)
            .ok_or_else(|| PoolError::NotFound {
                kind: "volume",
                name: volume.into(),
            })?;
        let blocks = entry.size / BLOCK_SIZE as u64;
        if lba >= blocks {
            return Err(PoolError::Invalid(format!(
                "block {lba} is past the end of volume {volume} ({blocks} blocks)"
            )));
        }
        let zone =
            self.zones
                .read()
                .get(&entry.zone)
                .cloned()
                .ok_or_else(|| PoolError::NotFound {
                    kind: "zone",
                    name: entry.zone.to_string(),
                })?;
        let (cbid, record, live) = {
            let meta = zone.meta.lock();
            let cbid = meta.volumes.get(&entry.id).and_then(|m| m.get(Lba(lba)));
            let record = cbid.and_then(|c| meta.cb(c));
            let live = record.map(|r| meta.live(&r));
            (cbid, record, live)
        };
        let mut info = BlockInfo {
            volume: volume.into(),
            zone: zone.name.clone(),
            lba,
            mapped: cbid.is_some(),
            cbid: cbid.map(|c| c.0),
            refcount: record.map(|r| r.refcount),
            tag: record.map(|r| r.tag.0.iter().map(|b| format!("{b:02x}")).collect()),
            dek_version: record.map(|r| r.key_version.0),
            dek_key_id: None,
            dek_state: None,
            dek_active_since_unix: None,
            staged_version: record.and_then(|r| r.staged.map(|s| s.key_version.0)),
            live_copy: live.map(|l| {
                let place = match l.place {
                    Place::Data => "data",
                    Place::Staging => "staging",
                };
                (place.to_string(), l.key_version.0)
            }),
            stream_record: None,
            stream_op: None,
            stream_time_ms: None,
            stream_window_key: None,
            stream_records_scanned: 0,
        };
        if let Some(v) = live.map(|l| l.key_version.0)
            && let Ok(file) = crate::keys::zone_keys::ZoneKeyFile::load(&Self::zone_key_path(
                &self.dir, entry.zone,
            ))
            && let Some(k) = file
                .records()
                .iter()
                .find(|k| k.purpose == Purpose::Dek && k.version == v)
        {
            info.dek_key_id = Some(k.id.clone());
            info.dek_state = Some(k.state.name().to_string());
            info.dek_active_since_unix = k.activated_unix;
        }
        if let Some(stream) = self.streams.read().get(&entry.zone).cloned() {
            let last = stream.last_visible();
            let first = stream.first_kept().max(last.saturating_sub(SCAN_RECORDS));
            // Newest first, a batch at a time.
            let mut hi = last;
            'scan: while hi >= first && hi > 0 {
                let lo = hi.saturating_sub(4095).max(first);
                let recs = stream
                    .read(lo, hi, usize::MAX)
                    .map_err(|e| PoolError::Layout(e.to_string()))?;
                for bytes in recs.into_iter().rev() {
                    info.stream_records_scanned += 1;
                    let Ok(r) = record::decode(bytes) else {
                        continue;
                    };
                    if r.header.volume != entry.id {
                        continue;
                    }
                    let hit = match &r.body {
                        Body::Write(b) => {
                            lba >= r.header.lba.0 && lba < r.header.lba.0 + b.len() as u64
                        }
                        Body::Unmap(runs) => runs
                            .iter()
                            .any(|(l, n)| lba >= l.0 && lba < l.0 + u64::from(*n)),
                        _ => false,
                    };
                    if hit {
                        let w: WindowId = r.header.window;
                        info.stream_record = Some(r.header.seq);
                        info.stream_op = Some(r.header.op.name().into());
                        info.stream_time_ms = Some(r.header.time_ms);
                        info.stream_window_key = Some(record::key_id(entry.zone.0, w));
                        break 'scan;
                    }
                }
                if lo == first || lo == 0 {
                    break;
                }
                hi = lo - 1;
            }
        }
        Ok(info)
    }
}
