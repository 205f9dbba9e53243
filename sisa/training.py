"""Incremental training of one shard's constituent, slice by slice (SISA, Bourtoule et al. sec. IV).

Step i trains on slices 0..i of the shard, starting from the state after step i-1, for
`slice_epochs(R, e)[i]` epochs. Everything random in step i (data order, crops, flips) is drawn
from a generator seeded by (seed, "train", shard, i), and the initial weights from
(seed, "init", shard): the result is a deterministic function of the config and the retained
ids, which is what makes "retrain from slice r" equal to "train from scratch" bit for bit.

A shard job is a pure function of its inputs (config, data, starting state); it returns states
and never touches the index, so it can run in another process or on another machine.
"""
from __future__ import annotations

import copy
import functools
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import RunConfig, epoch_batches, slice_epochs, step_sample_epochs
from .faults import fault_point
from .model import build_model, to_input
from .partition import ShardJob, derive_seed  # noqa: F401  (ShardJob re-exported)

# progress(shard, slice, samples_done, samples_total): samples (images through the network in
# training) done so far in this shard job and in all of it, reported after every batch.
Progress = Callable[[int, int, int, int], None]


@dataclass
class SliceResult:
    shard: int
    slice: int
    state: dict  # {"model": ..., "optimizer": ...}: everything resuming needs (the last slice: no optimizer)
    ids: list[str]  # the exact ordered ids this state was trained on
    sample_epochs: int


# Initial weights are drawn from torch's one global generator (torchvision's initialisation takes
# no generator), seeded for the shard: shard jobs running at once in threads of one process
# (executors.LocalExecutor) take turns, or one's seeding would shift the other's draws.
_GLOBAL_RNG = threading.RLock()


def initial_state(cfg: RunConfig, shard: int, init: dict | None = None) -> dict:
    """The weights a shard starts from: drawn from (seed, "init", shard) alone, or, with an init
    weights file's state `init`, its tensors where they fit (sisa.backbone.initial_weights). With a
    frozen trunk, only the trainable part: the trunk is a constant of the run, not a state."""
    if init is None and not cfg.frozen:
        with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, "init", shard))
            model = build_model(cfg.arch, cfg.channels, cfg.classes, cfg.width)
        return {"model": model.state_dict(), "optimizer": None}
    from .backbone import initial_weights

    with _GLOBAL_RNG:
        state, _ = initial_weights(cfg.arch, cfg.channels, cfg.classes, cfg.seed, shard, cfg.trainable, init,
                                   cfg.width, trainable_only=True)
    return {"model": state, "optimizer": None}


def build_trainable(cfg: RunConfig) -> torch.nn.Module:
    """What a shard trains: the whole ResNet-18, or with a frozen trunk only its head, for a
    state dict to be loaded into. A copy of a skeleton without weights (`_skeleton`), given
    real, uninitialised memory: every caller loads a state dict into it before use."""
    return copy.deepcopy(_skeleton(cfg.arch, cfg.channels, cfg.classes, cfg.width, cfg.trainable)).to_empty(device="cpu")


@functools.lru_cache(maxsize=8)
def _skeleton(arch: str, channels: int, classes: int, width: int, trainable: str) -> torch.nn.Module:
    """The module built on the meta device, once per shape; only ever copied. Drawing a
    ResNet-18's 11M initial weights, which the state dict then overwrites, cost about 0.1 s of
    every shard job and of every constituent loaded for prediction on the 2-core CPU; building
    it even on the meta device, 25 ms; copying the skeleton, 8 ms (the head alone: 0.2 ms)."""
    with torch.device("meta"):
        if trainable == "all":
            return build_model(arch, channels, classes, width)
        from .backbone import build_head

        return build_head(arch, channels, classes, trainable, width)


def make_optimizer(cfg: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)


def lr_at(cfg: RunConfig, step: int, total: int) -> float:
    """Linear warm-up to the peak, then linear decay towards zero, within one slice step."""
    warm = max(1, round(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * (total - step) / max(1, total - warm)


def augment(images: torch.Tensor, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding) and optional horizontal flip of a whole uint8 batch at once.

    Offsets and flips are drawn on the CPU generator, so the draw is identical on any device;
    the crop itself is one gather on the images' device, with no per-sample Python.
    """
    if not (pad or flip):
        return images  # also what a frozen trunk's features take: they are not images
    n, _, h, w = images.shape
    if pad > 0:
        shifts = torch.randint(0, 2 * pad + 1, (2, n), generator=gen).to(images.device)
        padded = F.pad(images, (pad, pad, pad, pad))
        rows = (shifts[0, :, None] + torch.arange(h, device=images.device))[:, None, :, None]
        cols = (shifts[1, :, None] + torch.arange(w, device=images.device))[:, None, None, :]
        batch = torch.arange(n, device=images.device)[:, None, None, None]
        chans = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        images = padded[batch, chans, rows, cols]
    if flip:
        mask = (torch.rand(n, generator=gen) < 0.5).to(images.device)
        images = torch.where(mask[:, None, None, None], images.flip(3), images)
    return images


@contextmanager
def numerics(cfg: RunConfig, device: torch.device, autotune: bool = False):
    """The CUDA switches a config asks for, set for one job and restored after it. cudnn's
    autotuner stays off: it times kernels anew for every new batch shape, and SISA's slices (and
    every forget, one sample shorter) make new shapes all the time; on an H100 it cut the training
    loop to a third of the bare step (benchmarks/results/gpu_h100.md). With `deterministic`,
    deterministic kernels only. cuBLAS reads its workspace setting once per process: a process
    that trains deterministic runs should have CUBLAS_WORKSPACE_CONFIG set before its first CUDA
    call (set here if not, for worker processes). The CPU needs none of this: its kernels are
    deterministic already."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = autotune and not cfg.deterministic
    torch.use_deterministic_algorithms(cfg.deterministic)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = saved[0]
        torch.use_deterministic_algorithms(saved[1])


def forward(cfg: RunConfig, model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The model's logits (fp32) under the run's precision. bf16 runs the network under autocast
    with channels_last images (the layout tensor cores want); fp32 is the plain call, so its
    results are bitwise what they always were."""
    if cfg.precision != "bf16":
        return model(inputs)
    if inputs.ndim == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16):
        return model(inputs).float()


def prepare(cfg: RunConfig, model: torch.nn.Module) -> torch.nn.Module:
    """The model in the memory layout its precision runs best in (see `forward`)."""
    return model.to(memory_format=torch.channels_last) if cfg.precision == "bf16" else model


def train_step(cfg: RunConfig, model: torch.nn.Module, opt: torch.optim.Optimizer,
               images: torch.Tensor, labels: torch.Tensor, epochs: int, gen: torch.Generator,
               on_batch: Callable[[int], None] | None = None) -> None:
    """`epochs` passes over (images, labels), each in a fresh random order cut into batches as
    `cfg.batching` says (config.epoch_batches): no batch of a single sample either way (batch
    norm cannot train on one), with "full" an epoch's last incomplete batch sits out."""
    sizes = epoch_batches(len(labels), cfg.batch_size, cfg.batching)
    total = epochs * len(sizes)
    model.train()
    seen = 0
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=gen)[: sum(sizes)]
        x_epoch = augment(images[order.to(images.device)], cfg.crop_pad, cfg.flip, gen)
        y_epoch = labels[order.to(labels.device)]
        for b, (xb, yb) in enumerate(zip(x_epoch.split(sizes), y_epoch.split(sizes))):
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg, epoch * len(sizes) + b, total)
            inputs = to_input(xb) if xb.dtype == torch.uint8 else xb  # images, or a frozen trunk's features
            loss = F.cross_entropy(forward(cfg, model, inputs), yb, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(yb)
            if on_batch:
                on_batch(seen)
        fault_point("epoch")


def run_shard_job(cfg: RunConfig, job: ShardJob, state: dict, images: torch.Tensor,
                  labels: torch.Tensor, device: torch.device | str = "cpu",
                  progress: Progress | None = None) -> Iterator[SliceResult]:
    """Train slices job.start..R-1 from `state` (the state after slice start-1, or the initial
    state), yielding each slice's resulting state as soon as it exists. `images` are uint8
    images, or with a frozen trunk the cached float features, indexed by job.slice_rows."""
    device = torch.device(device)
    with numerics(cfg, device):
        yield from _run_shard_job(cfg, job, state, images, labels, device, progress)


def _run_shard_job(cfg, job, state, images, labels, device, progress):
    epochs = slice_epochs(cfg.slices, cfg.epochs)
    model = build_trainable(cfg).to(device)
    model.load_state_dict(state["model"])
    model = prepare(cfg, model)
    # One optimiser for the whole job, its momentum carried on the device from slice to slice:
    # continuing it is bitwise what reloading the saved momentum would give (tests/test_exactness),
    # without copying it back from the host at every slice step. It starts from the saved state;
    # on the CPU load_state_dict would keep the caller's tensors and training would mutate them.
    if not cfg.reset_momentum:  # (with it, each slice step builds its own, below)
        opt = make_optimizer(cfg, model)
        if state["optimizer"] is not None:
            opt.load_state_dict(_cpu_copy(state["optimizer"]) if device.type == "cpu" else state["optimizer"])
    sizes = [sum(len(s) for s in job.slice_rows[: i + 1]) for i in range(cfg.slices)]
    total = sum(step_sample_epochs(cfg, sizes[i], epochs[i]) for i in range(job.start, cfg.slices))
    # Step i trains on slices 0..i, a prefix of the shard's rows in slice order: the shard's data
    # goes to the device once, and each step takes a prefix of it (a view, no copy).
    index = torch.tensor([r for s in job.slice_rows for r in s], dtype=torch.long)
    shard_images, shard_labels = images[index].to(device), labels[index].to(device)
    done = 0
    for i in range(job.start, cfg.slices):
        ids = [x for s in job.slice_ids[: i + 1] for x in s]
        if cfg.reset_momentum:  # every slice step from zero momentum: the checkpoints hold weights alone
            opt = make_optimizer(cfg, model)
        trained = 0
        n = sizes[i]
        if n >= 2:  # one sample cannot train batch norm: such a step leaves the state as is
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "train", job.shard, i))
            train_step(cfg, model, opt, shard_images[:n], shard_labels[:n], epochs[i], gen,
                       (lambda k, i=i, before=done: progress(job.shard, i, before + k, total)) if progress else None)
            trained = step_sample_epochs(cfg, n, epochs[i])
            done += trained
        elif progress:
            progress(job.shard, i, done, total)
        # The last slice's momentum is never used: a retrain resumes from the state *before* the
        # earliest affected slice, so from slice R-2 at the latest. Its checkpoint, the one that
        # serves predictions, holds the weights alone (a ResNet-18's 89 MB become 45 MB).
        keep_momentum = not cfg.reset_momentum and i < cfg.slices - 1
        state = {"model": {k: _cpu_copy(v) for k, v in model.state_dict().items()},
                 "optimizer": _cpu_copy(opt.state_dict()) if keep_momentum else None}
        yield SliceResult(job.shard, i, state, ids, trained)


def _cpu_copy(obj):
    if isinstance(obj, torch.Tensor):  # saved in the standard layout, whatever layout trained
        return obj.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu_copy(v) for v in obj]
    return obj
