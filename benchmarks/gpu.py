"""GPU speed of the whole pipeline, every figure a ratio to a baseline measured in the same stage.

    python -m benchmarks.gpu --list-stages
    python -m benchmarks.gpu --stage sisa --stage concurrent      # one device call, ~7 min on an H100
    python -m benchmarks.gpu --stage breakdown --stage step       # a second one, ~4 min
    python -m benchmarks.gpu --stage determinism --stage compile  # ~2 min (measured at 9c0cf05, f6ff6d8)
    python -m benchmarks.gpu --smoke                              # every stage, tiny, on the CPU

Each stage runs in its own process (no backend switch or cuBLAS setting leaks from one into the
next) and merges its section into `<results-dir>/<name>.json` as soon as it ends, so a table is
built over several short device calls and a stage that failed is simply run again.

Stages (Fashion-MNIST, ResNet-18 with the 3x3 stem, batch 512 unless said):
- step: the bare training step (a model, an optimiser, one pre-normalised batch on the device)
  against the project's training loop (`sisa.training.train_step`: the device-resident data set,
  crops and flips on whole batches, the learning-rate schedule) in fp32 and in bf16 +
  channels_last; bare inference; the bare bf16 step captured in one CUDA graph against the same
  step launched op by op, at the batch size and at a quarter of it.
- sisa: full SISA training (S=5, R=10) against monolithic training (S=1, R=1) with the same
  recipe, through the library as a user calls it (index, checkpoints written, fsynced and
  hashed); accuracy of both, and of monolithic fp32 against bf16; forgets of single random ids
  (4 requests, one after another; their mean against the cost model) and of 8 in one request,
  against monolithic retraining and the SISA cost model; ensemble prediction against S times
  bare single-model inference. Beside the default: SISA with `--carry-momentum` (one forget)
  and with `--batching full` (the same single-id forgets).
- determinism: `deterministic=True` against the default (training time), and whether a forget
  equals retraining the shard from scratch bit for bit on this GPU, in both modes.
- compile: `torch.compile` of the bare step, to see whether it is worth adopting.
- breakdown: where SISA's time over monolithic training goes, for both with the sisa stage's
  recipe (SISA also with `--batching full`): the slice schedule's batches alone (the training
  loop over each shard's growing prefix, nothing else), then the library's shard jobs (each
  slice's state also copied to the host, as for its checkpoint), then the whole pipeline
  (checkpoints written, index); and what a step at a batch size not seen before costs.
- concurrent: SISA training in this process one job after another (the default), and 5 jobs at
  once in its threads, each on its own CUDA stream (`--executor local --jobs-per-gpu 5`), against
  5 worker processes (`--executor gpus --jobs-per-gpu 5`), each also with `--batching full`;
  against monolithic training, and whether every checkpoint file is the same whatever the number
  of jobs and wherever they ran.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import sisa
from sisa.data import load_dataset
from sisa.model import build_model, to_input
from sisa.run import pick_device
from sisa.training import train_step

from .common import RESULTS, environment, write_results
from .unlearning import batch_cost_model

STAGES = ("step", "sisa", "breakdown", "determinism", "compile", "concurrent")


@dataclass(frozen=True)
class Setting:
    dataset: str = "fashion-mnist"
    width: int = 64
    batch: int = 512
    lr: float = 0.2  # peak, for batch 512 (the default 0.05 is for batch 64)
    epochs: int = 10  # monolithic epochs; SISA's slices share 2R/(R+1) times as many
    shards: int = 5
    slices: int = 10
    steps: int = 60  # timed bare steps (after warm-up)
    pipeline_rows: int = 30_000  # rows the training loop's rate is measured on
    det_epochs: int = 4  # the determinism stage's shorter runs
    det_slices: int = 4
    single_forgets: int = 4  # single-id requests, one after another (their mean meets the cost model)


FULL = Setting()
SMOKE = Setting(dataset="digits", width=8, batch=64, lr=0.05, epochs=2, shards=2, slices=2, steps=3,
                pipeline_rows=300, det_epochs=1, det_slices=2, single_forgets=2)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def config(st: Setting, **kw) -> sisa.RunConfig:
    base = dict(shards=st.shards, slices=st.slices, epochs=st.epochs, batch_size=st.batch, lr=st.lr,
                width=st.width, precision="bf16", seed=0)
    base.update(kw)
    return sisa.config_for(st.dataset, **base)


# --- step: the bare model step against the project's loop ------------------------------------------
def bare_rates(st: Setting, device: torch.device, precision: str, shape: tuple[int, ...], steps: int | None = None,
               compiled: bool = False) -> dict:
    """Images/s of the bare training step and of bare inference: nothing but the model's work."""
    bf16 = precision == "bf16"
    fmt = torch.channels_last if bf16 else torch.contiguous_format
    torch.manual_seed(0)
    model = build_model("resnet18", shape[0], 10, st.width).to(device).to(memory_format=fmt)
    if compiled:
        model = torch.compile(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x = torch.randn(st.batch, *shape, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (st.batch,), device=device)

    def step():
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    steps = steps or st.steps
    for _ in range(5):
        step()
    _, t = timed(lambda: [step() for _ in range(steps)], device)
    model.eval()
    xi = torch.randn(4 * st.batch, *shape, device=device).contiguous(memory_format=fmt)
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        model(xi)
        _, ti = timed(lambda: [model(xi) for _ in range(max(2, steps // 4))], device)
    return {"train_images_per_s": steps * st.batch / t, "infer_images_per_s": max(2, steps // 4) * len(xi) / ti}


def graph_rates(st: Setting, device: torch.device, shape: tuple[int, ...], batch: int) -> dict:
    """The bare bf16 step (forward, loss, backward, optimiser step) launched op by op, against the
    same step captured whole in one CUDA graph and replayed: torch.cuda.graph's whole-network
    recipe (warm-up on a side stream, static input tensors, autocast's weight cache off). A graph
    saves the host's launch work; it pays where the host, not the GPU, sets the pace. Also
    whether the replayed step trains the eager step's bits from the same start (and, as the
    control, whether two eager runs do)."""
    if device.type != "cuda":
        return {"batch": batch, "skipped": f"CUDA graphs need a CUDA device, not {device.type}"}
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, *shape, device=device, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device, generator=gen)

    def make():
        torch.manual_seed(0)
        model = build_model("resnet18", shape[0], 10, st.width).to(device).to(memory_format=torch.channels_last)
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)

    def fwd_bwd_step(model, opt):
        with torch.autocast(device.type, torch.bfloat16, cache_enabled=False):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()

    def eager_step(model, opt):
        opt.zero_grad(set_to_none=True)
        fwd_bwd_step(model, opt)

    eager, control, graphed = make(), make(), make()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            eager_step(*graphed)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    graphed[1].zero_grad(set_to_none=True)  # the gradients are then the graph's own, written at each replay
    with torch.cuda.graph(graph):
        fwd_bwd_step(*graphed)
    for _ in range(5):  # capturing runs nothing: 3 warm-up steps + 5 replays against 8 eager steps
        graph.replay()
    for _ in range(8):
        eager_step(*eager)
        eager_step(*control)
    sync(device)
    same = lambda a, b: all(torch.equal(u, v) for u, v in zip(a[0].state_dict().values(), b[0].state_dict().values()))  # noqa: E731
    out = {"batch": batch, "graph_equals_eager_bits": same(graphed, eager), "eager_repeats_its_bits": same(control, eager)}
    _, t_eager = timed(lambda: [eager_step(*eager) for _ in range(st.steps)], device)
    _, t_graph = timed(lambda: [graph.replay() for _ in range(st.steps)], device)
    out.update(eager_images_per_s=round(st.steps * batch / t_eager), graphed_images_per_s=round(st.steps * batch / t_graph),
               graphed_over_eager=round(t_eager / t_graph, 3))
    return out


def pipeline_rate(st: Setting, device: torch.device, precision: str, images, labels, autotune: bool = False) -> float:
    """Images/s of `sisa.training.train_step` over `pipeline_rows` rows already on the device
    (`autotune`: with cudnn's autotuner on, which the library leaves off)."""
    cfg = config(st, precision=precision)
    from sisa.training import make_optimizer, numerics, prepare

    with numerics(cfg, device, autotune):
        torch.manual_seed(0)
        model = prepare(cfg, build_model("resnet18", images.shape[1], 10, st.width).to(device))
        opt = make_optimizer(cfg, model)
        gen = torch.Generator().manual_seed(0)
        x, y = images[: st.pipeline_rows].to(device), labels[: st.pipeline_rows].to(device)
        train_step(cfg, model, opt, x[: 4 * st.batch], y[: 4 * st.batch], 1, gen)  # warm-up, autotuning
        _, t = timed(lambda: train_step(cfg, model, opt, x, y, 2, gen), device)
    return 2 * len(y) / t


def stage_step(st: Setting, device: torch.device, data_dir: str) -> dict:
    data = load_dataset(st.dataset, data_dir)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    out = {"batch": st.batch, "images": list(data.train.images.shape[1:])}
    for precision in ("fp32", "bf16"):
        bare = bare_rates(st, device, precision, tuple(data.train.images.shape[1:]))
        loop = pipeline_rate(st, device, precision, data.train.images, data.train.labels)
        tuned = pipeline_rate(st, device, precision, data.train.images, data.train.labels, autotune=True)
        out[precision] = {"bare_train_images_per_s": round(bare["train_images_per_s"]),
                          "bare_infer_images_per_s": round(bare["infer_images_per_s"]),
                          "pipeline_images_per_s": round(loop),
                          "pipeline_over_bare": round(loop / bare["train_images_per_s"], 3),
                          "pipeline_autotuned_images_per_s": round(tuned),
                          "pipeline_autotuned_over_bare": round(tuned / bare["train_images_per_s"], 3)}
    out["bf16_over_fp32_pipeline"] = round(out["bf16"]["pipeline_images_per_s"] / out["fp32"]["pipeline_images_per_s"], 3)
    # the training batch, and a quarter of it, where a step's launches weigh more against its arithmetic
    out["cuda_graph"] = [_or_error(graph_rates, st, device, tuple(data.train.images.shape[1:]), b)
                         for b in (st.batch, st.batch // 4)]
    return out


def _or_error(fn, st: Setting, device: torch.device, shape: tuple[int, ...], batch: int) -> dict:
    """An arm that may not run everywhere: its failure is recorded (one line), not the stage's."""
    try:
        return fn(st, device, shape, batch)
    except Exception as e:  # noqa: BLE001: the stage's other measurements stand without it
        return {"batch": batch, "failed": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


# --- sisa: the whole pipeline, as a user runs it -----------------------------------------------------
def train_run(run_dir: Path, cfg: sisa.RunConfig, device: torch.device, data_dir: str) -> tuple[sisa.Run, dict]:
    (run, t_create) = timed(lambda: sisa.Run.create(run_dir, cfg, data_dir=data_dir), device)
    report, t_train = timed(lambda: run.complete(str(device)), device)
    acc = sisa.evaluate(run_dir, device=device)
    return run, {"seconds": round(t_train, 2), "create_seconds": round(t_create, 2),
                 "phase_seconds": {k: round(v, 3) for k, v in report.phase_seconds.items()},
                 "sample_epochs": report.sample_epochs,
                 "seconds_per_million_sample_epochs": round(1e6 * t_train / report.sample_epochs, 3),
                 "accuracy_vote": round(100 * acc["ensemble_vote"], 2),
                 "accuracy_mean": round(100 * acc["ensemble_mean"], 2),
                 "constituents": {k: round(100 * v, 2) for k, v in acc["constituents"].items()}}


def stage_sisa(st: Setting, device: torch.device, data_dir: str, work: Path) -> dict:
    out = {"recipe": {"dataset": st.dataset, "epochs": st.epochs, "batch": st.batch, "lr": st.lr, "width": st.width,
                      "shards": st.shards, "slices": st.slices, "reset_momentum": config(st).reset_momentum}}
    mono_run, out["monolithic_bf16"] = train_run(work / "mono", config(st, shards=1, slices=1), device, data_dir)
    mono_run.close()
    shutil.rmtree(work / "mono")
    fp32_run, out["monolithic_fp32"] = train_run(work / "mono32", config(st, shards=1, slices=1, precision="fp32"),
                                                 device, data_dir)
    fp32_run.close()
    shutil.rmtree(work / "mono32")
    run, out["sisa_bf16"] = train_run(work / "sisa", config(st), device, data_dir)
    out["checkpoint_write"] = checkpoint_write(run, work / "ckpt-probe")
    mono, default = out["monolithic_bf16"], out["sisa_bf16"]
    out["sisa_over_monolithic_time"] = round(default["seconds"] / mono["seconds"], 3)
    out["sisa_over_monolithic_per_sample_epoch"] = round(
        default["seconds_per_million_sample_epochs"] / mono["seconds_per_million_sample_epochs"], 3)

    # forgets: single ids one request after another, then 8 others in one request, each against
    # retraining the monolithic model. The cost model is an expectation over where a deleted sample
    # sits (one draw in slice 0 costs a whole shard, one in the last slice a tenth of it), so the
    # single-id figure it is held against is the mean over several draws.
    rng = np.random.default_rng(1)
    n = len(run.dataset().train)
    ids = [run.dataset().train.ids[i] for i in rng.choice(n, st.single_forgets + 8, replace=False)]
    singles, eight = ids[: st.single_forgets], ids[st.single_forgets:]
    out["forgets"], out["forget_1_mean"] = forget_requests(st, run, [[x] for x in singles] + [eight], mono, device)

    # prediction: the ensemble (S models, one call) against bare single-model inference, same images
    ens = sisa.Ensemble.load(run.dir, device=device)
    images = run.dataset().train.images
    ens.predict(images[: 2 * st.batch])  # warm-up
    _, t_ens = timed(lambda: ens.predict(images), device)
    single = ens.models[0]
    from sisa.training import forward

    with torch.no_grad():
        chunks = torch.split(images, 8192 if device.type == "cuda" else 1024)
        forward(run.config, single, to_input(chunks[0].to(device)))

        def bare():
            for c in chunks:
                forward(run.config, single, to_input(c.to(device)))
        _, t_one = timed(bare, device)
    out["predict"] = {"images": len(images), "ensemble_images_per_s": round(len(images) / t_ens),
                      "single_model_images_per_s": round(len(images) / t_one),
                      "ensemble_over_single_div_S": round((len(images) / t_ens) / (len(images) / t_one / len(ens.models)), 3)}
    run.close()

    # The same training with momentum carried from slice to slice (the default before issue 12):
    # checkpoints of the weights and their momentum, but for each shard's last.
    carry, out["sisa_bf16_carried_momentum"] = train_run(work / "carry", config(st, reset_momentum=False), device, data_dir)
    rep, t = timed(lambda: carry.forget(ids=singles[:1], device=str(device)), device)  # the first draw above
    carry_ck = carry.index.checkpoints()[(0, 0)]
    out["sisa_bf16_carried_momentum"].update(
        checkpoint_bytes=(carry.dir / carry_ck.path).stat().st_size, forget_1_seconds=round(t, 2),
        forget_1_phase_seconds={k: round(v, 3) for k, v in rep.phase_seconds.items()},
        forget_1_speedup_over_monolithic_retrain=round(mono["seconds"] / t, 2))
    out["carried_momentum_over_monolithic_per_sample_epoch"] = round(
        out["sisa_bf16_carried_momentum"]["seconds_per_million_sample_epochs"] / mono["seconds_per_million_sample_epochs"], 3)
    carry.close()

    # The same training with `--batching full`: one batch shape for the whole run, where the
    # default's near-equal batches make new ones at every slice step and every forget (each a cuDNN
    # plan per convolution; the breakdown stage times one). The same single-id draws.
    full_run, arm = train_run(work / "full", config(st, batching="full"), device, data_dir)
    arm["forgets"], arm["forget_1_mean"] = forget_requests(st, full_run, [[x] for x in singles], mono, device)
    out["sisa_bf16_full_batches"] = arm
    out["full_batches_over_monolithic_per_sample_epoch"] = round(
        arm["seconds_per_million_sample_epochs"] / mono["seconds_per_million_sample_epochs"], 3)
    full_run.close()
    return out


def forget_requests(st: Setting, run: sisa.Run, requests: list[list[str]], mono: dict, device: torch.device) -> tuple[list, dict]:
    """Each request forgotten in turn, against retraining the monolithic run `mono` and the SISA
    cost model; and the mean of the single-id requests."""
    S, R = st.shards, st.slices
    one_fraction = (1 / S) * (2 / 3 + 1 / (3 * R))
    forgets = []
    for batch in requests:
        model_fraction = one_fraction if len(batch) == 1 else batch_cost_model(S, R, len(batch))
        rep, t = timed(lambda b=batch: run.forget(ids=b, device=str(device)), device)
        realised = rep.sample_epochs / rep.full_sample_epochs
        f = {"ids": len(batch), "seconds": round(t, 2), "phase_seconds": {k: round(v, 3) for k, v in rep.phase_seconds.items()},
             "slices_retrained": {str(k): v for k, v in rep.slices_retrained.items()},
             "sample_epoch_fraction": round(realised, 4), "cost_model_fraction": round(model_fraction, 4),
             "speedup_over_monolithic_retrain": round(mono["seconds"] / t, 2),
             # what the cost model predicts for this request: monolithic sample-epochs over the forget's
             "predicted_speedup_cost_model": round(mono["sample_epochs"] / (model_fraction * rep.full_sample_epochs), 2),
             "predicted_speedup_realised_draw": round(mono["sample_epochs"] / max(1, rep.sample_epochs), 2)}
        f["measured_over_predicted_realised"] = round(f["speedup_over_monolithic_retrain"] / f["predicted_speedup_realised_draw"], 3)
        f["measured_over_predicted_cost_model"] = round(f["speedup_over_monolithic_retrain"] / f["predicted_speedup_cost_model"], 3)
        forgets.append(f)
    ones = [f for f in forgets if f["ids"] == 1]
    mean_s = sum(f["seconds"] for f in ones) / len(ones)
    mean = {"requests": len(ones), "seconds": round(mean_s, 2),
            "sample_epoch_fraction": round(sum(f["sample_epoch_fraction"] for f in ones) / len(ones), 4),
            "speedup_over_monolithic_retrain": round(mono["seconds"] / mean_s, 2),
            "predicted_speedup_cost_model": ones[0]["predicted_speedup_cost_model"],
            "measured_over_predicted_cost_model": round(mono["seconds"] / mean_s / ones[0]["predicted_speedup_cost_model"], 3)}
    return forgets, mean


def checkpoint_write(run: sisa.Run, folder: Path) -> dict:
    """Seconds to write live checkpoints again (serialise, hash, write, fsync), on this machine's
    disk: SISA writes S x R of them in training, and a forget up to R. Slice 0's holds the weights
    and their momentum; the last slice's the weights alone (no retrain resumes from it)."""
    from store.checkpoints import load_checkpoint, save_checkpoint, write_atomic

    def write_time(slice_: int) -> tuple[float, int, bool]:
        ck = run.index.checkpoints()[(0, slice_)]
        state = load_checkpoint(run.dir / ck.path, ck.sha256)
        start = time.perf_counter()
        for i in range(3):
            path, _ = save_checkpoint(state, folder, f"probe{slice_}-{i}")
        return (time.perf_counter() - start) / 3, path.stat().st_size, state["optimizer"] is not None

    folder.mkdir()
    S, R = run.config.shards, run.config.slices
    seconds, size, momentum = write_time(0)
    last_seconds, last_size, _ = write_time(R - 1)
    blob = np.random.default_rng(0).bytes(size)  # the disk alone: as many bytes, written and fsynced
    start = time.perf_counter()
    for i in range(3):
        write_atomic(folder / f"raw{i}", blob)
    return {"bytes": size, "seconds": round(seconds, 3), "momentum": momentum, "disk_seconds": round((time.perf_counter() - start) / 3, 3),
            "last_slice_bytes": last_size, "last_slice_seconds": round(last_seconds, 3),
            "sisa_training_total_seconds": round(seconds * S * (R - 1) + last_seconds * S, 1)}


# --- breakdown: where SISA's time over monolithic training goes ---------------------------------------
def schedule_only(cfg: sisa.RunConfig, job, images: torch.Tensor, labels: torch.Tensor,
                  device: torch.device) -> torch.nn.Module:
    """A shard job's batches and nothing else: `sisa.training`'s slice loop (each step on the
    shard's growing prefix, its own optimiser and seeded order) without copying each slice's
    state to the host. Returns the trained model, still on the device."""
    from sisa.config import slice_epochs
    from sisa.partition import derive_seed
    from sisa.training import build_trainable, initial_state, make_optimizer, prepare

    epochs = slice_epochs(cfg.slices, cfg.epochs)
    model = build_trainable(cfg).to(device)
    model.load_state_dict(initial_state(cfg, job.shard)["model"])
    model = prepare(cfg, model)
    index = torch.tensor([r for rows in job.slice_rows for r in rows], dtype=torch.long)
    x, y = images[index].to(device), labels[index].to(device)
    n = 0
    for i, rows in enumerate(job.slice_rows):
        n += len(rows)
        gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "train", job.shard, i))
        train_step(cfg, model, make_optimizer(cfg, model), x[:n], y[:n], epochs[i], gen)
    return model


def stage_breakdown(st: Setting, device: torch.device, data_dir: str, work: Path) -> dict:
    """Each level adds what the library does beyond the one before; the monolithic model goes
    through the same levels, so each ratio is SISA's own price at that level. SISA runs with
    both batchings: the default's near-equal batches make new batch shapes at every slice step,
    `--batching full` one for the whole run; `cold_shape` times what a new shape costs a step."""
    from sisa.config import epoch_batches, slice_epochs, step_sample_epochs
    from sisa.training import initial_state, run_shard_job

    out = {"cold_shape": cold_shape(st, device, data_dir)}
    recipes = (("monolithic", config(st, shards=1, slices=1)), ("sisa", config(st)), ("sisa_full", config(st, batching="full")))
    for name, cfg in recipes:
        run = sisa.Run.create(work / name, cfg, data_dir=data_dir)
        cfg, jobs, train = run.config, run.shard_jobs(), run.dataset().train  # channels, classes: from the data
        if name == "monolithic":  # warm-up: CUDA context, cuDNN and allocator, paid once
            first = replace(jobs[0], slice_rows=[jobs[0].slice_rows[0][: 4 * st.batch]])
            schedule_only(replace(cfg, epochs=1), first, train.images, train.labels, device)
        epochs = slice_epochs(cfg.slices, cfg.epochs)
        sizes = [[sum(len(r) for r in job.slice_rows[: i + 1]) for i in range(cfg.slices)] for job in jobs]
        steps = [(e, epoch_batches(n, cfg.batch_size, cfg.batching)) for ns in sizes for e, n in zip(epochs, ns) if n >= 2]
        sample_epochs = sum(step_sample_epochs(cfg, n, e) for ns in sizes for e, n in zip(epochs, ns))
        bare, t_schedule = timed(lambda: [schedule_only(cfg, job, train.images, train.labels, device) for job in jobs], device)
        # the library's jobs, each slice's state consumed as it comes (the last one kept)
        library, t_jobs = timed(lambda: [deque(run_shard_job(cfg, job, initial_state(cfg, job.shard), train.images,
                                                             train.labels, device), maxlen=1)[0].state["model"]
                                         for job in jobs], device)
        report, t_pipeline = timed(lambda: run.complete(str(device)), device)
        assert report.sample_epochs == sample_epochs, (report.sample_epochs, sample_epochs)
        out[name] = {"batching": cfg.batching, "sample_epochs": sample_epochs,
                     "optimizer_steps": sum(e * len(b) for e, b in steps),
                     "batch_shapes": len({size for _, b in steps for size in b}),
                     # the bare arm trains what the library trains (bit for bit on the CPU; a GPU's
                     # default kernels need not repeat their bits)
                     "schedule_equals_library_bits": all(torch.equal(v.cpu(), lib[k]) for m, lib in zip(bare, library)
                                                         for k, v in m.state_dict().items()),
                     "schedule_seconds": round(t_schedule, 2), "shard_jobs_seconds": round(t_jobs, 2),
                     "pipeline_seconds": round(t_pipeline, 2),
                     "pipeline_phase_seconds": {k: round(v, 3) for k, v in report.phase_seconds.items()}}
        run.close()
        shutil.rmtree(work / name)
    mono = out["monolithic"]
    for name in ("sisa", "sisa_full"):
        scale = mono["sample_epochs"] / out[name]["sample_epochs"]
        out[f"{name}_over_monolithic_per_sample_epoch"] = {
            level: round(out[name][f"{level}_seconds"] * scale / mono[f"{level}_seconds"], 3)
            for level in ("schedule", "shard_jobs", "pipeline")}
    return out


def cold_shape(st: Setting, device: torch.device, data_dir: str, shapes: int = 12) -> dict:
    """Milliseconds a training step takes at a batch size it has not seen (cuDNN builds a plan
    for every convolution, forward and backward) against the same sizes again, and against the
    batch size it trains at; the library's bf16 step, its numerics (no autotuning)."""
    from sisa.training import forward, make_optimizer, numerics, prepare

    cfg = config(st)
    shape = tuple(load_dataset(st.dataset, data_dir).train.images.shape[1:])
    sizes = [st.batch - 1 - k for k in range(shapes)]
    with numerics(cfg, device):
        torch.manual_seed(0)
        model = prepare(cfg, build_model("resnet18", shape[0], 10, st.width).to(device))
        opt = make_optimizer(cfg, model)
        x, y = torch.randn(st.batch, *shape, device=device), torch.randint(0, 10, (st.batch,), device=device)

        def step(b: int) -> None:
            loss = F.cross_entropy(forward(cfg, model, x[:b]), y[:b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for _ in range(5):
            step(st.batch)
        cold = [timed(lambda b=b: step(b), device)[1] for b in sizes]
        warm = [timed(lambda b=b: step(b), device)[1] for b in sizes]
        full = [timed(lambda: step(st.batch), device)[1] for _ in sizes]
    ms = lambda ts: round(1000 * float(np.median(ts)), 2)  # noqa: E731
    return {"sizes": sizes, "cold_step_ms": ms(cold), "warm_step_ms": ms(warm), "batch_step_ms": ms(full),
            "extra_ms_per_new_shape": round(1000 * float(np.median(np.subtract(cold, warm))), 2)}


# --- determinism: its cost, and whether a forget then equals a retrain bit for bit -------------------
def stage_determinism(st: Setting, device: torch.device, data_dir: str, work: Path) -> dict:
    from sisa.audit import audit

    out = {"shards": st.shards, "slices": st.det_slices, "epochs": st.det_epochs}
    for det in (False, True):
        cfg = config(st, epochs=st.det_epochs, slices=st.det_slices, deterministic=det)
        run, res = train_run(work / f"det{det}", cfg, device, data_dir)
        victim = run.retained(0)[1][st.det_slices // 2][0]  # shard 0, a middle slice
        _, t_forget = timed(lambda: run.forget(ids=[victim], device=str(device)), device)
        report = audit(run, retrain=[0], device=device)
        res.update(forget_seconds=round(t_forget, 2), forget_equals_retrain=report.ok, audit_failures=report.failures[:3])
        out["deterministic" if det else "default"] = res
        run.close()
        shutil.rmtree(work / f"det{det}")
    out["deterministic_over_default_time"] = round(out["deterministic"]["seconds"] / out["default"]["seconds"], 3)
    return out


# --- concurrent: several shard jobs on one GPU -----------------------------------------------------
def stage_concurrent(st: Setting, device: torch.device, data_dir: str, work: Path) -> dict:
    from sisa.executors import GpuExecutor, LocalExecutor
    from store.checkpoints import file_sha256

    mono_run, mono = train_run(work / "mono", config(st, shards=1, slices=1), device, data_dir)
    mono_run.close()
    out = {"monolithic_bf16": mono, "jobs": {}}
    files = {}
    # In this process: one job after another (the default), then S at once in threads, each job on
    # its own CUDA stream (one context, its cuDNN plans and allocator shared); then S worker
    # processes (`--executor gpus`), each starting, importing, loading and building its own plans.
    # `--batching full` gives every job one batch shape. (Measured before, at 9ee1795: one worker
    # process 2.10x, five with momentum carried 1.56x.)
    arms = (("local", 1, "split"), ("local", st.shards, "split"), ("local", st.shards, "full"),
            ("gpus", st.shards, "split"), ("gpus", st.shards, "full"))
    for name, jobs, batching in arms:
        cfg = config(st, batching=batching)
        key = f"{name} {jobs}" + (" full-batches" if batching == "full" else "")
        run = sisa.Run.create(work / key.replace(" ", "_"), cfg, data_dir=data_dir)
        if name == "local":
            executor, where = LocalExecutor(jobs=jobs), str(device)
        else:
            executor, where = GpuExecutor(devices=[str(device)] if device.type != "cuda" else None, jobs_per_device=jobs), "auto"
        report, t = timed(lambda: run.complete(where, executor=executor), device)
        if batching == "split":
            files[key] = {k: file_sha256(run.dir / c.path) for k, c in run.index.checkpoints().items()}
        out["jobs"][key] = {"seconds": round(t, 2), "sample_epochs": report.sample_epochs,
                            # summed over the shard jobs: a worker's start (spawn, imports, CUDA
                            # context) is in none of them, its data load in "prepare"
                            "phase_seconds": {k: round(v, 3) for k, v in report.phase_seconds.items()},
                            "over_monolithic_per_sample_epoch": round(
                                (t / report.sample_epochs) / (mono["seconds"] / mono["sample_epochs"]), 3)}
        run.close()
        shutil.rmtree(run.dir)
    out["local_at_once_over_one_at_a_time"] = round(out["jobs"][f"local {st.shards}"]["seconds"]
                                                    / out["jobs"]["local 1"]["seconds"], 3)
    out["identical_checkpoints"] = all(f == files["local 1"] for f in files.values())
    return out


# --- compile: is torch.compile worth it for the bare step? -------------------------------------------
def stage_compile(st: Setting, device: torch.device, data_dir: str, work: Path) -> dict:
    torch.backends.cudnn.benchmark = device.type == "cuda"
    shape = tuple(load_dataset(st.dataset, data_dir).train.images.shape[1:])
    eager = bare_rates(st, device, "bf16", shape)
    start = time.perf_counter()
    compiled = bare_rates(st, device, "bf16", shape, compiled=True)  # its warm-up steps compile
    compile_s = time.perf_counter() - start - st.steps * st.batch / compiled["train_images_per_s"]
    return {"eager_train_images_per_s": round(eager["train_images_per_s"]),
            "compiled_train_images_per_s": round(compiled["train_images_per_s"]),
            "compiled_over_eager_train": round(compiled["train_images_per_s"] / eager["train_images_per_s"], 3),
            "eager_infer_images_per_s": round(eager["infer_images_per_s"]),
            "compiled_infer_images_per_s": round(compiled["infer_images_per_s"]),
            "compile_seconds": round(compile_s, 1)}


# --- results -------------------------------------------------------------------------------------------
def markdown(res: dict) -> str:
    lines = [f"# GPU speed: {res['environment']['hardware']}", ""]
    if s := res.get("step"):
        lines += [f"## Training step: the project's loop against the bare model step (batch {s['batch']}, "
                  f"images {'x'.join(map(str, s['images']))})", "",
                  "| precision | bare step img/s (autotuned) | project loop img/s | loop / bare | loop with cudnn autotuning | "
                  "bare inference img/s |", "|---|---|---|---|---|---|"]
        lines += [f"| {p} | {s[p]['bare_train_images_per_s']:,} | {s[p]['pipeline_images_per_s']:,} | "
                  f"**{s[p]['pipeline_over_bare']:.2f}** | {s[p].get('pipeline_autotuned_images_per_s', 0):,} "
                  f"({s[p].get('pipeline_autotuned_over_bare', 0):.2f}) | {s[p]['bare_infer_images_per_s']:,} |"
                  for p in ("fp32", "bf16")]
        lines += ["", f"bf16 loop / fp32 loop: {s['bf16_over_fp32_pipeline']:.2f}x", ""]
        if graphs := s.get("cuda_graph"):
            lines += ["The bare bf16 step captured whole in one CUDA graph and replayed, against the same step "
                      "launched op by op (same batch on the device, no data pipeline):", ""]
            for g in graphs:
                if "graphed_over_eager" in g:
                    lines.append(f"- batch {g['batch']}: eager {g['eager_images_per_s']:,} img/s, graphed "
                                 f"{g['graphed_images_per_s']:,} img/s: **{g['graphed_over_eager']:.2f}x**; the replay "
                                 f"trains the eager step's bits: {'yes' if g['graph_equals_eager_bits'] else 'no'} "
                                 f"(two eager runs: {'yes' if g['eager_repeats_its_bits'] else 'no'})")
                else:
                    lines.append(f"- batch {g['batch']}: not measured: {g.get('skipped') or g.get('failed')}")
            lines.append("")
    if s := res.get("sisa"):
        r = s["recipe"]
        lines += [f"## SISA (S={r['shards']}, R={r['slices']}) against one monolithic model, {r['dataset']}, "
                  f"{r['epochs']} epochs, batch {r['batch']}, peak lr {r['lr']}", "",
                  "| run | train s | sample-epochs | s per 1M sample-epochs | test acc (vote / mean) |", "|---|---|---|---|---|"]
        # Since issue 12 the default resets momentum at each slice step; results made before it
        # (no "reset_momentum" in the recipe) carried it by default and measured the reset beside.
        reset_default = r.get("reset_momentum", False)
        for key, name in (("monolithic_fp32", "monolithic, fp32"), ("monolithic_bf16", "monolithic, bf16"),
                          ("sisa_bf16", "SISA, bf16" + (" (momentum reset per slice: the default)" if reset_default else "")),
                          ("sisa_bf16_reset_momentum", "SISA, bf16, `--reset-momentum`"),
                          ("sisa_bf16_carried_momentum", "SISA, bf16, `--carry-momentum`"),
                          ("sisa_bf16_full_batches", "SISA, bf16, `--batching full`")):
            if (m := s.get(key)) is None:
                continue
            lines.append(f"| {name} | {m['seconds']:.1f} | {m['sample_epochs']:,} | {m['seconds_per_million_sample_epochs']:.2f} | "
                         f"{m['accuracy_vote']:.2f}% / {m['accuracy_mean']:.2f}% |")
        lines += ["", f"SISA / monolithic: **{s['sisa_over_monolithic_per_sample_epoch']:.2f}x** per sample-epoch "
                      f"({s['sisa_over_monolithic_time']:.2f}x in wall time). Wall times include the index, every "
                      "checkpoint written, fsynced and hashed.", "",
                  "| forget | wall s | speed-up over monolithic retrain | cost model's speed-up | measured / model | "
                  "this draw's sample-epoch speed-up | measured / draw |", "|---|---|---|---|---|---|---|"]
        for f in s["forgets"]:
            lines.append(f"| {f['ids']} id{'s' if f['ids'] > 1 else ''} | {f['seconds']:.2f} | {f['speedup_over_monolithic_retrain']:.1f}x | "
                         f"{f['predicted_speedup_cost_model']:.1f}x | **{f['measured_over_predicted_cost_model']:.2f}** | "
                         f"{f['predicted_speedup_realised_draw']:.1f}x | {f['measured_over_predicted_realised']:.2f} |")
        if m := s.get("forget_1_mean"):
            lines += ["", f"The {m['requests']} single-id forgets, one request after another: mean {m['seconds']:.2f} s, "
                          f"{m['speedup_over_monolithic_retrain']:.1f}x over monolithic retraining against the cost "
                          f"model's {m['predicted_speedup_cost_model']:.1f}x: measured / model **{m['measured_over_predicted_cost_model']:.2f}** "
                          f"(their mean sample-epoch fraction {100 * m['sample_epoch_fraction']:.1f}% of full retraining, "
                          f"the model's {100 * s['forgets'][0]['cost_model_fraction']:.1f}%)."]
        phased = [(f, f["phase_seconds"]) for f in s["forgets"] if f.get("phase_seconds")]
        if phased:
            lines += ["", "Where a forget's wall time went: the shard jobs' phases (inputs and starting checkpoint "
                          "loaded / slices trained / last checkpoint writes waited for), the rest outside the jobs "
                          "(journal, index, receipt): " + "; ".join(
                              f"{f['ids']} id{'s' if f['ids'] > 1 else ''}: " + " / ".join(
                                  f"{p.get(k, 0):.2f}" for k in ("prepare", "train", "write_wait"))
                              + f" s, rest {f['seconds'] - sum(p.values()):.2f} s" for f, p in phased) + "."]
        if c := s.get("checkpoint_write"):
            last = (f"; the last slice's ({c['last_slice_bytes'] / 1e6:.0f} MB: the weights alone) "
                    f"{c['last_slice_seconds']:.2f} s" if c.get("momentum") else "")
            held = "weights and momentum" if c.get("momentum", True) else "the weights alone"
            lines += ["", f"One checkpoint ({c['bytes'] / 1e6:.0f} MB: {held}) takes {c['seconds']:.2f} s to "
                          f"serialise, hash, write and fsync here{last}: {c['sisa_training_total_seconds']:.0f} s for the S x R "
                          "of a SISA training, written by a background thread while the next slice trains."
                      + (f" Writing and fsyncing as many random bytes takes {c['disk_seconds']:.2f} s of that." if "disk_seconds" in c else "")]
        # the arm beside the default: --carry-momentum since issue 12 made the reset the default
        for arm, flag, held in (("carried_momentum", "--carry-momentum", "momentum carried to the next slice step, "
                                 "checkpoints of {:.0f} MB: weights and momentum"),
                                ("reset_momentum", "--reset-momentum", "zero momentum at each slice step, "
                                 "checkpoints of {:.0f} MB: the weights alone")):
            if m := s.get(f"sisa_bf16_{arm}"):
                lines += ["", f"With `{flag}` ({held.format(m['checkpoint_bytes'] / 1e6)}): SISA / monolithic "
                              f"**{s[arm + '_over_monolithic_per_sample_epoch']:.2f}x** per sample-epoch; the forget "
                              f"of the same 1 id {m['forget_1_seconds']:.2f} s ({m['forget_1_speedup_over_monolithic_retrain']:.1f}x "
                              "over monolithic retraining)."]
        if m := s.get("sisa_bf16_full_batches"):
            f, each = m["forget_1_mean"], " / ".join(f"{x['seconds']:.2f}" for x in m["forgets"])
            lines += ["", f"With `--batching full` (batches of exactly {r['batch']}, an epoch's incomplete tail sitting "
                          f"out: one batch shape for the whole run): SISA / monolithic **{s['full_batches_over_monolithic_per_sample_epoch']:.2f}x** "
                          f"per sample-epoch; the same {f['requests']} single-id forgets: mean {f['seconds']:.2f} s "
                          f"({each}), {f['speedup_over_monolithic_retrain']:.1f}x over "
                          f"monolithic retraining: measured / model **{f['measured_over_predicted_cost_model']:.2f}**."]
        p = s["predict"]
        lines += ["", f"Ensemble prediction: {p['ensemble_images_per_s']:,} img/s over {p['images']:,} images; one "
                      f"constituent alone {p['single_model_images_per_s']:,} img/s; ensemble / (single / S) = "
                      f"**{p['ensemble_over_single_div_S']:.2f}**.", ""]
    if s := res.get("breakdown"):
        m, arms = s["monolithic"], [a for a in ("sisa", "sisa_full") if a in s]
        named = {"sisa": "SISA", "sisa_full": "SISA `--batching full`"}
        levels = (("schedule", "the slice schedule's batches alone"),
                  ("shard_jobs", "+ each slice's state copied to the host (the library's shard jobs)"),
                  ("pipeline", "+ checkpoints written, fsynced and hashed; the index (the library's `complete`)"))
        lines += ["## Where SISA's time over monolithic training goes (the sisa stage's recipe)", "",
                  "| level | monolithic s | " + " | ".join(f"{named[a]} s | / monolithic per sample-epoch" for a in arms) + " |",
                  "|---|---|" + "---|---|" * len(arms)]
        lines += [f"| {label} | {m[level + '_seconds']:.1f} | " + " | ".join(
            f"{s[a][level + '_seconds']:.1f} | **{s[a + '_over_monolithic_per_sample_epoch'][level]:.2f}x**" for a in arms) + " |"
            for level, label in levels]
        lines += ["", "| | monolithic | " + " | ".join(named[a] for a in arms) + " |", "|---|---|" + "---|" * len(arms)]
        for key, label in (("sample_epochs", "sample-epochs"), ("optimizer_steps", "optimiser steps"),
                           ("batch_shapes", "distinct batch sizes")):
            if key in m:
                lines.append(f"| {label} | {m[key]:,} | " + " | ".join(f"{s[a][key]:,}" for a in arms) + " |")
        same = all(s[a]["schedule_equals_library_bits"] for a in ["monolithic", *arms])
        lines += ["", "The bare schedule trains the library's bits: " + ("yes" if same else
                  "no (this device's default kernels do not repeat their bits)") + "."]
        if c := s.get("cold_shape"):
            lines += ["", f"A training step at a batch size not seen before (sizes {c['sizes'][-1]}-{c['sizes'][0]}, "
                          f"bf16): {c['cold_step_ms']:.1f} ms, the same sizes again {c['warm_step_ms']:.1f} ms, at the "
                          f"training batch size {c['batch_step_ms']:.1f} ms: **{c['extra_ms_per_new_shape']:.1f} ms** "
                          "per new batch shape."]
        lines.append("")
    if s := res.get("determinism"):
        lines += [f"## Deterministic mode (S={s['shards']}, R={s['slices']}, {s['epochs']} epochs)", "", "| mode | train s | forget s | forget equals retrain bit for bit |",
                  "|---|---|---|---|"]
        for key in ("default", "deterministic"):
            m = s[key]
            lines.append(f"| {key} | {m['seconds']:.1f} | {m['forget_seconds']:.2f} | {'yes' if m['forget_equals_retrain'] else 'no'} |")
        lines += ["", f"deterministic / default training time: **{s['deterministic_over_default_time']:.2f}x** "
                      f"(commit `{s.get('commit', '?')[:12]}`)", ""]
    if s := res.get("compile"):
        lines += ["## torch.compile of the bare bf16 step", "",
                  f"eager {s['eager_train_images_per_s']:,} img/s, compiled {s['compiled_train_images_per_s']:,} img/s "
                  f"(**{s['compiled_over_eager_train']:.2f}x**, {s['compile_seconds']:.0f} s to compile); inference "
                  f"{s['eager_infer_images_per_s']:,} vs {s['compiled_infer_images_per_s']:,} img/s.", ""]
    if s := res.get("concurrent"):
        lines += ["## Several shard jobs at once on one GPU (`--jobs-per-gpu`)", "",
                  "`local N`: N jobs at once in threads of the command's own process, each on its own CUDA stream "
                  "(`local 1`: one after another, the default); `gpus N`: N worker processes (`--executor gpus`).", "",
                  "| executor, jobs at once | SISA train s | / monolithic per sample-epoch | job phases summed: prepare / train / write_wait s |",
                  "|---|---|---|---|"]
        lines += [f"| {k} | {v['seconds']:.1f} | **{v['over_monolithic_per_sample_epoch']:.2f}x** | "
                  + (" / ".join(f"{v['phase_seconds'].get(p, 0):.1f}" for p in ("prepare", "train", "write_wait"))
                     if v.get("phase_seconds") else "not recorded") + " |" for k, v in s["jobs"].items()]
        if "local_at_once_over_one_at_a_time" in s:
            lines += ["", f"Jobs at once in threads against one after another, same process: "
                          f"**{s['local_at_once_over_one_at_a_time']:.2f}x** the time."]
        lines += ["", f"Monolithic: {s['monolithic_bf16']['seconds']:.1f} s. Every checkpoint file identical whatever the "
                      f"number of jobs at once: {'yes' if s['identical_checkpoints'] else 'NO'}.", ""]
    for stage, why in res.get("failed", {}).items():
        lines += [f"Stage `{stage}` failed: {why}", ""]
    return "\n".join(lines)


def run_stage(name: str, st: Setting, device: torch.device, data_dir: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        if name == "step":
            return stage_step(st, device, data_dir)
        return {"sisa": stage_sisa, "breakdown": stage_breakdown, "determinism": stage_determinism,
                "compile": stage_compile, "concurrent": stage_concurrent}[name](
            st, device, data_dir, Path(tmp))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", action="append", choices=STAGES, help="run this stage (repeatable; default: all)")
    ap.add_argument("--list-stages", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="every stage, tiny, on whatever device there is")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--results-dir", type=Path, default=RESULTS)
    ap.add_argument("--name", default=None, help="results name (default gpu_<device>)")
    ap.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.list_stages:
        print("\n".join(STAGES))
        return
    device = pick_device(args.device)
    st = SMOKE if args.smoke else FULL
    if args.in_process:  # one stage, in a process of its own; prints its section as JSON
        (stage,) = args.stage
        if stage == "determinism":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        print("RESULT " + json.dumps(run_stage(stage, st, device, args.data_dir)))
        return
    name = args.name or ("gpu_smoke" if args.smoke else "gpu_" + (torch.cuda.get_device_name(0).split()[1].lower()
                                                                    if device.type == "cuda" else "cpu"))
    path = args.results_dir / f"{name}.json"
    res = json.loads(path.read_text()) if path.exists() else {}
    for stage in args.stage or STAGES:
        cmd = [sys.executable, "-m", "benchmarks.gpu", "--in-process", "--stage", stage, "--data-dir", args.data_dir,
               "--device", str(device)] + (["--smoke"] if args.smoke else [])
        env = dict(os.environ, **({"CUBLAS_WORKSPACE_CONFIG": ":4096:8"} if stage == "determinism" else {}))
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
        found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        res.setdefault("failed", {}).pop(stage, None)
        res.pop(stage, None)
        if proc.returncode == 0 and found:
            res[stage] = json.loads(found[-1][len("RESULT "):])
            res[stage]["stage_seconds"] = round(time.perf_counter() - start, 1)
            res[stage]["commit"] = environment()["git_commit"]
        else:
            res["failed"][stage] = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(proc.stderr[-3000:], file=sys.stderr)
        if not res["failed"]:
            del res["failed"]
        res["environment"] = environment()
        res["environment"]["device"] = str(device)
        write_results(name, res, markdown(res), args.results_dir)
        print(f"stage {stage}: {'ok' if stage in res and stage not in res.get('failed', {}) else 'FAILED'} "
              f"in {time.perf_counter() - start:.0f} s", flush=True)
    print(markdown(res))


if __name__ == "__main__":
    main()
