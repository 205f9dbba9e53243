"""Issue-17 numbers: the live service (`sisa serve`) under load, and `sisa add`, on the CPU.

    python -m benchmarks.serve_latency                       # Fashion-MNIST, public-backbone mode
    python -m benchmarks.serve_latency --smoke --work DIR    # digits, tiny settings: what the tests run

What runs: a real `sisa serve` (uvicorn, `python -m cli serve ... --device cpu`) in a subprocess on
a copy of the public-backbone S = 20 run (`--trainable fc`) that `python -m benchmarks.public_backbone`
left in benchmarks/work/public_backbone/ (built here with that script's functions when missing),
spoken to over HTTP by client threads in this process. Measured:

  - `/predict` latency (per request, time.perf_counter around the HTTP call) with 4 concurrent
    clients in a closed loop, 1 and 64 images per request: idle, then while single-id forgets run
    one after another (a prediction counts as "during a forget" when its interval overlaps one
    forget's, from sending /forget to seeing "done"), then during batches of 100 ids.
    Targets: p99 during a forget <= 2 x idle p99; no failed prediction (every failure recorded
    with its status).
  - `/forget` of one id, from the 202 to the first poll of `/requests/{id}` (every 10 ms) that says
    done: without prediction load and under each load. Target: under 2 s.
  - 100 single-id requests sent by 4 threads within one `--batch-window` (a second server): time
    from the first 202 to the last done, and the generation, which must move exactly once.
  - `sisa add` of 1,000 new samples (the server stopped): a run of the same configuration created
    from the private manifest without 1,000 held-out rows (a random, seeded choice; they keep their
    own ids, which that run never saw), then `sisa add --dataset new.csv`; against retraining
    everything (`sisa train` of the same configuration from scratch on the 50,000, features
    computed; and again with the features copied by `--features-from`), with ensemble test
    accuracy before and after (sisa.evaluation.evaluate, what `sisa evaluate` runs).
  - CPU: the server's and this process's CPU seconds (/proc) and the machine's busy share per
    phase, and one forget's CPU cost with no load: the evidence for why a target is missed.

Clients and server share the machine's 2 cores, as they would on a one-box deployment; this
process's own CPU use is recorded beside the server's.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.public_backbone import cli, reusable_backbone, write_split

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "benchmarks" / "work" / "public_backbone"
TARGET_FORGET_S = 2.0
TARGET_P99_RATIO = 2.0
CLIENTS = 4
POLL_S = 0.01


# --- CPU accounting (/proc) ------------------------------------------------------------------

def proc_cpu(pid: int | str = "self") -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds per thread of a process (its torch and OpenMP threads included)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = proc_cpu(f"{pid}/task/{task.name}")
        except (OSError, IndexError):  # a thread that ended meanwhile
            pass
    return out


def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts) - idle, sum(parts)


class CpuMeter:
    """CPU use over a span: the server's (and its writer thread's, once known), this process's,
    and the machine's busy share."""

    def __init__(self, server_pid: int, writer_tid: int | None = None):
        self.pid, self.writer = server_pid, writer_tid
        self.threads = thread_cpu(server_pid)
        self.start = (time.perf_counter(), proc_cpu(server_pid), proc_cpu(), machine_ticks())

    def read(self) -> dict:
        wall, server, me, (busy, total) = self.start
        b, t = machine_ticks()
        w = time.perf_counter() - wall
        used = proc_cpu(self.pid) - server
        out = {"wall_s": round(w, 2), "server_cpu_s": round(used, 2), "server_cores": round(used / w, 2),
               "clients_cpu_s": round(proc_cpu() - me, 2), "clients_cores": round((proc_cpu() - me) / w, 2),
               "machine_busy": round((b - busy) / max(1, t - total), 3), "server_threads": len(self.threads)}
        if self.writer is not None:
            writer = thread_cpu(self.pid).get(self.writer, 0.0) - self.threads.get(self.writer, 0.0)
            out.update(writer_cores=round(writer / w, 2), others_cores=round((used - writer) / w, 2))
        return out

    def busiest_thread(self) -> int:
        """The server thread that used the most CPU since this meter started (with no prediction
        load during a forget: the writer thread)."""
        now = thread_cpu(self.pid)
        return max(now, key=lambda tid: now[tid] - self.threads.get(tid, 0.0))


# --- the server --------------------------------------------------------------------------------

class Server:
    """`sisa serve` in a subprocess on a port the kernel picks; the bearer token in `token_file`."""

    def __init__(self, run_dir: Path, token_file: Path, log: Path, batch_window: float = 0.0):
        import httpx

        self.token = token_file.read_text().strip()
        self.log = log
        cmd = [sys.executable, "-m", "cli", "serve", "--run-dir", str(run_dir), "--port", "0", "--token-file",
               str(token_file), "--batch-window", str(batch_window), "--device", "cpu"]
        started = time.perf_counter()
        with open(log, "w") as f:  # a file, not a pipe: a full pipe would stall the server
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while not (found := re.search(r"sisa serve: http://127\.0\.0\.1:(\d+)", log.read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise SystemExit(f"sisa serve did not start: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{found.group(1)}"
        self.auth = {"Authorization": f"Bearer {self.token}"}
        self.http = httpx.Client(base_url=self.url, timeout=300)
        while True:  # the port is bound; uvicorn accepts a moment later
            try:
                self.http.get("/health")
                break
            except httpx.TransportError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise SystemExit(f"sisa serve did not answer /health: {log.read_text()[-2000:]}")
                time.sleep(0.05)
        self.startup_s = round(time.perf_counter() - started, 2)

    def generation(self) -> int:
        return self.http.get("/health").json()["generation"]

    def forget(self, ids: list[str], http=None) -> tuple[str, float, float]:
        """(request id, when sent, when the 202 came) for a deletion request."""
        sent = time.perf_counter()
        r = (http or self.http).post("/forget", json={"ids": ids}, headers=self.auth)
        accepted = time.perf_counter()
        if r.status_code != 202:
            raise SystemExit(f"/forget {ids[:3]} answered {r.status_code}: {r.text[:300]}")
        return r.json()["request"], sent, accepted

    def state(self, public_id: str) -> dict:
        r = self.http.get(f"/requests/{public_id}", headers=self.auth)
        if r.status_code != 200:
            raise SystemExit(f"/requests/{public_id} answered {r.status_code}: {r.text[:300]}")
        return r.json()

    def wait_done(self, public_id: str, timeout: float = 600) -> tuple[dict, float]:
        """(final state, when a poll first saw it done or failed)."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state(public_id)
            if state["status"] in ("done", "failed"):
                return state, time.perf_counter()
            if time.monotonic() > deadline:
                raise SystemExit(f"request {public_id} not done after {timeout} s: {state}")
            time.sleep(POLL_S)

    def close(self) -> None:
        if getattr(self, "http", None) is not None:
            self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # uvicorn shuts down cleanly; the lock goes with it
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


# --- prediction load ---------------------------------------------------------------------------

class Load:
    """CLIENTS threads, each posting `size` images per /predict in a closed loop until stopped.
    Every answer is a record (client, start, end, status, generation, error); a non-200 answer,
    a transport error or a wrong number of labels counts as a failure."""

    def __init__(self, url: str, images: list[bytes], size: int, clients: int = CLIENTS):
        self.url, self.images, self.size, self.clients = url, images, size, clients
        self.records: list[tuple[int, float, float, object, int | None, str | None]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(clients)]

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(600)

    def snapshot(self) -> list:
        with self._lock:
            return list(self.records)

    def _client(self, k: int) -> None:
        import httpx

        n = len(self.images)
        i = k * self.size * 7
        with httpx.Client(base_url=self.url, timeout=300) as http:
            while not self._stop.is_set():
                files = [("file", (f"{(i + j) % n}.png", self.images[(i + j) % n], "image/png"))
                         for j in range(self.size)]
                i += self.size
                start = time.perf_counter()
                try:
                    r = http.post("/predict", files=files)
                    end = time.perf_counter()
                    status, generation, error = r.status_code, None, None
                    if r.status_code == 200:
                        body = r.json()
                        generation = body["generation"]
                        if len(body["labels"]) != self.size:
                            status, error = "wrong-count", f"{len(body['labels'])} labels for {self.size} images"
                    else:
                        error = r.text[:300]
                except httpx.HTTPError as e:
                    end = time.perf_counter()
                    status, generation, error = type(e).__name__, None, str(e)[:300]
                with self._lock:
                    self.records.append((k, start, end, status, generation, error))


def summary(records, seconds: float | None = None) -> dict:
    """Latency percentiles (ms) of successful predictions, and the failures."""
    import numpy as np

    ok = [end - start for _, start, end, status, _, _ in records if status == 200]
    out = {"n": len(records), "ok": len(ok), "failed": len(records) - len(ok)}
    if ok:
        ms = np.array(ok) * 1000
        out.update(p50_ms=round(float(np.percentile(ms, 50)), 1), p99_ms=round(float(np.percentile(ms, 99)), 1),
                   mean_ms=round(float(ms.mean()), 1), max_ms=round(float(ms.max()), 1))
    if seconds:
        out["requests_per_s"] = round(len(ok) / seconds, 2)
    return out


def failures(records, phase: str) -> list[dict]:
    return [{"phase": phase, "client": k, "at_s": round(start, 3), "status": status, "error": error}
            for k, start, _, status, _, error in records if status != 200]


def overlaps(record, spans: list[tuple[float, float]]) -> bool:
    _, start, end, *_ = record
    return any(start < b and end > a for a, b in spans)


# --- data and runs -----------------------------------------------------------------------------

def read_manifest(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_manifest(path: Path, rows: list[dict], base: Path) -> Path:
    """A manifest at `path` of `rows` read from a manifest in folder `base` (paths made relative to `path`)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path", "label"])
        for r in rows:
            w.writerow([r["id"], os.path.relpath(base / r["path"], path.parent), r["label"]])
    return path


def run_status(run_dir: Path) -> dict:
    """What `sisa status --json` says (in this process: a CLI start-up costs seconds)."""
    import sisa

    run = sisa.Run.open(run_dir)
    try:
        return json.loads(json.dumps(run.status(), default=str))
    finally:
        run.close()


def source_ready(folder: Path, shards: int) -> bool:
    run = folder / f"run-s{shards}"
    if not all((folder / f).exists() for f in ("backbone.pt", "private.csv", "test.csv", "img")):
        return False
    if not (run / "index.sqlite").is_file():
        return False
    status = run_status(run)
    return status["complete"] and status["requests"]["unfinished"] == 0


def build_source(folder: Path, args) -> None:
    """What benchmarks.public_backbone makes (manifests, backbone, the S-shard run), with its
    functions and settings, for when its work folder is missing (and always in smoke mode)."""
    from sisa.data import load_digits, load_idx_dataset

    folder.mkdir(parents=True, exist_ok=True)
    data = load_digits() if args.smoke else load_idx_dataset("fashion-mnist", Path(args.data_dir))
    tr, te, p = data.train, data.test, args.public
    public = write_split(folder, "public", tr.ids[:p], tr.images[:p], tr.labels[:p])
    private = write_split(folder, "private", tr.ids[p:], tr.images[p:], tr.labels[p:])
    test = write_split(folder, "test", te.ids, te.images, te.labels)
    backbone = folder / "backbone.pt"
    if reusable_backbone(backbone, public, args) is None:
        from sisa.backbone import pretrain  # what `sisa pretrain` runs, without a second start-up

        pretrain(str(public), "data", backbone, epochs=args.pretrain_epochs, seed=args.seed, device="cpu",
                 test_manifest=test, width=args.width)
    cli("train", "--dataset", private, "--test-manifest", test, "--init-from", backbone, "--trainable", "fc",
        "--width", args.width, "--shards", args.shards, "--slices", args.slices, "--epochs", args.epochs,
        "--seed", args.seed, "--run-dir", folder / f"run-s{args.shards}", "--overwrite", "--device", "cpu")


def live_ids(run_dir: Path) -> list[str]:
    with sqlite3.connect(f"file:{run_dir / 'index.sqlite'}?mode=ro", uri=True) as db:
        return sorted(r[0] for r in db.execute("SELECT id FROM samples WHERE status = 'active'"))


def audit_run(run_dir: Path) -> dict:
    """`sisa audit` (in this process): every live checkpoint's lineage is free of deleted samples."""
    import sisa
    from sisa.audit import audit

    run = sisa.Run.open(run_dir)
    try:
        return audit(run).to_dict()
    finally:
        run.close()


def checkpoint_hashes(run_dir: Path) -> dict:
    from store.index import Index

    index = Index(run_dir / "index.sqlite")
    try:
        return {str(k): c.sha256 for k, c in index.checkpoints().items()}
    finally:
        index.close()


# --- the phases --------------------------------------------------------------------------------

def single_forget(server: Server, sid: str) -> dict:
    g0 = server.generation()
    cpu0 = proc_cpu(server.proc.pid)
    public_id, sent, accepted = server.forget([sid])
    state, done = server.wait_done(public_id)
    receipt = state.get("receipt") or {}
    return {"id": sid, "status": state["status"], "samples_deleted": state["samples_deleted"],
            "post_to_202_ms": round(1000 * (accepted - sent), 1), "accepted_to_done_s": round(done - accepted, 3),
            "server_cpu_s": round(proc_cpu(server.proc.pid) - cpu0, 2),
            "generation_moved": server.generation() - g0, "slices_retrained": receipt.get("slices_retrained"),
            "span": (sent, done)}


def forgets_under_load(server: Server, images, size: int, ids, args, writer: int) -> dict:
    """Single-id forgets one after another (a pause between) while CLIENTS clients predict."""
    forgets = []
    meter = CpuMeter(server.proc.pid, writer)
    with Load(server.url, images, size) as load:
        time.sleep(args.settle)
        while True:
            forgets.append(single_forget(server, next(ids)))
            time.sleep(args.gap)
            during = sum(overlaps(r, [f["span"] for f in forgets]) for r in load.snapshot())
            if len(forgets) >= args.max_forgets or (len(forgets) >= args.min_forgets and during >= args.min_during):
                break
    cpu = meter.read()
    spans = [f.pop("span") for f in forgets]
    on = [r for r in load.records if overlaps(r, spans)]
    off = [r for r in load.records if not overlaps(r, spans) and r[1] > load.records[0][1] + args.settle]
    return {"during": summary(on), "between": summary(off), "forgets": forgets, "cpu": cpu,
            "generations_seen": sorted({r[4] for r in load.records if r[4] is not None}),
            "failures": failures(load.records, f"{size} images, single forgets")}


def batch_forget(server: Server, ids: list[str], window: float, senders: int = 4) -> dict:
    """len(ids) single-id requests sent by `senders` threads at once; all should join one batch."""
    import httpx

    g0 = server.generation()
    cpu0 = proc_cpu(server.proc.pid)
    accepted: list[tuple[str, float, float]] = []
    lock = threading.Lock()

    def send(part: list[str]) -> None:
        with httpx.Client(base_url=server.url, timeout=300) as http:
            for sid in part:
                got = server.forget([sid], http)
                with lock:
                    accepted.append(got)

    threads = [threading.Thread(target=send, args=(ids[k::senders],)) for k in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first_sent = min(a[1] for a in accepted)
    first, last = min(a[2] for a in accepted), max(a[2] for a in accepted)
    states, done_at, reported_failed = [], [], []
    for public_id, _, _ in sorted(accepted, key=lambda a: a[2]):
        state, t = server.wait_done(public_id)
        if state["status"] == "failed":  # recorded, then followed: the server retries a failed batch
            reported_failed.append({"request": public_id, "error": state.get("error"), "at_s": round(t - first_sent, 3)})
            deadline = time.monotonic() + 300
            while state["status"] != "done" and time.monotonic() < deadline:
                time.sleep(0.1)
                state, t = server.state(public_id), time.perf_counter()
        states.append(state)
        done_at.append(t)
    shards = sorted({s for st in states for s in (st.get("receipt") or {}).get("shards_retrained", [])})
    return {"requests": len(ids), "batch_window_s": window, "all_done": all(s["status"] == "done" for s in states),
            "reported_failed": reported_failed,
            "samples_deleted": sum(s["samples_deleted"] for s in states),
            "accepted_spread_s": round(last - first, 3), "within_window": last - first < window,
            "first_202_to_last_done_s": round(max(done_at) - first, 3),
            "after_window_s": round(max(done_at) - first - window, 3),
            "generation_moved": server.generation() - g0, "shards_retrained": len(shards),
            "server_cpu_s": round(proc_cpu(server.proc.pid) - cpu0, 2), "span": (first_sent, max(done_at))}


def writer_batches(log: Path) -> list[float]:
    """The writer thread's own seconds per batch (retrain, load, swap, mark done), from the server's log."""
    return [float(x) for x in re.findall(r"sisa serve: finished \d+ requests(?: and \d+ additions)? in ([\d.]+) s",
                                         log.read_text())]


def serve_phases(run_dir: Path, work: Path, images: list[bytes], args) -> dict:
    token = work / "token.txt"
    token.write_text(secrets.token_urlsafe(32) + "\n")
    pool = live_ids(run_dir)
    random.Random(args.seed).shuffle(pool)
    ids = iter(pool)
    out: dict = {"clients": CLIENTS, "sizes": args.sizes, "poll_interval_s": POLL_S}
    all_failures: list[dict] = []

    server = Server(run_dir, token, work / "server.log")
    out["server_startup_s"] = server.startup_s
    try:
        for size in args.sizes:  # warm-up: the first requests pay lazy imports and allocations
            with Load(server.url, images, size):
                time.sleep(args.warmup)
        out["warmup_forget"] = single_forget(server, next(ids))  # the first forget pays the training imports
        out["warmup_forget"].pop("span")
        out["idle"] = {}
        for size in args.sizes:
            meter = CpuMeter(server.proc.pid)
            with Load(server.url, images, size) as load:
                time.sleep(args.idle)
            cpu = meter.read()
            out["idle"][str(size)] = {**summary(load.records, cpu["wall_s"]), "cpu": cpu}
            all_failures += failures(load.records, f"{size} images, idle")
            print(f"idle, {size} images: {out['idle'][str(size)]}", file=sys.stderr)
        out["forgets_no_load"] = []
        meter = CpuMeter(server.proc.pid)
        for _ in range(args.single_forgets):
            f = single_forget(server, next(ids))
            f.pop("span")
            out["forgets_no_load"].append(f)
            time.sleep(args.gap)
        meter.writer = writer = meter.busiest_thread()
        out["forgets_no_load_cpu"] = meter.read()
        print(f"forgets without load: {out['forgets_no_load']}", file=sys.stderr)
        out["during_forgets"] = {}
        for size in args.sizes:
            res = forgets_under_load(server, images, size, ids, args, writer)
            all_failures += res.pop("failures")
            out["during_forgets"][str(size)] = res
            print(f"during forgets, {size} images: {res['during']} ({len(res['forgets'])} forgets)", file=sys.stderr)
    finally:
        server.close()
    singles = [out["warmup_forget"], *out["forgets_no_load"], *(f for d in out["during_forgets"].values()
                                                                 for f in d["forgets"])]
    seconds = writer_batches(server.log)
    if len(seconds) == len(singles):  # one batch per forget, in order: each waited for the last
        for f, w in zip(singles, seconds):
            f["writer_s"] = w

    # Batches: a second server whose writer waits --batch-window after the first request.
    server = Server(run_dir, token, work / "server-batch.log", batch_window=args.batch_window)
    try:
        with Load(server.url, images, 1):
            time.sleep(args.warmup)
        batches = []
        for size in args.batch_loads:
            chosen = [next(ids) for _ in range(args.batch)]
            if size is None:
                b = batch_forget(server, chosen, args.batch_window)
                b["load"] = "none"
            else:
                with Load(server.url, images, size) as load:
                    time.sleep(args.settle)
                    b = batch_forget(server, chosen, args.batch_window)
                    time.sleep(args.gap)
                b["load"] = f"{CLIENTS} clients x {size} images"
                b["predictions_during"] = summary([r for r in load.records if overlaps(r, [b["span"]])])
                all_failures += failures(load.records, f"{size} images, batch of {args.batch}")
            b.pop("span")
            batches.append(b)
            print(f"batch: {b}", file=sys.stderr)
            time.sleep(args.gap)
        out["batches"] = batches
    finally:
        server.close()
    seconds = writer_batches(server.log)
    if len(seconds) == len(batches):
        for b, w in zip(batches, seconds):
            b["writer_s"] = w
    out["failures"] = all_failures
    return out


def add_phase(work: Path, source: Path, config: dict, args) -> dict:
    """`sisa add` of held-out rows to a run created without them, against retraining everything."""
    from sisa.evaluation import evaluate

    rows = read_manifest(source / "private.csv")
    held = set(random.Random(args.seed).sample(range(len(rows)), args.new))
    base_rows = [r for i, r in enumerate(rows) if i not in held]
    new_rows = [r for i, r in enumerate(rows) if i in held]
    base = write_manifest(work / "base.csv", base_rows, source)
    new = write_manifest(work / "new.csv", new_rows, source)
    every = write_manifest(work / "all.csv", base_rows + new_rows, source)
    test = source / "test.csv"
    same = ["--test-manifest", test, "--init-from", source / "backbone.pt", "--trainable", "fc",
            "--width", config["width"], "--shards", config["shards"], "--slices", config["slices"],
            "--epochs", config["epochs"], "--seed", config["seed"], "--overwrite", "--device", "cpu"]

    def accuracy(run: Path) -> dict:
        start = time.perf_counter()
        ev = evaluate(run, "cpu")
        return {"ensemble_vote": ev["ensemble_vote"], "ensemble_mean": ev["ensemble_mean"],
                "evaluate_s": round(time.perf_counter() - start, 1)}

    out: dict = {"base_samples": len(base_rows), "new_samples": len(new_rows)}
    run = work / "add-run"
    created, wall = cli("train", "--dataset", base, "--run-dir", run, *same)
    got = run_status(run)["config"]
    # Fields the served run lacks came after it was made (their defaults are what it ran with).
    differ = [k for k in got if k in config and k not in ("dataset", "init_sha256") and got[k] != config[k]]
    if differ:
        raise SystemExit(f"the add run's configuration differs from the served run's in {differ}")
    out["config_fields_new_since_the_served_run"] = {k: got[k] for k in got if k not in config}
    out["base_train"] = {"wall_s": round(wall, 1), "seconds": created["seconds"]}
    out["before"] = accuracy(run)
    print(f"base run: {out['base_train']} {out['before']}", file=sys.stderr)
    added, wall = cli("add", "--dataset", new, "--run-dir", run, "--device", "cpu")
    out["add"] = {"wall_s": round(wall, 1), **added}
    out["after"] = accuracy(run)
    print(f"add: {out['add']} {out['after']}", file=sys.stderr)
    full = work / "retrain-all"
    trained, wall = cli("train", "--dataset", every, "--run-dir", full, *same)
    out["retrain_all"] = {"wall_s": round(wall, 1), "seconds": trained["seconds"], **accuracy(full)}
    print(f"retrain all: {out['retrain_all']}", file=sys.stderr)
    cached = work / "retrain-all-cached"
    trained, wall = cli("train", "--dataset", every, "--run-dir", cached, "--features-from", full, *same)
    out["retrain_all_cached_features"] = {
        "wall_s": round(wall, 1), "seconds": trained["seconds"],
        "checkpoints_identical_to_retrain_all": checkpoint_hashes(cached) == checkpoint_hashes(full)}
    shutil.rmtree(cached, ignore_errors=True)
    out["add_vs_retrain_all_wall"] = round(out["add"]["wall_s"] / out["retrain_all"]["wall_s"], 4)
    out["add_vs_retrain_all_cached_wall"] = round(out["add"]["wall_s"] / out["retrain_all_cached_features"]["wall_s"], 4)
    return out


# --- results -----------------------------------------------------------------------------------

def verdicts(serve: dict) -> dict:
    out = {}
    for size, idle in serve["idle"].items():
        during = serve["during_forgets"][size]["during"]
        ratio = during["p99_ms"] / idle["p99_ms"]
        out[f"p99_ratio_{size}"] = {"idle_p99_ms": idle["p99_ms"], "during_p99_ms": during["p99_ms"],
                                    "ratio": round(ratio, 2), "target": TARGET_P99_RATIO,
                                    "met": ratio <= TARGET_P99_RATIO}
    singles = serve["forgets_no_load"] + [f for s in serve["during_forgets"].values() for f in s["forgets"]]
    worst_idle = max(f["accepted_to_done_s"] for f in serve["forgets_no_load"])
    worst = max(f["accepted_to_done_s"] for f in singles)
    out["forget_202_to_done"] = {"worst_no_load_s": worst_idle, "worst_under_load_s": worst, "target_s": TARGET_FORGET_S,
                                 "met_no_load": worst_idle < TARGET_FORGET_S, "met_under_load": worst < TARGET_FORGET_S,
                                 "requests": len(singles)}
    out["zero_failed_predictions"] = {"failed": len(serve["failures"]), "met": not serve["failures"]}
    out["batch_one_retraining"] = {"met": all(b["generation_moved"] == 1 and b["all_done"] and b["within_window"]
                                              and not b["reported_failed"] for b in serve["batches"])}
    return out


def markdown(payload: dict) -> str:
    s, a, v, cfg = payload["serve"], payload["add"], payload["targets"], payload["config"]
    yes = {True: "met", False: "**missed**"}
    lines = [f"# `sisa serve` latency on {payload['dataset']} (CPU, public-backbone mode)", "",
             f"Served run: S = {cfg['shards']}, R = {cfg['slices']}, e = {cfg['epochs']}, `--trainable fc` on a "
             f"width-{cfg['width']} pretrained trunk; {payload['served_samples']:,} live samples. Server: "
             f"`python -m cli serve --device cpu` (uvicorn) in a subprocess; {CLIENTS} client threads in the "
             "benchmark process, closed loop, on the same 2 cores. Latency per request with `time.perf_counter`.", "",
             "## Targets", "",
             "| target | measured | verdict |", "|---|---|---|"]
    for size in s["idle"]:
        r = v[f"p99_ratio_{size}"]
        lines.append(f"| p99 during a forget <= {TARGET_P99_RATIO:g}x idle p99, {size} image(s)/request "
                     f"| {r['during_p99_ms']:.0f} ms vs {r['idle_p99_ms']:.0f} ms: {r['ratio']:.2f}x | {yes[r['met']]} |")
    f = v["forget_202_to_done"]
    lines += [f"| one-id /forget, 202 to done < {TARGET_FORGET_S:g} s, no load | worst {f['worst_no_load_s']:.2f} s "
              f"| {yes[f['met_no_load']]} |",
              f"| the same under prediction load | worst {f['worst_under_load_s']:.2f} s ({f['requests']} requests in all) "
              f"| {yes[f['met_under_load']]} |",
              f"| zero failed predictions | {v['zero_failed_predictions']['failed']} failed | "
              f"{yes[v['zero_failed_predictions']['met']]} |",
              f"| {s['batches'][0]['requests']} requests in one batch window: one retraining | generation moved "
              f"{', '.join(str(b['generation_moved']) for b in s['batches'])} | {yes[v['batch_one_retraining']['met']]} |",
              "", "## /predict latency", "",
              "| images/request | condition | requests | p50 (ms) | p99 (ms) | max (ms) | failed |", "|---|---|---|---|---|---|---|"]
    for size in s["idle"]:
        idle, d = s["idle"][size], s["during_forgets"][size]
        rows = [("idle", idle), (f"during a single-id forget ({len(d['forgets'])} forgets)", d["during"]),
                ("same phase, between forgets", d["between"])]
        rows += [(f"during a batch of {b['requests']}", b["predictions_during"]) for b in s["batches"]
                 if b["load"].endswith(f"x {size} images")]
        for name, r in rows:
            lines.append(f"| {size} | {name} | {r['n']} | {r.get('p50_ms', '-')} | {r.get('p99_ms', '-')} "
                         f"| {r.get('max_ms', '-')} | {r['failed']} |")
    lines += ["", "Idle throughput: " + ", ".join(f"{k} image(s)/request {r['requests_per_s']} requests/s "
                                                   f"({float(k) * r['requests_per_s']:.0f} images/s)"
                                                   for k, r in s["idle"].items()) + "."]
    lines += ["", "## One-id /forget, 202 to done", "",
              f"Polled every {1000 * POLL_S:.0f} ms on `/requests/{{id}}`; batch window 0.", "",
              "| load | requests | median (s) | max (s) | server CPU from send to done (s, median; with predictions under load) | generation moved |",
              "|---|---|---|---|---|---|"]

    def forget_row(name, fs):
        t = [x["accepted_to_done_s"] for x in fs]
        lines.append(f"| {name} | {len(fs)} | {statistics.median(t):.3f} | {max(t):.3f} "
                     f"| {statistics.median(x['server_cpu_s'] for x in fs):.2f} "
                     f"| {sorted({x['generation_moved'] for x in fs})} |")

    w = s["warmup_forget"]
    forget_row("none (first forget of the server: warm-up, not in the targets)", [w])
    forget_row("none", s["forgets_no_load"])
    for size, d in s["during_forgets"].items():
        forget_row(f"{CLIENTS} clients x {size} image(s)", d["forgets"])
    lines += ["", "Without load, one by one: " + ", ".join(f"{x['accepted_to_done_s']:.3f} s" for x in s["forgets_no_load"])
              + ".", "", f"## {s['batches'][0]['requests']} single-id requests in one batch window", "",
              "| load | window (s) | spread of the 202s (s) | first 202 to last done (s) | after the window (s) "
              "| writer's batch (s) | shards retrained | generation moved | all done | reported failed first |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for b in s["batches"]:
        lines.append(f"| {b['load']} | {b['batch_window_s']:g} | {b['accepted_spread_s']:.2f} | "
                     f"{b['first_202_to_last_done_s']:.2f} | {b['after_window_s']:.2f} | {b.get('writer_s', '-')} "
                     f"| {b['shards_retrained']} | {b['generation_moved']} | {b['all_done']} | {len(b['reported_failed'])} |")
    for b in s["batches"]:
        for x in b["reported_failed"]:
            lines.append(f"\nUnder {b['load']}: request {x['request']} was reported failed {x['at_s']} s after the "
                         f"first /forget ({x['error']}), then done.")
    lines += ["", "## CPU per phase", "",
              "Cores = CPU seconds / wall seconds (the machine has 2), from /proc. The writer thread is the "
              "server thread that used the most CPU during the forgets without load.", "",
              "| phase | wall (s) | server cores | of which the writer thread | other server threads | clients cores "
              "| machine busy |", "|---|---|---|---|---|---|---|"]
    rows = [("single forgets, no load", s["forgets_no_load_cpu"])]
    for size in s["idle"]:
        rows += [(f"idle, {size} image(s)", s["idle"][size]["cpu"]),
                 (f"single forgets, {size} image(s)", s["during_forgets"][size]["cpu"])]
    for name, c in rows:
        lines.append(f"| {name} | {c['wall_s']} | {c['server_cores']} | {c.get('writer_cores', '-')} "
                     f"| {c.get('others_cores', '-')} | {c['clients_cores']} | {100 * c['machine_busy']:.0f}% |")
    if payload.get("analysis"):
        lines += ["", "## Why", ""] + [f"- {x}" for x in payload["analysis"]]
    lines += ["", f"## `sisa add` of {a['new_samples']:,} new samples (server stopped)", "",
              f"A run of the same configuration created from the private manifest without {a['new_samples']:,} "
              f"held-out rows ({a['base_samples']:,} samples), then `sisa add --dataset new.csv`; "
              "against `sisa train` of the same configuration on all of them from scratch.", "",
              "| step | wall (s) | command's own seconds | ensemble test accuracy (vote / mean) |", "|---|---|---|---|",
              f"| create the run without them (features computed) | {a['base_train']['wall_s']} | "
              f"{a['base_train']['seconds']} | {100 * a['before']['ensemble_vote']:.2f}% / "
              f"{100 * a['before']['ensemble_mean']:.2f}% |",
              f"| `sisa add` ({len(a['add']['shards_retrained'])} shards' last slice retrained) | {a['add']['wall_s']} | "
              f"{a['add']['seconds']} | {100 * a['after']['ensemble_vote']:.2f}% / {100 * a['after']['ensemble_mean']:.2f}% |",
              f"| retrain everything from scratch (features computed) | {a['retrain_all']['wall_s']} | "
              f"{a['retrain_all']['seconds']} | {100 * a['retrain_all']['ensemble_vote']:.2f}% / "
              f"{100 * a['retrain_all']['ensemble_mean']:.2f}% |",
              f"| retrain everything, features copied (`--features-from`) | {a['retrain_all_cached_features']['wall_s']} | "
              f"{a['retrain_all_cached_features']['seconds']} | identical checkpoints: "
              f"{a['retrain_all_cached_features']['checkpoints_identical_to_retrain_all']} |", "",
              f"`sisa add` took {100 * a['add_vs_retrain_all_wall']:.1f}% of retraining everything's wall time "
              f"({100 * a['add_vs_retrain_all_cached_wall']:.0f}% of it when the features are already cached); "
              f"{a['add']['sample_epochs']:,} of {a['add']['full_sample_epochs']:,} sample-epochs."]
    if s["failures"]:
        lines += ["", "## Failed predictions", "", "| phase | client | status | error |", "|---|---|---|---|"]
        lines += [f"| {x['phase']} | {x['client']} | {x['status']} | {str(x['error'])[:120]} |" for x in s["failures"]]
    lines += ["", f"Whole benchmark {payload['wall_seconds']} s."]
    return "\n".join(lines)


def analysis(serve: dict) -> list[str]:
    """What the measurements say about each target, with the numbers that explain a miss."""
    notes = []
    quiet = serve["forgets_no_load"]
    cost = statistics.median(f["server_cpu_s"] for f in quiet)
    wall = statistics.median(f["accepted_to_done_s"] for f in quiet)
    notes.append(f"A one-id forget with no prediction load: {wall:.2f} s from 202 to done (median), "
                 f"{cost:.2f} CPU-s of the server's" + (f", {statistics.median(f['writer_s'] for f in quiet):.2f} s of it "
                                                         "in the writer's batch (the rest: journaling, polling)"
                                                         if all("writer_s" in f for f in quiet) else "") + ".")
    nc = serve["forgets_no_load_cpu"]
    quiet_cpu = nc["writer_cores"] * nc["wall_s"] / len(quiet)  # the writer's CPU-s per forget
    quiet_time = sum(f["accepted_to_done_s"] for f in quiet) / len(quiet)
    for size, idle in serve["idle"].items():
        d = serve["during_forgets"][size]
        ratio = d["during"]["p99_ms"] / idle["p99_ms"]
        loaded = statistics.median(f["accepted_to_done_s"] for f in d["forgets"])
        verdict = "met" if ratio <= TARGET_P99_RATIO else f"missed by a factor {ratio / TARGET_P99_RATIO:.2f}"
        ic, fc = idle["cpu"], d["cpu"]
        saturated = ic["machine_busy"] >= 0.9
        between = (f"between forgets in the same phase p99 was {d['between']['p99_ms']:.0f} ms" if d["between"]["ok"]
                   else "no request fell wholly between two forgets")
        worst = max(f["accepted_to_done_s"] for f in d["forgets"])
        forget_verdict = ("met" if worst < TARGET_FORGET_S else
                          f"the {TARGET_FORGET_S:g} s target missed by {worst - TARGET_FORGET_S:.2f} s at worst "
                          f"({worst / TARGET_FORGET_S:.1f}x)")
        notes.append(
            f"{size} image(s)/request: p99 {d['during']['p99_ms']:.0f} ms during forgets against {idle['p99_ms']:.0f} ms "
            f"idle ({ratio:.2f}x; target {TARGET_P99_RATIO:g}x: {verdict}); {between}. Idle, the server used "
            f"{ic['server_cores']} cores and the clients {ic['clients_cores']}, the machine was "
            f"{100 * ic['machine_busy']:.0f}% busy"
            + (" (no core to spare: a forget's CPU must come out of the predictions' share)" if saturated else
               " (cores to spare: the slowdown is not only a shortage of cores)")
            + f"; in the forget phase the server used {fc['server_cores']} cores (its writer thread "
            f"{fc.get('writer_cores', '?')}, the threads answering predictions {fc.get('others_cores', '?')}), the machine "
            f"{100 * fc['machine_busy']:.0f}% busy. A forget took {loaded:.2f} s (median, worst {worst:.2f} s: "
            f"{forget_verdict}) against {wall:.2f} s without load"
            + (f" (the writer's own batch {statistics.median(f['writer_s'] for f in d['forgets']):.2f} s)"
               if all("writer_s" in f for f in d["forgets"]) else ""))
        if "writer_cores" in fc:
            per = fc["writer_cores"] * fc["wall_s"] / len(d["forgets"])
            mean = sum(f["accepted_to_done_s"] for f in d["forgets"]) / len(d["forgets"])
            notes[-1] += (f". The forget's work did not grow: the writer thread used {per:.2f} CPU-s per forget "
                          f"({quiet_cpu:.2f} without load), but it ran at {per / mean:.2f} cores while a forget was in "
                          f"flight ({quiet_cpu / quiet_time:.2f} without load): the {CLIENTS} prediction threads and "
                          "the writer share the 2 cores with no priority for the writer, so a forget waits its turn.")
        else:
            notes[-1] += "."
    for b in serve["batches"]:
        if b["generation_moved"] != 1 or not b["within_window"] or b["reported_failed"]:
            notes.append(f"Batch under {b['load']}: the 202s spread over {b['accepted_spread_s']:.2f} s against a "
                         f"{b['batch_window_s']:g} s window; the generation moved {b['generation_moved']} times; "
                         f"{len(b['reported_failed'])} requests were reported failed before they were done.")
    return notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="../shared/datasets", help="raw Fashion-MNIST, if the source must be built")
    ap.add_argument("--source", default=str(SOURCE), help="benchmarks.public_backbone's work folder (read only)")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "serve_latency"), help="git-ignored")
    ap.add_argument("--shards", type=int, default=20, help="serve the run-sS of the source folder")
    ap.add_argument("--idle", type=float, default=45.0, help="seconds of idle load per request size")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--settle", type=float, default=2.0, help="seconds of load before the first forget")
    ap.add_argument("--gap", type=float, default=0.5, help="seconds between forgets")
    ap.add_argument("--single-forgets", type=int, default=5, help="one-id forgets without load")
    ap.add_argument("--min-forgets", type=int, default=10, help="under each load")
    ap.add_argument("--max-forgets", type=int, default=60)
    ap.add_argument("--min-during", type=int, default=200, help="predictions during forgets, per size")
    ap.add_argument("--batch", type=int, default=100, help="ids sent within one batch window")
    ap.add_argument("--batch-window", type=float, default=10.0,
                    help="long enough for 100 /forget answers under 64-image load (7.8 s measured)")
    ap.add_argument("--new", type=int, default=1000, help="samples for sisa add")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="digits, tiny settings, seconds: checks the script runs")
    ap.add_argument("--render", metavar="RESULTS_JSON", help="measure nothing: write the analysis and the Markdown "
                    "again from a results JSON (after a change to how they are written)")
    args = ap.parse_args()
    from benchmarks.common import environment, write_results

    if args.render:  # the environment (command, commit, date) stays the measuring run's
        path = Path(args.render)
        payload = json.loads(path.read_text())
        payload["analysis"] = analysis(payload["serve"])
        for out in write_results(path.stem, payload, markdown(payload), path.parent):
            print(out)
        return
    # benchmarks.public_backbone's settings, for building the source when it is missing
    args.public, args.pretrain_epochs, args.width, args.slices, args.epochs = 10_000, 4, 64, 4, 16
    args.sizes = [1, 64]
    args.batch_loads = [None, *args.sizes]  # None: no prediction load
    if args.smoke:
        args.public, args.pretrain_epochs, args.width, args.shards, args.epochs = 300, 1, 8, 5, 2
        args.idle, args.warmup, args.settle, args.gap = 1.0, 0.3, 0.2, 0.05
        args.single_forgets, args.min_forgets, args.max_forgets, args.min_during = 2, 2, 2, 1
        args.batch, args.batch_window, args.new, args.sizes, args.batch_loads = 6, 0.5, 40, [1, 16], [None, 1]

    started = time.perf_counter()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    source = work / "source" if args.smoke else Path(args.source).resolve()
    built, phases = False, {}
    if args.smoke or not source_ready(source, args.shards):
        if not args.smoke:
            source = work / "source"
            print(f"{args.source} lacks a finished run-s{args.shards}: building one in {source}", file=sys.stderr)
        build_source(source, args)
        built = True
        phases["build_source_s"] = round(time.perf_counter() - started, 1)
    run_dir = work / "serve-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(source / f"run-s{args.shards}", run_dir)  # never change the original
    status = run_status(run_dir)
    config = status["config"]
    test_rows = read_manifest(source / "test.csv")[:640]
    images = [(source / r["path"]).read_bytes() for r in test_rows]

    mark = time.perf_counter()
    serve = serve_phases(run_dir, work, images, args)
    phases["serve_s"] = round(time.perf_counter() - mark, 1)
    audit = audit_run(run_dir)
    mark = time.perf_counter()
    add = add_phase(work, source, config, args)
    phases["add_s"] = round(time.perf_counter() - mark, 1)
    print(f"phases: {phases}", file=sys.stderr)

    payload = {"environment": environment(), "dataset": "digits" if args.smoke else "fashion-mnist",
               "source": str(source), "source_built_here": built, "settings": vars(args),
               "config": {k: config[k] for k in ("shards", "slices", "epochs", "width", "trainable", "seed")},
               "served_samples": status["samples"]["active"], "serve": serve,
               "audit_after_forgets": {"ok": audit["ok"], "checks": audit.get("checks")},
               "add": add, "phase_seconds": phases}
    payload["targets"] = verdicts(serve)
    payload["analysis"] = analysis(serve)
    payload["wall_seconds"] = round(time.perf_counter() - started, 1)
    name = "serve_latency_smoke" if args.smoke else "serve_latency_fashionmnist_cpu"
    folder = work / "results" if args.smoke else ROOT / "benchmarks" / "results"
    for path in write_results(name, payload, markdown(payload), folder):
        print(path)


if __name__ == "__main__":
    main()
