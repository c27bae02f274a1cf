"""Quick trials: train.limit_train_batches / limit_val_batches (the first N global batches, marked in
the run's files) and `tl-dist train CONFIG --dry-run` (seconds, a temporary folder, nothing left)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from tl_dist import config

from .conftest import FAST, ROOT, accelerate_launch, run_cli, train_in_process


def test_limits_train_and_evaluate_the_first_batches_and_the_files_say_so(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_in_process(out, tiny_data, "train.epochs=2", "train.limit_train_batches=2",
                            "train.limit_val_batches=0.5") == 0  # batch 4; val: 13 images, one batch of 32
    said = capsys.readouterr().out
    assert "limited run (train.limit_train_batches / limit_val_batches): 8 train and 13 val images per epoch" in said
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["train_samples"], r["val_samples"]) for r in rows] == [(8, 13), (8, 13)]
    for name in ("best.json", "last.json"):
        assert json.loads((out / name).read_text())["limited"] == {"train_images": 8, "val_images": 13}
    assert train_in_process(tmp_path / "val", tiny_data, "train.epochs=1", "data.eval_batch_size=4",
                            "train.limit_val_batches=2") == 0
    row = json.loads((tmp_path / "val" / "metrics.jsonl").read_text())
    assert (row["train_samples"], row["val_samples"]) == (22, 8) and "limited" in json.loads(
        (tmp_path / "val" / "best.json").read_text())


def test_limits_are_checked_like_every_key():
    assert config.load(None, ["train.limit_train_batches=0.25"]).train.limit_train_batches == 0.25
    for bad in ("1.5", "0", "-2"):
        with pytest.raises(Exception, match="a whole number of batches"):
            config.load(None, [f"train.limit_train_batches={bad}"])


def test_a_dry_run_checks_everything_in_seconds_and_leaves_nothing(tiny_data, tmp_path):
    out = tmp_path / "would_be_run"
    common = ("--config", str(ROOT / "configs" / "demo.yaml"), *[o for o in FAST if o != "train.plots=false"],
              f"data.root={tiny_data}", "data.demo=false", f"train.output_dir={out}")
    (tmp_path / "tmp").mkdir()
    r = run_cli("-m", "tl_dist.train", *common, "--dry-run", env={"TMPDIR": str(tmp_path / "tmp")})
    assert r.returncode == 0, r.stderr[-2000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("dry run: ok in ") and "1 epoch(s) of 2 train steps and 2 val batches" in last
    for name in ("best.safetensors", "resume.pt", "metrics.jsonl", "train_batch.png", "curves.png"):
        assert name in last
    assert f"into {out}" in last and not out.exists() and list((tmp_path / "tmp").iterdir()) == []
    r = run_cli("-m", "tl_dist.train", *common, "--dry-run", "model.mode=frozen_then_finetune", "model.unfreeze_epoch=3",
                env={"TMPDIR": str(tmp_path / "tmp")})
    assert r.returncode == 0 and "the backbone trains from now on" in r.stdout, r.stderr[-2000:]
    r = run_cli("-m", "tl_dist.train", *common, "--dry-run", "data.root=/nonexistent/place")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "/nonexistent/place" in r.stderr


@pytest.mark.slow
def test_a_limited_run_resumes_bit_identical(tiny_data, tmp_path):
    common = ("train.limit_train_batches=3", "train.limit_val_batches=1", "model.mode=frozen", "optim.lr=0.05")
    assert train_in_process(tmp_path / "straight", tiny_data, *common, "train.epochs=3") == 0
    assert train_in_process(tmp_path / "resumed", tiny_data, *common, "train.epochs=1") == 0
    assert train_in_process(tmp_path / "resumed", tiny_data, *common, "train.epochs=3") == 0
    a, b = (load_file(str(tmp_path / n / "last.safetensors")) for n in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.multiproc
def test_a_limit_is_the_first_global_batches_for_any_world_size(tiny_data, tmp_path):
    args = ("--config", str(ROOT / "configs" / "demo.yaml"), *FAST, f"data.root={tiny_data}", "data.demo=false",
            "model.mode=frozen", "train.epochs=2", "optim.lr=0.05", "train.limit_train_batches=2",
            "train.limit_val_batches=1", "data.eval_batch_size=8")
    one = run_cli("-m", "tl_dist.train", *args, f"train.output_dir={tmp_path / 'one'}", "data.batch_size=6")
    assert one.returncode == 0, one.stderr[-3000:]
    two = accelerate_launch(2, *args, f"train.output_dir={tmp_path / 'two'}", "data.batch_size=3")
    assert two.returncode == 0, two.stderr[-3000:]
    ra, rb = ([json.loads(l) for l in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("one", "two"))
    assert [(r["train_samples"], r["val_samples"]) for r in ra] == [(12, 8), (12, 8)]
    assert [(r["train_samples"], r["val_samples"]) for r in rb] == [(12, 8), (12, 8)]
    a, b = (load_file(str(tmp_path / n / "last.safetensors")) for n in ("one", "two"))
    torch.testing.assert_close(a["fc.weight"], b["fc.weight"], rtol=1e-5, atol=1e-6)
