//! Admin API request bodies, decoded as the JSON routes decode them: the
//! first byte picks the route.
#![no_main]
use keyturn_fuzz as _;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Some((&route, body)) = data.split_first() {
        keyturn::fuzzing::admin_body(route, body);
    }
});
