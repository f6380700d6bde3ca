//! `ringfault criu-lazy-pages` against real CRIU: a workload process tree
//! is checkpointed (`criu dump`, or `criu dump --lazy-pages --port P`),
//! restored with `criu restore --lazy-pages` while ringfault serves its
//! lazy pages, and checks every byte of its memory from inside the restored
//! processes. Where CRIU cannot run (no root, no CRIU build, `criu check`
//! failing) the tests skip and say why; `.ci/run` builds CRIU so that CI
//! runs them.
//!
//! Each test keeps its workload at 64 MiB or less.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ringfault_testkit::criu::{self as ck, Workload};
use ringfault_testkit::{require, ChildProc, TestDir};

const RINGFAULT: &str = env!("CARGO_BIN_EXE_ringfault");
const WORKLOAD: &str = env!("CARGO_BIN_EXE_ringfault-criu-workload");
const LIMIT: Duration = Duration::from_secs(90);

/// How the checkpoint's lazy pages are served.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Images,
    PageServer,
}

struct Run {
    /// `result-N` of every workload process.
    results: Vec<String>,
    /// The daemon's summary (JSON).
    summary: serde_json::Value,
    /// The daemon's standard error.
    stderr: String,
}

fn criu(bin: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(bin);
    c.args(args).stdin(Stdio::null());
    c
}

/// Checkpoints a workload (`args`, `children` extra processes), restores
/// it lazily with ringfault serving the pages, lets it go on, and collects
/// the results.
fn checkpoint_restore(
    criu_bin: &Path,
    name: &str,
    mode: Mode,
    args: &[&str],
    children: u32,
    daemon_args: &[&str],
) -> Run {
    let dir = TestDir::new(name);
    let work = dir.path("");
    let img = dir.path("img");
    std::fs::create_dir_all(&img).unwrap();
    let img_s = img.to_str().unwrap().to_owned();
    let mut wl = Workload::start(Path::new(WORKLOAD), &work, args, children).unwrap();
    let pid = wl.pid.to_string();

    let port = ck::free_port().to_string();
    let mut lazy_dump = None;
    match mode {
        Mode::Images => {
            let st = criu(
                criu_bin,
                &["dump", "-t", &pid, "-D", &img_s, "-o", "dump.log", "-v4"],
            )
            .status()
            .unwrap();
            assert!(
                st.success(),
                "criu dump: {st}\n{}",
                ck::tail(&img.join("dump.log"), 20)
            );
            assert!(wl.wait_gone(LIMIT), "the dumped tree did not go away");
        }
        Mode::PageServer => {
            let c = criu(
                criu_bin,
                &[
                    "dump",
                    "-t",
                    &pid,
                    "-D",
                    &img_s,
                    "-o",
                    "dump.log",
                    "-v4",
                    "--lazy-pages",
                    "--port",
                    &port,
                ],
            );
            lazy_dump = Some(ChildProc::spawn(c));
            let ready = ck::wait_text(&img.join("dump.log"), "Starting page server on port", LIMIT);
            assert!(
                ready.is_some(),
                "criu dump --lazy-pages never started its page server:\n{}",
                ck::tail(&img.join("dump.log"), 20)
            );
        }
    }

    let json = dir.path("summary.json");
    let mut cmd = Command::new(RINGFAULT);
    cmd.args([
        "criu-lazy-pages",
        "--images-dir",
        &img_s,
        "--work-dir",
        &img_s,
        "--stats-json",
    ])
    .arg(&json);
    if mode == Mode::PageServer {
        cmd.args(["--page-server", &format!("127.0.0.1:{port}")]);
    }
    cmd.args(daemon_args);
    let mut daemon = ChildProc::spawn(cmd);
    daemon.expect("listening on", LIMIT);

    let st = criu(
        criu_bin,
        &[
            "restore",
            "-D",
            &img_s,
            "-W",
            &img_s,
            "--lazy-pages",
            "-d",
            "-o",
            "restore.log",
            "-v4",
        ],
    )
    .status()
    .unwrap();
    assert!(
        st.success(),
        "criu restore: {st}\n{}\ndaemon: {}",
        ck::tail(&img.join("restore.log"), 20),
        daemon.stderr()
    );
    wl.go();
    let mut results = Vec::new();
    for i in 0..=children {
        let r = work.join(format!("result-{i}"));
        assert!(
            ck::wait_file(&r, LIMIT),
            "no result from workload {i}; daemon: {}",
            daemon.stderr()
        );
        results.push(std::fs::read_to_string(&r).unwrap());
    }
    let (status, _) = daemon.wait_exit(LIMIT);
    let stderr = daemon.stderr();
    assert!(
        status.success(),
        "ringfault criu-lazy-pages: {status}\n{stderr}"
    );
    if let Some(mut d) = lazy_dump {
        let (st, _) = d.wait_exit(LIMIT);
        assert!(
            st.success(),
            "criu dump --lazy-pages: {st}\n{}",
            ck::tail(&img.join("dump.log"), 20)
        );
        assert!(wl.wait_gone(LIMIT), "the dumped tree did not go away");
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    Run {
        results,
        summary,
        stderr,
    }
}

fn usable(page_server: bool) -> Result<PathBuf, String> {
    let bin = ck::criu()?;
    if page_server {
        ck::ensure_pipe_max_size()?;
    }
    Ok(bin)
}

fn assert_verified(run: &Run) {
    for (i, r) in run.results.iter().enumerate() {
        assert!(
            r.starts_with("OK"),
            "workload {i}: {r}\ndaemon: {}",
            run.stderr
        );
    }
}

#[test]
fn criu_local_images_every_byte() {
    let criu_bin = usable(false);
    require!(criu_bin.is_ok(), "{}", criu_bin.unwrap_err());
    let _g = ringfault_testkit::serial();
    let run = checkpoint_restore(
        &criu_bin.unwrap(),
        "criu-local",
        Mode::Images,
        &["--mib", "64"],
        0,
        &[],
    );
    assert_verified(&run);
    assert!(
        run.results[0].contains(&format!("{} bytes", 64 << 20)),
        "{}",
        run.results[0]
    );
    let s = &run.summary;
    assert_eq!(s["tasks"].as_array().unwrap().len(), 1, "{s}");
    assert!(s["lazy_pages"].as_u64().unwrap() >= 64 * 256, "{s}");
    assert_eq!(s["source"], "images");
}

#[test]
fn criu_page_server_every_byte() {
    let criu_bin = usable(true);
    require!(criu_bin.is_ok(), "{}", criu_bin.unwrap_err());
    let _g = ringfault_testkit::serial();
    let run = checkpoint_restore(
        &criu_bin.unwrap(),
        "criu-ps",
        Mode::PageServer,
        &["--mib", "64"],
        0,
        &[],
    );
    assert_verified(&run);
    let s = &run.summary;
    assert!(s["lazy_pages"].as_u64().unwrap() >= 64 * 256, "{s}");
    assert!(
        s["source"].as_str().unwrap().starts_with("page-server"),
        "{s}"
    );
    // Every lazy page came over the page server's connection.
    assert!(s["page_bytes"].as_u64().unwrap() >= (64 << 20), "{s}");
}

#[test]
fn criu_process_tree_parent_and_child() {
    let criu_bin = usable(true);
    require!(criu_bin.is_ok(), "{}", criu_bin.unwrap_err());
    let _g = ringfault_testkit::serial();
    let criu_bin = criu_bin.unwrap();
    for mode in [Mode::Images, Mode::PageServer] {
        let run = checkpoint_restore(&criu_bin, "criu-tree", mode, &["--mib", "32"], 1, &[]);
        assert_verified(&run);
        let tasks = run.summary["tasks"].as_array().unwrap().clone();
        assert_eq!(tasks.len(), 2, "{}", run.summary);
        // Both tasks had lazy pages of their own. `exited` is not checked:
        // a `verify` task exits once it has read its buffer, which can come
        // before the background fill reaches the few lazy pages (stack,
        // libc data) it never touched; the daemon then rightly reports it
        // as having exited with pages missing.
        for t in &tasks {
            assert!(
                t["lazy_pages"].as_u64().unwrap() >= 32 * 256,
                "{}",
                run.summary
            );
        }
        // Every lazy page was either delivered or belonged to a task that
        // had gone: a live task left short would have kept the daemon
        // running until the limit.
        let s = &run.summary;
        let delivered =
            s["demand_pages"].as_u64().unwrap() + s["background_pages"].as_u64().unwrap();
        if tasks.iter().all(|t| t["exited"] == false) {
            assert_eq!(delivered, s["lazy_pages"].as_u64().unwrap(), "{s}");
        }
    }
}

#[test]
fn criu_task_exits_during_lazy_phase() {
    let criu_bin = usable(false);
    require!(criu_bin.is_ok(), "{}", criu_bin.unwrap_err());
    let _g = ringfault_testkit::serial();
    // The child exits once told to go on, touching nothing more of its
    // 32 MiB; its parent verifies every byte of its own. The background is
    // capped at 8 MiB/s so that the child's pages are still missing when it
    // exits (uncapped, all 64 MiB may arrive first). The daemon must notice
    // the exit (ESRCH on the child's userfaultfd), drop the child's pages
    // and finish.
    let run = checkpoint_restore(
        &criu_bin.unwrap(),
        "criu-exit",
        Mode::Images,
        &["--mib", "32", "--child-mode", "exit"],
        1,
        &["--background-rate", "8"],
    );
    assert!(run.results[0].starts_with("OK"), "{}", run.results[0]);
    assert!(run.results[1].starts_with("EXITED"), "{}", run.results[1]);
    let tasks = run.summary["tasks"].as_array().unwrap().clone();
    assert_eq!(tasks.len(), 2, "{}", run.summary);
    // The root of the restored tree is pid 1 of its namespace. The child
    // exited with pages missing (the daemon saw ESRCH); the root may be seen
    // exiting too, as it exits after verifying without touching every lazy
    // page it had.
    let child = tasks.iter().find(|t| t["pid"] != 1).unwrap();
    assert_eq!(
        child["exited"], true,
        "the child's exit was not seen: {}",
        run.summary
    );
}

/// A malformed pagemap image: the daemon takes the task from a (simulated)
/// restore, reads the image, and stops with an error naming the file and
/// what is wrong. Needs no CRIU and no root.
#[test]
fn criu_malformed_pagemap_clear_error() {
    use ringfault_engine::criu::image::{
        encode_image, encode_pagemap, MmEntryMsg, PagemapEntryMsg, PstreeEntryMsg, VmaEntryMsg, MM,
        PE_LAZY, PSTREE,
    };
    use ringfault_engine::criu::socket;
    use ringfault_engine::sys::uffd::{Features, Uffd, UffdOptions};
    use std::os::fd::AsFd;

    let dir = TestDir::new("criu-malformed");
    let img = dir.path("img");
    std::fs::create_dir_all(&img).unwrap();
    let tree = encode_image(
        &PSTREE,
        &[&PstreeEntryMsg {
            pid: Some(1),
            ppid: Some(0),
            pgid: Some(1),
            sid: Some(1),
            threads: vec![1],
        }],
    );
    std::fs::write(img.join("pstree.img"), tree).unwrap();
    let mm = encode_image(
        &MM,
        &[&MmEntryMsg {
            vmas: vec![VmaEntryMsg {
                start: Some(0x10000),
                end: Some(0x20000),
                prot: Some(3),
                flags: Some(0x22),
                status: Some(1),
            }],
        }],
    );
    std::fs::write(img.join("mm-1.img"), mm).unwrap();
    // An entry whose address is not page-aligned.
    let pm = encode_pagemap(
        1,
        &[PagemapEntryMsg {
            vaddr: Some(0x10010),
            compat_nr_pages: Some(0),
            in_parent: None,
            flags: Some(PE_LAZY),
            nr_pages: Some(4),
        }],
    );
    std::fs::write(img.join("pagemap-1.img"), pm).unwrap();

    let img_s = img.to_str().unwrap();
    let mut daemon = ChildProc::spawn({
        let mut c = Command::new(RINGFAULT);
        c.args(["criu-lazy-pages", "-D", img_s]);
        c
    });
    daemon.expect("listening on", LIMIT);
    let u = Uffd::open(UffdOptions {
        nonblock: true,
        user_mode_only: true,
    });
    require!(u.is_ok(), "no userfaultfd here: {}", u.unwrap_err());
    let u = u.unwrap();
    u.api(Features::NONE).unwrap();
    let restore = socket::connect(&img).unwrap();
    socket::send_task(&restore, 1, Some(u.as_fd())).unwrap();
    let (status, _) = daemon.wait_exit(LIMIT);
    let err = daemon.stderr();
    assert!(!status.success(), "{err}");
    assert!(err.contains("pagemap-1.img"), "{err}");
    assert!(err.contains("0x10010 is not page-aligned"), "{err}");
    drop(restore);

    // A truncated pagemap is named too.
    let mut bytes = std::fs::read(img.join("pagemap-1.img")).unwrap();
    bytes.truncate(bytes.len() - 3);
    std::fs::write(img.join("pagemap-1.img"), &bytes).unwrap();
    let mut daemon = ChildProc::spawn({
        let mut c = Command::new(RINGFAULT);
        c.args(["criu-lazy-pages", "-D", img_s]);
        c
    });
    daemon.expect("listening on", LIMIT);
    let restore = socket::connect(&img).unwrap();
    socket::send_task(&restore, 1, Some(u.as_fd())).unwrap();
    let (status, _) = daemon.wait_exit(LIMIT);
    let err = daemon.stderr();
    assert!(!status.success(), "{err}");
    assert!(err.contains("pagemap-1.img: truncated"), "{err}");
}
