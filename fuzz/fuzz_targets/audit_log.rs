//! The audit log's verifier and its reopening: `audit.log`, a NUL byte,
//! then `audit.head`.
#![no_main]
use keyturn_fuzz::{file, remove, scratch};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (log, head) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    file("audit.log", log);
    match head {
        Some(h) => {
            file("audit.head", h);
        }
        None => remove("audit.head"),
    }
    let verified = keyturn::audit::verify(scratch());
    if let Ok(log) = keyturn::audit::AuditLog::open(scratch()) {
        // What open accepts, a verify of the whole chain accepts too
        // (open may have moved the anchor or cut a torn tail).
        assert!(keyturn::audit::verify(scratch()).is_ok() || verified.is_err());
        drop(log);
    }
});
