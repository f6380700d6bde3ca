//! Performance targets: read from a small TOML file (`docs/targets.toml`, built
//! in) and checked against a report's figures.

use serde::{Deserialize, Serialize};

use super::report::RunResult;

/// The targets built into the binary.
pub const BUILT_IN: &str = include_str!("../../../docs/targets.toml");

/// A figure a target is set on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Figure {
    /// Switch-over to every page present, seconds.
    TotalS,
    /// Workload-seconds lost.
    LostS,
    /// CPU seconds per GiB, both ends.
    CpuPerGib,
    /// Bulk throughput, GB/s.
    BulkGbps,
    /// Fault latency p50, µs.
    FaultP50Us,
    /// Fault latency p99, µs.
    FaultP99Us,
    /// Total time, ringfault ÷ classic.
    TotalVsClassic,
    /// Workload-seconds lost, ringfault ÷ classic.
    LostVsClassic,
    /// CPU per GiB, ringfault ÷ classic.
    CpuVsClassic,
    /// Fault p99, ringfault ÷ classic.
    P99VsClassic,
    /// Bulk throughput, ringfault ÷ classic.
    BulkVsClassic,
    /// Workload ops/s after every page is present ÷ before switch-over.
    AfterOverBefore,
    /// Destination AnonHugePages ÷ source's.
    HugeKept,
    /// Switch-over pause, ms.
    PauseMs,
    /// Workload-seconds lost, ringfault ÷ pure post-copy.
    LostVsPostcopy,
    /// Total time, ringfault ÷ pure post-copy.
    TotalVsPostcopy,
    /// Faults read, ringfault ÷ pure post-copy.
    FaultsVsPostcopy,
    /// Workload ops/s during pre-copy ÷ before it.
    TrackedOverUntracked,
    /// Page-state metadata on the destination, bytes.
    MetadataBytes,
}

impl Figure {
    fn needs_classic(self) -> bool {
        matches!(
            self,
            Figure::TotalVsClassic
                | Figure::LostVsClassic
                | Figure::CpuVsClassic
                | Figure::P99VsClassic
                | Figure::BulkVsClassic
        )
    }

    fn needs_postcopy(self) -> bool {
        matches!(
            self,
            Figure::LostVsPostcopy | Figure::TotalVsPostcopy | Figure::FaultsVsPostcopy
        )
    }

    fn latency(self) -> bool {
        matches!(
            self,
            Figure::FaultP50Us | Figure::FaultP99Us | Figure::P99VsClassic
        )
    }

    /// The figure's value, or why it has none.
    fn value(self, r: &RunResult, c: Option<&RunResult>) -> Result<f64, &'static str> {
        if self.latency()
            && (r.fault_latency.count == 0 || c.is_some_and(|c| c.fault_latency.count == 0))
        {
            return Err("no faults were timed");
        }
        let ratio = |a: f64, f: fn(&RunResult) -> f64| -> Result<f64, &'static str> {
            let c = c.ok_or("needs --compare classic")?;
            let b = f(c);
            if b > 0.0 {
                Ok(a / b)
            } else {
                Err("the classic figure is zero")
            }
        };
        match self {
            Figure::TotalS => Ok(r.total_s),
            Figure::LostS => Ok(r.workload_lost_s),
            Figure::CpuPerGib => Ok(r.cpu.total_s_per_gib),
            Figure::BulkGbps => Ok(r.bulk_gbps),
            Figure::FaultP50Us => Ok(r.fault_latency.p50_us),
            Figure::FaultP99Us => Ok(r.fault_latency.p99_us),
            Figure::TotalVsClassic => ratio(r.total_s, |c| c.total_s),
            Figure::LostVsClassic => ratio(r.workload_lost_s, |c| c.workload_lost_s),
            Figure::CpuVsClassic => ratio(r.cpu.total_s_per_gib, |c| c.cpu.total_s_per_gib),
            Figure::P99VsClassic => ratio(r.fault_latency.p99_us, |c| c.fault_latency.p99_us),
            Figure::BulkVsClassic => ratio(r.bulk_gbps, |c| c.bulk_gbps),
            Figure::AfterOverBefore if r.ops.before > 0.0 => Ok(r.ops.after_over_before),
            Figure::AfterOverBefore => Err("no workload ran"),
            Figure::HugeKept => r.huge_pages.kept.ok_or("the source had no huge pages"),
            Figure::PauseMs => Ok(r.switchover_pause_ms),
            Figure::MetadataBytes => Ok(super::units::to_f64(r.metadata_bytes)),
            Figure::TrackedOverUntracked => r
                .precopy
                .as_ref()
                .map(|p| p.tracked_over_untracked)
                .ok_or("no pre-copy ran"),
            Figure::LostVsPostcopy | Figure::TotalVsPostcopy | Figure::FaultsVsPostcopy => {
                Err("needs --compare postcopy")
            }
        }
    }
}

/// One target as written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// What, in words.
    pub what: String,
    /// The figure.
    pub figure: Figure,
    /// Met when the figure is at most this.
    pub max: Option<f64>,
    /// Met when the figure is at least this.
    pub min: Option<f64>,
    /// Applies only to this workload pattern.
    pub pattern: Option<String>,
    /// Applies only with this many workload threads.
    pub threads: Option<u64>,
    /// Applies only with this many bulk channels.
    pub channels: Option<u64>,
    /// Applies only with (true) or without (false) `--precopy`.
    pub precopy: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    target: Vec<Spec>,
}

/// Parses a targets file.
pub fn parse(text: &str) -> anyhow::Result<Vec<Spec>> {
    let f: File = toml::from_str(text)?;
    for t in &f.target {
        if t.max.is_some() == t.min.is_some() {
            anyhow::bail!("target \"{}\": give exactly one of `max` and `min`", t.what);
        }
    }
    Ok(f.target)
}

/// A target checked against a run.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What.
    pub what: String,
    /// The figure.
    pub figure: Figure,
    /// Measured (`null` when it could not be: see `note`).
    pub value: Option<f64>,
    /// The goal, in words.
    pub goal: String,
    /// Met (`null` when the figure has no value).
    pub met: Option<bool>,
    /// Why there is no value.
    pub note: Option<String>,
}

/// The targets that apply to a run with settings `config` (the report's
/// `config` object), checked against `r` and, for ratios, `classic`.
pub fn check(
    specs: &[Spec],
    config: &serde_json::Value,
    r: &RunResult,
    classic: Option<&RunResult>,
) -> Vec<Target> {
    specs
        .iter()
        .filter(|s| applies(s, config))
        .filter(|s| !s.figure.needs_classic() || classic.is_some())
        .filter(|s| !s.figure.needs_postcopy())
        .map(|s| judge(s, s.figure.value(r, classic)))
        .collect()
}

/// The targets on a ratio to pure post-copy, for `--compare postcopy`.
pub fn check_postcopy(
    specs: &[Spec],
    config: &serde_json::Value,
    r: &RunResult,
    post: &RunResult,
) -> Vec<Target> {
    let ratio = |a: f64, b: f64| {
        if b > 0.0 {
            Ok(a / b)
        } else {
            Err("the post-copy figure is zero")
        }
    };
    specs
        .iter()
        .filter(|s| s.figure.needs_postcopy() && applies(s, config))
        .map(|s| {
            let v = match s.figure {
                Figure::LostVsPostcopy => ratio(r.workload_lost_s, post.workload_lost_s),
                Figure::TotalVsPostcopy => ratio(r.total_s, post.total_s),
                _ => ratio(
                    super::units::to_f64(r.pages.faults),
                    super::units::to_f64(post.pages.faults),
                ),
            };
            judge(s, v)
        })
        .collect()
}

/// Whether a target's conditions hold for a run with settings `config`.
fn applies(s: &Spec, config: &serde_json::Value) -> bool {
    let pattern = config["pattern"].as_str();
    let threads = config["threads"].as_u64();
    let channels = config["engine"]["channels"].as_u64();
    let precopy = config["precopy"].as_bool().unwrap_or(false);
    s.pattern.as_deref().is_none_or(|p| Some(p) == pattern)
        && s.threads.is_none_or(|t| Some(t) == threads)
        && s.channels.is_none_or(|c| Some(c) == channels)
        && s.precopy.is_none_or(|p| p == precopy)
}

fn judge(s: &Spec, value: Result<f64, &'static str>) -> Target {
    let (goal, bound, is_max) = match (s.max, s.min) {
        (Some(m), _) => (format!("≤ {m}"), m, true),
        (None, Some(m)) => (format!("≥ {m}"), m, false),
        (None, None) => (String::new(), 0.0, true),
    };
    let (value, met, note) = match value {
        Ok(v) => (
            Some(v),
            Some(if is_max { v <= bound } else { v >= bound }),
            None,
        ),
        Err(why) => (None, None, Some(why.to_owned())),
    };
    Target {
        what: s.what.clone(),
        figure: s.figure,
        value,
        goal,
        met,
        note,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_built_in_parse() {
        let t = parse(BUILT_IN).unwrap();
        assert!(t.iter().any(|s| s.figure == Figure::TotalVsClassic));
    }

    #[test]
    fn targets_need_one_bound() {
        let e = parse("[[target]]\nwhat = \"x\"\nfigure = \"total_s\"\n").unwrap_err();
        assert!(e.to_string().contains("exactly one"), "{e}");
        let e = parse("[[target]]\nwhat = \"x\"\nfigure = \"nope\"\nmax = 1.0\n").unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
