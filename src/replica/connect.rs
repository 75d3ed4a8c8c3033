//! Opening the agent's connection to a source's stream listener: plain
//! TCP, or TLS over it (`keyturns://`).

use std::io;

use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use crate::tls::ClientTls;

/// A byte stream to the source, plaintext or TLS.
pub(super) trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// The read half of a connection to the source.
pub(super) type Rd = ReadHalf<Box<dyn Stream>>;
/// The write half of a connection to the source.
pub(super) type Wr = WriteHalf<Box<dyn Stream>>;

/// Connects to `addr` (`HOST:PORT`), with TLS when `tls` is given; the
/// source's certificate must then name `HOST`.
pub(super) async fn open(addr: &str, tls: Option<&ClientTls>) -> io::Result<(Rd, Wr)> {
    let sock = TcpStream::connect(addr).await?;
    let _ = sock.set_nodelay(true);
    let stream: Box<dyn Stream> = match tls {
        None => Box::new(sock),
        Some(tls) => {
            let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
            let name = crate::tls::server_name(host).map_err(io::Error::other)?;
            let connect = tls.connector().connect(name, sock);
            let stream = tokio::time::timeout(std::time::Duration::from_secs(10), connect)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
                .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake: {e}")))?;
            Box::new(stream)
        }
    };
    Ok(tokio::io::split(stream))
}
