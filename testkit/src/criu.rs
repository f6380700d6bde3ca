//! CRIU for the lazy-pages tests: finding a usable `criu` binary (or the
//! reason to skip), checkpointing a workload process tree that runs as the
//! init of its own pid namespace, and the small waits around it.
//!
//! CRIU is found through `RINGFAULT_CRIU` (set by `.ci/run`, which builds
//! CRIU 4.2 once into `target/criu`), else in `target/criu` of this
//! workspace (or of `CARGO_TARGET_DIR`). It must run as root and pass
//! `criu check`.
//!
//! The workload runs as `unshare --pid --fork setsid WORKLOAD`: it is pid 1
//! of a new pid namespace, so its restore recreates the namespace and never
//! collides with the original, which `criu dump --lazy-pages` keeps frozen
//! until every lazy page has been served.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where `.ci/run` builds CRIU, under the target directory.
pub const CACHE_SUBDIR: &str = "criu/criu-4.2/criu/criu";

/// The smallest `fs.pipe-max-size` with which `criu dump --lazy-pages`
/// can serve pages: its page server sizes a pipe to about 3.2 MiB
/// (`PIPE_MAX_SIZE`), which without `CAP_SYS_RESOURCE` must fit under it.
pub const PIPE_MAX_SIZE_NEEDED: u64 = 4 << 20;

fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(p) = std::env::var("RINGFAULT_CRIU") {
        out.push(PathBuf::from(p));
    }
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        out.push(Path::new(&t).join(CACHE_SUBDIR));
    }
    let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    out.push(ws.join("target").join(CACHE_SUBDIR));
    out
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// A usable `criu`, or why the CRIU tests must skip (checked once).
pub fn criu() -> Result<PathBuf, String> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            if !is_root() {
                return Err("CRIU needs root (criu dump/restore)".into());
            }
            let Some(bin) = candidates().into_iter().find(|p| p.is_file()) else {
                return Err(format!(
                    "no criu binary: set RINGFAULT_CRIU or run .ci/run, which builds CRIU 4.2 into target/{CACHE_SUBDIR} (looked in {:?})",
                    candidates()
                ));
            };
            if Command::new("unshare").arg("--version").output().is_err() {
                return Err("no unshare(1) (util-linux) to give the workload its own pid namespace".into());
            }
            let out = Command::new(&bin)
                .arg("check")
                .output()
                .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
            if !out.status.success() {
                let said = [&out.stderr, &out.stdout]
                    .iter()
                    .find_map(|b| {
                        String::from_utf8_lossy(b)
                            .lines()
                            .rev()
                            .find(|l| !l.trim().is_empty())
                            .map(str::to_owned)
                    })
                    .unwrap_or_else(|| "it says nothing".to_owned());
                return Err(format!(
                    "`{} check` fails here ({}): {said}",
                    bin.display(),
                    out.status
                ));
            }
            Ok(bin)
        })
        .clone()
}

/// Raises `fs.pipe-max-size` to [`PIPE_MAX_SIZE_NEEDED`] if it is lower
/// (as root); `criu dump --lazy-pages` cannot serve pages otherwise.
pub fn ensure_pipe_max_size() -> Result<(), String> {
    let path = "/proc/sys/fs/pipe-max-size";
    let now: u64 = std::fs::read_to_string(path)
        .map_err(|e| format!("{path}: {e}"))?
        .trim()
        .parse()
        .map_err(|e| format!("{path}: {e}"))?;
    if now >= PIPE_MAX_SIZE_NEEDED {
        return Ok(());
    }
    std::fs::write(path, PIPE_MAX_SIZE_NEEDED.to_string())
        .map_err(|e| format!("raising {path} from {now} to {PIPE_MAX_SIZE_NEEDED}: {e}"))
}

/// Waits until `path` exists; false after `limit`.
pub fn wait_file(path: &Path, limit: Duration) -> bool {
    let end = Instant::now() + limit;
    while !path.exists() {
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Waits until the file at `path` contains `needle`; its text, or `None`
/// after `limit`.
pub fn wait_text(path: &Path, needle: &str, limit: Duration) -> Option<String> {
    let end = Instant::now() + limit;
    loop {
        if let Ok(t) = std::fs::read_to_string(path) {
            if t.contains(needle) {
                return Some(t);
            }
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A free TCP port on 127.0.0.1 (bound and released: good enough for a test).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(27_000)
}

/// The last `n` lines of a log file, for failure messages.
pub fn tail(path: &Path, n: usize) -> String {
    let t = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A workload process tree running as pid 1 of its own pid namespace.
#[derive(Debug)]
pub struct Workload {
    unshare: Child,
    /// Host pid of the namespace's init (what `criu dump -t` takes).
    pub pid: u32,
    /// Where it writes `ready-N`/`result-N` and looks for `go`/`stop`.
    pub dir: PathBuf,
}

impl Workload {
    /// Starts `exe args...` (a `ringfault-criu-workload`, which is told
    /// `--dir dir`) and waits until `ready-0..=children` exist.
    pub fn start(exe: &Path, dir: &Path, args: &[&str], children: u32) -> Result<Workload, String> {
        let mut unshare = Command::new("unshare")
            .args(["--pid", "--fork", "setsid"])
            .arg(exe)
            .arg("--dir")
            .arg(dir)
            .args(["--children", &children.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting unshare: {e}"))?;
        let up = unshare.id();
        let kids = format!("/proc/{up}/task/{up}/children");
        let end = Instant::now() + Duration::from_secs(10);
        let pid = loop {
            if let Some(p) = std::fs::read_to_string(&kids)
                .ok()
                .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
            {
                break p;
            }
            if Instant::now() > end {
                let _ = unshare.kill();
                return Err("the workload did not start under unshare".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        for i in 0..=children {
            if !wait_file(&dir.join(format!("ready-{i}")), Duration::from_secs(60)) {
                let _ = unshare.kill();
                return Err(format!("workload {i} never became ready"));
            }
        }
        Ok(Workload {
            unshare,
            pid,
            dir: dir.to_owned(),
        })
    }

    /// Waits for the original tree's end (after a dump killed it).
    pub fn wait_gone(&mut self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        loop {
            if let Ok(Some(_)) = self.unshare.try_wait() {
                return true;
            }
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Tells the (restored) workload to go on: verify, exit or bench.
    pub fn go(&self) {
        let _ = std::fs::write(self.dir.join("go"), "go\n");
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        // Whatever happened, let every copy of the workload finish.
        self.go();
        let _ = std::fs::write(self.dir.join("stop"), "stop\n");
        if let Ok(None) = self.unshare.try_wait() {
            let _ = self.unshare.kill();
            let _ = self.unshare.wait();
        }
    }
}
