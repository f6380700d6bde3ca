//! Peer addresses in the form VMMs already use for migration: `tcp:HOST:PORT` and
//! `unix:PATH`, and the blocking stream and listener types behind them.
//!
//! Every connection of a session (the demand lane and each bulk lane) is a separate
//! stream to the same address. TCP streams get `TCP_NODELAY`, since a demand request
//! is a few dozen bytes and must not wait for Nagle, and keepalive plus
//! `TCP_USER_TIMEOUT` ([`Stream::set_liveness`]), so a peer that vanished is
//! noticed even while nothing is being sent.
//!
//! A Unix listener never deletes what it did not create: [`PeerAddr::listen`]
//! refuses a path that holds anything but a socket, and a socket that another
//! live process is listening on; only a stale socket is replaced.

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
        self.connect_within(patience, None)
    }

    /// [`PeerAddr::connect`], with each TCP attempt given up after `timeout`
    /// (a peer that does not answer the SYN at all, e.g. behind a link that
    /// is down, would otherwise hold it for the kernel's SYN retries, about
    /// two minutes).
    pub fn connect_within(
        &self,
        patience: Duration,
        timeout: Option<Duration>,
    ) -> Result<Stream, EngineError> {
        let deadline = std::time::Instant::now() + patience;
        loop {
            let attempt = match self {
                PeerAddr::Tcp(hp) => tcp_connect(hp, timeout).and_then(|s| {
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

    /// Binds a listener. A stale Unix socket file is replaced; anything else at
    /// the path is refused ([`bind_unix`]).
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
            PeerAddr::Unix(p) => bind_unix(p).map(Listener::Unix),
        }
    }
}

/// Connects to `hp` (`HOST:PORT`), each resolved address tried for at most
/// `timeout` when one is given.
fn tcp_connect(hp: &str, timeout: Option<Duration>) -> io::Result<TcpStream> {
    let Some(timeout) = timeout else {
        return TcpStream::connect(hp);
    };
    let mut last = None;
    for a in hp.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the host has no address")))
}

/// Binds a Unix stream listener at `path`, replacing only a stale socket: a
/// path that holds a regular file, a directory or anything but a socket is
/// refused, and so is a socket that a live process accepts on (two handlers
/// configured with one path must not steal each other's clients).
pub fn bind_unix(path: &std::path::Path) -> Result<UnixListener, EngineError> {
    use std::os::unix::fs::FileTypeExt;
    let addr = format!("unix:{}", path.display());
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => {
                return Err(EngineError::AddressInUse {
                    addr,
                    why: "another process is listening on this socket".into(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(|source| EngineError::Listen {
                    addr: addr.clone(),
                    source,
                })?;
            }
            Err(source) => return Err(EngineError::Listen { addr, source }),
        },
        Ok(_) => {
            return Err(EngineError::AddressInUse {
                addr,
                why: "the path exists and is not a socket; refusing to replace it".into(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(EngineError::Listen { addr, source }),
    }
    UnixListener::bind(path).map_err(|source| EngineError::Listen { addr, source })
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

    /// Keepalive probes after `silence / 3` without traffic, and
    /// `TCP_USER_TIMEOUT` of `silence`: a vanished peer breaks the connection
    /// within about `silence`, even when nothing is being sent. No-op for
    /// Unix sockets (a dead local peer closes them at once).
    pub fn set_liveness(&self, silence: Duration) -> io::Result<()> {
        let Stream::Tcp(s) = self else { return Ok(()) };
        use rustix::net::sockopt;
        let idle = (silence / 3).max(Duration::from_secs(1));
        sockopt::set_socket_keepalive(s, true)?;
        sockopt::set_tcp_keepidle(s, idle)?;
        sockopt::set_tcp_keepintvl(s, (silence / 6).max(Duration::from_secs(1)))?;
        sockopt::set_tcp_keepcnt(s, 3)?;
        let ms = u32::try_from(silence.as_millis())
            .unwrap_or(u32::MAX)
            .max(1);
        sockopt::set_tcp_user_timeout(s, ms)?;
        Ok(())
    }

    /// How long ago the kernel last received data on this TCP stream, read
    /// or not (`None` for Unix sockets, or if the kernel will not say).
    pub fn silent_for(&self) -> Option<Duration> {
        let Stream::Tcp(s) = self else { return None };
        crate::sys::tcp::since_last_data(std::os::fd::AsFd::as_fd(s)).ok()
    }

    /// The peer's IP address (None for Unix sockets).
    pub fn peer_ip(&self) -> Option<std::net::IpAddr> {
        match self {
            Stream::Tcp(s) => s.peer_addr().ok().map(|a| a.ip()),
            Stream::Unix(_) => None,
        }
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

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l) => l.as_fd(),
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
    fn unix_listen_refuses_files_and_live_sockets() {
        let dir = std::env::temp_dir().join(format!("rf-addr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(matches!(
            bind_unix(&file),
            Err(EngineError::AddressInUse { .. })
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        let sock = dir.join("sock");
        let live = bind_unix(&sock).unwrap();
        assert!(matches!(
            bind_unix(&sock),
            Err(EngineError::AddressInUse { .. })
        ));
        drop(live);
        // The socket file stays behind, stale: it is replaced.
        let again = bind_unix(&sock);
        assert!(again.is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

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
