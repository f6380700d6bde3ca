//! The engine's fenced system layer: every `unsafe` block of the engine lives
//! here, each with a `// SAFETY:` comment; the rest of the engine is safe Rust
//! (`#![deny(unsafe_code)]` at the crate root).
//!
//! * [`uffd`]: userfaultfd: ABI, events, features, installs and write protection.
//! * [`install`]: safe COPY/ZEROPAGE/MOVE installs from buffers the engine owns.
//! * [`guest`]: guest memory, the one type that reaches it ([`guest::GuestMemory`]).
//! * [`mapping`]: memory mappings, page-aligned buffers, mirrored rings.
//! * [`ring`]: io_uring: the opcode probe, and a ring that owns what its
//!   in-flight operations reference.
//! * [`bufring`]: provided-buffer rings (stream rings and slot rings).
//! * [`pagemap`]: `PAGEMAP_SCAN`: populated, zero-page and written ranges.
//! * [`zero`]: zero detection at memory speed.
//! * [`affinity`]: pinning threads to CPUs, scheduling classes.
//! * [`scm`]: passing descriptors over Unix sockets (`SCM_RIGHTS`), `SO_PEERCRED`.
//! * [`notify`]: an eventfd for waking a thread's ring from another thread.
//! * [`tcp`]: the kernel's TCP state of a socket (`TCP_INFO`).

pub mod affinity;
pub mod bufring;
pub mod guest;
pub mod install;
pub mod mapping;
pub mod notify;
pub mod pagemap;
pub mod ring;
pub mod scm;
pub mod tcp;
pub mod uffd;
pub mod zero;
