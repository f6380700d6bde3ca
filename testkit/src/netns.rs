//! Two network namespaces joined by a veth link, made for one test and removed
//! when it ends (a drop guard), so that a test can run a source in one and a
//! destination in the other, shape the link with `tc`, and cut it with
//! `ip link set DEV down`.
//!
//! Namespaces are named `rft-PID-N-src` and `rft-PID-N-dst`; names left by a test
//! process that was killed outright (its PID is gone) are removed by the next
//! [`NetPair::create`]. Inside them the veth ends are `rfs` and `rfd`, with
//! the addresses [`NetPair::SOURCE_IP`] and [`NetPair::DEST_IP`].

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// One end of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The source's namespace and its veth end.
    Source,
    /// The destination's namespace and its veth end.
    Destination,
}

/// Two namespaces and their link, removed on drop.
#[derive(Debug)]
pub struct NetPair {
    made: Vec<String>,
    src: String,
    dst: String,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetPair {
    /// The source's address.
    pub const SOURCE_IP: &'static str = "10.77.0.1";
    /// The destination's address.
    pub const DEST_IP: &'static str = "10.77.0.2";

    /// Why namespaces cannot be made here, if they cannot.
    pub fn unavailable() -> Option<String> {
        let uid = Command::new("id").arg("-u").output().ok();
        if uid.is_none_or(|o| String::from_utf8_lossy(&o.stdout).trim() != "0") {
            return Some("network namespaces need root".into());
        }
        match Command::new("ip").arg("-V").output() {
            Ok(o) if o.status.success() => {}
            _ => return Some("the ip command (iproute2) is missing".into()),
        }
        match Command::new("tc").arg("-V").output() {
            Ok(o) if o.status.success() => None,
            _ => Some("the tc command (iproute2) is missing".into()),
        }
    }

    /// Makes the namespaces and the link, both ends up.
    pub fn create() -> Result<NetPair, String> {
        sweep_stale();
        static PAIRS: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        // Relaxed: a counter that only makes names unique.
        let n = PAIRS.fetch_add(1, Ordering::Relaxed);
        let src = format!("rft-{pid}-{n}-src");
        let dst = format!("rft-{pid}-{n}-dst");
        let mut pair = NetPair {
            made: Vec::new(),
            src: src.clone(),
            dst: dst.clone(),
        };
        for n in [&src, &dst] {
            run(&["netns", "add", n])?;
            pair.made.push(n.clone());
            run(&["-n", n, "link", "set", "lo", "up"])?;
        }
        run(&[
            "link", "add", "rfs", "netns", &src, "type", "veth", "peer", "name", "rfd", "netns",
            &dst,
        ])?;
        for (n, dev, ip) in [(&src, "rfs", Self::SOURCE_IP), (&dst, "rfd", Self::DEST_IP)] {
            run(&["-n", n, "addr", "add", &format!("{ip}/24"), "dev", dev])?;
            run(&["-n", n, "link", "set", dev, "up"])?;
        }
        Ok(pair)
    }

    /// The namespace of `end`.
    pub fn namespace(&self, end: End) -> &str {
        match end {
            End::Source => &self.src,
            End::Destination => &self.dst,
        }
    }

    /// The veth device of `end`, inside its namespace.
    pub fn device(end: End) -> &'static str {
        match end {
            End::Source => "rfs",
            End::Destination => "rfd",
        }
    }

    /// Limits both ends' egress to `rate` (a `tc` rate such as `100mbit`)
    /// with a token bucket.
    pub fn rate_limit(&self, rate: &str) -> Result<(), String> {
        for end in [End::Source, End::Destination] {
            run(&[
                "netns",
                "exec",
                self.namespace(end),
                "tc",
                "qdisc",
                "add",
                "dev",
                Self::device(end),
                "root",
                "tbf",
                "rate",
                rate,
                "burst",
                "64kb",
                "latency",
                "50ms",
            ])?;
        }
        Ok(())
    }

    /// `ip link set DEV up|down` on `end`'s veth device.
    pub fn set_link(&self, end: End, up: bool) {
        let state = if up { "up" } else { "down" };
        run(&[
            "-n",
            self.namespace(end),
            "link",
            "set",
            Self::device(end),
            state,
        ])
        .unwrap_or_else(|e| panic!("{e}"));
    }

    /// A command that runs `program` inside `end`'s namespace
    /// (`ip netns exec`, which execs it: its PID and exit status are the
    /// program's).
    pub fn command(&self, end: End, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.namespace(end), program]);
        c
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for n in self.made.drain(..).rev() {
            if let Err(e) = run(&["netns", "del", &n]) {
                eprintln!("could not remove the network namespace {n}: {e}");
            }
        }
    }
}

/// Removes `rft-PID-*` namespaces whose PID is gone.
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix("rft-") else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or_default();
        if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run(&["netns", "del", name]);
        }
    }
}

/// Why `ip netns` cannot be used here (root and the `ip` command are needed),
/// if it cannot.
pub fn ip_unavailable() -> Option<&'static str> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root");
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("the ip command (iproute2) is missing"),
    }
}

/// Whether `tc` can add a netem qdisc here, tried in a throwaway namespace
/// named after `tag` and this process.
pub fn netem_available(tag: &str) -> bool {
    let ns = format!("{tag}-{}", std::process::id());
    let ok = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !ok(&["netns", "add", &ns]) {
        return false;
    }
    let has = ok(&["-n", &ns, "link", "set", "lo", "up"])
        && ok(&[
            "netns", "exec", &ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay",
            "1ms",
        ]);
    let _ = ok(&["netns", "del", &ns]);
    has
}
