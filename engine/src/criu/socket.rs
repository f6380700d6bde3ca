//! `lazy-pages.socket`: where `criu restore --lazy-pages` hands over each
//! restored task's userfaultfd.
//!
//! # Protocol (criu/uffd.c: `send_uffd`, `ud_open`, `lazy_sk_read_event`)
//! One connection from the restore, on a Unix stream socket named
//! `lazy-pages.socket` in the work directory. For each task of `pstree.img`,
//! in whatever order the tasks get there:
//! - the pid, a native `int` (4 bytes);
//! - if the pid is positive: one `sendmsg` of one byte carrying the task's
//!   userfaultfd as `SCM_RIGHTS`; a negative pid is a zombie and nothing
//!   follows.
//!
//! When every task is restored the restore sends the `u32`
//! [`RESTORE_FINISHED`] and closes the socket. Pids are never that large
//! (`pid_max` is at most 2^22), so the two cannot be confused.
//!
//! # Hazards
//! * On a stream socket the descriptor rides with the byte it was sent with:
//!   each read here asks for exactly the bytes of one field, so that the
//!   byte carrying a descriptor is never read together with the next pid.
//! * The socket path is replaced only if it is a stale socket: a file, or a
//!   socket another daemon listens on, is refused (`addr::bind_unix`).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::CriuError;
use crate::sys::scm::recv_with_fds;

/// The socket's file name in the work directory.
pub const SOCKET_NAME: &str = "lazy-pages.socket";

/// "ReSTore Finished": the last word the restore sends.
pub const RESTORE_FINISHED: u32 = 0x5253_5446;

/// The daemon's listening socket.
#[derive(Debug)]
pub struct Listener {
    listener: UnixListener,
    path: PathBuf,
}

impl Listener {
    /// Where it listens.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Only one restore per daemon: nobody may connect after it.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens on `WORK_DIR/lazy-pages.socket`.
pub fn listen(work_dir: &Path) -> Result<Listener, CriuError> {
    let path = work_dir.join(SOCKET_NAME);
    let listener = crate::addr::bind_unix(&path).map_err(|e| CriuError::Listen {
        path: path.display().to_string(),
        source: e,
    })?;
    Ok(Listener { listener, path })
}

/// One restored task as the restore handed it over.
#[derive(Debug)]
pub struct TaskFd {
    /// Its pid (as in the images).
    pub pid: u32,
    /// Its userfaultfd (initialised, non-blocking, nothing registered yet).
    pub uffd: OwnedFd,
}

/// Everything the restore handed over.
#[derive(Debug)]
pub struct Handover {
    /// The connection, kept: "restore finished" comes on it later.
    pub stream: UnixStream,
    /// Live tasks, in the order they came.
    pub tasks: Vec<TaskFd>,
    /// Pids of zombies (sent negative, without a descriptor).
    pub zombies: Vec<u32>,
}

/// Accepts the restore's connection and receives one entry per pid of
/// `pids` (those of `pstree.img`).
pub fn accept(listener: &Listener, pids: &[u32]) -> Result<Handover, CriuError> {
    let (stream, _) = listener
        .listener
        .accept()
        .map_err(|e| CriuError::socket(&listener.path, "accept", e))?;
    receive(stream, pids, &listener.path)
}

/// Receives one entry per pid of `pids` on an accepted connection.
pub fn receive(stream: UnixStream, pids: &[u32], path: &Path) -> Result<Handover, CriuError> {
    let mut tasks: Vec<TaskFd> = Vec::with_capacity(pids.len());
    let mut zombies = Vec::new();
    let mut seen = std::collections::HashSet::with_capacity(pids.len());
    let known: std::collections::HashSet<u32> = pids.iter().copied().collect();
    for _ in 0..pids.len() {
        let got = tasks.len() + zombies.len();
        let mut word = [0u8; 4];
        let mut fds = read_exact(&stream, &mut word, path, got, pids.len())?;
        let raw = i32::from_ne_bytes(word);
        let pid = raw.unsigned_abs();
        if !known.contains(&pid) {
            return Err(CriuError::UnexpectedPid {
                pid: raw,
                why: "is not in pstree.img",
            });
        }
        if !seen.insert(pid) {
            return Err(CriuError::UnexpectedPid {
                pid: raw,
                why: "was sent before",
            });
        }
        if raw < 0 {
            zombies.push(pid);
            continue;
        }
        let mut one = [0u8; 1];
        fds.extend(read_exact(&stream, &mut one, path, got, pids.len())?);
        if fds.len() != 1 {
            return Err(CriuError::NoUffd { pid: raw });
        }
        let Some(uffd) = fds.pop() else {
            return Err(CriuError::NoUffd { pid: raw });
        };
        check_is_uffd(raw, &uffd)?;
        crate::sys::scm::set_nonblocking(uffd.as_fd())
            .map_err(|e| CriuError::socket(path, "making a userfaultfd non-blocking", e))?;
        tasks.push(TaskFd { pid, uffd });
    }
    stream
        .set_nonblocking(true)
        .map_err(|e| CriuError::socket(path, "making the socket non-blocking", e))?;
    Ok(Handover {
        stream,
        tasks,
        zombies,
    })
}

/// Reads exactly `buf.len()` bytes, collecting any descriptors.
fn read_exact(
    stream: &UnixStream,
    buf: &mut [u8],
    path: &Path,
    got: usize,
    want: usize,
) -> Result<Vec<OwnedFd>, CriuError> {
    let mut fds = Vec::new();
    let mut have = 0;
    while have < buf.len() {
        let r = match recv_with_fds(stream.as_fd(), &mut buf[have..]) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CriuError::socket(path, "receiving a task", e)),
        };
        fds.extend(r.fds);
        if r.len == 0 {
            return Err(CriuError::ClosedEarly { got, want });
        }
        have += r.len;
    }
    Ok(fds)
}

/// Refuses a descriptor that is not a userfaultfd, by what `/proc` calls it.
fn check_is_uffd(pid: i32, fd: &OwnedFd) -> Result<(), CriuError> {
    match std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
        Ok(target) => {
            let kind = target.to_string_lossy().into_owned();
            if kind == "anon_inode:[userfaultfd]" {
                Ok(())
            } else {
                Err(CriuError::NotUffd { pid, kind })
            }
        }
        // Without /proc we cannot tell; the first ioctl will.
        Err(_) => Ok(()),
    }
}

/// The restore's end, as `criu restore --lazy-pages` does it: connect, then
/// [`send_task`] per task and [`send_finished`]. For tests.
pub fn connect(work_dir: &Path) -> std::io::Result<UnixStream> {
    UnixStream::connect(work_dir.join(SOCKET_NAME))
}

/// Sends one task: its pid, then (unless `uffd` is `None`: a zombie, sent
/// with a negative pid) the descriptor with one byte.
pub fn send_task(
    stream: &UnixStream,
    pid: i32,
    uffd: Option<std::os::fd::BorrowedFd<'_>>,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut s = stream;
    match uffd {
        None => s.write_all(&(-pid.abs()).to_ne_bytes()),
        Some(fd) => {
            s.write_all(&pid.to_ne_bytes())?;
            let n = crate::sys::scm::send_with_fd(stream.as_fd(), &[0], Some(fd))?;
            if n == 1 {
                Ok(())
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    "the descriptor's byte was not sent",
                ))
            }
        }
    }
}

/// Sends "restore finished".
pub fn send_finished(stream: &UnixStream) -> std::io::Result<()> {
    use std::io::Write;
    let mut s = stream;
    s.write_all(&RESTORE_FINISHED.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::uffd::{Features, Uffd, UffdOptions};

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
    fn tasks_and_zombies_are_received() {
        let (restore, daemon) = UnixStream::pair().unwrap();
        let a = uffd();
        let b = uffd();
        send_task(&restore, 10, Some(a.as_fd())).unwrap();
        send_task(&restore, 11, None).unwrap();
        send_task(&restore, 12, Some(b.as_fd())).unwrap();
        let h = receive(daemon, &[10, 11, 12], Path::new("x")).unwrap();
        assert_eq!(
            h.tasks.iter().map(|t| t.pid).collect::<Vec<_>>(),
            vec![10, 12]
        );
        assert_eq!(h.zombies, vec![11]);
    }

    #[test]
    fn bad_handovers_are_refused() {
        let (restore, daemon) = UnixStream::pair().unwrap();
        send_task(&restore, 10, Some(uffd().as_fd())).unwrap();
        drop(restore);
        let e = receive(daemon, &[10, 11], Path::new("x")).unwrap_err();
        assert!(
            matches!(e, CriuError::ClosedEarly { got: 1, want: 2 }),
            "{e}"
        );

        let (restore, daemon) = UnixStream::pair().unwrap();
        send_task(&restore, 99, Some(uffd().as_fd())).unwrap();
        let e = receive(daemon, &[10], Path::new("x")).unwrap_err();
        assert!(matches!(e, CriuError::UnexpectedPid { pid: 99, .. }), "{e}");

        let (restore, daemon) = UnixStream::pair().unwrap();
        let (other, _keep) = UnixStream::pair().unwrap();
        send_task(&restore, 10, Some(other.as_fd())).unwrap();
        let e = receive(daemon, &[10], Path::new("x")).unwrap_err();
        assert!(matches!(e, CriuError::NotUffd { .. }), "{e}");

        let (restore, daemon) = UnixStream::pair().unwrap();
        use std::io::Write;
        (&restore).write_all(&10i32.to_ne_bytes()).unwrap();
        (&restore).write_all(&[0]).unwrap();
        let e = receive(daemon, &[10], Path::new("x")).unwrap_err();
        assert!(matches!(e, CriuError::NoUffd { pid: 10 }), "{e}");
    }
}
