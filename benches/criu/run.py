#!/usr/bin/env python3
"""CRIU lazy restore: `criu lazy-pages` against `ringfault criu-lazy-pages`.

A process doing random 8-byte stores over N MiB (ringfault-criu-workload
--mode bench) is checkpointed and restored with `criu restore --lazy-pages`,
its lazy pages served by each daemon in turn, in one run:

  criu-ps       criu lazy-pages --page-server   (dump: criu dump --lazy-pages --port P)
  ringfault-ps  ringfault criu-lazy-pages --page-server HOST:PORT  (same dump side)
  ringfault-img ringfault criu-lazy-pages from pages-*.img (after criu dump;
                page cache dropped first, as for the read-once figure)
  criu-img      criu lazy-pages from pages-*.img (optional: --criu-images)

Per run: time from `criu restore` to the daemon's exit (every page present),
the workload's first-touch store latencies (p50/p99: timed inside the
process, around stores to pages it had not touched since the restore), its
store rate during the lazy phase against after it (slowdown), and for the
images, the time to read pages-*.img once with a cold page cache.

Needs root, CRIU 4.2 (RINGFAULT_CRIU or target/criu), and a release build of
ringfault and ringfault-criu-workload. Others benchmark on this machine: run
it under the lock,

  flock /work/measure.lock benches/criu/run.py --sizes 1024,3072

Writes a JSON file of every figure and prints a Markdown table.
"""

import argparse
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def log(msg):
    print(f"[criu-bench] {msg}", file=sys.stderr, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_for(pred, limit, what):
    end = time.monotonic() + limit
    while not pred():
        if time.monotonic() > end:
            raise RuntimeError(f"timed out after {limit}s waiting for {what}")
        time.sleep(0.01)


def tail(path, n=5):
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().splitlines()[-n:])
    except OSError as e:
        return str(e)


def drop_caches():
    subprocess.run(["sync"], check=True)
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def ensure_pipe_max_size():
    # criu dump --lazy-pages sizes a pipe to ~3.2 MiB; without
    # CAP_SYS_RESOURCE that must fit under fs.pipe-max-size.
    path = "/proc/sys/fs/pipe-max-size"
    with open(path) as f:
        now = int(f.read())
    if now < 4 << 20:
        with open(path, "w") as f:
            f.write(str(4 << 20))


def kill_tree(p):
    if p is not None and p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            p.kill()
        p.wait()


class Workload:
    def __init__(self, exe, d, mib):
        self.dir = d
        self.p = subprocess.Popen(
            ["unshare", "--pid", "--fork", "setsid", exe, "--dir", d, "--mib", str(mib),
             "--mode", "bench", "--linger", "1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        kids = f"/proc/{self.p.pid}/task/{self.p.pid}/children"
        wait_for(lambda: os.path.exists(kids) and open(kids).read().split(), 10, "the workload")
        self.pid = int(open(kids).read().split()[0])
        wait_for(lambda: os.path.exists(os.path.join(d, "ready-0")), 600, "the workload's fill")

    def touch(self, name):
        with open(os.path.join(self.dir, name), "w") as f:
            f.write(name + "\n")


def parse_result(text):
    out = {}
    for tok in text.split()[1:]:
        k, _, v = tok.partition("=")
        if k == "timeline_100ms":
            out[k] = [int(x) for x in v.split(",") if x]
        else:
            out[k] = float(v)
    return out


def rates(res, lazy_s):
    """Store rate during the lazy phase (go .. daemon exit) and after it."""
    tl = res.get("timeline_100ms") or []
    if not tl:
        return None, None
    i = min(max(int(lazy_s * 10), 1), len(tl)) - 1
    during = tl[i] / max(lazy_s, 0.1)
    after_n = tl[-1] - tl[i]
    after_s = (len(tl) - 1 - i) / 10
    after = after_n / after_s if after_s >= 0.3 else None
    return during, after


def one_run(a, name, mib, daemon, mode):
    """daemon: 'criu' or 'ringfault'; mode: 'ps' or 'img'."""
    base = os.path.join(a.out, f"{name}-{mib}")
    subprocess.run(["rm", "-rf", base], check=True)
    img = os.path.join(base, "img")
    os.makedirs(img)
    log(f"{name} {mib} MiB: filling")
    wl = Workload(a.workload, base, mib)
    port = free_port()
    dump = None
    row = {"run": name, "mib": mib}
    try:
        t = time.monotonic()
        if mode == "ps":
            # criu writes one byte to --status-fd once its page server
            # listens (its log says so only at -v3 and up).
            rd, wr = os.pipe()
            dump = subprocess.Popen(
                [a.criu, "dump", "-t", str(wl.pid), "-D", img, "-o", "dump.log",
                 "--lazy-pages", "--port", str(port), "--status-fd", str(wr)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True, pass_fds=(wr,))
            os.close(wr)
            try:
                ready, _, _ = select.select([rd], [], [], 600)
                if not ready or os.read(rd, 1) != b"\0":
                    raise RuntimeError("criu dump --lazy-pages never started its page server: "
                                       + tail(os.path.join(img, "dump.log")))
            finally:
                os.close(rd)
        else:
            subprocess.run([a.criu, "dump", "-t", str(wl.pid), "-D", img, "-o", "dump.log"],
                           check=True, stdin=subprocess.DEVNULL)
            wl.p.wait(60)
            pages = [os.path.join(img, f) for f in os.listdir(img) if f.startswith("pages-")]
            row["image_bytes"] = sum(os.path.getsize(p) for p in pages)
            drop_caches()
            t0 = time.monotonic()
            subprocess.run(["cat"] + pages, stdout=subprocess.DEVNULL, check=True)
            row["read_cold_s"] = time.monotonic() - t0
            t0 = time.monotonic()
            subprocess.run(["cat"] + pages, stdout=subprocess.DEVNULL, check=True)
            row["read_warm_s"] = time.monotonic() - t0
            drop_caches()
        row["dump_s"] = time.monotonic() - t
        summary = os.path.join(base, "summary.json")
        if daemon == "criu":
            cmd = [a.criu, "lazy-pages", "-D", img, "-W", img, "-o", "lazy-pages.log"]
            if mode == "ps":
                cmd += ["--page-server", "--address", "127.0.0.1", "--port", str(port)]
        else:
            cmd = [a.ringfault, "criu-lazy-pages", "-D", img, "-W", img, "--stats-json", summary]
            cmd += a.ringfault_args.split()
            if mode == "ps":
                cmd += ["--page-server", f"127.0.0.1:{port}"]
        err = open(os.path.join(base, "daemon.err"), "w")
        d = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                             start_new_session=True)
        wait_for(lambda: os.path.exists(os.path.join(img, "lazy-pages.socket")), 60, "the daemon's socket")
        log(f"{name} {mib} MiB: restoring")
        t0 = time.monotonic()
        subprocess.run([a.criu, "restore", "-D", img, "-W", img, "--lazy-pages", "-d",
                        "-o", "restore.log"], check=True, stdin=subprocess.DEVNULL)
        t_go = time.monotonic() - t0
        wl.touch("go")
        cap = a.criu_cap if daemon == "criu" else 600
        try:
            rc = d.wait(cap)
            row["present_s"] = time.monotonic() - t0
            row["finished"] = rc == 0
        except subprocess.TimeoutExpired:
            row["present_s"] = None
            row["finished"] = False
            row["cap_s"] = cap
            log(f"{name} {mib} MiB: the daemon did not finish within {cap} s")
            if dump is not None:
                # The page server's session is about to break, and a failed
                # `criu dump` thaws the original tree, which would then write
                # result-0 itself: kill it first (the restored copy is
                # another process).
                try:
                    os.kill(wl.pid, signal.SIGKILL)
                except OSError:
                    pass
        lazy_s = (time.monotonic() - t0) - t_go
        time.sleep(2)
        wl.touch("stop")
        kill_tree(d)
        res_path = os.path.join(base, "result-0")
        wait_for(lambda: os.path.exists(res_path), 300, "the workload's result")
        res = parse_result(open(res_path).read())
        row["first_touches"] = int(res.get("first_touches", 0))
        row["fault_p50_us"] = res.get("p50_ns", 0) / 1000
        row["fault_p99_us"] = res.get("p99_ns", 0) / 1000
        row["fault_max_us"] = res.get("max_ns", 0) / 1000
        # First touches that found their page missing (slower than 5 µs).
        row["faults"] = int(res.get("faults", 0))
        row["missing_p50_us"] = res.get("fault_p50_ns", 0) / 1000
        row["missing_p99_us"] = res.get("fault_p99_ns", 0) / 1000
        during, after = rates(res, lazy_s)
        row["stores_per_s_lazy"] = during
        row["stores_per_s_after"] = after
        if during and after:
            row["slowdown"] = after / during
        if os.path.exists(summary):
            row["ringfault_summary"] = json.load(open(summary))
        if dump is not None:
            try:
                dump.wait(120)
            except subprocess.TimeoutExpired:
                pass
        log(f"{name} {mib} MiB: {json.dumps({k: v for k, v in row.items() if k != 'ringfault_summary'})}")
        return row
    finally:
        kill_tree(dump)
        wl.touch("go")
        wl.touch("stop")
        kill_tree(wl.p)


def fmt(v, unit="", nd=2):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}{unit}"
    return f"{v}{unit}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_criu = os.environ.get("RINGFAULT_CRIU") or os.path.join(ROOT, "target/criu/criu-4.2/criu/criu")
    ap.add_argument("--criu", default=default_criu)
    ap.add_argument("--ringfault", default=os.path.join(ROOT, "target/release/ringfault"))
    ap.add_argument("--workload", default=os.path.join(ROOT, "target/release/ringfault-criu-workload"))
    ap.add_argument("--sizes", default="1024,3072", help="MiB, comma-separated")
    ap.add_argument("--criu-sizes", default="1024,3072",
                    help="sizes at which criu lazy-pages runs too (it is slow)")
    ap.add_argument("--criu-cap", type=float, default=300, help="seconds criu lazy-pages gets per run")
    ap.add_argument("--criu-images", action="store_true", help="also run criu lazy-pages from images")
    ap.add_argument("--ringfault-args", default="",
                    help="extra arguments for ringfault criu-lazy-pages (default: none, its defaults)")
    ap.add_argument("--only", default="",
                    help="run only these (comma-separated: criu-ps,ringfault-ps,ringfault-img,criu-img)")
    ap.add_argument("--out", default="/tmp/ringfault-criu-bench")
    ap.add_argument("--json", default=None, help="write every figure here (default OUT/results.json)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("criu-bench: needs root (criu dump/restore)")
    for p in (a.criu, a.ringfault, a.workload):
        if not os.access(p, os.X_OK):
            sys.exit(f"criu-bench: {p} is missing (build with cargo build --release; CRIU with .ci/run)")
    ensure_pipe_max_size()
    os.makedirs(a.out, exist_ok=True)
    sizes = [int(x) for x in a.sizes.split(",") if x]
    criu_sizes = {int(x) for x in a.criu_sizes.split(",") if x}
    rows = []
    for mib in sizes:
        plan = []
        if mib in criu_sizes:
            plan.append(("criu-ps", "criu", "ps"))
        plan += [("ringfault-ps", "ringfault", "ps"), ("ringfault-img", "ringfault", "img")]
        if a.criu_images and mib in criu_sizes:
            plan.append(("criu-img", "criu", "img"))
        only = {x for x in a.only.split(",") if x}
        for name, daemon, mode in plan:
            if not only or name in only:
                rows.append(one_run(a, name, mib, daemon, mode))
    path = a.json or os.path.join(a.out, "results.json")
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    print("| run | MiB | every page present (s) | first touch p50 / p99 (µs) | faults | fault p50 / p99 (µs) | daemon: fault service p50 / p99 (µs) | slowdown while lazy | image read once, cold (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        present = fmt(r.get("present_s")) if r.get("finished") else f"not within {fmt(r.get('cap_s'), nd=0)}"
        s = r.get("ringfault_summary") or {}
        daemon = (f"{fmt(s.get('fault_p50_us'), nd=0)} / {fmt(s.get('fault_p99_us'), nd=0)}"
                  if s else "–")
        print(f"| {r['run']} | {r['mib']} | {present} | {fmt(r.get('fault_p50_us'), nd=1)} / "
              f"{fmt(r.get('fault_p99_us'), nd=1)} | {r.get('faults', '–')} | "
              f"{fmt(r.get('missing_p50_us'), nd=0)} / {fmt(r.get('missing_p99_us'), nd=0)} | {daemon} | "
              f"{fmt(r.get('slowdown'), '×', 1)} | {fmt(r.get('read_cold_s'))} |")
    ratios = ratio_lines(rows)
    if ratios:
        print()
        for line in ratios:
            print(line)
    log(f"figures in {path}")


def ratio_lines(rows):
    """The issue's targets, as ratios of runs in this same invocation."""
    by = {(r["run"], r["mib"]): r for r in rows}
    out = []
    for (run, mib), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if run == "ringfault-ps" and ("criu-ps", mib) in by:
            c = by[("criu-ps", mib)]
            if c.get("finished") and r.get("finished"):
                present = f"{c['present_s'] / r['present_s']:.1f}× sooner"
            elif r.get("finished"):
                present = f"> {c.get('cap_s', 0) / r['present_s']:.1f}× sooner (criu lazy-pages did not finish)"
            else:
                present = "–"
            # Per fault: first touches that found their page missing.
            p99 = (f"{c['missing_p99_us'] / r['missing_p99_us']:.1f}× lower"
                   if r.get("missing_p99_us") and c.get("missing_p99_us") else "–")
            p50 = (f"{c['missing_p50_us'] / r['missing_p50_us']:.1f}× lower"
                   if r.get("missing_p50_us") and c.get("missing_p50_us") else "–")
            slow = ""
            if r.get("slowdown") and c.get("slowdown"):
                slow = f", slowdown while lazy {c['slowdown']:.1f}× vs {r['slowdown']:.1f}×"
            out.append(f"- {mib} MiB, page server: every page present {present}; "
                       f"fault p99 {p99}, p50 {p50} (first touches of a missing page, "
                       f"{r.get('faults')} against {c.get('faults')}){slow} (ringfault-ps against criu-ps)")
        if run == "ringfault-img" and r.get("finished") and r.get("read_cold_s"):
            cold = r["read_cold_s"]
            served = (r.get("ringfault_summary") or {}).get("elapsed_s")
            daemon = (f"; the daemon's own time, handover to every page present, {served:.2f} s = "
                      f"{served / cold:.2f}×" if served else "")
            out.append(f"- {mib} MiB, local images: every page present {r['present_s']:.2f} s after "
                       f"`criu restore` started = {r['present_s'] / cold:.2f}× the time to read "
                       f"pages-*.img once with a cold page cache ({cold:.2f} s){daemon}")
    for run in ("ringfault-ps", "ringfault-img"):
        pts = sorted((r["mib"], r["present_s"]) for r in rows
                     if r["run"] == run and r.get("finished") and r.get("present_s"))
        if len(pts) >= 2:
            per = ", ".join(f"{m} MiB {t / (m / 1024):.2f} s/GiB" for m, t in pts)
            out.append(f"- {run}: time per GiB by size: {per}")
    return out


if __name__ == "__main__":
    main()
