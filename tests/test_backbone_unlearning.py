"""benchmarks.backbone_unlearning end to end, in its smoke mode (digits, tiny backbone, N = 4)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APPROXIMATE = ["FT", "GA", "GA (dual)", "NegGrad+", "SCRUB", "SalUn", "DM (ascend)", "DM (descend)", "Fanchuan",
               "Fanchuan (improved)", "Distill"]
METHODS = ["public-only", "Original", "Retrain", *APPROXIMATE, "SISA S=2", "SISA S=3"]


def test_backbone_unlearning_smoke(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.backbone_unlearning", "--smoke", "--work",
                           str(tmp_path / "work"), "--results-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "backbone_unlearning_smoke.json").read_text())

    assert list(res["tables"]) == ["random 10%", "class 0"]
    for name, table in res["tables"].items():
        rows = table["methods"]
        assert list(rows) == METHODS, name
        for m, r in rows.items():
            for k in ("forget_acc", "retain_acc", "test_acc", "mia_kit", "mia_efficacy"):
                assert 0 <= r[k] <= 100, (name, m, k)
        assert rows["Retrain"]["gap_to_retrain"] == 0
        for s in ("SISA S=2", "SISA S=3"):
            # the forget left exactly what the product's training code makes of the retained data
            assert rows[s]["bitwise_equal_to_retraining"] is True, (name, s)
            assert rows[s]["slices_retrained"] > 0
        assert {r["hp"]["epochs"] > 0 for m, r in rows.items() if "hp" in r} == {True}
        assert rows["DM (ascend)"]["hp"]["direction"] == "ascend" and rows["DM (descend)"]["hp"]["direction"] == "descend"
        assert rows["Fanchuan (improved)"]["hp"].get("improved") is True and "improved" not in rows["Fanchuan"]["hp"]
        knows = table["distill_knowledge"]
        assert knows["hp"] == rows["Distill"]["hp"]
        assert list(knows) == ["hp", "Original", "Retrain", "student of Original", "student of Retrain"]
        assert knows["student of Original"]["forget_acc"] == rows["Distill"]["forget_acc"]  # the row's own student
    cls = res["tables"]["class 0"]["methods"]
    assert cls["Original"]["forget_acc"] > 0  # there was something to forget
    # a head that never saw a class does not predict it, and neither does any SISA constituent
    assert cls["Retrain"]["forget_acc"] == 0 and cls["SISA S=2"]["forget_acc"] == 0

    score = res["score"]
    assert score["n_models"] == 4
    for m in ["Retrain (other seeds)", "Original", *APPROXIMATE, "SISA S=2", "SISA S=2 vs SISA retrained"]:
        assert 0 <= score[m]["forget_quality"] <= 1, m
    assert [q["partition"] for q in res["partition"]][:2] == ["uniform", "k-means of public features"]
    assert sum(1 for q in res["partition"] if q["partition"] == "uniform") == 2
    assert [d["forget_set"] for d in res["deltagrad"]] == ["random 10%", "class 0"]
    assert all(d["distance_ratio"] < 0.5 for d in res["deltagrad"])  # DeltaGrad lands near its retraining
    curves = res["relearning"]["curves"]
    assert list(curves) == [f"{m}, {s} schedule" for s in ("study", "head") for m in ("GA (dual)", "DM (ascend)", "DM (descend)")]
    for name, c in curves.items():
        assert [h["epoch"] for h in c["history"]] == list(range(1, c["hp"]["epochs"] + 1)), name
        assert c["final_forget_acc"] == c["history"][-1]["forget_acc"] and c["rebound"] >= 0, name
    md = (tmp_path / "backbone_unlearning_smoke.md").read_text()
    assert "NeurIPS 2023 forgetting score" in md and "| SISA S=3 |" in md and "| Fanchuan (improved) |" in md
    assert "Does relearning undo the forgetting?" in md and "| student of Retrain |" in md
