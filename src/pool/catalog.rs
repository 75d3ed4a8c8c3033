//! `catalog.json`: the zones and volumes of a pool.

use serde::{Deserialize, Serialize};

use crate::ids::{VolumeId, ZoneId};

/// A zone in the catalog.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ZoneEntry {
    /// Id.
    pub id: ZoneId,
    /// Name.
    pub name: String,
    /// Whether equal blocks written to the zone share one content block.
    #[serde(default = "dedup_default")]
    pub dedup: bool,
    /// Whether the zone's changes are streamed (see [`crate::stream`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
}

fn dedup_default() -> bool {
    true
}

/// Life state of a volume in the catalog.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeState {
    /// Served.
    Active,
    /// Being deleted: its blocks are freed on the next open if a crash interrupted it.
    Deleting,
}

/// A volume in the catalog.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeEntry {
    /// Id.
    pub id: VolumeId,
    /// Name (the NBD export name).
    pub name: String,
    /// Zone.
    pub zone: ZoneId,
    /// Size in bytes.
    pub size: u64,
    /// State.
    pub state: VolumeState,
}

/// `catalog.json`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Catalog {
    /// Format version.
    pub format: u32,
    /// Next zone id.
    pub next_zone: u32,
    /// Next volume id.
    pub next_volume: u32,
    /// Zones.
    pub zones: Vec<ZoneEntry>,
    /// Volumes.
    pub volumes: Vec<VolumeEntry>,
}
