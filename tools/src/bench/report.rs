//! The benchmark's report: figures computed from what the two processes measured,
//! a terminal table, JSON, and ratios against the baselines.

use serde::Serialize;

use super::child::{Counts, DestDone, Lat};
use super::units::{human_bytes, to_f64};

/// Workload operations per second.
#[derive(Debug, Clone, Serialize)]
pub struct Ops {
    /// On the source, before switch-over.
    pub before: f64,
    /// On the destination, until every page was present.
    pub during: f64,
    /// On the destination, in the tail.
    pub after: f64,
    /// The worst 100 ms step during post-copy (as ops/s).
    pub worst_100ms: f64,
}

/// CPU time of the migration machinery (vCPU threads excluded).
#[derive(Debug, Clone, Serialize)]
pub struct Cpu {
    /// Source, seconds.
    pub source_s: f64,
    /// Destination, seconds.
    pub destination_s: f64,
    /// Source, seconds per GiB of guest memory.
    pub source_s_per_gib: f64,
    /// Destination, seconds per GiB.
    pub destination_s_per_gib: f64,
    /// Both ends, seconds per GiB.
    pub total_s_per_gib: f64,
}

/// Pages.
#[derive(Debug, Clone, Serialize)]
pub struct Pages {
    /// In the VM.
    pub total: u64,
    /// Faults the destination read from userfaultfd.
    pub faults: u64,
    /// Installed from demand replies.
    pub demand: u64,
    /// Data pages from the background push.
    pub bulk: u64,
    /// Zero pages (flag only).
    pub zero: u64,
    /// Never populated (range only).
    pub unpopulated: u64,
    /// Arrived twice.
    pub duplicate: u64,
}

/// Timelines for the plot, in 100 ms steps.
#[derive(Debug, Clone, Serialize)]
pub struct Timelines {
    /// Source workload ops per step; the last step ends at switch-over.
    pub source_ops: Vec<u64>,
    /// Destination workload ops per step from its resume.
    pub destination_ops: Vec<u64>,
    /// ms from switch-over to the destination's resume.
    pub resume_ms: f64,
    /// Bytes received per step from the destination's first connection.
    pub bytes: Vec<u64>,
    /// ms from switch-over to the first connection.
    pub connect_ms: f64,
    /// ms from switch-over to every page present.
    pub all_present_ms: f64,
}

/// The switch-over pause, stage by stage (ms).
#[derive(Debug, Clone, Serialize)]
pub struct PauseBreakdown {
    /// Source stopped its workload to the destination receiving `switch` (the
    /// benchmark's own relay through the parent).
    pub relay_ms: f64,
    /// Connections, handshakes, mapping and registering memory (includes the
    /// source's page-map scan, which runs before it accepts).
    pub connect_ms: f64,
    /// Starting the destination's vCPUs.
    pub resume_ms: f64,
    /// One page-map scan of the source's memory, timed separately.
    pub source_scan_ms: Option<f64>,
}

/// One design's run.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// `ringfault` or `classic`.
    pub design: String,
    /// Switch-over to every page present, seconds.
    pub total_s: f64,
    /// Source workload stopped to destination workload running, ms.
    pub switchover_pause_ms: f64,
    /// Where the pause went.
    pub pause_breakdown: PauseBreakdown,
    /// First connection to every page present, seconds.
    pub transfer_s: f64,
    /// Workload-observed latency of touches of missing pages that faulted.
    pub fault_latency: Lat,
    /// Touches of pages missing when checked that took under 1 µs (the page was
    /// installed in between; not counted as faults).
    pub fast_touches: u64,
    /// Its CDF (µs, fraction).
    pub fault_latency_cdf: Vec<(f64, f64)>,
    /// Engine-side service latency (fault read to install), if measured.
    pub engine_service: Option<Lat>,
    /// Its CDF.
    pub engine_service_cdf: Vec<(f64, f64)>,
    /// Bytes received / transfer time, GB/s (10^9 B/s).
    pub bulk_gbps: f64,
    /// Best 100 ms step, GB/s.
    pub peak_gbps: f64,
    /// Workload ops/s.
    pub ops: Ops,
    /// Workload-seconds lost: the post-copy phase's missing operations in
    /// seconds of the pre-switch-over rate, `total × (1 − during ÷ before)`.
    pub workload_lost_s: f64,
    /// CPU.
    pub cpu: Cpu,
    /// Pages.
    pub pages: Pages,
    /// Bytes the source sent.
    pub wire_bytes_sent: u64,
    /// Bytes the destination received.
    pub wire_bytes_received: u64,
    /// Bytes received per channel (demand lane first).
    pub channel_bytes: Vec<u64>,
    /// Both ends byte-identical at the end.
    pub verified: bool,
    /// 1 MiB chunks that differ.
    pub mismatched_chunks: u64,
    /// The first one, as a MiB offset.
    pub first_mismatch_mib: Option<u64>,
    /// Timelines.
    pub timelines: Timelines,
}

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
        let before = if g.warmup_s > 0.0 {
            to_f64(g.source_ops.iter().sum::<u64>()) / g.warmup_s
        } else {
            0.0
        };
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
                relay_ms: ns_diff_ms(d.t_switch_rx_ns, g.t_switch_ns),
                connect_ms: ns_diff_ms(d.t_connected_ns, d.t_switch_rx_ns),
                resume_ms: ns_diff_ms(d.t_resume_ns, d.t_connected_ns),
                source_scan_ms: g.source_scan_ms,
            },
            transfer_s: d.transfer_s,
            fault_latency: d.fault.clone(),
            fast_touches: d.fast_touches,
            fault_latency_cdf: d.fault_cdf.clone(),
            engine_service: d.service.clone(),
            engine_service_cdf: d.service_cdf.clone(),
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
                connect_ms: ns_diff_ms(d.t_switch_rx_ns, g.t_switch_ns),
                all_present_ms: all_ms,
            },
        }
    }
}

/// The raw stream probe (TCP, or Unix with `--unix`).
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    /// `tcp` or `unix`.
    pub transport: String,
    /// Bytes streamed.
    pub bytes: u64,
    /// Seconds.
    pub secs: f64,
    /// GB/s (the best of the runs).
    pub gbps: f64,
    /// Every run's GB/s.
    pub runs_gbps: Vec<f64>,
    /// CPU seconds per GiB, both ends (the kernel's TCP copy and little else).
    pub cpu_s_per_gib: f64,
}

/// ringfault ÷ a baseline.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    /// The baseline.
    pub baseline: String,
    /// Throughput ratio (higher is better for ringfault).
    pub throughput: Option<f64>,
    /// p50 fault latency ratio (lower is better).
    pub fault_p50: Option<f64>,
    /// p99 fault latency ratio (lower is better).
    pub fault_p99: Option<f64>,
    /// CPU per GiB ratio (lower is better).
    pub cpu_per_gib: Option<f64>,
}

/// A performance target of issue 4 and whether this run met it.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What.
    pub what: String,
    /// Measured.
    pub value: f64,
    /// The goal, in words.
    pub goal: String,
    /// Met.
    pub met: bool,
}

/// Everything.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The command line.
    pub command: String,
    /// Settings.
    pub config: serde_json::Value,
    /// Link limit.
    pub link_probe: Option<Probe>,
    /// ringfault: the run of median total time.
    pub ringfault: RunResult,
    /// The classic baseline, if run: the run of median total time.
    pub classic: Option<RunResult>,
    /// Headline figures over every run (with `--runs` above 1).
    pub spread: Vec<Spread>,
    /// Every ringfault run, in order (with `--runs` above 1).
    pub ringfault_runs: Vec<RunResult>,
    /// Every classic run, in order.
    pub classic_runs: Vec<RunResult>,
    /// Ratios ringfault ÷ baseline.
    pub ratios: Vec<Ratios>,
    /// Targets.
    pub targets: Vec<Target>,
    /// Every run verified.
    pub verified: bool,
}

/// A headline figure: its name and how to read it from a run.
type Figure = (&'static str, fn(&RunResult) -> f64);

/// One headline figure over several runs.
#[derive(Debug, Clone, Serialize)]
pub struct Spread {
    /// Design.
    pub design: String,
    /// Figure.
    pub what: String,
    /// Smallest.
    pub min: f64,
    /// Median.
    pub median: f64,
    /// Largest.
    pub max: f64,
    /// Runs.
    pub runs: usize,
}

impl Spread {
    fn of(runs: &[RunResult]) -> Vec<Spread> {
        let Some(first) = runs.first() else {
            return Vec::new();
        };
        let figures: [Figure; 8] = [
            ("total s", |r| r.total_s),
            ("lost s", |r| r.workload_lost_s),
            ("pause ms", |r| r.switchover_pause_ms),
            ("fault p50 µs", |r| r.fault_latency.p50_us),
            ("fault p99 µs", |r| r.fault_latency.p99_us),
            ("bulk GB/s", |r| r.bulk_gbps),
            ("CPU-s/GiB both", |r| r.cpu.total_s_per_gib),
            ("ops/s worst 100 ms", |r| r.ops.worst_100ms),
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
        let r = &ringfault;
        let mut targets = vec![
            Target {
                what: "fault latency p50 (µs)".into(),
                value: r.fault_latency.p50_us,
                goal: "≤ 15".into(),
                met: r.fault_latency.count > 0 && r.fault_latency.p50_us <= 15.0,
            },
            Target {
                what: "fault latency p99 (µs)".into(),
                value: r.fault_latency.p99_us,
                goal: "≤ 50".into(),
                met: r.fault_latency.count > 0 && r.fault_latency.p99_us <= 50.0,
            },
            Target {
                what: "CPU-s per GiB, both ends".into(),
                value: r.cpu.total_s_per_gib,
                goal: "≤ 1.5".into(),
                met: r.cpu.total_s_per_gib <= 1.5,
            },
        ];
        if let Some(p) = &link_probe {
            let v = ratio(r.bulk_gbps, p.gbps).unwrap_or(0.0);
            targets.insert(
                0,
                Target {
                    what: format!("bulk ÷ raw {} probe", p.transport.to_uppercase()),
                    value: v,
                    goal: "≥ 0.7".into(),
                    met: v >= 0.7,
                },
            );
        }
        if let Some(c) = &classic {
            let v = ratio(c.fault_latency.p99_us, r.fault_latency.p99_us).unwrap_or(0.0);
            targets.push(Target {
                what: "p99 fault latency, classic ÷ ringfault".into(),
                value: v,
                goal: "≥ 3".into(),
                met: v >= 3.0,
            });
        }
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
            ratios,
            targets,
            verified,
        })
    }

    /// The terminal table.
    pub fn table(&self) -> String {
        let mut runs = vec![&self.ringfault];
        if let Some(c) = &self.classic {
            runs.push(c);
        }
        let mut rows: Vec<(String, Vec<String>)> = Vec::new();
        let mut row = |name: &str, f: &dyn Fn(&RunResult) -> String| {
            rows.push((name.to_owned(), runs.iter().map(|r| f(r)).collect()));
        };
        let lat = |l: &Lat, f: fn(&Lat) -> f64| {
            if l.count == 0 {
                "-".to_owned()
            } else {
                format!("{:.1} µs", f(l))
            }
        };
        row("total time (switch-over → all present)", &|r| {
            format!("{:.2} s", r.total_s)
        });
        row("switch-over pause", &|r| {
            format!("{:.1} ms", r.switchover_pause_ms)
        });
        row("  relay / connect+map / resume", &|r| {
            let b = &r.pause_breakdown;
            format!(
                "{:.1} / {:.1} / {:.1} ms",
                b.relay_ms, b.connect_ms, b.resume_ms
            )
        });
        row("  (source page-map scan)", &|r| {
            r.pause_breakdown
                .source_scan_ms
                .map_or("-".into(), |s| format!("{s:.1} ms"))
        });
        row("workload-seconds lost", &|r| format!("{:.2} s", r.workload_lost_s));
        row("fault latency (workload) p50", &|r| {
            lat(&r.fault_latency, |l| l.p50_us)
        });
        row("                         p90", &|r| {
            lat(&r.fault_latency, |l| l.p90_us)
        });
        row("                         p99", &|r| {
            lat(&r.fault_latency, |l| l.p99_us)
        });
        row("                         p99.9", &|r| {
            lat(&r.fault_latency, |l| l.p999_us)
        });
        row("                         max", &|r| {
            lat(&r.fault_latency, |l| l.max_us)
        });
        row("                         faults timed", &|r| {
            r.fault_latency.count.to_string()
        });
        row("  missing-page touches under 1 µs", &|r| {
            r.fast_touches.to_string()
        });
        row(
            "engine service latency p50 / p99",
            &|r| match &r.engine_service {
                Some(s) if s.count > 0 => format!("{:.1} / {:.1} µs", s.p50_us, s.p99_us),
                _ => "not measured".into(),
            },
        );
        row("bulk throughput (bytes ÷ transfer time)", &|r| {
            format!("{:.2} GB/s", r.bulk_gbps)
        });
        row("best 100 ms", &|r| format!("{:.2} GB/s", r.peak_gbps));
        row("ops/s before (source)", &|r| format!("{:.0}", r.ops.before));
        row("ops/s during post-copy", &|r| {
            format!("{:.0}", r.ops.during)
        });
        row("ops/s after", &|r| format!("{:.0}", r.ops.after));
        row("ops/s worst 100 ms", &|r| {
            format!("{:.0}", r.ops.worst_100ms)
        });
        row("CPU-s per GiB, source", &|r| {
            format!("{:.3}", r.cpu.source_s_per_gib)
        });
        row("CPU-s per GiB, destination", &|r| {
            format!("{:.3}", r.cpu.destination_s_per_gib)
        });
        row("CPU-s per GiB, both", &|r| {
            format!("{:.3}", r.cpu.total_s_per_gib)
        });
        row("pages: total", &|r| r.pages.total.to_string());
        row("pages: faults read", &|r| r.pages.faults.to_string());
        row("pages: demand", &|r| r.pages.demand.to_string());
        row("pages: bulk", &|r| r.pages.bulk.to_string());
        row("pages: zero", &|r| r.pages.zero.to_string());
        row("pages: never populated", &|r| {
            r.pages.unpopulated.to_string()
        });
        row("pages: duplicate", &|r| r.pages.duplicate.to_string());
        row("bytes on the wire (received)", &|r| {
            human_bytes(r.wire_bytes_received)
        });
        row("verified", &|r| {
            if r.verified {
                "yes".into()
            } else {
                format!(
                    "NO ({} MiB chunks differ, first at {} MiB)",
                    r.mismatched_chunks,
                    r.first_mismatch_mib.unwrap_or(0)
                )
            }
        });
        let w0 = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
        let widths: Vec<usize> = (0..runs.len())
            .map(|i| {
                rows.iter()
                    .map(|r| r.1[i].chars().count())
                    .chain([runs[i].design.len()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        let pad =
            |s: &str, w: usize| format!("{s}{}", " ".repeat(w.saturating_sub(s.chars().count())));
        out.push_str(&pad("", w0));
        for (i, r) in runs.iter().enumerate() {
            out.push_str(&format!("  {}", pad(&r.design, widths[i])));
        }
        out.push('\n');
        for (name, vals) in &rows {
            out.push_str(&pad(name, w0));
            for (i, v) in vals.iter().enumerate() {
                out.push_str(&format!("  {}", pad(v, widths[i])));
            }
            out.push('\n');
        }
        if let Some(p) = &self.link_probe {
            out.push_str(&format!(
                "\nraw {} probe (2 MiB writes, same path, best of {}): {:.2} GB/s ({} in {:.2} s), {:.3} CPU-s per GiB\n",
                p.transport.to_uppercase(),
                p.runs_gbps.len().max(1),
                p.gbps,
                human_bytes(p.bytes),
                p.secs,
                p.cpu_s_per_gib
            ));
        }
        for r in &self.ratios {
            let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.2}"));
            out.push_str(&format!(
                "ringfault ÷ {}: throughput {}, p50 fault latency {}, p99 fault latency {}, CPU/GiB {}\n",
                r.baseline,
                f(r.throughput),
                f(r.fault_p50),
                f(r.fault_p99),
                f(r.cpu_per_gib)
            ));
        }
        if !self.spread.is_empty() {
            out.push_str("\nspread over runs (min / median / max):\n");
            for s in &self.spread {
                out.push_str(&format!(
                    "  {:<10} {:<20} {:>10.2} {:>10.2} {:>10.2}   ({} runs)\n",
                    s.design, s.what, s.min, s.median, s.max, s.runs
                ));
            }
        }
        out.push_str("\ntargets (issue 4):\n");
        for t in &self.targets {
            out.push_str(&format!(
                "  {:<42} {:>9.2}  goal {:<6} {}\n",
                t.what,
                t.value,
                t.goal,
                if t.met { "met" } else { "MISSED" }
            ));
        }
        out.push_str(&format!(
            "\nverified: {}\n",
            if self.verified { "yes" } else { "NO" }
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dest(ops_steps: Vec<u64>, digests: Vec<u64>) -> DestDone {
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
            fault: Lat::default(),
            fast_touches: 0,
            t_connected_ns: 1_000_000_000 + 9_000_000,
            fault_cdf: Vec::new(),
            ops_steps,
            bytes_steps: vec![100_000_000, 300_000_000, 100_000_000],
            channel_bytes: vec![500_000_000],
            cpu_ns: 2_000_000_000,
            digests,
        }
    }

    fn gathered(d: DestDone, source_digests: Vec<u64>) -> Gathered {
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
        let rep = Report::new("x".into(), serde_json::json!({}), None, runs, Vec::new()).unwrap();
        assert!((rep.ringfault.total_s - 0.2).abs() < 1e-9);
        assert_eq!(rep.ringfault_runs.len(), 3);
        let total = rep.spread.iter().find(|s| s.what == "total s").unwrap();
        assert!((total.min - 0.1).abs() < 1e-9 && (total.max - 0.3).abs() < 1e-9);
        assert!(rep.table().contains("spread over runs"));
    }

    #[test]
    fn table_ends_with_the_verdict() {
        let r = RunResult::compute(gathered(dest(vec![1, 2], vec![5]), vec![5]));
        let rep =
            Report::new("x".into(), serde_json::json!({}), None, vec![r], Vec::new()).unwrap();
        assert!(rep.table().trim_end().ends_with("verified: yes"));
    }
}
