//! Entry points for the fuzz targets in `fuzz/` (cargo feature `fuzzing`,
//! off in every normal build; see `docs/fuzzing.md`). Only what the targets
//! cannot reach through the public API is here: the rest of the decoders
//! they call ([`crate::nbd::proto`], the journal, the tables, the audit log,
//! `pool.toml`, policies) are public already.

/// Serves one NBD connection (handshake, then transmission) to a client
/// that sends `input` and closes; returns how many bytes the server sent.
pub fn nbd_session(input: &[u8]) -> u64 {
    crate::nbd::server::fuzz::session(input)
}

/// Decodes `body` as the admin API decodes the JSON body of route
/// `route` (taken modulo [`ADMIN_ROUTES`]); true when it is valid.
pub fn admin_body(route: u8, body: &[u8]) -> bool {
    crate::admin::http::fuzz_body::body(route, body)
}

/// How many admin API body types [`admin_body`] chooses among.
pub const ADMIN_ROUTES: u8 = crate::admin::http::fuzz_body::ROUTES;
