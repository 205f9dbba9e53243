"""Near-equal batches (`--batching split`, the default) against full ones (`--batching full`) on
digits, `sisa train --shards 5` otherwise at its defaults, at the default width and at 16, two
seeds: ensemble test accuracy, sample-epochs, optimiser steps and training time, the two
batchings alternating in one run on the same CPU.

    python -m benchmarks.batching [--seeds 0 1] [--widths 64 16]

Full batches give a GPU one batch shape for a whole run (cuDNN plans every new shape: the GPU
benchmark's stages measure what that saves). On a CPU they save time by training less: an
epoch's incomplete tail sits out, and a small shard takes fewer, larger steps. This measures
whether that costs accuracy, which decides the default.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import sisa
from sisa.config import constituent_steps

from .common import environment, write_results


def steps_per_constituent(run: sisa.Run) -> list[int]:
    """Optimiser steps each shard's constituent takes over its slice steps."""
    return [constituent_steps(run.config, [len(ids) for ids in run.retained(shard)[1]])
            for shard in range(run.config.shards)]


def one(folder: Path, width: int, seed: int, batching: str) -> dict:
    cfg = sisa.config_for("digits", shards=5, width=width, seed=seed, batching=batching)
    start = time.perf_counter()
    run = sisa.train(folder / f"w{width}-s{seed}-{batching}", cfg, device="cpu")
    seconds = time.perf_counter() - start
    acc = sisa.evaluate(run.dir, device="cpu")
    steps = steps_per_constituent(run)
    sample_epochs = sum(c.sample_epochs for c in run.index.checkpoints().values())
    run.close()
    return {"width": width, "seed": seed, "batching": batching, "seconds": round(seconds, 1),
            "sample_epochs": sample_epochs, "steps_per_constituent": steps,
            "accuracy_vote": round(100 * acc["ensemble_vote"], 2), "accuracy_mean": round(100 * acc["ensemble_mean"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 16])
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for width in args.widths:
            for seed in args.seeds:
                for batching in ("split", "full"):
                    runs.append(one(Path(tmp), width, seed, batching))
                    print(runs[-1], flush=True)
    summary = {}
    for width in args.widths:
        mine = {b: [r for r in runs if r["width"] == width and r["batching"] == b] for b in ("split", "full")}
        mean = {b: {"accuracy_vote": round(statistics.mean(r["accuracy_vote"] for r in rs), 2),
                    "accuracy_mean": round(statistics.mean(r["accuracy_mean"] for r in rs), 2),
                    "seconds": round(statistics.mean(r["seconds"] for r in rs), 1)} for b, rs in mine.items()}
        summary[width] = {**mean, "full_over_split_time": round(mean["full"]["seconds"] / mean["split"]["seconds"], 3),
                          "full_minus_split_vote_points": round(mean["full"]["accuracy_vote"] - mean["split"]["accuracy_vote"], 2)}
    rows = "\n".join(f"| {r['width']} | {r['seed']} | {r['batching']} | {r['seconds']:.1f} | {r['sample_epochs']:,} | "
                     f"{min(r['steps_per_constituent'])}-{max(r['steps_per_constituent'])} | {r['accuracy_vote']:.2f}% | "
                     f"{r['accuracy_mean']:.2f}% |" for r in runs)
    lines = "\n".join(f"- width {w}: full / split training time **{s['full_over_split_time']:.2f}x**; ensemble vote accuracy "
                      f"{s['full']['accuracy_vote']:.2f}% against {s['split']['accuracy_vote']:.2f}% "
                      f"(**{s['full_minus_split_vote_points']:+.2f} points**, mean over seeds {', '.join(map(str, args.seeds))})"
                      for w, s in summary.items())
    md = f"""# Near-equal against full batches: `sisa train --shards 5` on digits (CPU)

| width | seed | batching | train s | sample-epochs | optimiser steps per constituent | test accuracy (vote) | (mean) |
|---|---|---|---|---|---|---|---|
{rows}

{lines}

Training time is the library's `train` in this process (no start-up, no test pass); the
batchings alternate. Every other setting is `sisa train --shards 5`'s default (R=4, e=12,
batch 64, lr 0.05, momentum reset per slice).
"""
    write_results("batching_digits_cpu", {"environment": environment(), "runs": runs, "summary": summary}, md)
    print(md)


if __name__ == "__main__":
    main()
