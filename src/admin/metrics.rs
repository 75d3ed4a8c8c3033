//! Prometheus metrics: the process's recorder, and the per-zone rotation
//! gauges, which are set from [`AdminBackend::rotation_status`] on every
//! scrape so they are never older than the scrape itself.
//!
//! The exporter opens no listener of its own: `GET /metrics` of the admin
//! API renders it. Labels carry zone names and key version numbers only,
//! never key material.

use std::collections::BTreeSet;
use std::sync::Arc;

use ::metrics::{describe_gauge, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use parking_lot::Mutex;

use super::{AdminBackend, RotationPhase, RotationStatus};

/// The recorder can be installed once per process; this keeps its handle.
static INSTALLED: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// Errors setting up metrics.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// Another recorder was installed first (not by keyturn).
    #[error("cannot install the Prometheus metrics recorder: {0}")]
    Install(String),
}

/// Renders the Prometheus text of the process's metrics.
#[derive(Clone)]
pub struct Exporter {
    handle: PrometheusHandle,
    /// (zone, version) pairs given a per-version gauge, so that a version
    /// that disappears reads 0 rather than its last count.
    versions: Arc<Mutex<BTreeSet<(String, u32)>>>,
}

impl Exporter {
    /// Installs the Prometheus recorder as the process's `metrics` recorder
    /// (the first call does; later calls share it).
    pub fn install() -> Result<Self, MetricsError> {
        let mut installed = INSTALLED.lock();
        let handle = match &*installed {
            Some(h) => h.clone(),
            None => {
                let h = PrometheusBuilder::new()
                    .set_buckets_for_metric(
                        Matcher::Full("keyturn_rotation_duration_seconds".into()),
                        super::key_metrics::DURATION_BUCKETS,
                    )
                    .map_err(|e| MetricsError::Install(e.to_string()))?
                    .install_recorder()
                    .map_err(|e| MetricsError::Install(e.to_string()))?;
                describe();
                super::key_metrics::describe();
                installed.insert(h).clone()
            }
        };
        Ok(Exporter {
            handle,
            versions: Arc::default(),
        })
    }

    /// Renders the gauges as they are (a process with no admin backend:
    /// the replication agent).
    pub fn render_plain(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }

    /// Sets the rotation gauges of every zone, then renders everything.
    /// Blocking: it asks the backend for each zone's status.
    pub fn render(&self, backend: &dyn AdminBackend) -> String {
        let mut seen = BTreeSet::new();
        for zone in backend.zones() {
            match backend.rotation_status(&zone) {
                Ok(status) => {
                    set_zone_gauges(&status);
                    super::key_metrics::set_coverage(&status);
                    seen.extend(status.keys.iter().map(|k| (zone.clone(), k.version)));
                }
                Err(e) => {
                    tracing::debug!(zone, error = %e, "no rotation status for the metrics")
                }
            }
            // Zones that do not stream answer an error: no stream gauges.
            if let Ok(v) = backend.stream_request(&zone, super::StreamRequest::Status)
                && let Ok(st) = serde_json::from_value::<crate::stream::StreamStatus>(v)
            {
                set_stream_gauges(&st);
            }
        }
        let mut versions = self.versions.lock();
        for (zone, version) in versions.difference(&seen) {
            gauge!("keyturn_zone_key_blocks", "zone" => zone.clone(), "version" => version.to_string())
                .set(0.0);
        }
        versions.extend(seen);
        drop(versions);
        super::key_metrics::set_gauges(backend);
        self.handle.run_upkeep();
        self.handle.render()
    }
}

/// The number `keyturn_rotation_phase` reports for a phase.
pub fn phase_number(phase: RotationPhase) -> f64 {
    match phase {
        RotationPhase::Idle => 0.0,
        RotationPhase::Window => 1.0,
        RotationPhase::Paused => 2.0,
        RotationPhase::Migrating => 3.0,
        RotationPhase::Grace => 4.0,
    }
}

fn describe() {
    for (name, help) in [
        (
            "keyturn_rotation_phase",
            "Rotation phase: 0 idle, 1 window, 2 paused, 3 migrating, 4 grace",
        ),
        ("keyturn_rotation_active_version", "Active DEK version"),
        (
            "keyturn_rotation_content_blocks",
            "Live content blocks in the zone",
        ),
        (
            "keyturn_rotation_staged_blocks",
            "Content blocks with a staged copy under the next key",
        ),
        (
            "keyturn_rotation_migrated_blocks",
            "Content blocks migrated since the flip",
        ),
        (
            "keyturn_rotation_progress_percent",
            "Staged (window) or migrated (after the flip) percentage",
        ),
        (
            "keyturn_rotation_rate_bytes_per_second",
            "Recent staging or migration throughput",
        ),
        (
            "keyturn_rotation_staging_used_bytes",
            "Staging device bytes in use",
        ),
        (
            "keyturn_rotation_staging_free_bytes",
            "Staging device bytes free",
        ),
        (
            "keyturn_rotation_unstaged_writes",
            "Writes acknowledged without a staged copy since the window opened",
        ),
        (
            "keyturn_rotation_errors",
            "Staging or migration errors since the window opened",
        ),
        (
            "keyturn_rotation_strict_fallbacks",
            "Strict writes that waited out the bound and went unstaged (alerted)",
        ),
        (
            "keyturn_rotation_strict_waited_writes",
            "Strict writes that waited for staging space and got it",
        ),
        (
            "keyturn_rotation_throttle_bytes_per_second",
            "The staging and migration throttle in force, bytes per second (0: none)",
        ),
        (
            "keyturn_rotation_emergency",
            "1 during an emergency rotation",
        ),
        (
            "keyturn_zone_key_blocks",
            "Content blocks whose live copy is under a DEK version",
        ),
        (
            "keyturn_stream_last_seq",
            "Last durable (served) record of the zone's stream",
        ),
        (
            "keyturn_stream_first_seq",
            "Oldest record the zone's stream keeps",
        ),
        ("keyturn_stream_bytes", "Bytes the zone's stream log keeps"),
        (
            "keyturn_stream_records",
            "Records written since the server started",
        ),
        (
            "keyturn_stream_logical_bytes",
            "Bytes of blocks the records describe, since start",
        ),
        (
            "keyturn_stream_record_bytes",
            "Bytes of records (what crosses the wire), since start",
        ),
        (
            "keyturn_stream_referenced_blocks",
            "Blocks sent as a reference to an earlier record, since start",
        ),
        (
            "keyturn_stream_broken",
            "1 when the stream stopped recording (replicas need a resync)",
        ),
        (
            "keyturn_stream_consumer_acked_seq",
            "Last record a consumer acknowledged as applied",
        ),
        (
            "keyturn_stream_consumer_lag_records",
            "Records a consumer is behind the stream",
        ),
        (
            "keyturn_replica_applied_seq",
            "Last source record applied by this agent",
        ),
        (
            "keyturn_replica_source_seq",
            "Last durable source record the agent has heard of",
        ),
        (
            "keyturn_replica_lag_records",
            "Records the replica is behind its source",
        ),
        (
            "keyturn_replica_lag_seconds",
            "Age of the last applied record when it was applied",
        ),
        (
            "keyturn_replica_apply_rate",
            "Records applied per second, recently",
        ),
        (
            "keyturn_replica_full_syncs",
            "Full syncs done by this agent process",
        ),
        (
            "keyturn_rotation_coverage_predicted_percent",
            "Share of the staging coverage target the plan predicted at the zone's last flip",
        ),
        (
            "keyturn_rotation_coverage_achieved_percent",
            "Share of the staging coverage target achieved at the zone's last flip",
        ),
        (
            "keyturn_rotation_plan_coverage_percent",
            "Share of the coverage target the current plan predicts at its flip",
        ),
        (
            "keyturn_schedule_awaiting_approval",
            "Scheduled rotations waiting for dual-control approvals",
        ),
        (
            "keyturn_threat_level",
            "Threat level in force for the zone (0 normal, 1 elevated, 2 high, 3 critical)",
        ),
    ] {
        describe_gauge!(name, help);
    }
    ::metrics::describe_counter!(
        "keyturn_schedule_alerts_total",
        "Scheduler alerts raised, by kind (approval_needed, coverage_missed)"
    );
    ::metrics::describe_counter!(
        "keyturn_threat_feed_rejected_total",
        "Lines of the threat feed file that were refused"
    );
}

fn set_zone_gauges(s: &RotationStatus) {
    let z = || s.zone.clone();
    gauge!("keyturn_rotation_phase", "zone" => z()).set(phase_number(s.phase));
    gauge!("keyturn_rotation_active_version", "zone" => z()).set(f64::from(s.active_version));
    for (name, value) in [
        ("keyturn_rotation_content_blocks", s.content_blocks as f64),
        ("keyturn_rotation_staged_blocks", s.staged_blocks as f64),
        ("keyturn_rotation_migrated_blocks", s.migrated_blocks as f64),
        ("keyturn_rotation_progress_percent", s.progress_percent),
        (
            "keyturn_rotation_rate_bytes_per_second",
            s.rate_bytes_per_sec,
        ),
        (
            "keyturn_rotation_staging_used_bytes",
            s.staging_used_bytes as f64,
        ),
        (
            "keyturn_rotation_staging_free_bytes",
            s.staging_free_bytes as f64,
        ),
        ("keyturn_rotation_unstaged_writes", s.unstaged_writes as f64),
        ("keyturn_rotation_errors", s.errors as f64),
        (
            "keyturn_rotation_strict_fallbacks",
            s.strict_fallbacks as f64,
        ),
        (
            "keyturn_rotation_strict_waited_writes",
            s.strict_waited_writes as f64,
        ),
        (
            "keyturn_rotation_throttle_bytes_per_second",
            (s.throttle_mib_s << 20) as f64,
        ),
        (
            "keyturn_rotation_emergency",
            if s.emergency { 1.0 } else { 0.0 },
        ),
    ] {
        gauge!(name, "zone" => z()).set(value);
    }
    for k in &s.keys {
        gauge!("keyturn_zone_key_blocks", "zone" => z(), "version" => k.version.to_string())
            .set(k.blocks as f64);
    }
}

fn set_stream_gauges(s: &crate::stream::StreamStatus) {
    let z = || s.zone.clone();
    for (name, value) in [
        ("keyturn_stream_last_seq", s.last_seq as f64),
        ("keyturn_stream_first_seq", s.first_seq as f64),
        ("keyturn_stream_bytes", s.bytes as f64),
        ("keyturn_stream_records", s.records as f64),
        ("keyturn_stream_logical_bytes", s.logical_bytes as f64),
        ("keyturn_stream_record_bytes", s.record_bytes as f64),
        (
            "keyturn_stream_referenced_blocks",
            s.referenced_blocks as f64,
        ),
        (
            "keyturn_stream_broken",
            if s.broken.is_some() { 1.0 } else { 0.0 },
        ),
    ] {
        gauge!(name, "zone" => z()).set(value);
    }
    // Consumer names are registered agent names: letters, digits, - _ .
    // Agents consuming through NATS report their position the same way.
    for (consumer, acked) in s.consumers.iter().chain(&s.nats_agents) {
        gauge!("keyturn_stream_consumer_acked_seq", "zone" => z(), "consumer" => consumer.clone())
            .set(*acked as f64);
        gauge!("keyturn_stream_consumer_lag_records", "zone" => z(), "consumer" => consumer.clone())
            .set(s.last_seq.saturating_sub(*acked) as f64);
    }
}

/// Sets the replication agent's gauges from its status.
pub fn set_replica_gauges(s: &crate::replica::ReplicaStatus) {
    let z = || s.zone.clone();
    for (name, value) in [
        ("keyturn_replica_applied_seq", s.applied_seq as f64),
        ("keyturn_replica_source_seq", s.source_seq as f64),
        ("keyturn_replica_lag_records", s.lag_records as f64),
        ("keyturn_replica_lag_seconds", s.lag_seconds),
        ("keyturn_replica_apply_rate", s.apply_rate),
        ("keyturn_replica_full_syncs", s.full_syncs as f64),
    ] {
        gauge!(name, "zone" => z()).set(value);
    }
}
