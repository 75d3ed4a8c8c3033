//! Zones and volumes of the catalog: creating, deleting, dedup, usage, and
//! the volumes as NBD exports.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use crate::audit::AuditEvent;
use crate::ids::{BLOCK_SIZE, VolumeId, ZoneId};
use crate::keys::zone_keys::ZoneKeyFile;
use crate::nbd::export::{ExportCatalog, ExportInfo};
use crate::volume::Volume;
use crate::zone::{VolumeMap, ZoneMeta};

use super::{Pool, PoolError, Result, VolumeEntry, VolumeState, ZoneEntry, validate_name};

impl Pool {
    /// The `Volume` of a catalog entry (its zone is checked at open).
    fn volume_for(&self, v: &VolumeEntry) -> Volume {
        let zone = self
            .zones
            .read()
            .get(&v.zone)
            .cloned()
            .expect("volume zones are checked at open");
        Volume::new(
            v.id,
            v.name.clone(),
            v.size,
            zone,
            self.storage.clone(),
            self.journal.clone(),
        )
    }

    pub(super) fn attach_volume(&self, v: &VolumeEntry) {
        let vol = self.volume_for(v);
        self.volumes.write().insert(v.name.clone(), Arc::new(vol));
    }

    /// Turns dedup on or off for a zone's new writes (blocks already shared
    /// stay shared). Recorded in the audit log.
    pub fn set_zone_dedup(&self, name: &str, on: bool) -> Result<()> {
        let audit = self.audit()?;
        let id = self.zone_id(name)?;
        let r = (|| {
            let mut catalog = self.catalog.lock();
            let mut next = catalog.clone();
            if let Some(z) = next.zones.iter_mut().find(|z| z.id == id) {
                z.dedup = on;
            }
            self.save_catalog(&next)?;
            *catalog = next;
            if let Some(z) = self.zones.read().get(&id) {
                z.meta.lock().set_dedup(on);
            }
            Ok(())
        })();
        let event = match &r {
            Ok(()) => AuditEvent::ok(if on {
                "zone.dedup.on"
            } else {
                "zone.dedup.off"
            }),
            Err(e) => AuditEvent::failed(
                if on {
                    "zone.dedup.on"
                } else {
                    "zone.dedup.off"
                },
                e,
            ),
        }
        .zone(name);
        Self::record_outcome(audit, vec![event], "dedup was changed", r)
    }

    /// Creates a zone with a fresh key chain, and records `zone.create` and a
    /// `key.create` for each of its keys. Refused while the audit log cannot
    /// take records.
    pub fn create_zone(&self, name: &str) -> Result<ZoneId> {
        let audit = self.audit()?;
        let started = Instant::now();
        let r = self.create_zone_unaudited(name);
        let events = match &r {
            Ok(id) => {
                // The key ids come from the file just written: what is recorded
                // is what is stored.
                let records = ZoneKeyFile::load(&Self::zone_key_path(&self.dir, *id))
                    .map(|f| f.records().to_vec())
                    .unwrap_or_default();
                let mut events = vec![
                    AuditEvent::ok("zone.create")
                        .zone(name)
                        .count(records.len() as u64)
                        .duration(started.elapsed()),
                ];
                events.extend(
                    records
                        .iter()
                        .map(|k| AuditEvent::ok("key.create").zone(name).key(&k.label())),
                );
                events
            }
            Err(e) => vec![
                AuditEvent::failed("zone.create", e)
                    .zone(name)
                    .duration(started.elapsed()),
            ],
        };
        Self::record_outcome(audit, events, &format!("zone {name:?} was created"), r)
    }

    fn create_zone_unaudited(&self, name: &str) -> Result<ZoneId> {
        validate_name("zone", name)?;
        let mut catalog = self.catalog.lock();
        if catalog.zones.iter().any(|z| z.name == name) {
            return Err(PoolError::Exists {
                kind: "zone",
                name: name.into(),
            });
        }
        let id = ZoneId(catalog.next_zone);
        // Under the catalog lock: the provider cannot be replaced meanwhile.
        let root = self.root();
        let keyfile = ZoneKeyFile::create(root.as_ref(), id, name)?;
        let kpath = Self::zone_key_path(&self.dir, id);
        let tpath = Self::cb_table_path(&self.dir, id);
        // Leftovers of a create that crashed before the catalog named them.
        let _ = std::fs::remove_file(&kpath);
        let _ = std::fs::remove_file(&tpath);
        keyfile.save(&kpath)?;
        ZoneMeta::open(&tpath, true)?;
        let entry = ZoneEntry {
            dedup: true,
            stream: false,
            id,
            name: name.into(),
        };
        let zone = Self::load_zone(&self.dir, &entry, root.as_ref())?;
        let mut next = catalog.clone();
        next.next_zone += 1;
        next.zones.push(entry);
        self.save_catalog(&next)?;
        *catalog = next;
        let zone = Arc::new(zone);
        self.zones.write().insert(id, zone.clone());
        self.register_rotation(zone);
        tracing::info!(zone = name, id = id.0, "zone created");
        Ok(id)
    }

    /// Creates a volume of `size` bytes (a multiple of 4096) in zone `zone`,
    /// and records `volume.create` (its `count`: the size in 4 KiB blocks).
    pub fn create_volume(&self, name: &str, zone: &str, size: u64) -> Result<VolumeId> {
        let audit = self.audit()?;
        let started = Instant::now();
        let r = self.create_volume_unaudited(name, zone, size);
        let event = match &r {
            Ok(_) => AuditEvent::ok("volume.create").count(size / BLOCK_SIZE as u64),
            Err(e) => AuditEvent::failed("volume.create", e),
        };
        let event = event.zone(zone).volume(name).duration(started.elapsed());
        Self::record_outcome(
            audit,
            vec![event],
            &format!("volume {name:?} was created"),
            r,
        )
    }

    fn create_volume_unaudited(&self, name: &str, zone: &str, size: u64) -> Result<VolumeId> {
        validate_name("volume", name)?;
        if size == 0 || !size.is_multiple_of(BLOCK_SIZE as u64) {
            return Err(PoolError::Invalid(format!(
                "volume size {size} must be a positive multiple of 4096 bytes"
            )));
        }
        if size > 1 << 50 {
            return Err(PoolError::Invalid(format!(
                "volume size {size} is over the 1 PiB limit"
            )));
        }
        let mut catalog = self.catalog.lock();
        if catalog.volumes.iter().any(|v| v.name == name) {
            return Err(PoolError::Exists {
                kind: "volume",
                name: name.into(),
            });
        }
        let zone_id = catalog
            .zones
            .iter()
            .find(|z| z.name == zone)
            .map(|z| z.id)
            .ok_or_else(|| PoolError::NotFound {
                kind: "zone",
                name: zone.into(),
            })?;
        let id = VolumeId(catalog.next_volume);
        let mpath = Self::map_path(&self.dir, id);
        let _ = std::fs::remove_file(&mpath);
        let map = VolumeMap::open(&mpath, size / BLOCK_SIZE as u64, true)?;
        let entry = VolumeEntry {
            id,
            name: name.into(),
            zone: zone_id,
            size,
            state: VolumeState::Active,
        };
        let mut next = catalog.clone();
        next.next_volume += 1;
        next.volumes.push(entry.clone());
        self.save_catalog(&next)?;
        *catalog = next;
        drop(catalog);
        self.zones.read()[&zone_id]
            .meta
            .lock()
            .volumes
            .insert(id, map);
        self.attach_volume(&entry);
        self.stream_volume_changed(zone_id, id, name, Some(size));
        tracing::info!(volume = name, zone, size, "volume created");
        Ok(id)
    }

    /// Deletes a volume and frees its space, and records `volume.delete`.
    /// Refuses while it is served.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let audit = self.audit()?;
        let started = Instant::now();
        let r = self.delete_volume_unaudited(name);
        let event = match &r {
            Ok(()) => AuditEvent::ok("volume.delete"),
            Err(e) => AuditEvent::failed("volume.delete", e),
        };
        let event = event.volume(name).duration(started.elapsed());
        Self::record_outcome(
            audit,
            vec![event],
            &format!("volume {name:?} was deleted"),
            r,
        )
    }

    fn delete_volume_unaudited(&self, name: &str) -> Result<()> {
        let mut volumes = self.volumes.write();
        let vol = volumes.get(name).ok_or_else(|| PoolError::NotFound {
            kind: "volume",
            name: name.into(),
        })?;
        if Arc::strong_count(vol) > 1 {
            return Err(PoolError::Busy(name.into()));
        }
        volumes.remove(name);
        drop(volumes);
        let entry = {
            let mut catalog = self.catalog.lock();
            let mut next = catalog.clone();
            let v = next
                .volumes
                .iter_mut()
                .find(|v| v.name == name)
                .expect("catalog and volumes agree");
            v.state = VolumeState::Deleting;
            let entry = v.clone();
            self.save_catalog(&next)?;
            *catalog = next;
            entry
        };
        self.finish_delete(&entry)
    }

    /// Frees every block of a volume marked deleting, then drops it from the catalog.
    pub(super) fn finish_delete(&self, v: &VolumeEntry) -> Result<()> {
        // A volume object for the one being deleted: unmapping goes through
        // the same path as TRIM, so refcounts and frees are journaled alike.
        let doomed = self.volume_for(v);
        let zone = doomed.zone().clone();
        let last = doomed
            .unmap_everything()
            .map_err(|e| PoolError::Layout(format!("cannot free volume {}: {e}", v.name)))?;
        if let Some(seq) = last {
            self.journal.commit_blocking(seq)?;
        }
        let mut catalog = self.catalog.lock();
        let mut next = catalog.clone();
        next.volumes.retain(|e| e.id != v.id);
        self.save_catalog(&next)?;
        *catalog = next;
        drop(catalog);
        zone.meta.lock().volumes.remove(&v.id);
        let mpath = Self::map_path(&self.dir, v.id);
        let _ = std::fs::remove_file(&mpath);
        self.stream_volume_changed(v.zone, v.id, &v.name, None);
        tracing::info!(volume = %v.name, "volume deleted");
        Ok(())
    }

    /// A zone's id by name.
    pub(crate) fn zone_id(&self, name: &str) -> Result<ZoneId> {
        self.catalog
            .lock()
            .zones
            .iter()
            .find(|z| z.name == name)
            .map(|z| z.id)
            .ok_or_else(|| PoolError::NotFound {
                kind: "zone",
                name: name.into(),
            })
    }

    /// Every zone, with its dedup setting and how many volumes it holds.
    pub fn zone_infos(&self) -> Vec<crate::admin::ZoneInfo> {
        let catalog = self.catalog.lock();
        catalog
            .zones
            .iter()
            .map(|z| crate::admin::ZoneInfo {
                id: u64::from(z.id.0),
                name: z.name.clone(),
                dedup: z.dedup,
                volumes: catalog.volumes.iter().filter(|v| v.zone == z.id).count() as u64,
            })
            .collect()
    }

    /// Mapped blocks of every volume, by name.
    pub fn volume_usage(&self) -> BTreeMap<String, u64> {
        let catalog = self.catalog.lock().clone();
        let zones = self.zones.read();
        catalog
            .volumes
            .iter()
            .filter_map(|v| {
                let meta = zones.get(&v.zone)?.meta.lock();
                Some((
                    v.name.clone(),
                    meta.volumes.get(&v.id)?.mapped().len() as u64,
                ))
            })
            .collect()
    }
}

/// The pool's volumes, as NBD exports.
impl ExportCatalog for Pool {
    type Export = Volume;

    fn list(&self) -> Vec<ExportInfo> {
        let catalog = self.catalog.lock();
        self.volumes
            .read()
            .values()
            .map(|v| {
                let zone = catalog.zones.iter().find(|z| {
                    Some(z.id)
                        == catalog
                            .volumes
                            .iter()
                            .find(|e| e.id == v.id)
                            .map(|e| e.zone)
                });
                ExportInfo {
                    name: v.name.clone(),
                    description: format!(
                        "keyturn volume in zone {}",
                        zone.map_or("?", |z| z.name.as_str())
                    ),
                }
            })
            .collect()
    }

    fn open(&self, name: &str) -> Option<Arc<Volume>> {
        self.volumes.read().get(name).cloned()
    }
}
