//! [`AdminBackend`] for [`Pool`]: a stand-in until rotation, scrub and
//! online KEK rotation land. Zones, health and volume stats are real; every
//! other operation answers 409 "not implemented yet" (404 for an unknown
//! zone). This file is replaced whole by the real backend.

use crate::admin::{
    AdminBackend, AdminError, EmergencyRequest, Health, PrepareRequest, RotationStatus,
    ScrubStatus, VolumeStats,
};
use crate::pool::Pool;

fn not_yet<T>(pool: &Pool, zone: &str) -> Result<T, AdminError> {
    if pool.catalog().zones.iter().any(|z| z.name == zone) {
        Err(AdminError::Conflict("not implemented yet".into()))
    } else {
        Err(AdminError::NotFound(format!("no zone named {zone:?}")))
    }
}

impl AdminBackend for Pool {
    fn zones(&self) -> Vec<String> {
        self.catalog().zones.into_iter().map(|z| z.name).collect()
    }

    fn rotation_status(&self, zone: &str) -> Result<RotationStatus, AdminError> {
        not_yet(self, zone)
    }

    fn rotation_prepare(
        &self,
        zone: &str,
        _: &PrepareRequest,
    ) -> Result<RotationStatus, AdminError> {
        not_yet(self, zone)
    }

    fn rotation_flip(&self, zone: &str) -> Result<RotationStatus, AdminError> {
        not_yet(self, zone)
    }

    fn rotation_pause(&self, zone: &str) -> Result<RotationStatus, AdminError> {
        not_yet(self, zone)
    }

    fn rotation_resume(&self, zone: &str) -> Result<RotationStatus, AdminError> {
        not_yet(self, zone)
    }

    fn rotation_abort(&self, zone: &str) -> Result<RotationStatus, AdminError> {
        not_yet(self, zone)
    }

    fn rotation_emergency(
        &self,
        zone: &str,
        _: &EmergencyRequest,
    ) -> Result<RotationStatus, AdminError> {
        not_yet(self, zone)
    }

    fn scrub_start(&self, zone: &str) -> Result<ScrubStatus, AdminError> {
        not_yet(self, zone)
    }

    fn scrub_status(&self, zone: &str) -> Result<ScrubStatus, AdminError> {
        not_yet(self, zone)
    }

    fn kek_rotate(&self, zone: &str, _: &[String]) -> Result<serde_json::Value, AdminError> {
        not_yet(self, zone)
    }

    fn volume_stats(&self) -> Vec<VolumeStats> {
        let catalog = self.catalog();
        let usage = self.volume_usage();
        catalog
            .volumes
            .iter()
            .map(|v| {
                let mapped = usage.get(&v.name).copied().unwrap_or(0);
                let zone = catalog.zones.iter().find(|z| z.id == v.zone);
                VolumeStats {
                    name: v.name.clone(),
                    zone: zone.map_or_else(String::new, |z| z.name.clone()),
                    size: v.size,
                    mapped_blocks: mapped,
                    // No dedup yet: every mapped block has its own content block.
                    content_blocks: mapped,
                    dedup_ratio: 1.0,
                }
            })
            .collect()
    }

    fn health(&self) -> Health {
        Health {
            status: "ok".into(),
            problems: Vec::new(),
        }
    }
}
