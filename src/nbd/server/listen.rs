//! Listening sockets: binding TCP or Unix addresses, and accepting.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};

/// The address a [`Listener`] is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BoundAddr {
    /// A TCP address (with the real port when bound to port 0).
    Tcp(SocketAddr),
    /// A Unix socket path.
    Unix(PathBuf),
}

impl fmt::Display for BoundAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BoundAddr::Tcp(a) => write!(f, "{a}"),
            BoundAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A bound listening socket, TCP or Unix.
#[derive(Debug)]
pub struct Listener {
    pub(super) inner: ListenerInner,
    pub(super) addr: BoundAddr,
}

#[derive(Debug)]
pub(super) enum ListenerInner {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Wraps a bound TCP listener.
    pub fn from_tcp(listener: TcpListener) -> io::Result<Self> {
        let addr = BoundAddr::Tcp(listener.local_addr()?);
        Ok(Listener {
            inner: ListenerInner::Tcp(listener),
            addr,
        })
    }

    /// Wraps a bound Unix listener.
    pub fn from_unix(listener: UnixListener) -> io::Result<Self> {
        let path = listener
            .local_addr()?
            .as_pathname()
            .map(PathBuf::from)
            .unwrap_or_default();
        Ok(Listener {
            inner: ListenerInner::Unix(listener),
            addr: BoundAddr::Unix(path),
        })
    }

    /// The address actually bound (the real port if 0 was asked for).
    pub fn local_addr(&self) -> &BoundAddr {
        &self.addr
    }
}

/// Why [`bind`] failed.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The address string is empty.
    #[error("empty listen address")]
    Empty,
    /// Binding failed.
    #[error("cannot listen on {addr}: {source}")]
    Io {
        /// The address as given.
        addr: String,
        /// The cause.
        source: io::Error,
    },
}

/// Binds a listener from an address string: `"127.0.0.1:10809"`,
/// `"[::1]:10809"`, `"host:port"`, or a Unix socket path (anything with a
/// `/`, or prefixed `unix:`). Port 0 picks a free port; read it back with
/// [`Listener::local_addr`]. An existing file at a Unix path is not removed.
pub async fn bind(addr: &str) -> Result<Listener, BindError> {
    let err = |source| BindError::Io {
        addr: addr.to_owned(),
        source,
    };
    if addr.is_empty() {
        return Err(BindError::Empty);
    }
    if let Some(path) = addr
        .strip_prefix("unix:")
        .or(addr.contains('/').then_some(addr))
    {
        let l = UnixListener::bind(path).map_err(err)?;
        return Listener::from_unix(l).map_err(err);
    }
    let l = TcpListener::bind(addr).await.map_err(err)?;
    Listener::from_tcp(l).map_err(err)
}

pub(super) enum Accepted {
    Tcp(tokio::net::TcpStream, Arc<str>),
    Unix(tokio::net::UnixStream, Arc<str>),
}

pub(super) async fn accept(listener: &Listener, next_id: &mut u64) -> io::Result<Accepted> {
    *next_id += 1;
    Ok(match &listener.inner {
        ListenerInner::Tcp(l) => {
            let (s, a) = l.accept().await?;
            Accepted::Tcp(s, a.to_string().into())
        }
        ListenerInner::Unix(l) => {
            let (s, _) = l.accept().await?;
            // Unix peers are unnamed; tell them apart by a counter.
            let peer = format!("{}#{}", listener.addr, next_id);
            Accepted::Unix(s, peer.into())
        }
    })
}
