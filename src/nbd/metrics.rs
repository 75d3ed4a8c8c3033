//! Data-path metrics of the NBD server, through the `metrics` facade.
//!
//! Every handle is registered once per listener ([`NbdMetrics::register`]),
//! with `'static` label values, so a request costs a few atomic adds and no
//! allocation or label formatting. Without an installed recorder the
//! handles do nothing.

use ::metrics::{Counter, Gauge, counter, describe_counter, describe_gauge, gauge};

use super::proto::Command;

/// The `command` label values, in the order of [`slot`].
const COMMANDS: [&str; 8] = [
    "read",
    "write",
    "flush",
    "trim",
    "write_zeroes",
    "block_status",
    "cache",
    "disc",
];

/// Index of a command in [`COMMANDS`].
fn slot(c: &Command) -> usize {
    match c {
        Command::Read { .. } => 0,
        Command::Write { .. } => 1,
        Command::Flush => 2,
        Command::Trim { .. } => 3,
        Command::WriteZeroes { .. } => 4,
        Command::BlockStatus { .. } => 5,
        Command::Cache { .. } => 6,
        Command::Disc => 7,
    }
}

/// The NBD server's counters and gauges.
pub(crate) struct NbdMetrics {
    requests: [Counter; COMMANDS.len()],
    errors: [Counter; COMMANDS.len()],
    read_bytes: Counter,
    written_bytes: Counter,
    invalid_requests: Counter,
    connections: Gauge,
    rejected_limit: Counter,
    dropped_protocol: Counter,
    write_batches: Counter,
    batched_writes: Counter,
}

impl NbdMetrics {
    /// Registers (or finds again) every handle with the installed recorder.
    pub(crate) fn register() -> Self {
        describe_counter!(
            "keyturn_nbd_requests_total",
            "NBD requests completed, by command"
        );
        describe_counter!(
            "keyturn_nbd_errors_total",
            "NBD requests that failed with an error reply, by command"
        );
        describe_counter!(
            "keyturn_nbd_read_bytes_total",
            "Bytes returned by NBD READs"
        );
        describe_counter!(
            "keyturn_nbd_written_bytes_total",
            "Bytes written by NBD WRITEs"
        );
        describe_counter!(
            "keyturn_nbd_invalid_requests_total",
            "NBD requests refused as invalid (bad offset, length or flags)"
        );
        describe_gauge!("keyturn_nbd_connections", "NBD client connections open now");
        describe_counter!(
            "keyturn_nbd_rejected_clients_total",
            "NBD clients refused (connection_limit) or dropped for breaking the protocol (protocol)"
        );
        describe_counter!(
            "keyturn_nbd_write_batches_total",
            "Groups of two or more NBD WRITEs read together and applied as one batch"
        );
        describe_counter!(
            "keyturn_nbd_batched_writes_total",
            "NBD WRITEs applied as part of a batch"
        );
        NbdMetrics {
            requests: COMMANDS.map(|c| counter!("keyturn_nbd_requests_total", "command" => c)),
            errors: COMMANDS.map(|c| counter!("keyturn_nbd_errors_total", "command" => c)),
            read_bytes: counter!("keyturn_nbd_read_bytes_total"),
            written_bytes: counter!("keyturn_nbd_written_bytes_total"),
            invalid_requests: counter!("keyturn_nbd_invalid_requests_total"),
            connections: gauge!("keyturn_nbd_connections"),
            rejected_limit: counter!("keyturn_nbd_rejected_clients_total", "reason" => "connection_limit"),
            dropped_protocol: counter!("keyturn_nbd_rejected_clients_total", "reason" => "protocol"),
            write_batches: counter!("keyturn_nbd_write_batches_total"),
            batched_writes: counter!("keyturn_nbd_batched_writes_total"),
        }
    }

    /// A request finished, successfully or not.
    pub(crate) fn finished(&self, command: &Command, ok: bool) {
        let i = slot(command);
        self.requests[i].increment(1);
        if !ok {
            self.errors[i].increment(1);
            return;
        }
        match command {
            Command::Read { length, .. } => self.read_bytes.increment(u64::from(*length)),
            Command::Write { length, .. } => self.written_bytes.increment(u64::from(*length)),
            _ => {}
        }
    }

    /// `writes` WRITEs were applied as one batch.
    pub(crate) fn write_batch(&self, writes: usize) {
        self.write_batches.increment(1);
        self.batched_writes.increment(writes as u64);
    }

    /// A request was refused before it reached the export.
    pub(crate) fn invalid_request(&self) {
        self.invalid_requests.increment(1);
    }

    /// A client was turned away at accept: too many connections.
    pub(crate) fn rejected_at_limit(&self) {
        self.rejected_limit.increment(1);
    }

    /// A client was dropped for breaking the protocol (or timing out).
    pub(crate) fn dropped_for_protocol(&self) {
        self.dropped_protocol.increment(1);
    }

    /// Counts a connection as open until the guard is dropped.
    pub(crate) fn open_connection(&self) -> ConnectionGuard {
        self.connections.increment(1.0);
        ConnectionGuard(self.connections.clone())
    }
}

/// Keeps one connection counted in `keyturn_nbd_connections`.
pub(crate) struct ConnectionGuard(Gauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_has_its_own_label() {
        let all = [
            Command::Read {
                offset: 0,
                length: 1,
            },
            Command::Write {
                offset: 0,
                length: 1,
                fua: false,
            },
            Command::Flush,
            Command::Trim {
                offset: 0,
                length: 1,
                fua: false,
            },
            Command::WriteZeroes {
                offset: 0,
                length: 1,
                fua: false,
                no_hole: false,
                fast: false,
            },
            Command::BlockStatus {
                offset: 0,
                length: 1,
                req_one: false,
            },
            Command::Cache {
                offset: 0,
                length: 1,
            },
            Command::Disc,
        ];
        let mut seen: Vec<&str> = all.iter().map(|c| COMMANDS[slot(c)]).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), COMMANDS.len());
    }
}
