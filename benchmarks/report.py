"""Markdown tables and PNG plots of a benchmarks.unlearning result (numbers are never typed)."""
from __future__ import annotations

from .common import RESULTS

COLUMNS = [("forget_acc", "forget acc"), ("retain_acc", "retain acc"), ("test_acc", "test acc"),
           ("mia_kit", "MIA (kit)"), ("mia_efficacy", "MIA-efficacy"), ("gap_to_retrain", "gap to Retrain"),
           ("seconds", "time s"), ("speedup", "speed-up")]


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def render(results: dict, out: str, folder=RESULTS) -> str:
    lines = [f"# Unlearning benchmark ({results['mode']} mode)", "",
             "Metrics as defined in benchmarks/metrics.py (and ../shared/BENCHMARKS.md); accuracies and MIA in %, "
             "times are the unlearning step's wall time, speed-up = Retrain time / method time, measured in this run. "
             "Approximate methods start from one shared original model; SISA's row is its ensemble after an exact "
             "forget (vote for accuracy, mean softmax for the MIA columns).", ""]
    for ds, res in results["datasets"].items():
        m = res["methods"]
        o = m["original"]
        lines += [f"## {ds} ({res['train_samples']} training samples)", "",
                  f"Original model: train accuracy {o['train_acc']:.2f}%, test accuracy {o['test_acc']:.2f}%, "
                  f"trained in {o['train_seconds']:.1f} s. SISA training: {m['sisa_train_seconds']:.1f} s.", ""]
        for frac, block in m["fractions"].items():
            lines += [f"### forget {float(frac):.0%} ({block['forget_size']} samples)", "",
                      "| method | " + " | ".join(c for _, c in COLUMNS) + " | chosen hyper-parameters |",
                      "|---" * (len(COLUMNS) + 2) + "|"]
            for name, row in block["methods"].items():
                extra = row.get("hp", "")
                if name == "SISA":
                    extra = (f"{row['shards_retrained']} shards / {row['slices_retrained']} slice steps retrained, "
                             f"{row['sample_epochs']} of {row['full_sample_epochs']} sample-epochs")
                lines.append(f"| {name} | " + " | ".join(_fmt(row[k]) for k, _ in COLUMNS) + f" | {extra} |")
            lines.append("")
        cc = res["cost_curve"]
        lines += ["### SISA cost curve", "",
                  f"Full retraining of this SISA run: {cc['full_sample_epochs']} sample-epochs, {cc['train_seconds']:.1f} s.", "",
                  "| K | sequential: sample-epochs (fraction of K full retrains) | model | s | batch: sample-epochs "
                  "(fraction of one full retrain) | model | shards hit (model) | s |", "|---" * 8 + "|"]
        for p in cc["points"]:
            seq, bat = p["sequential"], p["batch"]
            lines.append(f"| {p['k']} | {seq['sample_epochs']} ({seq['sample_epochs'] / p['retrain_k_times_sample_epochs']:.3f}) | "
                         f"{p['model_sequential_fraction'] / p['k']:.3f} | {seq['seconds']:.1f} | "
                         f"{bat['sample_epochs']} ({bat['sample_epochs'] / p['retrain_once_sample_epochs']:.3f}) | "
                         f"{p['model_batch_fraction']:.3f} | {bat['shards_retrained']} ({p['model_shards_hit']:.2f}) | "
                         f"{bat['seconds']:.1f} |")
        sv = res["accuracy_vs_shards"]
        lines += ["", f"### Ensemble test accuracy against S (R = 1, {sv['epochs']} epochs: equal total compute)", "",
                  "| S | vote | mean softmax | mean constituent | train s |", "|---|---|---|---|---|"]
        lines += [f"| {p['shards']} | {p['vote']:.2f} | {p['mean']:.2f} | {p['mean_constituent']:.2f} | {p['seconds']:.1f} |"
                  for p in sv["points"]]
        lines.append("")
    dg = results.get("deltagrad", {})
    if dg:
        r18 = dg["resnet18"]
        lines += ["## DeltaGrad (MNIST, models whose trajectory can be cached)", "",
                  f"ResNet-18: {r18['params']:,} parameters x {r18['iterations']:,} iterations would need "
                  f"{r18['cache_bytes'] / 1e12:.2f} TB of cached parameters and gradients (fp32): infeasible.", ""]
        if "skipped" in dg:
            lines.append(f"MNIST runs skipped: {dg['skipped']}")
        else:
            keys = [k for k in dg["rows"][0] if k not in ("model", "fraction", "detail")]
            lines += [f"Training subset: {dg['subset']} samples.", "",
                      "| model | forget | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
            lines += [f"| {r['model']} | {r['fraction']:.0%} | " + " | ".join(_fmt(r[k]) for k in keys) + " |"
                      for r in dg["rows"]]
        lines.append("")
    plots = plot(results, out, folder)
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    lines.append(f"\nTotal benchmark time: {results['seconds'] / 60:.1f} min.")
    return "\n".join(lines)


def plot(results: dict, out: str, folder=RESULTS) -> list:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional: pip install ".[bench]"
        return []
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds, res in results["datasets"].items():
        fracs = res["methods"]["fractions"]
        fig, axes = plt.subplots(1, len(fracs), figsize=(5.5 * len(fracs), 4), squeeze=False)
        for ax, (frac, block) in zip(axes[0], fracs.items()):
            for name, row in block["methods"].items():
                ax.scatter(row["seconds"], row["test_acc"], s=40, marker="*" if name == "SISA" else "o")
                ax.annotate(f"{name} (gap {row['gap_to_retrain']:.1f})", (row["seconds"], row["test_acc"]),
                            fontsize=8, xytext=(4, 4), textcoords="offset points")
            ax.set_xscale("log")
            ax.set(xlabel="unlearning wall time (s, log)", ylabel="test accuracy (%)",
                   title=f"{ds}: forget {float(frac):.0%}")
        fig.tight_layout()
        paths.append(_save(fig, folder / f"{out}_{ds}_methods.png"))

        cc = res["cost_curve"]["points"]
        fig, ax = plt.subplots(figsize=(5.5, 4))
        ks = [p["k"] for p in cc]
        full = res["cost_curve"]["full_sample_epochs"]
        ax.plot(ks, [p["sequential"]["sample_epochs"] / full for p in cc], "o-", label="SISA, one after another")
        ax.plot(ks, [p["model_sequential_fraction"] for p in cc], "--", label="cost model, one after another")
        ax.plot(ks, [p["batch"]["sample_epochs"] / full for p in cc], "s-", label="SISA, one batch")
        ax.plot(ks, [p["model_batch_fraction"] for p in cc], ":", label="cost model, one batch")
        ax.plot(ks, ks, "k-", alpha=0.3, label="retrain K times")
        ax.set(xscale="log", yscale="log", xlabel="requests K", ylabel="cost / one full retraining",
               title=f"{ds}: SISA forget cost")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(_save(fig, folder / f"{out}_{ds}_cost.png"))

        sv = res["accuracy_vs_shards"]["points"]
        fig, ax = plt.subplots(figsize=(5.5, 4))
        S = [p["shards"] for p in sv]
        for key, label in (("vote", "majority vote"), ("mean", "mean softmax"), ("mean_constituent", "one constituent")):
            ax.plot(S, [p[key] for p in sv], "o-", label=label)
        ax.set(xscale="log", xlabel="shards S", ylabel="test accuracy (%)", title=f"{ds}: accuracy vs S (equal compute)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(_save(fig, folder / f"{out}_{ds}_shards.png"))
    return paths


def _save(fig, path):
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
