//! CPU affinity and scheduling classes for the engine's threads.
//!
//! # Mechanism
//!
//! `sched_setaffinity(0, ...)` pins the calling thread to one CPU; on this
//! machine kind, waking a thread on the other vCPU costs 35–40 µs, so the
//! fault path keeps its handoffs on one CPU. Written on libc (the `affinity`
//! crate is dormant).
//!
//! # Kernel versions
//!
//! `sched_setaffinity`: Linux 2.5.8.
//!
//! # Hazards
//!
//! * A core outside the process's cpuset gives `EINVAL`.
//! * `online_cores` counts online CPUs, not the ones this process may use;
//!   cores are numbered by the kernel's CPU ids, which can have holes.

use std::io;
use std::mem;

/// Pins the calling thread to CPU `core`.
pub fn pin_current_thread(core: usize) -> Result<(), io::Error> {
    let max = usize::try_from(libc::CPU_SETSIZE).unwrap_or(1024);
    if core >= max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("core {core} is beyond CPU_SETSIZE ({max})"),
        ));
    }
    // SAFETY: cpu_set_t is a plain bitmask; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    // SAFETY: core < CPU_SETSIZE (checked), so CPU_SET stays inside `set`.
    unsafe { libc::CPU_SET(core, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 = this thread.
    let ret = unsafe { libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), &set) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// How a thread competes for CPU time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedClass {
    /// `SCHED_FIFO` at this priority (1..=99): a wake-up preempts every ordinary
    /// thread at once instead of waiting for the scheduler's next tick. For the
    /// demand path, whose threads sleep most of the time. Needs `CAP_SYS_NICE`.
    Realtime(i32),
    /// `SCHED_BATCH`: a CPU-bound thread that yields to woken interactive ones. For
    /// bulk lanes, so that they never delay a vCPU or the demand path.
    Batch,
}

/// Puts the calling thread in scheduling class `class`.
pub fn set_sched_class(class: SchedClass) -> Result<(), io::Error> {
    let (policy, priority) = match class {
        SchedClass::Realtime(p) => (libc::SCHED_FIFO, p.clamp(1, 99)),
        SchedClass::Batch => (libc::SCHED_BATCH, 0),
    };
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is a valid sched_param for the duration of the call; pid 0
    // names the calling thread.
    let ret = unsafe { libc::sched_setscheduler(0, policy, &param) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Places the calling thread: pins it to `core` if `pin`, and sets its class if
/// `class` is given. Failures are logged, not fatal: placement is an optimisation.
pub fn place_current_thread(role: &str, pin: bool, core: usize, class: Option<SchedClass>) {
    if pin {
        let cores = online_cores().max(1);
        if let Err(e) = pin_current_thread(core % cores) {
            tracing::warn!("{role}: cannot pin to core {}: {e}", core % cores);
        }
    }
    if let Some(c) = class {
        if let Err(e) = set_sched_class(c) {
            tracing::warn!("{role}: cannot set scheduling class {c:?}: {e}");
        }
    }
}

/// The CPUs the calling thread may run on.
pub fn current_affinity() -> Result<Vec<usize>, io::Error> {
    // SAFETY: cpu_set_t is a plain bitmask; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    // SAFETY: `set` is a writable cpu_set_t of the size passed.
    let ret = unsafe { libc::sched_getaffinity(0, mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let max = usize::try_from(libc::CPU_SETSIZE).unwrap_or(1024);
    // SAFETY: i < CPU_SETSIZE, so CPU_ISSET reads inside `set`.
    Ok((0..max)
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect())
}

/// Number of online CPUs (at least 1).
pub fn online_cores() -> usize {
    // SAFETY: sysconf takes an int and touches no memory.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_to_first_allowed() -> Result<(), io::Error> {
        assert!(online_cores() >= 1);
        let allowed = current_affinity()?;
        let first = allowed.first().copied().unwrap_or(0);
        std::thread::spawn(move || {
            pin_current_thread(first)?;
            assert_eq!(current_affinity()?, vec![first]);
            Ok::<(), io::Error>(())
        })
        .join()
        .map_err(|_| io::Error::other("thread panicked"))??;
        assert!(pin_current_thread(1 << 20).is_err());
        Ok(())
    }
}
