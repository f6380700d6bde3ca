//! Peer addresses in the form VMMs already use for migration: `tcp:HOST:PORT` and
//! `unix:PATH`, and the blocking stream and listener types behind them.
//!
//! Every connection of a session (the demand lane and each bulk lane) is a separate
//! stream to the same address. TCP streams get `TCP_NODELAY`, since a demand request
//! is 48 bytes and must not wait for Nagle.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use crate::error::EngineError;

/// Where a peer listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAddr {
    /// `tcp:HOST:PORT`; HOST may be a name, an IPv4 address or a bracketed IPv6 address.
    Tcp(String),
    /// `unix:PATH`.
    Unix(PathBuf),
}

impl PeerAddr {
    /// Parses `tcp:HOST:PORT` or `unix:PATH`.
    pub fn parse(s: &str) -> Result<PeerAddr, EngineError> {
        let bad = |why: &str| EngineError::BadAddress {
            addr: s.to_owned(),
            why: why.to_owned(),
        };
        if let Some(rest) = s.strip_prefix("tcp:") {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| bad("expected tcp:HOST:PORT"))?;
            if host.is_empty() {
                return Err(bad("empty host"));
            }
            port.parse::<u16>()
                .map_err(|_| bad("port must be a number from 0 to 65535"))?;
            Ok(PeerAddr::Tcp(rest.to_owned()))
        } else if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad("empty path"));
            }
            Ok(PeerAddr::Unix(PathBuf::from(path)))
        } else {
            Err(bad("expected tcp:HOST:PORT or unix:PATH"))
        }
    }

    /// Connects, retrying refused connections for up to `patience` (the source may
    /// still be starting).
    pub fn connect(&self, patience: Duration) -> Result<Stream, EngineError> {
        let deadline = std::time::Instant::now() + patience;
        loop {
            let attempt = match self {
                PeerAddr::Tcp(hp) => TcpStream::connect(hp).and_then(|s| {
                    s.set_nodelay(true)?;
                    Ok(Stream::Tcp(s))
                }),
                PeerAddr::Unix(p) => UnixStream::connect(p).map(Stream::Unix),
            };
            match attempt {
                Ok(s) => return Ok(s),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound
                    ) && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    return Err(EngineError::Connect {
                        addr: self.to_string(),
                        source: e,
                    })
                }
            }
        }
    }

    /// Binds a listener. A stale Unix socket file is replaced.
    pub fn listen(&self) -> Result<Listener, EngineError> {
        let err = |e| EngineError::Listen {
            addr: self.to_string(),
            source: e,
        };
        match self {
            PeerAddr::Tcp(hp) => {
                let addrs: Vec<_> = hp.to_socket_addrs().map_err(err)?.collect();
                TcpListener::bind(&addrs[..])
                    .map(Listener::Tcp)
                    .map_err(err)
            }
            PeerAddr::Unix(p) => {
                if p.exists() {
                    let _ = std::fs::remove_file(p);
                }
                UnixListener::bind(p).map(Listener::Unix).map_err(err)
            }
        }
    }
}

impl fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAddr::Tcp(hp) => write!(f, "tcp:{hp}"),
            PeerAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl std::str::FromStr for PeerAddr {
    type Err = EngineError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PeerAddr::parse(s)
    }
}

/// A connected byte stream to the peer.
#[derive(Debug)]
pub enum Stream {
    /// TCP, with `TCP_NODELAY` set.
    Tcp(TcpStream),
    /// A Unix stream socket.
    Unix(UnixStream),
}

impl Stream {
    /// Sets or clears non-blocking mode.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_nonblocking(on),
            Stream::Unix(s) => s.set_nonblocking(on),
        }
    }

    /// Bounds how long a blocking read may wait (used during the handshake only).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    /// Closes both directions, which wakes a peer or thread blocked on it.
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Stream::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        };
    }

    /// A second handle to the same socket.
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// The peer's address, for logs.
    pub fn peer(&self) -> String {
        match self {
            Stream::Tcp(s) => s
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            Stream::Unix(_) => "unix peer".into(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix stream socket.
    Unix(UnixListener),
}

impl Listener {
    /// Waits for the next connection.
    pub fn accept(&self) -> io::Result<Stream> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
            Listener::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
        }
    }

    /// The bound address in `tcp:`/`unix:` form (resolves port 0).
    pub fn local_addr(&self) -> io::Result<PeerAddr> {
        match self {
            Listener::Tcp(l) => Ok(PeerAddr::Tcp(l.local_addr()?.to_string())),
            Listener::Unix(l) => {
                let a = l.local_addr()?;
                let p = a
                    .as_pathname()
                    .ok_or_else(|| io::Error::other("unnamed unix socket"))?;
                Ok(PeerAddr::Unix(p.to_path_buf()))
            }
        }
    }

    /// Sets non-blocking accept (used to poll for a shutdown flag).
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(on),
            Listener::Unix(l) => l.set_nonblocking(on),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tcp_and_unix() {
        assert_eq!(
            PeerAddr::parse("tcp:127.0.0.1:4000").unwrap(),
            PeerAddr::Tcp("127.0.0.1:4000".into())
        );
        assert_eq!(
            PeerAddr::parse("tcp:[::1]:4000").unwrap(),
            PeerAddr::Tcp("[::1]:4000".into())
        );
        assert_eq!(
            PeerAddr::parse("unix:/run/rf.sock").unwrap(),
            PeerAddr::Unix("/run/rf.sock".into())
        );
        for bad in [
            "127.0.0.1:4000",
            "tcp:host",
            "tcp::80",
            "tcp:h:99999",
            "unix:",
            "udp:x:1",
        ] {
            assert!(PeerAddr::parse(bad).is_err(), "{bad} must be rejected");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in ["tcp:localhost:7", "unix:/tmp/x.sock"] {
            assert_eq!(PeerAddr::parse(s).unwrap().to_string(), s);
        }
    }
}
