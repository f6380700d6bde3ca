//! Child processes of a test: any program ([`ChildProc::spawn`]) or the test
//! binary itself re-executed to run one harness entry point
//! ([`ChildProc::reexec`]), with standard output read line by line and
//! standard error collected; killed when dropped, so that a failed test leaves
//! nothing running.
//!
//! A harness entry point is a test marked
//! `#[ignore = "child-process entry point, run by other tests"]` that does
//! nothing unless its environment says it is the child; the spawner runs it
//! with `--ignored --exact NAME`, so it never counts as a passing test.
//!
//! The source child speaks a line protocol on standard output: `READY <addr>`
//! once listening, then `SOURCE OK <report as JSON>` or `SOURCE ERROR: <chain>`
//! when it ends ([`serve_child_main`]).

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ringfault_engine::{PeerAddr, Protection, Source, SourceConfig};
use ringfault_proto::auth::PresharedKey;

use crate::vm::VmSpec;
use crate::{env_u64, error_chain};

/// A child process with its output collected.
#[derive(Debug)]
pub struct ChildProc {
    /// The process.
    pub child: Child,
    lines: mpsc::Receiver<String>,
    /// Lines read past while looking for a tag.
    seen: Vec<String>,
    stderr: Arc<Mutex<String>>,
    stderr_reader: Option<JoinHandle<()>>,
    exited: Option<ExitStatus>,
}

impl ChildProc {
    /// Starts `cmd` with its standard output and error piped.
    pub fn spawn(mut cmd: Command) -> ChildProc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let (tx, lines) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                for l in BufReader::new(out).lines() {
                    let Ok(l) = l else { break };
                    if tx.send(l).is_err() {
                        break;
                    }
                }
            });
        }
        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr_reader = child.stderr.take().map(|mut err| {
            let e = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    e.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            })
        });
        ChildProc {
            child,
            lines,
            seen: Vec::new(),
            stderr,
            stderr_reader,
            exited: None,
        }
    }

    /// Re-executes this test binary to run the harness entry point `entry`
    /// (an ignored test) with `envs` set.
    pub fn reexec(entry: &str, envs: &[(&str, &str)]) -> ChildProc {
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
        let mut cmd = Command::new(exe);
        cmd.args([
            "--ignored",
            "--exact",
            entry,
            "--nocapture",
            "--test-threads=1",
        ]);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Self::spawn(cmd)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `limit` for an output line containing `tag`; returns what
    /// follows the tag. Panics (after killing the child) if none comes.
    pub fn expect(&mut self, tag: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    if let Some(i) = l.find(tag) {
                        let rest = l[i + tag.len()..].trim().to_owned();
                        self.seen.push(l);
                        return rest;
                    }
                    self.seen.push(l);
                }
                Err(e) => {
                    self.kill();
                    panic!(
                        "the child never printed {tag:?} ({}); its output: {:?}; its stderr: {}",
                        match e {
                            mpsc::RecvTimeoutError::Timeout => "timed out",
                            mpsc::RecvTimeoutError::Disconnected => "it closed its output",
                        },
                        self.seen,
                        self.stderr()
                    );
                }
            }
        }
    }

    /// Every output line still to come, until the child closes its output
    /// (or `limit` passes).
    pub fn rest_of_output(&mut self, limit: Duration) -> Vec<String> {
        let deadline = Instant::now() + limit;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => out.push(l),
                Err(_) => return out,
            }
        }
    }

    /// What the child wrote to standard error so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Its exit status, if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Kills the child (if still running) and reaps it.
    pub fn kill(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }

    /// Waits up to `limit` for the child to exit; returns its status and how
    /// long that took, once its standard error is read to the end. Panics
    /// (after killing it) if it does not exit in time.
    pub fn wait_exit(&mut self, limit: Duration) -> (ExitStatus, Duration) {
        let t0 = Instant::now();
        let status = loop {
            if let Some(st) = self.try_exit() {
                break st;
            }
            if t0.elapsed() > limit {
                self.kill();
                panic!(
                    "the child did not exit within {limit:?}; its stderr: {}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let took = t0.elapsed();
        // The reader sees end of file once every holder of the pipe is gone.
        if let Some(h) = self.stderr_reader.take() {
            let deadline = Instant::now() + Duration::from_secs(2);
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if h.is_finished() {
                let _ = h.join();
            }
        }
        (status, took)
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        // A failed test must not leave a child running (a source waiting for a
        // resume, a handler waiting for Firecracker).
        self.kill();
    }
}

/// Environment of the source child.
const SPEC_ENV: &str = "RF_SOURCE_SPEC";
const KEY_ENV: &str = "RF_SOURCE_KEY";
const LISTEN_ENV: &str = "RF_SOURCE_LISTEN";
const PROTECTION_ENV: &str = "RF_PROTECTION";

/// A source serving the synthetic VM in a child process (this test binary,
/// re-executed to run its `source_child` entry point).
#[derive(Debug)]
pub struct SourceChild {
    proc: ChildProc,
    /// Where it listens.
    pub addr: PeerAddr,
}

impl SourceChild {
    /// Starts a source of `spec` with `key` on loopback TCP; `entry` is the
    /// test binary's entry point that calls [`source_child_main`].
    pub fn spawn(entry: &str, spec: &VmSpec, key: &[u8]) -> SourceChild {
        Self::spawn_with(entry, spec, key, "tcp:127.0.0.1:0", Protection::Mac)
    }

    /// As [`SourceChild::spawn`], listening on `listen` with `protection`.
    pub fn spawn_with(
        entry: &str,
        spec: &VmSpec,
        key: &[u8],
        listen: &str,
        protection: Protection,
    ) -> SourceChild {
        let key = std::str::from_utf8(key).unwrap_or_else(|e| panic!("test keys are text: {e}"));
        let protection = match protection {
            Protection::None => "none",
            Protection::Mac => "mac",
            Protection::Aead => "aead",
        };
        let mut proc = ChildProc::reexec(
            entry,
            &[
                (SPEC_ENV, &spec.encode()),
                (KEY_ENV, key),
                (LISTEN_ENV, listen),
                (PROTECTION_ENV, protection),
            ],
        );
        let addr = proc.expect("READY ", Duration::from_secs(120));
        let addr =
            PeerAddr::parse(&addr).unwrap_or_else(|e| panic!("the source's address {addr}: {e}"));
        SourceChild { proc, addr }
    }

    /// Kills the source (a vanished source).
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// What the source wrote to standard error so far.
    pub fn stderr(&self) -> String {
        self.proc.stderr()
    }

    /// Waits (up to a minute) for the source to end; returns whether it exited
    /// successfully and its result line (`SOURCE OK ...` or `SOURCE ERROR: ...`).
    pub fn finish(mut self) -> (bool, String) {
        let rest = self.proc.rest_of_output(Duration::from_secs(60));
        let line = rest
            .iter()
            .rev()
            .find_map(|l| l.find("SOURCE ").map(|i| l[i..].trim().to_owned()))
            .unwrap_or_else(|| format!("no result line; stderr: {}", self.proc.stderr()));
        let ok = match self.proc.try_exit() {
            Some(st) => st.success(),
            None => {
                let (st, _) = self.proc.wait_exit(Duration::from_secs(10));
                st.success()
            }
        };
        (ok, line)
    }
}

/// Body of the source child entry point: serves the synthetic VM that the
/// environment describes (see [`SourceChild`]). Does nothing when not started
/// as that child.
pub fn source_child_main() {
    let Ok(spec) = std::env::var(SPEC_ENV) else {
        return;
    };
    let spec = VmSpec::decode(&spec).unwrap_or_else(|| panic!("bad {SPEC_ENV}: {spec}"));
    let key = std::env::var(KEY_ENV).unwrap_or_else(|e| panic!("{KEY_ENV}: {e}"));
    let key = PresharedKey::new(key.into_bytes()).unwrap_or_else(|e| panic!("key: {e}"));
    let mut cfg = SourceConfig::new(key);
    if let Some(p) = env_u64("RF_PIN") {
        cfg.pin_workers = p != 0;
    }
    if let Some(p) = env_u64("RF_PRIO") {
        cfg.prioritize_demand = p != 0;
    }
    cfg.protection = match std::env::var(PROTECTION_ENV).as_deref() {
        Ok("none") => Protection::None,
        Ok("aead") => Protection::Aead,
        _ => Protection::Mac,
    };
    let source = Source::from_memory(spec.build_source_memory(), cfg)
        .unwrap_or_else(|e| panic!("the source: {}", error_chain(&e)));
    let listen = std::env::var(LISTEN_ENV).unwrap_or_else(|_| "tcp:127.0.0.1:0".into());
    serve_child_main(&source, &listen)
}

/// Serves one session of `source` on `listen`, speaking the source child's
/// line protocol, and exits the process (0 once the destination released the
/// source, 1 on error).
pub fn serve_child_main(source: &Source, listen: &str) -> ! {
    let listener = PeerAddr::parse(listen)
        .and_then(|a| a.listen())
        .unwrap_or_else(|e| panic!("listening on {listen}: {}", error_chain(&e)));
    let local = listener
        .local_addr()
        .unwrap_or_else(|e| panic!("the listener's address: {e}"));
    println!("READY {local}");
    match source.serve(&listener) {
        Ok(report) => {
            let json = serde_json::to_string(&report).unwrap_or_else(|e| format!("\"{e}\""));
            println!("SOURCE OK {json}");
            std::process::exit(0);
        }
        Err(e) => {
            println!("SOURCE ERROR: {}", error_chain(&e));
            std::process::exit(1);
        }
    }
}
