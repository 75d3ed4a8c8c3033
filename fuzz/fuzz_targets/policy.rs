//! `policies.json` as the scheduler loads it, each policy validated and
//! its periods and maintenance window computed at any time.
#![no_main]
use keyturn::schedule::policy::{Policies, Span, ZoneFacts};
use keyturn::schedule::threat::ThreatLevel;
use keyturn_fuzz::{file, scratch};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = Span::parse(s);
    }
    file("policies.json", data);
    let Ok(policies) = Policies::load(scratch()) else {
        return;
    };
    let facts = ZoneFacts {
        content_bytes: 1 << 30,
        rate_bytes_per_sec: 1 << 20,
    };
    for (zone, p) in std::iter::once(("default", &policies.default))
        .chain(policies.zones.iter().map(|(z, p)| (z.as_str(), p)))
    {
        let _ = p.validate(zone, facts);
        for level in [
            ThreatLevel::Normal,
            ThreatLevel::Elevated,
            ThreatLevel::High,
            ThreatLevel::Critical,
        ] {
            let _ = p.threat.scale(p.dek_period(), level);
            let _ = p.threat.scale(p.kek_period(), level);
        }
        let _ = p.kek_pause();
        for t in [0, 1_700_000_000, u64::MAX / 2, u64::MAX - 1, u64::MAX] {
            let _ = p.window.earliest_flip(t);
            let _ = p.window.containing(t);
        }
        let _ = p.to_owned();
    }
});
