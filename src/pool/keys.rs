//! Operator actions on zone keys: KEK rotation, destroying or marking a
//! key compromised, and the dual-control check they share.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::audit::AuditEvent;
use crate::ids::{KeyVersion, ZoneId};
use crate::keys::approval::{ApprovalError, Authorized, Operation, Target};
use crate::keys::wrap::{KeyLabel, Purpose};
use crate::keys::zone_keys::{BlockUsage, KeyState, ZoneKeyFile};

use super::{Pool, PoolError, Result};

/// What [`Pool::rotate_kek`] did.
#[derive(Debug, Serialize)]
pub struct KekRotationReport {
    /// Zone name.
    pub zone: String,
    /// The new KEK version.
    pub new_version: u32,
    /// Keys re-wrapped in this run.
    pub rewrapped: usize,
    /// Old KEK ids destroyed.
    pub destroyed: Vec<String>,
    /// Whether an interrupted rotation was resumed.
    pub resumed: bool,
    /// Wall time.
    pub elapsed: Duration,
}

/// Block counts per DEK version of one zone, as the key layer asks for them.
struct ZoneUsage(BTreeMap<KeyVersion, u64>);

impl BlockUsage for ZoneUsage {
    fn blocks_under(&self, _zone: ZoneId, version: KeyVersion) -> u64 {
        self.0.get(&version).copied().unwrap_or(0)
    }
}

impl Pool {
    /// Every zone's key file, by zone name.
    pub fn key_files(&self) -> Result<Vec<(String, ZoneKeyFile)>> {
        let zones = self.catalog.lock().zones.clone();
        zones
            .iter()
            .map(|z| {
                Ok((
                    z.name.clone(),
                    ZoneKeyFile::load(&Self::zone_key_path(&self.dir, z.id))?,
                ))
            })
            .collect()
    }

    /// The zone name and key file that hold key `key_id`.
    pub fn key_file_of(&self, key_id: &str) -> Result<(String, ZoneKeyFile)> {
        self.key_files()?
            .into_iter()
            .find(|(_, f)| f.records().iter().any(|r| r.id == key_id))
            .ok_or_else(|| PoolError::NotFound {
                kind: "key",
                name: key_id.into(),
            })
    }

    /// Content blocks per DEK version in `zone`, from the block map.
    pub fn blocks_per_key(&self, zone: ZoneId) -> BTreeMap<KeyVersion, u64> {
        let mut out = BTreeMap::new();
        if let Some(z) = self.zones.read().get(&zone) {
            let mut meta = z.meta.lock();
            let active = meta.active;
            for (&(data, staged), &n) in meta.census() {
                // A block counts under the key of its live copy.
                let live = staged.filter(|s| *s <= active).unwrap_or(data);
                *out.entry(live).or_default() += n;
            }
        }
        out
    }

    /// Rotates a zone's KEK: makes KEK v(n+1) and re-wraps every DEK and
    /// the MAC key under it, `batch` keys per atomic save with `pause`
    /// between saves, then retires and destroys the old KEK. Resumes a
    /// rotation a crash interrupted. Volume data and the block map are not
    /// touched: only wrapped keys change.
    ///
    /// Refused when the pool requires dual control: use
    /// [`Pool::rotate_kek_approved`] then.
    pub fn rotate_kek(
        &self,
        zone: &str,
        batch: usize,
        pause: Duration,
    ) -> Result<KekRotationReport> {
        let policy = self.config().dual_control.clone();
        if policy.required {
            let e = ApprovalError::NotEnough {
                got: 0,
                required: policy.approvals,
            };
            let _ = self.record(AuditEvent::refused("kek.rotate", &e).zone(zone));
            return Err(e.into());
        }
        self.rotate_kek_audited(zone, batch, pause, Vec::new())
    }

    /// [`Pool::rotate_kek`] under dual control: `auth` (from
    /// [`crate::keys::approval::authorize`]) must approve a KEK rotation of
    /// exactly this zone. Works on pools without dual control too. The
    /// approvers are recorded in the audit log.
    pub fn rotate_kek_approved(
        &self,
        zone: &str,
        batch: usize,
        pause: Duration,
        auth: Authorized,
    ) -> Result<KekRotationReport> {
        let expected = Target::new(Operation::RotateKek, Some(zone), None);
        if *auth.target() != expected {
            let e = ApprovalError::WrongRequest {
                operator: auth.approvers().join(","),
                approved: auth.target().to_string(),
                expected: expected.to_string(),
            };
            let _ = self.record(
                AuditEvent::refused("kek.rotate", &e)
                    .zone(zone)
                    .approvers(auth.approvers()),
            );
            return Err(e.into());
        }
        tracing::info!(zone, approvers = ?auth.approvers(), nonce = auth.nonce(), "KEK rotation approved");
        self.rotate_kek_audited(zone, batch, pause, auth.approvers().to_vec())
    }

    fn rotate_kek_audited(
        &self,
        zone: &str,
        batch: usize,
        pause: Duration,
        approvers: Vec<String>,
    ) -> Result<KekRotationReport> {
        let audit = self.audit()?;
        let started = Instant::now();
        let r = self.rotate_kek_unaudited(zone, batch, pause);
        let events = match &r {
            Ok(report) => {
                let mut events = vec![
                    AuditEvent::ok("kek.rotate")
                        .zone(zone)
                        .approvers(approvers.iter())
                        .key(&KeyLabel::new(
                            self.zone_id(zone)?,
                            Purpose::Kek,
                            report.new_version,
                        ))
                        .count(report.rewrapped as u64)
                        .duration(started.elapsed()),
                ];
                let zone_id = self.zone_id(zone)?;
                for id in &report.destroyed {
                    // Ids are made by `KeyLabel::new`: "z{zone}-kek-v{version}".
                    if let Some(v) = id.rsplit_once("-v").and_then(|(_, v)| v.parse().ok()) {
                        events.push(AuditEvent::ok("key.destroy").zone(zone).key(&KeyLabel::new(
                            zone_id,
                            Purpose::Kek,
                            v,
                        )));
                    }
                }
                events
            }
            Err(e) => vec![
                AuditEvent::failed("kek.rotate", e)
                    .zone(zone)
                    .approvers(approvers.iter())
                    .duration(started.elapsed()),
            ],
        };
        Self::record_outcome(audit, events, "the KEK was rotated", r)
    }

    fn rotate_kek_unaudited(
        &self,
        zone: &str,
        batch: usize,
        pause: Duration,
    ) -> Result<KekRotationReport> {
        let started = std::time::Instant::now();
        let id = self.zone_id(zone)?;
        let z = self.zones.read().get(&id).cloned();
        // One key-file writer at a time (a DEK rotation may run beside this).
        let _k = z.as_ref().map(|z| z.key_file_lock.lock());
        // Read under the lock: a root key rotation cannot replace it until
        // this KEK rotation is done.
        let root = self.root();
        let path = Self::zone_key_path(&self.dir, id);
        let mut file = ZoneKeyFile::load(&path)?;
        let resumed = file.kek_rotation().is_some();
        let first = file.begin_kek_rotation(root.as_ref())?;
        file.save(&path)?;
        let mut rewrapped = 0;
        let mut remaining = first.remaining;
        while remaining > 0 {
            let progress = file.rewrap_batch(root.as_ref(), batch.max(1))?;
            rewrapped += remaining - progress.remaining;
            remaining = progress.remaining;
            file.save(&path)?;
            if remaining > 0 && !pause.is_zero() {
                std::thread::sleep(pause);
            }
        }
        // Stream key sets are wrapped under the zone's KEK too.
        let sets = self.rewrap_stream_sets(id, &file, root.as_ref())?;
        let usage = ZoneUsage(self.blocks_per_key(id));
        let destroyed = file.finish_kek_rotation(&usage)?;
        file.save(&path)?;
        tracing::info!(
            zone,
            new_kek = first.new_version,
            rewrapped,
            stream_sets = sets,
            ?destroyed,
            resumed,
            "KEK rotated"
        );
        Ok(KekRotationReport {
            zone: zone.into(),
            new_version: first.new_version,
            rewrapped,
            destroyed,
            resumed,
            elapsed: started.elapsed(),
        })
    }

    /// Moves key `key_id` to `state` (destroyed or compromised, the two
    /// operations dual control guards): checked against SP 800-57 and the
    /// key chain's rules, a DEK destroyed only when the block map has no
    /// content block under it, and recorded in the audit log with its
    /// approvers. `auth` must approve exactly this operation on this key when
    /// the pool requires dual control. Returns the key's zone name.
    pub fn set_key_state(
        &self,
        key_id: &str,
        state: KeyState,
        auth: Option<Authorized>,
    ) -> Result<String> {
        let (action, operation) = match state {
            KeyState::Destroyed => ("key.destroy", Operation::DestroyKey),
            KeyState::Compromised => ("key.compromise", Operation::CompromiseKey),
            other => {
                return Err(PoolError::Invalid(format!(
                    "only destroy and compromise are operator commands; {} is reached through a rotation",
                    other.name()
                )));
            }
        };
        let audit = self.audit()?;
        let (zone_name, file) = self.key_file_of(key_id)?;
        let label = file
            .records()
            .iter()
            .find(|r| r.id == key_id)
            .map(|r| r.label())
            .expect("found above");
        let approvers: Vec<String> = auth
            .as_ref()
            .map(|a| a.approvers().to_vec())
            .unwrap_or_default();
        let expected = Target::new(operation, Some(&zone_name), Some(key_id));
        self.check_approval(&expected, auth.as_ref(), |e| {
            AuditEvent::refused(action, e).zone(&zone_name).key(&label)
        })?;
        let started = Instant::now();
        let zone = self.zones.read().get(&file.zone()).cloned();
        // One key-file writer at a time; loaded again under the lock, as a
        // KEK or root key rotation may have saved the file since.
        let _k = zone.as_ref().map(|z| z.key_file_lock.lock());
        let path = Self::zone_key_path(&self.dir, file.zone());
        // Every copy counts, not just live ones: a data copy behind a
        // staged one is still ciphertext under its key.
        let usage = ZoneUsage(
            zone.as_ref()
                .map(|z| self.key_references(z))
                .unwrap_or_default(),
        );
        let r = (|| {
            let mut file = ZoneKeyFile::load(&path)?;
            file.set_state(key_id, state, &usage)?;
            file.save(&path)
        })()
        .map(|()| zone_name.clone())
        .map_err(PoolError::from);
        let event = match &r {
            Ok(_) => AuditEvent::ok(action),
            Err(e) => AuditEvent::failed(action, e),
        }
        .zone(&zone_name)
        .key(&label)
        .approvers(approvers.iter())
        .duration(started.elapsed());
        Self::record_outcome(audit, vec![event], "the key state changed", r)
    }

    /// Checks that `auth` approves exactly `expected` when the pool needs
    /// dual control (any approval given must match, required or not).
    /// A refusal is recorded as `refused(error)` with the approvers, and
    /// returned. Returns the approvers.
    pub(crate) fn check_approval(
        &self,
        expected: &Target,
        auth: Option<&Authorized>,
        refused: impl FnOnce(&ApprovalError) -> AuditEvent,
    ) -> Result<Vec<String>> {
        let approvers: Vec<String> = auth.map(|a| a.approvers().to_vec()).unwrap_or_default();
        let policy = self.config().dual_control.clone();
        let error = match auth {
            None if policy.required => Some(ApprovalError::NotEnough {
                got: 0,
                required: policy.approvals,
            }),
            Some(a) if a.target() != expected => Some(ApprovalError::WrongRequest {
                operator: a.approvers().join(","),
                approved: a.target().to_string(),
                expected: expected.to_string(),
            }),
            _ => None,
        };
        if let Some(e) = error {
            let _ = self.record(refused(&e).approvers(approvers.iter()));
            return Err(e.into());
        }
        Ok(approvers)
    }
}
