"""Public-backbone mode: a frozen trunk shared by every shard, only the layers on top trained per shard.

Frozen-trunk SISA (SISA-FC/A, Kumar et al. 2022; S3T, ICLR 2025): when a good trunk can be learned
from data nobody will ever ask to erase (a public dataset, or published weights), each shard only
needs to train the layers on top (`trainable`):

    all      the whole ResNet-18, as without this mode
    layer4   layer4 + fc;  trunk = conv1, bn1, layer1..layer3        features (N, 256, H, W)
    fc       fc only;      trunk = everything up to avgpool + flatten  features (N, 512)

Exactness is unchanged: the trunk is a constant of the run (the same tensors in every constituent,
never trained), so a constituent is still a deterministic function of (config, trunk, retained
ids). Forgetting retrains only the small part on top, and the trunk's features of the training set
can be computed once and reused.

Building blocks here, in the order a run uses them:
    load_init_file      an init weights file -> (state dict, sha256)
    initial_weights     the full state a shard starts from, and which tensors the file did not give
    build_parts         the model split into a frozen Trunk and a trainable Head
    build_head          the Head alone (an fc head without building the network)
    compute_features    the trunk's features of a whole image tensor, in canonical chunks
    pretrain            one monolithic ResNet-18 trained on a dataset the user declares public
"""
from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import SisaError, UsageError
from .model import build_model, to_input
from .partition import derive_seed

TRAINABLE = ("all", "layer4", "fc")

# torchvision's ResNet forward, stage by stage (flatten is torch.flatten(x, 1) there, a module here).
# A part is a contiguous run of these; `_HEAD_STARTS` says where the trainable part begins.
_STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "flatten", "fc")
_HEAD_STARTS = {"all": "conv1", "layer4": "layer4", "fc": "fc"}


def _check_trainable(trainable: str) -> None:
    if trainable not in TRAINABLE:
        raise UsageError(f"unknown trainable part {trainable!r}: use one of {', '.join(TRAINABLE)}")


def is_trainable(name: str, trainable: str) -> bool:
    """Whether state-dict entry `name` belongs to the part each shard trains."""
    _check_trainable(trainable)
    if trainable == "all":
        return True
    return name.split(".", 1)[0] in _STAGES[_STAGES.index(_HEAD_STARTS[trainable]):]


def trunk_keys(state_dict_keys: Iterable[str], trainable: str) -> set[str]:
    """The names among `state_dict_keys` that belong to the frozen trunk (empty for "all")."""
    return {k for k in state_dict_keys if not is_trainable(k, trainable)}


# --- init weights files ------------------------------------------------------------------

def _resnet18_names() -> set[str]:
    """ResNet-18's state-dict names (they do not depend on channels or classes). Built on the meta
    device: no memory, no initialisation, and no draw from the global RNG."""
    with torch.device("meta"):
        return set(build_model("resnet18", 3, 10).state_dict())


def load_init_file(path: Path | str) -> tuple[dict[str, torch.Tensor], str]:
    """Read an init weights file: (state dict, sha256 of the file's bytes).

    Accepts a bare state dict (torchvision's `resnet18(weights=...).state_dict()` saved with
    torch.save, or what `pretrain` writes) or a sisa checkpoint (a dict whose "model" is one).
    The bytes hashed are the bytes loaded, so the hash names exactly the weights used. Every way a
    file can be wrong is a one-line SisaError: the CLI must never show a traceback for one.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"init weights file {path} does not exist")
    if path.is_dir():
        raise UsageError(f"{path} is a directory, not an init weights file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    sha = hashlib.sha256(data).hexdigest()
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise beside our own error
            warnings.simplefilter("ignore")
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip, EOF, magic-number and weights-only errors all land here
        raise SisaError(f"{path} is not a weights file ({_why_unloadable(e, data)})") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]  # a sisa checkpoint: {"model": ..., "optimizer": ...}
    if not (isinstance(obj, Mapping) and obj
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())):
        raise SisaError(f"{path} does not hold a state dict (a mapping of names to tensors); "
                        f"found {type(obj).__name__}")
    state = dict(obj)
    # Judge the architecture on the trunk (everything but fc): that is what an init file is for,
    # and a checkpoint for another number of classes differs only in fc.
    reference = {k for k in _resnet18_names() if not k.startswith("fc.")}
    matched = len(reference & state.keys())
    if matched < len(reference) / 2:  # none at all, or a few by coincidence
        example = next(iter(state))
        raise SisaError(f"{path} does not hold ResNet-18 weights: {matched} of ResNet-18's {len(reference)} "
                        f"trunk tensor names are in it (its first is {example!r})")
    return state, sha


def _why_unloadable(e: Exception, data: bytes) -> str:
    """torch.load's errors run to many lines of advice about weights_only; say it in a few words."""
    if "Weights only load failed" in str(e):
        return "it pickles Python objects besides tensors, which are not loaded; save a model's state_dict()"
    if data[:4] == b"PK\x03\x04":  # torch.save's zip archive, cut short or damaged
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        return f"damaged or truncated: {first[:100]}"
    return "not written by torch.save"


# --- initial weights ---------------------------------------------------------------------

def initial_weights(arch: str, channels: int, classes: int, seed: int, shard: int, trainable: str,
                    init_state: Mapping[str, torch.Tensor] | None = None, width: int = 64,
                    trainable_only: bool = False) -> tuple[dict, list[str]]:
    """The full state dict shard `shard` starts from, and the names NOT taken from `init_state`
    (all names when there is none), in state-dict order.

    Every tensor whose name and shape fit is copied from `init_state`, trunk or trainable,
    num_batches_tracked included. The others are drawn:
      - "all": everything from (seed, "init", shard), exactly as sisa.training.initial_state, so
        with no init_state this is that function's ["model"], bit for bit;
      - "layer4"/"fc": the trunk from (seed, "init", "trunk"), one draw shared by all shards (the
        frozen trunk must be identical in every constituent), the trainable part from
        (seed, "init", shard).
    Drawing builds a whole model under the seed, so a trainable tensor is what "all" would draw.
    `trainable_only`: only the trainable part (what a shard's training starts from), which spares
    drawing the trunk.
    """
    _check_trainable(trainable)
    init_state = init_state or {}
    wanted = [k for k in _shapes(arch, channels, classes, width) if not trainable_only or is_trainable(k, trainable)]
    if not set(wanted) & set(unfitted(arch, channels, classes, init_state, width)):
        # The file gives every tensor asked for (a `sisa pretrain` backbone's fc, say): nothing to
        # draw, and drawing a ResNet-18 costs a forget from slice 0 a noticeable part of its time.
        return {k: init_state[k].detach().to("cpu", torch.float32 if init_state[k].is_floating_point()
                                             else init_state[k].dtype, copy=True) for k in wanted}, []
    drawn = _drawn_state(arch, channels, classes, derive_seed(seed, "init", shard), width)
    if trainable_only:
        drawn = {k: v for k, v in drawn.items() if is_trainable(k, trainable)}
    elif trainable != "all":
        trunk = _drawn_state(arch, channels, classes, derive_seed(seed, "init", "trunk"), width)
        drawn = {k: v if is_trainable(k, trainable) else trunk[k] for k, v in drawn.items()}
    state, missing = {}, []
    for name, fresh in drawn.items():
        given = init_state.get(name)
        if given is not None and given.shape == fresh.shape:
            # A copy in the model's dtype: a half-precision file still gives float32 weights, and
            # callers may change the result without touching the init state shared by all shards.
            state[name] = given.detach().to("cpu", fresh.dtype, copy=True)
        else:
            state[name] = fresh
            missing.append(name)
    return state, missing


def _drawn_state(arch: str, channels: int, classes: int, seed: int, width: int = 64) -> dict:
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        torch.manual_seed(seed)
        return build_model(arch, channels, classes, width).state_dict()


def _shapes(arch: str, channels: int, classes: int, width: int = 64) -> dict[str, torch.Size]:
    """The model's state-dict shapes, from a model built on the meta device (no weights, no RNG draws)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in build_model(arch, channels, classes, width).state_dict().items()}


def unfitted(arch: str, channels: int, classes: int, init_state: Mapping[str, torch.Tensor], width: int = 64) -> list[str]:
    """The names `initial_weights` would draw rather than take from `init_state` (cheap)."""
    return [k for k, shape in _shapes(arch, channels, classes, width).items()
            if k not in init_state or init_state[k].shape != shape]


def describe_init(missing: list[str]) -> str:
    """One short line about the tensors an init file did not give, grouped by top-level module:
    "conv1.weight, fc.weight, fc.bias initialised from the seed"."""
    if not missing:
        return "every tensor taken from the init file"
    groups: dict[str, list[str]] = {}
    for name in missing:
        groups.setdefault(name.split(".", 1)[0], []).append(name)
    parts = []
    for module, names in groups.items():
        parts.extend(names if len(names) <= 3 else [f"{module}.* ({len(names)} tensors)"])
    return f"{', '.join(parts)} initialised from the seed"


# --- the model split in two --------------------------------------------------------------

class Trunk(nn.Sequential):
    """The frozen lower stages. Takes uint8 images (or floats in [0, 1]), returns features.

    Always in eval mode: batch norm in a frozen trunk must use its stored statistics and never
    update them, or the trunk would drift with each shard's data and stop being shared.

    Its convolutions always run channels-last, on a batch of at least two: on CPU (oneDNN) the
    kernel, and with it the rounding, depends on the memory format, and a batch of one takes yet
    another path (see "Features" below). Pinning both makes a row's features the same bits
    whichever rows share its batch, as measured.
    """

    def __init__(self, stages: OrderedDict[str, nn.Module]):
        super().__init__(stages)
        for p in self.parameters():
            p.requires_grad_(False)
        self.to(memory_format=torch.channels_last)  # 4-D weights; load_state_dict keeps the layout
        super().train(False)

    def train(self, mode: bool = True) -> "Trunk":
        return super().train(False)  # also what eval() and a parent's train() call

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_input(images)
        if len(self) == 0:  # "all": nothing is frozen; the input exactly as the full model gets it
            return x
        x = x.contiguous(memory_format=torch.channels_last)
        if len(x) == 1:  # run a lone row as two copies of itself and keep one
            return super().forward(x.expand(2, -1, -1, -1).contiguous(memory_format=torch.channels_last))[:1]
        return super().forward(x)


class Head(nn.Sequential):
    """The trainable upper stages: features -> logits."""


def build_parts(arch: str, channels: int, classes: int, trainable: str,
                state: Mapping[str, torch.Tensor] | None = None, width: int = 64) -> tuple[Trunk, Head]:
    """The model as (Trunk, Head), optionally loaded with a full-model `state`. Their state_dict
    names are the full model's, so a full state dict splits by name (`trunk_keys`) and the two
    halves' states together are a full model's state again. For "all" the trunk only scales
    inputs and the head is the whole network."""
    _check_trainable(trainable)
    model = build_model(arch, channels, classes, width)
    if state is not None:
        model.load_state_dict(state)
    modules = {name: getattr(model, name) if name != "flatten" else nn.Flatten(1) for name in _STAGES}
    cut = _STAGES.index(_HEAD_STARTS[trainable])
    return (Trunk(OrderedDict((n, modules[n]) for n in _STAGES[:cut])),
            Head(OrderedDict((n, modules[n]) for n in _STAGES[cut:])))


def build_head(arch: str, channels: int, classes: int, trainable: str, width: int = 64) -> Head:
    """`build_parts(...)[1]`, the trainable part, for a state dict to be loaded into. For "fc",
    the one Linear it is, built alone: building the network imports torchvision, about 2 s of a
    head forget's start-up on the 2-core CPU, when the head takes milliseconds to retrain.
    (tests/test_backbone.py holds both the same.)"""
    _check_trainable(trainable)
    if trainable == "fc" and arch == "resnet18":
        return Head(OrderedDict(fc=nn.Linear(width * 8, classes)))
    return build_parts(arch, channels, classes, trainable, width=width)[1]


# --- features ----------------------------------------------------------------------------

# Does a sample's feature depend on which other samples share its batch? Measured on CPU (torch
# 2.14.1, oneDNN, 1 and 2 threads; 1x8x8, 1x28x28 and 3x32x32 inputs; "fc" and "layer4"):
#   - within one memory format, batches of 2 or more give every row the same bits, whatever else
#     is in the batch;
#   - a batch of ONE takes another convolution path in layer1..layer4 and differs by ~2e-6;
#   - the memory format matters too, and for 1-channel images it follows the input's strides:
#     digits' uint8 tensor (strides (64, 1, 8, 1)) ran channels-last, a freshly stacked one
#     (64, 64, 8, 1) ran contiguous, with different bits.
# Trunk pins both (channels-last weights and inputs, a lone row run as two copies); with that,
# every chunking and every input layout measured gave identical bits (test_backbone checks it).
# That is a measurement, not a guarantee (and not measured on a GPU, where cuDNN may pick its
# algorithm by batch shape), so the rule for exactness stays: compute features once, with these
# canonical chunks, over the WHOLE training set in row order, and take a shard's rows from that
# tensor. A forgotten sample's feature row is derived from the sample: a stored copy must go with it.
FEATURE_BATCH = 256


@torch.no_grad()
def compute_features(trunk: Trunk, images: torch.Tensor, batch_size: int = FEATURE_BATCH,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """The trunk's features of `images` (uint8 (N, C, H, W)): float32, on the CPU, contiguous
    (one layout for whatever trains on them), in row order, computed in the fixed chunks
    [0, b), [b, 2b), ... of b = batch_size rows."""
    trunk = trunk.to(device).eval()
    chunks = torch.split(images, batch_size) if len(images) else (images,)
    return torch.cat([trunk(c.to(device)).float().cpu() for c in chunks]).contiguous()


def build_trunk(cfg, init: Mapping[str, torch.Tensor] | None) -> Trunk:
    """A run's frozen trunk (cfg: a sisa.config.RunConfig with a frozen `trainable`): the init
    file's tensors where they fit, the rest drawn from (seed, "init", "trunk"), as in every shard."""
    state, _ = initial_weights(cfg.arch, cfg.channels, cfg.classes, cfg.seed, 0, cfg.trainable, init, cfg.width)
    return build_parts(cfg.arch, cfg.channels, cfg.classes, cfg.trainable, state, cfg.width)[0]


def trunk_features(cfg, init: Mapping[str, torch.Tensor] | None, images: torch.Tensor) -> torch.Tensor:
    """The run's cached features of `images`: its trunk, in the canonical chunks."""
    return compute_features(build_trunk(cfg, init), images)


# --- pretraining a public trunk ------------------------------------------------------------

def pretrain(dataset: str, data_dir: Path | str, out: Path | str, epochs: int, seed: int = 0,
             batch_size: int = 64, lr: float = 0.05, device: torch.device | str = "cpu", progress=None,
             test_manifest: Path | str | None = None, width: int = 64, size: tuple[int, int] | None = None) -> dict:
    """Train one monolithic ResNet-18 on `dataset`, which the user declares public, and write its
    weights to `out` (a bare state dict, torchvision's names) and a JSON record to out.with_suffix(".json").

    It is the project's own training (run_shard_job on one shard of one slice), not a second loop:
    the same recipe, seeds and determinism. Nothing learned here can be unlearned later, which is
    why the data must be public. `size` (H, W): every image resized to it (--image-size), recorded
    in the record's config. Returns the JSON record.
    """
    # Imported here, not at the top: run.py will import this module for initial_weights.
    from .data import load_dataset
    from .run import _fit_to_data, config_for
    from .training import ShardJob, initial_state, run_shard_job
    from store.checkpoints import write_atomic

    out = Path(out)
    record_path = out.with_suffix(".json")
    if out.is_dir():
        raise UsageError(f"{out} is a directory: give a file name for the weights")
    if not out.parent.is_dir():
        raise UsageError(f"folder {out.parent} does not exist")
    if record_path == out or record_path.is_dir():
        raise UsageError(f"cannot write the record beside {out} as {record_path}: choose a name ending in .pt")
    cfg = config_for(dataset, shards=1, slices=1, epochs=epochs, seed=seed, batch_size=batch_size, lr=lr, width=width,
                     resize=tuple(size) if size else None)
    cfg.validate()
    data = load_dataset(dataset, data_dir, test_manifest=test_manifest, size=cfg.resize or None)
    cfg = _fit_to_data(cfg, data)  # channels, classes, ... exactly as a run records them
    train = data.train
    if len(train) < 2:
        raise UsageError(f"{dataset} has {len(train)} training samples: pretraining needs at least 2")

    start = time.perf_counter()
    job = ShardJob(0, 0, [list(range(len(train)))], [list(train.ids)])
    *_, last = run_shard_job(cfg, job, initial_state(cfg, 0), train.images, train.labels, device, progress)
    weights = last.state["model"]
    seconds = time.perf_counter() - start

    buf = io.BytesIO()
    torch.save(weights, buf)
    blob = buf.getvalue()
    model = build_model(cfg.arch, cfg.channels, cfg.classes, cfg.width)
    model.load_state_dict(weights)
    test = data.test if data.test is not None and len(data.test) else None
    record = {
        "dataset": data.name,
        "dataset_hash": hashlib.sha256("".join(train.sample_hashes()).encode()).hexdigest(),
        "samples": len(train),
        "config": json.loads(cfg.to_json()),
        "epochs": epochs,
        "seed": seed,
        "train_accuracy": _accuracy(model, train.images, train.labels, device),
        "test_accuracy": _accuracy(model, test.images, test.labels, device) if test else None,
        "weights": out.name,
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
        "torch": torch.__version__,
        "device": str(device),
        "seconds": round(seconds, 3),  # training only
    }
    write_atomic(out, blob)
    write_atomic(record_path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return record


@torch.no_grad()
def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device, batch_size: int = 1024) -> float:
    model = model.to(device).eval()
    correct = sum(int((model(to_input(x.to(device))).argmax(-1).cpu() == y).sum())
                  for x, y in zip(torch.split(images, batch_size), torch.split(labels, batch_size)))
    return correct / len(labels)
