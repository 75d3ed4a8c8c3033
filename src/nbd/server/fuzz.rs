//! Entry point of the `nbd_session` fuzz target (cargo feature `fuzzing`):
//! one whole connection, the handshake and then the transmission phase, fed
//! from a byte string as if a client had sent it.
//!
//! The connection runs exactly as [`super::serve`] runs it, over an
//! in-memory pipe instead of a socket. Behind it is a 1 MiB export in
//! memory that asserts the contract the server promises its exports (every
//! request in range, no payload longer than negotiated), so a request the
//! validator should have refused shows up as a crash.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Semaphore, watch};

use super::ServerConfig;
use super::connection::connection;
use crate::nbd::access::Client;
use crate::nbd::export::{Export, ExportCatalog, ExportError, ExportInfo, Extent};
use crate::nbd::handshake::Security;
use crate::nbd::metrics::NbdMetrics;

/// Size of the fuzzed export.
const SIZE: u64 = 1 << 20;
/// Largest READ/WRITE payload the fuzzed server negotiates.
const MAX_PAYLOAD: u32 = 256 << 10;

struct MemExport(Mutex<Vec<u8>>);

impl MemExport {
    /// The byte range of a request, panicking on one the server should have refused.
    fn range(offset: u64, len: u64) -> std::ops::Range<usize> {
        let end = offset.checked_add(len).expect("request end overflows");
        assert!(
            end <= SIZE,
            "request [{offset}, {end}) past the export's end"
        );
        offset as usize..end as usize
    }
}

impl Export for MemExport {
    fn size(&self) -> u64 {
        SIZE
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        assert!(
            buf.len() <= MAX_PAYLOAD as usize,
            "read longer than negotiated"
        );
        let r = Self::range(offset, buf.len() as u64);
        buf.copy_from_slice(&self.0.lock().expect("export lock")[r]);
        Ok(())
    }

    async fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), ExportError> {
        assert!(
            data.len() <= MAX_PAYLOAD as usize,
            "write longer than negotiated"
        );
        let r = Self::range(offset, data.len() as u64);
        self.0.lock().expect("export lock")[r].copy_from_slice(data);
        Ok(())
    }

    async fn flush(&self) -> Result<(), ExportError> {
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u64, fua: bool) -> Result<(), ExportError> {
        self.write_zeroes(offset, length, fua).await
    }

    async fn write_zeroes(&self, offset: u64, length: u64, _fua: bool) -> Result<(), ExportError> {
        let r = Self::range(offset, length);
        self.0.lock().expect("export lock")[r].fill(0);
        Ok(())
    }

    async fn block_status(&self, offset: u64, length: u64) -> Result<Vec<Extent>, ExportError> {
        Self::range(offset, length);
        assert!(length > 0, "zero-length block status reached the export");
        Ok(vec![Extent {
            length,
            hole: false,
            zero: false,
        }])
    }
}

struct Catalog(Arc<MemExport>);

impl ExportCatalog for Catalog {
    type Export = MemExport;

    fn list(&self) -> Vec<ExportInfo> {
        vec![ExportInfo {
            name: "vol0".into(),
            description: "fuzz".into(),
        }]
    }

    fn open(&self, name: &str) -> Option<Arc<MemExport>> {
        (name == "vol0" || name.is_empty()).then(|| self.0.clone())
    }
}

/// Serves one connection whose client sends `input` and then closes its
/// side; returns how many bytes the server answered. Never panics unless
/// the server (or the contract it owes its exports) is broken.
pub fn session(input: &[u8]) -> u64 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("tokio runtime");
    let config = Arc::new(
        ServerConfig {
            max_payload: MAX_PAYLOAD,
            max_option_length: 4 << 10,
            max_drain: 1 << 20,
            max_in_flight: 8,
            max_in_flight_bytes: 1 << 20,
            max_total_in_flight_bytes: 2 << 20,
            send_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(5),
            close_timeout: Duration::from_secs(5),
            ..ServerConfig::default()
        }
        .normalized(),
    );
    let export = Arc::new(MemExport(Mutex::new(vec![0; SIZE as usize])));
    let (client, server) = tokio::io::duplex(64 << 10);
    let (_stop, shutdown) = watch::channel(false);
    runtime.block_on(async move {
        let serving = connection(
            Box::new(server),
            Arc::from("fuzz"),
            Client::default(),
            Arc::new(Catalog(export)),
            config.clone(),
            Arc::new(Security::default()),
            Arc::new(Semaphore::new(config.max_total_in_flight_bytes)),
            Arc::new(NbdMetrics::register()),
            shutdown,
        );
        let (mut rd, mut wr) = tokio::io::split(client);
        let sending = async move {
            // The server may close first (a fatal error): the rest is unsent.
            let _ = wr.write_all(input).await;
            let _ = wr.shutdown().await;
        };
        let receiving = async move {
            let mut answered = 0u64;
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n) = rd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                answered += n as u64;
            }
            answered
        };
        let ((), (), answered) = tokio::join!(serving, sending, receiving);
        answered
    })
}
