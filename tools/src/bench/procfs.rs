//! What the bench reads from `/proc` and `/sys`: memory, load, the host's
//! free-page reporting knob, the kernel's release, huge pages of a mapping,
//! and the huge page pool.

/// The host's free-page reporting threshold (`page_reporting_order`), where
/// the module exists: 11 and above turns reporting off on x86 (no free block
/// is that large), 9 is the default.
pub fn page_reporting_order() -> Option<u32> {
    std::fs::read_to_string(PAGE_REPORTING)
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// Where the free-page reporting threshold lives.
pub const PAGE_REPORTING: &str = "/sys/module/page_reporting/parameters/page_reporting_order";

/// The running kernel's release (`uname -r`), from `/proc/sys/kernel/osrelease`.
pub fn kernel_release() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_owned())
}

/// `MemAvailable` from `/proc/meminfo`, in bytes.
pub fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The 1-minute load average, from `/proc/loadavg`.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Bytes of `AnonHugePages` in this process's mapping that contains `addr`
/// (from `/proc/self/smaps`).
pub fn anon_huge_bytes(addr: usize) -> Option<u64> {
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let mut inside = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next()?;
        if let Some((lo, hi)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            else {
                continue;
            };
            inside = (lo..hi).contains(&addr);
        } else if inside && first == "AnonHugePages:" {
            let kib: u64 = words.next()?.parse().ok()?;
            return kib.checked_mul(1024);
        }
    }
    None
}

/// Checks that the huge page pool holds both ends' memory.
pub fn check_huge_pool(page_size: u64, size: u64) -> anyhow::Result<()> {
    let kb = page_size / 1024;
    let dir = format!("/sys/kernel/mm/hugepages/hugepages-{kb}kB");
    let read = |f: &str| -> Option<u64> {
        std::fs::read_to_string(format!("{dir}/{f}"))
            .ok()
            .and_then(|v| v.trim().parse().ok())
    };
    let Some(free) = read("free_hugepages") else {
        anyhow::bail!("--hugepages: this kernel has no {kb} kB huge pages ({dir} is missing)");
    };
    let total = read("nr_hugepages").unwrap_or(0);
    let need = size.div_ceil(page_size) * 2;
    if free < need {
        let sysctl = if page_size == 2 << 20 {
            format!("sysctl vm.nr_hugepages={}", total + need - free)
        } else {
            format!("echo {} > {dir}/nr_hugepages", total + need - free)
        };
        anyhow::bail!(
            "--hugepages: a {} VM needs {need} free {kb} kB huge pages (source and destination) and the pool has {free} free of {total}; reserve more first: {sysctl}",
            super::units::human_bytes(size)
        );
    }
    Ok(())
}
