//! Reading userfaultfd events: the 32-byte `struct uffd_msg` records, from
//! `read(2)` or from an io_uring read into a buffer, and their decoding.
//!
//! # Hazards
//! A FORK event carries a new uffd that the reader owns and must close.

use std::mem::size_of;

use super::abi::{
    UFFD_EVENT_FORK, UFFD_EVENT_PAGEFAULT, UFFD_EVENT_REMAP, UFFD_EVENT_REMOVE, UFFD_EVENT_UNMAP,
};

/// `struct uffd_msg`: one record read from a uffd.
///
/// The kernel struct is `__packed`, but every member of its union sits at its
/// natural alignment, so this 8-aligned mirror has the same layout. It is
/// `Copy` and plain old data, so an io_uring `READ` may target a
/// `[UffdMsg; N]` buffer directly.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UffdMsg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    /// Reserved.
    pub reserved1: u8,
    /// Reserved.
    pub reserved2: u16,
    /// Reserved.
    pub reserved3: u32,
    /// The event's union argument, as three native-endian words.
    pub arg: [u64; 3],
}

/// Size in bytes of one [`UffdMsg`] record.
pub const UFFD_MSG_SIZE: usize = size_of::<UffdMsg>();

/// A decoded userfaultfd event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A thread faulted at `addr` (page-aligned unless `EXACT_ADDRESS`).
    PageFault {
        /// Fault address.
        addr: u64,
        /// `PAGEFAULT_FLAG_*`.
        flags: u64,
        /// Faulting thread id (0 unless `THREAD_ID` was negotiated).
        thread_id: u32,
    },
    /// `[start, end)` was zapped (`MADV_DONTNEED`/`MADV_REMOVE`): its pages are
    /// missing again and will fault again.
    Remove {
        /// Range start.
        start: u64,
        /// Range end (exclusive).
        end: u64,
    },
    /// `[start, end)` was unmapped.
    Unmap {
        /// Range start.
        start: u64,
        /// Range end (exclusive).
        end: u64,
    },
    /// `mremap` moved `len` bytes from `from` to `to`.
    Remap {
        /// Old address.
        from: u64,
        /// New address.
        to: u64,
        /// Length in bytes.
        len: u64,
    },
    /// The process forked; `ufd` is a new uffd for the child, owned by the reader.
    Fork {
        /// The child's uffd.
        ufd: u32,
    },
    /// An event code this module does not know.
    Unknown(u8),
}

fn low_u32(word: u64) -> u32 {
    // A `__u32` at the start of a union member: the first four bytes in memory.
    let b = word.to_ne_bytes();
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

impl UffdMsg {
    /// Decodes this record.
    pub fn parse(&self) -> Event {
        let [a0, a1, a2] = self.arg;
        match self.event {
            UFFD_EVENT_PAGEFAULT => Event::PageFault {
                flags: a0,
                addr: a1,
                thread_id: low_u32(a2),
            },
            UFFD_EVENT_FORK => Event::Fork { ufd: low_u32(a0) },
            UFFD_EVENT_REMAP => Event::Remap {
                from: a0,
                to: a1,
                len: a2,
            },
            UFFD_EVENT_REMOVE => Event::Remove { start: a0, end: a1 },
            UFFD_EVENT_UNMAP => Event::Unmap { start: a0, end: a1 },
            other => Event::Unknown(other),
        }
    }

    /// Builds a record from the first 32 bytes of `bytes`, or `None` if short.
    pub fn from_bytes(bytes: &[u8]) -> Option<UffdMsg> {
        let b: &[u8; UFFD_MSG_SIZE] = bytes.get(..UFFD_MSG_SIZE)?.try_into().ok()?;
        let word = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_ne_bytes(w)
        };
        Some(UffdMsg {
            event: b[0],
            reserved1: b[1],
            reserved2: u16::from_ne_bytes([b[2], b[3]]),
            reserved3: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
            arg: [word(8), word(16), word(24)],
        })
    }
}

/// Decodes one record from raw bytes (e.g. an io_uring read buffer); `None` if
/// fewer than 32 bytes are given.
pub fn parse_bytes(bytes: &[u8]) -> Option<Event> {
    UffdMsg::from_bytes(bytes).map(|m| m.parse())
}

/// Decodes every whole record in `bytes` (a completed read of `n` bytes).
pub fn parse_all(bytes: &[u8]) -> impl Iterator<Item = Event> + '_ {
    bytes.chunks_exact(UFFD_MSG_SIZE).filter_map(parse_bytes)
}

const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::uffd::PAGEFAULT_FLAG_WRITE;

    #[test]
    fn parse_pagefault_bytes() {
        let mut b = [0u8; 32];
        b[0] = UFFD_EVENT_PAGEFAULT;
        b[8..16].copy_from_slice(&PAGEFAULT_FLAG_WRITE.to_ne_bytes());
        b[16..24].copy_from_slice(&0x7f00_1000u64.to_ne_bytes());
        b[24..28].copy_from_slice(&4242u32.to_ne_bytes());
        assert_eq!(
            parse_bytes(&b),
            Some(Event::PageFault {
                addr: 0x7f00_1000,
                flags: PAGEFAULT_FLAG_WRITE,
                thread_id: 4242
            })
        );
        assert_eq!(parse_bytes(&b[..31]), None);
    }

    #[test]
    fn parse_remove_and_unknown() {
        let m = UffdMsg {
            event: UFFD_EVENT_REMOVE,
            arg: [0x1000, 0x3000, 0],
            ..UffdMsg::default()
        };
        assert_eq!(
            m.parse(),
            Event::Remove {
                start: 0x1000,
                end: 0x3000
            }
        );
        let m = UffdMsg {
            event: 0x7e,
            ..UffdMsg::default()
        };
        assert_eq!(m.parse(), Event::Unknown(0x7e));
    }
}
