#!/usr/bin/python3
"""End-to-end benchmark of Slate against the peers people run, on the same disk.

    /usr/bin/python3 benches/e2e/compare.py [--slate target/release/slate] [--runtime 10]

Systems, each on a 2 GiB image in the same work directory (default /var/tmp):
  raw       the file itself, fio io_uring with O_DIRECT (the disk's bound)
  nbd-raw   qemu-nbd serving the raw file (cache=none, aio=io_uring)
  nbd-luks  qemu-nbd serving a LUKS image (aes-256-xts, cache=none, aio=io_uring)
  slate     `slate up`: 3 meta + 3 storage nodes, R=2, AES-256-XTS, every write
            durable on both replicas before its reply
  ceph-rbd  only where ceph-osd is installed (skipped otherwise, with a note)

Each volume is prefilled and settled (Slate: its fresh disks' zeroing ends),
then fio's jobs run through the nbd engine (io_uring for raw), then a QD1 FUA
latency probe through libnbd (O_DIRECT|O_DSYNC writes for raw). Slate also runs
4K random writes at QD32 the moment `slate up` is ready, before the prefill (the
fresh-cluster figure). The row "4K QD1 durable write" compares latencies of
writes that are durable when they complete: Slate's QD1 writes, and a peer's
write plus its flush (the `+ flush` job, write and flush latency added). The CPU time
of every server is read from /proc around each job. The script prints a table
with each system's ratio to nbd-luks and writes the JSON to
results/e2e-<time>.json. Every server it starts is stopped by its PID.

Needs fio (with the nbd engine), qemu-img, qemu-nbd and python3-libnbd
(installed for /usr/bin/python3).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZE = 2 << 30
PASSPHRASE = "slate-bench-luks"  # a throwaway key for a throwaway image

# name, rw, block size, iodepth, extra fio options
JOBS = [
    ("4K randwrite QD1", "randwrite", "4k", 1, []),
    ("4K randwrite QD1 + flush", "randwrite", "4k", 1, ["--fsync=1"]),
    ("4K randwrite QD32", "randwrite", "4k", 32, []),
    ("4K randread QD32", "randread", "4k", 32, []),
    ("1M seq write QD8", "write", "1M", 8, []),
    ("1M seq read QD8", "read", "1M", 8, []),
]
HZ = os.sysconf("SC_CLK_TCK")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def cpu_ticks(pids):
    """utime + stime of `pids` and all their descendants."""
    seen, todo, total = set(), list(pids), 0
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            todo.extend(int(c) for c in children)
        except (FileNotFoundError, ProcessLookupError, IndexError):
            pass
    return total


class Server:
    """A process this script started, stopped by PID (SIGTERM, then SIGKILL)."""

    def __init__(self, name, argv, log_path):
        self.name = name
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def wait_for(pred, what, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def fio(target, name, rw, bs, qd, extra, runtime, size=SIZE):
    argv = ["fio", f"--name={name}", f"--rw={rw}", f"--bs={bs}", f"--iodepth={qd}", f"--size={size}",
            "--output-format=json", *extra]
    if runtime:
        argv += ["--time_based", f"--runtime={runtime}", "--ramp_time=2"]
    if target["kind"] == "file":
        argv += ["--ioengine=io_uring", "--direct=1", f"--filename={target['path']}"]
    else:
        argv += ["--ioengine=nbd", f"--uri={target['uri']}"]
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    text = out.stdout[out.stdout.find("{"):] if "{" in out.stdout else ""
    if out.returncode != 0 or not text:
        raise SystemExit(f"fio {name} on {target['name']} failed: {out.stderr[-500:]}")
    job = json.loads(text)["jobs"][0]
    d = job["write"] if job["write"]["io_bytes"] > 0 else job["read"]
    pct = d["clat_ns"].get("percentile", {})
    r = {
        "iops": d["iops"],
        "mb_s": d["bw_bytes"] / 1e6,
        "p50_us": pct.get("50.000000", 0) / 1000,
        "p99_us": pct.get("99.000000", 0) / 1000,
        "ios": d["total_ios"],
    }
    sync = job.get("sync", {}).get("lat_ns", {})
    if sync.get("N", 0) > 0:
        # The flush after each write (--fsync=1): its latency is part of the write's durability.
        sp = sync.get("percentile", {})
        r["sync_p50_us"] = sp.get("50.000000", 0) / 1000
        r["sync_p99_us"] = sp.get("99.000000", 0) / 1000
    return r


def fua_probe(target, count=2000):
    """QD1 4K writes that are durable when they return: NBD FUA, or O_DIRECT|O_DSYNC."""
    import mmap
    import random

    lat = []
    buf = mmap.mmap(-1, 4096)
    buf.write(os.urandom(4096))
    rnd = random.Random(7)
    if target["kind"] == "file":
        fd = os.open(target["path"], os.O_WRONLY | os.O_DIRECT | os.O_DSYNC)
        try:
            for _ in range(count):
                off = rnd.randrange(SIZE // 4096) * 4096
                t = time.perf_counter()
                os.pwrite(fd, buf, off)
                lat.append(time.perf_counter() - t)
        finally:
            os.close(fd)
        how = "O_DIRECT|O_DSYNC"
    else:
        import nbd

        h = nbd.NBD()
        h.connect_uri(target["uri"])
        fua = h.can_fua()
        data = bytes(buf)
        for _ in range(count):
            off = rnd.randrange(SIZE // 4096) * 4096
            t = time.perf_counter()
            if fua:
                h.pwrite(data, off, nbd.CMD_FLAG_FUA)
            else:
                h.pwrite(data, off)
                h.flush()
            lat.append(time.perf_counter() - t)
        h.shutdown()
        how = "FUA" if fua else "write + flush (no FUA)"
    lat.sort()
    return {
        "iops": count / sum(lat),
        "p50_us": lat[len(lat) // 2] * 1e6,
        "p99_us": lat[len(lat) * 99 // 100] * 1e6,
        "how": how,
        "ios": count,
    }


def start_nbd_raw(work):
    img = work / "nbd-raw.img"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(img), str(SIZE)], check=True)
    sock = work / "nbd-raw.sock"
    s = Server("qemu-nbd raw", ["qemu-nbd", f"--socket={sock}", "--persistent", "--shared=16", "--format=raw",
                                "--cache=none", "--aio=io_uring", str(img)], work / "nbd-raw.log")
    wait_for(sock.exists, "qemu-nbd raw")
    return s, {"name": "nbd-raw", "kind": "nbd", "uri": f"nbd+unix:///?socket={sock}", "pids": [s.proc.pid]}


def start_nbd_luks(work):
    img = work / "nbd-luks.img"
    secret = f"secret,id=sec0,data={PASSPHRASE}"
    subprocess.run(["qemu-img", "create", "-q", "-f", "luks", "--object", secret, "-o",
                    "key-secret=sec0,cipher-alg=aes-256,cipher-mode=xts", str(img), str(SIZE)], check=True)
    sock = work / "nbd-luks.sock"
    s = Server("qemu-nbd luks", ["qemu-nbd", f"--socket={sock}", "--persistent", "--shared=16", "--cache=none",
                                 "--aio=io_uring", "--object", secret, "--image-opts",
                                 f"driver=luks,key-secret=sec0,file.filename={img}"], work / "nbd-luks.log")
    wait_for(sock.exists, "qemu-nbd luks")
    return s, {"name": "nbd-luks", "kind": "nbd", "uri": f"nbd+unix:///?socket={sock}", "pids": [s.proc.pid]}


def start_slate(work, slate, extra=()):
    data = work / "slate-data"
    s = Server("slate up", [slate, "up", "--dir", str(data), "--volume-size", "2G", "--disk-size", "4G", *extra],
               work / "slate-up.log")
    cluster = data / "cluster.json"

    def ready():
        if s.proc.poll() is not None:
            raise SystemExit(f"slate up exited: {(work / 'slate-up.log').read_text()[-2000:]}")
        try:
            uri = json.loads(cluster.read_text())["volumes"][0]["nbd_unix"]
        except (FileNotFoundError, KeyError, IndexError, json.JSONDecodeError):
            return False
        return Path(uri.split("socket=", 1)[1]).exists()

    wait_for(ready, "slate up", timeout=300)
    info = json.loads(cluster.read_text())
    metrics = [p["metrics"] for p in info["processes"] if p.get("role") == "node" and p.get("metrics")]
    return s, {"name": "slate", "kind": "nbd", "uri": info["volumes"][0]["nbd_unix"], "pids": [s.proc.pid],
               "metrics": metrics}


def slate_settled(target):
    """No extent of any storage node is dirty or being zeroed."""
    import urllib.request

    busy = 0
    for m in target["metrics"]:
        text = urllib.request.urlopen(f"http://{m}/metrics", timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith("slate_node_extents{") and ('state="dirty"' in line or 'state="zeroing"' in line):
                busy += int(float(line.rsplit(" ", 1)[1]))
    return busy == 0


def run_system(target, runtime):
    fresh = None
    if target["name"] == "slate":
        # Right after `slate up`: the fresh disks' zeroing and first-touch allocation compete.
        log("== slate: 4K randwrite QD32 on the fresh cluster")
        fresh = fio(target, "fresh", "randwrite", "4k", 32, [], runtime)
    log(f"== {target['name']}: prefill")
    fio(target, "prefill", "write", "1M", 8, [], 0)
    if target["name"] == "slate":
        wait_for(lambda: slate_settled(target), "Slate's zeroing to end", timeout=600)
    results = {}
    for name, rw, bs, qd, extra in JOBS:
        before = cpu_ticks(target["pids"])
        r = fio(target, name, rw, bs, qd, extra, runtime)
        cpu = (cpu_ticks(target["pids"]) - before) / HZ
        r["server_cpu_s"] = cpu
        # The CPU was read around fio's ramp too; fio's I/O count leaves the ramp out.
        r["server_cpu_us_per_io"] = cpu * 1e6 / max(r["iops"] * (runtime + 2), 1) if target["pids"] else 0
        results[name] = r
        flush = f", flush p50 {r['sync_p50_us']:.0f} p99 {r['sync_p99_us']:.0f} us" if "sync_p50_us" in r else ""
        log(f"   {name}: {r['iops']:.0f} IOPS, {r['mb_s']:.0f} MB/s, p50 {r['p50_us']:.0f} us, "
            f"p99 {r['p99_us']:.0f} us{flush}, server CPU {r['server_cpu_us_per_io']:.0f} us/IO")
    before = cpu_ticks(target["pids"])
    r = fua_probe(target)
    r["server_cpu_s"] = (cpu_ticks(target["pids"]) - before) / HZ
    r["server_cpu_us_per_io"] = r["server_cpu_s"] * 1e6 / r["ios"] if target["pids"] else 0
    results["4K write QD1 FUA (libnbd)"] = r
    log(f"   QD1 FUA ({r['how']}): p50 {r['p50_us']:.0f} us, p99 {r['p99_us']:.0f} us")
    if fresh:
        results["4K randwrite QD32 fresh"] = fresh
        log(f"   fresh cluster: {fresh['iops']:.0f} IOPS, "
            f"{fresh['iops'] / max(results['4K randwrite QD32']['iops'], 1):.2f}x the settled figure")
    return results


def durable_qd1(name, results):
    """p50 and p99 of a 4K QD1 write that is durable when done: Slate's writes are; a peer's
    needs its flush (the `+ flush` job: write latency plus flush latency)."""
    if name == "slate":
        r = results["4K randwrite QD1"]
        return r["p50_us"], r["p99_us"]
    r = results["4K randwrite QD1 + flush"]
    return r["p50_us"] + r.get("sync_p50_us", 0), r["p99_us"] + r.get("sync_p99_us", 0)


def table(all_results, systems):
    names = [j[0] for j in JOBS] + ["4K write QD1 FUA (libnbd)"]
    head = ["job"] + systems + ([f"{s} / nbd-luks" for s in systems if s != "nbd-luks"] if "nbd-luks" in systems else [])
    rows = []
    for n in names:
        big = n.startswith("1M")
        fua = "FUA" in n

        def fig(s):
            r = all_results[s][n]
            if fua:
                return f"p50 {r['p50_us']:.0f} / p99 {r['p99_us']:.0f} us"
            return f"{r['mb_s']:.0f} MB/s" if big else f"{r['iops']:.0f} IOPS"

        def val(s):
            r = all_results[s][n]
            return 1 / r["p50_us"] if fua else (r["mb_s"] if big else r["iops"])

        row = [n] + [fig(s) for s in systems]
        if "nbd-luks" in systems:
            row += [f"{val(s) / val('nbd-luks'):.2f}x" for s in systems if s != "nbd-luks"]
        rows.append(row)
    dur = {s: durable_qd1(s, all_results[s]) for s in systems}
    dur_row = ["4K QD1 durable write, p50 / p99"] + [f"{dur[s][0]:.0f} / {dur[s][1]:.0f} us" for s in systems]
    if "nbd-luks" in systems:
        dur_row += [f"{dur['nbd-luks'][0] / dur[s][0]:.2f}x" for s in systems if s != "nbd-luks"]
    rows.append(dur_row)
    cpu_row = ["server CPU per 4K QD32 write"] + [
        f"{all_results[s]['4K randwrite QD32']['server_cpu_us_per_io']:.0f} us" if s != "raw" else "-" for s in systems]
    cpu_row += [""] * (len(head) - len(cpu_row))
    rows.append(cpu_row)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slate", default="target/release/slate")
    ap.add_argument("--runtime", type=int, default=10, help="seconds per fio job")
    ap.add_argument("--work", default="/var/tmp", help="where the images live (the disk under test)")
    ap.add_argument("--results", default="results")
    ap.add_argument("--only", help="comma-separated systems to run (raw,nbd-raw,nbd-luks,slate)")
    args = ap.parse_args()
    for tool in ["fio", "qemu-img", "qemu-nbd"]:
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is needed")
    slate = str(Path(args.slate).resolve())
    if not Path(slate).exists():
        raise SystemExit(f"{slate} does not exist: build it with `cargo build --release --bin slate`")
    only = set(args.only.split(",")) if args.only else None
    work = Path(tempfile.mkdtemp(prefix="slate-e2e-bench.", dir=args.work))
    started = time.time()
    notes = []
    all_results = {}
    systems = []
    try:
        plan = ["raw", "nbd-raw", "nbd-luks", "slate"]
        for name in plan:
            if only and name not in only:
                continue
            server = None
            if name == "raw":
                img = work / "raw.img"
                subprocess.run(["fallocate", "-l", str(SIZE), str(img)], check=True)
                target = {"name": "raw", "kind": "file", "path": str(img), "pids": []}
            elif name == "nbd-raw":
                server, target = start_nbd_raw(work)
            elif name == "nbd-luks":
                server, target = start_nbd_luks(work)
            else:
                server, target = start_slate(work, slate)
            try:
                all_results[name] = run_system(target, args.runtime)
                systems.append(name)
            finally:
                if server:
                    server.stop()
        if shutil.which("ceph-osd"):
            notes.append("ceph-osd is installed but the Ceph RBD run is not built yet")
        else:
            notes.append("Ceph RBD skipped: ceph-osd is not installed")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = table(all_results, systems)
    print(out)
    fresh = all_results.get("slate", {}).get("4K randwrite QD32 fresh")
    if fresh:
        settled = all_results["slate"]["4K randwrite QD32"]["iops"]
        notes.append(f"Slate right after `slate up` (fresh disks, first writes): 4K randwrite QD32 "
                     f"{fresh['iops']:.0f} IOPS, {fresh['iops'] / max(settled, 1):.2f}x the settled {settled:.0f}")
    for n in notes:
        print(f"\n{n}")
    print(f"\n{len(systems)} systems in {time.time() - started:.0f} s")
    res = Path(args.results)
    res.mkdir(parents=True, exist_ok=True)
    path = res / time.strftime("e2e-%Y%m%dT%H%M%S.json")
    path.write_text(json.dumps({"systems": systems, "results": all_results, "notes": notes,
                                "runtime_s": args.runtime, "size_bytes": SIZE}, indent=2))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
