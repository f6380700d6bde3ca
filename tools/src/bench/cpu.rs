//! CPU time of this process and of the calling thread (`clock_gettime` with the
//! `*_CPUTIME_ID` clocks: nanosecond resolution, all threads for the process clock).

use rustix::time::{clock_gettime, ClockId};

fn ns(t: rustix::time::Timespec) -> u64 {
    let s = u64::try_from(t.tv_sec).unwrap_or(0);
    let n = u64::try_from(t.tv_nsec).unwrap_or(0);
    s.saturating_mul(1_000_000_000).saturating_add(n)
}

/// CPU nanoseconds used so far by every thread of this process.
pub fn process_ns() -> u64 {
    ns(clock_gettime(ClockId::ProcessCPUTime))
}

/// CPU nanoseconds used so far by the calling thread.
pub fn thread_ns() -> u64 {
    ns(clock_gettime(ClockId::ThreadCPUTime))
}

/// Wall-clock nanoseconds since the Unix epoch: the one clock both benchmark
/// processes share, to line up their timelines.
pub fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
