"""The tutorial's workflow end to end on one small run, in the default (fast) tier: train, a run
directory that describes itself, predict scoring the val set as training did, evaluate reproducing
the run's numbers exactly, an ONNX export predicting alike, a resume that continues bit for bit, and
the run listed as complete. A small backbone (ShuffleNet V2 x0.5, 6 MB of files) at 32 px keeps it
to seconds; the slow tier checks each step in depth, on ResNet18 and every family."""
import json

import pytest
import torch
from safetensors.torch import load_file

from tl_dist.files import checkpoint
from tl_dist.commands import evaluate, export, runs
from tl_dist.predictor import Predictor

from .conftest import train_in_process

ARCH = "shufflenet_v2_x0_5"


@pytest.fixture(scope="module")
def small_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("workflow") / "run"
    assert train_in_process(out, tiny_data, "train.epochs=2", f"model.arch={ARCH}") == 0
    return out


def val_images(tiny_data):
    paths = sorted((tiny_data / "val").rglob("*.jpg"))
    return [str(p) for p in paths], [p.parent.name for p in paths]


def test_the_run_directory_describes_itself(small_run):
    names = {p.name for p in small_run.iterdir()}
    assert {"best.safetensors", "best.json", "last.safetensors", "last.json", "resume.pt", "metrics.jsonl",
            "config.yaml", "status.json"} <= names
    assert not [n for n in names if n.endswith(".tmp") or n == ".lock"]  # nothing half-written, lock released
    meta = checkpoint.read_metadata(small_run / "best.safetensors")
    assert (meta["arch"], meta["classes"], meta["image_size"], meta["resize_size"]) == (ARCH, ["ants", "bees"], 32, 36)
    rows = [json.loads(line) for line in (small_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    best = json.loads((small_run / "best.json").read_text())
    assert best["val_acc"] == max(r["val_acc"] for r in rows) and best == meta
    assert json.loads((small_run / "status.json").read_text())["status"] == "complete"


def test_predict_scores_the_val_set_as_training_did(small_run, tiny_data):
    paths, truth = val_images(tiny_data)
    results = Predictor.from_checkpoint(small_run, device="cpu").predict(paths, topk=2, batch_size=5)
    correct = sum(r["label"] == t for r, t in zip(results, truth))
    assert correct / len(paths) == json.loads((small_run / "best.json").read_text())["val_acc"]


def test_evaluate_reproduces_the_runs_val_numbers(small_run, tiny_data, tmp_path, capsys):
    assert evaluate.main([str(tiny_data), "--split", "val", "--checkpoint", str(small_run), "--out",
                          str(tmp_path / "ev"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.splitlines()[-1])
    best = json.loads((small_run / "best.json").read_text())
    assert (metrics["accuracy"], metrics["loss"], metrics["n"]) == (best["val_acc"], best["val_loss"], 13)


def test_an_onnx_export_predicts_as_the_checkpoint(small_run, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "LATENCY_BUDGET_S", 0.05)
    out = tmp_path / "model.onnx"
    assert export.main([str(small_run), "--out", str(out), "--dynamic-batch"]) == 0
    paths, _ = val_images(tiny_data)
    want = Predictor.from_checkpoint(small_run, device="cpu").predict(paths)
    got = Predictor.from_checkpoint(out, device="cpu").predict(paths)
    assert [r["label"] for r in got] == [r["label"] for r in want]
    assert max(abs(a["prob"] - b["prob"]) for a, b in zip(got, want)) < 1e-4


def test_a_resumed_run_ends_bit_identical_to_the_uninterrupted_one(small_run, tiny_data, tmp_path):
    out = tmp_path / "resumed"
    assert train_in_process(out, tiny_data, "train.epochs=1", f"model.arch={ARCH}") == 0
    assert train_in_process(out, tiny_data, "train.epochs=2", f"model.arch={ARCH}") == 0  # continues from epoch 0
    a, b = load_file(str(out / "last.safetensors")), load_file(str(small_run / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_runs_lists_the_run_as_complete(small_run, capsys):
    assert runs.main([str(small_run.parent), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert (row["name"], row["arch"], row["status"], row["epochs_done"]) == ("run", ARCH, "complete", 2)
