"""Sample-wise error-minimizing noise: unlearnable examples (issue 19).

Huang, Ma, Erfani, Bailey, Wang, "Unlearnable Examples: Making Personal Data Unexploitable",
ICLR 2021 (arXiv 2101.04898), sec. 3 and Algorithm 1 (sample-wise), written from the paper; the
details the paper leaves open were checked against its reference code (HanxunH/Unlearnable-Examples,
perturbation.py and toolbox.py) and are marked [ref]:

- min-min bi-level optimisation: min_theta mean_i min_{||delta_i||_inf <= eps} L(f_theta(x_i + delta_i), y_i);
- the outer loop alternates `train_steps` SGD steps of a source model on perturbed batches (10 [ref])
  with a projected-gradient *descent* over every sample's own noise (20 steps of 0.8/255 [ref],
  sign of the input gradient, projected to the eps ball and to valid pixels after each step), the
  source model in eval mode and frozen during the noise steps [ref];
- eps = 8/255 (L_inf); the noise starts at zero [ref: no --random_start in the sample-wise scripts];
- stop when the source model's error on the perturbed samples is at most `stop_error` = 0.01 [ref:
  --universal_stop_error 0.01 in the sample-wise commands; the paper: "training accuracy > 99%"].

What differs from [ref], on purpose:
- the stop test is evaluated on the *rounded uint8* perturbed images, the ones that will be
  published and trained on ([ref] tests the float images), so the property that was checked is the
  one that ships;
- the source model's batches come from a seeded permutation per pass over the perturbed set
  ([ref]: a fixed loader order), so every draw derives from `seed`; nothing reads global RNG state;
- `max_rounds` bounds the loop (the [ref] loop runs until the threshold, however long); a run
  that hits it says so in `NoiseResult.converged`.

The noisy images are uint8 (round, then clip to [0, 255] and to the +-floor(eps * 255) box around
the original pixel), so the L_inf bound holds in the published pixels, not only in floats.
A model whose forward should keep part of it fixed (a frozen trunk) is passed with `params` naming
what the source model trains; its `train()` decides which modules switch to training mode.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sisa.model import to_input
from sisa.partition import derive_seed


@dataclass(frozen=True)
class NoiseConfig:
    epsilon: float = 8 / 255  # L_inf bound in [0, 1] pixel units (the paper's 8/255)
    step_size: float = 0.8 / 255  # PGD step ([ref] --step_size 0.8)
    pgd_steps: int = 20  # PGD steps per round ([ref] --num_steps 20)
    train_steps: int = 10  # source-model SGD steps per round ([ref] --train_step 10)
    stop_error: float = 0.01  # stop when the error on the perturbed samples is <= this ([ref])
    max_rounds: int = 100
    batch_size: int = 512  # [ref] --train_batch_size 512, also the PGD batch
    lr: float = 0.1  # the source model's SGD ([ref] configs: lr 0.1, momentum 0.9, wd 5e-4)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0


@dataclass
class NoiseResult:
    images: torch.Tensor  # uint8 (n, C, H, W): the published, unlearnable images
    rounds: int
    converged: bool
    seconds: float
    history: list[dict] = field(default_factory=list)  # per round: loss and error on the perturbed set

    @property
    def final_error(self) -> float:
        return self.history[-1]["error"] if self.history else float("nan")


def pixel_bound(epsilon: float) -> int:
    """The bound in uint8 steps: floor(eps * 255) (8 for 8/255; the 1e-6 absorbs 8/255*255 = 7.99...)."""
    return int(math.floor(epsilon * 255 + 1e-6))


def to_uint8(clean: torch.Tensor, delta: torch.Tensor, epsilon: float) -> torch.Tensor:
    """clean uint8 + delta (floats in [0, 1] units) -> uint8, rounded, inside [0, 255] and the eps box."""
    k = pixel_bound(epsilon)
    base = clean.to(torch.int16)
    noisy = torch.round(clean.float() + delta.float() * 255).to(torch.int16)
    noisy = torch.maximum(torch.minimum(noisy, base + k), base - k)
    return noisy.clamp(0, 255).to(torch.uint8)


def _loss(model: nn.Module, x01: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(to_input(x01)), y)


def minimise_noise(model: nn.Module, clean: torch.Tensor, labels: torch.Tensor, delta: torch.Tensor,
                   cfg: NoiseConfig) -> torch.Tensor:
    """The inner min: `cfg.pgd_steps` sign-gradient *descent* steps on each sample's own noise.

    `clean` uint8 (b, C, H, W), `delta` float (b, C, H, W) in [0, 1] units. The model is used in
    eval mode and its parameters get no gradient. Returns the new delta (within eps, and such that
    clean + delta stays in [0, 1])."""
    x = clean.float() / 255
    was_training = model.training
    model.eval()
    grads = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        adv = (x + delta).clamp(0, 1)
        for _ in range(cfg.pgd_steps):
            adv.requires_grad_(True)
            g, = torch.autograd.grad(_loss(model, adv, labels), adv)
            with torch.no_grad():
                eta = (adv - cfg.step_size * g.sign() - x).clamp(-cfg.epsilon, cfg.epsilon)
                adv = (x + eta).clamp(0, 1)
        return (adv - x).detach()
    finally:
        for p, r in zip(model.parameters(), grads):
            p.requires_grad_(r)
        model.train(was_training)


@torch.no_grad()
def loss_and_error(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1024) -> tuple[float, float]:
    """Mean cross-entropy and error (0..1) of `model` (eval mode) on uint8 `images`."""
    was_training = model.training
    model.eval()
    total, wrong = 0.0, 0
    for x, y in zip(torch.split(images, batch), torch.split(labels, batch)):
        z = model(to_input(x))
        total += F.cross_entropy(z, y, reduction="sum").item()
        wrong += (z.argmax(-1) != y).sum().item()
    model.train(was_training)
    n = max(1, len(labels))
    return total / n, wrong / n


def _batches(n: int, batch: int, gen: torch.Generator):
    """Endless seeded passes over range(n), one fresh permutation per pass."""
    while True:
        order = torch.randperm(n, generator=gen)
        yield from torch.split(order, batch)


def error_minimizing_noise(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                           cfg: NoiseConfig = NoiseConfig(), params: Iterable[nn.Parameter] | None = None,
                           log: Callable[[str], None] | None = None) -> NoiseResult:
    """Sample-wise error-minimizing noise for uint8 `images` (n, C, H, W) under `cfg` (Algorithm 1).

    `model` is the source model, trained here (in place) from the state it is passed in; `params`
    are the parameters its SGD updates (default: all). Deterministic given `cfg.seed` and the model's
    initial state on the CPU."""
    start = time.perf_counter()
    device = next(model.parameters()).device
    images, labels = images.to(device), labels.to(device)
    n = len(labels)
    params = list(model.parameters() if params is None else params)
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "unlearnable-source-batches"))
    order = _batches(n, cfg.batch_size, gen)
    delta = torch.zeros(images.shape, dtype=torch.float32, device=device)
    history: list[dict] = []
    converged = False
    for rnd in range(1, cfg.max_rounds + 1):
        # outer min: a few SGD steps of the source model on perturbed samples
        model.train()
        for _ in range(cfg.train_steps):
            idx = next(order).to(device)
            x = (images[idx].float() / 255 + delta[idx]).clamp(0, 1)
            loss = _loss(model, x, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        # inner min: every sample's own noise, in fixed-order batches
        for idx in torch.split(torch.arange(n, device=device), cfg.batch_size):
            delta[idx] = minimise_noise(model, images[idx], labels[idx], delta[idx], cfg)
        loss, err = loss_and_error(model, to_uint8(images, delta, cfg.epsilon), labels)
        history.append({"round": rnd, "loss": loss, "error": err, "seconds": time.perf_counter() - start})
        if log:
            log(f"  noise round {rnd}: loss {loss:.4f}, error {100 * err:.2f}%")
        if err <= cfg.stop_error:
            converged = True
            break
    model.eval()
    return NoiseResult(to_uint8(images, delta, cfg.epsilon).cpu(), len(history), converged,
                       time.perf_counter() - start, history)
