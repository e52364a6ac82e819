#!/usr/bin/python3
"""Where a Slate write's time and CPU go: the per-stage breakdown of one run.

    /usr/bin/python3 benches/e2e/breakdown.py [--slate target/release/slate] [--runtime 15]
        [--jobs qd1,qd32,read32] [--cluster DIR/cluster.json]

Starts `slate up` (or uses the running cluster named by --cluster), prefills the
demo volume, then for each job runs fio's nbd engine against it and diffs the
stage histograms that the client (`slate attach --metrics`) and every storage
node export (`*_stage_seconds`, see protocol/src/stages.rs) around the run. It
prints, per stage, the observations per I/O, the mean and the p50/p99 (read from
power-of-two buckets, so coarse), and the CPU (user + system) each Slate process
used per I/O. Every server it starts is stopped by its PID.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (same directory)

JOBS = {
    "qd1": ("4K randwrite QD1", "randwrite", "4k", 1),
    "qd32": ("4K randwrite QD32", "randwrite", "4k", 32),
    "read32": ("4K randread QD32", "randread", "4k", 32),
    "seq": ("1M seq write QD8", "write", "1M", 8),
}


def scrape(addr):
    """{(prefix, stage): (buckets {le: cumulative}, count, sum_seconds)} from one /metrics."""
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if "_stage_seconds" not in line or line.startswith("#"):
            continue
        name, value = line.rsplit(" ", 1)
        metric, labels = name.split("{", 1)
        labels = dict(kv.split("=", 1) for kv in labels.rstrip("}").split(","))
        stage = labels["stage"].strip('"')
        b, c, s = out.setdefault(stage, ({}, 0, 0.0))
        if metric.endswith("_bucket"):
            le = labels["le"].strip('"')
            b[float("inf") if le == "+Inf" else float(le)] = float(value)
        elif metric.endswith("_count"):
            out[stage] = (b, float(value), s)
        elif metric.endswith("_sum"):
            out[stage] = (b, c, float(value))
    return out


def diff(after, before):
    d = {}
    for stage, (b, c, s) in after.items():
        b0, c0, s0 = before.get(stage, ({}, 0, 0.0))
        d[stage] = ({le: n - b0.get(le, 0) for le, n in b.items()}, c - c0, s - s0)
    return d


def quantile(buckets, count, q):
    """Upper bound of the bucket holding quantile q (coarse: buckets double)."""
    want = q * count
    for le in sorted(buckets):
        if buckets[le] >= want:
            return le
    return float("inf")


def proc_cpu(pid):
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(f[11]) + int(f[12])
    except (FileNotFoundError, IndexError):
        return 0


def fmt_us(seconds):
    return "inf" if seconds == float("inf") else f"{seconds * 1e6:.0f}"


def run_job(info, target, job, runtime):
    name, rw, bs, qd = JOBS[job]
    procs = [(f"{p['role']}-{p['id']}", p["pid"], p.get("metrics")) for p in info["processes"]
             if p["role"] in ("node", "client")]
    before = {n: scrape(m) for n, _, m in procs if m}
    cpu0 = {n: proc_cpu(pid) for n, pid, _ in procs}
    t0 = time.time()
    r = compare.fio(target, name, rw, bs, qd, [], runtime)
    wall = time.time() - t0
    cpu1 = {n: proc_cpu(pid) for n, pid, _ in procs}
    after = {n: scrape(m) for n, _, m in procs if m}
    # fio's count leaves out its ramp; the histograms and CPU include it.
    ios = max(r["iops"] * wall, 1)
    print(f"\n== {name}: {r['iops']:.0f} IOPS, p50 {r['p50_us']:.0f} us, p99 {r['p99_us']:.0f} us "
          f"(fio, {runtime} s)")
    print(f"{'process':<10} {'stage':<14} {'per I/O':>8} {'mean us':>9} {'p50 <=us':>9} {'p99 <=us':>9}")
    for n, _, m in procs:
        if not m:
            continue
        for stage, (b, c, s) in diff(after[n], before[n]).items():
            if c <= 0:
                continue
            if stage == "commit_items":
                # Recorded as items x 1 us: print items per commit.
                print(f"{n:<10} {stage:<14} {c / ios:>8.2f} {s / c * 1e6:>9.1f} "
                      f"{fmt_us(quantile(b, c, 0.5)):>9} {fmt_us(quantile(b, c, 0.99)):>9}  (items per commit)")
                continue
            print(f"{n:<10} {stage:<14} {c / ios:>8.2f} {s / c * 1e6:>9.0f} "
                  f"{fmt_us(quantile(b, c, 0.5)):>9} {fmt_us(quantile(b, c, 0.99)):>9}")
    hz = compare.HZ
    total = 0.0
    print(f"{'process':<10} {'CPU us per I/O':>15}")
    for n, _, _ in procs:
        us = (cpu1[n] - cpu0[n]) / hz * 1e6 / ios
        total += us
        print(f"{n:<10} {us:>15.0f}")
    print(f"{'all':<10} {total:>15.0f}")
    return {"job": name, "fio": r, "cpu_us_per_io": total}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slate", default="target/release/slate")
    ap.add_argument("--runtime", type=int, default=15)
    ap.add_argument("--jobs", default="qd1,qd32,read32")
    ap.add_argument("--cluster", help="cluster.json of a running `slate up` (default: start one)")
    ap.add_argument("--work", default="/var/tmp")
    ap.add_argument("--up-arg", action="append", default=[], help="an extra argument for `slate up` (repeatable)")
    args = ap.parse_args()
    server = None
    with tempfile.TemporaryDirectory(prefix="slate-breakdown.", dir=args.work) as work:
        try:
            if args.cluster:
                info = json.loads(Path(args.cluster).read_text())
                target = {"name": "slate", "kind": "nbd", "uri": info["volumes"][0]["nbd_unix"], "pids": [],
                          "metrics": [p["metrics"] for p in info["processes"] if p["role"] == "node"]}
            else:
                server, target = compare.start_slate(Path(work), str(Path(args.slate).resolve()), args.up_arg)
                info = json.loads((Path(work) / "slate-data" / "cluster.json").read_text())
                compare.log("prefilling the volume")
                compare.fio(target, "prefill", "write", "1M", 8, [], 0)
                compare.wait_for(lambda: compare.slate_settled(target), "Slate's zeroing to end", timeout=600)
            if not any(p["role"] == "client" and p.get("metrics") for p in info["processes"]):
                compare.log("note: the client exports no metrics (a cluster from an older `slate up`)")
            for job in args.jobs.split(","):
                run_job(info, target, job, args.runtime)
        finally:
            if server:
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
