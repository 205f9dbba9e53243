"""Decode once, scrub on forget (issue 13, parts 3 and 4): a run made from image files decodes
them in parallel into <run>/images-*.npy, later commands read that cache instead of the files,
a forget zeroes the deleted samples' rows (redone by --resume after a SIGKILL), and the audit
fails while a deleted sample's pixels are in the cache. Tens of tiny PNGs: each run trains in a
moment."""
from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import text
from typer.testing import CliRunner

import sisa
from cli import app
from sisa.audit import audit
from sisa.data import load_folder, load_manifest
from sisa.imagecache import decode_dataset
from store.checkpoints import file_sha256
from store.images import caches
from store.index import Index

runner = CliRunner()
CLASSES = ("cat", "dog", "eel")
TINY = ["--shards", 2, "--slices", 2, "--epochs", 1, "--width", 8, "--batch-size", 8, "--device", "cpu"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
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


def write_folder(root: Path, per_class: int = 8, modes=("RGB", "L", "P", "RGBA"), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            im = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
            im.convert(modes[i % len(modes)]).save(root / c / f"{i}.png")
    return root


def write_manifest(folder: Path, n: int = 24, seed: int = 1) -> Path:
    """A manifest over PNGs of mixed modes and sizes (the first one RGB): needs --image-size."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    with open(folder / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "path", "label", "owner"])
        for i in range(n):
            h = 8 + i % 3
            Image.fromarray(rng.integers(0, 256, (h, 9, 3), dtype=np.uint8)).convert(
                ("RGB", "L", "P", "RGBA")[i % 4]).save(folder / "img" / f"{i}.png")
            w.writerow([f"s{i:03d}", f"img/{i}.png", CLASSES[i % 3], f"u{i % 5}"])
    return folder / "train.csv"


def cached_rows(run_dir: Path) -> np.ndarray:
    return np.load(run_dir / "images-train.npy", mmap_mode="r")


def sql(run_dir: Path, statement: str, **params):
    index = Index(run_dir / "index.sqlite")
    try:
        with index.transaction() as s:
            return s.execute(text(statement), params).all()
    finally:
        index.close()


def row_of(run_dir: Path, sid: str) -> int:
    return sql(run_dir, "SELECT row FROM image_rows WHERE split = 'train' AND id = :i", i=sid)[0][0]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A trained run over a folder of RGB, gray, palette and RGBA PNGs, with a test folder."""
    base = tmp_path_factory.mktemp("cache")
    write_folder(base / "train")
    write_folder(base / "test", per_class=2, seed=5)
    result = invoke("train", "--dataset", base / "train", "--test-dir", base / "test", *TINY, "--run-dir", base / "run")
    assert result.exit_code == 0, result.output
    return base / "run"


@pytest.fixture
def run_dir(tmp_path, template) -> Path:
    """A private copy of the template run, with its own copy of the source folders."""
    for name in ("train", "test"):
        shutil.copytree(template.parent / name, tmp_path / name)
    shutil.copytree(template, tmp_path / "run")
    sql(tmp_path / "run", "UPDATE image_rows SET path = replace(path, :old, :new) RETURNING row",  # its own sources
        old=str(template.parent), new=str(tmp_path))
    return tmp_path / "run"


def test_parallel_decode_is_bitwise_the_sequential_load(tmp_path):
    """Two worker processes, chunks of 4 rows: the very pixels and hashes of today's one-by-one load."""
    folder = write_folder(tmp_path / "folder")
    gray = write_folder(tmp_path / "gray", modes=("L",))  # all gray: one channel, as load_folder makes it
    manifest = write_manifest(tmp_path / "m")
    for name, size, sequential in ((str(folder), None, load_folder(folder)[0]),
                                   (str(gray), None, load_folder(gray)[0]),
                                   (str(manifest), (8, 8), load_manifest(manifest, size=(8, 8))[0])):
        out = tmp_path / f"out-{Path(name).stem}"
        out.mkdir()
        data, decoded, _ = decode_dataset(name, out, size=size, workers=2, chunk_rows=4)
        assert torch.equal(data.train.images, sequential.images), name
        assert data.train.images.stride() == sequential.images.stride(), name  # the memory order training sees
        assert data.train.ids == sequential.ids and torch.equal(data.train.labels, sequential.labels)
        assert data.train.owners == sequential.owners
        assert decoded["train"].hashes == sequential.sample_hashes()
        assert sorted(p.name for p in out.iterdir()) == ["images-train.npy"]  # no temp file left
    assert data.train.images.shape[1] == 3 and load_folder(gray)[0].images.shape[1] == 1


def test_bad_image_at_creation_is_one_line_and_leaves_nothing(tmp_path):
    folder = write_folder(tmp_path / "folder")
    (folder / "dog" / "5.png").write_bytes(b"not a png")
    before = sorted(os.listdir(tmp_path))
    result = invoke("train", "--dataset", folder, *TINY, "--run-dir", tmp_path / "new" / "run")
    one_line_error(result, 1, "dog/5.png")
    assert "row 13 of" in result.stderr  # the first bad row, as the one-by-one load names it
    assert sorted(os.listdir(tmp_path)) == before  # no run, no half-made parent, no temp file


def test_cache_is_made_then_read_instead_of_the_files(run_dir, monkeypatch):
    """The cache files and their records exist; evaluate, forget and audit work with every
    decoder made to fail and the source folder unreadable: they never decode."""
    assert (run_dir / "images-train.npy").is_file() and (run_dir / "images-test.npy").is_file()
    index = Index(run_dir / "index.sqlite")
    try:
        found = caches(index)
    finally:
        index.close()
    assert (found["train"].rows, found["train"].channels, found["train"].height) == (24, 3, 8)
    assert found["test"].rows == 6 and found["train"].workers >= 1
    assert os.path.getsize(run_dir / "images-train.npy") >= 24 * 3 * 8 * 8

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image file was decoded")

    import sisa.data
    import sisa.imagecache

    monkeypatch.setattr(sisa.data, "_decode", no_decoding)
    monkeypatch.setattr(sisa.imagecache, "_decode", no_decoding)
    monkeypatch.setattr(Image, "open", no_decoding)
    assert invoke("evaluate", "--run-dir", run_dir, "--json").exit_code == 0
    forgotten = invoke("forget", "--ids", _ids_csv(run_dir.parent, ["dog/3.png"]), "--run-dir", run_dir,
                       "--device", "cpu", "--json")
    assert forgotten.exit_code == 0, forgotten.output
    assert invoke("audit", "--run-dir", run_dir).exit_code == 0


def test_status_shows_the_cache_and_a_missing_cache_is_one_line(run_dir):
    status = invoke("status", "--run-dir", run_dir)
    assert "image cache (train): images-train.npy, 24 x 3 x 8 x 8 uint8" in status.stdout
    (run_dir / "images-test.npy").unlink()
    one_line_error(invoke("evaluate", "--run-dir", run_dir), 1, "images-test.npy is missing")
    failed = invoke("audit", "--run-dir", run_dir)
    assert failed.exit_code == 1 and "images-test.npy" in failed.output


def _ids_csv(folder: Path, ids: list[str]) -> Path:
    path = folder / "ids.csv"
    path.write_text("id\n" + "\n".join(ids) + "\n")
    return path


def test_training_is_bitwise_the_same_with_and_without_the_cache(tmp_path):
    """A run trained from the cache equals one trained the way runs made before the cache train
    (the files decoded one by one on every command), checkpoint for checkpoint."""
    manifest = write_manifest(tmp_path / "m")
    cfg = sisa.config_for(str(manifest), shards=2, slices=2, epochs=1, width=8, batch_size=8, resize=(8, 8))
    cached = sisa.train(tmp_path / "cached", cfg)
    old = sisa.Run.create(tmp_path / "old", cfg)
    old.close()
    for table in ("image_rows", "image_caches"):  # what a run made before the cache holds
        sql(tmp_path / "old", f"DELETE FROM {table} RETURNING 1")
    (tmp_path / "old" / "images-train.npy").unlink()
    old = sisa.Run.open(tmp_path / "old")
    try:
        old.complete()
        assert not isinstance(old.dataset().train.images.numpy(), np.memmap)
        hashes = {k: c.sha256 for k, c in old.index.checkpoints().items()}
    finally:
        old.close()
    try:
        assert {k: c.sha256 for k, c in cached.index.checkpoints().items()} == hashes
    finally:
        cached.close()


def test_forget_zeroes_the_rows_and_audit_catches_a_row_put_back(run_dir):
    row = row_of(run_dir, "cat/2.png")
    pixels = np.array(cached_rows(run_dir)[row])
    assert pixels.any()
    result = invoke("forget", "--ids", _ids_csv(run_dir.parent, ["cat/2.png"]), "--run-dir", run_dir,
                    "--device", "cpu", "--no-eval")
    assert result.exit_code == 0, result.output
    assert not cached_rows(run_dir)[row].any()
    assert cached_rows(run_dir)[row + 1].any()  # only the deleted sample's row
    assert invoke("audit", "--run-dir", run_dir).exit_code == 0

    put_back = np.load(run_dir / "images-train.npy", mmap_mode="r+")
    put_back[row] = pixels
    put_back.flush()
    del put_back
    failed = invoke("audit", "--run-dir", run_dir)
    assert failed.exit_code == 1
    assert "image cache still holds the pixels of 1 deleted samples, e.g. 'cat/2.png'" in failed.output
    assert invoke("audit", "--repair", "--run-dir", run_dir).exit_code == 0
    assert not cached_rows(run_dir)[row].any()


def _cli(args, run_dir, env=None):
    return subprocess.run([sys.executable, "-m", "cli", *args, "--run-dir", str(run_dir), "--device", "cpu"],
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300, cwd=ROOT)


@pytest.mark.parametrize("point", ["journaled", "cache-zeroed"])
def test_sigkill_mid_forget_then_resume_leaves_the_rows_zeroed(run_dir, point):
    row = row_of(run_dir, "eel/6.png")
    ids = _ids_csv(run_dir.parent, ["eel/6.png"])
    killed = _cli(["forget", "--ids", str(ids), "--no-eval"], run_dir, {"SISA_FAULT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert cached_rows(run_dir)[row].any() == (point == "journaled")  # killed before, or after, the zeros
    resumed = _cli(["forget", "--resume", "--no-eval"], run_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert not cached_rows(run_dir)[row].any()
    run = sisa.Run.open(run_dir)
    try:
        result = audit(run)
        assert result.ok, result.failures
    finally:
        run.close()


def test_changed_or_missing_source_file_stops_with_one_line(run_dir):
    source = run_dir.parent / "train" / "cat" / "0.png"
    neighbour = sql(run_dir, "SELECT id FROM samples WHERE shard = (SELECT shard FROM samples WHERE id = 'cat/0.png') "
                             "AND id NOT IN ('cat/0.png', 'cat/4.png') ORDER BY id LIMIT 1")[0][0]
    ids = _ids_csv(run_dir.parent, [neighbour])  # its shard retrains: cat/0.png's pixels are read
    other = run_dir.parent / "train" / "cat" / "4.png"
    os.utime(other, ns=(0, 0))  # touched but unchanged: its hash still matches, nothing to say
    original = source.read_bytes()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(source)
    before = file_sha256(run_dir / "images-train.npy")
    changed = invoke("forget", "--ids", ids, "--run-dir", run_dir, "--device", "cpu", "--no-eval")
    one_line_error(changed, 1, "cat/0.png (id 'cat/0.png') changed since the run cached its pixels")
    source.unlink()
    missing = invoke("forget", "--resume", "--run-dir", run_dir, "--device", "cpu", "--no-eval")
    one_line_error(missing, 1, "image not found:")
    run = sisa.Run.open(run_dir)
    try:
        assert any("cat/0.png" in f for f in audit(run).failures)
    finally:
        run.close()
    source.write_bytes(original)  # restored: the interrupted forget finishes
    assert invoke("forget", "--resume", "--run-dir", run_dir, "--device", "cpu", "--no-eval").exit_code == 0
    assert file_sha256(run_dir / "images-train.npy") != before  # the neighbour's row was zeroed
    assert invoke("audit", "--run-dir", run_dir).exit_code == 0


def test_builtin_runs_have_no_cache(tmp_path):
    run = sisa.Run.create(tmp_path / "run", sisa.config_for("digits", shards=2, slices=1))
    try:
        assert caches(run.index) == {} and not list((tmp_path / "run").glob("images-*"))
        assert run.dataset().train.ids[0] == "train-00000"
    finally:
        run.close()


def test_pretrain_takes_image_size(tmp_path):
    manifest = write_manifest(tmp_path / "m", n=12)
    result = invoke("pretrain", "--dataset", manifest, "--out", tmp_path / "w.pt", "--image-size", "6",
                    "--epochs", 1, "--width", 8, "--batch-size", 8, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    import json

    assert json.loads(result.stdout)["config"]["resize"] == [6, 6]


def test_benchmark_smoke(tmp_path):
    """benchmarks/image_cache.py end to end on 200 tiny images: every number and the targets recorded."""
    import json

    proc = subprocess.run([sys.executable, "-m", "benchmarks.image_cache", "--smoke", "--work", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "results" / "image_cache_smoke.json").read_text())
    assert res["environment"]["command"].startswith("python -m benchmarks.image_cache --smoke")
    assert res["n"] == 200 and res["decode_workers"] >= 1 and res["cache_bytes"] >= 200 * 3 * 16 * 16
    for key in ("sequential_decode_s", "parallel_decode_s", "reopen_s", "read_shard_s"):
        assert res[key] > 0, key
    assert res["forget"]["rows_checked"] > 0 and set(res["targets"]) == {
        "speedup >= 1.8", "reopen < 1 s", "forget data loading < 1 s"}
    assert "load_avg_before" in res["environment"] and res["environment"]["session_cpu_share"]["1"] > 0
    assert res["projected_speedup_idle_cores"] > 0 and res["decoders"]["1"]["worker_cpu_s"]
    assert "| today's sequential decode" in (tmp_path / "results" / "image_cache_smoke.md").read_text()
