"""Real multi-process training on CPU (gloo) under accelerate launch."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tl_dist import model

from .conftest import FAST, ROOT, accelerate_launch, run_cli

pytestmark = pytest.mark.multiproc


def _args(data_dir, out, *over):
    return ["--config", str(ROOT / "configs" / "demo.yaml"), *FAST, f"data.root={data_dir}", "data.demo=false",
            f"train.output_dir={out}", *over]


def test_two_processes_one_job_one_writer(tiny_data, tmp_path):
    r = accelerate_launch(2, *_args(tiny_data, tmp_path, "train.epochs=2", "data.batch_size=3"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    assert r.stdout.count("epoch 1/2 ") == 1 and r.stdout.count("epoch 2/2 ") == 1  # rank 0 alone prints
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["world_size"] == 2
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_samples"] for r in rows] == [13, 13]  # odd val set: nothing counted twice or dropped
    assert [r["train_samples"] for r in rows] == [22, 22]  # padding to even out ranks is not counted
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no stray temp files


def test_frozen_parity_one_vs_two_processes(tiny_data, tmp_path):
    """1 process with batch 2B == 2 processes with batch B: same fc weights, same val metrics."""
    save_file(model.create("resnet18", 1000).state_dict(), str(tmp_path / "init.safetensors"))
    common = ("model.mode=frozen", f"model.weights={tmp_path / 'init.safetensors'}", "train.epochs=2",
              "optim.lr=0.05")
    one = run_cli("-m", "tl_dist.train", *_args(tiny_data, tmp_path / "one", *common, "data.batch_size=6"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = accelerate_launch(2, *_args(tiny_data, tmp_path / "two", *common, "data.batch_size=3"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (load_file(str(tmp_path / n / "last.safetensors")) for n in ("one", "two"))
    assert not torch.allclose(a["fc.weight"], load_file(str(tmp_path / "init.safetensors"))["fc.weight"][:2])
    torch.testing.assert_close(a["fc.weight"], b["fc.weight"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["fc.bias"], b["fc.bias"], rtol=1e-5, atol=1e-6)
    ra, rb = ([json.loads(l) for l in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("one", "two"))
    for x, y in zip(ra, rb):
        assert x["val_acc"] == y["val_acc"] and x["val_samples"] == y["val_samples"] == 13
        assert abs(x["val_loss"] - y["val_loss"]) < 1e-5 and abs(x["train_loss"] - y["train_loss"]) < 1e-5
