//! An SVG of a run, written by hand (no plotting crate): a title block saying
//! what ran (command, date, cores, kernel), the CDF of workload fault latency
//! (log axis) from the whole histogram, throughput over time from the
//! switch-over, and workload ops/s over time (before switch-over on the source,
//! after it on the destination).
//!
//! A timeline's last 100 ms step is cut short (the transfer or the workload
//! ended inside it): it is drawn over its true length, or left out, never as
//! a fall.

use std::fmt::Write;

use super::report::{Report, RunResult};
use super::units::to_f64;

const W: f64 = 900.0;
const PANEL_H: f64 = 240.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 30.0;
/// Title block above the first panel.
const TITLE_H: f64 = 64.0;
const TOP: f64 = TITLE_H + 40.0;
const GAP: f64 = 70.0;
const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];

struct Panel {
    y0: f64,
    x_min: f64,
    x_max: f64,
    y_min: f64,
    y_max: f64,
    log_x: bool,
}

impl Panel {
    fn x(&self, v: f64) -> f64 {
        let (a, b, v) = if self.log_x {
            (
                self.x_min.log10(),
                self.x_max.log10(),
                v.max(self.x_min).log10(),
            )
        } else {
            (self.x_min, self.x_max, v)
        };
        LEFT + (v - a) / (b - a).max(1e-9) * (W - LEFT - RIGHT)
    }
    fn y(&self, v: f64) -> f64 {
        self.y0 + PANEL_H - (v - self.y_min) / (self.y_max - self.y_min).max(1e-9) * PANEL_H
    }
    fn frame(&self, svg: &mut String, title: &str, xlabel: &str, ylabel: &str) {
        let _ = write!(
            svg,
            r##"<rect x="{LEFT}" y="{}" width="{}" height="{PANEL_H}" fill="none" stroke="#444"/>"##,
            self.y0,
            W - LEFT - RIGHT
        );
        let _ = write!(
            svg,
            r##"<text x="{LEFT}" y="{}" font-size="14" font-weight="bold">{title}</text>"##,
            self.y0 - 8.0
        );
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" font-size="12" text-anchor="middle">{xlabel}</text>"##,
            LEFT + (W - LEFT - RIGHT) / 2.0,
            self.y0 + PANEL_H + 32.0
        );
        let _ = write!(
            svg,
            r##"<text x="14" y="{}" font-size="12" transform="rotate(-90 14 {})" text-anchor="middle">{ylabel}</text>"##,
            self.y0 + PANEL_H / 2.0,
            self.y0 + PANEL_H / 2.0
        );
        for v in nice_ticks(self.y_min, self.y_max, 5) {
            let _ = write!(
                svg,
                r##"<text x="{}" y="{}" font-size="10" text-anchor="end">{}</text>"##,
                LEFT - 4.0,
                self.y(v) + 3.0,
                short(v)
            );
        }
        let ticks: Vec<f64> = if self.log_x {
            let mut t = Vec::new();
            let mut v = 10f64.powf(self.x_min.log10().floor());
            while v <= self.x_max * 1.0001 {
                if v >= self.x_min * 0.9999 {
                    t.push(v);
                }
                v *= 10.0;
            }
            t
        } else {
            nice_ticks(self.x_min, self.x_max, 8)
        };
        for v in ticks {
            let _ = write!(
                svg,
                r##"<line x1="{x}" x2="{x}" y1="{}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" font-size="10" text-anchor="middle">{}</text>"##,
                self.y0,
                self.y0 + PANEL_H,
                self.y0 + PANEL_H + 14.0,
                short(v),
                x = self.x(v)
            );
        }
    }
    fn line(&self, svg: &mut String, pts: &[(f64, f64)], color: &str, dash: bool) {
        if pts.is_empty() {
            return;
        }
        let d: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", self.x(x), self.y(y)))
            .collect();
        let _ = write!(
            svg,
            r##"<polyline fill="none" stroke="{color}" stroke-width="1.8" {} points="{}"/>"##,
            if dash {
                r#"stroke-dasharray="5,3""#
            } else {
                ""
            },
            d.join(" ")
        );
    }
}

/// Round tick values (1, 2 or 5 times a power of ten apart) covering `a..=b`.
fn nice_ticks(a: f64, b: f64, about: u32) -> Vec<f64> {
    let range = (b - a).abs().max(1e-9);
    let raw = range / f64::from(about);
    let mag = 10f64.powf(raw.log10().floor());
    let n = raw / mag;
    let step = mag
        * if n <= 1.0 {
            1.0
        } else if n <= 2.0 {
            2.0
        } else if n <= 5.0 {
            5.0
        } else {
            10.0
        };
    let mut v = (a / step).ceil() * step;
    let mut out = Vec::new();
    while v <= b + step * 1e-6 && out.len() < 50 {
        out.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        v += step;
    }
    out
}

fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 1e9 {
        format!("{:.1}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 10.0 || a == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn legend(svg: &mut String, y: f64, items: &[(String, &str, bool)]) {
    let mut x = LEFT + 10.0;
    for (name, color, dash) in items {
        let _ = write!(
            svg,
            r##"<line x1="{x}" x2="{}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="2" {}/><text x="{}" y="{}" font-size="11">{name}</text>"##,
            x + 20.0,
            if *dash {
                r#"stroke-dasharray="5,3""#
            } else {
                ""
            },
            x + 24.0,
            y + 4.0
        );
        x += 30.0 + 6.5 * to_f64(u64::try_from(name.len()).unwrap_or(10));
    }
}

/// `s` with `&`, `<`, `>` and `"` escaped, for SVG text.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The title block: what ran, when, and on what.
fn title(svg: &mut String, report: &Report) {
    let c = &report.config;
    let mut cmd = report.command.clone();
    if cmd.chars().count() > 120 {
        cmd = cmd.chars().take(117).collect::<String>() + "...";
    }
    let _ = write!(
        svg,
        r##"<text x="{LEFT}" y="24" font-size="15" font-weight="bold">{}</text>"##,
        escape(&cmd)
    );
    let cores = c["cores"]
        .as_u64()
        .map_or("? cores".to_owned(), |n| format!("{n} cores"));
    let line = format!(
        "{} · {cores} · Linux {} · {} {}, {} vCPU threads",
        c["date"].as_str().unwrap_or("date unknown"),
        c["kernel"].as_str().unwrap_or("unknown"),
        c["size"]
            .as_u64()
            .map_or("?".to_owned(), super::units::human_bytes),
        c["pattern"].as_str().unwrap_or("?"),
        c["threads"].as_u64().unwrap_or(0),
    );
    let _ = write!(
        svg,
        r##"<text x="{LEFT}" y="46" font-size="12" fill="#444">{}</text>"##,
        escape(&line)
    );
}

/// A CDF (µs, fraction): from the whole histogram when there is one, else
/// from the quantile points.
fn cdf(histogram: &[(f64, u64)], quantiles: &[(f64, f64)]) -> Vec<(f64, f64)> {
    let total: u64 = histogram.iter().map(|h| h.1).sum();
    if total == 0 {
        return quantiles.to_vec();
    }
    let mut seen = 0u64;
    let mut out = Vec::with_capacity(histogram.len() + 1);
    if let Some(first) = histogram.first() {
        out.push((first.0, 0.0));
    }
    for &(us, count) in histogram {
        seen += count;
        out.push((us, to_f64(seen) / to_f64(total)));
    }
    out
}

/// Throughput into the destination (ms since switch-over, GB/s) in 100 ms
/// steps from its first connection. The last step ends with the transfer: it
/// is drawn over that length, or left out when under 20 ms (too short to
/// give a rate).
fn throughput(r: &RunResult) -> Vec<(f64, f64)> {
    throughput_of(
        &r.timelines.bytes,
        r.timelines.connect_ms,
        r.transfer_s * 1e3,
    )
}

/// [`throughput`] of bytes per 100 ms `steps` from `t0` ms, the transfer
/// lasting `transfer_ms`.
fn throughput_of(steps: &[u64], t0: f64, transfer_ms: f64) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(steps.len() * 2);
    for (i, &b) in steps.iter().enumerate() {
        let start = 100.0 * to_f64(u64::try_from(i).unwrap_or(0));
        let last = i + 1 == steps.len();
        let len = if last && transfer_ms > start && transfer_ms < start + 100.0 {
            transfer_ms - start
        } else {
            100.0
        };
        if last && len < 20.0 {
            break;
        }
        // Bytes per ms ÷ 10^6 = GB/s.
        let v = to_f64(b) / len / 1e6;
        out.push((t0 + start, v));
        out.push((t0 + start + len, v));
    }
    out
}

/// Values per 100 ms step from `offset_ms` on, times `scale`, as a step line.
fn step_series(steps: &[u64], offset_ms: f64, scale: f64) -> Vec<(f64, f64)> {
    steps
        .iter()
        .enumerate()
        .flat_map(|(i, &b)| {
            let t0 = offset_ms + 100.0 * to_f64(u64::try_from(i).unwrap_or(0));
            let v = to_f64(b) * scale;
            [(t0, v), (t0 + 100.0, v)]
        })
        .collect()
}

/// The SVG document.
pub fn svg(report: &Report) -> String {
    let mut runs: Vec<&RunResult> = vec![&report.ringfault];
    if let Some(c) = &report.classic {
        runs.push(c);
    }
    let h = TOP + 3.0 * (PANEL_H + GAP);
    let mut s = format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>"##
    );
    title(&mut s, report);
    // 1. CDF.
    // Per run: the workload's CDF and the engine's.
    let cdfs: Vec<[Vec<(f64, f64)>; 2]> = runs
        .iter()
        .map(|r| {
            [
                cdf(&r.fault_latency_histogram, &r.fault_latency_cdf),
                cdf(&r.engine_service_histogram, &r.engine_service_cdf),
            ]
        })
        .collect();
    let all_x: Vec<f64> = cdfs
        .iter()
        .flat_map(|[a, b]| a.iter().chain(b))
        .map(|p| p.0)
        .filter(|v| *v > 0.0)
        .collect();
    let x_min = all_x.iter().copied().fold(f64::INFINITY, f64::min);
    let x_max = all_x.iter().copied().fold(0.0, f64::max);
    let p = Panel {
        y0: TOP,
        x_min: if x_min.is_finite() {
            x_min.max(0.1)
        } else {
            1.0
        },
        x_max: x_max.max(10.0),
        y_min: 0.0,
        y_max: 1.0,
        log_x: true,
    };
    p.frame(
        &mut s,
        "Fault latency CDF (touch of a missing page)",
        "µs (log)",
        "fraction",
    );
    let mut items = Vec::new();
    for (i, (r, [workload, service])) in runs.iter().zip(&cdfs).enumerate() {
        p.line(&mut s, workload, COLORS[i], false);
        items.push((format!("{} (workload)", r.design), COLORS[i], false));
        if !service.is_empty() {
            p.line(&mut s, service, COLORS[i], true);
            items.push((format!("{} (engine service)", r.design), COLORS[i], true));
        }
    }
    legend(&mut s, TOP + 14.0, &items);
    // 2. Throughput over time, on its own axis from the switch-over.
    let tp: Vec<Vec<(f64, f64)>> = runs.iter().copied().map(throughput).collect();
    let tp_end = tp
        .iter()
        .filter_map(|v| v.last())
        .map(|p| p.0)
        .fold(100.0, f64::max);
    let y_max = tp.iter().flatten().map(|p| p.1).fold(0.1, f64::max) * 1.1;
    let p2 = Panel {
        y0: TOP + PANEL_H + GAP,
        x_min: 0.0,
        x_max: tp_end,
        y_min: 0.0,
        y_max,
        log_x: false,
    };
    p2.frame(
        &mut s,
        "Throughput into the destination",
        "ms since switch-over",
        "GB/s",
    );
    let mut items = Vec::new();
    for (i, (r, pts)) in runs.iter().zip(&tp).enumerate() {
        p2.line(&mut s, pts, COLORS[i], false);
        items.push((r.design.clone(), COLORS[i], false));
    }
    legend(&mut s, p2.y0 + 14.0, &items);
    // 3. Workload ops/s, from the source's warm-up on.
    let t_end = runs
        .iter()
        .map(|r| {
            r.timelines.resume_ms
                + 100.0 * to_f64(u64::try_from(r.timelines.destination_ops.len()).unwrap_or(0))
        })
        .fold(100.0, f64::max);
    let t_start = runs
        .iter()
        .map(|r| -100.0 * to_f64(u64::try_from(r.timelines.source_ops.len()).unwrap_or(0)))
        .fold(0.0, f64::min);
    let ops: Vec<Vec<(f64, f64)>> = runs
        .iter()
        .map(|r| {
            let n = to_f64(u64::try_from(r.timelines.source_ops.len()).unwrap_or(0));
            let mut v = step_series(&r.timelines.source_ops, -100.0 * n, 10.0);
            // The destination's last step ended when the workload stopped.
            let dst = &r.timelines.destination_ops;
            v.extend(step_series(
                &dst[..dst.len().saturating_sub(1)],
                r.timelines.resume_ms,
                10.0,
            ));
            v
        })
        .collect();
    let y_max = ops.iter().flatten().map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let p3 = Panel {
        y0: TOP + 2.0 * (PANEL_H + GAP),
        x_min: t_start,
        x_max: t_end,
        y_min: 0.0,
        y_max,
        log_x: false,
    };
    p3.frame(
        &mut s,
        "Workload operations per second (source, then destination)",
        "ms since switch-over",
        "ops/s",
    );
    let mut items = Vec::new();
    for (i, (r, pts)) in runs.iter().zip(&ops).enumerate() {
        p3.line(&mut s, pts, COLORS[i], false);
        let x = p3.x(r.timelines.all_present_ms);
        let _ = write!(
            s,
            r##"<line x1="{x}" x2="{x}" y1="{}" y2="{}" stroke="{}" stroke-dasharray="2,2"/>"##,
            p3.y0,
            p3.y0 + PANEL_H,
            COLORS[i]
        );
        items.push((
            format!("{} (dotted: all present)", r.design),
            COLORS[i],
            false,
        ));
    }
    legend(&mut s, p3.y0 + 14.0, &items);
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::{cdf, escape, throughput_of};

    #[test]
    fn the_last_partial_step_is_drawn_over_its_length() {
        // 1 GB per full step (10 GB/s); the transfer ends 50 ms into the third
        // step, which got 0.5 GB: the same rate, not a fall to 5 GB/s.
        let pts = throughput_of(&[1_000_000_000, 1_000_000_000, 500_000_000], 5.0, 250.0);
        assert_eq!(pts.len(), 6);
        assert!(pts.iter().all(|p| (p.1 - 10.0).abs() < 1e-9), "{pts:?}");
        assert_eq!(pts[5].0, 255.0);
        // A last step of 10 ms is too short for a rate: left out.
        let pts = throughput_of(&[1_000_000_000, 1_000_000], 0.0, 110.0);
        assert_eq!(pts.len(), 2, "{pts:?}");
    }

    #[test]
    fn the_cdf_comes_from_every_bucket() {
        let hist: Vec<(f64, u64)> = (1..=100).map(|v| (f64::from(v), 1)).collect();
        let c = cdf(&hist, &[(1.0, 0.0), (100.0, 1.0)]);
        assert_eq!(c.len(), 101);
        assert_eq!(c[0], (1.0, 0.0));
        assert!((c[50].1 - 0.5).abs() < 1e-9);
        assert_eq!(c.last(), Some(&(100.0, 1.0)));
        // No histogram (an older report): the quantile points.
        assert_eq!(cdf(&[], &[(3.0, 0.5)]), vec![(3.0, 0.5)]);
    }

    #[test]
    fn titles_are_escaped() {
        assert_eq!(escape("a<b & \"c\">"), "a&lt;b &amp; &quot;c&quot;&gt;");
    }
}
