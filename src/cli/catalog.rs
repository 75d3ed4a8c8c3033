//! `zone` and `volume` commands. When a server answers for the pool they
//! go through its admin API, so volumes come and go while every other
//! volume stays served; otherwise they work on the pool opened here.

use anyhow::{Result, bail};

use super::PoolArgs;
use super::api::Admin;
use crate::admin::{CreateVolumeRequest, CreateZoneRequest, VolumeStats};

/// `zone create`.
pub(super) fn zone_create(args: &PoolArgs, name: &str, no_dedup: bool) -> Result<()> {
    let zone = Admin::open_quietly(args)?.zone_create(&CreateZoneRequest {
        name: name.into(),
        dedup: !no_dedup,
    })?;
    println!(
        "created zone {name} (id {}, dedup {})",
        zone.id,
        on_off(zone.dedup)
    );
    Ok(())
}

/// `zone set-dedup`.
pub(super) fn zone_set_dedup(args: &PoolArgs, name: &str, on: bool) -> Result<()> {
    let zone = Admin::open_quietly(args)?.zone_set_dedup(name, on)?;
    println!("zone {name}: dedup {}", on_off(zone.dedup));
    Ok(())
}

/// `zone list`.
pub(super) fn zone_list(args: &PoolArgs, json: bool) -> Result<()> {
    let zones = Admin::open_quietly(args)?.zones()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&zones)?);
        return Ok(());
    }
    println!("{:<6} {:<24} {:>8} {:>6}", "ID", "NAME", "VOLUMES", "DEDUP");
    for z in &zones {
        println!(
            "{:<6} {:<24} {:>8} {:>6}",
            z.id,
            z.name,
            z.volumes,
            on_off(z.dedup)
        );
    }
    Ok(())
}

/// `volume create`.
pub(super) fn volume_create(args: &PoolArgs, name: &str, zone: &str, size: u64) -> Result<()> {
    Admin::open_quietly(args)?.volume_create(&CreateVolumeRequest {
        name: name.into(),
        zone: zone.into(),
        size,
    })?;
    println!("created volume {name} ({size} bytes) in zone {zone}");
    Ok(())
}

/// `volume list`.
pub(super) fn volume_list(args: &PoolArgs, json: bool) -> Result<()> {
    let volumes = Admin::open_quietly(args)?.volume_stats()?;
    let allocated = |v: &VolumeStats| v.mapped_blocks * crate::ids::BLOCK_SIZE as u64;
    if json {
        let rows: Vec<_> = volumes
            .iter()
            .map(|v| {
                serde_json::json!({
                    "name": v.name, "id": v.id, "zone": v.zone, "size": v.size,
                    "allocated_bytes": allocated(v),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "{:<24} {:<16} {:>16} {:>16}",
        "NAME", "ZONE", "SIZE", "ALLOCATED"
    );
    for v in &volumes {
        println!(
            "{:<24} {:<16} {:>16} {:>16}",
            v.name,
            v.zone,
            v.size,
            allocated(v)
        );
    }
    Ok(())
}

/// `volume delete`. A volume the running server exports is deleted only
/// with `online` (deleting is for good, so serving it is an interlock), and
/// even then not while a client has it open.
pub(super) fn volume_delete(args: &PoolArgs, name: &str, online: bool) -> Result<()> {
    let admin = Admin::open_quietly(args)?;
    if let Admin::Remote(c) = &admin
        && !online
        && admin.volume_stats()?.iter().any(|v| v.name == name)
    {
        bail!(
            "volume {name:?} is in use: the running server (admin API {}) serves it; \
             stop the server, or pass --online to delete it while the server runs \
             (refused while a client has it open)",
            c.addr()
        );
    }
    admin.volume_delete(name)?;
    println!("deleted volume {name}");
    Ok(())
}

fn on_off(on: bool) -> &'static str {
    if on { "on" } else { "off" }
}
