//! CPU time of this process and of the calling thread (`clock_gettime` with the
//! `*_CPUTIME_ID` clocks: nanosecond resolution, all threads for the process clock),
//! and the wall clock.

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

/// The wall clock as an ISO 8601 UTC time to the second, e.g.
/// `2025-12-01T04:24:00Z` (for the report's title).
pub fn utc_now() -> String {
    utc_of(wall_ns() / 1_000_000_000)
}

/// `secs` since the Unix epoch as an ISO 8601 UTC time (the civil-from-days
/// algorithm of H. Hinnant's `chrono`-compatible date library).
fn utc_of(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Shift the epoch to 0000-03-01, so that a leap day ends the year.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc_of(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::utc_of(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(super::utc_of(1_764_563_040), "2025-12-01T04:24:00Z");
    }
}
