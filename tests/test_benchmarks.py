"""The benchmark pipelines run end to end and write complete results (tiny sizes: the numbers
themselves are checked by the benchmarks, not here)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_unlearning_benchmark_smoke(tmp_path):
    """Run in stages, as on a GPU lent for minutes at a time: one stage, then the rest, merged."""
    def bench(*args):
        return subprocess.run([sys.executable, "-m", "benchmarks.unlearning", "--smoke", "--results-dir", str(tmp_path),
                               "--device", "cpu", "--state", str(tmp_path / "state"), *args],
                              cwd=ROOT, capture_output=True, text=True, timeout=900)

    early = bench("--stage", "digits:forget-0.1-sisa")  # needs the trained SISA run first
    assert early.returncode != 0 and "needs digits:sisa first" in early.stderr
    first = bench("--stage", "digits:original")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "1 of 25 stages done; to do: digits:sisa," in first.stdout
    assert not (tmp_path / "unlearning_smoke.json").exists()  # nothing written until every stage is done
    listed = bench("--list-stages").stdout.splitlines()
    assert listed[0] == "digits:original\tdone" and listed[-1] == "deltagrad\tto do" and len(listed) == 25
    distill_first = bench("--stage", "digits:forget-0.1-distill")  # needs the Retrain of its forget stage
    assert distill_first.returncode != 0 and "needs digits:forget-0.1 first" in distill_first.stderr
    proc = bench("--stage", "remaining")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "unlearning_smoke.json").read_text())
    env = res["environment"]
    assert env["command"].startswith("python -m benchmarks.unlearning --smoke") and env["torch"] and env["hardware"]
    assert res["stages"]["digits:original"]["environment"]["command"].endswith("--stage digits:original")
    digits = res["datasets"]["digits"]
    methods = digits["methods"]["fractions"]["0.1"]["methods"]
    assert list(methods) == ["Retrain", "FT", "GA", "GA (dual)", "NegGrad+", "SCRUB", "SalUn", "DM (ascend)",
                             "DM (descend)", "Fanchuan", "Fanchuan (improved)", "Distill", "2nd: Kookmin", "4th: Oleszko",
                             "5th: transposed convs", "5th: pseudo-labels", "6th: Amnesiacs", "7th: Jiaxi Sun",
                             "8th: Team Forget", "SISA", "SISA (converged)"]
    # each study method's row starts from its source's recipe (smoke: grid cut to that one point)
    assert methods["DM (ascend)"]["hp"] == {"epochs": 45, "lr": 0.01, "beta": 0.005, "decay_epoch": 20,
                                            "direction": "ascend"}
    assert methods["Fanchuan (improved)"]["hp"]["improved"] is True and methods["Fanchuan"]["hp"]["lr_forget"] == 3e-4
    assert methods["4th: Oleszko"]["hp"]["keep"] == 0.01 and methods["8th: Team Forget"]["hp"]["cycles"] == [1, 2, 2]
    knows = digits["methods"]["fractions"]["0.1"]["distill_knowledge"]
    assert knows["student of Original"]["forget_acc"] == methods["Distill"]["forget_acc"]
    assert knows["Retrain"]["forget_acc"] == methods["Retrain"]["forget_acc"]  # the forget stage's Retrain, reloaded
    relearning = digits["methods"]["relearning"]
    assert list(relearning) == ["GA (dual)", "DM (ascend)", "DM (descend)"]
    for label, c in relearning.items():
        assert [h["epoch"] for h in c["history"]] == list(range(1, 46)), label
        assert {"forget_acc", "retain_acc", "test_acc"} <= c["history"][0].keys()
    for name, row in methods.items():
        assert {"forget_acc", "retain_acc", "test_acc", "mia_kit", "mia_efficacy", "gap_to_retrain",
                "seconds", "speedup"} <= row.keys(), name
        assert name == "Retrain" or name.startswith("SISA") or row["grid"], "approximate methods record their tuning grid"
    assert methods["Retrain"]["gap_to_retrain"] == 0
    assert [p["k"] for p in digits["cost_curve"]["points"]] == [1, 2]
    assert [p["shards"] for p in digits["accuracy_vs_shards"]["points"]] == [1, 2]
    assert [p["shards"] for p in digits["accuracy_vs_shards_steps"]["points"]] == [1, 2]
    assert methods["SISA (converged)"]["steps_per_constituent"] >= digits["accuracy_vs_shards_steps"]["steps"]
    for p in digits["accuracy_vs_shards_steps"]["points"]:  # view (b): about the same steps for every S
        assert min(p["steps_per_constituent"]) >= digits["accuracy_vs_shards_steps"]["steps"]
    original = digits["methods"]["original"]
    assert original["train_test_gap"] == original["train_acc"] - original["test_acc"]
    assert res["deltagrad"]["resnet18"]["cache_bytes"] > 1e11
    if "skipped" not in res["deltagrad"]:  # MNIST lives in ../shared/datasets
        assert {r["model"] for r in res["deltagrad"]["rows"]} == {"logreg", "mlp"}
    md = (tmp_path / "unlearning_smoke.md").read_text()
    assert "| SISA |" in md and "gap to Retrain" in md and "train/test gap" in md and "| Distill |" in md
    assert "| student of Retrain |" in md and "Does relearning undo the forgetting?" in md
    assert "view (a): equal sample-epochs" in md and "view (b): equal optimiser steps" in md
    if not original["memorised"]:  # one epoch on 120 samples: the report must say so loudly
        assert "does NOT memorise" in md
    for png in ("methods", "cost", "shards", "relearning"):
        assert (tmp_path / f"unlearning_smoke_digits_{png}.png").stat().st_size > 1000


def test_public_backbone_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.public_backbone", "--smoke", "--work", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results" / "public_backbone_smoke.json").read_text())
    assert [r["shards"] for r in res["runs"]] == [1, 5]
    assert res["runs"][1]["features"] == "copied from S=1", "the sweep computes features once"
    assert all(0 < r["checkpoint_bytes_mean"] < 0.01 * res["full_checkpoint_bytes"] for r in res["runs"])
    assert len(res["forgets"]) == 1 and 0 < res["forgets"][0]["seconds"] < res["forgets"][0]["wall_s"]
    assert 0 <= res["pretrain"]["test_accuracy"] <= 1
    md = (tmp_path / "results" / "public_backbone_smoke.md").read_text()
    assert "| public-only (the backbone's own classifier) |" in md and "| SISA heads, S = 5 |" in md


def test_gpu_benchmark_stages_run_and_merge(tmp_path):
    def run(*stages: str) -> subprocess.CompletedProcess:
        args = [a for s in stages for a in ("--stage", s)]
        return subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--smoke", *args, "--results-dir", str(tmp_path),
                               "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=900)

    listed = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--list-stages"], cwd=ROOT, capture_output=True, text=True)
    assert listed.stdout.split() == ["step", "sisa", "breakdown", "determinism", "compile", "concurrent"]
    proc = run("step", "sisa")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run("determinism", "breakdown")  # a later call adds its sections to the same results
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert {"step", "sisa", "determinism", "breakdown"} <= res.keys() and "failed" not in res
    for precision in ("fp32", "bf16"):
        assert res["step"][precision]["pipeline_images_per_s"] > 0 and res["step"][precision]["pipeline_over_bare"] > 0
    # the CUDA-graph arm says why it has no numbers here, at the batch size and a quarter of it
    assert [(g["batch"], "skipped" in g) for g in res["step"]["cuda_graph"]] == [(64, True), (16, True)]
    sisa_ = res["sisa"]
    assert sisa_["sisa_bf16"]["sample_epochs"] > 0 and sisa_["monolithic_fp32"]["accuracy_vote"] > 0
    assert [f["ids"] for f in sisa_["forgets"]] == [1, 1, 8]  # the smoke setting's two single-id requests
    mean = sisa_["forget_1_mean"]
    assert mean["requests"] == 2 and mean["seconds"] == pytest.approx(
        (sisa_["forgets"][0]["seconds"] + sisa_["forgets"][1]["seconds"]) / 2, abs=0.011)
    assert all(f["phase_seconds"]["train"] > 0 for f in sisa_["forgets"])
    assert sisa_["checkpoint_write"]["bytes"] > 0 and sisa_["predict"]["ensemble_over_single_div_S"] > 0
    det = res["determinism"]
    assert det["deterministic"]["forget_equals_retrain"] and det["default"]["forget_equals_retrain"]  # CPU: always
    full = sisa_["sisa_bf16_full_batches"]  # the same single-id draws, on a run with --batching full
    assert [f["ids"] for f in full["forgets"]] == [1, 1] and full["forget_1_mean"]["requests"] == 2
    assert 0 < full["sample_epochs"] < sisa_["sisa_bf16"]["sample_epochs"]  # tails sat out
    parts = res["breakdown"]
    for arm in ("monolithic", "sisa", "sisa_full"):  # on the CPU the bare schedule trains the library's bits
        assert parts[arm]["schedule_equals_library_bits"] and parts[arm]["optimizer_steps"] > 0
    assert parts["sisa"]["sample_epochs"] == sisa_["sisa_bf16"]["sample_epochs"]
    assert parts["sisa_full"]["sample_epochs"] == full["sample_epochs"] and parts["sisa_full"]["batch_shapes"] == 1
    assert all(r > 0 for a in ("sisa", "sisa_full") for r in parts[f"{a}_over_monolithic_per_sample_epoch"].values())
    assert parts["cold_shape"]["cold_step_ms"] > 0 and len(parts["cold_shape"]["sizes"]) == 12
    md = (tmp_path / "gpu_smoke.md").read_text()
    assert "loop / bare" in md and "Deterministic mode" in md and "Where a forget's wall time went" in md
    assert "- batch 16: not measured: CUDA graphs need a CUDA device, not cpu" in md
    assert "| the slice schedule's batches alone |" in md and "per new batch shape" in md
    assert "| SISA, bf16, `--batching full` |" in md and "the same 2 single-id forgets" in md
    assert "The 2 single-id forgets, one request after another" in md


def test_serve_latency_benchmark_smoke(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.serve_latency", "--smoke", "--work", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results" / "serve_latency_smoke.json").read_text())
    assert res["environment"]["command"].startswith("python -m benchmarks.serve_latency --smoke")
    serve = res["serve"]
    for size in ("1", "16"):
        assert serve["idle"][size]["ok"] > 0 and serve["idle"][size]["p99_ms"] > 0
        during = serve["during_forgets"][size]
        assert during["during"]["ok"] > 0 and len(during["forgets"]) >= 2
    forgets = serve["forgets_no_load"] + [f for d in serve["during_forgets"].values() for f in d["forgets"]]
    assert all(f["status"] == "done" and f["samples_deleted"] == 1 and f["generation_moved"] == 1 for f in forgets)
    assert [b["load"] for b in serve["batches"]] == ["none", "4 clients x 1 images"]
    assert all(b["all_done"] and b["samples_deleted"] == 6 for b in serve["batches"])
    assert res["audit_after_forgets"]["ok"], "the forgets through the server left an exact run"
    assert {"p99_ratio_1", "p99_ratio_16", "forget_202_to_done", "zero_failed_predictions",
            "batch_one_retraining"} <= res["targets"].keys()
    add = res["add"]
    assert add["add"]["samples_added"] == add["new_samples"] == 40
    assert {"before", "after", "retrain_all", "retrain_all_cached_features"} <= add.keys()
    assert add["retrain_all_cached_features"]["checkpoints_identical_to_retrain_all"]
    md = (tmp_path / "results" / "serve_latency_smoke.md").read_text()
    assert "## /predict latency" in md and "## `sisa add`" in md and "| zero failed predictions |" in md
