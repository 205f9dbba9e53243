"""Markdown tables and PNG plots of a benchmarks.unlearning result (numbers are never typed)."""
from __future__ import annotations

from .common import RESULTS

COLUMNS = [("forget_acc", "forget acc"), ("retain_acc", "retain acc"), ("test_acc", "test acc"),
           ("mia_kit", "MIA (kit)"), ("mia_efficacy", "MIA-efficacy"), ("gap_to_retrain", "gap to Retrain"),
           ("seconds", "time s"), ("speedup", "speed-up")]


CHANCE_FACTOR = 2  # an ensemble under this multiple of chance accuracy is flagged as a broken experiment


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
        st = results["setting"]
        lines += [f"## {ds} ({res['train_samples']} training samples)", ""]
        if "train_test_gap" in o:
            lines += [f"Original model (ResNet-18, width {st.get('width', 64)}, {o['epochs']} epochs, lr {st['lr']}, "
                      f"batch {st['batch_size']}): train accuracy {o['train_acc']:.2f}%, test accuracy "
                      f"{o['test_acc']:.2f}%, **train/test gap {o['train_test_gap']:.2f} points**; trained in "
                      f"{o['train_seconds']:.1f} s.", ""]
            if not o["memorised"]:
                lines += [f"**WARNING: the original model does NOT memorise its training set: train accuracy "
                          f"{o['train_acc']:.2f}% < {o['memorised_threshold']}%. Approximate methods start from a "
                          f"model with little to forget; train it longer.**", ""]
        else:
            lines += [f"Original model: train accuracy {o['train_acc']:.2f}%, test accuracy {o['test_acc']:.2f}%, "
                      f"trained in {o['train_seconds']:.1f} s.", ""]
        if "sisa_variants" in m:
            v = m["sisa_variants"]
            c = v["SISA"]["config"]
            lines += [f"SISA as a user trains it: S = {c['shards']}, R = {c['slices']}, e = {c['epochs']}, batch "
                      f"{c['batch_size']}, lr {c['lr']}, width {c['width']}, crop {c['crop_pad']} "
                      f"({_defaults_note(c)}): {v['SISA']['steps_per_constituent']} optimiser "
                      f"steps per constituent; trained in {v['SISA']['train_seconds']:.1f} s."]
            if "SISA (converged)" in v:
                cc = v["SISA (converged)"]
                lines += [f"SISA (converged): the same with e = {cc['config']['epochs']}, the product's e raised until "
                          f"every constituent takes at least as many steps as in view (b) below "
                          f"({cc['steps_per_constituent']}); trained in {cc['train_seconds']:.1f} s."]
            lines.append("")
        else:
            lines += [f"SISA training: {m['sisa_train_seconds']:.1f} s.", ""]
        for frac, block in m["fractions"].items():
            lines += [f"### forget {float(frac):.0%} ({block['forget_size']} samples)", "",
                      "| method | " + " | ".join(c for _, c in COLUMNS) + " | chosen hyper-parameters |",
                      "|---" * (len(COLUMNS) + 2) + "|"]
            for name, row in block["methods"].items():
                extra = row.get("hp", "")
                if name.startswith("SISA"):
                    extra = (f"{row['shards_retrained']} shards / {row['slices_retrained']} slice steps retrained, "
                             f"{row['sample_epochs']} of {row['full_sample_epochs']} sample-epochs")
                    if "epochs" in row:
                        extra = f"e = {row['epochs']} ({row['steps_per_constituent']} steps per constituent); " + extra
                lines.append(f"| {name} | " + " | ".join(_fmt(row[k]) for k, _ in COLUMNS) + f" | {extra} |")
            lines.append("")
            if "distill_knowledge" in block:
                lines += [*distill_knowledge_lines(block["distill_knowledge"]), ""]
        if "relearning" in m:
            first = next(iter(m["relearning"].values()))
            lines += [f"### Does relearning undo the forgetting? (forget {first['fraction']:.0%}, the study's schedule: "
                      f"{first['hp']['epochs']} epochs, lr {first['hp']['lr']} decayed 10x at epoch "
                      f"{first['hp']['decay_epoch']}; per-epoch curves in the JSON)", "",
                      *relearning_lines(m["relearning"]), ""]
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
        lines += [""] + shard_tables(res)
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
    for ds, res in results["datasets"].items():
        if "relearning" in res["methods"]:
            png = plot_relearning(res["methods"]["relearning"], folder / f"{out}_{ds}_relearning.png")
            plots += [png] if png else []
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    lines.append(f"\nTotal benchmark time: {results['seconds'] / 60:.1f} min"
                 + (f" (this process's CPU time {results['cpu_seconds'] / 60:.1f} min)." if "cpu_seconds" in results
                    else "."))
    for ds, res in results["datasets"].items():
        if "section_seconds" in res:
            lines.append(f"{ds} sections: " + ", ".join(f"{k} {v:.0f} s" for k, v in res["section_seconds"].items())
                         + (f"; DeltaGrad {results['deltagrad_seconds']:.0f} s." if "deltagrad_seconds" in results else "."))
    if "load_avg_1min" in results:
        lines.append("1-minute load average (2 cores; other work shares them): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in results["load_avg_1min"]) + ".")
    return "\n".join(lines)


def distill_knowledge_lines(k: dict) -> list[str]:
    """What a Distill student inherits: the student of the Original against the same student taught
    by Retrain (benchmarks.unlearning.distill_knowledge and its backbone twin)."""
    lines = ["What the Distill student still knows of the forget set through its teacher (the same student recipe, "
             f"{k['hp']}, taught by the Original or by Retrain):", "",
             "| model | forget acc | mean true-class prob on forget | test acc | MIA (kit) | MIA-efficacy |",
             "|---|---|---|---|---|---|"]
    for m in ("Original", "student of Original", "student of Retrain", "Retrain"):
        r = k[m]
        lines.append(f"| {m} | {r['forget_acc']:.2f} | {r['forget_true_class_prob']:.4f} | {r['test_acc']:.2f} | "
                     f"{r['mia_kit']:.2f} | {r['mia_efficacy']:.2f} |")
    return lines


def relearning_lines(curves: dict[str, dict]) -> list[str]:
    """The relearning study's summary: per curve, the lowest forget accuracy and what came back."""
    lines = ["The data-modification study's claim: gradient ascent's forgetting is undone by the retain passes that "
             "follow it, data modification's is not. Accuracies after every epoch (both passes); rebound = final "
             "forget accuracy minus the lowest.", "",
             "| method | lowest forget acc (epoch) | final forget acc | rebound | final retain acc | final test acc |",
             "|---|---|---|---|---|---|"]
    for name, c in curves.items():
        lines.append(f"| {name} | {100 * c['lowest_forget_acc']:.2f} ({c['lowest_at_epoch']}) | "
                     f"{100 * c['final_forget_acc']:.2f} | {100 * c['rebound']:+.2f} | {100 * c['final_retain_acc']:.2f} | "
                     f"{100 * c['final_test_acc']:.2f} |")
    return lines


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None where matplotlib is missing:
    plots are optional (pip install ".[bench]"), the JSON and Markdown are not."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_relearning(curves: dict[str, dict], path):
    """Forget accuracy after every epoch, one line per curve; None without matplotlib."""
    if (plt := pyplot()) is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, c in curves.items():
        h = c["history"]
        ax.plot([e["epoch"] for e in h], [100 * e["forget_acc"] for e in h], label=name,
                linestyle="--" if "head" in name else "-")
    ax.set_xlabel("epoch")
    ax.set_ylabel("forget-set accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _defaults_note(config: dict) -> str:
    from sisa.config import LEGACY, RunConfig

    default = RunConfig()
    changed = [k for k in ("epochs", "batch_size", "lr", "width", "reset_momentum", "batching")
               if config.get(k, LEGACY.get(k)) != getattr(default, k)]
    return "sisa.RunConfig's defaults" + (f" except {', '.join(changed)}" if changed else "")


def shard_tables(res: dict) -> list[str]:
    """Both accuracy-against-S views, each point with its batch, epochs and steps; a point at
    chance is flagged: it would mean a broken experiment, not a property of SISA."""
    chance = res.get("chance", 10.0)
    lines = []
    for key in ("accuracy_vs_shards", "accuracy_vs_shards_steps"):
        if key not in res:
            continue
        sv = res[key]
        if key == "accuracy_vs_shards":
            extra = (f", batch cut to give at least {sv['min_batches_per_epoch']} batches per epoch"
                     if "min_batches_per_epoch" in sv else "")
            lines += [f"### Ensemble test accuracy against S, view (a): equal sample-epochs "
                      f"(R = 1, {sv['epochs']} epochs for every S{extra}: equal total compute)", ""]
        else:
            lines += [f"### Ensemble test accuracy against S, view (b): equal optimiser steps per constituent "
                      f"(R = 1, about {sv['steps']} steps at batch {sv['batch_size']} for every constituent: each "
                      "trained to convergence, total compute grows with S)", ""]
        if "steps_per_constituent" in sv["points"][0]:
            lines += ["| S | vote | mean softmax | mean constituent | worst constituent | epochs | batch | "
                      "steps per constituent | sample-epochs | train s |", "|---" * 10 + "|"]
            for p in sv["points"]:
                steps = "-".join(str(v) for v in sorted(set(p["steps_per_constituent"])))
                lines.append(f"| {p['shards']} | {p['vote']:.2f} | {p['mean']:.2f} | {p['mean_constituent']:.2f} | "
                             f"{p['min_constituent']:.2f} | {p['epochs']} | {p['batch_size']} | {steps} | "
                             f"{p['sample_epochs']} | {p['seconds']:.1f} |")
        else:
            lines += ["| S | vote | mean softmax | mean constituent | train s |", "|---|---|---|---|---|"]
            lines += [f"| {p['shards']} | {p['vote']:.2f} | {p['mean']:.2f} | {p['mean_constituent']:.2f} | "
                      f"{p['seconds']:.1f} |" for p in sv["points"]]
        broken = [p["shards"] for p in sv["points"] if max(p["vote"], p["mean"]) < CHANCE_FACTOR * chance]
        if broken:
            lines += ["", f"**WARNING: S = {', '.join(map(str, broken))} scored under {CHANCE_FACTOR}x chance "
                          f"({CHANCE_FACTOR * chance:.0f}%): a broken experiment (too few steps per constituent?), "
                          "not a result.**"]
        lines.append("")
    return lines


def plot(results: dict, out: str, folder=RESULTS) -> list:
    if (plt := pyplot()) is None:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds, res in results["datasets"].items():
        fracs = res["methods"]["fractions"]
        fig, axes = plt.subplots(1, len(fracs), figsize=(5.5 * len(fracs), 4), squeeze=False)
        for ax, (frac, block) in zip(axes[0], fracs.items()):
            for name, row in block["methods"].items():
                ax.scatter(row["seconds"], row["test_acc"], s=40, marker="*" if name.startswith("SISA") else "o")
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

        views = [(k, t) for k, t in (("accuracy_vs_shards", "equal sample-epochs"),
                                     ("accuracy_vs_shards_steps", "equal steps per constituent")) if k in res]
        fig, axes = plt.subplots(1, len(views), figsize=(5.5 * len(views), 4), squeeze=False, sharey=True)
        for ax, (key, title) in zip(axes[0], views):
            sv = res[key]["points"]
            S = [p["shards"] for p in sv]
            for k, label in (("vote", "majority vote"), ("mean", "mean softmax"), ("mean_constituent", "one constituent")):
                ax.plot(S, [p[k] for p in sv], "o-", label=label)
            ax.axhline(res.get("chance", 10.0), color="k", alpha=0.3, ls=":", label="chance")
            ax.set(xscale="log", xlabel="shards S", ylabel="test accuracy (%)", title=f"{ds}: accuracy vs S ({title})")
            ax.set_xticks(S, [str(v) for v in S])
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(_save(fig, folder / f"{out}_{ds}_shards.png"))
    return paths


def _save(fig, path):
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
