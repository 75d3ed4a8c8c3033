//! The pool as the admin API's backend: each request maps to a pool
//! operation, each pool error to an admin error kind.

use std::time::Duration;

use crate::admin::{
    AdminBackend, AdminError, CheckReport, CreateVolumeRequest, CreateZoneRequest,
    EmergencyRequest, Health, KeyInfo, PassphraseRequest, PrepareRequest, RootRotateRequest,
    RootRotationStatus, RootStatus, RotationStatus, ScrubStatus, SecretText, StreamRequest,
    VolumeStats, ZoneInfo,
};
use crate::audit::AuditEvent;
use crate::config::RootKeyConfig;
use crate::keys::KeyError;
use crate::keys::approval::{self, Operation, Target};
use crate::keys::passphrase::Passphrase;
use crate::keys::root_rotation::{root_id, root_label};
use crate::keys::sealed::{KdfParams, SealedFileProvider};
use crate::keys::wrap::Purpose;
use crate::pool::root::{NewRoot, RootRotationPhase};
use crate::pool::{Pool, PoolError, RootSecret};

fn unix_now() -> u64 {
    crate::clock::unix_now()
}

impl From<PoolError> for AdminError {
    fn from(e: PoolError) -> Self {
        let text = e.to_string();
        match e {
            PoolError::NotFound { .. } => AdminError::NotFound(text),
            PoolError::Invalid(_) => AdminError::Invalid(text),
            PoolError::Conflict(_)
            | PoolError::Exists { .. }
            | PoolError::Busy(_)
            | PoolError::Key(KeyError::RootKeyExists { .. }) => AdminError::Conflict(text),
            PoolError::Key(crate::keys::KeyError::IllegalTransition { .. })
            | PoolError::Key(crate::keys::KeyError::InUse { .. })
            | PoolError::Key(crate::keys::KeyError::Inconsistent { .. }) => {
                AdminError::Conflict(text)
            }
            PoolError::Approval(_)
            | PoolError::Key(KeyError::WrongPassphrase { .. })
            | PoolError::Key(KeyError::WrongPin { .. }) => AdminError::Forbidden(text),
            PoolError::Key(KeyError::BadPassphrase { .. })
            | PoolError::Key(KeyError::NoPassphrase { .. })
            | PoolError::Key(KeyError::Kdf { .. }) => AdminError::Invalid(text),
            _ => AdminError::Internal(text),
        }
    }
}

impl Pool {
    /// Authorizes a dual-controlled operation from approval texts: `None`
    /// when none were given (the operation then refuses if the pool needs them).
    fn authorize_tokens(
        &self,
        operation: Operation,
        zone: &str,
        tokens: &[String],
    ) -> Result<Option<approval::Authorized>, AdminError> {
        self.authorize_tokens_key(operation, zone, None, tokens)
    }

    /// [`authorize_tokens`](Self::authorize_tokens) for an operation on one key.
    fn authorize_tokens_key(
        &self,
        operation: Operation,
        zone: &str,
        key: Option<&str>,
        tokens: &[String],
    ) -> Result<Option<approval::Authorized>, AdminError> {
        if tokens.is_empty() {
            return Ok(None);
        }
        let target = Target::new(operation, Some(zone), key);
        approval::authorize_json(
            self.dir(),
            &self.config().dual_control,
            &target,
            tokens,
            unix_now(),
        )
        .map(Some)
        .map_err(|e| {
            let _ = self.record(
                crate::audit::AuditEvent::refused(
                    match operation {
                        Operation::RotateKek => "kek.rotate",
                        Operation::ShredStreamWindow => "stream.shred",
                        Operation::RollbackRotation => "rotation.rollback",
                        _ => "rotation.emergency",
                    },
                    &e,
                )
                .zone(zone),
            );
            AdminError::Forbidden(e.to_string())
        })
    }

    /// Records a root key operation (`action`) refused before it began: a
    /// request of the wrong shape, a wrong passphrase, another one running.
    /// Offline these stop the command before the pool opens; through the
    /// API they are attempts on a running pool, so they are on the record.
    fn root_refused(&self, action: &'static str, e: PoolError) -> AdminError {
        let root = root_label(&root_id(&self.config().root_key));
        let _ = self.record(AuditEvent::failed(action, &e).key(&root));
        e.into()
    }

    /// The current passphrase of a sealed-file pool from a request, checked
    /// against the root key file pool.toml names, before any approval is
    /// spent (offline, the pool opens with it first).
    fn current_passphrase(
        &self,
        action: &'static str,
        path: &std::path::Path,
        given: Option<SecretText>,
    ) -> Result<Passphrase, AdminError> {
        let r = (|| {
            let pass = given.ok_or_else(|| {
                PoolError::Invalid(
                    "the passphrase of the root key file pool.toml names is needed (`passphrase`)"
                        .into(),
                )
            })?;
            let pass = Passphrase::new(pass.take())?;
            SealedFileProvider::open(&Self::resolve(self.dir(), path), &pass)?;
            Ok(pass)
        })();
        r.map_err(|e| self.root_refused(action, e))
    }

    /// The keys of zone `zone`, or of every zone: ids, states, ages,
    /// wrapping, and for each DEK the content blocks whose live copy is
    /// under it. Reads only the key files and the block map: no key is
    /// unwrapped, and none of its bytes is in the answer.
    pub fn key_inventory(&self, zone: Option<&str>) -> Result<Vec<KeyInfo>, PoolError> {
        if let Some(z) = zone {
            self.zone_id(z)?;
        }
        let now = unix_now();
        let mut rows = Vec::new();
        for (name, file) in self.key_files()? {
            if zone.is_some_and(|z| z != name) {
                continue;
            }
            let blocks = self.blocks_per_key(file.zone());
            for r in file.records() {
                rows.push(KeyInfo {
                    zone: name.clone(),
                    id: r.id.clone(),
                    purpose: r.purpose.to_string(),
                    version: r.version,
                    state: r.state.name().to_owned(),
                    age_days: now.saturating_sub(r.created_unix) as f64 / 86400.0,
                    wrapped_by_kek: r.wrapped_by_kek,
                    wrapped_by_root: r.wrapped_by_root.clone(),
                    content_blocks: (r.purpose == Purpose::Dek).then(|| {
                        blocks
                            .get(&crate::ids::KeyVersion(r.version))
                            .copied()
                            .unwrap_or(0)
                    }),
                    created_unix: r.created_unix,
                    activated_unix: r.activated_unix,
                    deactivated_unix: r.deactivated_unix,
                    destroyed_unix: r.destroyed_unix,
                });
            }
        }
        Ok(rows)
    }

    fn scrub_of(&self, zone: &str) -> Result<std::sync::Arc<crate::scrub::Scrub>, AdminError> {
        let id = self.zone_id(zone)?;
        Ok(self.rotations.scrubs.lock().entry(id).or_default().clone())
    }
}

impl AdminBackend for Pool {
    fn report(&self, from: &str, to: Option<&str>) -> Result<serde_json::Value, AdminError> {
        use crate::audit::export::parse_time;
        let from = parse_time(from).map_err(AdminError::Invalid)?;
        let now = std::time::SystemTime::now();
        let to = match to {
            Some(t) => parse_time(t).map_err(AdminError::Invalid)?,
            None => now,
        };
        let keys = self
            .key_inventory(None)
            .map_err(|e| AdminError::Internal(e.to_string()))?;
        let r = crate::report::build(self.dir(), keys, from, to, now)
            .map_err(|e| AdminError::Invalid(e.to_string()))?;
        Ok(serde_json::to_value(r).expect("plain data"))
    }

    fn zones(&self) -> Vec<String> {
        self.catalog().zones.into_iter().map(|z| z.name).collect()
    }

    fn rotation_status(&self, zone: &str) -> Result<RotationStatus, AdminError> {
        Ok(Pool::rotation_status(self, zone)?)
    }

    fn rotation_prepare(
        &self,
        zone: &str,
        req: &PrepareRequest,
    ) -> Result<RotationStatus, AdminError> {
        let flip_at = match (req.at_unix, req.window_secs) {
            (Some(_), Some(_)) => {
                return Err(AdminError::Invalid(
                    "give either at_unix or window_secs, not both".into(),
                ));
            }
            (Some(t), None) => {
                if t <= unix_now() {
                    return Err(AdminError::Invalid(format!("flip time {t} is in the past")));
                }
                Some(t)
            }
            (None, Some(w)) => Some(
                unix_now()
                    .checked_add(w)
                    .ok_or_else(|| AdminError::Invalid("window too long".into()))?,
            ),
            (None, None) => None,
        };
        Ok(Pool::rotation_prepare(self, zone, flip_at)?)
    }

    fn rotation_flip(&self, zone: &str) -> Result<RotationStatus, AdminError> {
        Ok(Pool::rotation_flip(self, zone)?)
    }

    fn rotation_pause(&self, zone: &str) -> Result<RotationStatus, AdminError> {
        Ok(Pool::rotation_pause(self, zone)?)
    }

    fn rotation_resume(&self, zone: &str) -> Result<RotationStatus, AdminError> {
        Ok(Pool::rotation_resume(self, zone)?)
    }

    fn rotation_abort(&self, zone: &str) -> Result<RotationStatus, AdminError> {
        Ok(Pool::rotation_abort(self, zone)?)
    }

    fn rotation_emergency(
        &self,
        zone: &str,
        req: &EmergencyRequest,
    ) -> Result<RotationStatus, AdminError> {
        self.zone_id(zone)?;
        let auth = self.authorize_tokens(Operation::EmergencyRotation, zone, &req.approvals)?;
        Ok(Pool::rotation_emergency(self, zone, &req.reason, auth)?)
    }

    fn rotation_rollback(
        &self,
        zone: &str,
        req: &crate::admin::RollbackRequest,
    ) -> Result<RotationStatus, AdminError> {
        self.zone_id(zone)?;
        let auth = self.authorize_tokens(Operation::RollbackRotation, zone, &req.approvals)?;
        Ok(Pool::rotation_rollback(self, zone, auth)?)
    }

    fn mac_request(&self, zone: &str, rotate: bool) -> Result<serde_json::Value, AdminError> {
        let status = if rotate {
            self.mac_rotate(zone)?
        } else {
            self.mac_status(zone)?
        };
        serde_json::to_value(&status).map_err(|e| AdminError::Internal(e.to_string()))
    }

    fn scrub_start(&self, zone: &str) -> Result<ScrubStatus, AdminError> {
        let scrub = self.scrub_of(zone)?;
        let id = self.zone_id(zone)?;
        let z = self
            .zones
            .read()
            .get(&id)
            .cloned()
            .ok_or_else(|| AdminError::NotFound(format!("no zone named {zone:?}")))?;
        let volumes = self
            .catalog()
            .volumes
            .into_iter()
            .filter(|v| v.zone == id)
            .map(|v| (v.id, v.name))
            .collect();
        Ok(crate::scrub::start(z, self.storage.clone(), volumes, scrub))
    }

    fn scrub_status(&self, zone: &str) -> Result<ScrubStatus, AdminError> {
        let scrub = self.scrub_of(zone)?;
        let mut st = scrub.status.lock().clone();
        if st.zone.is_empty() {
            st.zone = zone.into();
        }
        Ok(st)
    }

    fn kek_rotate(
        &self,
        zone: &str,
        approvals: &[String],
    ) -> Result<serde_json::Value, AdminError> {
        self.zone_id(zone)?;
        let auth = self.authorize_tokens(Operation::RotateKek, zone, approvals)?;
        let report = match auth {
            Some(a) => self.rotate_kek_approved(zone, 16, Duration::ZERO, a)?,
            None => self.rotate_kek(zone, 16, Duration::ZERO)?,
        };
        serde_json::to_value(&report).map_err(|e| AdminError::Internal(e.to_string()))
    }

    fn root_status(&self) -> Result<RootStatus, AdminError> {
        let config = self.config();
        let rotation = match Pool::root_rotation(self.dir())? {
            None => None,
            Some((state, phase)) => {
                let new_id = state.new_id();
                let (mut keks, mut keks_rewrapped) = (0, 0);
                for (_, file) in self.key_files()? {
                    for r in file.records() {
                        if r.purpose == Purpose::Kek && r.state.has_material() {
                            keks += 1;
                            if r.wrapped_by_root.as_deref() == Some(new_id.as_str()) {
                                keks_rewrapped += 1;
                            }
                        }
                    }
                }
                Some(RootRotationStatus {
                    phase: match phase {
                        RootRotationPhase::Rewrap => "rewrap",
                        RootRotationPhase::Retire => "retire",
                    }
                    .into(),
                    old_root: state.old_id(),
                    new_root: new_id,
                    started_unix: state.started_unix,
                    keks,
                    keks_rewrapped,
                })
            }
        };
        Ok(RootStatus {
            provider: match &config.root_key {
                RootKeyConfig::SealedFile { .. } => "sealed-file",
                RootKeyConfig::Pkcs11 { .. } => "pkcs11",
                RootKeyConfig::Kmip { .. } => "kmip",
            }
            .into(),
            root_id: root_id(&config.root_key),
            description: self.root().describe(),
            busy: self.root_op.try_lock().is_none(),
            rotation,
        })
    }

    fn root_rotate(&self, req: RootRotateRequest) -> Result<serde_json::Value, AdminError> {
        const ACTION: &str = "root.rotate";
        let RootRotateRequest {
            approvals,
            passphrase,
            new_passphrase,
            new_key_label,
            batch,
            pause_ms,
            kdf_memory_kib,
            kdf_iterations,
        } = req;
        let _op = self
            .root_op_guard()
            .map_err(|e| self.root_refused(ACTION, e))?;
        let config = self.config();
        let (current, new_pass);
        let (secret, new) = match &config.root_key {
            RootKeyConfig::SealedFile { path } => {
                if new_key_label.is_some() {
                    return Err(self.root_refused(
                        ACTION,
                        PoolError::Invalid(
                            "this pool's root key is a sealed file: rotate it with a new \
                             passphrase, not a key label"
                                .into(),
                        ),
                    ));
                }
                current = self.current_passphrase(ACTION, path, passphrase)?;
                new_pass = new_passphrase
                    .map(|p| Passphrase::new(p.take()))
                    .transpose()
                    .map_err(|e| self.root_refused(ACTION, e.into()))?;
                (
                    RootSecret::Passphrase(&current),
                    NewRoot::SealedFile {
                        passphrase: new_pass.as_ref(),
                        kdf: KdfParams::with_cost(kdf_memory_kib, kdf_iterations),
                    },
                )
            }
            RootKeyConfig::Pkcs11 { .. } => {
                if passphrase.is_some()
                    || new_passphrase.is_some()
                    || kdf_memory_kib.is_some()
                    || kdf_iterations.is_some()
                {
                    return Err(self.root_refused(
                        ACTION,
                        PoolError::Invalid(
                            "this pool's root key is in a PKCS#11 token: no passphrase; \
                             name the new key with new_key_label"
                                .into(),
                        ),
                    ));
                }
                let pin = self.pin().ok_or_else(|| {
                    AdminError::Internal("the server holds no PIN for its token".into())
                })?;
                (
                    RootSecret::Pin(pin),
                    NewRoot::Pkcs11 {
                        key_label: new_key_label,
                    },
                )
            }
            RootKeyConfig::Kmip { .. } => {
                return Err(self.root_refused(
                    ACTION,
                    PoolError::Invalid(
                        "this pool's root key is in a KMIP server: keyturn does not rotate it yet"
                            .into(),
                    ),
                ));
            }
        };
        let auth = self.authorize_root_json(ACTION, &approvals)?;
        let report = self.rotate_root_with(
            secret,
            new,
            batch.unwrap_or(64).clamp(1, 4096),
            Duration::from_millis(pause_ms.unwrap_or(0).min(60_000)),
            auth,
            &|_| Ok(()),
        )?;
        serde_json::to_value(&report).map_err(|e| AdminError::Internal(e.to_string()))
    }

    fn root_passphrase(&self, req: PassphraseRequest) -> Result<serde_json::Value, AdminError> {
        const ACTION: &str = "root.reseal";
        let PassphraseRequest {
            approvals,
            passphrase,
            new_passphrase,
            kdf_memory_kib,
            kdf_iterations,
        } = req;
        let _op = self
            .root_op_guard()
            .map_err(|e| self.root_refused(ACTION, e))?;
        let config = self.config();
        let RootKeyConfig::SealedFile { path } = &config.root_key else {
            return Err(self.root_refused(
                ACTION,
                PoolError::Invalid(
                    "this pool's root key is in a PKCS#11 token: it has no passphrase \
                     (its PIN is the token's)"
                        .into(),
                ),
            ));
        };
        let old = self.current_passphrase(ACTION, path, passphrase)?;
        let new = new_passphrase
            .ok_or_else(|| {
                PoolError::Invalid("a new passphrase is needed (`new_passphrase`)".into())
            })
            .and_then(|p| Ok(Passphrase::new(p.take())?))
            .map_err(|e| self.root_refused(ACTION, e))?;
        let auth = self.authorize_root_json(ACTION, &approvals)?;
        self.change_passphrase_locked(
            &old,
            &new,
            KdfParams::with_cost(kdf_memory_kib, kdf_iterations),
            auth,
        )?;
        Ok(serde_json::json!({ "root_id": root_id(&config.root_key), "resealed": true }))
    }

    fn volume_stats(&self) -> Vec<VolumeStats> {
        let catalog = self.catalog();
        let zones = self.zones.read();
        catalog
            .volumes
            .iter()
            .filter_map(|v| {
                let zone = zones.get(&v.zone)?;
                let meta = zone.meta.lock();
                let mapped = meta.volumes.get(&v.id)?.mapped();
                let mut cbids: Vec<u64> = mapped.iter().map(|(_, c)| c.0).collect();
                cbids.sort_unstable();
                cbids.dedup();
                let (m, c) = (mapped.len() as u64, cbids.len() as u64);
                Some(VolumeStats {
                    name: v.name.clone(),
                    id: u64::from(v.id.0),
                    zone: zone.name.clone(),
                    size: v.size,
                    mapped_blocks: m,
                    content_blocks: c,
                    dedup_ratio: if c == 0 { 1.0 } else { m as f64 / c as f64 },
                })
            })
            .collect()
    }

    fn zone_info(&self, zone: &str) -> Result<ZoneInfo, AdminError> {
        self.zone_infos()
            .into_iter()
            .find(|z| z.name == zone)
            .ok_or_else(|| AdminError::NotFound(format!("no zone named {zone:?}")))
    }

    fn zone_create(&self, req: &CreateZoneRequest) -> Result<ZoneInfo, AdminError> {
        self.create_zone(&req.name)?;
        if !req.dedup {
            self.set_zone_dedup(&req.name, false)?;
        }
        self.zone_info(&req.name)
    }

    fn zone_set_dedup(&self, zone: &str, on: bool) -> Result<ZoneInfo, AdminError> {
        self.set_zone_dedup(zone, on)?;
        self.zone_info(zone)
    }

    fn volume_create(&self, req: &CreateVolumeRequest) -> Result<VolumeStats, AdminError> {
        let id = self.create_volume(&req.name, &req.zone, req.size)?;
        Ok(VolumeStats::empty(
            &req.name,
            u64::from(id.0),
            &req.zone,
            req.size,
        ))
    }

    fn volume_delete(&self, volume: &str) -> Result<serde_json::Value, AdminError> {
        self.delete_volume(volume)?;
        Ok(serde_json::json!({ "deleted": volume }))
    }

    fn keys(&self, zone: Option<&str>) -> Result<Vec<KeyInfo>, AdminError> {
        Ok(self.key_inventory(zone)?)
    }

    fn check(&self) -> CheckReport {
        Pool::check(self)
    }

    fn key_cleanup(
        &self,
        req: &crate::admin::CleanupRequest,
    ) -> Result<serde_json::Value, AdminError> {
        if let Some(z) = &req.zone {
            self.zone_id(z)?;
        }
        let mut approvers = Vec::new();
        if !req.dry_run {
            // Destroying keys is dual-controlled like every destroy.
            let target = Target::new(Operation::DestroyKey, req.zone.as_deref(), None);
            if !req.approvals.is_empty() {
                let auth = approval::authorize_json(
                    self.dir(),
                    &self.config().dual_control,
                    &target,
                    &req.approvals,
                    unix_now(),
                )
                .map_err(|e| {
                    let _ = self.record(AuditEvent::refused("key.cleanup", &e));
                    AdminError::Forbidden(e.to_string())
                })?;
                approvers = auth.approvers().to_vec();
            } else if self.config().dual_control.required {
                let e = approval::ApprovalError::NotEnough {
                    got: 0,
                    required: self.config().dual_control.approvals,
                };
                let _ = self.record(AuditEvent::refused("key.cleanup", &e));
                return Err(AdminError::Forbidden(format!(
                    "{e} (approvals of `destroy-key` for {})",
                    target
                )));
            }
        }
        let report = Pool::key_cleanup(self, req.zone.as_deref(), req.dry_run, &approvers)?;
        serde_json::to_value(&report).map_err(|e| AdminError::Internal(e.to_string()))
    }

    fn record(&self, event: AuditEvent) -> Result<(), AdminError> {
        Pool::record(self, event)
            .map(drop)
            .map_err(AdminError::from)
    }

    fn audit_recent(&self, limit: usize) -> Result<serde_json::Value, AdminError> {
        let records = crate::audit::tail::recent(self.dir(), limit)
            .map_err(|e| AdminError::Internal(format!("cannot read the audit log: {e}")))?;
        Ok(serde_json::json!({ "records": records }))
    }

    fn audit_state(&self) -> Option<(bool, u64)> {
        Some(match self.audit() {
            Ok(log) => (true, log.last_id()),
            Err(_) => (false, 0),
        })
    }

    fn health(&self) -> Health {
        let mut problems = Vec::new();
        if self.storage.data.is_poisoned() {
            problems.push("the data device failed a sync; writes are refused".to_string());
        }
        if let Some(s) = &self.storage.staging
            && s.device.is_poisoned()
        {
            problems.push("the staging device failed a sync".to_string());
        }
        if let Err(e) = self.audit() {
            problems.push(e.to_string());
        }
        for z in self.zone_infos() {
            if let Some(reason) = self.stream(&z.name).and_then(|s| s.broken()) {
                problems.push(format!(
                    "the stream of zone {} stopped recording: {reason}",
                    z.name
                ));
            }
        }
        Health {
            status: if problems.is_empty() {
                "ok"
            } else {
                "degraded"
            }
            .into(),
            problems,
        }
    }

    fn block_info(&self, volume: &str, lba: u64) -> Result<serde_json::Value, AdminError> {
        to_json(&Pool::block_info(self, volume, lba)?)
    }

    fn schedule_request(
        &self,
        req: crate::admin::ScheduleRequest,
    ) -> Result<serde_json::Value, AdminError> {
        match self.schedule_service.get() {
            Some(s) => s.request(req),
            None => Err(AdminError::NotFound(
                "no rotation scheduler runs in this process".into(),
            )),
        }
    }

    fn stream_request(
        &self,
        zone: &str,
        req: StreamRequest,
    ) -> Result<serde_json::Value, AdminError> {
        match req {
            StreamRequest::Status => to_json(&self.stream_status(zone)?),
            StreamRequest::Enable => to_json(&self.enable_stream(zone)?),
            StreamRequest::Disable => {
                self.disable_stream(zone)?;
                Ok(serde_json::json!({"zone": zone, "stream": false}))
            }
            StreamRequest::Keys => to_json(&self.stream_keys(zone)?),
            StreamRequest::Agents => to_json(&self.stream_agents(zone)?),
            StreamRequest::Grant(g) => {
                self.grant_agent(zone, &g.name, &g.public_key, g.from_unix, g.to_unix)?;
                Ok(serde_json::json!({"zone": zone, "agent": g.name}))
            }
            StreamRequest::Revoke { name } => {
                self.revoke_agent(zone, &name)?;
                Ok(serde_json::json!({"zone": zone, "revoked": name}))
            }
            StreamRequest::Shred(r) => {
                let w = crate::stream::record::parse_window(r.key_id.as_deref(), r.set, r.window)
                    .map_err(AdminError::Invalid)?;
                let auth = self.authorize_tokens_key(
                    Operation::ShredStreamWindow,
                    zone,
                    Some(&crate::stream::record::key_id(self.zone_id(zone)?.0, w)),
                    &r.approvals,
                )?;
                self.shred_window(zone, w, auth)?;
                Ok(
                    serde_json::json!({"zone": zone, "shredded": crate::stream::record::key_id(self.zone_id(zone)?.0, w)}),
                )
            }
        }
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<serde_json::Value, AdminError> {
    serde_json::to_value(v).map_err(|e| AdminError::Internal(e.to_string()))
}
