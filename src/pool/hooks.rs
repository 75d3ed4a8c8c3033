//! The journal's commit hooks: data sync before a frame, stream
//! publication after it, and the checkpoint that copies changes into the
//! tables.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::RwLock;

use crate::ids::{JournalSeq, ZoneId};
use crate::store::Storage;
use crate::store::journal::{CheckpointJournal, CommitHooks, JournalError};
use crate::store::table::TableError;
use crate::zone::{CheckpointRun, Zone};

use super::Result;
use super::stream;

/// Changes a checkpoint copies into the tables per taking of a zone lock:
/// about half a millisecond of the lock.
const CHECKPOINT_BATCH: usize = 8192;

/// Journal hooks: what the committer needs from the pool.
pub(super) struct Hooks {
    pub(super) storage: Arc<Storage>,
    pub(super) zones: Arc<RwLock<BTreeMap<ZoneId, Arc<Zone>>>>,
    pub(super) streams: stream::Streams,
}

impl CommitHooks for Hooks {
    fn sync_data(&self) -> std::io::Result<()> {
        // Stream records and data both before the frame: a frame must not be
        // durable before the record of the write it maps (invariant 10).
        // The two flushes go to the device side by side rather than one
        // after the other.
        let streams: Vec<_> = self.streams.read().values().cloned().collect();
        if streams.is_empty() {
            return self.storage.sync_data();
        }
        std::thread::scope(|scope| {
            let data = scope.spawn(|| self.storage.sync_data());
            let records = streams
                .iter()
                .try_for_each(|s| s.sync().map_err(std::io::Error::other));
            let data = data
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the data device sync panicked")));
            records.and(data)
        })
    }

    fn durable(&self, seq: JournalSeq) {
        for s in self.streams.read().values() {
            s.durable(seq);
        }
        self.storage.slots.lock().release_durable(seq);
        if let Some(staging) = &self.storage.staging {
            staging.slots.lock().release_durable(seq);
        }
        for zone in self.zones.read().values() {
            zone.meta.lock().cbids.release_durable(seq);
        }
    }

    fn checkpoint(&self, journal: &mut dyn CheckpointJournal) -> Result<JournalSeq, JournalError> {
        let failed = |e: TableError| JournalError::Io {
            op: "checkpoint",
            message: e.to_string(),
        };
        // Writers stop only while the changes are set aside (a swap of maps
        // and a list of their keys per zone). Flushing under the locks, as
        // before, stopped every write for the data sync: 50-80 ms a
        // checkpoint under 4 KiB random writes.
        let started = std::time::Instant::now();
        let all = self.zones.read();
        let zones: Vec<Arc<Zone>> = all.values().cloned().collect();
        // Zone locks in id order stop every appender (appends happen under
        // them, with the in-memory change), so the last frame appended
        // covers every change in the overlays.
        let mut metas: Vec<_> = zones.iter().map(|z| z.meta.lock()).collect();
        let seq = journal.last_appended();
        let runs: Vec<CheckpointRun> = metas.iter_mut().map(|m| m.begin_checkpoint(seq)).collect();
        drop(metas);
        drop(all);
        let abandon = |from: usize| {
            for zone in &zones[from..] {
                zone.meta.lock().abandon_checkpoint();
            }
        };
        // The frames up to `seq` are durable before any of their changes
        // reach a table: the kernel may write a table page back at any time.
        if let Err(e) = journal.flush_through(seq) {
            abandon(0);
            return Err(e);
        }
        let flushed = started.elapsed();
        // Copying into the tables takes each zone's lock for a bounded
        // batch at a time (about half a million changes took 40 ms).
        let mut syncs = Vec::new();
        for (k, (zone, run)) in zones.iter().zip(runs).enumerate() {
            loop {
                let mut meta = zone.meta.lock();
                match meta.copy_checkpoint(CHECKPOINT_BATCH) {
                    Ok(true) => {
                        syncs.extend(meta.finish_checkpoint(run));
                        break;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        // This zone and the ones not reached keep their
                        // changes in the overlays.
                        drop(meta);
                        abandon(k);
                        return Err(failed(e));
                    }
                }
            }
        }
        let copied = started.elapsed();
        // Changes from here on go to the overlays, never to the tables, so
        // the syncs need no lock either.
        let tables = syncs.len();
        for table in syncs {
            table.sync().map_err(failed)?;
        }
        tracing::debug!(
            seq = seq.0,
            tables,
            ?flushed,
            ?copied,
            synced = ?started.elapsed(),
            "checkpoint copied and synced"
        );
        Ok(seq)
    }
}
