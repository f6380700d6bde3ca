//! `bench --perf`: a `perf record` of both processes of a run, controlled
//! through its control FIFO so that the profile covers post-copy only.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// A `perf record` attached to the two processes of a run, started with its events
/// disabled and switched on and off through its control FIFO, so that the profile
/// covers post-copy only (from the switch to every page present).
pub(super) struct Perf {
    proc: std::process::Child,
    data: PathBuf,
    ctl: std::fs::File,
    ack: std::fs::File,
}

fn nonblocking_open(path: &std::path::Path, write: bool) -> anyhow::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let flags = i32::try_from(rustix::fs::OFlags::NONBLOCK.bits())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // A FIFO opened for writing without a reader fails (ENXIO) until perf opens it.
        match std::fs::OpenOptions::new()
            .read(!write)
            .write(write)
            .custom_flags(flags)
            .open(path)
        {
            Ok(f) => return Ok(f),
            Err(e)
                if Instant::now() < deadline
                    && e.raw_os_error() == Some(rustix::io::Errno::NXIO.raw_os_error()) =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("opening {}", path.display())))
            }
        }
    }
}

impl Perf {
    pub(super) fn start(dir: &std::path::Path, label: &str, pids: &[u32]) -> anyhow::Result<Perf> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let data = dir.join(format!("{label}.data"));
        let (ctl, ack) = (
            dir.join(format!("{label}.ctl")),
            dir.join(format!("{label}.ack")),
        );
        for f in [&ctl, &ack] {
            let _ = std::fs::remove_file(f);
            let ok = Command::new("mkfifo").arg(f).status().map(|s| s.success());
            anyhow::ensure!(ok.unwrap_or(false), "mkfifo {} failed", f.display());
        }
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        let mut control = std::ffi::OsString::from("fifo:");
        control.push(&ctl);
        control.push(",");
        control.push(&ack);
        let proc = Command::new("perf")
            .args(["record", "-g", "-q", "-D", "-1", "--control"])
            .arg(control)
            .arg("-o")
            .arg(&data)
            .args(["-p", &pids.join(",")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf record (is perf installed?)")?;
        let ack_file = nonblocking_open(&ack, false)?;
        let ctl_file = nonblocking_open(&ctl, true)?;
        Ok(Perf {
            proc,
            data,
            ctl: ctl_file,
            ack: ack_file,
        })
    }

    /// Sends a control command and waits for perf's acknowledgement.
    pub(super) fn command(&mut self, cmd: &str) -> anyhow::Result<()> {
        use std::io::Read;
        writeln!(self.ctl, "{cmd}").context("writing to perf's control FIFO")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 64];
        loop {
            match self.ack.read(&mut buf) {
                Ok(n) if n > 0 => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    return Err(anyhow::Error::new(e).context("reading perf's acknowledgement"))
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "perf did not acknowledge `{cmd}`"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stops recording (SIGINT, as perf expects) and writes a text summary.
    pub(super) fn finish(mut self) -> anyhow::Result<PathBuf> {
        let _ = self.command("disable");
        let _ = Command::new("kill")
            .args(["-INT", &self.proc.id().to_string()])
            .status();
        let _ = self.proc.wait();
        let mut text = Vec::new();
        for sort in ["comm", "comm,dso,sym"] {
            let out = Command::new("perf")
                .args(["report", "--stdio", "--no-children", "--sort", sort])
                .args(["--percent-limit", "0.5", "-g", "none", "-i"])
                .arg(&self.data)
                .stderr(Stdio::null())
                .output()
                .context("running perf report")?;
            text.extend(out.stdout);
        }
        let txt = self.data.with_extension("txt");
        std::fs::write(&txt, text).with_context(|| format!("writing {}", txt.display()))?;
        Ok(txt)
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        if let Ok(None) = self.proc.try_wait() {
            let _ = self.proc.kill();
            let _ = self.proc.wait();
        }
    }
}
