//! The engine's fenced system layer: every `unsafe` of the engine lives here.
//!
//! * [`uffd`]: userfaultfd, the destination's fault channel and page installs.
//! * [`mapping`]: guest memory mappings (raw pointers only) and receive buffers.
//! * [`pagemap`]: which pages of a region are populated.
//! * [`ring`]: a thin io_uring wrapper.
//! * [`affinity`]: pinning threads to CPUs.
//! * [`guest`]: guest memory as raw areas, and vectored sends straight from it.
//! * [`install`]: safe COPY/ZEROPAGE/MOVE installs from buffers the engine owns.
//! * [`ringio`]: safe io_uring receives into registered buffers, and polls.
//! * [`scm`]: passing descriptors over Unix sockets (`SCM_RIGHTS`), `SO_PEERCRED`.

pub mod affinity;
pub mod guest;
pub mod install;
pub mod mapping;
pub mod pagemap;
pub mod ring;
pub mod ringio;
pub mod scm;
pub mod uffd;
