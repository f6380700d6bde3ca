//! TCP socket state the kernel keeps: `TCP_INFO`.
//!
//! # Kernel versions
//! `TCP_INFO` with `tcpi_last_data_recv`: Linux 2.6.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

/// How long ago the kernel last received data on the TCP socket `fd`
/// (`tcpi_last_data_recv`, millisecond resolution), whether or not anyone
/// has read it yet: progress of a receive still in flight.
pub fn since_last_data(fd: BorrowedFd<'_>) -> io::Result<Duration> {
    // SAFETY: `tcp_info` is plain old data (integers only), so all zeros is
    // a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `info` is a writable `tcp_info` of `len` bytes that outlives
    // the call; the kernel writes at most `len` bytes and stores the length
    // it wrote in `len`; `fd` is a live descriptor borrowed for the call.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::addr_of_mut!(info).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Duration::from_millis(u64::from(info.tcpi_last_data_recv)))
}
