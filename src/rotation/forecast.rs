//! What the rotation planner (`schedule`) reads from a zone — content
//! blocks by class, its foreground writes, its heat — and the one change it
//! makes to a window: moving its flip later when a re-plan asks for more
//! staging time.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use super::state::Phase;
use crate::audit::AuditEvent;
use crate::ids::{KeyVersion, ZoneId};
use crate::pool::{Pool, PoolError};
use crate::zone::Zone;
use crate::zone::classes::{self, ClassCensus};

/// The census of `zone` with staged copies under `window` counted.
pub(super) fn census_of(zone: &Zone, window: Option<KeyVersion>) -> ClassCensus {
    let meta = zone.meta.lock();
    classes::census(&meta, &zone.heat, window)
}

impl Pool {
    /// Content blocks of `zone` by class, with those staged under the open
    /// window's key (if any), and the logical blocks written so far in this
    /// server run.
    pub fn zone_census(&self, zone: &str) -> Result<(ClassCensus, u64), PoolError> {
        let rot = self.rotation(zone)?;
        let window = rot.zone.meta.lock().window;
        let census = census_of(&rot.zone, window);
        let written = rot.zone.stats.written_blocks.load(Ordering::Relaxed);
        Ok((census, written))
    }

    /// Moves the scheduled flip of `zone`'s open window to `flip_at` (Unix
    /// seconds). Refused when no window is open.
    pub fn rotation_move_flip(&self, zone: &str, flip_at: u64) -> Result<(), PoolError> {
        let rot = self.rotation(zone)?;
        let _op = rot.op.lock();
        let mut st = rot.state.lock().clone();
        if st.phase != Phase::Window {
            return Err(PoolError::Conflict(format!(
                "zone {zone} has no open window whose flip could move (phase {:?})",
                st.phase
            )));
        }
        let from = st.flip_at_unix;
        st.flip_at_unix = Some(flip_at);
        self.save_state(&rot, &st)?;
        tracing::info!(zone, ?from, to = flip_at, "flip moved by a re-plan");
        self.audit_ok(
            AuditEvent::ok("rotation.flip.moved")
                .zone(zone)
                .actor("scheduler")
                .count(flip_at),
        )
    }

    /// Where `zone`'s heat is saved.
    fn heat_path(&self, id: ZoneId) -> PathBuf {
        self.dir.join("heat").join(format!("zone-{}.bin", id.0))
    }

    /// Saves every zone's heat (so a restart keeps what is hot).
    pub fn save_heat(&self) {
        let zones: Vec<_> = self.zones.read().values().cloned().collect();
        for z in zones {
            if let Err(e) = z.heat.save(&self.heat_path(z.id)) {
                tracing::warn!(zone = %z.name, error = %e, "cannot save the zone's heat");
            }
        }
    }

    /// Loads every zone's saved heat (a damaged file is logged and skipped).
    pub fn load_heat(&self) {
        let zones: Vec<_> = self.zones.read().values().cloned().collect();
        for z in zones {
            match z.heat.load(&self.heat_path(z.id)) {
                Ok(0) => {}
                Ok(n) => tracing::info!(zone = %z.name, counters = n, "heat restored"),
                Err(e) => {
                    tracing::warn!(zone = %z.name, error = %e, "the zone's saved heat is unreadable; starting cold")
                }
            }
        }
    }
}
