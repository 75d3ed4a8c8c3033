//! The pool as the admin API's backend: each request maps to a pool
//! operation, each pool error to an admin error kind.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::admin::{
    AdminBackend, AdminError, EmergencyRequest, Health, PrepareRequest, RotationStatus,
    ScrubStatus, VolumeStats,
};
use crate::keys::approval::{self, Operation, Target};
use crate::pool::{Pool, PoolError};

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl From<PoolError> for AdminError {
    fn from(e: PoolError) -> Self {
        let text = e.to_string();
        match e {
            PoolError::NotFound { .. } => AdminError::NotFound(text),
            PoolError::Invalid(_) | PoolError::Exists { .. } => AdminError::Invalid(text),
            PoolError::Conflict(_) | PoolError::Busy(_) => AdminError::Conflict(text),
            PoolError::Key(crate::keys::KeyError::IllegalTransition { .. })
            | PoolError::Key(crate::keys::KeyError::InUse { .. })
            | PoolError::Key(crate::keys::KeyError::Inconsistent { .. }) => {
                AdminError::Conflict(text)
            }
            PoolError::Approval(_) => AdminError::Forbidden(text),
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
        if tokens.is_empty() {
            return Ok(None);
        }
        let target = Target::new(operation, Some(zone), None);
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
                        _ => "rotation.emergency",
                    },
                    &e,
                )
                .zone(zone),
            );
            AdminError::Forbidden(e.to_string())
        })
    }

    fn scrub_of(&self, zone: &str) -> Result<std::sync::Arc<crate::scrub::Scrub>, AdminError> {
        let id = self.zone_id(zone)?;
        Ok(self.rotations.scrubs.lock().entry(id).or_default().clone())
    }
}

impl AdminBackend for Pool {
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
                    zone: zone.name.clone(),
                    size: v.size,
                    mapped_blocks: m,
                    content_blocks: c,
                    dedup_ratio: if c == 0 { 1.0 } else { m as f64 / c as f64 },
                })
            })
            .collect()
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
}
