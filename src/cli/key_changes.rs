//! Commands that change a zone's keys: `keys rotate-kek`, `keys destroy`
//! and `keys compromise`, with dual control where the pool requires it.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};

use super::secret::open_pool;
use super::{PoolArgs, api, default_profile, now_unix};
use crate::audit::AuditEvent;
use crate::keys::approval::{self, Operation, Target};
use crate::keys::zone_keys::KeyState;

/// `keys rotate-kek`: through the running server's admin API when one
/// answers for the pool, else with the pool opened here.
pub(super) fn rotate_kek(
    pool: &PoolArgs,
    zone: &str,
    batch: usize,
    pause_ms: u64,
    approvals: &[PathBuf],
) -> Result<()> {
    if let Some(report) = api::rotate_kek_online(&pool.pool, zone, approvals)? {
        print_kek_report(&report);
        return Ok(());
    }
    let p = open_pool(pool, &default_profile()?)?;
    let pause = std::time::Duration::from_millis(pause_ms);
    let policy = p.config().dual_control.clone();
    let report = if policy.required || !approvals.is_empty() {
        // Checked after the pool opened (so a wrong passphrase does
        // not spend the approvals) and before any key changes.
        if !p.catalog().zones.iter().any(|z| z.name == zone) {
            bail!("no zone named {zone:?}");
        }
        let target = Target::new(Operation::RotateKek, Some(zone), None);
        let auth = match approval::authorize(&pool.pool, &policy, &target, approvals, now_unix()) {
            Ok(a) => a,
            Err(e) => {
                // Every refused attempt is on the record, as on the API path.
                let _ = p.record(AuditEvent::refused("kek.rotate", &e).zone(zone));
                return Err(
                    anyhow::Error::new(e).context(format!("KEK rotation of zone {zone:?} refused"))
                );
            }
        };
        println!("approved by {}", auth.approvers().join(", "));
        p.rotate_kek_approved(zone, batch, pause, auth)
    } else {
        p.rotate_kek(zone, batch, pause)
    }
    .with_context(|| format!("KEK rotation of zone {zone:?} failed"))?;
    print_kek_report(&serde_json::to_value(&report)?);
    Ok(())
}

/// Prints a KEK rotation report, from this process or from the server:
/// one line when it has the fields of [`crate::pool::KekRotationReport`],
/// else the JSON as it came.
fn print_kek_report(report: &serde_json::Value) {
    #[derive(serde::Deserialize)]
    struct Line {
        zone: String,
        new_version: u32,
        rewrapped: usize,
        destroyed: Vec<String>,
        resumed: bool,
        elapsed: std::time::Duration,
    }
    match serde_json::from_value::<Line>(report.clone()) {
        Ok(r) => println!(
            "zone {}: KEK v{} active, {} keys re-wrapped{}, destroyed {:?}, {:.3} s",
            r.zone,
            r.new_version,
            r.rewrapped,
            if r.resumed { " (resumed)" } else { "" },
            r.destroyed,
            r.elapsed.as_secs_f64()
        ),
        Err(_) => println!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_else(|_| report.to_string())
        ),
    }
}

/// `keys destroy` and `keys compromise`: approvals are checked after the
/// pool opened (a wrong passphrase spends none) and before anything changes.
pub(super) fn set_key_state(
    pool: &PoolArgs,
    key: &str,
    state: KeyState,
    approvals: &[PathBuf],
) -> Result<()> {
    let p = open_pool(pool, &default_profile()?)?;
    let verb = if state == KeyState::Destroyed {
        "destroy"
    } else {
        "compromise"
    };
    let policy = p.config().dual_control.clone();
    let auth = if policy.required || !approvals.is_empty() {
        let (zone, _) = p.key_file_of(key)?;
        let operation = if state == KeyState::Destroyed {
            Operation::DestroyKey
        } else {
            Operation::CompromiseKey
        };
        let target = Target::new(operation, Some(&zone), Some(key));
        let auth = approval::authorize(&pool.pool, &policy, &target, approvals, now_unix())
            .with_context(|| format!("{verb} of key {key:?} refused"))?;
        println!("approved by {}", auth.approvers().join(", "));
        Some(auth)
    } else {
        None
    };
    let zone = p
        .set_key_state(key, state, auth)
        .with_context(|| format!("cannot {verb} key {key:?}"))?;
    println!("key {key} of zone {zone} is now {}", state.name());
    Ok(())
}
