"""Issue-2 numbers: `sisa train --shards 5` with defaults on digits (time, ensemble accuracy), then
single random-id forgets, each timed against the full training measured in the same run.

    python -m benchmarks.train_forget [--forgets 5] [--seed 0]

Runs the real CLI in subprocesses, so the times include start-up and data loading, as a user
sees them. The cost model is the SISA paper's for one uniformly placed deletion:
(1/S) * (2/3 + 1/(3R)) of the full sample-epochs.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import environment, write_results


def sisa(*args: str) -> tuple[dict, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cli", *args, "--json"], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"sisa {' '.join(args)} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--forgets", type=int, default=10, help="single-id forget requests, one after another")
    ap.add_argument("--seed", type=int, default=0, help="seed of the ids drawn for forgetting")
    ap.add_argument("--shards", type=int, default=5)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = str(Path(tmp) / "run")
        trained, train_s = sisa("train", "--shards", str(args.shards), "--run-dir", run, "--device", "cpu")
        accuracy, _ = sisa("evaluate", "--run-dir", run, "--device", "cpu")
        status, _ = sisa("status", "--run-dir", run)
        cfg = status["config"]
        n = status["samples"]["active"]
        rng = random.Random(args.seed)
        forgets = []
        for sid in rng.sample([f"train-{i:05d}" for i in range(n)], args.forgets):
            req = Path(tmp) / "forget.csv"
            req.write_text(f"id\n{sid}\n")
            rep, secs = sisa("forget", "--ids", str(req), "--run-dir", run, "--device", "cpu", "--no-eval")
            forgets.append({"id": sid, "seconds": round(secs, 3), "sample_epochs": rep["sample_epochs"],
                            "full_sample_epochs": rep["full_sample_epochs"], "slices_retrained": rep["slices_retrained"]})
        after, _ = sisa("evaluate", "--run-dir", run, "--device", "cpu")

    S, R = cfg["shards"], cfg["slices"]
    model = (1 / S) * (2 / 3 + 1 / (3 * R))
    mean_s = sum(f["seconds"] for f in forgets) / len(forgets)
    mean_frac = sum(f["sample_epochs"] / f["full_sample_epochs"] for f in forgets) / len(forgets)
    payload = {
        "environment": environment(),
        "config": cfg,
        "train": {"seconds": round(train_s, 2), "sample_epochs": trained["sample_epochs"],
                  "ensemble_vote": accuracy["ensemble_vote"], "ensemble_mean": accuracy["ensemble_mean"],
                  "constituents": accuracy["constituents"]},
        "forget": {"requests": forgets, "mean_seconds": round(mean_s, 3),
                   "mean_time_fraction": round(mean_s / train_s, 4),
                   "mean_sample_epoch_fraction": round(mean_frac, 4), "cost_model_fraction": round(model, 4),
                   "one_over_S": round(1 / S, 4),
                   "ensemble_vote_after": after["ensemble_vote"], "ensemble_mean_after": after["ensemble_mean"]},
        "targets": {"train_under_180_s": train_s < 180, "accuracy_at_least_95": accuracy["ensemble_vote"] >= 0.95,
                    "forget_time_at_most_1_over_S": mean_s / train_s <= 1 / S,
                    "forget_sample_epochs_at_most_1_over_S": mean_frac <= 1 / S},
    }
    rows = "\n".join(f"| `{f['id']}` | {f['seconds']:.1f} | {f['sample_epochs']} / {f['full_sample_epochs']} | "
                     f"{f['slices_retrained']} |" for f in forgets)
    md = f"""# `sisa train --shards {S}` and single-id forgets on digits (CPU)

| | value |
|---|---|
| train wall time (`sisa train --shards {S}`, defaults: R={R}, e={cfg['epochs']}) | {train_s:.1f} s |
| ensemble test accuracy, majority vote / mean of softmax | {100 * accuracy['ensemble_vote']:.2f}% / {100 * accuracy['ensemble_mean']:.2f}% |
| mean forget wall time, one random id ({len(forgets)} requests) | {mean_s:.1f} s = {100 * mean_s / train_s:.1f}% of training |
| mean forget sample-epochs / full retraining | {100 * mean_frac:.1f}% |
| SISA cost model (1/S)(2/3 + 1/(3R)) / target 1/S | {100 * model:.1f}% / {100 / S:.1f}% |
| ensemble accuracy after the forgets (vote / mean) | {100 * after['ensemble_vote']:.2f}% / {100 * after['ensemble_mean']:.2f}% |

| forgotten id | wall s | sample-epochs / full | slices retrained (shard: slices) |
|---|---|---|---|
{rows}

Wall times include process start-up and data loading (the CLI run as a user runs it); the full
training time is measured in the same run.
"""
    js, mdp = write_results("train_forget_digits_cpu", payload, md)
    print(md)
    print(f"wrote {js} and {mdp}")


if __name__ == "__main__":
    main()
