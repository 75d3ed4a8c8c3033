//! Hands each zone's `staging_full` choice to its write path: the policy
//! lives with the scheduler, the wait with the zone (see
//! [`crate::zone::staging_wait`]).

use std::time::Duration;

use crate::pool::Pool;
use crate::schedule::policy::{Policies, StagingFull};

/// Sets every open zone's staging-full mode from its policy.
pub(super) fn apply(pool: &Pool, policies: &Policies) {
    for z in pool.zones.read().values() {
        let p = policies.of(&z.name);
        z.staging_wait.set(match p.staging_full {
            StagingFull::Strict => Some(Duration::from_secs(p.strict_wait.secs())),
            StagingFull::Unstaged => None,
        });
    }
}
