//! The server's tunables: size limits, in-flight budgets, timeouts.

use std::time::Duration;

use tokio::sync::Semaphore;

/// Tunables of the NBD server. `Default` gives the values clients expect.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Largest READ/WRITE payload accepted, advertised as the maximum block
    /// size (`NBD_INFO_BLOCK_SIZE`). Default 32 MiB, what clients assume.
    pub max_payload: u32,
    /// Preferred block size advertised to clients. Default 4096.
    pub preferred_block_size: u32,
    /// Largest option payload read into memory during the handshake
    /// (default 64 KiB). Longer ones are drained and refused with
    /// `NBD_REP_ERR_TOO_BIG`.
    pub max_option_length: u32,
    /// Longest payload the server will read and discard to keep the stream
    /// framed (an oversized option, or a rejected WRITE). Anything longer
    /// closes the connection instead. Default 64 MiB.
    pub max_drain: u32,
    /// Requests in flight per connection before the reader stops reading.
    /// Default 64.
    pub max_in_flight: usize,
    /// READ/WRITE buffer bytes in flight per connection. Raised to at least
    /// `max_payload`. Default 128 MiB.
    pub max_in_flight_bytes: usize,
    /// READ/WRITE buffer bytes in flight over all connections together.
    /// A connection with nothing in flight may always take one request
    /// beyond it, so a well-behaved client is never starved by others
    /// that stop reading. Raised to at least `max_payload`. Default 256 MiB.
    pub max_total_in_flight_bytes: usize,
    /// Connections served at once; more are closed at accept. Default 1024.
    pub max_connections: usize,
    /// A reply that cannot be written for this long (a client that stopped
    /// reading) closes the connection and frees what it held. Default 60 s.
    pub send_timeout: Duration,
    /// Time a client gets from connecting to entering transmission (or
    /// leaving). Default 30 s.
    pub handshake_timeout: Duration,
    /// After a connection stops reading (DISC, EOF, shutdown), how long the
    /// server keeps trying to deliver the replies of requests it already
    /// executed before it drops the socket. Default 30 s.
    pub close_timeout: Duration,
    /// Description used for `NBD_INFO_DESCRIPTION` when the catalog gives
    /// an export none. Default empty.
    pub default_description: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_payload: 32 << 20,
            preferred_block_size: 4096,
            max_option_length: 64 << 10,
            max_drain: 64 << 20,
            max_in_flight: 64,
            max_in_flight_bytes: 64 << 20,
            max_total_in_flight_bytes: 256 << 20,
            max_connections: 1024,
            send_timeout: Duration::from_secs(60),
            handshake_timeout: Duration::from_secs(30),
            close_timeout: Duration::from_secs(30),
            default_description: String::new(),
        }
    }
}

impl ServerConfig {
    /// Adjusts values that would deadlock or break the advertised limits.
    pub(super) fn normalized(mut self) -> Self {
        self.max_payload = self.max_payload.max(512);
        self.preferred_block_size = self
            .preferred_block_size
            .clamp(512, self.max_payload)
            .next_power_of_two()
            .min(self.max_payload);
        self.max_in_flight = self.max_in_flight.max(1);
        // A request of max_payload bytes must always be able to get its
        // byte permits, or the reader would wait forever.
        let max_payload = usize::try_from(self.max_payload).unwrap_or(usize::MAX);
        self.max_total_in_flight_bytes = self
            .max_total_in_flight_bytes
            .max(max_payload)
            .min(Semaphore::MAX_PERMITS);
        self.max_connections = self.max_connections.max(1);
        self.max_in_flight_bytes = self
            .max_in_flight_bytes
            .max(max_payload)
            .min(Semaphore::MAX_PERMITS);
        self
    }
}
