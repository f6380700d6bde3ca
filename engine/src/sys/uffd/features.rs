//! userfaultfd feature bits (`UFFDIO_API`) and the ioctls allowed on a
//! registered range, with the kernel version that brought each, so that a
//! missing one becomes a typed "unsupported: needs Linux X.Y" error.

use std::fmt;
use std::ops::BitOr;

use super::abi::{NR_CONTINUE, NR_COPY, NR_MOVE, NR_POISON, NR_WAKE, NR_WRITEPROTECT, NR_ZEROPAGE};
use super::UffdError;

/// A set of `UFFD_FEATURE_*` bits.
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Features(u64);

/// Feature bit, name, and the kernel that brought it.
const FEATURE_TABLE: &[(u64, &str, &str)] = &[
    (1 << 0, "PAGEFAULT_FLAG_WP", "Linux 5.7"),
    (1 << 1, "EVENT_FORK", "Linux 4.11"),
    (1 << 2, "EVENT_REMAP", "Linux 4.11"),
    (1 << 3, "EVENT_REMOVE", "Linux 4.11"),
    (1 << 4, "MISSING_HUGETLBFS", "Linux 4.11"),
    (1 << 5, "MISSING_SHMEM", "Linux 4.11"),
    (1 << 6, "EVENT_UNMAP", "Linux 4.11"),
    (1 << 7, "SIGBUS", "Linux 4.14"),
    (1 << 8, "THREAD_ID", "Linux 4.14"),
    (1 << 9, "MINOR_HUGETLBFS", "Linux 5.13"),
    (1 << 10, "MINOR_SHMEM", "Linux 5.14"),
    (1 << 11, "EXACT_ADDRESS", "Linux 5.18"),
    (1 << 12, "WP_HUGETLBFS_SHMEM", "Linux 5.19"),
    (1 << 13, "WP_UNPOPULATED", "Linux 6.4"),
    (1 << 14, "POISON", "Linux 6.6"),
    (1 << 15, "WP_ASYNC", "Linux 6.7"),
    (1 << 16, "MOVE", "Linux 6.8"),
];

impl Features {
    /// No features.
    pub const NONE: Features = Features(0);
    /// `UFFD_FEATURE_PAGEFAULT_FLAG_WP` (5.7).
    pub const PAGEFAULT_FLAG_WP: Features = Features(1 << 0);
    /// `UFFD_FEATURE_EVENT_FORK` (4.11; needs `CAP_SYS_PTRACE` unprivileged).
    pub const EVENT_FORK: Features = Features(1 << 1);
    /// `UFFD_FEATURE_EVENT_REMAP` (4.11).
    pub const EVENT_REMAP: Features = Features(1 << 2);
    /// `UFFD_FEATURE_EVENT_REMOVE` (4.11).
    pub const EVENT_REMOVE: Features = Features(1 << 3);
    /// `UFFD_FEATURE_MISSING_HUGETLBFS` (4.11).
    pub const MISSING_HUGETLBFS: Features = Features(1 << 4);
    /// `UFFD_FEATURE_MISSING_SHMEM` (4.11).
    pub const MISSING_SHMEM: Features = Features(1 << 5);
    /// `UFFD_FEATURE_EVENT_UNMAP` (4.11).
    pub const EVENT_UNMAP: Features = Features(1 << 6);
    /// `UFFD_FEATURE_SIGBUS` (4.14).
    pub const SIGBUS: Features = Features(1 << 7);
    /// `UFFD_FEATURE_THREAD_ID` (4.14).
    pub const THREAD_ID: Features = Features(1 << 8);
    /// `UFFD_FEATURE_MINOR_HUGETLBFS` (5.13).
    pub const MINOR_HUGETLBFS: Features = Features(1 << 9);
    /// `UFFD_FEATURE_MINOR_SHMEM` (5.14).
    pub const MINOR_SHMEM: Features = Features(1 << 10);
    /// `UFFD_FEATURE_EXACT_ADDRESS` (5.18).
    pub const EXACT_ADDRESS: Features = Features(1 << 11);
    /// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` (5.19).
    pub const WP_HUGETLBFS_SHMEM: Features = Features(1 << 12);
    /// `UFFD_FEATURE_WP_UNPOPULATED` (6.4).
    pub const WP_UNPOPULATED: Features = Features(1 << 13);
    /// `UFFD_FEATURE_POISON` (6.6).
    pub const POISON: Features = Features(1 << 14);
    /// `UFFD_FEATURE_WP_ASYNC` (6.7).
    pub const WP_ASYNC: Features = Features(1 << 15);
    /// `UFFD_FEATURE_MOVE` (6.8).
    pub const MOVE: Features = Features(1 << 16);

    /// Wraps raw feature bits.
    pub const fn from_bits(bits: u64) -> Features {
        Features(bits)
    }
    /// The raw feature bits.
    pub const fn bits(self) -> u64 {
        self.0
    }
    /// Whether every bit of `other` is in `self`.
    pub const fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }
    /// The first feature of `wanted` missing from `self`, as
    /// `(name, kernel version)`; an unknown bit is reported as "unknown".
    pub fn first_missing(self, wanted: Features) -> Option<(&'static str, &'static str)> {
        let missing = wanted.0 & !self.0;
        if missing == 0 {
            return None;
        }
        FEATURE_TABLE
            .iter()
            .find(|(bit, _, _)| missing & bit != 0)
            .map(|&(_, name, needs)| (name, needs))
            .or(Some(("unknown feature bit", "a newer kernel")))
    }
}

impl BitOr for Features {
    type Output = Features;
    fn bitor(self, rhs: Features) -> Features {
        Features(self.0 | rhs.0)
    }
}

impl fmt::Debug for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut set = f.debug_set();
        for (bit, name, _) in FEATURE_TABLE {
            if self.0 & bit != 0 {
                set.entry(name);
            }
        }
        let unknown = self.0 & !FEATURE_TABLE.iter().fold(0, |acc, (b, _, _)| acc | b);
        if unknown != 0 {
            set.entry(&format_args!("{unknown:#x}"));
        }
        set.finish()
    }
}

/// The ioctls the kernel allows on a registered range (`uffdio_register.ioctls`).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Ioctls(u64);

impl Ioctls {
    /// `UFFDIO_WAKE`.
    pub const WAKE: Ioctls = Ioctls(1 << NR_WAKE);
    /// `UFFDIO_COPY`.
    pub const COPY: Ioctls = Ioctls(1 << NR_COPY);
    /// `UFFDIO_ZEROPAGE` (not on hugetlbfs).
    pub const ZEROPAGE: Ioctls = Ioctls(1 << NR_ZEROPAGE);
    /// `UFFDIO_MOVE` (anonymous private memory only, Linux 6.8).
    pub const MOVE: Ioctls = Ioctls(1 << NR_MOVE);
    /// `UFFDIO_WRITEPROTECT`.
    pub const WRITEPROTECT: Ioctls = Ioctls(1 << NR_WRITEPROTECT);
    /// `UFFDIO_CONTINUE`.
    pub const CONTINUE: Ioctls = Ioctls(1 << NR_CONTINUE);
    /// `UFFDIO_POISON`.
    pub const POISON: Ioctls = Ioctls(1 << NR_POISON);

    /// Wraps raw bits (`1 << _UFFDIO_*`).
    pub const fn from_bits(bits: u64) -> Ioctls {
        Ioctls(bits)
    }
    /// The raw bits.
    pub const fn bits(self) -> u64 {
        self.0
    }
    /// Whether every ioctl of `other` is available.
    pub const fn contains(self, other: Ioctls) -> bool {
        self.0 & other.0 == other.0
    }
    /// `UFFDIO_COPY` is available.
    pub const fn has_copy(self) -> bool {
        self.contains(Ioctls::COPY)
    }
    /// `UFFDIO_ZEROPAGE` is available.
    pub const fn has_zeropage(self) -> bool {
        self.contains(Ioctls::ZEROPAGE)
    }
    /// `UFFDIO_MOVE` is available.
    pub const fn has_move(self) -> bool {
        self.contains(Ioctls::MOVE)
    }
    /// Typed error unless every ioctl of `needed` is available on the range.
    pub fn require(self, needed: Ioctls) -> Result<(), UffdError> {
        let missing = needed.0 & !self.0;
        let table: [(Ioctls, &str, &str); 7] = [
            (Ioctls::WAKE, "UFFDIO_WAKE", "Linux 4.3"),
            (Ioctls::COPY, "UFFDIO_COPY", "Linux 4.3"),
            (
                Ioctls::ZEROPAGE,
                "UFFDIO_ZEROPAGE (not on hugetlbfs)",
                "Linux 4.3",
            ),
            (
                Ioctls::MOVE,
                "UFFDIO_MOVE (anonymous private memory)",
                "Linux 6.8",
            ),
            (Ioctls::WRITEPROTECT, "UFFDIO_WRITEPROTECT", "Linux 5.7"),
            (Ioctls::CONTINUE, "UFFDIO_CONTINUE", "Linux 5.13"),
            (Ioctls::POISON, "UFFDIO_POISON", "Linux 6.6"),
        ];
        match table.iter().find(|(b, _, _)| missing & b.0 != 0) {
            None if missing == 0 => Ok(()),
            None => Err(UffdError::Unsupported {
                feature: "unknown userfaultfd ioctl",
                needs: "a newer kernel",
            }),
            Some(&(_, feature, needs)) => Err(UffdError::Unsupported { feature, needs }),
        }
    }
}

impl BitOr for Ioctls {
    type Output = Ioctls;
    fn bitor(self, rhs: Ioctls) -> Ioctls {
        Ioctls(self.0 | rhs.0)
    }
}

impl fmt::Debug for Ioctls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ioctls({:#x})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_feature_named() {
        let have = Features::EVENT_REMOVE;
        assert_eq!(
            have.first_missing(Features::EVENT_REMOVE | Features::MOVE),
            Some(("MOVE", "Linux 6.8"))
        );
        assert_eq!(have.first_missing(Features::EVENT_REMOVE), None);
    }
}
