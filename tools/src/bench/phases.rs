//! The workload phases that both designs' children share: the source's
//! warm-up and switch-over, the destination's progress lines, and its end of
//! a run (tail, digests of memory as it arrived).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::cpu;
use super::events::{command, emit, Event, Spec};
use super::vm::digests_parallel;
use super::workload::{Params, Presence, Workload, WorkloadResult};

/// Workload parameters for one end. Both ends log first writes and check
/// presence per access (the source against an all-present map), so that an
/// operation costs the same on both and "after ÷ before" compares like with
/// like.
pub fn params(spec: &Spec, destination: bool) -> Params {
    Params {
        vm: spec.vm,
        pattern: spec.pattern,
        threads: spec.threads,
        log_writes: true,
        salt: if destination { 2 } else { 1 },
    }
}

/// The source's presence check: every page is present, looked up the way
/// the destination looks up its own.
fn source_presence(pages: u64) -> Presence {
    let all = Arc::new(ringfault_engine::bitmap::AtomicBitmap::new(pages));
    all.set_range(0, pages);
    Arc::new(move |page| all.is_set(page))
}

/// The source's workload for the warm-up: started on `go`; `WarmedUp` is
/// announced after the warm-up, while it still runs.
pub fn warm_up(spec: &Spec, mem: Arc<dyn super::vm::GuestMem>) -> anyhow::Result<Workload> {
    super::workload::prepare(&params(spec, false));
    let c = command()?;
    anyhow::ensure!(c == "go", "expected `go`, got {c:?}");
    let wl = Workload::start(
        params(spec, false),
        mem,
        Some(source_presence(spec.vm.pages())),
    )?;
    std::thread::sleep(Duration::from_millis(spec.warmup_ms));
    emit(&Event::WarmedUp);
    Ok(wl)
}

/// The switch-over on the source: stops the vCPUs and announces it.
pub fn switch_over(spec: &Spec, wl: Workload) {
    let mut r = wl.stop();
    let t_ns = cpu::wall_ns();
    // The sampler's last step began at the stop: it is not part of the warm-up.
    let full = r.ops_steps.len().saturating_sub(1);
    let _ = spec;
    r.ops_steps.truncate(full.max(1));
    emit(&Event::Switch {
        t_ns,
        ops_steps: r.ops_steps,
    });
}

/// The classic design's workload phase: warm-up, then the switch-over at once
/// (it has no handshake to wait for).
pub fn source_phase(spec: &Spec, mem: Arc<dyn super::vm::GuestMem>) -> anyhow::Result<()> {
    let wl = warm_up(spec, mem)?;
    switch_over(spec, wl);
    Ok(())
}

/// Prints progress every 100 ms until `done`.
pub fn progress_printer(
    done: Arc<AtomicBool>,
    f: impl Fn() -> (u64, u64) + Send + 'static,
) -> Option<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("progress".into())
        .spawn(move || {
            // Relaxed: a stop flag, seen eventually.
            while !done.load(Ordering::Relaxed) {
                let (present, total) = f();
                emit(&Event::Progress { present, total });
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .ok()
}

/// The destination's end of a run: tail, verification digests, report.
pub struct Finish {
    /// The workload.
    pub workload: Workload,
    /// Process CPU ns when `switch` arrived.
    pub cpu0: u64,
}

impl Finish {
    /// Call as soon as every page is present: notes the time and CPU, runs the
    /// tail, stops the workload, hashes memory as it arrived, and returns the
    /// common fields.
    pub fn complete(
        self,
        spec: &Spec,
        mem: &dyn super::vm::GuestMem,
    ) -> (u64, u64, WorkloadResult, Vec<u64>, Option<u64>) {
        let t_all = cpu::wall_ns();
        let cpu1 = cpu::process_ns();
        self.workload.mark();
        emit(&Event::AllPresent);
        std::thread::sleep(Duration::from_millis(spec.tail_ms));
        let w = self.workload.stop();
        let huge = super::procfs::anon_huge_bytes(mem.base());
        let cpu_ns = (cpu1 - self.cpu0).saturating_sub(w.cpu_to_mark_ns);
        let restore = |page: u64, buf: &mut [u8]| w.restore_page(page, buf);
        let digests = digests_parallel(mem, spec.vm.pages(), &restore);
        (t_all, cpu_ns, w, digests, huge)
    }
}
