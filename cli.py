"""`sisa`: the command line over the `sisa` library. Each command is a thin call into it.

Exit codes: 0 ok, 1 failure (bad data, unknown ids, a corrupt file), 2 usage (bad options,
missing paths). Errors are one line on stderr; progress bars go to stderr; `--json` puts a
machine-readable result on stdout.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

app = typer.Typer(help="Exact machine unlearning with SISA (sharded, isolated, sliced, aggregated training).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
err = Console(stderr=True)
out = Console()

RunDir = Annotated[Path, typer.Option("--run-dir", help="The run directory (index and checkpoints).")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print a JSON result on stdout.")]
Device = Annotated[str, typer.Option(help="Where to train: auto (a CUDA GPU if present), cpu, cuda, cuda:N.")]
RunOn = Annotated[str, typer.Option("--device", help="Where to run the models: auto (a CUDA GPU if present), cpu, cuda, cuda:N.")]
ExecutorName = Annotated[str, typer.Option("--executor", help="Where shard jobs run: local (in this process: one after "
                                           "another, or --jobs-per-gpu at once), gpus (worker processes on every visible GPU, --jobs-per-gpu each), ray (Ray tasks; needs the ray extra).")]
RayAddress = Annotated[Optional[str], typer.Option("--ray-address", help="With --executor ray: join this running cluster "
                                                   "(auto, HOST:6379, ray://HOST:10001) instead of starting a local one.")]
GpusPerTask = Annotated[Optional[float], typer.Option("--gpus-per-task", help="With --executor ray: GPUs per shard job, "
                                                      "fractional allowed (0.2: five jobs per GPU); by default 1 if the cluster has GPUs, else 0.")]
JobsPerGpu = Annotated[Optional[int], typer.Option("--jobs-per-gpu", help="How many shard jobs run at once on each GPU (a "
                                                   "small shard leaves most of a GPU idle): with --executor local, threads of this process, each on its own CUDA stream; "
                                                   "with --executor gpus, worker processes. Each job's result is what it would be alone. \\[default: 1]")]


def handles_errors(fn):
    """Turn library errors into one line on stderr and the error's exit code."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from sisa.errors import SisaError

        try:
            return fn(*args, **kwargs)
        except SisaError as e:
            fail(str(e), e.exit_code)
        except OSError as e:  # a disk, permission or path problem the checks did not foresee
            fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e), 1)
        except KeyboardInterrupt:
            err.print("interrupted: run the same command with --resume to finish", highlight=False)
            raise typer.Exit(130) from None
    return wrapper


def fail(message: str, code: int):
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code) from None


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} img/s" if task.speed else "", style="progress.data.speed")


class ShardProgress:
    """A rich bar per shard being (re)trained, fed by the library's progress callback: images
    trained so far, images per second and the time left."""

    def __init__(self, slices: int):
        self.slices = slices
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(),
                             TextColumn("{task.completed:,.0f}/{task.total:,.0f} images"), RateColumn(),
                             TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                             console=err, transient=False)
        self.tasks: dict[int, int] = {}

    def __call__(self, shard: int, slice_: int, done: int, total: int) -> None:
        if shard not in self.tasks:
            self.tasks[shard] = self.bars.add_task(f"shard {shard}", total=max(total, 1))
        self.bars.update(self.tasks[shard], completed=done, description=f"shard {shard} slice {slice_ + 1}/{self.slices}")

    def __enter__(self):
        self.bars.__enter__()
        return self

    def __exit__(self, *exc):
        self.bars.__exit__(*exc)


@contextmanager
def notices():
    """Yields a function taking notes about slow steps ("loading fashion-mnist ..."). On a
    terminal they show as a spinner line that vanishes when the command moves on, so an error
    that follows stands alone on its line; piped to a log they are left out."""
    if not err.is_terminal:
        yield lambda message: None
        return
    with err.status("", spinner="dots") as status:
        yield lambda message: status.update(escape(message))


def load_data(run) -> None:
    """When there is training to do, pay its start-up now, before the command's clock starts:
    the training code's imports (torch, torchvision: seconds here) and, unless a frozen trunk's
    cached features stand in for it, the data set, saying so (large sets take a while)."""
    if run.shard_jobs():
        import sisa.executors  # noqa: F401

        if not run.config.frozen:
            with notices() as note:
                note(f"loading {run.config.dataset} ...")
                run.dataset()


def executor_for(name: str, ray_address: str | None, gpus_per_task: float | None, jobs_per_gpu: int | None):
    """Built before anything is written, so a missing Ray or GPU, or a bad option, changes nothing."""
    from sisa.errors import UsageError

    if name != "ray" and (ray_address is not None or gpus_per_task is not None):
        raise UsageError("--ray-address and --gpus-per-task apply only to --executor ray")
    if name not in ("local", "gpus") and jobs_per_gpu is not None:
        raise UsageError("--jobs-per-gpu applies only to --executor local or gpus")
    if name == "local" and jobs_per_gpu is None:
        return name  # nothing to check, and no reason to import torch yet
    from sisa.executors import make_executor

    return make_executor(name, ray_address, gpus_per_task, 1 if jobs_per_gpu is None else jobs_per_gpu)


def emit(as_json: bool, payload: dict, human: str | Table) -> None:
    if as_json:
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
    else:
        out.print(human, highlight=False, soft_wrap=True)  # lines stay whole when piped


@app.command()
@handles_errors
def train(
    shards: Annotated[Optional[int], typer.Option(help="S: number of shards, one constituent model each. \\[default: 5]")] = None,
    slices: Annotated[Optional[int], typer.Option(help="R: slices per shard, one checkpoint after each. \\[default: 4]")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs an unsliced shard would get (SISA spreads 2R/(R+1)x that). \\[default: 12]")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="digits, mnist, fashion-mnist, cifar10, a CSV manifest id,path,label[,owner], or a folder with one subfolder of images per class (ids: paths relative to it; owners from its owners.csv id,owner). \\[default: digits]")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="Where mnist/fashion-mnist/cifar10 files live (torchvision layout). \\[default: data]")] = None,
    test_manifest: Annotated[Optional[Path], typer.Option("--test-manifest", help="Test split of a CSV or folder dataset: a manifest (or a folder, as --test-dir). Its accuracy ends `train` and `forget`; `evaluate` reports it.")] = None,
    test_dir: Annotated[Optional[Path], typer.Option("--test-dir", help="Test split of a CSV or folder dataset: a folder with a subfolder per class (a subset of the training classes).")] = None,
    image_size: Annotated[Optional[str], typer.Option("--image-size", help="Resize every image to N x N or H x W pixels (`32`, `24x32`) when it is loaded, with Pillow's BILINEAR filter; recorded in the run. Needed when the images have different sizes.")] = None,
    download: Annotated[bool, typer.Option(help="Download cifar10 into --data-dir if it is missing.")] = False,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the partition, initial weights and every slice's randomness. \\[default: 0]")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Training batch size. \\[default: 64]")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (SGD, Nesterov momentum 0.9). \\[default: 0.05]")] = None,
    width: Annotated[Optional[int], typer.Option(help="ResNet-18 width: channels of its first layers (layers 2-4 double them). \\[default: 64]")] = None,
    init_from: Annotated[Optional[Path], typer.Option("--init-from", help="Start every shard from these weights: a `sisa pretrain` output or torchvision ResNet-18 weights; tensors that do not fit are drawn from the seed.")] = None,
    features_from: Annotated[Optional[Path], typer.Option("--features-from", help="With a frozen trunk: copy the cached features from this run (same data, same trunk) instead of computing them again.")] = None,
    trainable: Annotated[Optional[str], typer.Option(help="What each shard trains: all, layer4 or fc. With layer4 or fc the trunk below is frozen (needs --init-from): features are computed once and forgets retrain only the head. \\[default: all]")] = None,
    crop_pad: Annotated[Optional[int], typer.Option(help="Random-crop padding in pixels. \\[default: per dataset]")] = None,
    flip: Annotated[Optional[bool], typer.Option("--flip/--no-flip", help="Random horizontal flips. \\[default: per dataset]")] = None,
    precision: Annotated[Optional[str], typer.Option(help="Arithmetic: fp32, or bf16 (autocast and channels_last: about twice as fast on a GPU); auto picks bf16 when training on a CUDA GPU. Recorded in the run: every forget uses it too. \\[default: auto]")] = None,
    deterministic: Annotated[bool, typer.Option("--deterministic", help="Deterministic CUDA kernels (about 2% slower on an H100): a forget then equals retraining from scratch bit for bit on the same GPU type, which `sisa audit --retrain --device cuda` checks. CPU training is deterministic always.")] = False,
    reset_momentum: Annotated[Optional[bool], typer.Option("--reset-momentum/--carry-momentum", help="Start every slice step with zero momentum, so each checkpoint holds the weights alone (a ResNet-18's 45 MB, against 89 MB with its momentum carried to the next slice): half the bytes to write, what GPU training waits on. Exact either way. \\[default: reset]")] = None,
    batching: Annotated[Optional[str], typer.Option(help="How each epoch is cut into batches: split (near-equal batches of at most --batch-size, every sample once) or full (batches of exactly --batch-size, an epoch's incomplete last batch sitting out; the order is random each epoch). full gives a GPU one batch shape for the whole run: cuDNN plans every new shape, and split makes new ones at every slice step and every forget. Exact either way. \\[default: split]")] = None,
    run_dir: RunDir = Path("sisa-run"),
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory (only a SISA run or an empty folder).")] = False,
    resume: Annotated[bool, typer.Option(help="Finish training an existing run that was interrupted, as it was created.")] = False,
    device: Device = "auto",
    executor: ExecutorName = "local",
    ray_address: RayAddress = None,
    gpus_per_task: GpusPerTask = None,
    jobs_per_gpu: JobsPerGpu = None,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the ensemble's test accuracy that ends the command (one pass of the test split through every constituent).")] = False,
    as_json: JsonOut = False,
):
    """Partition the data into shards and slices, then train every shard's ResNet-18 slice by slice.

    On a 2-core CPU, ResNet-18 trains about 35 images/s on 28x28 images: fine for digits, hours for Fashion-MNIST. Use a GPU (--device cuda) for real data sets."""
    import sisa
    from sisa.run import check_replaceable, writer_lock

    options = dict(shards=shards, slices=slices, epochs=epochs, seed=seed, batch_size=batch_size, lr=lr,
                   width=width, trainable=trainable, crop_pad=crop_pad, flip=flip,
                   precision=None if precision == "auto" else precision, deterministic=deterministic or None,
                   reset_momentum=reset_momentum, batching=batching)
    if test_dir is not None:
        if test_manifest is not None:
            raise sisa.UsageError("--test-dir and --test-manifest both name the test split: pass one of them")
        test_manifest = test_dir
    if image_size is not None:
        from sisa.config import parse_image_size

        options["resize"] = parse_image_size(image_size)
    if resume:
        if overwrite:
            raise sisa.UsageError("--resume finishes a run and --overwrite replaces it: pass one of them")
        run = sisa.Run.open(run_dir)
        _refuse_conflicts(run, options, dataset, data_dir, test_manifest)
        if init_from is not None or features_from is not None:
            raise sisa.UsageError("--resume finishes a run as it was created; drop --init-from and --features-from")
        runner = executor_for(executor, ray_address, gpus_per_task, jobs_per_gpu)
    else:
        if trainable not in (None, "all"):  # features are computed once: no augmentation unless asked
            options.update(crop_pad=0 if crop_pad is None else crop_pad, flip=False if flip is None else flip)
        cfg = sisa.config_for(dataset or "digits", **options)
        cfg.validate()
        if test_manifest is not None and not test_manifest.exists():
            raise sisa.UsageError(f"test split not found: {test_manifest}")
        check_replaceable(run_dir, overwrite)  # before the data loads: a refusal comes at once
        runner = executor_for(executor, ray_address, gpus_per_task, jobs_per_gpu)
        if options["precision"] is None:  # auto; asks torch about GPUs, so after the cheap refusals
            cfg = dataclasses.replace(cfg, precision="bf16" if _trains_on_cuda(device, executor) else "fp32")
        with notices() as note:
            run = sisa.Run.create(run_dir, cfg, data_dir=data_dir or Path("data"), download=download,
                                  test_manifest=test_manifest, overwrite=overwrite, init_from=init_from,
                                  features_from=features_from, notify=note)
        if run.init_notes:
            err.print(run.init_notes, highlight=False, soft_wrap=True)
    with writer_lock(run.dir, "sisa train"):
        if resume:
            load_data(run)
        with ShardProgress(run.config.slices) as bars:
            report = run.resume(device, bars, executor=runner)
    reused = {str(k): v for k, v in report.slices_reused.items()}
    payload = {"run_dir": str(run.dir), "shards_trained": report.shards_retrained,
               "slices_trained": {str(k): v for k, v in report.slices_retrained.items()}, "slices_reused": reused,
               "sample_epochs": report.sample_epochs, "seconds": round(report.seconds, 3),
               "phase_seconds": {k: round(v, 3) for k, v in report.phase_seconds.items()}}
    n_reused = sum(len(v) for v in reused.values())
    human = (f"trained {len(report.shards_retrained)} shards x {run.config.slices} slices "
             f"({report.sample_epochs} sample-epochs"
             + (f"; {n_reused} slice checkpoints reused from the interrupted run" if n_reused else "")
             + f") in {report.seconds:.1f} s -> {run.dir}")
    payload.update(_accuracy(run, device, not no_eval))
    emit(as_json, payload, human + _accuracy_line(payload, not no_eval))


def _trains_on_cuda(device: str, executor: str) -> bool:
    """Whether shard jobs will run on a CUDA GPU (what --precision auto goes by)."""
    if device == "cpu":
        return False
    import torch

    return torch.cuda.is_available() and (executor == "gpus" or device.startswith("cuda") or device == "auto")


def _accuracy(run, device: str, wanted: bool) -> dict:
    """The ensemble's test accuracy as JSON fields (`test_accuracy`: majority vote, SISA's
    aggregation; null without a test split or with --no-eval). On the data the command
    has loaded already: one pass of the test set through each constituent."""
    if not wanted:
        return {"test_accuracy": None}
    from sisa.evaluation import holdout_accuracy
    from sisa.run import pick_device

    with notices() as note:
        note("evaluating the ensemble on the test split ...")
        acc = holdout_accuracy(run, pick_device(device))
    if acc is None:
        return {"test_accuracy": None}
    seconds = acc.pop("seconds")  # popped first: unpacked, it would overwrite the command's own "seconds"
    return {**acc, "test_accuracy_seconds": round(seconds, 3)}


def _accuracy_line(payload: dict, wanted: bool) -> str:
    if not wanted:
        return ""
    if payload.get("test_accuracy") is None:
        return "\nno test split, so no test accuracy (create the run with --test-dir or --test-manifest)"
    return (f"\ntest accuracy {100 * payload['test_accuracy']:.2f}% (ensemble, majority vote, "
            f"{payload['test_samples']} test samples, {payload['test_accuracy_seconds']:.1f} s)")


def _refuse_conflicts(run, options: dict, dataset: str | None, data_dir: Path | None,
                      test_manifest: Path | None) -> None:
    """--resume finishes a run as it was created: an option that says otherwise is refused."""
    from sisa import UsageError

    cfg = run.config
    def shown(k, v):
        return ("--image-size", "x".join(map(str, v)) or "none") if k == "resize" else (f"--{k.replace('_', '-')}", v)

    clash = [f"{shown(k, v)[0]} {shown(k, v)[1]} (the run has {shown(k, getattr(cfg, k))[1]})"
             for k, v in options.items() if v is not None and v != getattr(cfg, k)]
    if dataset is not None and dataset != cfg.dataset and Path(dataset).resolve() != Path(cfg.dataset).resolve():
        clash.append(f"--dataset {dataset} (the run has {cfg.dataset})")
    if data_dir is not None and run.data_dir and data_dir.resolve() != Path(run.data_dir):
        clash.append(f"--data-dir {data_dir} (the run has {run.data_dir})")
    if test_manifest is not None and str(test_manifest.resolve()) != (run.test_manifest or ""):
        clash.append(f"--test-manifest {test_manifest} (the run has {run.test_manifest or 'none'})")
    if clash:
        raise UsageError(f"--resume finishes {run.dir} as it was created; drop {', '.join(clash)}")


@app.command()
@handles_errors
def pretrain(
    dataset: Annotated[str, typer.Option(help="Data the user declares public, never subject to deletion: a built-in or a CSV manifest.")],
    out: Annotated[Path, typer.Option(help="Where to write the weights (a .pt file); a .json record goes beside it.")],
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 30,
    data_dir: Annotated[Path, typer.Option(help="Where mnist/fashion-mnist/cifar10 files live.")] = Path("data"),
    test_manifest: Annotated[Optional[Path], typer.Option(help="Test-set manifest for a CSV dataset (the record's test accuracy).")] = None,
    image_size: Annotated[Optional[str], typer.Option("--image-size", help="Resize every image to N x N or H x W pixels (`32`, `24x32`) when it is loaded, as `sisa train --image-size` does (Pillow's BILINEAR filter).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initial weights and the data order.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Training batch size.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 0.05,
    width: Annotated[int, typer.Option(help="ResNet-18 width (as in `sisa train`).")] = 64,
    device: Device = "auto",
    as_json: JsonOut = False,
):
    """Train one ResNet-18 on public data, to start runs from (`sisa train --init-from OUT`).

    Nothing learned here can be unlearned later: use only data nobody may ask to delete."""
    from sisa.backbone import pretrain as run_pretrain
    from sisa.config import parse_image_size
    from sisa.run import pick_device

    size = parse_image_size(image_size) if image_size is not None else None
    with ShardProgress(1) as bars:
        record = run_pretrain(dataset, data_dir, out, epochs, seed, batch_size, lr, pick_device(device), bars,
                              test_manifest, width, size)
    test = f", test accuracy {100 * record['test_accuracy']:.2f}%" if record["test_accuracy"] is not None else ""
    emit(as_json, record, f"pretrained on {record['samples']} {record['dataset']} samples: train accuracy "
                          f"{100 * record['train_accuracy']:.2f}%{test} -> {out} (sha256 {record['weights_sha256'][:12]})")


@app.command()
@handles_errors
def forget(
    ids: Annotated[Optional[Path], typer.Option("--ids", help="CSV with an `id` column (or `owner`: all their samples).")] = None,
    ignore_missing: Annotated[bool, typer.Option(help="Forget the known ids and skip ids not in the index.")] = False,
    resume: Annotated[bool, typer.Option(help="Finish an interrupted forget (no --ids needed).")] = False,
    receipt_ids: Annotated[bool, typer.Option(help="Put the raw ids in the receipt (default: only their keyed hashes, HMAC-SHA256 under the run's secret.key).")] = False,
    run_dir: RunDir = Path("sisa-run"),
    device: Device = "auto",
    executor: ExecutorName = "local",
    ray_address: RayAddress = None,
    gpus_per_task: GpusPerTask = None,
    jobs_per_gpu: JobsPerGpu = None,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the ensemble's test accuracy that ends the command (one pass of the test split through every constituent).")] = False,
    as_json: JsonOut = False,
):
    """Exactly unlearn samples: retrain each affected shard from its earliest affected slice.

    The request is journaled before any training; if the command dies, `sisa forget --resume`
    (or the next forget) finishes it. Each finished request leaves a receipt (`sisa receipts`)."""
    import sisa
    from sisa.requests import open_request_file
    from sisa.run import writer_lock

    if (ids is None) == (not resume):
        raise sisa.UsageError("pass --ids FILE.csv, or --resume to finish an interrupted forget")
    runner = executor_for(executor, ray_address, gpus_per_task, jobs_per_gpu)
    run = sisa.Run.open(run_dir)
    with writer_lock(run.dir, "sisa forget"):
        req = None
        if not resume:
            with open_request_file(ids) as (column, keys):
                req = run.record_request(keys if column == "id" else None, keys if column == "owner" else None,
                                         ignore_missing, receipt_ids)
        load_data(run)
        with ShardProgress(run.config.slices) as bars:
            report = run.resume(device, bars, req=req, executor=runner)
    d = report.to_dict()
    slices = sum(len(v) for v in report.slices_retrained.values())
    unknown = ""
    if report.ids_not_found:
        shown = ", ".join(repr(x) for x in report.ids_not_found_examples)
        more = " ..." if report.ids_not_found > len(report.ids_not_found_examples) else ""
        unknown = f"; {report.ids_not_found} not in the index were skipped: {shown}{more}"
    human = (f"forgot {report.samples_removed} samples"
             + (f" ({report.already_deleted} were already deleted)" if report.already_deleted else "")
             + unknown
             + f": retrained {len(report.shards_retrained)} shards, {slices} slice steps, "
             f"{report.sample_epochs} of {report.full_sample_epochs} sample-epochs "
             f"({100 * report.cost_fraction:.1f}% of retraining everything) in {report.seconds:.1f} s")
    d.update(_accuracy(run, device, not no_eval))
    emit(as_json, d, human + _accuracy_line(d, not no_eval))


@app.command()
@handles_errors
def add(
    dataset: Annotated[Path, typer.Option("--dataset", help="A manifest id,path,label[,owner] of new samples (new ids); images are converted and resized to the run's.")],
    run_dir: RunDir = Path("sisa-run"),
    device: Device = "auto",
    executor: ExecutorName = "local",
    ray_address: RayAddress = None,
    gpus_per_task: GpusPerTask = None,
    jobs_per_gpu: JobsPerGpu = None,
    as_json: JsonOut = False,
):
    """Take in new training samples exactly: each goes to the shard with the fewest live samples,
    at the end of its last slice, and only those shards retrain their last slice step.

    The manifest stays part of the run's data (like the data set it was created from): keep it."""
    import sisa
    from sisa.run import writer_lock

    if not dataset.is_file():
        raise sisa.UsageError(f"manifest not found: {dataset}")
    runner = executor_for(executor, ray_address, gpus_per_task, jobs_per_gpu)
    run = sisa.Run.open(run_dir)
    with writer_lock(run.dir, "sisa add"):
        n, placed, _ = run.record_addition(dataset)
        load_data(run)
        with ShardProgress(run.config.slices) as bars:
            done = run.resume(device, bars, executor=runner)
    payload = {"samples_added": n, "placed": {str(k): v for k, v in sorted(placed.items())},
               "shards_retrained": done.shards_retrained,
               "slices_retrained": {str(k): v for k, v in done.slices_retrained.items()},
               "sample_epochs": done.sample_epochs, "full_sample_epochs": done.full_sample_epochs,
               "seconds": round(done.seconds, 3)}
    emit(as_json, payload, f"added {n} samples to shards {sorted(placed)}: retrained {len(done.shards_retrained)} shards' "
                           f"last slice, {done.sample_epochs} of {done.full_sample_epochs} sample-epochs in {done.seconds:.1f} s")


@app.command()
@handles_errors
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on. Anything but loopback (127.0.0.1, ::1, localhost) needs --token-file.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: a free one, printed at start).")] = 8000,
    token_file: Annotated[Optional[Path], typer.Option("--token-file", help="File holding the bearer token that /forget, /requests and /status require (and /predict off loopback). Without it the server only predicts, on loopback.")] = None,
    batch_window: Annotated[float, typer.Option("--batch-window", help="Seconds to wait after a deletion request for others to join the same retraining.")] = 0.0,
    public_predict: Annotated[bool, typer.Option("--public-predict", help="Answer /predict without the token on a non-loopback host.")] = False,
    run_dir: RunDir = Path("sisa-run"),
    device: RunOn = "auto",
):
    """Serve predictions and deletion requests over HTTP (the serve extra: pip install "sisa[serve]").

    POST /forget journals a request before it answers 202; a background writer retrains in batches, serves the new models, then marks the requests done: once GET /requests/ID says done, no prediction comes from a model that saw their samples. API docs at /docs."""
    from sisa.serve import serve as run_server

    run_server(run_dir, host, port, token_file, batch_window, public_predict, device)


@app.command()
@handles_errors
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files (resized to the run's image size).")],
    aggregation: Annotated[str, typer.Option(help="vote (majority, SISA's default) or mean (of softmax).")] = "vote",
    run_dir: RunDir = Path("sisa-run"),
    as_json: JsonOut = False,
):
    """Predict the class of image files with the ensemble."""
    from sisa.errors import UsageError
    from sisa.run import Run

    # Everything a user can get wrong is checked before the models load (seconds).
    if aggregation not in ("vote", "mean"):
        raise UsageError(f"unknown aggregation {aggregation!r}: use vote or mean")
    Run.open(run_dir).close()
    for p in images:
        if p.is_dir():
            raise UsageError(f"{p} is a directory, not an image file")
        if not p.is_file():
            raise UsageError(f"image not found: {p}")

    import torch
    from sisa import Ensemble
    from sisa.data import read_image

    size = _image_size(run_dir)
    ens = Ensemble.load(run_dir, aggregation)
    batch = torch.stack([read_image(p, ens.config.channels, size) for p in images])
    proba = ens.predict_proba(batch)
    labels = ens.predict(batch).tolist()
    names = ens.config.class_names
    rows = [{"file": str(p), "label": lab, "class": names[lab] if lab < len(names) else str(lab),
             "proba": [round(v, 6) for v in pr.tolist()]} for p, lab, pr in zip(images, labels, proba)]
    table = Table("file", "class", "confidence")
    for r in rows:
        table.add_row(r["file"], r["class"], f"{max(r['proba']):.2f}")
    emit(as_json, {"generation": ens.generation, "aggregation": aggregation, "predictions": rows}, table)


def _image_size(run_dir: Path) -> tuple[int, int]:
    from sisa.run import Run

    run = Run.open(run_dir)
    try:
        return tuple(run.config.image_size) or run.dataset().image_size  # runs made before image_size was recorded
    finally:
        run.close()


@app.command()
@handles_errors
def evaluate(run_dir: RunDir = Path("sisa-run"), device: RunOn = "auto", as_json: JsonOut = False):
    """Test accuracy of each constituent and of the ensemble (majority vote and mean of softmax)."""
    from sisa import evaluate as run_evaluate
    from sisa.run import pick_device

    result = run_evaluate(run_dir, pick_device(device))
    table = Table("model", "test accuracy")
    for shard, acc in result["constituents"].items():
        table.add_row(f"shard {shard}", f"{100 * acc:.2f}%")
    table.add_row("ensemble (vote)", f"{100 * result['ensemble_vote']:.2f}%")
    table.add_row("ensemble (mean)", f"{100 * result['ensemble_mean']:.2f}%")
    emit(as_json, result, table)


@app.command()
@handles_errors
def audit(
    retrain: Annotated[Optional[str], typer.Option(help="Also retrain SHARD (or `all`) from scratch on --device and compare bit for bit (CPU runs match on any CPU; GPU runs on the same GPU type, when trained --deterministic).")] = None,
    repair: Annotated[bool, typer.Option(help="Rebuild corrupt or missing checkpoints from the last good one before them; zero any deleted sample's pixels found in the image cache.")] = False,
    device: Annotated[str, typer.Option("--device", help="Where --retrain and --repair train: cpu, cuda, cuda:N.")] = "cpu",
    run_dir: RunDir = Path("sisa-run"),
    as_json: JsonOut = False,
):
    """Check every live checkpoint: sha256, lineage free of deleted samples, complete chain; and every receipt.

    Exits 0 only when everything holds; each failure is named."""
    from sisa import Run, UsageError
    from sisa.audit import audit as run_audit
    from sisa.run import pick_device, writer_lock

    run = Run.open(run_dir)
    shards = range(run.config.shards)
    if retrain is None:
        chosen: list[int] = []
    elif retrain == "all":
        chosen = list(shards)
    elif retrain.isdigit() and int(retrain) in shards:
        chosen = [int(retrain)]
    else:
        raise UsageError(f"--retrain takes a shard 0..{run.config.shards - 1} or `all`, got {retrain!r}")
    device = pick_device(device)
    if repair:
        with writer_lock(run.dir, "sisa audit --repair"):
            report = run_audit(run, chosen, repair=True, device=device)
    else:
        report = run_audit(run, chosen, device=device)
    lines = [f"repaired: {r}" for r in report.repaired] + [f"FAIL {f}" for f in report.failures]
    verdict = "ok" if report.ok else f"{len(report.failures)} failures"
    emit(as_json, report.to_dict(), "\n".join(lines + [f"audit {verdict}: {report.checks} checks"
                                                       + (f", shards {report.retrained} retrained bit for bit" if report.retrained else "")]))
    if not report.ok:
        raise typer.Exit(1)


@app.command()
@handles_errors
def receipts(
    sample_id: Annotated[Optional[str], typer.Option("--id", help="Only the receipts that record this id as deleted "
                                                     "(answers 'was my id deleted?'; needs the run's secret.key).")] = None,
    run_dir: RunDir = Path("sisa-run"),
    as_json: JsonOut = False,
):
    """List the deletion receipts of finished requests, each checked against its sha256."""
    from sisa import Run
    from sisa.receipts import receipts_naming, verify_receipt

    run = Run.open(run_dir)
    requests = run.index.requests()
    if sample_id is not None:
        naming = set(receipts_naming(run.dir, [run.dir / r.receipt_path for r in requests if r.receipt_path], sample_id))
        requests = [r for r in requests if r.receipt_path and run.dir / r.receipt_path in naming]
    rows = []
    for req in requests:
        path = run.dir / req.receipt_path if req.receipt_path else None
        rows.append({"request_id": req.id, "status": req.status, "samples_deleted": req.n_samples,
                     "created_at": req.created_at.isoformat() + "Z",
                     "finished_at": req.finished_at.isoformat() + "Z" if req.finished_at else None,
                     "receipt": str(path) if path else None, "receipt_sha256": req.receipt_sha256,
                     "intact": path is not None and verify_receipt(path, req.receipt_sha256) is None})
    lines = [f"request {r['request_id']}: {r['status']}, {r['samples_deleted']} deleted, finished "
             f"{r['finished_at'] or '-'}, {r['receipt'] or 'no receipt'} (sha256 {(r['receipt_sha256'] or '-')[:16]}, "
             + ("intact)" if r["intact"] else "NOT INTACT)") for r in rows]
    emit(as_json, {"receipts": rows}, "\n".join(lines) or ("no receipt names that id" if sample_id else "no requests"))


@app.command()
@handles_errors
def status(run_dir: RunDir = Path("sisa-run"), as_json: JsonOut = False):
    """What the index holds: configuration, samples, checkpoints, requests."""
    from sisa import Run

    run = Run.open(run_dir)
    try:
        st = run.status()
    finally:
        run.close()
    c = st["config"]
    human = (f"run {st['run_dir']}: {st['dataset']}, {c['shards']} shards x {c['slices']} slices, "
             f"{c['epochs']} epochs, {c['arch']}, {c.get('precision', 'fp32')}"
             + (", deterministic" if c.get("deterministic") else "")
             + (", momentum reset per slice" if c.get("reset_momentum") else ", momentum carried across slices")
             + (", full batches" if c.get("batching") == "full" else "")
             + f", seed {c['seed']}, generation {st['generation']}\n"
             f"samples: {st['samples']['active']} active, {st['samples']['deleted']} deleted\n"
             f"checkpoints: {st['checkpoints']['live']}/{st['checkpoints']['expected']} live, "
             + ("complete" if st["complete"] else f"incomplete (shards {sorted(st['stale_shards'])}: "
                + (f"`{st['writer']['command']}` (pid {st['writer']['pid']}) is working on them)" if st["writer"]
                   else f"run `{_resume_command(st)}`)"))
             + f"\nrequests: {st['requests']['total']}, {st['requests']['unfinished']} unfinished"
             + "".join(f"\nimage cache ({split}): {c['file']}, {' x '.join(map(str, c['shape']))} uint8, "
                       f"{c['bytes'] / 1e6:,.1f} MB, decoded in {c['decode_seconds']:.1f} s on {c['workers']} processes"
                       for split, c in st["image_cache"].items()))
    emit(as_json, st, human)


def _resume_command(status: dict) -> str:
    return "sisa forget --resume" if status["requests"]["unfinished"] else "sisa train --resume"


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"sisa {version('sisa')}")
        except PackageNotFoundError:
            typer.echo("sisa (not installed)")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                   help="Print the version and exit.")] = False) -> None:
    """Exact machine unlearning with SISA (sharded, isolated, sliced, aggregated training)."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
