"""benchmarks.leaderboard_heads: its smoke mode end to end (digits, tiny trunk, N = 3), and the
shards of its exact row."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import leaderboard_heads as lh

ROOT = Path(__file__).resolve().parents[1]


def test_shard_rows_cover_the_retained_rows_once_and_no_forgotten_one():
    n, forget = 1000, torch.arange(0, 1000, 7)
    retain = torch.tensor(sorted(set(range(n)) - set(forget.tolist())))
    rows = lh.shard_rows(n, retain, 5, seed=3)
    assert len(rows) == 5 and all(150 <= len(r) <= 195 for r in rows)  # 857 rows, about a fifth each
    assert torch.equal(torch.cat(rows).sort().values, retain)
    # the shards are those of all n rows: forgetting removes rows, it moves none to another shard
    full = lh.shard_rows(n, torch.arange(n), 5, seed=3)
    assert all(set(r.tolist()) <= set(f.tolist()) for r, f in zip(rows, full))
    assert not all(torch.equal(a, b) for a, b in zip(full, lh.shard_rows(n, torch.arange(n), 5, seed=4)))


def test_smoke(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.leaderboard_heads", "--smoke", "--work",
                           str(tmp_path / "work"), "--results-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "leaderboard_heads_smoke.json").read_text())
    rows = res["rows"]
    assert list(rows) == ["Retrain (other seeds)", "Original", *lh.METHODS, "SISA S=2 (exact)"]
    for name, r in rows.items():
        assert r["score"]["n_models"] == 3, name
        assert 0 <= r["score"]["forget_quality"] <= 1, name
        for k in ("forget_acc", "retain_acc", "test_acc"):
            assert 0 <= r[k] <= 100, (name, k)
    for name, (_, grid) in lh.METHODS.items():  # grid_limit 1: each source's recipe, as tuned
        assert rows[name]["hp"] == json.loads(json.dumps(grid[0])), name
    # N copies of one model are no sample of retraining's distribution: the Original scores 0
    assert rows["Original"]["score"]["forget_quality"] < rows["Retrain (other seeds)"]["score"]["forget_quality"]
    md = (tmp_path / "leaderboard_heads_smoke.md").read_text()
    assert "| 8th Team Forget |" in md and "5th transposed: an MLP has no conv kernels" in md
