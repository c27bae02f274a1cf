"""The Python API (docs/python.md): tl_dist.train / evaluate / Predictor / load_config give what the
commands give (the same files, the same weights), and raise UserError where the commands exit 2."""
import json

import pytest
import torch
from safetensors.torch import load_file

import tl_dist

from .conftest import FAST, ROOT, run_cli, train_in_process


def settings(data_dir, out) -> dict:
    over = dict(o.split("=", 1) for o in FAST)
    return {**over, "data": {"root": str(data_dir), "demo": False, "batch_size": 4},
            "train": {"output_dir": str(out), "epochs": 2}, "model.mode": "frozen", "optim.lr": 0.05}


def test_train_and_evaluate_from_python_give_what_the_commands_give(tiny_data, tmp_path):
    result = tl_dist.train(ROOT / "configs" / "demo.yaml", **settings(tiny_data, tmp_path / "py"))
    assert result.output_dir == tmp_path / "py" and [r["epoch"] for r in result.history] == [0, 1]
    assert train_in_process(tmp_path / "cli", tiny_data, "train.epochs=2", "model.mode=frozen", "optim.lr=0.05") == 0
    a, b = (load_file(str(tmp_path / n / "last.safetensors")) for n in ("py", "cli"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same run, bit for bit
    best = json.loads((tmp_path / "py" / "best.json").read_text())
    assert result.best_epoch_val_acc == best["val_acc"]
    metrics = tl_dist.evaluate(tiny_data, result.output_dir, split="val")
    assert metrics["accuracy"] == best["val_acc"] and metrics["n"] == 13
    assert metrics == json.loads((tmp_path / "py" / "eval_val" / "metrics.json").read_text())
    predictor = tl_dist.Predictor.from_checkpoint(result.output_dir, device="cpu")
    assert predictor.classes == ["ants", "bees"]


def test_settings_are_checked_as_the_command_line_checks_them():
    cfg = tl_dist.load_config(ROOT / "configs" / "frozen.yaml", train={"epochs": 3}, **{"data.scale": [0.5, 1.0]})
    assert (cfg.train.epochs, cfg.data.scale, cfg.model.mode) == (3, [0.5, 1.0], "frozen")
    assert tl_dist.load_config(cfg, optim={"lr": 0.01}).optim.lr == 0.01  # a Config, then more settings
    with pytest.raises(tl_dist.UserError,
                       match=r"unknown key 'train.epoch' \(in Python settings\) \(did you mean 'train.epochs'\?\)"):
        tl_dist.load_config(train={"epoch": 3})
    with pytest.raises(tl_dist.UserError, match=r"train.epochs \(in Python settings\) must be an integer, got 'many'"):
        tl_dist.train(train={"epochs": "many"})


def test_importing_the_package_imports_nothing_heavy():
    r = run_cli("-c", "import sys, tl_dist; print(sorted(m for m in ('torch', 'accelerate', 'timm') if m in sys.modules))")
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr[-2000:]
