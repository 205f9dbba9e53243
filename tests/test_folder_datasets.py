"""Your own images as they come (issue 13, parts 1, 2, 6): a folder of class subfolders, any
sizes with --image-size, one-line errors for bad images, and the test accuracy that ends
`train` and `forget`. Tiny images written into tmp_path, so each training takes a moment."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app
from sisa.config import RunConfig
from sisa.data import load_dataset, load_manifest, parse_image_size
from sisa.errors import SisaError, UsageError

runner = CliRunner()
CLASSES = ("cat", "dog", "eel")
TINY = ["--shards", 2, "--slices", 1, "--epochs", 1, "--width", 8, "--batch-size", 8, "--device", "cpu"]


@pytest.fixture(autouse=True)
def one_thread():
    """Models this small train faster on one thread (and far faster on a loaded machine, where
    two threads spin-wait for each other); no run here is compared with another's bits."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code: int, match: str) -> None:
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    message = result.stderr.strip()
    assert len(message.splitlines()) == 1 and match in message, message


def write_folder(root: Path, per_class: int = 6, size=(8, 8), seed: int = 0) -> Path:
    """root/<class>/<i>.png, RGB, grayscale, palette and RGBA images mixed."""
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            im = Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))
            im.convert(("RGB", "L", "P", "RGBA")[i % 4]).save(root / c / f"{i}.png")
    return root


def listing(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


# --- the layout -----------------------------------------------------------------------------
def test_folder_ids_classes_order_and_owners(tmp_path):
    root = write_folder(tmp_path / "pets", per_class=4)
    (root / "dog" / "nested").mkdir()
    Image.new("L", (8, 8), 7).save(root / "dog" / "nested" / "a.JPG")  # extensions match in any case
    (root / "dog" / "notes.txt").write_text("not an image: ignored, as ImageFolder does")
    (root / "cat" / "._0.png").write_bytes(b"macOS metadata: hidden files are skipped")
    (root / ".cache").mkdir()  # hidden folders are not classes
    (root / "owners.csv").write_text("id,owner\ncat/1.png,alice\ndog/nested/a.JPG,bob\n")
    d = load_dataset(f"{root}/")
    assert d.class_names == CLASSES
    ids = [f"{c}/{i}.png" for c in CLASSES for i in range(4)]
    ids.insert(8, "dog/nested/a.JPG")  # class by class, each class's paths sorted
    assert d.train.ids == ids
    assert d.train.labels.tolist() == [0] * 4 + [1] * 5 + [2] * 4
    assert d.train.owners == [None, "alice"] + [None] * 6 + ["bob"] + [None] * 4
    assert d.train.images.shape == (13, 3, 8, 8), "RGB because some images are in colour"
    for sid, img in zip(ids, d.train.images):  # grayscale R = G = B, palettes expanded, alpha dropped
        assert np.array_equal(img.numpy(), np.asarray(Image.open(root / sid).convert("RGB")).transpose(2, 0, 1)), sid
    assert d.test is None and load_dataset(str(root)).train.sample_hashes() == d.train.sample_hashes()


def test_all_grayscale_folder_is_one_channel(tmp_path):
    root = tmp_path / "g"
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        Image.new("L", (5, 4), 9).save(root / c / "x.pgm")
    assert load_dataset(str(root)).train.images.shape == (3, 1, 4, 5)


# --- any image size ----------------------------------------------------------------------------
def test_image_size_parsing_and_resizing(tmp_path):
    assert parse_image_size("32") == (32, 32) and parse_image_size("24x32") == (24, 32)
    for bad in ("", "0", "abc", "3x", "-2", "9999"):
        with pytest.raises(UsageError, match="--image-size"):
            parse_image_size(bad)
    root = write_folder(tmp_path / "pets", per_class=1)
    Image.new("RGB", (40, 30), (10, 200, 30)).save(root / "eel" / "big.png")
    with pytest.raises(SisaError, match="eel/big.png is 30x40.*pass --image-size"):
        load_dataset(str(root))
    d = load_dataset(str(root), size=(6, 10))
    assert d.train.images.shape == (4, 3, 6, 10)
    want = np.asarray(Image.open(root / "eel" / "big.png").resize((10, 6), Image.BILINEAR)).transpose(2, 0, 1)
    assert np.array_equal(d.train.images[3].numpy(), want), "Pillow's BILINEAR, width x height as PIL takes it"
    assert load_dataset("digits", size=(4, 4)).train.images.shape[1:] == (1, 4, 4)
    # recorded in the config; absent, the hash older runs recorded stays as it was
    assert "resize" not in RunConfig().training_fields()
    assert RunConfig(resize=(6, 10)).config_hash != RunConfig().config_hash
    assert RunConfig.from_json(RunConfig(resize=(6, 10)).to_json()).resize == (6, 10)


def test_manifest_of_mixed_sizes_names_the_line_and_the_option(tmp_path):
    write_folder(tmp_path / "img", per_class=1)
    Image.new("RGB", (12, 9)).save(tmp_path / "img" / "big.png")
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,path,label\na,img/cat/0.png,cat\nb,img/big.png,dog\n")
    with pytest.raises(SisaError, match=r"image img/big.png is 9x12, the first \(img/cat/0.png\) is 8x8.*--image-size"):
        load_manifest(manifest)
    assert load_manifest(manifest, size=(8, 8))[0].images.shape == (2, 3, 8, 8)


# --- bad inputs: one line, the right exit code, nothing written -------------------------------
def _corrupt(root):
    (root / "dog" / "3.png").write_text("this is not a PNG")


def _truncated(root):
    data = (root / "eel" / "2.png").read_bytes()
    (root / "eel" / "2.png").write_bytes(data[: len(data) // 2])


def _mixed(root):
    Image.new("RGB", (9, 9)).save(root / "cat" / "odd.png")


def _no_classes(root):
    for c in CLASSES:
        for p in (root / c).iterdir():
            p.rename(root / f"{c}-{p.name}")
        (root / c).rmdir()


def _empty_class(root):
    (root / "fox").mkdir()


def _bad_owner(root):
    (root / "owners.csv").write_text("id,owner\ncat/0.png,alice\ncat/99.png,bob\n")


@pytest.mark.parametrize("spoil,extra,code,match", [
    (_corrupt, [], 1, "cannot read image"),
    (_truncated, [], 1, "eel/2.png (row 14 of"),
    (_mixed, [], 1, "pass --image-size"),
    (_no_classes, [], 1, "has no class subfolders"),
    (_empty_class, [], 1, "class folder 'fox' has no images"),
    (_bad_owner, [], 1, "owners.csv line 3: 'cat/99.png' is not an image"),
    (None, ["--image-size", "0x8"], 2, "--image-size takes N or HxW"),
    (None, ["--test-dir", "nowhere"], 2, "test split not found"),
    (None, ["--test-dir", "a", "--test-manifest", "b.csv"], 2, "pass one of them"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, spoil, extra, code, match):
    root = write_folder(tmp_path / "pets")
    if spoil:
        spoil(root)
    before = listing(tmp_path)
    r = invoke("train", "--dataset", root, *TINY, *extra, "--run-dir", tmp_path / "run")
    one_line_error(r, code, match)
    if spoil is _corrupt or spoil is _truncated:
        assert str(root / ("dog/3.png" if spoil is _corrupt else "eel/2.png")) in r.stderr, "names the file"
    assert listing(tmp_path) == before, "no run directory, nothing beside it"


def test_missing_folder_and_unknown_test_class(tmp_path):
    r = invoke("train", "--dataset", f"{tmp_path}/nothere/", *TINY, "--run-dir", tmp_path / "run")
    one_line_error(r, 2, "dataset folder not found")
    root = write_folder(tmp_path / "pets", per_class=1)
    (tmp_path / "test" / "zebra").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "test" / "zebra" / "z.png")
    r = invoke("train", "--dataset", root, *TINY, "--test-manifest", tmp_path / "test", "--run-dir", tmp_path / "run")
    one_line_error(r, 1, "class folder 'zebra' is not a class of the training data (cat, dog, eel)")
    assert not (tmp_path / "run").exists()


# --- end to end through the CLI ------------------------------------------------------------
def test_folder_dataset_end_to_end(tmp_path):
    root = write_folder(tmp_path / "pets")
    (root / "owners.csv").write_text("id,owner\ncat/0.png,alice\ndog/5.png,alice\neel/1.png,bob\n")
    test = write_folder(tmp_path / "test", per_class=2, seed=1)
    run = tmp_path / "run"
    r = invoke("train", "--dataset", f"{root}/", "--test-dir", test, *TINY, "--run-dir", run, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["shards_trained"] == [0, 1] and out["test_samples"] == 6 and 0 <= out["test_accuracy"] <= 1
    st = json.loads(invoke("status", "--run-dir", run, "--json").stdout)
    assert st["samples"]["active"] == 18 and st["config"]["class_names"] == list(CLASSES)
    assert st["config"]["channels"] == 3 and st["config"]["resize"] == []

    ids = tmp_path / "forget.csv"
    ids.write_text("id\neel/3.png\n")
    f = invoke("forget", "--ids", ids, "--run-dir", run)
    assert f.exit_code == 0, f.output
    lines = f.stdout.strip().splitlines()
    assert lines[0].startswith("forgot 1 samples") and lines[1].startswith("test accuracy ")
    assert "(ensemble, majority vote, 6 test samples" in lines[1]
    owners = tmp_path / "owners-request.csv"
    owners.write_text("owner\nalice\n")
    f = invoke("forget", "--ids", owners, "--run-dir", run, "--json", "--no-eval")
    assert f.exit_code == 0, f.output
    rep = json.loads(f.stdout)
    assert rep["samples_removed"] == 2 and rep["test_accuracy"] is None

    ev = json.loads(invoke("evaluate", "--run-dir", run, "--device", "cpu", "--json").stdout)
    assert ev["test_samples"] == 6
    one_line_error(invoke("train", "--resume", "--image-size", 16, "--run-dir", run), 2,
                   "drop --image-size 16x16 (the run has none)")


def test_mixed_sizes_train_with_image_size_and_no_test_split_says_so(tmp_path):
    root = write_folder(tmp_path / "pets")
    Image.new("RGB", (30, 20), (1, 2, 3)).save(root / "dog" / "big.png")
    run = tmp_path / "run"
    r = invoke("train", "--dataset", root, "--image-size", "6x7", *TINY, "--run-dir", run)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1].startswith("no test split, so no test accuracy")
    st = json.loads(invoke("status", "--run-dir", run, "--json").stdout)
    assert st["config"]["resize"] == [6, 7] and st["config"]["image_size"] == [6, 7]
    pred = invoke("predict", root / "dog" / "big.png", "--run-dir", run, "--json")
    assert pred.exit_code == 0, pred.output  # predict resizes to the run's 6x7 with the same filter
    # a worker (gpus or Ray executor) loads the data itself: the same resize, the same bits
    import sisa
    from sisa.executors import _worker_data, run_task
    from sisa.partition import ShardJob

    opened = sisa.Run.open(run)
    try:
        task = opened._task(ShardJob(1, 0, *opened.retained(1)))
        live = opened.index.checkpoints()[(1, 0)].sha256
    finally:
        opened.close()
    _worker_data.cache_clear()
    assert run_task(task).slices[0].sha256 == live
