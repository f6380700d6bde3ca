//! Passing file descriptors over Unix stream sockets (`SCM_RIGHTS`), and learning
//! the peer's process (`SO_PEERCRED`).
//!
//! # Mechanism
//!
//! A VMM such as Firecracker hands its userfaultfd to an external page-fault
//! handler as ancillary data of one `sendmsg(2)` whose ordinary data is a JSON
//! description of guest memory. [`recv_with_fds`] is the receiving `recvmsg(2)`;
//! [`send_with_fd`] is the sending side, used by tests that play the VMM.
//! [`peer_credentials`] reads the pid, uid and gid the kernel recorded for the
//! peer when it connected; [`set_nonblocking`] makes a received descriptor
//! non-blocking.
//!
//! # Kernel versions
//!
//! `SCM_RIGHTS` and `SO_PEERCRED`: Linux 2.2. `MSG_CMSG_CLOEXEC`: 2.6.23.
//!
//! # Hazards
//!
//! * On a stream socket, ancillary data rides with the first byte it was sent
//!   with: a receive whose buffer stops short of the whole message still gets the
//!   descriptors, and the rest of the bytes come in later reads without any.
//! * A control buffer too small for what was sent makes the kernel close the
//!   descriptors that do not fit and set `MSG_CTRUNC`: reported as
//!   [`Received::truncated`]. Every descriptor that does arrive is owned at once
//!   (so an unexpected extra one is closed, never leaked), and is close-on-exec.
//! * `SO_PEERCRED` describes the process that called `connect(2)`; a descriptor
//!   passed on to another process keeps naming the first.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Most descriptors one [`recv_with_fds`] accepts; more are closed by the kernel.
pub const MAX_FDS: usize = 8;

/// The peer of a Unix socket, as the kernel recorded it at `connect(2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    /// Process id (0 if the peer is in a pid namespace we cannot see into).
    pub pid: i32,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// What one [`recv_with_fds`] got.
#[derive(Debug)]
pub struct Received {
    /// Bytes of ordinary data written to the buffer (0: end of stream).
    pub len: usize,
    /// Descriptors that came with them, owned and close-on-exec.
    pub fds: Vec<OwnedFd>,
    /// The kernel dropped ancillary data that did not fit (`MSG_CTRUNC`).
    pub truncated: bool,
}

/// Control-message buffer: 8-aligned, as `struct cmsghdr` requires.
#[repr(C, align(8))]
struct CmsgBuf([u8; CMSG_BUF_LEN]);

/// Room for one `SCM_RIGHTS` message of [`MAX_FDS`] descriptors: its header (16
/// bytes on 64-bit Linux) plus the ints, rounded up; checked against
/// `CMSG_SPACE` at run time in [`cmsg_space`].
const CMSG_BUF_LEN: usize = 16 + MAX_FDS * size_of::<RawFd>() + 8;

const _: () = assert!(size_of::<libc::ucred>() == 12);

/// `CMSG_SPACE` for `fds` descriptors, or an error if it exceeds our buffer.
fn cmsg_space(fds: usize) -> io::Result<usize> {
    let bytes = u32::try_from(fds * size_of::<RawFd>()).map_err(|_| too_many())?;
    // SAFETY: CMSG_SPACE is pure arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE(bytes) };
    let space = usize::try_from(space).map_err(|_| too_many())?;
    if space > CMSG_BUF_LEN {
        return Err(too_many());
    }
    Ok(space)
}

fn too_many() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("more than {MAX_FDS} descriptors in one message"),
    )
}

/// `getsockopt(SO_PEERCRED)`: who is at the other end of a Unix socket.
pub fn peer_credentials(sock: BorrowedFd<'_>) -> io::Result<PeerCred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = libc::socklen_t::try_from(size_of::<libc::ucred>()).unwrap_or(12);
    // SAFETY: `cred` is a writable `struct ucred` and `len` holds its size; the
    // kernel writes at most `len` bytes and updates `len`.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast::<libc::c_void>(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// Sets `O_NONBLOCK` on a received descriptor, e.g. a userfaultfd that a poll loop
/// reads until it is empty. The flag belongs to the open file description, so the
/// sender's copy of the descriptor becomes non-blocking too (Firecracker creates
/// its userfaultfd non-blocking anyway).
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument and touches no memory.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK != 0 {
        return Ok(());
    }
    // SAFETY: F_SETFL takes the flags by value and touches no memory.
    let ret = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One `recvmsg(2)` into `buf`, taking any `SCM_RIGHTS` descriptors that come
/// with the bytes. Blocks unless the socket is non-blocking (then `WouldBlock`).
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Received> {
    let mut cbuf = CmsgBuf([0u8; CMSG_BUF_LEN]);
    let controllen = cmsg_space(MAX_FDS)?;
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast::<libc::c_void>(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header; the fields that matter
    // are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast::<libc::c_void>();
    msg.msg_controllen = controllen;
    let n = loop {
        // SAFETY: `msg` points at one iovec over `buf` (writable for its length)
        // and at `cbuf` (writable for `controllen` <= its size, 8-aligned); all
        // three outlive the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let len = usize::try_from(n).unwrap_or(0);
    let mut fds = Vec::new();
    // SAFETY: `msg` was filled by recvmsg; CMSG_FIRSTHDR only reads its control
    // fields, which point into `cbuf`.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null header from CMSG_FIRSTHDR/NXTHDR lies wholly inside
        // the `msg_controllen` bytes of `cbuf` the kernel filled; read unaligned
        // to make no assumption beyond the byte buffer.
        let hdr: libc::cmsghdr = unsafe { cmsg.read_unaligned() };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN is pure arithmetic.
            let head = usize::try_from(unsafe { libc::CMSG_LEN(0) }).unwrap_or(usize::MAX);
            let payload = hdr.cmsg_len.saturating_sub(head);
            let count = payload / size_of::<RawFd>();
            // SAFETY: CMSG_DATA points just past this header, inside `cbuf`.
            let data = unsafe { libc::CMSG_DATA(cmsg) };
            for i in 0..count {
                // SAFETY: the kernel wrote `count` ints after the header, within
                // `cmsg_len` (checked by the kernel against `msg_controllen`).
                let raw: RawFd = unsafe {
                    data.add(i * size_of::<RawFd>())
                        .cast::<RawFd>()
                        .read_unaligned()
                };
                if raw >= 0 {
                    // SAFETY: SCM_RIGHTS installed this descriptor in our table
                    // for us alone; nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
        }
        // SAFETY: `cmsg` is a valid header inside `msg`'s control buffer.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Ok(Received {
        len,
        fds,
        truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
    })
}

/// One `sendmsg(2)` of `data`, with `fd` attached as `SCM_RIGHTS` if given:
/// what a VMM does to hand over its userfaultfd. Returns the bytes sent.
pub fn send_with_fd(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<usize> {
    let mut cbuf = CmsgBuf([0u8; CMSG_BUF_LEN]);
    let mut iov = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast::<libc::c_void>(),
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        let space = cmsg_space(1)?;
        msg.msg_control = cbuf.0.as_mut_ptr().cast::<libc::c_void>();
        msg.msg_controllen = space;
        // SAFETY: the control buffer is set and large enough for one header
        // (space >= CMSG_SPACE(4)), so CMSG_FIRSTHDR returns a pointer into it.
        let cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        if cmsg.is_null() {
            return Err(io::Error::other("no room for the control message"));
        }
        let bytes = u32::try_from(size_of::<RawFd>()).unwrap_or(4);
        // SAFETY: CMSG_LEN is pure arithmetic.
        let cmsg_len = usize::try_from(unsafe { libc::CMSG_LEN(bytes) }).unwrap_or(0);
        // SAFETY: `cmsg` points at 8-aligned writable bytes inside `cbuf` with
        // room for the header and one int (checked by cmsg_space above).
        unsafe {
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = cmsg_len;
            libc::CMSG_DATA(cmsg)
                .cast::<RawFd>()
                .write_unaligned(fd.as_raw_fd());
        }
    }
    loop {
        // SAFETY: `msg` points at one iovec over `data` (only read by the kernel)
        // and, if set, at the initialised control bytes in `cbuf`; all outlive
        // the call. MSG_NOSIGNAL: a vanished peer is an error, not SIGPIPE.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(usize::try_from(n).unwrap_or(0));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn passes_a_descriptor_with_the_bytes() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut file = tempfile();
        file.write_all(b"through the socket").unwrap();
        let sent = send_with_fd(a.as_fd(), b"[1,2]", Some(file.as_fd())).unwrap();
        assert_eq!(sent, 5);
        let mut buf = [0u8; 64];
        let got = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(&buf[..got.len], b"[1,2]");
        assert_eq!(got.fds.len(), 1);
        assert!(!got.truncated);
        let mut f = std::fs::File::from(got.fds.into_iter().next().unwrap());
        f.rewind().unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "through the socket");
        let cred = peer_credentials(b.as_fd()).unwrap();
        assert_eq!(cred.pid, i32::try_from(std::process::id()).unwrap());
    }

    #[test]
    fn set_nonblocking_makes_reads_return_at_once() {
        let (a, mut b) = UnixStream::pair().unwrap();
        set_nonblocking(b.as_fd()).unwrap();
        set_nonblocking(b.as_fd()).unwrap();
        let mut buf = [0u8; 4];
        let e = b.read(&mut buf).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        drop(a);
    }

    #[test]
    fn bytes_without_a_descriptor() {
        let (a, b) = UnixStream::pair().unwrap();
        send_with_fd(a.as_fd(), b"plain", None).unwrap();
        drop(a);
        let mut buf = [0u8; 64];
        let got = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(got.len, 5);
        assert!(got.fds.is_empty());
        let end = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!(end.len, 0, "end of stream");
    }

    fn tempfile() -> std::fs::File {
        let path = std::env::temp_dir().join(format!("rf-scm-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        f
    }
}
