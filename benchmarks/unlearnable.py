"""Unlearnable examples (error-minimizing noise) against SISA (issue 19).

    python -m benchmarks.unlearnable                       # MNIST, a small CNN, one CPU thread (~40 min)
    python -m benchmarks.unlearnable --all-noisy           # the paper's check: every row noisy (~6 min)
    python -m benchmarks.unlearnable --smoke               # digits, seconds (the tests' size)
    python -m benchmarks.unlearnable --stage fashion-mnist-resnet18 --data-dir DATA   # GPU stage
    python -m benchmarks.unlearnable --stage fashion-mnist-backbone --data-dir DATA   # GPU stage
    python -m benchmarks.unlearnable --list-stages

The route: a share p of the training set is declared "may be deleted" (Du, a seeded draw; the draws
are nested, Du at 10% is inside Du at 20%); Du's images get sample-wise error-minimizing noise
(benchmarks.methods.unlearnable, eps = 8/255, min-min until the source model's error on the
perturbed Du is <= 1%); a model is trained on Du (noisy) + Dc (clean). If it learns almost nothing
from Du, keeping it after Du is deleted is almost the exact answer. Per p:

- test accuracy of that model and of the model trained on Dc alone (the exact "after deletion"
  model), its accuracy on Dc, on Du as trained (noisy) and on Du's clean images;
- how much it still knows of Du: both MIA forms of benchmarks.metrics (on Du's clean images and on
  its noisy ones) and the NeurIPS 2023 forgetting score, N models trained on Du + Dc against N
  trained on Dc alone (independent seeds), on up to `score_examples` Du examples. Two reference
  rows at `ref_share`: plain training on clean data (what a model that ignored the opt-out knows:
  the "nothing forgotten" row) and Dc alone against Dc alone with other seeds (the metric's
  finite-N ceiling, what exact deletion scores);
- the cost: noise generation time per p, against SISA (S shards, R slices) of the same network
  trained on the same (clean) data: training time, one batched forget of all of Du at ref_share,
  and the mean of `sisa_requests` single-id forgets; and monolithic retraining on Dc.

SISA here is the library's recipe (sisa.slice_epochs spreading, one model per shard, slices trained
incrementally, a forget retrains the hit shard from its earliest hit slice), run with this
benchmark's network and training loop (benchmarks.methods.common.train, one optimiser per slice
step), because `sisa train` builds ResNet-18 constituents only: its cost is the training work of a
forget, without the index, hashing and checkpoint I/O of `sisa forget`.

Stages (regimes): `mnist-cnn` is the CPU run (an MNIST subset; a 2-conv CNN). `fashion-mnist-resnet18`
(ResNet-18 from scratch) and `fashion-mnist-backbone` (the public-backbone regime: the ResNet-18 of
benchmarks.public_backbone frozen, a linear head trained on its features; the noise is computed
through the frozen trunk, the source model training only its head) are GPU stages: the noise needs
20 PGD passes of a ResNet-18 over Du per round, about 1.5 CPU-hours per round for a 10% share of
the 50,000 private rows, which does not fit the CPU hour.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .common import environment, plain, write_results
from .methods.common import Task, logits_of, new_model, train
from .methods.unlearnable import NoiseConfig, error_minimizing_noise
from .metrics import forgetting_score, mia_efficacy, mia_kit
from .report import pyplot

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "work"


@dataclass(frozen=True)
class Regime:
    name: str
    dataset: str  # mnist | fashion-mnist | digits
    arch: str  # cnn | resnet18 | backbone
    n_train: int  # rows drawn from the (private part of the) training set; 0: all
    n_test: int  # 0: all
    epochs: int
    lr: float
    shares: tuple[float, ...] = (0.0, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9)
    models: int = 64  # N per side of the forgetting score
    score_examples: int = 500  # Du examples scored (a seeded draw)
    ref_share: float = 0.1  # the share of the reference rows and of the SISA comparison
    width: int = 8  # cnn: channels of the first conv; resnet18: sisa.model's width
    batch_size: int = 64
    crop_pad: int = 0
    flip: bool = False
    public: int = 0  # backbone: the first `public` training rows pretrained the trunk (never drawn)
    sisa_shards: int = 5
    sisa_slices: int = 4
    sisa_requests: int = 10
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    device: str = "cpu"
    seed: int = 0


REGIMES = {
    "mnist-cnn": Regime("mnist_cpu", "mnist", "cnn", n_train=4000, n_test=2000, epochs=4, lr=0.05),
    # ~110 ResNet-18 trainings (N = 8 per side, 6 shares, references): a 20,000-row subset keeps the
    # stage near half an hour of one H100 (estimated, not yet run); --models raises N
    "fashion-mnist-resnet18": Regime("fashion_mnist_resnet18_gpu", "fashion-mnist", "resnet18", n_train=20000,
                                     n_test=0, epochs=8, lr=0.05, models=8, width=64, batch_size=256,
                                     crop_pad=2, flip=True, device="cuda"),
    "fashion-mnist-backbone": Regime("fashion_mnist_backbone_gpu", "fashion-mnist", "backbone", n_train=0, n_test=0,
                                     epochs=16, lr=0.05, models=64, batch_size=256, public=10000, device="cuda"),
}


def smoke(r: Regime) -> Regime:
    """The same code on digits (8x8), tiny: what the tests run."""
    return replace(r, name=r.name + "_smoke", dataset="digits", n_train=600, n_test=300, epochs=2,
                   shares=(0.0, 0.2, 0.5), ref_share=0.2, models=4, score_examples=40, width=min(r.width, 4 if r.arch == "cnn" else 16),
                   public=300 if r.arch == "backbone" else 0, sisa_shards=2, sisa_slices=2, sisa_requests=2,
                   crop_pad=0, flip=False, batch_size=32, device="cpu",
                   noise=replace(r.noise, max_rounds=3, batch_size=128, pgd_steps=5))


# --- data and networks --------------------------------------------------------------------------------

@dataclass
class Data:
    train: torch.Tensor  # uint8 (n, C, H, W): the rows in play (clean)
    train_y: torch.Tensor
    test: torch.Tensor
    test_y: torch.Tensor
    classes: int
    public: torch.Tensor | None = None  # backbone regime: the trunk's pretraining rows
    public_y: torch.Tensor | None = None


def load(r: Regime, data_dir: str) -> Data:
    from sisa.data import load_dataset
    from sisa.partition import derive_seed

    d = load_dataset(r.dataset, data_dir)
    gen = torch.Generator().manual_seed(derive_seed(r.seed, "unlearnable-subset"))
    pub = torch.arange(r.public)
    private = torch.arange(r.public, len(d.train.labels))
    if r.n_train:
        private = private[torch.randperm(len(private), generator=gen)[:r.n_train]].sort().values
    test = torch.arange(len(d.test.labels))
    if r.n_test:
        test = test[torch.randperm(len(test), generator=gen)[:r.n_test]].sort().values
    return Data(d.train.images[private], d.train.labels[private], d.test.images[test], d.test.labels[test],
                len(d.class_names), d.train.images[pub] if r.public else None,
                d.train.labels[pub] if r.public else None)


def small_cnn(channels: int, classes: int, width: int, size: tuple[int, int]) -> nn.Module:
    """Two 3x3 conv + ReLU + 2x2 max-pool stages and a linear layer (MNIST: ~9k weights at width 8)."""
    h, w = size[0] // 4, size[1] // 4
    return nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(2 * width * h * w, classes))


class TrunkAndHead(nn.Module):
    """A frozen sisa.backbone.Trunk under a trainable head, fed the network's input range [-1, 1]
    (what benchmarks.methods.unlearnable feeds); train() leaves the trunk in eval mode."""

    def __init__(self, trunk: nn.Module, head: nn.Module):
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x * 0.5 + 0.5))


class Setting:
    """What one regime trains: a network builder over a representation of uint8 images (the images
    themselves, or a frozen trunk's features in the backbone regime)."""

    def __init__(self, r: Regime, data: Data, backbone: Path | None = None):
        self.r, self.data = r, data
        self.device = torch.device(r.device if r.device != "cuda" or torch.cuda.is_available() else "cpu")
        c, size = data.train.shape[1], tuple(data.train.shape[2:])
        self.trunk = None
        if r.arch == "cnn":
            self.net = lambda: small_cnn(c, data.classes, r.width, size)
        elif r.arch == "resnet18":
            from sisa.model import build_model
            self.net = lambda: build_model("resnet18", c, data.classes, r.width)
        elif r.arch == "backbone":
            from sisa.backbone import build_parts
            state = None
            if backbone is not None:
                state = torch.load(backbone, map_location="cpu", weights_only=True)
            with torch.random.fork_rng(devices=[]):  # smoke: a trunk drawn from the seed
                torch.manual_seed(r.seed)
                trunk, head = build_parts("resnet18", c, data.classes, "fc", state, width=r.width)
            self.trunk = trunk.to(self.device)
            dim = head.fc.in_features
            self.net = lambda: nn.Linear(dim, data.classes)
        else:
            raise SystemExit(f"unknown arch {r.arch!r}")

    def represent(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> what the trained network takes, on the device."""
        if self.trunk is None:
            return images.to(self.device)
        from sisa.backbone import compute_features
        return compute_features(self.trunk, images, device=self.device).to(self.device)

    def source_model(self, seed: int) -> tuple[nn.Module, list[nn.Parameter]]:
        """The min-min source model (a fresh network from `seed`) and the parameters it trains."""
        from sisa.partition import derive_seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(seed, "unlearnable-source-init"))
            net = self.net()
        if self.trunk is None:
            return net.to(self.device), list(net.parameters())
        return TrunkAndHead(self.trunk, net).to(self.device), list(net.parameters())

    def task(self, images: torch.Tensor, forget: torch.Tensor) -> Task:
        n = len(self.data.train_y)
        keep = torch.ones(n, dtype=torch.bool)
        keep[forget] = False
        return Task(self.represent(images), self.data.train_y.to(self.device), torch.arange(n)[keep].to(self.device),
                    forget.to(self.device), self.data.classes, crop_pad=self.r.crop_pad, flip=self.r.flip,
                    batch_size=self.r.batch_size, seed=self.r.seed, head=self.net)


def fit(task: Task, rows: torch.Tensor, r: Regime, seed: int) -> nn.Module:
    """The one training recipe of every model here (methods.common: SGD, Nesterov, one-cycle)."""
    return train(new_model(task, seed), task, rows.to(task.images.device), r.epochs, r.lr, seed=seed)


def deletable(n: int, share: float, seed: int) -> torch.Tensor:
    """Du: the first round(share * n) rows of one seeded permutation (nested across shares), sorted."""
    from sisa.partition import derive_seed
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "unlearnable-du")))
    return order[:round(share * n)].sort().values


def with_noise(st: Setting, du: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The training images with Du replaced by its error-minimizing version, and the noise's record."""
    images = st.data.train.clone()
    if len(du) == 0:
        return images, {"seconds": 0.0, "rounds": 0, "converged": True, "final_error": None, "history": []}
    model, params = st.source_model(st.r.seed)
    res = error_minimizing_noise(model, st.data.train[du], st.data.train_y[du], replace(st.r.noise, seed=st.r.seed),
                                 params=params, log=print)
    images[du] = res.images
    linf = (res.images.int() - st.data.train[du].int()).abs().max().item()
    return images, {"seconds": res.seconds, "rounds": res.rounds, "converged": res.converged,
                    "final_error": res.final_error, "linf_uint8": linf, "history": res.history}


# --- measurements ---------------------------------------------------------------------------------

def probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return logits_of(model, x).softmax(-1)


def acc(p: torch.Tensor, y: torch.Tensor) -> float:
    return float("nan") if len(y) == 0 else 100 * (p.argmax(-1) == y.cpu()).float().mean().item()


def true_p(p: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    return p.gather(1, y.cpu()[:, None]).squeeze(1).clamp_min(1e-12).numpy()


def mias(p_forget: torch.Tensor, y_forget, p_retain, y_retain, p_test, y_test) -> dict:
    f, rt, t = true_p(p_forget, y_forget), true_p(p_retain, y_retain), true_p(p_test, y_test)
    return {"mia_kit": 100 * mia_kit(-np.log(f), -np.log(t)), "mia_efficacy": 100 * mia_efficacy(rt, t, f)}


@dataclass
class Views:
    """Represented inputs every model is measured on (built once per share)."""
    test: torch.Tensor
    dc: torch.Tensor
    du_noisy: torch.Tensor
    du_clean: torch.Tensor
    score_noisy: torch.Tensor
    score_clean: torch.Tensor


def measure(model: nn.Module, v: Views, y: dict) -> dict:
    out = {k: probs(model, getattr(v, k)) for k in ("test", "dc", "du_noisy", "du_clean", "score_noisy", "score_clean")}
    out["acc"] = {"test": acc(out["test"], y["test"]), "dc": acc(out["dc"], y["dc"]),
                  "du_noisy": acc(out["du_noisy"], y["du"]), "du_clean": acc(out["du_clean"], y["du"])}
    return out


def population(task: Task, rows: torch.Tensor, r: Regime, seeds, v: Views, y: dict, log=None) -> dict:
    """N models from `seeds`: their probabilities on the scored Du examples and their accuracies."""
    noisy, clean, accs, secs = [], [], [], []
    for i, s in enumerate(seeds):
        t = time.perf_counter()
        m = fit(task, rows, r, s)
        secs.append(time.perf_counter() - t)
        noisy.append(probs(m, v.score_noisy))
        clean.append(probs(m, v.score_clean))
        accs.append({"dc": acc(probs(m, v.dc), y["dc"]), "test": acc(probs(m, v.test), y["test"])})
        if log and (i + 1) % 16 == 0:
            log(f"    {i + 1}/{len(seeds)} models")
    return {"noisy": torch.stack(noisy), "clean": torch.stack(clean), "dc_acc": [a["dc"] for a in accs],
            "test_acc": [a["test"] for a in accs], "train_seconds": float(np.mean(secs))}


def score(u: dict, rt: dict, view: str, labels: torch.Tensor) -> dict:
    s = forgetting_score(u[view].numpy(), rt[view].numpy(), labels.numpy(), u["dc_acc"], rt["dc_acc"],
                         u["test_acc"], rt["test_acc"])
    return {k: v for k, v in s.items() if k != "epsilons"}


# --- SISA of the same network ---------------------------------------------------------------------------

def sisa_cost(st: Setting, task: Task, du: torch.Tensor) -> dict:
    """SISA (S shards, R slices) of this regime's network on the clean data: training, one batched
    forget of all of Du, `sisa_requests` single-id forgets (each from the trained state), accuracy."""
    from sisa.config import slice_epochs
    from sisa.partition import derive_seed

    r = st.r
    n = len(task.labels)
    gen = torch.Generator().manual_seed(derive_seed(r.seed, "unlearnable-sisa-layout"))
    order = torch.randperm(n, generator=gen)
    layout = [[s for s in torch.tensor_split(shard, r.sisa_slices)] for shard in torch.tensor_split(order, r.sisa_shards)]
    epochs = slice_epochs(r.sisa_slices, r.epochs)

    def run_shard(shard: int, start: int, states: list, gone: set[int]) -> list:
        """Slices start.. of `shard` from the state after slice start - 1; returns the new states."""
        model = new_model(task, derive_seed(r.seed, "sisa-shard", shard))
        if start:
            model.load_state_dict(states[start - 1])
        out = []
        for k in range(start, r.sisa_slices):
            rows = torch.cat(layout[shard][:k + 1])
            rows = rows[torch.tensor([int(i) not in gone for i in rows], dtype=torch.bool)]
            train(model, task, rows.to(task.images.device), epochs[k], r.lr, seed=derive_seed(r.seed, "sisa", shard, k))
            out.append({k2: v.clone() for k2, v in model.state_dict().items()})
        return out

    t = time.perf_counter()
    states = [run_shard(s, 0, [], set()) for s in range(r.sisa_shards)]
    train_s = time.perf_counter() - t

    def ensemble_acc(sts) -> float:
        ps = []
        for s in range(r.sisa_shards):
            m = new_model(task, 0)
            m.load_state_dict(sts[s][-1])
            ps.append(probs(m, st.views.test))
        return acc(torch.stack(ps).mean(0), st.data.test_y)

    where = {}
    for s in range(r.sisa_shards):
        for k in range(r.sisa_slices):
            for i in layout[s][k].tolist():
                where[i] = (s, k)
    gone = set(du.tolist())
    hit = {}
    for i in gone:
        s, k = where[i]
        hit[s] = min(k, hit.get(s, k))
    t = time.perf_counter()
    after = [list(x) for x in states]
    for s, k in sorted(hit.items()):
        after[s][k:] = run_shard(s, k, states[s], gone)
    batch_s = time.perf_counter() - t
    picks = du[torch.randperm(len(du), generator=gen)[:r.sisa_requests]].tolist()
    single = []
    for i in picks:
        s, k = where[i]
        t = time.perf_counter()
        run_shard(s, k, states[s], {i})
        single.append(time.perf_counter() - t)
    # the exact expected cost of one request from the layout: sample-epochs retrained / trained
    shard_work = [[len(torch.cat(layout[s][:k + 1])) * epochs[k] for k in range(r.sisa_slices)]
                  for s in range(r.sisa_shards)]
    total = sum(map(sum, shard_work))
    expected = np.mean([sum(shard_work[where[i][0]][where[i][1]:]) / total for i in range(n)])
    return {"shards": r.sisa_shards, "slices": r.sisa_slices, "slice_epochs": epochs, "train_seconds": train_s,
            "test_acc": ensemble_acc(states), "test_acc_after_batch_forget": ensemble_acc(after),
            "batch_forget_seconds": batch_s, "batch_forget_shards_hit": len(hit),
            "batch_forget_earliest_slices": {str(s): k for s, k in sorted(hit.items())},
            "single_forget_seconds": single, "single_forget_mean_seconds": float(np.mean(single)),
            "single_forget_expected_fraction": float(expected)}


# --- the experiment -------------------------------------------------------------------------------------

def views_for(st: Setting, images: torch.Tensor, du: torch.Tensor, scored: torch.Tensor) -> Views:
    n = len(st.data.train_y)
    dc = torch.ones(n, dtype=torch.bool)
    dc[du] = False
    return Views(st.represent(st.data.test), st.represent(images[dc]), st.represent(images[du]),
                 st.represent(st.data.train[du]), st.represent(images[scored]), st.represent(st.data.train[scored]))


def run(r: Regime, data: Data, backbone: Path | None = None, log=print) -> dict:
    from sisa.partition import derive_seed

    st = Setting(r, data, backbone)
    n = len(data.train_y)
    N = r.models
    out = {"regime": asdict(r), "n_train": n, "n_test": len(data.test_y), "shares": []}
    st.views = Views(st.represent(data.test), *(None,) * 5)
    original = None  # the p = 0 population: probabilities on every clean training image
    clean_task = st.task(data.train, torch.zeros(0, dtype=torch.long))
    all_rows = torch.arange(n)
    t = time.perf_counter()
    orig_models_probs = []
    orig_acc = []
    for s in range(N):
        m = fit(clean_task, all_rows, r, s)
        orig_models_probs.append(probs(m, clean_task.images))
        orig_acc.append({"dc": None, "test": acc(probs(m, st.views.test), data.test_y)})
    original = torch.stack(orig_models_probs)  # (N, n, C)
    out["plain_train_seconds_mean"] = (time.perf_counter() - t) / N
    log(f"p = 0 population: {N} models, {out['plain_train_seconds_mean']:.1f} s each, "
        f"test {np.mean([a['test'] for a in orig_acc]):.2f}%")

    for p in r.shares:
        t0 = time.perf_counter()
        du = deletable(n, p, r.seed)
        dc_mask = torch.ones(n, dtype=torch.bool)
        dc_mask[du] = False
        images, noise = with_noise(st, du)
        gen = torch.Generator().manual_seed(derive_seed(r.seed, "unlearnable-scored", p))
        pick = torch.randperm(len(du), generator=gen)[:r.score_examples].sort().values
        scored = du[pick]
        v = views_for(st, images, du, scored)
        task = st.task(images, du)
        y = {"test": data.test_y, "dc": data.train_y[dc_mask], "du": data.train_y[du]}
        model = fit(task, all_rows, r, 0)
        main = measure(model, v, y)
        row = {"share": p, "n_du": len(du), "noise": noise, "model": main["acc"]}
        if p == 0:  # no noise: the same model as plain training's seed 0, to the bit
            row["identical_to_plain_training"] = bool(torch.equal(probs(model, clean_task.images), original[0]))
            out["shares"].append(row)
            log(f"p = 0: test {main['acc']['test']:.2f}%")
            continue
        row["mia_noisy"] = mias(main["du_noisy"], y["du"], main["dc"], y["dc"], main["test"], y["test"])
        row["mia_clean"] = mias(main["du_clean"], y["du"], main["dc"], y["dc"], main["test"], y["test"])
        alone = measure(fit(task, task.retain, r, 1000), v, y)
        row["dc_alone"] = alone["acc"]
        row["dc_alone_mia_clean"] = mias(alone["du_clean"], y["du"], alone["dc"], y["dc"], alone["test"], y["test"])
        log(f"p = {p:.0%}: |Du| = {len(du)}, noise {noise['seconds']:.1f} s in {noise['rounds']} rounds; test "
            f"{main['acc']['test']:.2f}% (Dc alone {alone['acc']['test']:.2f}%), Du noisy {main['acc']['du_noisy']:.2f}%,"
            f" Du clean {main['acc']['du_clean']:.2f}%")
        u = population(task, all_rows, r, range(N), v, y, log)
        rt = population(task, task.retain, r, range(1000, 1000 + N), v, y, log)
        lab = data.train_y[scored]
        row["score_noisy"] = score(u, rt, "noisy", lab)
        row["score_clean"] = score(u, rt, "clean", lab)
        orig = {"clean": original[:, scored], "noisy": original[:, scored],
                "dc_acc": [acc(original[i][dc_mask], y["dc"]) for i in range(N)],
                "test_acc": [a["test"] for a in orig_acc]}
        row["score_original"] = score(orig, rt, "clean", lab)
        row["population_test_acc"] = {"with_du": float(np.mean(u["test_acc"])), "dc_alone": float(np.mean(rt["test_acc"]))}
        row["population_train_seconds"] = {"with_du": u["train_seconds"], "dc_alone": rt["train_seconds"]}
        if math.isclose(p, r.ref_share):
            ceil = population(task, task.retain, r, range(2000, 2000 + N), v, y, log)
            row["score_ceiling"] = score(ceil, rt, "clean", lab)
            row["score_ceiling_noisy"] = score(ceil, rt, "noisy", lab)
            log("  SISA cost ...")
            out["sisa"] = sisa_cost(st, clean_task, du)
            out["sisa"]["monolithic_dc_train_seconds"] = rt["train_seconds"]
            out["sisa"]["monolithic_all_train_seconds"] = out["plain_train_seconds_mean"]
        row["seconds"] = time.perf_counter() - t0
        log(f"  score vs Dc alone: noisy {row['score_noisy']['score']:.3f}, clean {row['score_clean']['score']:.3f};"
            f" plain training {row['score_original']['score']:.3f} ({row['seconds']:.0f} s)")
        out["shares"].append(row)
    return out


def all_noisy_check(r: Regime, data: Data, variants: dict[str, NoiseConfig], log=print) -> dict:
    """The paper's own setting, p = 100%: every training row noisy, one model (seed 0) trained on
    them, beside the same model trained on the clean rows. Per noise variant: its rounds, seconds,
    final source error, and the trained model's test accuracy and accuracy on the clean and noisy
    training images."""
    st = Setting(r, data)
    n = len(data.train_y)
    rows, none = torch.arange(n), torch.zeros(0, dtype=torch.long)
    clean = fit(st.task(data.train, none), rows, r, 0)
    out = {"clean": {"test": acc(probs(clean, st.represent(data.test)), data.test_y)}, "variants": {}}
    for name, cfg in variants.items():
        st.r = replace(r, noise=cfg)
        images, noise = with_noise(st, rows)
        m = fit(st.task(images, none), rows, r, 0)
        res = {"noise": {k: v for k, v in noise.items() if k != "history"}, "noise_config": asdict(cfg),
               "test": acc(probs(m, st.represent(data.test)), data.test_y),
               "train_noisy": acc(probs(m, st.represent(images)), data.train_y),
               "train_clean": acc(probs(m, st.represent(data.train)), data.train_y)}
        out["variants"][name] = res
        log(f"100% noisy, {name}: {noise['rounds']} rounds, {noise['seconds']:.0f} s; test {res['test']:.2f}% "
            f"(clean training {out['clean']['test']:.2f}%)")
    return out


def render_all_noisy(res: dict) -> str:
    r = res["regime"]
    lines = [f"# Unlearnable examples, every training row noisy: {r['dataset']}, {r['arch']}", "",
             f"{res['n_train']} training rows (the seeded subset of `python -m benchmarks.unlearnable`), "
             f"{res['n_test']} test rows, {r['epochs']} epochs; one model (seed 0) per line. The paper's own test of "
             "the noise: a model trained only on unlearnable examples should fall towards chance on clean test data.", "",
             "| noise | rounds | noise s | source error at stop | test acc | acc on the noisy training images | "
             "acc on the clean training images |", "|---|---|---|---|---|---|---|",
             f"| none (clean training) | | | | {res['check']['clean']['test']:.2f} | | |"]
    for name, v in res["check"]["variants"].items():
        nz = v["noise"]
        lines.append(f"| {name} | {nz['rounds']} | {nz['seconds']:.1f} | {100 * nz['final_error']:.2f}% | {v['test']:.2f} | "
                     f"{v['train_noisy']:.2f} | {v['train_clean']:.2f} |")
    return "\n".join(lines)


# --- report ---------------------------------------------------------------------------------------------

def _f(v, d=2):
    return "" if v is None else f"{v:.{d}f}"


def render(res: dict) -> str:
    r = res["regime"]
    N = r["models"]
    rows = res["shares"]
    lines = [f"# Unlearnable examples against SISA: {r['dataset']}, {r['arch']} ({res['mode']})", "",
             f"{res['n_train']} training rows ({'all' if not r['n_train'] else 'a seeded subset'}"
             f"{', after ' + str(r['public']) + ' public rows' if r['public'] else ''}), {res['n_test']} test rows; "
             f"{r['epochs']} epochs, lr {r['lr']}, batch {r['batch_size']}. Du: a seeded share p of the training rows "
             f"gets sample-wise error-minimizing noise (eps = {r['noise']['epsilon'] * 255:.0f}/255, "
             f"{r['noise']['pgd_steps']} PGD steps of {r['noise']['step_size'] * 255:.1f}/255, "
             f"{r['noise']['train_steps']} source-model steps per round, stop at error <= "
             f"{100 * r['noise']['stop_error']:.0f}%); the model trains on Du (noisy) + Dc (clean). Accuracies "
             "and MIA in %. \"Dc alone\": the model trained without Du, what exact deletion gives. Score: the NeurIPS "
             f"2023 forgetting score, N = {N} models trained on Du + Dc against N on Dc alone (other seeds), on "
             f"{r['score_examples']} Du examples at most, their noisy (as trained) and clean images.", "",
             "| p | Du | test acc | test acc, Dc alone | Dc acc | Du acc (noisy) | Du acc (clean) | Du clean, Dc alone "
             "| MIA kit (noisy / clean) | MIA-eff. (noisy / clean) | score (noisy / clean) | noise s | rounds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        a = row["model"]
        if row["share"] == 0:
            lines.append(f"| 0% | 0 | {_f(a['test'])} | {_f(a['test'])} | {_f(a['dc'])} | | | | | | | 0 | 0 |")
            continue
        b = row["dc_alone"]
        lines.append(
            f"| {row['share']:.0%} | {row['n_du']} | {_f(a['test'])} | {_f(b['test'])} | {_f(a['dc'])} | "
            f"{_f(a['du_noisy'])} | {_f(a['du_clean'])} | {_f(b['du_clean'])} | "
            f"{_f(row['mia_noisy']['mia_kit'])} / {_f(row['mia_clean']['mia_kit'])} | "
            f"{_f(row['mia_noisy']['mia_efficacy'])} / {_f(row['mia_clean']['mia_efficacy'])} | "
            f"{_f(row['score_noisy']['score'], 3)} / {_f(row['score_clean']['score'], 3)} | "
            f"{_f(row['noise']['seconds'], 1)} | {row['noise']['rounds']}{'' if row['noise']['converged'] else ' (cap)'} |")
    ref = next((x for x in rows if "score_ceiling" in x), None)
    lines += ["", "Reference rows (population means; score on Du's clean images):", "",
              "| p | models | mean test acc | score vs Dc alone |", "|---|---|---|---|"]
    for row in rows:
        if row["share"] == 0:
            continue
        lines.append(f"| {row['share']:.0%} | plain training, Du clean (nothing forgotten) | | "
                     f"{_f(row['score_original']['score'], 3)} |")
        lines.append(f"| {row['share']:.0%} | Du noisy + Dc (unlearnable route) | "
                     f"{_f(row['population_test_acc']['with_du'])} | {_f(row['score_clean']['score'], 3)} |")
        if row is ref:
            lines.append(f"| {row['share']:.0%} | Dc alone, other seeds (exact deletion: the ceiling) | | "
                         f"{_f(row['score_ceiling']['score'], 3)} |")
    s = res.get("sisa")
    if s and ref:
        noise_s = ref["noise"]["seconds"]
        lines += ["", f"Cost of deleting Du at p = {ref['share']:.0%} ({ref['n_du']} rows), seconds on this machine "
                  f"({res['environment']['torch_threads']} thread):", "",
                  "| route | before training | training | deleting all of Du at once | per single-id request |",
                  "|---|---|---|---|---|",
                  f"| unlearnable examples (keep the model) | {noise_s:.1f} (noise) | {res['plain_train_seconds_mean']:.1f} | "
                  f"0 (score {ref['score_clean']['score']:.3f} vs exact's {ref['score_ceiling']['score']:.3f}) | 0 |",
                  f"| monolithic retraining on Dc | 0 | {res['plain_train_seconds_mean']:.1f} | "
                  f"{s['monolithic_dc_train_seconds']:.1f} | {s['monolithic_dc_train_seconds']:.1f} |",
                  f"| SISA S = {s['shards']}, R = {s['slices']} (exact) | 0 | {s['train_seconds']:.1f} | "
                  f"{s['batch_forget_seconds']:.1f} ({s['batch_forget_shards_hit']} shards hit) | "
                  f"{s['single_forget_mean_seconds']:.2f} (mean of {len(s['single_forget_seconds'])}; expected "
                  f"{s['single_forget_expected_fraction']:.3f} of training) |", "",
                  f"SISA's ensemble test accuracy: {s['test_acc']:.2f}% (after the batched forget: "
                  f"{s['test_acc_after_batch_forget']:.2f}%), against {ref['model']['test']:.2f}% for the single model "
                  f"trained on Du (noisy) + Dc and {rows[0]['model']['test']:.2f}% for plain training."]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> Path | None:
    if (plt := pyplot()) is None:
        return None
    rows = [x for x in res["shares"] if x["share"] > 0]
    p = [100 * x["share"] for x in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot([0] + p, [res["shares"][0]["model"]["test"]] + [x["model"]["test"] for x in rows], "o-",
            label="test acc, Du (noisy) + Dc")
    a1.plot([0] + p, [res["shares"][0]["model"]["test"]] + [x["dc_alone"]["test"] for x in rows], "s--",
            label="test acc, Dc alone (exact deletion)")
    a1.plot(p, [x["model"]["dc"] for x in rows], "^:", label="train acc on Dc")
    a1.plot(p, [x["model"]["du_noisy"] for x in rows], "v:", label="acc on Du (noisy, as trained)")
    a1.plot(p, [x["model"]["du_clean"] for x in rows], "d-.", label="acc on Du's clean images")
    a1.set_xlabel("unlearnable share p (%)")
    a1.set_ylabel("accuracy (%)")
    a1.legend(fontsize=8)
    a1.grid(alpha=0.3)
    a2.plot(p, [x["score_clean"]["score"] for x in rows], "o-", label="Du noisy + Dc, Du's clean images")
    a2.plot(p, [x["score_noisy"]["score"] for x in rows], "s--", label="Du noisy + Dc, Du's noisy images")
    a2.plot(p, [x["score_original"]["score"] for x in rows], "x:", label="plain training (nothing forgotten)")
    ref = [x for x in rows if "score_ceiling" in x]
    if ref:
        a2.axhline(ref[0]["score_ceiling"]["score"], color="k", lw=0.8,
                   label=f"exact deletion (Dc alone vs Dc alone), p = {100 * ref[0]['share']:.0f}%")
    a2.set_xlabel("unlearnable share p (%)")
    a2.set_ylabel(f"forgetting score vs Dc alone (N = {res['regime']['models']})")
    a2.legend(fontsize=8)
    a2.grid(alpha=0.3)
    fig.suptitle(f"Unlearnable examples, {res['regime']['dataset']} ({res['regime']['arch']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--stage", default="mnist-cnn", choices=sorted(REGIMES), help="the regime (default: the CPU run)")
    ap.add_argument("--list-stages", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="digits, tiny settings, results under benchmarks/work")
    ap.add_argument("--data-dir", default="../shared/datasets")
    ap.add_argument("--backbone", type=Path, default=WORK / "public_backbone" / "backbone.pt",
                    help="fashion-mnist-backbone: the public ResNet-18 (python -m benchmarks.public_backbone)")
    ap.add_argument("--models", type=int, default=None, help="N per side (default: the regime's)")
    ap.add_argument("--results-dir", type=Path, default=None)
    ap.add_argument("--all-noisy", action="store_true",
                    help="the paper's check instead: every training row noisy, one model (results *_all_noisy)")
    args = ap.parse_args(argv)
    if args.list_stages:
        for k, r in REGIMES.items():
            print(f"{k}: {r.dataset}, {r.arch}, device {r.device}, N = {r.models}")
        return
    torch.set_num_threads(1)
    r = REGIMES[args.stage]
    if args.smoke:
        r = smoke(r)
    if args.models:
        r = replace(r, models=args.models)
    backbone = None
    if r.arch == "backbone" and not args.smoke:
        if not args.backbone.is_file():
            raise SystemExit(f"no backbone at {args.backbone}: run `python -m benchmarks.public_backbone` first")
        backbone = args.backbone
    if r.device == "cuda" and not torch.cuda.is_available():
        print(f"warning: {args.stage} is a GPU stage and no GPU is visible; running on the CPU", file=sys.stderr)
    start = time.perf_counter()
    folder = args.results_dir or (WORK / "unlearnable_smoke" if args.smoke else ROOT / "benchmarks" / "results")
    if args.all_noisy:
        data = load(r, args.data_dir)
        variants = {"reference settings (stop at error <= 1%)": r.noise,
                    "20 rounds, no early stop": replace(r.noise, stop_error=-1.0, max_rounds=3 if args.smoke else 20),
                    "eps = 32/255, stop at error <= 1%": replace(r.noise, epsilon=32 / 255, step_size=3.2 / 255)}
        res = {"regime": asdict(r), "n_train": len(data.train_y), "n_test": len(data.test_y),
               "check": all_noisy_check(r, data, variants), "wall_seconds": time.perf_counter() - start,
               "environment": environment()}
        write_results(f"unlearnable_{r.name}_all_noisy", plain(res), render_all_noisy(res), folder)
        print(render_all_noisy(res))
        return
    res = run(r, load(r, args.data_dir), backbone)
    res["mode"] = "smoke" if args.smoke else "full"
    res["wall_seconds"] = time.perf_counter() - start
    res["environment"] = environment()
    name = f"unlearnable_{r.name}"
    md = render(res)
    folder.mkdir(parents=True, exist_ok=True)
    png = plot(res, folder / f"{name}.png")
    if png:
        md += f"\n\n![accuracy and forgetting score against p]({png.name})\n"
    md += f"\nWall time {res['wall_seconds'] / 60:.1f} min.\n"
    write_results(name, plain(res), md, folder)
    print(md)


if __name__ == "__main__":
    main()
