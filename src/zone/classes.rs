//! A zone's content blocks by staging priority class, and how many of each
//! have a staged copy under the window's next key: what the rotation
//! planner predicts from, and what the flip records as achieved coverage.
//!
//! The classes follow the staging pipeline's order: **shared** (a content
//! block that several logical blocks point to), **hot** (not shared, heat at
//! least [`HOT_HEAT`]), and the **rest**.

use serde::{Deserialize, Serialize};

use super::ZoneMeta;
use super::heat::Heat;
use crate::ids::KeyVersion;

/// Heat from which a content block counts as hot: touched in each of the
/// last couple of decay periods, not once by a fill.
pub const HOT_HEAT: u8 = 4;

/// Content blocks by class, and those staged under the window's key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassCensus {
    /// Shared content blocks.
    pub shared: u64,
    /// Hot, unshared content blocks.
    pub hot: u64,
    /// The others.
    pub rest: u64,
    /// Shared blocks with a staged copy under the window's key.
    pub staged_shared: u64,
    /// Hot blocks with one.
    pub staged_hot: u64,
    /// Other blocks with one.
    pub staged_rest: u64,
}

impl ClassCensus {
    /// Every content block.
    pub fn total(&self) -> u64 {
        self.shared + self.hot + self.rest
    }

    /// Every staged one.
    pub fn staged(&self) -> u64 {
        self.staged_shared + self.staged_hot + self.staged_rest
    }
}

/// Counts the zone's live content blocks by class; `window` is the next
/// key whose staged copies count (none outside a window). One scan of the
/// block map under the zone lock the caller holds.
pub fn census(meta: &ZoneMeta, heat: &Heat, window: Option<KeyVersion>) -> ClassCensus {
    let mut c = ClassCensus::default();
    for (cbid, r) in meta.live_records() {
        let staged = window.is_some() && r.staged.map(|s| s.key_version) == window;
        let (n, s) = if r.refcount > 1 {
            (&mut c.shared, &mut c.staged_shared)
        } else if heat.get(cbid) >= HOT_HEAT {
            (&mut c.hot, &mut c.staged_hot)
        } else {
            (&mut c.rest, &mut c.staged_rest)
        };
        *n += 1;
        if staged {
            *s += 1;
        }
    }
    c
}
