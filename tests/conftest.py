"""Fixtures: small real runs (a few hundred 8x8 digits written as PNG files with a manifest), so
the whole suite trains real ResNet-18s on 2 CPU cores in minutes."""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

import sisa
from sisa.audit import state_equal  # noqa: F401  (the tests' bitwise comparison)
from sisa.data import load_digits

N_TRAIN, N_TEST, N_OWNERS = 240, 60, 40


def write_manifest(folder: Path, split, n: int, name: str, owners: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path", "label", "owner"] if owners else ["id", "path", "label"])
        for i in range(n):
            file = f"img/{name}-{i:04d}.png"
            (folder / "img").mkdir(exist_ok=True)
            Image.fromarray(split.images[i, 0].numpy()).save(folder / file)
            row = [f"{name}-{i:04d}", file, int(split.labels[i])]
            w.writerow(row + [f"user{i % N_OWNERS:02d}"] if owners else row)
    return path


@pytest.fixture(scope="session")
def digits_manifest(tmp_path_factory) -> tuple[Path, Path]:
    """(train.csv, test.csv): real digits images as PNG files, with an owner per training sample."""
    folder = tmp_path_factory.mktemp("digits-png")
    d = load_digits()
    return write_manifest(folder, d.train, N_TRAIN, "train"), write_manifest(folder, d.test, N_TEST, "test", owners=False)


def small_config(manifest: Path, **kw) -> sisa.RunConfig:
    # width 16: ResNet-18's depth and topology with 1/16 of the weights, so checkpoints are ~2.8 MB
    # rather than 89 MB and the suite's runs train and fsync in seconds
    base = dict(shards=3, slices=3, epochs=2, batch_size=16, lr=0.05, crop_pad=1, flip=False, seed=7, width=16)
    base.update(kw)
    return sisa.config_for(str(manifest), **base)


@pytest.fixture(scope="session")
def trained_template(tmp_path_factory, digits_manifest) -> Path:
    """One small trained run, copied by `trained_run` so each test gets its own."""
    train_csv, test_csv = digits_manifest
    run_dir = tmp_path_factory.mktemp("template") / "run"
    sisa.train(run_dir, small_config(train_csv), test_manifest=test_csv).close()
    return run_dir


@pytest.fixture
def trained_run(tmp_path, trained_template) -> Path:
    """A private copy of the template. Checkpoint files are hard-linked: the code never writes
    one in place (replacements get new, content-addressed names), so sharing them is safe."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_template, run_dir, copy_function=_link_checkpoints)
    return run_dir


def _link_checkpoints(src, dst):
    if str(src).endswith(".pt"):
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


def file_hashes(run_dir: Path) -> dict[tuple[int, int], str]:
    from store.checkpoints import file_sha256
    from store.index import Index

    index = Index(run_dir / "index.sqlite")
    try:
        return {key: file_sha256(run_dir / c.path) for key, c in index.checkpoints().items()}
    finally:
        index.close()
