"""Public-backbone building blocks: init files, initial weights, the trunk/head split, features, pretraining."""
from __future__ import annotations

import hashlib
import json
import pickle

import pytest
import torch
import torchvision
from torch import nn

from sisa.backbone import (TRAINABLE, build_head, build_parts, compute_features, describe_init, initial_weights, is_trainable,
                           load_init_file, pretrain, trunk_keys)
from sisa.config import RunConfig
from sisa.data import load_digits
from sisa.errors import SisaError, UsageError
from sisa.model import build_model, to_input
from sisa.training import initial_state

ARCH = ("resnet18", 1, 10)  # digits: one channel, ten classes


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def random_bn_state(seed: int = 0) -> dict:
    """A full state with non-trivial batch-norm statistics, so eval-mode equality means something."""
    g = torch.Generator().manual_seed(seed)
    state, _ = initial_weights(*ARCH, seed=seed, shard=0, trainable="all")
    for k, v in state.items():
        if k.endswith("running_mean"):
            v.normal_(0, 0.1, generator=g)
        elif k.endswith("running_var"):
            v.uniform_(0.5, 2.0, generator=g)
    return state


def save(obj, path):
    torch.save(obj, path)
    return path


# --- initial weights ---------------------------------------------------------------------

def test_all_without_init_file_is_todays_initial_state():
    cfg = RunConfig(shards=3, seed=7, channels=1, classes=10)
    before = torch.random.get_rng_state()
    state, missing = initial_weights(*ARCH, seed=7, shard=2, trainable="all")
    assert torch.equal(before, torch.random.get_rng_state())  # no global RNG draw leaks
    today = initial_state(cfg, 2)["model"]
    assert list(state) == list(today) and missing == list(today)
    assert all(torch.equal(state[k], today[k]) and state[k].dtype == today[k].dtype for k in today)


@pytest.mark.parametrize("trainable", ["fc", "layer4"])
def test_frozen_trunk_is_shared_and_the_head_is_per_shard(trainable):
    s0, _ = initial_weights(*ARCH, seed=7, shard=0, trainable=trainable)
    s1, _ = initial_weights(*ARCH, seed=7, shard=1, trainable=trainable)
    alone1, _ = initial_weights(*ARCH, seed=7, shard=1, trainable="all")
    trunk = trunk_keys(s0, trainable)
    assert trunk and "conv1.weight" in trunk and "fc.weight" not in trunk
    assert all(torch.equal(s0[k], s1[k]) for k in trunk)
    assert not torch.equal(s0["fc.weight"], s1["fc.weight"])
    if trainable == "layer4":
        assert not torch.equal(s0["layer4.0.conv1.weight"], s1["layer4.0.conv1.weight"])
    # the trainable part is what "all" draws for that shard; the trunk is not
    assert all(torch.equal(s1[k], alone1[k]) for k in s1 if k not in trunk)
    assert not torch.equal(s1["conv1.weight"], alone1["conv1.weight"])
    other_seed, _ = initial_weights(*ARCH, seed=8, shard=0, trainable=trainable)
    assert not torch.equal(s0["conv1.weight"], other_seed["conv1.weight"])


def test_init_from_torchvision_imagenet_shapes(tmp_path):
    """A torchvision ResNet-18 (7x7 3-channel stem, 1000 classes): every fitting tensor is taken,
    num_batches_tracked included; the stem and classifier are drawn, and said so."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        source = torchvision.models.resnet18(num_classes=1000).state_dict()
    source["layer2.0.bn1.num_batches_tracked"].fill_(1234)
    path = save(source, tmp_path / "resnet18.pth")
    loaded, sha = load_init_file(path)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    for trainable in TRAINABLE:
        state, missing = initial_weights(*ARCH, seed=0, shard=3, trainable=trainable, init_state=loaded)
        assert missing == ["conv1.weight", "fc.weight", "fc.bias"]
        assert all(torch.equal(state[k], source[k]) for k in state if k not in missing)
        assert int(state["layer2.0.bn1.num_batches_tracked"]) == 1234
        assert state["conv1.weight"].shape == (64, 1, 3, 3) and state["fc.weight"].shape == (10, 512)
    assert describe_init(missing) == "conv1.weight, fc.weight, fc.bias initialised from the seed"
    # the result is a copy: changing it leaves the shared init state alone
    state["layer1.0.conv1.weight"].zero_()
    assert torch.equal(loaded["layer1.0.conv1.weight"], source["layer1.0.conv1.weight"])


def test_init_from_sisa_checkpoint(tmp_path):
    cfg = RunConfig(seed=3, channels=1, classes=10)
    path = save(initial_state(cfg, 0), tmp_path / "shard-0.pt")  # {"model": ..., "optimizer": None}
    loaded, _ = load_init_file(path)
    state, missing = initial_weights(*ARCH, seed=0, shard=1, trainable="layer4", init_state=loaded)
    assert missing == [] and all(torch.equal(state[k], loaded[k]) for k in state)
    assert describe_init([]) == "every tensor taken from the init file"


def test_describe_init_groups_large_modules():
    names = list(build_model(*ARCH).state_dict())
    layer4 = [k for k in names if k.startswith("layer4.")]
    line = describe_init(["conv1.weight", *layer4, "fc.weight", "fc.bias"])
    assert line == f"conv1.weight, layer4.* ({len(layer4)} tensors), fc.weight, fc.bias initialised from the seed"


def test_trainable_names():
    assert is_trainable("fc.weight", "fc") and not is_trainable("layer4.0.conv1.weight", "fc")
    assert is_trainable("layer4.1.bn2.running_var", "layer4") and not is_trainable("layer3.0.conv1.weight", "layer4")
    assert is_trainable("conv1.weight", "all") and trunk_keys(["conv1.weight", "fc.bias"], "all") == set()
    assert trunk_keys(["conv1.weight", "fc.bias", "layer4.0.bn1.weight"], "layer4") == {"conv1.weight"}
    with pytest.raises(UsageError, match="unknown trainable part 'layer3'"):
        is_trainable("fc.weight", "layer3")


# --- init file errors ----------------------------------------------------------------------

def _truncated(path):
    save(build_model(*ARCH).state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_FILES = {
    "text": (lambda p: p.write_text("these are not weights\n"), SisaError, "is not a weights file"),
    "empty": (lambda p: p.write_bytes(b""), SisaError, "is not a weights file"),
    "truncated": (_truncated, SisaError, "is not a weights file"),
    "pickled list": (lambda p: p.write_bytes(pickle.dumps([1, 2, 3])), SisaError, "is not a weights file"),
    "torch-saved list": (lambda p: save([torch.zeros(2)], p), SisaError, "does not hold a state dict"),
    "mixed values": (lambda p: save({"w": torch.zeros(2), "step": 3}, p), SisaError, "does not hold a state dict"),
    "other architecture": (lambda p: save(nn.Linear(4, 2).state_dict(), p), SisaError, "does not hold ResNet-18"),
    "half a resnet": (lambda p: save({k: v for k, v in build_model(*ARCH).state_dict().items()
                                      if k.startswith(("conv1", "layer1"))}, p), SisaError, "does not hold ResNet-18"),
    "missing": (lambda p: None, UsageError, "does not exist"),
    "directory": (lambda p: p.mkdir(), UsageError, "is a directory"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_init_files_are_one_line_errors(tmp_path, case):
    make, error, message = BAD_FILES[case]
    path = tmp_path / "init.pt"
    make(path)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SisaError) as info:
        load_init_file(path)
    assert type(info.value) is error and message in str(info.value)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert info.value.__cause__ is None  # the loader's own exception is not chained on
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, nothing removed


# --- trunk and head ------------------------------------------------------------------------

@pytest.mark.parametrize("trainable", TRAINABLE)
def test_trunk_then_head_is_the_full_model(digits, trainable):
    state = random_bn_state()
    model = build_model(*ARCH)
    model.load_state_dict(state)
    model.eval()
    trunk, head = build_parts(*ARCH, trainable, state=state)
    tk, hk = set(trunk.state_dict()), set(head.state_dict())
    assert not tk & hk and tk | hk == set(model.state_dict()) and tk == trunk_keys(state, trainable)
    assert all(torch.equal(v, state[k]) for part in (trunk, head) for k, v in part.state_dict().items())
    images = digits.train.images[:40]
    with torch.no_grad():
        features = trunk(images)
        expected = {"fc": (40, 512), "layer4": (40, 256, 2, 2), "all": (40, 1, 8, 8)}[trainable]
        assert features.shape == expected
        torch.testing.assert_close(head.eval()(features), model(to_input(images)), rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in head.parameters())


@pytest.mark.parametrize("trainable", TRAINABLE)
@pytest.mark.parametrize("width", [64, 8])
def test_head_built_alone_is_build_parts_head(trainable, width):
    """What a shard job and the ensemble load a head's state into: the same modules, names and
    shapes as the head of the split network, whichever way it is built."""
    alone, split = build_head(*ARCH, trainable, width), build_parts(*ARCH, trainable, width=width)[1]
    assert type(alone) is type(split) and repr(alone) == repr(split)
    assert {k: v.shape for k, v in alone.state_dict().items()} == {k: v.shape for k, v in split.state_dict().items()}
    alone.load_state_dict(split.state_dict())
    x = torch.randn(3, *{"fc": (width * 8,), "layer4": (width * 4, 2, 2), "all": (1, 8, 8)}[trainable])
    with torch.no_grad():
        assert torch.equal(alone.eval()(x), split.eval()(x))


@pytest.mark.parametrize("trainable", ["fc", "layer4"])
def test_trunk_stays_frozen_in_eval_mode(digits, trainable):
    trunk, head = build_parts(*ARCH, trainable, state=random_bn_state())
    parent = nn.Sequential(trunk, head)
    parent.train()
    assert not trunk.training and all(not m.training for m in trunk.modules()) and head.training
    trunk.train(True)
    assert not trunk.training
    assert list(trunk.parameters()) and all(not p.requires_grad for p in trunk.parameters())
    before = {k: v.clone() for k, v in trunk.state_dict().items()}
    out = head(trunk(digits.train.images[:32]))
    out.sum().backward()  # gradients reach the head only
    assert all(p.grad is None for p in trunk.parameters()) and all(p.grad is not None for p in head.parameters())
    assert all(torch.equal(v, before[k]) for k, v in trunk.state_dict().items())  # statistics never move


# --- features ------------------------------------------------------------------------------

@pytest.mark.parametrize("trainable", ["fc", "layer4"])
def test_features_do_not_depend_on_the_batch(digits, trainable):
    """Measured on CPU: a row's features are the same bits whichever rows share its chunk, a batch
    of one and either memory layout of the input included (Trunk pins both). The canonical
    chunking over the whole training set stays the rule for exactness; this pins down what holds."""
    trunk, _ = build_parts(*ARCH, trainable, state=random_bn_state())
    images = digits.train.images[:300]
    assert images.stride(1) == 1  # digits' 1-channel tensor has channels-last strides: the hard case
    canonical = compute_features(trunk, images, batch_size=256)
    assert canonical.dtype == torch.float32 and canonical.device.type == "cpu" and canonical.is_contiguous()
    assert canonical.shape == ((300, 512) if trainable == "fc" else (300, 256, 2, 2))
    assert torch.equal(compute_features(trunk, images, batch_size=256), canonical)  # repeatable
    assert torch.equal(compute_features(trunk, images[50:120]), canonical[50:120])
    assert torch.equal(compute_features(trunk, images[299:300]), canonical[299:300])  # a batch of one
    assert torch.equal(compute_features(trunk, images[:40], batch_size=7), canonical[:40])
    restrided = images.clone(memory_format=torch.contiguous_format)
    assert restrided.stride() != images.stride()
    assert torch.equal(compute_features(trunk, restrided), canonical)
    assert compute_features(trunk, images[:0]).shape == (0, *canonical.shape[1:])


# --- pretraining ---------------------------------------------------------------------------

def test_pretrain_writes_weights_and_record(tmp_path, digits_manifest):
    train_csv, test_csv = digits_manifest
    out = tmp_path / "public.pt"
    calls = []
    record = pretrain(str(train_csv), tmp_path, out, epochs=1, seed=5, batch_size=32,
                      progress=lambda *a: calls.append(a), test_manifest=test_csv)
    assert calls and calls[-1][2] == calls[-1][3]  # progress reached the end
    on_disk = json.loads(out.with_suffix(".json").read_text())
    assert on_disk == record
    assert {"dataset", "dataset_hash", "samples", "config", "epochs", "seed", "train_accuracy", "test_accuracy",
            "weights_sha256", "torch", "seconds"} <= record.keys()
    assert record["samples"] == 240 and record["epochs"] == 1 and record["seed"] == 5
    assert record["config"]["shards"] == 1 and record["config"]["slices"] == 1 and record["config"]["channels"] == 1
    assert 0 <= record["train_accuracy"] <= 1 and 0 <= record["test_accuracy"] <= 1
    assert record["weights_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    bare = torch.load(out, weights_only=True)
    assert list(bare) == list(build_model(*ARCH).state_dict())  # a bare state dict, torchvision's names
    state, sha = load_init_file(out)
    assert sha == record["weights_sha256"]
    start, missing = initial_weights(*ARCH, seed=0, shard=0, trainable="fc", init_state=state)
    assert missing == [] and all(torch.equal(start[k], bare[k]) for k in bare)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["public.json", "public.pt"]  # no temp files left


@pytest.mark.parametrize("out, dataset, message", [
    ("folder", "digits", "is a directory"),
    ("missing/w.pt", "digits", "does not exist"),
    ("w.json", "digits", "choose a name ending in .pt"),
    ("w.pt", "imagenet", "unknown dataset"),
])
def test_pretrain_rejects_bad_input_before_training(tmp_path, out, dataset, message):
    (tmp_path / "folder").mkdir()
    calls = []
    with pytest.raises(UsageError, match=message) as info:
        pretrain(dataset, tmp_path, tmp_path / out, epochs=1, progress=lambda *a: calls.append(a))
    assert "\n" not in str(info.value) and not calls
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]
