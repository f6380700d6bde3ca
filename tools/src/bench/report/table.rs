//! The report as a terminal table, with the link probe, the ratios, the
//! per-stage costs, the spread, the targets and, last, the verdict.

use super::{PrecopyFigures, Report, RunResult};
use crate::bench::events::Lat;
use crate::bench::units::human_bytes;

impl Report {
    /// The terminal table.
    pub fn table(&self) -> String {
        let mut runs = vec![&self.ringfault];
        if let Some(c) = &self.classic {
            runs.push(c);
        }
        if let Some(p) = &self.postcopy {
            runs.push(p);
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
        row("  relay / connect / start", &|r| {
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
        row("workload-seconds lost", &|r| {
            format!("{:.2} s", r.workload_lost_s)
        });
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
        row("frame protection", &|r| {
            if r.cipher.is_empty() {
                r.protection.clone()
            } else {
                format!("{} ({})", r.protection, r.cipher)
            }
        });
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
        row("ops/s after ÷ before", &|r| {
            format!("{:.2}", r.ops.after_over_before)
        });
        if runs.iter().any(|r| r.precopy.is_some()) {
            let pcf = |r: &RunResult, f: &dyn Fn(&PrecopyFigures) -> String| {
                r.precopy.as_ref().map_or("-".to_owned(), f)
            };
            row("pre-copy rounds", &|r| {
                pcf(r, &|p| format!("{} ({})", p.rounds, p.stopped_because))
            });
            row("  dirty pages per round", &|r| {
                pcf(r, &|p| format!("{:?}", p.dirty_per_round))
            });
            row("  pages sent before / after switch-over", &|r| {
                pcf(r, &|p| {
                    format!("{} / {}", p.pages_before_switch, p.pages_after_switch)
                })
            });
            row("  pages sent twice / discarded", &|r| {
                pcf(r, &|p| format!("{} / {}", p.pages_resent, p.discarded))
            });
            row("  ops/s during pre-copy (÷ untracked)", &|r| {
                pcf(r, &|p| {
                    format!("{:.0} ({:.2})", p.ops_during, p.tracked_over_untracked)
                })
            });
        }
        row("huge pages (AnonHugePages) source → destination", &|r| {
            let h = &r.huge_pages;
            let mib = |b: Option<u64>| b.map_or("-".to_owned(), |b| format!("{} MiB", b >> 20));
            format!(
                "{} → {}{}{}",
                mib(h.source_bytes),
                mib(h.destination_bytes),
                h.kept
                    .map_or(String::new(), |k| format!(" ({:.0}%)", k * 100.0)),
                if h.moved_whole > 0 {
                    format!(
                        ", {} MiB moved whole ({} MiB received in place)",
                        h.moved_whole * 2,
                        h.landed_whole * 2
                    )
                } else {
                    String::new()
                }
            )
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
        out.push_str(&match self.config["page_reporting_order"].as_u64() {
            Some(o) if o > 10 => format!("\nhost free-page reporting: off (page_reporting_order {o})\n"),
            Some(o) => format!(
                "\nhost free-page reporting: ON (page_reporting_order {o}): fresh pages may cost a host fault and figures may turn bimodal (docs/results.md)\n"
            ),
            None => "\nhost free-page reporting: none on this kernel\n".to_owned(),
        });
        if let Some(p) = &self.link_probe {
            out.push_str(&format!(
                "raw {} probe (2 MiB writes, same path, best of {}): {:.2} GB/s ({} in {:.2} s), {:.3} CPU-s per GiB\n",
                p.transport.to_uppercase(),
                p.runs_gbps.len().max(1),
                p.gbps,
                human_bytes(p.bytes),
                p.secs,
                p.cpu_s_per_gib
            ));
        }
        for r in &self.ratios {
            let parts: Vec<String> = [
                ("throughput", r.throughput),
                ("p50 fault latency", r.fault_p50),
                ("p99 fault latency", r.fault_p99),
                ("CPU/GiB", r.cpu_per_gib),
            ]
            .iter()
            .filter_map(|(k, v)| v.map(|v| format!("{k} {v:.2}")))
            .collect();
            if !parts.is_empty() {
                out.push_str(&format!(
                    "ringfault ÷ {}: {}\n",
                    r.baseline,
                    parts.join(", ")
                ));
            }
        }
        let st = &self.ringfault.stages;
        let g = |side: &str, k: &str| st[side][k].as_f64();
        if let (Some(_), Some(_)) = (
            g("source", "send_ns_per_page"),
            g("destination", "install_ns_per_page"),
        ) {
            let v = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.0}"));
            let u = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.1}"));
            out.push_str(&format!(
                "\nper-stage CPU, ns per bulk page: source claim {} / classify {} / seal {} / send {}; destination receive {} / verify {} / install+wake {}\n",
                v(g("source", "claim_ns_per_page")),
                v(g("source", "classify_ns_per_page")),
                v(g("source", "seal_ns_per_page")),
                v(g("source", "send_ns_per_page")),
                v(g("destination", "receive_ns_per_page")),
                v(g("destination", "verify_ns_per_page")),
                v(g("destination", "install_ns_per_page")),
            ));
            let requests = g("destination", "demand_requests").unwrap_or(0.0);
            if requests > 0.0 {
                out.push_str(&format!(
                    "per-stage CPU, µs per demand request: source {} / destination {} ({requests} requests)\n",
                    u(g("source", "demand_us_per_request")),
                    u(g("destination", "demand_us_per_request")),
                ));
            }
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
        if !self.targets.is_empty() {
            out.push_str("\ntargets (docs/targets.toml):\n");
            for t in &self.targets {
                let (v, verdict) = match (t.value, t.met) {
                    (Some(v), Some(m)) => (
                        format!("{v:.2}"),
                        if m { "met" } else { "MISSED" }.to_owned(),
                    ),
                    _ => (
                        "-".to_owned(),
                        format!("n/a: {}", t.note.as_deref().unwrap_or("no value")),
                    ),
                };
                out.push_str(&format!(
                    "  {:<36} {:>9}  goal {:<7} {}\n",
                    t.what, v, t.goal, verdict
                ));
            }
        }
        if self.verified {
            out.push_str("\nverified: yes (every page of every run equals the source's)\n");
        } else {
            out.push_str("\nverified: NO\n");
            for r in std::iter::once(&self.ringfault)
                .chain(self.classic.as_ref())
                .chain(&self.ringfault_runs)
                .chain(&self.classic_runs)
                .filter(|r| !r.verified)
            {
                out.push_str(&format!(
                    "  {}: {} MiB chunks differ, the first at {} MiB\n",
                    r.design,
                    r.mismatched_chunks,
                    r.first_mismatch_mib.map_or("-".into(), |m| m.to_string())
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::compute::tests::{dest, gathered};
    use super::super::{Report, RunResult};

    #[test]
    fn table_ends_with_the_verdict() {
        let r = RunResult::compute(gathered(dest(vec![1, 2], vec![5]), vec![5]));
        let rep = Report::new(
            "x".into(),
            serde_json::json!({}),
            None,
            vec![r],
            Vec::new(),
            &[],
        )
        .unwrap();
        assert!(rep.table().trim_end().ends_with("equals the source's)"));
        assert_eq!(rep.table().matches("verified").count(), 1, "printed once");
    }
}
