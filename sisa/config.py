"""Run configuration: everything that decides what a SISA run trains.

Training is a deterministic function of (this config, the retained sample ids). `config_hash`
covers exactly the fields that change the learned weights, so a checkpoint's lineage can name
the recipe that produced it. Where the data lives and which device runs it are not part of it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RunConfig:
    # data
    dataset: str = "digits"  # digits | mnist | fashion-mnist | cifar10 | a CSV manifest | a class-folder tree
    resize: tuple[int, ...] = field(default_factory=tuple)  # (H, W): --image-size, every image resized at load
    # SISA layout
    shards: int = 5  # S: disjoint shards, one constituent model each
    slices: int = 4  # R: incremental slices per shard, one checkpoint after each
    epochs: int = 12  # e: epochs an unsliced shard would get; slicing spreads 2R/(R+1)*e over slices
    # (12, not 16 as before issue 12: as accurate on digits, a third less time; benchmarks/cpu_default.py)
    # model
    arch: str = "resnet18"
    width: int = 64  # channels of the stem and layer1 (torchvision's ResNet-18: 64); layers 2-4 double it
    # public backbone: start from an init weights file (its sha256 names it) and train only a part
    trainable: str = "all"  # all | layer4 | fc: with layer4 or fc the trunk below is frozen and shared
    init_sha256: str = ""  # sha256 of the init weights file; "" draws every weight from the seed
    # optimiser: SGD with Nesterov momentum; per slice, lr warms up linearly then decays to 0
    batch_size: int = 64
    # How an epoch is cut into batches. "split": ceil(n / batch_size) near-equal batches, every
    # sample once. "full": batches of exactly batch_size, an epoch's incomplete last batch left out
    # (each epoch's order is random, so which samples sit out changes), fewer than batch_size
    # samples making one batch. On a GPU every new batch shape costs cuDNN a plan for each
    # convolution; with "split" every slice step, and every forget (one sample shorter), brings
    # new shapes, with "full" a whole run has one (benchmarks/gpu.py measures both). On a CPU,
    # full batches save time by training less (a small shard takes fewer, larger steps): on digits
    # a fifth less time, as accurate at width 64 but 3.1 points less at width 16 (94.4% against
    # 97.5%, two seeds; benchmarks/batching.py). So split stays the default.
    batching: str = "split"
    lr: float = 0.05  # peak learning rate
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup: float = 0.2  # fraction of each slice's steps spent warming up
    # each slice step starts with zero momentum (its learning rate warms up from zero anyway), so
    # checkpoints hold the weights alone: half the bytes of weights + momentum (a ResNet-18's 89 MB
    # become 45 MB), which is what a GPU run waits on. The default since issue 12: on an H100 it
    # trained SISA 1.19x against 1.31x monolithic time, at 85.1% against 77.9% on Fashion-MNIST;
    # on digits as accurate (benchmarks/cpu_default.py). Runs made before it carried momentum.
    reset_momentum: bool = True
    label_smoothing: float = 0.0
    # arithmetic: bf16 autocast with channels_last (fast on GPUs) or plain fp32; `deterministic`
    # asks CUDA for deterministic kernels, so a forget equals a retrain bit for bit on one GPU type
    precision: str = "fp32"  # fp32 | bf16
    deterministic: bool = False
    # augmentation, done on whole batches on the training device
    crop_pad: int = 1  # random-crop padding in pixels (0: no crop)
    flip: bool = False  # random horizontal flip (wrong for digits, right for clothes and CIFAR)
    seed: int = 0
    # set from the data when the run is created, so the index records what was trained
    channels: int = 0
    classes: int = 0
    class_names: tuple[str, ...] = field(default_factory=tuple)
    image_size: tuple[int, ...] = field(default_factory=tuple)  # (H, W)
    feature_shape: tuple[int, ...] = field(default_factory=tuple)  # a frozen trunk's output per sample

    def training_fields(self) -> dict:
        """The fields that change the learned weights (dataset identity is hashed separately)."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("dataset", "class_names", "image_size", "feature_shape")}
        # Added later: at the value every run had before a field existed, it is left out, so older
        # runs keep their hash (LEGACY: for reset_momentum that is no longer the default).
        for name, legacy in LEGACY.items():
            if fields[name] == legacy:
                del fields[name]
        return fields

    @property
    def frozen(self) -> bool:
        """A frozen trunk: shards train only `trainable` on cached features."""
        return self.trainable != "all"

    @property
    def config_hash(self) -> str:
        blob = json.dumps(self.training_fields(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        raw = json.loads(text)
        raw["class_names"] = tuple(raw.get("class_names", ()))
        raw["image_size"] = tuple(raw.get("image_size", ()))
        raw["resize"] = tuple(raw.get("resize", ()))
        raw["feature_shape"] = tuple(raw.get("feature_shape", ()))
        for name, legacy in LEGACY.items():  # a run recorded before the field existed had its legacy value
            raw.setdefault(name, legacy)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def validate(self) -> None:
        from .errors import UsageError

        for name in ("shards", "slices", "epochs", "batch_size", "width"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UsageError(f"--lr must be positive, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise UsageError(f"warmup must be in [0, 1), got {self.warmup}")
        if self.resize and (len(self.resize) != 2 or min(self.resize) < 1):
            raise UsageError(f"--image-size must be N or HxW with positive sizes, got {self.resize}")
        if self.crop_pad < 0:
            raise UsageError(f"crop padding must be >= 0, got {self.crop_pad}")
        if self.batching not in BATCHINGS:
            raise UsageError(f"--batching must be one of {', '.join(BATCHINGS)}, got {self.batching!r}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.trainable not in ("all", "layer4", "fc"):
            raise UsageError(f"--trainable must be all, layer4 or fc, got {self.trainable!r}")
        if self.frozen and (self.crop_pad or self.flip):
            raise UsageError(f"--trainable {self.trainable} trains on features computed once, so it takes no "
                             "augmentation: pass --crop-pad 0 --no-flip")


PRECISIONS = ("fp32", "bf16")
BATCHINGS = ("split", "full")
# Fields added after runs existed, with the value those runs had: left out of the config hash at
# that value, and what a recorded configuration without the field means.
LEGACY = {"width": 64, "trainable": "all", "init_sha256": "", "precision": "fp32", "deterministic": False,
          "resize": (), "reset_momentum": False, "batching": "split"}


def parse_image_size(text: str | int | tuple) -> tuple[int, int]:
    """`--image-size`: N (square) or HxW, as (H, W)."""
    if isinstance(text, (tuple, list)):
        text = "x".join(str(v) for v in text)
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", str(text))
    size = (int(m.group(1)), int(m.group(2) or m.group(1))) if m else None
    if size is None or min(size) < 1 or max(size) > 4096:
        from .errors import UsageError

        raise UsageError(f"--image-size takes N or HxW in pixels, 1 to 4096 (e.g. 32 or 24x32), got {text!r}")
    return size


# Per-dataset defaults for augmentation: digits must not be flipped; clothes and CIFAR may.
AUGMENT_DEFAULTS = {
    "digits": dict(crop_pad=1, flip=False),
    "mnist": dict(crop_pad=2, flip=False),
    "fashion-mnist": dict(crop_pad=2, flip=True),
    "cifar10": dict(crop_pad=4, flip=True),
}


def slice_epochs(slices: int, epochs: int) -> list[int]:
    """Epochs for each incremental slice step, SISA's rule without starving any slice.

    Bourtoule et al. (sec. IV-C): an unsliced shard trained for e epochs costs as many
    sample-epochs as R incremental steps sharing e' = 2R/(R+1) * e epochs. The reference
    implementation floors e'/R per slice, so small e gives some slices zero epochs; here the
    rounded total is spread as evenly as possible, every slice gets at least one, and the
    remainder goes to the last slices, whose checkpoints are the ones that serve.
    """
    total = max(slices, round(2 * slices / (slices + 1) * epochs))
    base, extra = divmod(total, slices)
    return [base + (1 if i >= slices - extra else 0) for i in range(slices)]


def epoch_batches(n: int, batch_size: int, batching: str) -> list[int]:
    """The sizes of one epoch's consecutive batches over n samples in random order (see
    RunConfig.batching); their sum is the samples the epoch trains on."""
    if batching == "full" and n >= batch_size:
        return [batch_size] * (n // batch_size)
    k = -(-n // batch_size)
    base, extra = divmod(n, k) if k else (0, 0)
    return [base + 1] * extra + [base] * (k - extra)  # torch.tensor_split's sizes: the larger first


def step_sample_epochs(cfg: RunConfig, n: int, epochs: int) -> int:
    """Samples a slice step over n samples trains on, summed over its epochs: the work a forget's
    cost and a run's receipts count. Fewer than 2 samples train nothing (batch norm cannot
    train on one)."""
    return epochs * sum(epoch_batches(n, cfg.batch_size, cfg.batching)) if n >= 2 else 0


def constituent_steps(cfg: RunConfig, slice_sizes: list[int]) -> int:
    """Optimiser steps a shard with these slice sizes takes over its R slice steps (step i trains
    slice_epochs(R, e)[i] epochs on slices 0..i, in the batches cfg.batching cuts)."""
    epochs, prefix, steps = slice_epochs(cfg.slices, cfg.epochs), 0, 0
    for e, size in zip(epochs, slice_sizes):
        prefix += size
        steps += e * len(epoch_batches(prefix, cfg.batch_size, cfg.batching)) if prefix >= 2 else 0
    return steps
