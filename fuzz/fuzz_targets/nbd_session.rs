//! One NBD connection, handshake then transmission, from the client's bytes.
#![no_main]
use keyturn_fuzz as _;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    keyturn::fuzzing::nbd_session(data);
});
