//! Computing a run's figures from what its two processes measured, and the
//! report from the runs: medians, spread, ratios, targets, the verdict.

use super::{
    Cpu, HugePages, Ops, Pages, PauseBreakdown, PrecopyFigures, Probe, Ratios, Report, RunResult,
    Spread, Timelines,
};
use crate::bench::events::{Counts, DestDone};
use crate::bench::targets;
use crate::bench::units::to_f64;

/// What the parent gathered of one run.
#[derive(Debug)]
pub struct Gathered {
    /// Design name.
    pub design: String,
    /// VM size in bytes.
    pub size: u64,
    /// Source switch time (wall ns).
    pub t_switch_ns: u64,
    /// Source workload steps.
    pub source_ops: Vec<u64>,
    /// Warm-up in seconds.
    pub warmup_s: f64,
    /// Source counts.
    pub source_counts: Counts,
    /// Source CPU ns.
    pub source_cpu_ns: u64,
    /// Source digests.
    pub source_digests: Vec<u64>,
    /// One page-map scan, ms.
    pub source_scan_ms: Option<f64>,
    /// The source engine's per-stage costs.
    pub source_stages: Option<serde_json::Value>,
    /// `AnonHugePages` of the source's guest memory, bytes.
    pub source_anon_huge_bytes: Option<u64>,
    /// The source's pre-copy report (`PrecopyReport` as JSON).
    pub source_precopy: Option<serde_json::Value>,
    /// The destination's measurements.
    pub dest: DestDone,
}

fn ns_diff_ms(a: u64, b: u64) -> f64 {
    if a >= b {
        to_f64(a - b) / 1e6
    } else {
        -to_f64(b - a) / 1e6
    }
}

impl RunResult {
    /// Computes the figures.
    pub fn compute(g: Gathered) -> RunResult {
        let d = &g.dest;
        let gib = to_f64(g.size) / to_f64(1 << 30);
        let pause = ns_diff_ms(d.t_resume_ns, g.t_switch_ns);
        let all_ms = ns_diff_ms(d.t_all_present_ns, g.t_switch_ns);
        let during_ms = ns_diff_ms(d.t_all_present_ns, d.t_resume_ns).max(0.0);
        // Steps that began before every page was present count as "during".
        let during_steps = {
            let f = (during_ms / 100.0).ceil();
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // f >= 0, small
            let n = f as usize;
            n.clamp(1, d.ops_steps.len().max(1))
        };
        let steps = &d.ops_steps;
        let during_sum: u64 = steps.iter().take(during_steps).sum();
        let during = if during_ms > 0.0 {
            to_f64(during_sum) / (to_f64(u64::try_from(during_steps).unwrap_or(1)) * 0.1)
        } else {
            0.0
        };
        // The tail, less the last step (cut short when the workload stopped).
        let tail: Vec<u64> = steps
            .iter()
            .skip(during_steps)
            .take(steps.len().saturating_sub(during_steps + 1))
            .copied()
            .collect();
        let after = if tail.is_empty() {
            0.0
        } else {
            to_f64(tail.iter().sum::<u64>())
                / (to_f64(u64::try_from(tail.len()).unwrap_or(1)) * 0.1)
        };
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // >= 0, small
        let full_steps = ((during_ms / 100.0).floor() as usize).max(1);
        let worst = steps
            .iter()
            .take(full_steps.min(steps.len()))
            .min()
            .map_or(0.0, |&w| to_f64(w) * 10.0);
        // The source's steps: the warm-up, then (with pre-copy) the rounds,
        // whose writes are tracked.
        let pc = g.source_precopy.as_ref();
        let pc_f = |k: &str| pc.and_then(|v| v[k].as_f64()).unwrap_or(0.0);
        let pc_u = |k: &str| pc.and_then(|v| v[k].as_u64()).unwrap_or(0);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // >= 0, small
        let tracked_steps = ((pc_f("duration_s") * 10.0).ceil() as usize).min(g.source_ops.len());
        let untracked = &g.source_ops[..g.source_ops.len() - tracked_steps];
        let rate = |v: &[u64]| {
            if v.is_empty() {
                0.0
            } else {
                to_f64(v.iter().sum::<u64>()) / (to_f64(u64::try_from(v.len()).unwrap_or(1)) * 0.1)
            }
        };
        let before = if g.warmup_s > 0.0 {
            rate(untracked)
        } else {
            0.0
        };
        let precopy = pc.map(|v| {
            // The first tracked step began before pre-copy: leave it out.
            let tracked = &g.source_ops[g.source_ops.len() - tracked_steps..];
            let during_pc = rate(tracked.get(1..).unwrap_or(&[]));
            let sent = g.source_counts.demand_pages
                + g.source_counts.bulk_pages
                + g.source_counts.zero_pages;
            PrecopyFigures {
                rounds: pc_u("rounds"),
                stopped_because: v["stopped_because"].as_str().unwrap_or("").to_owned(),
                pages_before_switch: pc_u("pages_before_switch"),
                pages_after_switch: sent.saturating_sub(pc_u("pages_before_switch")),
                pages_resent: pc_u("pages_resent"),
                discarded: pc_u("discarded"),
                dirty_per_round: v["dirty_per_round"]
                    .as_array()
                    .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
                    .unwrap_or_default(),
                duration_s: pc_f("duration_s"),
                ops_during: during_pc,
                tracked_over_untracked: if before > 0.0 {
                    during_pc / before
                } else {
                    0.0
                },
            }
        });
        let src_s = to_f64(g.source_cpu_ns) / 1e9;
        let dst_s = to_f64(d.cpu_ns) / 1e9;
        let mismatched = g
            .source_digests
            .iter()
            .zip(&d.digests)
            .filter(|(a, b)| a != b)
            .count();
        let first_mismatch = g
            .source_digests
            .iter()
            .zip(&d.digests)
            .position(|(a, b)| a != b)
            .map(|i| u64::try_from(i).unwrap_or(u64::MAX));
        let verified =
            mismatched == 0 && g.source_digests.len() == d.digests.len() && !d.digests.is_empty();
        let peak = d
            .bytes_steps
            .iter()
            .max()
            .map_or(0.0, |&b| to_f64(b) * 10.0 / 1e9);
        RunResult {
            design: g.design.clone(),
            total_s: all_ms / 1e3,
            switchover_pause_ms: pause,
            pause_breakdown: PauseBreakdown {
                // The destination may get the switch command before the
                // source stops (it connects, and the source stops the VM in
                // the handshake): the pause starts at the later of the two.
                relay_ms: ns_diff_ms(d.t_switch_rx_ns, g.t_switch_ns).max(0.0),
                connect_ms: ns_diff_ms(d.t_connected_ns, d.t_switch_rx_ns.max(g.t_switch_ns)),
                resume_ms: ns_diff_ms(d.t_resume_ns, d.t_connected_ns),
                source_scan_ms: g.source_scan_ms,
            },
            transfer_s: d.transfer_s,
            fault_latency: d.fault.clone(),
            fast_touches: d.fast_touches,
            fault_latency_cdf: d.fault_cdf.clone(),
            fault_latency_histogram: d.fault_hist.clone(),
            engine_service: d.service.clone(),
            engine_service_cdf: d.service_cdf.clone(),
            engine_service_histogram: d.service_hist.clone(),
            bulk_gbps: if d.transfer_s > 0.0 {
                to_f64(d.counts.wire_bytes) / d.transfer_s / 1e9
            } else {
                0.0
            },
            peak_gbps: peak,
            ops: Ops {
                before,
                during,
                after,
                worst_100ms: worst,
                after_over_before: if before > 0.0 { after / before } else { 0.0 },
            },
            workload_lost_s: if before > 0.0 {
                (all_ms / 1e3) * (1.0 - (during / before).clamp(0.0, 1.0))
            } else {
                0.0
            },
            cpu: Cpu {
                source_s: src_s,
                destination_s: dst_s,
                source_s_per_gib: src_s / gib,
                destination_s_per_gib: dst_s / gib,
                total_s_per_gib: (src_s + dst_s) / gib,
            },
            pages: Pages {
                total: g.size / 4096,
                faults: d.counts.faults,
                demand: d.counts.demand_pages,
                bulk: d.counts.bulk_pages,
                zero: d.counts.zero_pages,
                unpopulated: d.counts.unpopulated_pages,
                duplicate: d.counts.duplicate_pages,
            },
            wire_bytes_sent: g.source_counts.wire_bytes,
            wire_bytes_received: d.counts.wire_bytes,
            channel_bytes: d.channel_bytes.clone(),
            verified,
            mismatched_chunks: u64::try_from(mismatched).unwrap_or(u64::MAX),
            first_mismatch_mib: first_mismatch,
            timelines: Timelines {
                source_ops: g.source_ops.clone(),
                destination_ops: d.ops_steps.clone(),
                resume_ms: pause,
                bytes: d.bytes_steps.clone(),
                connect_ms: ns_diff_ms(d.t_connected_ns, g.t_switch_ns).max(0.0),
                all_present_ms: all_ms,
            },
            stages: serde_json::json!({
                "source": g.source_stages.clone(),
                "destination": d.stages.clone(),
            }),
            recv_in_flight_min: d.recv_in_flight_min,
            protection: d.protection.clone(),
            cipher: d.cipher.clone(),
            metadata_bytes: d.metadata_bytes,
            precopy,
            huge_pages: HugePages {
                source_bytes: g.source_anon_huge_bytes,
                destination_bytes: d.anon_huge_bytes,
                kept: match (g.source_anon_huge_bytes, d.anon_huge_bytes) {
                    (Some(s), Some(d)) if s > 0 => Some(to_f64(d) / to_f64(s)),
                    _ => None,
                },
                moved_whole: d.counts.huge_moves,
                landed_whole: d.counts.landed_moves,
            },
        }
    }
}

/// A headline figure: its name and how to read it from a run.
type Figure = (&'static str, fn(&RunResult) -> f64);

impl Spread {
    fn of(runs: &[RunResult]) -> Vec<Spread> {
        let Some(first) = runs.first() else {
            return Vec::new();
        };
        let figures: [Figure; 9] = [
            ("total s", |r| r.total_s),
            ("lost s", |r| r.workload_lost_s),
            ("pause ms", |r| r.switchover_pause_ms),
            ("fault p50 µs", |r| r.fault_latency.p50_us),
            ("fault p99 µs", |r| r.fault_latency.p99_us),
            ("bulk GB/s", |r| r.bulk_gbps),
            ("CPU-s/GiB both", |r| r.cpu.total_s_per_gib),
            ("ops/s worst 100 ms", |r| r.ops.worst_100ms),
            ("ops after ÷ before", |r| r.ops.after_over_before),
        ];
        figures
            .iter()
            .map(|(what, f)| {
                let mut v: Vec<f64> = runs.iter().map(f).collect();
                v.sort_by(f64::total_cmp);
                Spread {
                    design: first.design.clone(),
                    what: (*what).to_owned(),
                    min: v[0],
                    median: v[v.len() / 2],
                    max: v[v.len() - 1],
                    runs: v.len(),
                }
            })
            .collect()
    }
}

/// The run of median total time.
fn median_run(runs: &[RunResult]) -> Option<RunResult> {
    let mut v: Vec<&RunResult> = runs.iter().collect();
    v.sort_by(|a, b| a.total_s.total_cmp(&b.total_s));
    v.get(v.len() / 2).map(|r| (*r).clone())
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a.is_finite()).then(|| a / b)
}

impl Report {
    /// Assembles the report.
    pub fn new(
        command: String,
        config: serde_json::Value,
        link_probe: Option<Probe>,
        mut ringfault_runs: Vec<RunResult>,
        mut classic_runs: Vec<RunResult>,
        target_specs: &[targets::Spec],
    ) -> anyhow::Result<Report> {
        let mut spread = Vec::new();
        if ringfault_runs.len() > 1 {
            spread.extend(Spread::of(&ringfault_runs));
            spread.extend(Spread::of(&classic_runs));
        }
        let Some(ringfault) = median_run(&ringfault_runs) else {
            anyhow::bail!("a report needs at least one run");
        };
        let classic = median_run(&classic_runs);
        if ringfault_runs.len() == 1 {
            ringfault_runs.clear();
            classic_runs.clear();
        }
        let mut ratios = Vec::new();
        if let Some(p) = &link_probe {
            ratios.push(Ratios {
                baseline: format!("raw-{}", p.transport),
                throughput: ratio(ringfault.bulk_gbps, p.gbps),
                fault_p50: None,
                fault_p99: None,
                cpu_per_gib: ratio(ringfault.cpu.total_s_per_gib, p.cpu_s_per_gib),
            });
        }
        if let Some(c) = &classic {
            ratios.push(Ratios {
                baseline: "classic".into(),
                throughput: ratio(ringfault.bulk_gbps, c.bulk_gbps),
                fault_p50: ratio(ringfault.fault_latency.p50_us, c.fault_latency.p50_us),
                fault_p99: ratio(ringfault.fault_latency.p99_us, c.fault_latency.p99_us),
                cpu_per_gib: ratio(ringfault.cpu.total_s_per_gib, c.cpu.total_s_per_gib),
            });
        }
        let targets = targets::check(target_specs, &config, &ringfault, classic.as_ref());
        let verified = ringfault.verified
            && classic.as_ref().is_none_or(|c| c.verified)
            && ringfault_runs
                .iter()
                .chain(&classic_runs)
                .all(|r| r.verified);
        Ok(Report {
            command,
            config,
            link_probe,
            ringfault,
            classic,
            spread,
            ringfault_runs,
            classic_runs,
            postcopy: None,
            postcopy_runs: Vec::new(),
            ratios,
            targets,
            verified,
        })
    }

    /// Adds the pure post-copy runs of `--compare postcopy`, with their
    /// spread, ratio and targets.
    pub fn with_postcopy(
        mut self,
        mut runs: Vec<RunResult>,
        target_specs: &[targets::Spec],
    ) -> Report {
        let Some(p) = median_run(&runs) else {
            return self;
        };
        if runs.len() > 1 {
            self.spread.extend(Spread::of(&runs));
        }
        self.ratios.push(Ratios {
            baseline: "postcopy".into(),
            throughput: ratio(self.ringfault.bulk_gbps, p.bulk_gbps),
            fault_p50: ratio(self.ringfault.fault_latency.p50_us, p.fault_latency.p50_us),
            fault_p99: ratio(self.ringfault.fault_latency.p99_us, p.fault_latency.p99_us),
            cpu_per_gib: ratio(self.ringfault.cpu.total_s_per_gib, p.cpu.total_s_per_gib),
        });
        self.verified &= p.verified && runs.iter().all(|r| r.verified);
        self.targets.extend(targets::check_postcopy(
            target_specs,
            &self.config,
            &self.ringfault,
            &p,
        ));
        if runs.len() == 1 {
            runs.clear();
        }
        self.postcopy = Some(p);
        self.postcopy_runs = runs;
        self
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::bench::events::{Counts, DestDone, Lat};

    pub(crate) fn dest(ops_steps: Vec<u64>, digests: Vec<u64>) -> DestDone {
        DestDone {
            t_switch_rx_ns: 1_000_000_000 + 200_000,
            t_resume_ns: 1_000_000_000 + 10_000_000,
            t_all_present_ns: 1_000_000_000 + 260_000_000,
            transfer_s: 0.25,
            counts: Counts {
                wire_bytes: 500_000_000,
                ..Counts::default()
            },
            service: None,
            service_cdf: Vec::new(),
            service_hist: Vec::new(),
            fault: Lat::default(),
            fast_touches: 0,
            t_connected_ns: 1_000_000_000 + 9_000_000,
            fault_cdf: Vec::new(),
            fault_hist: Vec::new(),
            ops_steps,
            bytes_steps: vec![100_000_000, 300_000_000, 100_000_000],
            channel_bytes: vec![500_000_000],
            cpu_ns: 2_000_000_000,
            digests,
            stages: None,
            recv_in_flight_min: None,
            protection: "none".into(),
            cipher: String::new(),
            metadata_bytes: 0,
            anon_huge_bytes: None,
        }
    }

    pub(crate) fn gathered(d: DestDone, source_digests: Vec<u64>) -> Gathered {
        Gathered {
            design: "ringfault".into(),
            size: 1 << 30,
            t_switch_ns: 1_000_000_000,
            source_ops: vec![100; 20],
            warmup_s: 2.0,
            source_counts: Counts::default(),
            source_cpu_ns: 1_000_000_000,
            source_digests,
            source_scan_ms: Some(15.0),
            source_stages: None,
            source_anon_huge_bytes: None,
            source_precopy: None,
            dest: d,
        }
    }

    #[test]
    fn phases_of_the_ops_timeline() {
        // Resume at 10 ms, all present at 260 ms: steps 0..=2 are "during" (the
        // third began before the end), 3..=5 the tail, 6 is cut and dropped.
        let d = dest(vec![10, 20, 30, 400, 500, 600, 7], vec![1, 2]);
        let r = RunResult::compute(gathered(d, vec![1, 2]));
        assert!((r.switchover_pause_ms - 10.0).abs() < 1e-6);
        assert!((r.total_s - 0.26).abs() < 1e-9);
        assert!((r.ops.before - 1000.0).abs() < 1e-9, "{}", r.ops.before);
        assert!((r.ops.during - 200.0).abs() < 1e-9, "{}", r.ops.during);
        assert!((r.ops.after - 5000.0).abs() < 1e-9, "{}", r.ops.after);
        // Worst full step of post-copy: steps 0 and 1 (250 ms of post-copy).
        assert!((r.ops.worst_100ms - 100.0).abs() < 1e-9);
        assert!((r.bulk_gbps - 2.0).abs() < 1e-9);
        assert!((r.peak_gbps - 3.0).abs() < 1e-9);
        assert!((r.cpu.total_s_per_gib - 3.0).abs() < 1e-9);
        assert!((r.pause_breakdown.connect_ms - 8.8).abs() < 1e-6);
        assert!(r.verified);
    }

    #[test]
    fn verification_needs_every_chunk_equal() {
        let r = RunResult::compute(gathered(dest(vec![1], vec![1, 2, 3]), vec![1, 9, 3]));
        assert!(!r.verified);
        assert_eq!(r.mismatched_chunks, 1);
        assert_eq!(r.first_mismatch_mib, Some(1));
        let r = RunResult::compute(gathered(dest(vec![1], vec![1, 2]), vec![1, 2, 3]));
        assert!(!r.verified, "a missing chunk is a failure");
        let r = RunResult::compute(gathered(dest(vec![1], vec![]), vec![]));
        assert!(!r.verified, "nothing hashed proves nothing");
    }

    #[test]
    fn several_runs_report_the_median_and_the_spread() {
        let runs: Vec<RunResult> = [300u64, 100, 200]
            .iter()
            .map(|&ms| {
                let mut d = dest(vec![1, 2], vec![5]);
                d.t_all_present_ns = 1_000_000_000 + ms * 1_000_000;
                RunResult::compute(gathered(d, vec![5]))
            })
            .collect();
        let rep = Report::new(
            "x".into(),
            serde_json::json!({}),
            None,
            runs,
            Vec::new(),
            &[],
        )
        .unwrap();
        assert!((rep.ringfault.total_s - 0.2).abs() < 1e-9);
        assert_eq!(rep.ringfault_runs.len(), 3);
        let total = rep.spread.iter().find(|s| s.what == "total s").unwrap();
        assert!((total.min - 0.1).abs() < 1e-9 && (total.max - 0.3).abs() < 1e-9);
        assert!(rep.table().contains("spread over runs"));
    }
}
