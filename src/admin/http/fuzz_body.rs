//! Entry point of the `admin_body` fuzz target (cargo feature `fuzzing`):
//! a request body decoded exactly as the JSON routes decode theirs
//! ([`super::parse_json`] into the route's type), and the report route's
//! query string as axum's `Query` decodes it.

use axum::extract::Query;
use axum::http::Uri;
use serde::de::DeserializeOwned;

use super::key_rotation::ReportQuery;
use super::parse_json;
use super::schedule::ApproveBody;
use super::stream::RevokeBody;
use crate::admin::{
    CleanupRequest, CreateTokenRequest, CreateVolumeRequest, CreateZoneRequest, DedupRequest,
    EmergencyRequest, EmergencyRotationRequest, ExecuteRequest, GrantRequest, KekRotateRequest,
    PassphraseRequest, PrepareRequest, RollbackRequest, RootRotateRequest, ScheduleRotationRequest,
    ShredRequest,
};
use crate::schedule::policy::{Policy, ZoneFacts};
use crate::schedule::threat::ThreatChange;

/// How many body types [`body`] chooses among.
pub const ROUTES: u8 = 21;

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    parse_json::<T>(bytes).ok()
}

/// Decodes `bytes` as the body of route `route % ROUTES`; true when it is
/// a valid body. A policy that decodes is also validated, as the policy
/// route does before it stores it.
pub fn body(route: u8, bytes: &[u8]) -> bool {
    match route % ROUTES {
        0 => decode::<RollbackRequest>(bytes).is_some(),
        1 => decode::<ScheduleRotationRequest>(bytes).is_some(),
        2 => decode::<ExecuteRequest>(bytes).is_some(),
        3 => decode::<EmergencyRotationRequest>(bytes).is_some(),
        4 => decode::<CleanupRequest>(bytes).is_some(),
        5 => decode::<RootRotateRequest>(bytes).is_some(),
        6 => decode::<PassphraseRequest>(bytes).is_some(),
        7 => decode::<PrepareRequest>(bytes).is_some(),
        8 => decode::<EmergencyRequest>(bytes).is_some(),
        9 => decode::<KekRotateRequest>(bytes).is_some(),
        10 => decode::<Policy>(bytes).is_some_and(|p| {
            let facts = ZoneFacts {
                content_bytes: 1 << 30,
                rate_bytes_per_sec: 1 << 20,
            };
            p.validate("fuzz", facts).is_ok()
        }),
        11 => decode::<ThreatChange>(bytes).is_some(),
        12 => decode::<ApproveBody>(bytes).is_some(),
        13 => decode::<GrantRequest>(bytes).is_some(),
        14 => decode::<RevokeBody>(bytes).is_some(),
        15 => decode::<ShredRequest>(bytes).is_some(),
        16 => decode::<CreateTokenRequest>(bytes).is_some(),
        17 => decode::<CreateZoneRequest>(bytes).is_some(),
        18 => decode::<DedupRequest>(bytes).is_some(),
        19 => decode::<CreateVolumeRequest>(bytes).is_some(),
        _ => {
            let Ok(uri) = Uri::try_from(format!("/report?{}", String::from_utf8_lossy(bytes)))
            else {
                return false;
            };
            Query::<ReportQuery>::try_from_uri(&uri).is_ok()
        }
    }
}
