//! The pool's side of zone change streams: turning streaming on and off,
//! the key sets' wrapping under zone KEKs, agents and their grants,
//! shredding, a replica zone's applied position, and what the stream
//! transport reads from the pool.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use parking_lot::RwLock;
use zeroize::Zeroizing;

use super::{Pool, PoolError, Result};
use crate::audit::AuditEvent;
use crate::ids::{BLOCK_SIZE, JournalSeq, VolumeId, ZoneId};
use crate::keys::KeyError;
use crate::keys::approval::{Authorized, Operation, Target};
use crate::keys::root::RootKeyProvider;
use crate::keys::wrap::KeyLabel;
use crate::keys::zone_keys::ZoneKeyFile;
use crate::nbd::export::Export;
use crate::store::journal::Entry;
use crate::stream::grant::{Agent, Agents};
use crate::stream::keyset::{KeySets, SetInfo, SetWrapping};
use crate::stream::record::{WindowId, key_id};
use crate::stream::serve::{Blocks, Refused, StreamSource, VolumeDesc};
use crate::stream::{StreamStatus, ZoneStream};

/// The pool's streams by zone.
pub(crate) type Streams = Arc<RwLock<BTreeMap<ZoneId, Arc<ZoneStream>>>>;

/// Wraps set blobs with the zone's key file as it is on disk. No zone lock
/// is taken: a KEK rotation re-wraps sets under the set lock, which a set
/// creation holds from reading the key file to saving the set, so a set
/// wrapped under the old KEK is always there to be re-wrapped.
struct ZoneWrapping {
    path: std::path::PathBuf,
    provider: Arc<RwLock<Arc<dyn RootKeyProvider>>>,
}

impl SetWrapping for ZoneWrapping {
    fn wrap(
        &self,
        label: &KeyLabel,
        plain: &[u8],
    ) -> std::result::Result<(u32, Vec<u8>), KeyError> {
        let file = ZoneKeyFile::load(&self.path)?;
        let root = self.provider.read().clone();
        file.wrap_under_kek(root.as_ref(), label, plain)
    }

    fn unwrap(
        &self,
        kek: u32,
        label: &KeyLabel,
        wrapped: &[u8],
    ) -> std::result::Result<Zeroizing<Vec<u8>>, KeyError> {
        let file = ZoneKeyFile::load(&self.path)?;
        let root = self.provider.read().clone();
        file.unwrap_under_kek(root.as_ref(), kek, label, wrapped)
    }
}

/// Wraps with a key file in hand (a KEK rotation, under its zone lock).
pub(crate) struct KeyFileWrapping<'a> {
    pub(crate) file: &'a ZoneKeyFile,
    pub(crate) root: &'a dyn RootKeyProvider,
}

impl SetWrapping for KeyFileWrapping<'_> {
    fn wrap(
        &self,
        label: &KeyLabel,
        plain: &[u8],
    ) -> std::result::Result<(u32, Vec<u8>), KeyError> {
        self.file.wrap_under_kek(self.root, label, plain)
    }

    fn unwrap(
        &self,
        kek: u32,
        label: &KeyLabel,
        wrapped: &[u8],
    ) -> std::result::Result<Zeroizing<Vec<u8>>, KeyError> {
        self.file.unwrap_under_kek(self.root, kek, label, wrapped)
    }
}

impl Pool {
    fn wrapping_of(&self, zone: ZoneId) -> Arc<dyn SetWrapping> {
        Arc::new(ZoneWrapping {
            path: Self::zone_key_path(&self.dir, zone),
            provider: self.provider.clone(),
        })
    }

    fn open_stream(&self, zone: ZoneId, durable: JournalSeq) -> Result<Arc<ZoneStream>> {
        let z = self
            .zones
            .read()
            .get(&zone)
            .cloned()
            .ok_or_else(|| PoolError::NotFound {
                kind: "zone",
                name: zone.to_string(),
            })?;
        let settings = self.config().stream.clone();
        let stream = ZoneStream::open(
            &self.dir,
            zone,
            &z.name,
            &settings,
            durable,
            self.wrapping_of(zone),
        )
        .map_err(|e| PoolError::Layout(e.to_string()))?;
        *z.sink.write() = Some(stream.clone());
        self.streams.write().insert(zone, stream.clone());
        Ok(stream)
    }

    /// Opens the streams of streaming zones at pool open. Recovery replayed
    /// every journal frame up to `replayed` (above it, at most frames
    /// written ahead, which carry no record): records past it are cut.
    pub(crate) fn open_streams(&self, replayed: JournalSeq) -> Result<()> {
        let zones: Vec<ZoneId> = self
            .catalog
            .lock()
            .zones
            .iter()
            .filter(|z| z.stream)
            .map(|z| z.id)
            .collect();
        for zone in zones {
            self.open_stream(zone, replayed)?;
        }
        Ok(())
    }

    /// Stops every stream's writer after it has written what was queued.
    pub(crate) fn stop_streams(&self) {
        let streams: Vec<_> = std::mem::take(&mut *self.streams.write())
            .into_values()
            .collect();
        for s in streams {
            if let Some(z) = self.zones.read().get(&s.zone()) {
                *z.sink.write() = None;
            }
            s.stop();
        }
    }

    /// Audits the stream key sets destroyed at the end of their retention
    /// (the streams destroy them in their housekeeping; the pool holds the
    /// audit log).
    pub(crate) fn audit_destroyed_key_sets(&self) {
        let streams: Vec<_> = self.streams.read().values().cloned().collect();
        for s in streams {
            for set in s.take_destroyed_sets() {
                let ev = AuditEvent::ok("stream.keyset-destroy")
                    .zone(s.zone_name())
                    .key_id(format!("z{}-stream-s{set}", s.zone().0));
                if let Err(e) = self.record(ev) {
                    tracing::error!(zone = %s.zone_name(), set, error = %e, "stream key set destruction not audited");
                }
            }
        }
    }

    /// The stream of zone `zone`, if it streams.
    pub fn stream(&self, zone: &str) -> Option<Arc<ZoneStream>> {
        let id = self.zone_id(zone).ok()?;
        self.streams.read().get(&id).cloned()
    }

    fn stream_or_err(&self, zone: &str) -> Result<Arc<ZoneStream>> {
        self.zone_id(zone)?;
        self.stream(zone).ok_or_else(|| {
            PoolError::Conflict(format!(
                "zone {zone:?} does not stream; turn it on with `keyturn stream enable --zone {zone}`"
            ))
        })
    }

    /// Turns streaming on for a zone: from now on every write, trim and
    /// write-zeroes of its volumes is a record in its stream. Audited.
    pub fn enable_stream(&self, zone: &str) -> Result<StreamStatus> {
        let audit = self.audit()?;
        let r = (|| {
            let id = self.zone_id(zone)?;
            if let Some(s) = self.streams.read().get(&id) {
                return Ok(s.status());
            }
            {
                let mut catalog = self.catalog.lock();
                let mut next = catalog.clone();
                if let Some(z) = next.zones.iter_mut().find(|z| z.id == id) {
                    z.stream = true;
                }
                self.save_catalog(&next)?;
                *catalog = next;
            }
            // Everything before is history the stream never had.
            self.journal.commit_blocking(self.journal.last_appended())?;
            let stream = self.open_stream(id, self.journal.durable().seq)?;
            // The zone's volumes as they are now, for agents that start here.
            for v in self.catalog().volumes.iter().filter(|v| v.zone == id) {
                stream
                    .volume_changed(v.id, &v.name, Some(v.size))
                    .map_err(|e| PoolError::Layout(e.to_string()))?;
            }
            Ok(stream.status())
        })();
        let event = match &r {
            Ok(_) => AuditEvent::ok("stream.enable"),
            Err(e) => AuditEvent::failed("stream.enable", e),
        };
        Self::record_outcome(audit, vec![event.zone(zone)], "streaming was turned on", r)
    }

    /// Turns streaming off: records stop; the log and key sets stay until
    /// their retention ends. Audited.
    pub fn disable_stream(&self, zone: &str) -> Result<()> {
        let audit = self.audit()?;
        let r = (|| {
            let id = self.zone_id(zone)?;
            let stream = self.streams.write().remove(&id);
            if let Some(z) = self.zones.read().get(&id) {
                *z.sink.write() = None;
            }
            if let Some(s) = stream {
                s.stop();
            }
            let mut catalog = self.catalog.lock();
            let mut next = catalog.clone();
            if let Some(z) = next.zones.iter_mut().find(|z| z.id == id) {
                z.stream = false;
            }
            self.save_catalog(&next)?;
            *catalog = next;
            Ok(())
        })();
        let event = match &r {
            Ok(_) => AuditEvent::ok("stream.disable"),
            Err(e) => AuditEvent::failed("stream.disable", e),
        };
        Self::record_outcome(audit, vec![event.zone(zone)], "streaming was turned off", r)
    }

    /// A streaming zone's stream status.
    pub fn stream_status(&self, zone: &str) -> Result<StreamStatus> {
        Ok(self.stream_or_err(zone)?.status())
    }

    /// A zone's key sets and windows.
    pub fn stream_keys(&self, zone: &str) -> Result<Vec<SetInfo>> {
        let id = self.zone_id(zone)?;
        if let Some(s) = self.stream(zone) {
            return Ok(s.keys().lock().list());
        }
        let path = KeySets::path(&self.dir.join("keys"), id);
        if !path.exists() {
            return Ok(Vec::new());
        }
        let s = &self.config().stream;
        Ok(KeySets::open(
            &path,
            id,
            s.set_secs,
            s.window_secs,
            self.wrapping_of(id).as_ref(),
        )?
        .list())
    }

    fn agents(&self, zone: ZoneId) -> Result<Agents> {
        Agents::load(&ZoneStream::dir_of(&self.dir, zone))
            .map_err(|e| PoolError::Invalid(e.to_string()))
    }

    /// The agents registered for a zone.
    pub fn stream_agents(&self, zone: &str) -> Result<BTreeMap<String, Agent>> {
        Ok(self.agents(self.zone_id(zone)?)?.all().clone())
    }

    /// Registers an agent with its X25519 public key (hex) and a grant of
    /// the windows starting in `[from, to)` (unix seconds). Audited.
    pub fn grant_agent(
        &self,
        zone: &str,
        name: &str,
        public_key: &str,
        from: u64,
        to: Option<u64>,
    ) -> Result<()> {
        let audit = self.audit()?;
        let r = (|| {
            let id = self.zone_id(zone)?;
            std::fs::create_dir_all(ZoneStream::dir_of(&self.dir, id)).map_err(|e| {
                PoolError::Io {
                    path: ZoneStream::dir_of(&self.dir, id),
                    source: e,
                }
            })?;
            let mut agents = self.agents(id)?;
            agents
                .grant(
                    name,
                    Agent {
                        public_key: public_key.trim().to_ascii_lowercase(),
                        from_unix: from,
                        to_unix: to,
                        registered_unix: crate::stream::now_ms() / 1000,
                    },
                )
                .map_err(|e| PoolError::Invalid(e.to_string()))
        })();
        let event = match &r {
            Ok(_) => AuditEvent::ok("stream.grant"),
            Err(e) => AuditEvent::failed("stream.grant", e),
        };
        Self::record_outcome(
            audit,
            vec![event.zone(zone).actor(name)],
            "the grant was made",
            r,
        )
    }

    /// Removes an agent's registration (its acknowledgements no longer hold
    /// records back). Audited.
    pub fn revoke_agent(&self, zone: &str, name: &str) -> Result<()> {
        let audit = self.audit()?;
        let r = (|| {
            let id = self.zone_id(zone)?;
            self.agents(id)?
                .revoke(name)
                .map_err(|e| PoolError::NotFound {
                    kind: "agent",
                    name: e.to_string(),
                })?;
            if let Some(s) = self.stream(zone) {
                s.forget_consumer(name);
            }
            Ok(())
        })();
        let event = match &r {
            Ok(_) => AuditEvent::ok("stream.revoke"),
            Err(e) => AuditEvent::failed("stream.revoke", e),
        };
        Self::record_outcome(
            audit,
            vec![event.zone(zone).actor(name)],
            "the grant was revoked",
            r,
        )
    }

    /// Crypto-shreds window `w` of a zone's stream: its key is erased, and
    /// its records can never be opened again, here or at any agent that
    /// asks for the key from now on. Under dual control when the pool
    /// requires it (operation `shred-stream-window`, key = the window's key
    /// id). Audited.
    pub fn shred_window(&self, zone: &str, w: WindowId, auth: Option<Authorized>) -> Result<()> {
        let audit = self.audit()?;
        let id = self.zone_id(zone)?;
        let kid = key_id(id.0, w);
        let expected = Target::new(Operation::ShredStreamWindow, Some(zone), Some(&kid));
        let approvers = self.check_approval(&expected, auth.as_ref(), |e| {
            AuditEvent::refused("stream.shred", e)
                .zone(zone)
                .key_id(kid.clone())
        })?;
        let r = (|| {
            let wrapping = self.wrapping_of(id);
            let now = crate::stream::now_ms() / 1000;
            // A window that cannot be shredded (open, unknown) is the
            // caller's to fix: a conflict, not a server failure.
            let refused = |e: KeyError| match e {
                KeyError::InvalidKey { label, reason } => {
                    PoolError::Conflict(format!("window {label}: {reason}"))
                }
                e => e.into(),
            };
            match self.stream(zone) {
                Some(s) => s
                    .keys()
                    .lock()
                    .shred(w, now, wrapping.as_ref())
                    .map_err(refused)?,
                None => {
                    let path = KeySets::path(&self.dir.join("keys"), id);
                    let st = &self.config().stream;
                    KeySets::open(&path, id, st.set_secs, st.window_secs, wrapping.as_ref())?
                        .shred(w, now, wrapping.as_ref())
                        .map_err(refused)?
                }
            }
            Ok(())
        })();
        let event = match &r {
            Ok(_) => AuditEvent::ok("stream.shred"),
            Err(e) => AuditEvent::failed("stream.shred", e),
        };
        Self::record_outcome(
            audit,
            vec![event.zone(zone).key_id(kid).approvers(approvers)],
            "the window was shredded",
            r,
        )
    }

    /// Re-wraps a zone's stream key sets under the newest KEK of `file`
    /// (a KEK rotation, before the old KEK is destroyed).
    pub(crate) fn rewrap_stream_sets(
        &self,
        zone: ZoneId,
        file: &ZoneKeyFile,
        root: &dyn RootKeyProvider,
    ) -> Result<usize> {
        let w = KeyFileWrapping { file, root };
        if let Some(s) = self.streams.read().get(&zone).cloned() {
            return Ok(s.keys().lock().rewrap(&w)?);
        }
        let path = KeySets::path(&self.dir.join("keys"), zone);
        if !path.exists() {
            return Ok(0);
        }
        let st = &self.config().stream;
        Ok(KeySets::open(&path, zone, st.set_secs, st.window_secs, &w)?.rewrap(&w)?)
    }

    /// Tells a zone's stream that a volume was created (`size`) or deleted.
    pub(crate) fn stream_volume_changed(
        &self,
        zone: ZoneId,
        id: VolumeId,
        name: &str,
        size: Option<u64>,
    ) {
        let Some(stream) = self.streams.read().get(&zone).cloned() else {
            return;
        };
        let r = self
            .journal
            .commit_blocking(self.journal.last_appended())
            .map_err(|e| e.to_string())
            .and_then(|()| {
                stream
                    .volume_changed(id, name, size)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = r {
            tracing::error!(zone = %stream.zone_name(), volume = name, error = %e, "stream: volume change not recorded");
        }
    }

    /// A replica zone's applied source stream position.
    pub fn applied(&self, zone: &str) -> Result<u64> {
        let id = self.zone_id(zone)?;
        Ok(self.zones.read()[&id].meta.lock().applied)
    }

    /// Journals a replica zone's applied position alone (for records that
    /// change no block: volume creation and deletion), durably.
    pub fn mark_applied(&self, zone: &str, seq: u64) -> Result<()> {
        let id = self.zone_id(zone)?;
        let z = self.zones.read()[&id].clone();
        let jseq = {
            let mut meta = z.meta.lock();
            meta.applied = meta.applied.max(seq);
            self.journal.append(id, &[Entry::Applied { zone: id, seq }])
        };
        self.journal.commit_blocking(jseq)?;
        Ok(())
    }
}

/// The pool as the stream transport sees it.
pub struct PoolStreams(pub Arc<Pool>);

impl StreamSource for PoolStreams {
    fn stream(&self, zone: &str) -> Option<Arc<ZoneStream>> {
        self.0.stream(zone)
    }

    fn agent(&self, zone: &str, name: &str) -> Option<Agent> {
        let id = self.0.zone_id(zone).ok()?;
        self.0.agents(id).ok()?.get(name).cloned()
    }

    fn volumes(&self, zone: &str) -> Vec<VolumeDesc> {
        let Ok(id) = self.0.zone_id(zone) else {
            return Vec::new();
        };
        self.0
            .catalog()
            .volumes
            .iter()
            .filter(|v| v.zone == id && v.state == super::VolumeState::Active)
            .map(|v| VolumeDesc {
                id: v.id.0,
                name: v.name.clone(),
                size: v.size,
            })
            .collect()
    }

    fn read_blocks<'a>(
        &'a self,
        zone: &'a str,
        volume: u32,
        first: u64,
        count: u32,
    ) -> Pin<Box<dyn Future<Output = std::result::Result<Blocks, String>> + Send + 'a>> {
        Box::pin(async move {
            let id = self.0.zone_id(zone).map_err(|e| e.to_string())?;
            let entry = self
                .0
                .catalog()
                .volumes
                .into_iter()
                .find(|v| v.id.0 == volume && v.zone == id)
                .ok_or_else(|| format!("zone {zone:?} has no volume {volume}"))?;
            let vol = crate::nbd::export::ExportCatalog::open(self.0.as_ref(), &entry.name)
                .ok_or_else(|| format!("volume {} is not served", entry.name))?;
            let blocks = entry.size / BLOCK_SIZE as u64;
            if first >= blocks {
                return Err(format!(
                    "block {first} is past the end of volume {}",
                    entry.name
                ));
            }
            let n = u64::from(count).min(blocks - first) as usize;
            let mut plain = crate::crypto::wipe::Wiped::from(vec![0u8; n * BLOCK_SIZE]);
            vol.read(first * BLOCK_SIZE as u64, &mut plain)
                .await
                .map_err(|e| format!("reading {}: {e}", entry.name))?;
            let tagger = vol.zone().crypto();
            let tags = plain
                .chunks(BLOCK_SIZE)
                .map(|b| b.iter().any(|&x| x != 0).then(|| tagger.tagger().tag(b)))
                .collect();
            Ok((tags, plain))
        })
    }

    fn streaming_zones(&self) -> Vec<String> {
        let ids: Vec<_> = self.0.streams.read().keys().copied().collect();
        self.0
            .catalog()
            .zones
            .iter()
            .filter(|z| ids.contains(&z.id))
            .map(|z| z.name.clone())
            .collect()
    }

    fn audit_keys(&self, zone: &str, agent: &str, given: &[String], refused: &[Refused]) {
        for k in given {
            let _ = self.0.record(
                AuditEvent::ok("stream.key-handout")
                    .zone(zone)
                    .actor(agent)
                    .key_id(k.clone()),
            );
        }
        for r in refused {
            let _ = self.0.record(
                AuditEvent::refused("stream.key-handout", &r.reason)
                    .zone(zone)
                    .actor(agent)
                    .key_id(r.key_id.clone()),
            );
        }
    }
}
