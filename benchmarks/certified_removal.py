"""Certified removal on one head against SISA's exact unlearning (issue 18, certified family).

    python -m benchmarks.public_backbone --data-dir ../shared/datasets   # once: split, backbone, S=1 run
    python -m benchmarks.certified_removal                                # this benchmark (one thread)
    python -m benchmarks.certified_removal --smoke                        # digits, minutes (tests run it)

The regime of benchmarks.backbone_unlearning (its features, forget-set split, SISA training code and
forgetting score are imported, not copied): 512-d features of a frozen ResNet-18 pretrained on the
public rows; what is unlearned is a linear head. The certified methods (benchmarks.methods.certified)
train their own head, a one-vs-rest L2-regularised logistic regression on features clipped with a
constant from the PUBLIC rows; Retrain and SISA train the product's head (SGD, softmax).

Part 1, the table, per eps in {0.1, 1, 10}, delta = 1e-5: test accuracy and the NeurIPS 2023
forgetting score after U = the first `removed` requests of the stream, each method's unlearned models
against N monolithic Retrain heads (and, for certified methods, against their own algorithm run on the
retained rows: the reference their certificate is stated against); work per removal (the stream's
cumulative seconds / K, retraining included); the privacy parameter actually certified.
Part 2, the stream: K single-id removals one after another; cumulative seconds and test accuracy
after each K in `stream`. SISA's line: the product's head training code (sisa.training.run_shard_job,
as backbone_unlearning's sisa_heads) retraining the hit shard from the hit slice, per request, on
per-slice states kept in memory: `sisa forget`'s training work without its index and file I/O.

Hyper-parameters: lam per certified method from `lams` by validation accuracy (the 20% validation
split of the test set) of its published seed-0 model at eps = 1, then used for every eps. Guo's noise
sigma is set so that its budget covers the bound accumulated by `capacity` removals of a TUNING stream
(ids disjoint from the evaluated stream) from the noise-free model: sigma = c B / eps. Sekhari's noise
is calibrated for a deletion capacity of `capacity` (retrain beyond it). D2D: T steps per deletion.

Populations. Guo's models differ by their objective noise b, so each of its N seeds is the whole
mechanism run (training, Hessian, removals): ~20 s a seed at n = 50,000, the bulk of the benchmark's
time at N = 64 (`guo_models` < `models` trades its row's N for time; the table then adds Retrain at that N).
Sekhari's and D2D's published models are a deterministic state plus Gaussian noise; the state is
computed once and the N seeds draw the noise (exactly the mechanism's output distribution).
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import backbone_unlearning as bu
from .common import environment, plain, write_results
from .methods import certified as cr
from .methods.common import logits_of, new_model, train
from .report import pyplot

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Config:
    epsilons: tuple[float, ...] = (0.1, 1.0, 10.0)
    delta: float = 1e-5
    lams: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    d2d_lams: tuple[float, ...] = (1e-1,)  # smaller lam: ~140 (1e-2) or ~1,300 (1e-3) training steps and sigma > 1
    d2d_T: int = 2  # D2D's steps per deletion: each costs one full gradient (~0.16 s at n = 50,000)
    capacity: int = 100
    stream: tuple[int, ...] = (1, 10, 100, 1000)
    sisa_stream: tuple[int, ...] = (100, 1000)  # requests timed per S (same order as the shards)
    retrain_stream: int = 10  # monolithic retrains timed (each a full 16-epoch head)
    removed: int = 100  # U of the score: the stream's first requests
    models: int = 64  # N of the forgetting score for every row (issue 18: N >= 64)
    guo_models: int = 64
    seed: int = 0


SMOKE = Config(lams=(1e-2, 1e-1), d2d_lams=(1e-1,), capacity=10, stream=(1, 10, 30), sisa_stream=(30, 30),
               retrain_stream=2, removed=10, models=4, guo_models=4)


def predictor(W, c):
    """Raw features -> class probabilities of a one-vs-rest head (per-class sigmoids, normalised)."""
    return lambda X: (lambda p: p / p.sum(-1, keepdim=True))(torch.sigmoid(cr.prepare(X, c) @ W)).float()


def acc(W, X, y) -> float:
    return 100 * ((X @ W).argmax(-1) == y).double().mean().item()


# --- SISA's exact per-request work ----------------------------------------------------------------------

def sisa_stream(cfg, init, f, stream: list[int], checkpoints: tuple[int, ...], test_X, test_y) -> list[dict]:
    """Per request: retrain the hit shard from the hit slice with the product's training code."""
    from sisa.partition import ShardJob, partition
    from sisa.training import build_trainable, initial_state, run_shard_job

    layout = bu.shard_layout(cfg, len(f.ids))
    place = partition(len(f.ids), cfg.shards, cfg.slices, cfg.seed)
    gone: set[int] = set()

    def job(shard, start):
        rows = [[r for r in s if r not in gone] for s in layout[shard]]
        return ShardJob(shard, start, rows, [[f.ids[r] for r in s] for s in rows])

    states = {}
    for shard in range(cfg.shards):
        states[shard] = [r.state for r in run_shard_job(cfg, job(shard, 0), initial_state(cfg, shard, init), f.train, f.train_y)]
    out, total = [], 0.0
    for k, row in enumerate(stream, 1):
        start = time.perf_counter()
        pl = place[row]
        gone.add(row)
        before = states[pl.shard][pl.slice - 1] if pl.slice else initial_state(cfg, pl.shard, init)
        redone = [r.state for r in run_shard_job(cfg, job(pl.shard, pl.slice), before, f.train, f.train_y)]
        states[pl.shard][pl.slice:] = redone
        total += time.perf_counter() - start
        if k in checkpoints:
            heads = []
            for shard in range(cfg.shards):
                h = build_trainable(cfg)
                h.load_state_dict(states[shard][-1]["model"])
                heads.append(h.eval())
            mean, _ = bu.ensemble_probs(heads, test_X)
            out.append({"K": k, "cumulative_seconds": total,
                        "test_acc": 100 * (mean.argmax(-1) == test_y).float().mean().item()})
    return out


# --- the benchmark ----------------------------------------------------------------------------------------

def run(f, base_cfg, init, st: bu.Setting, cfg: Config, log) -> dict:
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    val_p = bu.problems(f, st)[0].val  # backbone_unlearning's validation rows of the test set
    n = len(f.train_y)
    perm = np.random.default_rng(cfg.seed + 18).permutation(n)
    k_max = max(cfg.stream)
    stream, tuning = perm[:k_max].tolist(), perm[k_max:k_max + cfg.capacity].tolist()
    U = torch.tensor(sorted(stream[:cfg.removed]))
    keep = torch.ones(n, dtype=torch.bool)
    keep[U] = False
    p = bu.Problem(f"first {cfg.removed} requests", U, keep.nonzero().squeeze(1), U[:0], val_p)

    c = cr.clip_constant(f.public)
    X, Y = cr.prepare(f.train, c), cr.signs(f.train_y, f.classes)
    Xv, yv = cr.prepare(f.test[val_p], c), f.test_y[val_p]
    Xt, yt = cr.prepare(f.test[~val_p], c), f.test_y[~val_p]
    res: dict = {"clip_constant": c, "clipped_private_rows": int((f.train.double().norm(dim=1) > c).sum()),
                 "stream_ids": stream, "U": U.tolist()}

    # 1. lam per method, on validation, at eps = 1
    free, tuning_log = {}, []
    W = None
    for lam in sorted(cfg.lams, reverse=True):  # warm starts: strong regularisation first
        t0 = time.perf_counter()
        W, _ = cr.fit(X, Y, lam, W=W)
        chol = torch.linalg.cholesky(cr.hessians(X, W, lam))
        calib = cr.Guo(X, Y, lam, sigma=0.0, budget=math.inf, W=W, chol=chol)
        bound = sum(calib.remove(r)["bound"] for r in tuning)
        free[lam] = {"W": W, "chol": chol, "B": bound, "seconds": time.perf_counter() - t0}
        sig = cr.guo_c(cfg.delta) * bound / 1.0
        guo = cr.Guo(X, Y, lam, sigma=sig, budget=cr.guo_budget(sig, 1.0, cfg.delta), W=W, chol=chol)
        sek_sigma = cr.sekhari_sigma(1.0, cfg.delta, cfg.capacity, n, lam, f.classes)
        gen = torch.Generator().manual_seed(0)
        tuning_log.append({"lam": lam, "noise_free_val_acc": acc(W, Xv, yv), "guo_budget_B": bound,
                           "guo_sigma": sig, "guo_val_acc": acc(guo.W, Xv, yv), "sekhari_sigma": sek_sigma,
                           "sekhari_val_acc": acc(W + sek_sigma * torch.randn(W.shape, dtype=torch.float64, generator=gen), Xv, yv)})
        log(f"lam {lam}: {tuning_log[-1]}")
    d2d_theta = {}
    for lam in cfg.d2d_lams:
        head = cr.D2D(X, Y, lam, cfg.d2d_T, 1.0, cfg.delta)
        d2d_theta[lam] = head.theta
        tuning_log.append({"lam": lam, "d2d_sigma": head.sigma(), "d2d_train_steps": head.k.train_steps(cfg.d2d_T, n),
                           "d2d_val_acc": acc(head.W, Xv, yv)})
        log(f"d2d lam {lam}: {tuning_log[-1]}")
    best = {m: max((t for t in tuning_log if f"{m}_val_acc" in t), key=lambda t: t[f"{m}_val_acc"])["lam"]
            for m in ("guo", "sekhari", "d2d")}
    res["tuning"], res["lam"] = tuning_log, best

    # 2. the reference populations (N models each) on the retained rows
    task = bu.task_for(f, p, st)

    def retrain(offset):
        return lambda s: (lambda m: (lambda X_: logits_of(m, X_).softmax(-1)))(
            train(new_model(task, s + offset), task, task.retain, st.epochs, st.lr, seed=s + offset))

    t0 = time.perf_counter()
    ref = bu.population(retrain(0), f, p, cfg.models)
    res["retrain_seconds_per_model"] = (time.perf_counter() - t0) / cfg.models
    other = bu.population(retrain(cfg.models), f, p, cfg.models)
    log(f"retrain populations done at {time.perf_counter() - started:.0f} s")

    def first(pop, k):
        return {"probs": pop["probs"][:k], "retain_acc": pop["retain_acc"][:k], "test_acc": pop["test_acc"][:k]}

    rows = [{"method": "Retrain (monolithic)", "epsilon": 0.0, "certified_epsilon": 0.0, "n_models": cfg.models,
             "test_acc": float(np.mean(ref["test_acc"])), "score": bu.score(other, ref, f, p), "score_own": None,
             "work_per_removal_s": res["retrain_seconds_per_model"]}]
    if cfg.guo_models < cfg.models:
        rows.append({"method": f"Retrain (monolithic), N={cfg.guo_models}", "epsilon": 0.0, "certified_epsilon": 0.0,
                     "n_models": cfg.guo_models, "test_acc": float(np.mean(ref["test_acc"][:cfg.guo_models])),
                     "score": bu.score(first(other, cfg.guo_models), first(ref, cfg.guo_models), f, p),
                     "score_own": None, "work_per_removal_s": res["retrain_seconds_per_model"]})
    streams: dict = {}
    checkpoints = tuple(cfg.stream)

    # Retrain's stream: a full head per request
    total, pts = 0.0, []
    for k in range(1, cfg.retrain_stream + 1):
        t0 = time.perf_counter()
        gone = torch.ones(n, dtype=torch.bool)
        gone[torch.tensor(stream[:k])] = False
        model = train(new_model(task, cfg.seed), task, gone.nonzero().squeeze(1), st.epochs, st.lr, seed=cfg.seed)
        total += time.perf_counter() - t0
        if k in checkpoints or k == cfg.retrain_stream:
            pts.append({"K": k, "cumulative_seconds": total, "test_acc": bu.accuracy(model, f.test[~val_p], yt)})
    streams["Retrain (monolithic)"] = {"points": pts}

    for shards, k_sisa in zip(st.shards, cfg.sisa_stream):
        scfg = bu.sisa_config(base_cfg, st, shards, cfg.seed)

        def ensemble(s, scfg=scfg):
            heads = bu.sisa_heads(replace(scfg, seed=s), init, f, bu.shard_layout(replace(scfg, seed=s), n), p.forget)
            return lambda X_: bu.ensemble_probs(heads, X_)[0]
        pop = bu.population(ensemble, f, p, cfg.models)
        pts = sisa_stream(scfg, init, f, stream[:k_sisa], tuple(k for k in checkpoints if k <= k_sisa) + (k_sisa,),
                          f.test[~val_p], yt)
        pts = [q for i, q in enumerate(pts) if q["K"] not in [r["K"] for r in pts[:i]]]
        streams[f"SISA S={shards}"] = {"points": pts}
        rows.append({"method": f"SISA S={shards}", "epsilon": 0.0, "certified_epsilon": 0.0, "n_models": cfg.models,
                     "test_acc": float(np.mean(pop["test_acc"])), "score": bu.score(pop, ref, f, p), "score_own": None,
                     "work_per_removal_s": pts[-1]["cumulative_seconds"] / pts[-1]["K"]})
        log(f"SISA S={shards} done at {time.perf_counter() - started:.0f} s")

    # 3. Guo et al., per eps: the stream (seed 0) and N seeds of the whole mechanism
    lam = best["guo"]
    fr = free[lam]
    cc = cr.guo_c(cfg.delta)
    for eps in cfg.epsilons:
        sigma = cc * fr["B"] / eps
        budget = cr.guo_budget(sigma, eps, cfg.delta)

        def mechanism(seed, removals):
            head = cr.Guo(X, Y, lam, sigma=sigma, budget=budget, seed=seed, W=fr["W"], chol=fr["chol"])
            total, pts, beta_max = 0.0, [], head.beta
            for k, row in enumerate(removals, 1):
                total += head.remove(row)["seconds"]
                beta_max = max(beta_max, head.beta)
                if k in checkpoints:
                    pts.append({"K": k, "cumulative_seconds": total, "test_acc": acc(head.W, Xt, yt),
                                "retrains": head.retrains})
            return head, pts, beta_max

        head, pts, beta_max = mechanism(cfg.seed, stream)
        streams[f"Guo et al., eps={eps:g}"] = {"points": pts, "retrains": head.retrains, "sigma": sigma, "budget": budget}
        heads, betas = [], [beta_max]
        for s in range(cfg.guo_models):
            h, _, b = mechanism(s + 1, stream[:cfg.removed])
            heads.append(h.W)
            betas.append(b)
            if (s + 1) % 8 == 0:
                log(f"Guo eps {eps}: {s + 1}/{cfg.guo_models} seeds at {time.perf_counter() - started:.0f} s")
        pop = bu.population(lambda s: predictor(heads[s], c), f, p, cfg.guo_models)
        own_W = []
        for s in range(cfg.guo_models):
            gen = torch.Generator().manual_seed(10_000 + s)
            B = sigma * torch.randn(fr["W"].shape, dtype=torch.float64, generator=gen)
            own_W.append(cr.fit(X, Y, lam, B, fr["W"], fr["chol"], keep.double())[0])
        own = bu.population(lambda s: predictor(own_W[s], c), f, p, cfg.guo_models)
        rows.append({"method": "Guo et al.", "epsilon": eps, "certified_epsilon": cc * max(betas) / sigma, "lam": lam,
                     "sigma": sigma, "n_models": cfg.guo_models, "test_acc": float(np.mean(pop["test_acc"])),
                     "score": bu.score(pop, first(ref, cfg.guo_models), f, p), "score_own": bu.score(pop, own, f, p),
                     "work_per_removal_s": pts[-1]["cumulative_seconds"] / pts[-1]["K"]})
        log(f"Guo eps {eps} done at {time.perf_counter() - started:.0f} s")

    # 4. Sekhari et al. and D2D: one stream each (the noise-free state is eps-independent), noise per eps
    lam_s, lam_d = best["sekhari"], best["d2d"]
    sek = cr.Sekhari(X, Y, lam_s, cfg.capacity, 1.0, cfg.delta, seed=cfg.seed, W=free[lam_s]["W"])
    d2d = cr.D2D(X, Y, lam_d, cfg.d2d_T, 1.0, cfg.delta, seed=cfg.seed, theta=d2d_theta[lam_d])
    sek_pts, d2d_pts, totals, at_U = [], [], [0.0, 0.0], {}
    for k, row in enumerate(stream, 1):
        totals[0] += sek.remove(row)["seconds"]
        totals[1] += d2d.remove(row)["seconds"]
        if k == cfg.removed:
            at_U = {"sekhari": (sek.mean.clone(), sek.n0, sek.retrains), "d2d": d2d.theta.clone()}
        if k in checkpoints:
            sek_pts.append({"K": k, "cumulative_seconds": totals[0], "retrains": sek.retrains,
                            **{f"test_acc_eps{e:g}": acc(sek.released(e), Xt, yt) for e in cfg.epsilons}})
            d2d_pts.append({"K": k, "cumulative_seconds": totals[1],
                            **{f"test_acc_eps{e:g}": acc(d2d.released(e), Xt, yt) for e in cfg.epsilons}})
    sek_own = cr.fit(X, Y, lam_s, None, free[lam_s]["W"], free[lam_s]["chol"], keep.double())[0]
    d2d_own = cr.pgd(X, Y, torch.zeros_like(d2d.theta), keep.double(), d2d.k, d2d.k.train_steps(cfg.d2d_T, n - cfg.removed))
    for eps in cfg.epsilons:
        for name, mean, own_mean, sigma, pts, lam_m in (
                ("Sekhari et al.", at_U["sekhari"][0], sek_own, sek.sigma(eps), sek_pts, lam_s),
                ("Descent-to-Delete", at_U["d2d"], d2d_own, d2d.sigma(eps), d2d_pts, lam_d)):
            def noisy(centre, offset):
                return lambda s: predictor(centre + sigma * torch.randn(
                    centre.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(offset + s)), c)
            pop = bu.population(noisy(mean, 0), f, p, cfg.models)
            own = bu.population(noisy(own_mean, 10_000), f, p, cfg.models)
            key = f"{name}, eps={eps:g}"
            streams[key] = {"points": [{"K": q["K"], "cumulative_seconds": q["cumulative_seconds"],
                                        "test_acc": q[f"test_acc_eps{eps:g}"], **({"retrains": q["retrains"]} if "retrains" in q else {})}
                                       for q in pts], "sigma": sigma}
            rows.append({"method": name, "epsilon": eps, "certified_epsilon": eps, "lam": lam_m, "sigma": sigma,
                         "n_models": cfg.models, "test_acc": float(np.mean(pop["test_acc"])),
                         "score": bu.score(pop, ref, f, p), "score_own": bu.score(pop, own, f, p),
                         "work_per_removal_s": pts[-1]["cumulative_seconds"] / pts[-1]["K"]})
    log(f"Sekhari, D2D done at {time.perf_counter() - started:.0f} s")
    res.update({"table": rows, "stream": streams, "seconds": time.perf_counter() - started})
    return res


# --- report ---------------------------------------------------------------------------------------------------

def render(res: dict) -> str:
    cfg = res["config"]
    lines = [f"# Certified removal on one head against SISA ({res['dataset']}, CPU, one thread)", "",
             f"Features of the frozen public trunk (backbone_unlearning's regime), {res['private_rows']:,} private rows. "
             f"Certified heads: one-vs-rest logistic regression, features divided by C = {res['clip_constant']:.2f} (the "
             f"largest PUBLIC feature norm) and clipped to norm 1 ({res['clipped_private_rows']} private rows clipped); "
             f"lam chosen on validation at eps = 1 (Guo {res['lam']['guo']:g}, Sekhari {res['lam']['sekhari']:g}, "
             f"D2D {res['lam']['d2d']:g}); delta = {cfg['delta']:g}; Guo's noise covers the bound of {cfg['capacity']} "
             f"tuning removals, Sekhari's capacity is {cfg['capacity']}, D2D takes {cfg['d2d_T']} steps per deletion.", "",
             f"Score: the NeurIPS 2023 forgetting score after the stream's first {cfg['removed']} requests (forget set = "
             "those rows), unlearned models against N monolithic Retrain heads; `own` against the method's own algorithm "
             "run on the retained rows (what its certificate compares with). Work: seconds per removal over the whole "
             "stream, retraining included. Certified eps: what the certificates actually give (0 = exact).", "",
             "| method | eps | certified eps | test acc | score vs Retrain | score vs own | N | work per removal (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["table"]:
        own = f"{r['score_own']['score']:.3f}" if r["score_own"] else ""
        lines.append(f"| {r['method']} | {r['epsilon']:g} | {r['certified_epsilon']:.3g} | {r['test_acc']:.2f} | "
                     f"{r['score']['score']:.3f} | {own} | {r['n_models']} | {r['work_per_removal_s']:.3g} |")
    lines += ["", "## Stream of single-id removals: cumulative work (s) / test accuracy after K", "",
              "| method | " + " | ".join(f"K={k}" for k in cfg["stream"]) + " | retrains |",
              "|---|" + "---|" * (len(cfg["stream"]) + 1)]
    for name, s in res["stream"].items():
        by_k = {q["K"]: q for q in s["points"]}
        cells = [f"{by_k[k]['cumulative_seconds']:.3g} / {by_k[k]['test_acc']:.2f}" if k in by_k else "not run"
                 for k in cfg["stream"]]
        last = s["points"][-1]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {last.get('retrains', s.get('retrains', ''))} |")
    extra = [s for s in res["stream"].items() if s[1]["points"][-1]["K"] not in cfg["stream"]]
    for name, s in extra:
        q = s["points"][-1]
        lines.append(f"\n{name}: {q['K']} requests timed, {q['cumulative_seconds']:.3g} s, test acc {q['test_acc']:.2f}.")
    lines += ["", f"Retrain per model: {res['retrain_seconds_per_model']:.2f} s. Whole benchmark: {res['seconds']:.0f} s.",
              "", "λ tuning (validation accuracy at eps = 1):", ""]
    lines += [f"- {t}" for t in res["tuning"]]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> Path | None:
    if (plt := pyplot()) is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, s in res["stream"].items():
        k = [q["K"] for q in s["points"]]
        w = [max(q["cumulative_seconds"], 1e-4) for q in s["points"]]
        style = "-" if name.startswith(("SISA", "Retrain")) else "--"
        ax.plot(k, w, style, marker="o", ms=3, label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("K sequential single-id removals")
    ax.set_ylabel("cumulative work (s, one thread)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "datasets"))
    ap.add_argument("--work", type=Path, default=None, help="benchmarks.public_backbone's folder (read only)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--results-dir", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg, st = (SMOKE, bu.SMOKE) if args.smoke else (Config(), bu.Setting())
    work = args.work or (bu.WORK.with_name("certified_smoke") if args.smoke else bu.WORK)
    if args.smoke:
        subprocess.run([sys.executable, "-m", "benchmarks.public_backbone", "--smoke", "--work", str(work)],
                       check=True, cwd=ROOT, capture_output=True)
    f, base_cfg, init = bu.load_features(work, args.smoke, args.data_dir)
    res = {"environment": environment(), "load_average": list(__import__("os").getloadavg()),
           "dataset": "digits" if args.smoke else "Fashion-MNIST", "config": asdict(cfg), "setting": asdict(st),
           "private_rows": len(f.train_y)}
    res.update(run(f, base_cfg, init, st, cfg, lambda m: print(m, file=sys.stderr, flush=True)))
    res["load_average_end"] = list(__import__("os").getloadavg())
    name = "certified_removal_smoke" if args.smoke else "certified_removal_fashionmnist_cpu"
    folder = args.results_dir or (work / "results" if args.smoke else ROOT / "benchmarks" / "results")
    folder.mkdir(parents=True, exist_ok=True)
    png = plot(res, folder / f"{name}.png")
    md = render(res) + (f"\n\n![cumulative work against K]({png.name})" if png else "")
    md += f"\n\n- load average (1, 5, 15 min) at start {res['load_average']}, at end {res['load_average_end']}"
    for path in write_results(name, plain(res), md, folder):
        print(path)


if __name__ == "__main__":
    main()
