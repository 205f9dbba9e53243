"""A new user's first command, `sisa train --shards 5` on digits, with today's defaults beside the
previous ones, in the same run on the same CPU (issue 12's goal: at most 150 s at 95% or more).
Three recipes: the defaults before issue 12, the defaults before momentum was reset at each slice
step (`--carry-momentum`), and today's. The train command ends with its test-set pass, as a
user's does.

    python -m benchmarks.cpu_default [--repeats 1]

Runs the real CLI in subprocesses, so the times include start-up and data loading, as a user
sees them; the two recipes alternate, so a busy spell on the machine does not favour either.
Beside wall time it records the command's CPU time (user + system, all threads): on a shared
virtual machine, wall time also counts the spells when the host runs someone else.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import environment, write_results

ROOT = Path(__file__).resolve().parents[1]
# The defaults before issue 12 (sisa 0.x until a9d7bdb): batch 64 at peak lr 0.05, 16 epochs,
# momentum carried from slice to slice; then 12 epochs, momentum still carried (until 857dc1e).
RECIPES = {"previous": ["--batch-size", "64", "--lr", "0.05", "--epochs", "16", "--slices", "4", "--carry-momentum"],
           "carried momentum": ["--carry-momentum"],
           "current": []}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cli(*args: str) -> tuple[dict, float, float]:
    """The command's JSON output, wall seconds and CPU seconds."""
    start, cpu = time.perf_counter(), cpu_seconds()
    proc = subprocess.run([sys.executable, "-m", "cli", *args, "--json"], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"sisa {' '.join(args)} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout), time.perf_counter() - start, cpu_seconds() - cpu


def one(flags: list[str], folder: Path) -> dict:
    run = str(folder / "run")
    trained, seconds, cpu = cli("train", "--shards", "5", "--device", "cpu", "--run-dir", run, "--overwrite", *flags)
    acc, _, _ = cli("evaluate", "--run-dir", run, "--device", "cpu")
    status, _, _ = cli("status", "--run-dir", run)
    cfg = status["config"]
    return {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1), "sample_epochs": trained["sample_epochs"],
            "accuracy_vote": round(100 * acc["ensemble_vote"], 2), "accuracy_mean": round(100 * acc["ensemble_mean"], 2),
            "recipe": {k: cfg[k] for k in ("shards", "slices", "epochs", "batch_size", "lr", "width", "precision",
                                           "reset_momentum")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each recipe, alternating")
    args = ap.parse_args()
    runs = {name: [] for name in RECIPES}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name, flags in RECIPES.items():
                runs[name].append(one(flags, Path(tmp)))
                print(name, runs[name][-1], file=sys.stderr, flush=True)
    summary = {name: {"seconds_median": statistics.median(r["seconds"] for r in rs),
                      "cpu_seconds_median": statistics.median(r["cpu_seconds"] for r in rs),
                      "accuracy_vote_median": statistics.median(r["accuracy_vote"] for r in rs),
                      "recipe": rs[0]["recipe"], "sample_epochs": rs[0]["sample_epochs"]} for name, rs in runs.items()}
    cur = summary["current"]
    ratio = {name: {"time": round(cur["seconds_median"] / s["seconds_median"], 3),
                    "cpu_time": round(cur["cpu_seconds_median"] / s["cpu_seconds_median"], 3)}
             for name, s in summary.items() if name != "current"}
    payload = {"environment": environment(), "runs": runs, "summary": summary, "current_over": ratio,
               "targets": {"at_most_150_s": cur["seconds_median"] <= 150, "at_least_95_percent": cur["accuracy_vote_median"] >= 95}}
    rows = "\n".join(f"| {name} | `{s['recipe']}` | {s['sample_epochs']:,} | {s['seconds_median']:.1f} | "
                     f"{s['cpu_seconds_median']:.1f} | {s['accuracy_vote_median']:.2f}% |" for name, s in summary.items())
    each = "\n".join(f"| {name} | {i + 1} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['accuracy_vote']:.2f}% |"
                     for name, rs in runs.items() for i, r in enumerate(rs))
    against = "; ".join(f"against {name}: **{r['time']:.2f}x** wall time, {r['cpu_time']:.2f}x CPU time"
                        for name, r in ratio.items())
    md = f"""# `sisa train --shards 5` on digits (CPU): today's defaults beside the previous ones

| defaults | recipe | sample-epochs | wall s (median of {args.repeats}) | CPU s (median) | ensemble test accuracy (vote) |
|---|---|---|---|---|---|
{rows}

Today's defaults, {against}. Goal: at most 150 s at 95% or more:
{'met' if all(payload['targets'].values()) else 'NOT met'}. Wall times include process start-up, data loading
and the test-set pass that ends `train` (the CLI as a user runs it), the recipes alternating in one run:

| defaults | run | wall s | CPU s | accuracy (vote) |
|---|---|---|---|---|
{each}
"""
    js, mdp = write_results("cpu_default_digits", payload, md)
    print(md)
    print(f"wrote {js} and {mdp}")


if __name__ == "__main__":
    main()
