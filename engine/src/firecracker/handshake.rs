//! The handler's end of Firecracker's Unix socket: bind, accept one connection,
//! learn the peer's pid (`SO_PEERCRED`), and receive one message (the JSON
//! mappings, with the userfaultfd as `SCM_RIGHTS`).
//!
//! Firecracker sends the message with one `sendmsg` right after `connect`, but a
//! stream socket may still deliver it in pieces: reading goes on until the JSON is
//! complete, the peer closes, [`MAX_MESSAGE`] bytes have come, or
//! [`MESSAGE_TIMEOUT`] passes. The descriptor arrives with the first bytes.
//!
//! Afterwards Firecracker keeps the socket open and sends nothing more; its end of
//! file (Firecracker exited, or was killed) is the handler's signal to stop:
//! [`peer_gone`].

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use super::mappings::{self, GuestRegionMapping, MappingsError};
use super::FirecrackerError;
use crate::sys::scm::{peer_credentials, recv_with_fds, PeerCred};

/// Largest mappings message accepted (a real one is well under 1 KiB per region).
pub const MAX_MESSAGE: usize = 1 << 20;

/// How long to wait for the whole message after Firecracker connected.
pub const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// What Firecracker handed over.
#[derive(Debug)]
pub struct Handshake {
    /// The connection, kept open: its end of file means Firecracker is gone.
    pub stream: UnixStream,
    /// Who connected.
    pub peer: PeerCred,
    /// Firecracker's userfaultfd: initialised, non-blocking, every region
    /// registered in MISSING mode, REMOVE events on.
    pub uffd: OwnedFd,
    /// Guest memory, checked.
    pub mappings: Vec<GuestRegionMapping>,
}

/// Binds the handler socket at `path`, replacing only a stale socket: a
/// regular file there, or a socket another live handler listens on, is
/// refused (two handlers configured with one path must never hand a VM
/// another VM's memory).
pub fn listen(path: &Path) -> Result<UnixListener, FirecrackerError> {
    Ok(crate::addr::bind_unix(path)?)
}

/// Waits up to `ms` milliseconds for `stream` to become readable (or closed).
pub fn wait_readable(stream: &UnixStream, ms: i32) -> std::io::Result<bool> {
    let mut fds = [rustix::event::PollFd::new(
        stream,
        rustix::event::PollFlags::IN | rustix::event::PollFlags::HUP,
    )];
    let timeout = rustix::event::Timespec {
        tv_sec: i64::from(ms / 1000),
        tv_nsec: i64::from(ms % 1000) * 1_000_000,
    };
    match rustix::event::poll(&mut fds, Some(&timeout)) {
        Ok(n) => Ok(n > 0),
        Err(rustix::io::Errno::INTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// One non-blocking receive: `None` when nothing is waiting.
fn recv_nonblocking(stream: &UnixStream, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
    match rustix::net::recv(stream, buf, rustix::net::RecvFlags::DONTWAIT) {
        Ok((n, _)) => Ok(Some(n)),
        Err(rustix::io::Errno::AGAIN) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Accepts Firecracker's connection and receives its message.
pub fn accept(listener: &UnixListener) -> Result<Handshake, FirecrackerError> {
    let (stream, _) = listener.accept().map_err(|e| FirecrackerError::Socket {
        path: listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
            .unwrap_or_else(|| "?".into()),
        what: "accept",
        source: e,
    })?;
    receive(stream)
}

/// Receives the mappings and the userfaultfd on an accepted connection.
pub fn receive(stream: UnixStream) -> Result<Handshake, FirecrackerError> {
    let peer = peer_credentials(stream.as_fd())
        .map_err(|e| FirecrackerError::io("reading the peer's credentials (SO_PEERCRED)", e))?;
    tracing::info!(
        "Firecracker connected: pid {}, uid {}, gid {}",
        peer.pid,
        peer.uid,
        peer.gid
    );
    let deadline = Instant::now() + MESSAGE_TIMEOUT;
    let mut buf = vec![0u8; 64 << 10];
    let mut have = 0usize;
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut truncated = false;
    let mappings = loop {
        if have == buf.len() {
            if buf.len() >= MAX_MESSAGE {
                return Err(FirecrackerError::TooLarge { limit: MAX_MESSAGE });
            }
            buf.resize((buf.len() * 2).min(MAX_MESSAGE), 0);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(FirecrackerError::Timeout {
                secs: MESSAGE_TIMEOUT.as_secs(),
                got: have,
            });
        }
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
        let ready = wait_readable(&stream, ms)
            .map_err(|e| FirecrackerError::io("waiting for Firecracker's message", e))?;
        if !ready {
            continue;
        }
        let got = recv_with_fds(stream.as_fd(), &mut buf[have..])
            .map_err(|e| FirecrackerError::io("receiving Firecracker's message", e))?;
        truncated |= got.truncated;
        fds.extend(got.fds);
        if got.len == 0 {
            if have == 0 {
                return Err(FirecrackerError::ClosedEarly { got: 0 });
            }
            // The peer closed: what we have is all there is.
            break mappings::parse(&buf[..have])?;
        }
        have += got.len;
        match mappings::parse(&buf[..have]) {
            Ok(m) => break m,
            Err(MappingsError::Json { source }) if source.is_eof() => continue,
            Err(e) => return Err(e.into()),
        }
    };
    // More descriptors than fit make the kernel truncate: that is "too many" too.
    let uffd = match (fds.len(), truncated) {
        (0, false) => return Err(FirecrackerError::NoUffd),
        (1, false) => fds.pop().ok_or(FirecrackerError::NoUffd)?,
        (n, _) => return Err(FirecrackerError::ExtraFds { count: n.max(2) }),
    };
    check_is_uffd(&uffd)?;
    // Firecracker's is non-blocking already; another VMM's might not be, and the
    // fault loop reads until the userfaultfd is empty.
    crate::sys::scm::set_nonblocking(uffd.as_fd())
        .map_err(|e| FirecrackerError::io("making the userfaultfd non-blocking", e))?;
    stream
        .set_nonblocking(true)
        .map_err(|e| FirecrackerError::io("making the handler socket non-blocking", e))?;
    for (i, m) in mappings.iter().enumerate() {
        tracing::info!(
            "region {i}: {:#x}+{:#x} from file offset {:#x}, {}-byte pages",
            m.base_host_virt_addr,
            m.size,
            m.offset,
            m.page_size
        );
    }
    Ok(Handshake {
        stream,
        peer,
        uffd,
        mappings,
    })
}

/// Refuses a descriptor that is not a userfaultfd, by what `/proc` calls it.
fn check_is_uffd(fd: &OwnedFd) -> Result<(), FirecrackerError> {
    let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    match std::fs::read_link(&link) {
        Ok(target) => {
            let kind = target.to_string_lossy().into_owned();
            if kind == "anon_inode:[userfaultfd]" {
                Ok(())
            } else {
                Err(FirecrackerError::NotUffd { kind })
            }
        }
        // Without /proc we cannot tell; the first ioctl will.
        Err(_) => Ok(()),
    }
}

/// The VMM's side, as Firecracker does it: connects to the handler at `socket` and
/// sends the mappings with `uffd` attached in one `sendmsg`. The returned stream
/// must stay open for as long as the handler should serve; closing it (or exiting)
/// tells the handler to stop.
pub fn hand_over(
    socket: &Path,
    mappings: &[GuestRegionMapping],
    uffd: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<UnixStream> {
    let stream = UnixStream::connect(socket)?;
    let json = mappings::to_json(mappings);
    let sent = crate::sys::scm::send_with_fd(stream.as_fd(), json.as_bytes(), Some(uffd))?;
    if sent != json.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            format!("sent {sent} of {} bytes of the mappings", json.len()),
        ));
    }
    Ok(stream)
}

/// Whether Firecracker has gone: end of file or an error on its socket. Stray
/// bytes (Firecracker sends none after the mappings) are read and dropped.
pub fn peer_gone(stream: &UnixStream) -> bool {
    let mut scratch = [0u8; 256];
    loop {
        match recv_nonblocking(stream, &mut scratch) {
            Ok(None) => return false,
            Ok(Some(0)) | Err(_) => return true,
            Ok(Some(_)) => continue,
        }
    }
}

/// Waits up to `patience` for Firecracker's socket to close; true if it did.
/// Used when an ioctl fails, since a dying Firecracker loses its memory (`ESRCH`)
/// a moment before its socket closes.
pub fn wait_peer_gone(stream: &UnixStream, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    loop {
        if peer_gone(stream) {
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
        if wait_readable(stream, ms).is_err() {
            return true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::scm::send_with_fd;
    use crate::sys::uffd::{Features, Uffd, UffdOptions};

    const JSON: &str =
        r#"[{"base_host_virt_addr":1048576,"size":8192,"offset":0,"page_size":4096}]"#;

    fn uffd() -> Uffd {
        let u = Uffd::open(UffdOptions {
            nonblock: true,
            user_mode_only: true,
        })
        .unwrap();
        u.api(Features::NONE).unwrap();
        u
    }

    #[test]
    fn a_message_in_two_pieces_is_reassembled() {
        let (fc, handler) = UnixStream::pair().unwrap();
        let u = uffd();
        let (a, b) = JSON.as_bytes().split_at(20);
        send_with_fd(fc.as_fd(), a, Some(u.as_fd())).unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            send_with_fd(fc.as_fd(), b, None).unwrap();
            fc
        });
        let hs = receive(handler).unwrap();
        assert_eq!(hs.mappings.len(), 1);
        assert_eq!(hs.peer.pid, i32::try_from(std::process::id()).unwrap());
        let fc = t.join().unwrap();
        assert!(!peer_gone(&hs.stream));
        drop(fc);
        assert!(wait_peer_gone(&hs.stream, Duration::from_secs(1)));
    }

    #[test]
    fn closing_before_the_message_is_an_error() {
        let (fc, handler) = UnixStream::pair().unwrap();
        drop(fc);
        let e = receive(handler).unwrap_err();
        assert!(matches!(e, FirecrackerError::ClosedEarly { got: 0 }), "{e}");
    }

    #[test]
    fn a_message_without_the_uffd_is_refused() {
        let (fc, handler) = UnixStream::pair().unwrap();
        send_with_fd(fc.as_fd(), JSON.as_bytes(), None).unwrap();
        let e = receive(handler).unwrap_err();
        assert!(matches!(e, FirecrackerError::NoUffd), "{e}");
    }

    #[test]
    fn a_descriptor_that_is_not_a_uffd_is_refused() {
        let (fc, handler) = UnixStream::pair().unwrap();
        let (other, _keep) = UnixStream::pair().unwrap();
        send_with_fd(fc.as_fd(), JSON.as_bytes(), Some(other.as_fd())).unwrap();
        let e = receive(handler).unwrap_err();
        assert!(matches!(e, FirecrackerError::NotUffd { .. }), "{e}");
        assert!(e.to_string().contains("socket:["), "{e}");
    }

    #[test]
    fn the_vmm_side_hands_over_what_the_handler_reads() {
        let dir = std::env::temp_dir().join(format!("rf-hs-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("h.sock");
        let listener = listen(&path).unwrap();
        // A stale socket file is replaced.
        drop(listener);
        let listener = listen(&path).unwrap();
        let u = uffd();
        let m = mappings::parse(JSON.as_bytes()).unwrap();
        let _fc = hand_over(&path, &m, u.as_fd()).unwrap();
        let hs = accept(&listener).unwrap();
        assert_eq!(hs.mappings, m);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
