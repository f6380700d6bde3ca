//! The wire format of CRIU's page server, as its lazy-pages side uses it
//! (criu/page-xfer.c: `struct page_server_iov`, `page_server_get_pages`,
//! `request_remote_pages`, `disconnect_from_page_server`).
//!
//! ```text
//!  offset  size  field
//!  0       4     cmd       command in the low 16 bits, PE_* flags above
//!  4       4     (padding: the C struct aligns the next field to 8)
//!  8       8     nr_pages
//!  16      8     vaddr     the address in the dumped task
//!  24      8     dst_id    the task's pid, for PS_IOV_GET and its reply
//! ```
//!
//! All native-endian (little-endian here). The lazy side sends
//! `PS_IOV_GET{nr_pages, vaddr, pid}`; the page server answers each, in
//! order, with `PS_IOV_ADD_F | PE_PRESENT << 16` and the same fields, its
//! `nr_pages` possibly cut at the end of the run it holds, followed by
//! `nr_pages` pages of data. A request for pages it does not hold ends its
//! session without an answer. At the end the lazy side sends `PS_IOV_CLOSE`
//! and the server answers with a 4-byte status (0) and waits for the close.

use super::image::PE_PRESENT;

/// Pages follow (`PS_IOV_ADD`, pre-dump era).
pub const PS_IOV_ADD: u32 = 1;
/// A hole (`PS_IOV_HOLE`).
pub const PS_IOV_HOLE: u32 = 2;
/// Open an image (`PS_IOV_OPEN`).
pub const PS_IOV_OPEN: u32 = 3;
/// Open an image, with a parent check (`PS_IOV_OPEN2`).
pub const PS_IOV_OPEN2: u32 = 4;
/// Parent check (`PS_IOV_PARENT`).
pub const PS_IOV_PARENT: u32 = 5;
/// Pages follow, with `PE_*` flags in the high bits (`PS_IOV_ADD_F`).
pub const PS_IOV_ADD_F: u32 = 6;
/// Ask for pages (`PS_IOV_GET`).
pub const PS_IOV_GET: u32 = 7;
/// End the session (`PS_IOV_CLOSE`).
pub const PS_IOV_CLOSE: u32 = 0x1023;
/// End the session and the server (`PS_IOV_FORCE_CLOSE`).
pub const PS_IOV_FORCE_CLOSE: u32 = 0x1024;

/// Bits of `cmd` that hold the command.
pub const PS_CMD_BITS: u32 = 16;

/// Bytes of one `struct page_server_iov`.
pub const PSI_LEN: usize = 32;

/// Bytes of the status word that answers `PS_IOV_CLOSE`.
pub const CLOSE_STATUS_LEN: usize = 4;

/// The largest request the daemon makes, in pages: CRIU's own limit for
/// one transfer (`MAX_XFER_LEN`, 4 MiB), which is also the most a page
/// server pipe holds.
pub const MAX_REQUEST_PAGES: u64 = 1024;

/// One `struct page_server_iov`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Psi {
    /// Command and flags.
    pub cmd: u32,
    /// Pages.
    pub nr_pages: u64,
    /// Address in the dumped task.
    pub vaddr: u64,
    /// The task's pid (for `PS_IOV_GET`).
    pub dst_id: u64,
}

impl Psi {
    /// `PS_IOV_GET` of `nr_pages` pages at `vaddr` of task `pid`.
    pub fn get(pid: u32, vaddr: u64, nr_pages: u64) -> Psi {
        Psi {
            cmd: PS_IOV_GET,
            nr_pages,
            vaddr,
            dst_id: u64::from(pid),
        }
    }

    /// `PS_IOV_CLOSE`.
    pub fn close() -> Psi {
        Psi {
            cmd: PS_IOV_CLOSE,
            ..Psi::default()
        }
    }

    /// The command (low 16 bits).
    pub fn command(&self) -> u32 {
        self.cmd & ((1 << PS_CMD_BITS) - 1)
    }

    /// The `PE_*` flags (high 16 bits).
    pub fn flags(&self) -> u32 {
        self.cmd >> PS_CMD_BITS
    }

    /// Its 32 bytes on the wire.
    pub fn encode(&self) -> [u8; PSI_LEN] {
        let mut b = [0u8; PSI_LEN];
        b[0..4].copy_from_slice(&self.cmd.to_le_bytes());
        b[8..16].copy_from_slice(&self.nr_pages.to_le_bytes());
        b[16..24].copy_from_slice(&self.vaddr.to_le_bytes());
        b[24..32].copy_from_slice(&self.dst_id.to_le_bytes());
        b
    }

    /// Decodes the first 32 bytes of `b` (`None` if shorter). The padding
    /// is ignored.
    pub fn decode(b: &[u8]) -> Option<Psi> {
        let b: &[u8; PSI_LEN] = b.get(..PSI_LEN)?.try_into().ok()?;
        let u64_at = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(w)
        };
        Some(Psi {
            cmd: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            nr_pages: u64_at(8),
            vaddr: u64_at(16),
            dst_id: u64_at(24),
        })
    }
}

/// A page server reply that does not answer the request it should.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PsiError {
    /// Not `PS_IOV_ADD_F`.
    #[error("command {cmd:#x} where PS_IOV_ADD_F ({PS_IOV_ADD_F}) was expected")]
    Command {
        /// The whole `cmd` word.
        cmd: u32,
    },
    /// Flags other than `PE_PRESENT`.
    #[error("flags {flags:#x} where PE_PRESENT was expected")]
    Flags {
        /// The flags.
        flags: u32,
    },
    /// Pages of another task or address than asked for.
    #[error("pages of task {got_pid} at {got_vaddr:#x} in answer to a request for task {want_pid} at {want_vaddr:#x}")]
    Mismatch {
        /// Asked.
        want_pid: u64,
        /// Asked.
        want_vaddr: u64,
        /// Got.
        got_pid: u64,
        /// Got.
        got_vaddr: u64,
    },
    /// No pages, or more than asked for.
    #[error("{got} pages in answer to a request for {asked}")]
    Count {
        /// Asked.
        asked: u64,
        /// Got.
        got: u64,
    },
    /// Something other than the 4-byte status after `PS_IOV_CLOSE`.
    #[error("the page server ended the session with status {status}")]
    CloseStatus {
        /// What it sent.
        status: i32,
    },
    /// Bytes after the status word.
    #[error("{bytes} unexpected bytes after the page server's final status")]
    Trailing {
        /// How many.
        bytes: usize,
    },
    /// A reply with no request outstanding.
    #[error("a reply that answers no request")]
    Unsolicited,
}

/// Checks `reply` against the request `asked`; returns the pages that
/// follow it (at least one, at most as many as asked for).
pub fn check_reply(reply: &Psi, asked: &Psi) -> Result<u64, PsiError> {
    if reply.command() != PS_IOV_ADD_F {
        return Err(PsiError::Command { cmd: reply.cmd });
    }
    if reply.flags() != PE_PRESENT {
        return Err(PsiError::Flags {
            flags: reply.flags(),
        });
    }
    if reply.dst_id != asked.dst_id || reply.vaddr != asked.vaddr {
        return Err(PsiError::Mismatch {
            want_pid: asked.dst_id,
            want_vaddr: asked.vaddr,
            got_pid: reply.dst_id,
            got_vaddr: reply.vaddr,
        });
    }
    if reply.nr_pages == 0 || reply.nr_pages > asked.nr_pages {
        return Err(PsiError::Count {
            asked: asked.nr_pages,
            got: reply.nr_pages,
        });
    }
    Ok(reply.nr_pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_c_struct() {
        let p = Psi::get(42, 0x7f00_0000_1000, 3);
        let b = p.encode();
        assert_eq!(&b[0..4], &7u32.to_le_bytes());
        assert_eq!(&b[4..8], &[0, 0, 0, 0]);
        assert_eq!(&b[8..16], &3u64.to_le_bytes());
        assert_eq!(&b[16..24], &0x7f00_0000_1000u64.to_le_bytes());
        assert_eq!(&b[24..32], &42u64.to_le_bytes());
        assert_eq!(Psi::decode(&b), Some(p));
        assert_eq!(Psi::decode(&b[..31]), None);
    }

    #[test]
    fn replies_are_checked_against_their_request() {
        let asked = Psi::get(42, 0x1000, 4);
        let ok = Psi {
            cmd: PS_IOV_ADD_F | (PE_PRESENT << PS_CMD_BITS),
            nr_pages: 2,
            ..asked
        };
        assert_eq!(check_reply(&ok, &asked), Ok(2));
        let bad = [
            Psi {
                cmd: PS_IOV_ADD,
                ..ok
            },
            Psi {
                cmd: PS_IOV_ADD_F | (3 << PS_CMD_BITS),
                ..ok
            },
            Psi {
                vaddr: 0x2000,
                ..ok
            },
            Psi { dst_id: 43, ..ok },
            Psi { nr_pages: 0, ..ok },
            Psi { nr_pages: 5, ..ok },
        ];
        for b in bad {
            assert!(check_reply(&b, &asked).is_err(), "{b:?}");
        }
    }
}
