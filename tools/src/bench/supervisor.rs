//! The parent's side of a benchmark run's child processes: it starts them
//! (inside a network namespace with `--netns`), writes their commands, reads
//! their events, and waits for the next one it wants while it watches the
//! deadline, an interrupt, a stalled migration and the other child.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::ProgressBar;

use super::events::{Event, Spec};

/// A child process and the events it sent.
pub(super) struct Child {
    pub(super) name: String,
    pub(super) proc: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    rx: mpsc::Receiver<Event>,
    pending: VecDeque<Event>,
}

impl Child {
    pub(super) fn spawn(name: &str, spec: &Spec, ns: Option<&str>) -> anyhow::Result<Child> {
        let exe = std::env::current_exe().context("finding this program")?;
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.arg("bench-child")
            .arg(serde_json::to_string(spec)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut proc = cmd
            .spawn()
            .with_context(|| format!("starting the {name} process"))?;
        let stdout = proc
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let (tx, rx) = mpsc::channel();
        let who = name.to_owned();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                match serde_json::from_str::<Event>(&line) {
                    Ok(ev) => {
                        if tx.send(ev).is_err() {
                            break;
                        }
                    }
                    Err(_) => eprintln!("[{who}] {line}"),
                }
            }
        });
        Ok(Child {
            name: name.to_owned(),
            stdin: proc.stdin.take(),
            proc,
            rx,
            pending: VecDeque::new(),
        })
    }

    pub(super) fn send(&mut self, line: &str) -> anyhow::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("{}: stdin closed", self.name))?;
        writeln!(stdin, "{line}")
            .and_then(|_| stdin.flush())
            .with_context(|| format!("{} process went away", self.name))
    }

    /// Moves whatever arrived into `pending`; an error event or an exit is fatal.
    pub(super) fn check(&mut self) -> anyhow::Result<()> {
        loop {
            match self.rx.try_recv() {
                Ok(Event::Error { message }) => anyhow::bail!("{}: {message}", self.name),
                Ok(ev) => self.pending.push_back(ev),
                Err(mpsc::TryRecvError::Empty) => return Ok(()),
                Err(mpsc::TryRecvError::Disconnected) => {
                    if self.pending.is_empty() {
                        let status = self.proc.wait().ok();
                        anyhow::bail!(
                            "the {} process ended unexpectedly ({})",
                            self.name,
                            status.map_or("unknown status".into(), |s| s.to_string())
                        );
                    }
                    return Ok(());
                }
            }
        }
    }

    pub(super) fn try_next(&mut self) -> anyhow::Result<Option<Event>> {
        if let Some(ev) = self.pending.pop_front() {
            return Ok(Some(ev));
        }
        match self.rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Event::Error { message }) => anyhow::bail!("{}: {message}", self.name),
            Ok(ev) => Ok(Some(ev)),
            Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.proc.wait().ok();
                anyhow::bail!(
                    "the {} process ended unexpectedly ({})",
                    self.name,
                    status.map_or("unknown status".into(), |s| s.to_string())
                )
            }
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        drop(self.stdin.take());
        // Give a finished child a moment to exit on its own, then make sure.
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.proc.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

/// A migration whose present count stays the same this long has stalled.
pub(super) const STALL: Duration = Duration::from_secs(60);

/// The run's shared state: deadline, interrupt flag, progress bar.
pub(super) struct Ctx {
    pub(super) deadline: Instant,
    pub(super) interrupted: Arc<AtomicBool>,
    pub(super) pb: ProgressBar,
    pub(super) src_ns: Option<String>,
    pub(super) dst_ns: Option<String>,
    pub(super) listen: String,
    pub(super) perf: Option<PathBuf>,
}

impl Ctx {
    pub(super) fn tick(&self) -> anyhow::Result<()> {
        // Relaxed: a flag set by a signal handler, polled.
        if self.interrupted.load(Ordering::Relaxed) {
            anyhow::bail!("interrupted");
        }
        if Instant::now() > self.deadline {
            anyhow::bail!("the run took longer than --timeout");
        }
        Ok(())
    }

    /// Waits for the next event of `c` that `want` accepts; `other` is watched for
    /// failures meanwhile. Progress events update the bar.
    pub(super) fn wait<T>(
        &self,
        c: &mut Child,
        mut other: Option<&mut Child>,
        mut want: impl FnMut(Event) -> Option<T>,
    ) -> anyhow::Result<T> {
        // (present, when it last changed, total): a stall is judged only while
        // pages are missing and progress is being reported.
        let mut last = (u64::MAX, Instant::now(), 0u64);
        loop {
            self.tick()?;
            if last.0 < last.2 && last.1.elapsed() > STALL {
                anyhow::bail!(
                    "no progress for {} s: {} of the pages present",
                    STALL.as_secs(),
                    last.0
                );
            }
            if let Some(o) = other.as_deref_mut() {
                o.check()?;
            }
            match c.try_next()? {
                Some(Event::Progress { present, total }) => {
                    self.pb.set_length(total);
                    self.pb.set_position(present);
                    if present != last.0 {
                        last = (present, Instant::now(), total);
                    }
                }
                Some(ev) => {
                    let kind = format!("{ev:?}");
                    if let Some(v) = want(ev) {
                        return Ok(v);
                    }
                    tracing::debug!("ignored event from {}: {kind:.80}", c.name);
                }
                None => {}
            }
        }
    }
}
