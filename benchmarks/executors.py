"""Issue-6 numbers: what running shard jobs as Ray tasks costs against running them one after
another in the command's own process (and two at once in its threads), and, where CUDA GPUs are
visible, the speed-up of training S = 5 shards at once.

    python -m benchmarks.executors [--shards 5] [--slices 4] [--epochs 4] [--repeats 2]

CPU part (always): `sisa train` on digits, then one `sisa forget` of a random id, through the
real CLI with `--executor local`, with `--executor local --jobs-per-gpu 2` and with `--executor
ray` (each command starts its own local Ray instance on all cores), timed as a user sees them,
process and Ray start-up included, alternating between them, best of `--repeats`. The overhead
is the ratio of the times. All must write the same checkpoint files bit for bit; this is
checked. GPU part (only when torch sees a CUDA GPU): `sisa train --shards 5` with the default
epochs on one GPU, shards one after another (`--executor local`) against all five at once
(`--executor local --jobs-per-gpu 5`, and `--executor ray --gpus-per-task 0.2`), and
`--executor gpus` when there are several GPUs. Without a GPU the result records that it could
not be measured, and why.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .common import environment, write_results

ROOT = Path(__file__).resolve().parents[1]


def sisa(*args: str) -> tuple[dict, float]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray, never a cluster
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cli", *args, "--json"], capture_output=True, text=True,
                          cwd=ROOT, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"sisa {' '.join(args)} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout), seconds


def checkpoint_hashes(run_dir: Path) -> dict[str, str]:
    from store.index import Index

    index = Index(run_dir / "index.sqlite")
    try:
        return {f"{s}/{i}": c.sha256 for (s, i), c in sorted(index.checkpoints().items())}
    finally:
        index.close()


def train_and_forget(tmp: Path, executor: list[str], layout: list[str], sid: str, device: str) -> dict:
    run = tmp / f"run-{'-'.join(executor)}"
    trained, train_s = sisa("train", *layout, "--run-dir", str(run), "--device", device, "--overwrite", *executor)
    req = tmp / "forget.csv"
    req.write_text(f"id\n{sid}\n")
    forgot, forget_s = sisa("forget", "--ids", str(req), "--run-dir", str(run), "--device", device, "--no-eval", *executor)
    return {"train_wall_s": round(train_s, 2), "train_complete_s": trained["seconds"],
            "forget_wall_s": round(forget_s, 2), "forget_complete_s": round(forgot["seconds"], 3),
            "forget_shards": forgot["shards_retrained"], "hashes": checkpoint_hashes(run)}


def ray_start_seconds() -> float:
    """A fresh local Ray instance, one trivial task, shutdown: the fixed cost of every command."""
    code = ("import time, ray; t = time.perf_counter(); ray.init(include_dashboard=False); "
            "ray.get(ray.remote(lambda: 1).remote()); ray.shutdown(); print(time.perf_counter() - t)")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    return round(float(out.strip().splitlines()[-1]), 2)


def cpu_part(args, tmp: Path) -> dict:
    layout = ["--shards", str(args.shards), "--slices", str(args.slices), "--epochs", str(args.epochs)]
    sid = f"train-{random.Random(args.seed).randrange(1437):05d}"  # digits has 1,437 training samples
    flags = {"local": ["--executor", "local"], "local_2_at_once": ["--executor", "local", "--jobs-per-gpu", "2"],
             "ray": ["--executor", "ray"]}
    runs: dict[str, list[dict]] = {name: [] for name in flags}
    for _ in range(args.repeats):
        for name in runs:  # alternate, so drift in the machine's speed hits all alike
            runs[name].append(train_and_forget(tmp, flags[name], layout, sid, "cpu"))
    identical = all(r["hashes"] == runs["local"][0]["hashes"] for rs in runs.values() for r in rs)
    best = {name: {k: min(r[k] for r in rs) for k in ("train_wall_s", "train_complete_s", "forget_wall_s",
                                                       "forget_complete_s")} for name, rs in runs.items()}
    ratio = {k: round(best["ray"][k] / best["local"][k], 3) for k in best["local"]}
    at_once = {k: round(best["local_2_at_once"][k] / best["local"][k], 3) for k in best["local"]}
    for rs in runs.values():
        for r in rs:
            r.pop("hashes")
    return {"layout": layout, "forgotten_id": sid, "runs": runs, "best": best, "ray_over_local": ratio,
            "local_2_at_once_over_local": at_once, "checkpoints_identical": identical,
            "ray_start_s": min(ray_start_seconds() for _ in range(args.repeats))}


def gpu_part(tmp: Path) -> dict:
    gpus = torch.cuda.device_count()
    if gpus == 0:
        return {"measured": False, "reason": "torch sees no CUDA GPU on this machine "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); run this script on a GPU machine"}
    layout = ["--shards", "5"]
    variants = {"local (one shard after another)": ["--executor", "local"],
                "local, five shards at once (threads, a CUDA stream each)": ["--executor", "local", "--jobs-per-gpu", "5"],
                "ray, 0.2 GPU per task (five shards at once)": ["--executor", "ray", "--gpus-per-task", "0.2"]}
    if gpus > 1:
        variants[f"gpus ({gpus} worker processes)"] = ["--executor", "gpus"]
    times, hashes = {}, {}
    for name, flags in variants.items():
        run = tmp / f"gpu-{len(times)}"
        _, times[name] = sisa("train", *layout, "--run-dir", str(run), "--device", "cuda", *flags)
        hashes[name] = checkpoint_hashes(run)
    base = times["local (one shard after another)"]
    return {"measured": True, "gpus": gpus, "device": torch.cuda.get_device_name(0), "layout": layout,
            "train_wall_s": {k: round(v, 2) for k, v in times.items()},
            "speedup_over_local": {k: round(base / v, 3) for k, v in times.items()},
            # cuDNN picks kernels per process; on a GPU equal bits are not guaranteed, only reported
            "checkpoints_identical": len({json.dumps(h) for h in hashes.values()}) == 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=5)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=4, help="small, so start-up costs show (default 16 in `sisa train`)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per executor; the best is reported")
    ap.add_argument("--seed", type=int, default=0, help="seed of the id drawn for the forget")
    args = ap.parse_args()
    try:
        import ray
    except ImportError:
        raise SystemExit("needs Ray: pip install -e \".[ray]\"") from None

    load_before = os.getloadavg()[0]  # other work on the machine skews every time below
    with tempfile.TemporaryDirectory() as tmp:
        cpu = cpu_part(args, Path(tmp))
        gpu = gpu_part(Path(tmp))
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    payload = {"environment": environment(), "ray": ray.__version__, "load_average_1min": load, "cpu": cpu, "gpu": gpu}
    b, r, a = cpu["best"], cpu["ray_over_local"], cpu["local_2_at_once_over_local"]
    busy = (" (above its core count: other work was running, times are inflated, the best run is the "
            "least affected)" if max(load) > (os.cpu_count() or 1) else "")
    gpu_md = ("| executor | train wall s | speed-up |\n|---|---|---|\n" + "\n".join(
        f"| {k} | {v:.1f} | {gpu['speedup_over_local'][k]:.2f}x |" for k, v in gpu["train_wall_s"].items())
        if gpu["measured"] else f"Not measured: {gpu['reason']}.")
    rows = "\n".join(f"| {label} | {b['local'][k]:.1f} | {b['local_2_at_once'][k]:.1f} | {b['ray'][k]:.1f} | {a[k]:.2f} | "
                     f"{r[k]:.2f} |" for label, k in (("train, wall s", "train_wall_s"),
                                                      ("train, complete s", "train_complete_s"),
                                                      ("forget, wall s", "forget_wall_s"),
                                                      ("forget, complete s", "forget_complete_s")))
    md = f"""# Executors: Ray against sequential (CPU){' and concurrent shards on GPU' if gpu['measured'] else ''}

`sisa train {' '.join(cpu['layout'])}` on digits, then `sisa forget` of `{cpu['forgotten_id']}`,
best of {args.repeats} runs each, CPU only. Wall: the whole command as a user runs it (process
start-up, data loading, Ray start-up). Complete: the command's own `seconds` (training and
writing checkpoints, Ray start-up included).

| | local (sequential) | local, `--jobs-per-gpu 2` (threads) | ray (local instance) | local 2 at once / local | ray / local |
|---|---|---|---|---|---|
{rows}

Checkpoint files identical bit for bit between the executors: {'yes' if cpu['checkpoints_identical'] else 'NO'}.
With `--jobs-per-gpu 2` the local executor trains two shard jobs at once in threads of its own
process, each with the command's thread count (the bits depend on it), so on a CPU they share
its cores; the forget retrains one shard, so there it runs alone either way.
On CPU the bits depend on torch's thread count, so a Ray task trains with the command's own
({payload['environment']['torch_threads']} here) and reserves as many CPUs: on a machine with that many cores Ray runs one
shard at a time, like the sequential executor, and the ratio is Ray's own cost. Starting a local
Ray instance and running one trivial task takes {cpu['ray_start_s']:.1f} s here; the rest is
starting worker processes that import torch and load the data, and scheduling. The machine's
1-minute load average was {load[0]} before and {load[1]} after{busy}.

## GPU: `sisa train --shards 5` with shards trained concurrently

{gpu_md}
"""
    name = "executors_gpu" if gpu["measured"] else "executors_cpu"
    js, mdp = write_results(name, payload, md)
    print(md)
    print(f"wrote {js} and {mdp}")


if __name__ == "__main__":
    main()
