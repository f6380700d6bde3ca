//! Two network namespaces joined by a veth pair, made for one benchmark run and
//! removed when it ends, even on failure (a drop guard; the parent also turns
//! SIGINT/SIGTERM into an orderly exit). Namespaces are named `rfb-PID-src` and
//! `rfb-PID-dst`, so a run that was killed outright (SIGKILL) leaves names that
//! the next run recognises as stale (their PID is gone) and removes.
//!
//! The link may be shaped with `tc`: `--rate` with a token bucket (`tbf`) on both
//! veth ends; `--delay`/`--loss` with `netem`, which some kernels lack (this
//! project's does): then the run stops with a clear error, never silently.

use std::process::Command;

use anyhow::Context;

/// A pair of namespaces and their link.
#[derive(Debug)]
pub struct NetnsPair {
    /// The source's namespace.
    pub src: String,
    /// The destination's namespace.
    pub dst: String,
    /// The source's address in its namespace.
    pub src_ip: String,
    made: Vec<String>,
}

/// How to shape the link.
#[derive(Debug, Clone, Default)]
pub struct Shaping {
    /// `tc` rate and bits per second.
    pub rate: Option<(String, u64)>,
    /// netem delay, e.g. `1ms`.
    pub delay: Option<String>,
    /// netem loss, e.g. `0.1%`.
    pub loss: Option<String>,
}

fn run(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd} (is iproute2 installed?)"))?;
    if !out.status.success() {
        anyhow::bail!(
            "`{cmd} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Why namespaces cannot be made here, if they cannot (not root, no `ip`).
pub fn unavailable() -> Option<String> {
    if !rustix::process::geteuid().is_root() {
        return Some("--netns needs root (network namespaces and veth)".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("--netns needs the `ip` command (iproute2)".into()),
    }
}

/// Names of a run's namespaces.
pub fn names(pid: u32) -> (String, String) {
    (format!("rfb-{pid}-src"), format!("rfb-{pid}-dst"))
}

/// Namespaces of this tool whose process is gone.
pub fn stale() -> Vec<String> {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| {
            n.strip_prefix("rfb-")
                .and_then(|r| r.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
                .is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
        })
        .map(str::to_owned)
        .collect()
}

impl NetnsPair {
    /// Removes stale namespaces, then makes this run's pair, its link and shaping.
    pub fn create(shaping: &Shaping) -> anyhow::Result<NetnsPair> {
        if let Some(why) = unavailable() {
            anyhow::bail!(why);
        }
        for n in stale() {
            let _ = run("ip", &["netns", "del", &n]);
        }
        let pid = std::process::id();
        let (src, dst) = names(pid);
        let subnet = pid % 250 + 1;
        let mut pair = NetnsPair {
            src_ip: format!("10.201.{subnet}.1"),
            src: src.clone(),
            dst: dst.clone(),
            made: Vec::new(),
        };
        let vs = format!("rfb{pid}s");
        let vd = format!("rfb{pid}d");
        for n in [&src, &dst] {
            run("ip", &["netns", "add", n]).context("making a network namespace")?;
            pair.made.push(n.clone());
            run("ip", &["-n", n, "link", "set", "lo", "up"])?;
        }
        run(
            "ip",
            &[
                "link", "add", &vs, "netns", &src, "type", "veth", "peer", "name", &vd, "netns",
                &dst,
            ],
        )
        .context("making the veth pair")?;
        let dst_ip = format!("10.201.{subnet}.2");
        for (n, dev, ip) in [(&src, &vs, &pair.src_ip), (&dst, &vd, &dst_ip)] {
            run(
                "ip",
                &["-n", n, "addr", "add", &format!("{ip}/24"), "dev", dev],
            )?;
            run("ip", &["-n", n, "link", "set", dev, "up"])?;
        }
        if shaping.delay.is_some() || shaping.loss.is_some() {
            let mut args: Vec<String> = ["netns", "exec", &src, "tc", "qdisc", "add", "dev", &vs]
                .iter()
                .map(|s| s.to_string())
                .collect();
            args.extend(["root", "netem"].map(String::from));
            if let Some(d) = &shaping.delay {
                args.extend(["delay".into(), d.clone()]);
            }
            if let Some(l) = &shaping.loss {
                args.extend(["loss".into(), l.clone()]);
            }
            if let Some((r, _)) = &shaping.rate {
                args.extend(["rate".into(), r.clone()]);
            }
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            run("ip", &refs).map_err(|e| {
                anyhow::anyhow!(
                    "--delay and --loss need tc netem (sch_netem), which this kernel does not have: run on a kernel with sch_netem (modprobe sch_netem), or shape the link with --rate alone ({e})"
                )
            })?;
        } else if let Some((rate, bps)) = &shaping.rate {
            // Bucket: 10 ms at the rate, at least 64 KiB (tbf needs rate/HZ).
            let burst = (bps / 8 / 100).max(64 << 10).to_string();
            for (n, dev) in [(&src, &vs), (&dst, &vd)] {
                run(
                    "ip",
                    &[
                        "netns", "exec", n, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
                        "rate", rate, "burst", &burst, "latency", "50ms",
                    ],
                )
                .context("shaping the link with tc tbf")?;
            }
        }
        Ok(pair)
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for n in self.made.drain(..).rev() {
            if let Err(e) = run("ip", &["netns", "del", &n]) {
                eprintln!("ringfault: could not remove network namespace {n}: {e:#}");
            }
        }
    }
}
