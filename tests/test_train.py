"""End-to-end CPU runs of the trainer, in-process (python -m tl_dist.train's own main())."""
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from tl_dist.files import checkpoint, resume_file, run_dir
from tl_dist.models import backbones
from tl_dist.training import trainer
from tl_dist.predictor import Predictor

from .conftest import FAST, ROOT, make_images
from .conftest import train_in_process as _run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finetune_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft")
    assert _run(out, tiny_data, "train.epochs=3", "train.plots=true") == 0
    return out


def test_run_directory_and_metadata(finetune_run, tiny_data):
    out = finetune_run
    for f in ("best.safetensors", "best.json", "last.safetensors", "last.json", "metrics.jsonl", "config.yaml",
              "resume.pt"):
        assert (out / f).is_file(), f
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert all(r["train_samples"] == 22 and r["val_samples"] == 13 for r in rows)
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "macro_f1", "lr", "backbone_lr",
                            "seconds", "train_samples", "val_samples", "train_seconds", "val_seconds", "peak_host_mb"}
    assert all(0 <= r["macro_f1"] <= 1 for r in rows)
    best = json.loads((out / "best.json").read_text())
    top = max(r["val_acc"] for r in rows)
    assert best["val_acc"] == top and best["epoch"] == next(r["epoch"] for r in rows if r["val_acc"] == top)
    assert best["classes"] == ["ants", "bees"] and best["num_classes"] == 2 and best["arch"] == "resnet18"
    assert best["world_size"] == 1 and best["mixed_precision"] == "no" and best["mode"] == "finetune"
    assert (best["image_size"], best["resize_size"]) == (32, 36) and len(best["mean"]) == 3
    assert best["config"]["train"]["epochs"] == 3 and "torch" in best["versions"]
    assert json.loads((out / "last.json").read_text())["epoch"] == 2
    # The weights file carries the same description in its own header.
    assert checkpoint.read_metadata(out / "best.safetensors") == best
    assert list(load_file(str(out / "best.safetensors")))[0].split(".")[0] in dict(backbones.create("resnet18", 2).named_children())


def test_pictures_written(finetune_run):
    for name, min_size in (("train_batch", 400), ("val_predictions", 400), ("curves", 400), ("confusion_matrix", 200)):
        with Image.open(finetune_run / f"{name}.png") as im:
            im.verify()
        with Image.open(finetune_run / f"{name}.png") as im:
            assert im.width >= min_size and im.height >= 150, name


def test_predictor_accuracy_equals_val_acc(finetune_run, tiny_data):
    p = Predictor.from_checkpoint(finetune_run, device="cpu")
    paths = sorted((tiny_data / "val").rglob("*.jpg"))
    res = p.predict([str(x) for x in paths], topk=2, batch_size=5)
    correct = sum(r["label"] == x.parent.name for r, x in zip(res, paths))
    assert correct / len(paths) == json.loads((finetune_run / "best.json").read_text())["val_acc"]


def test_same_seed_same_run(tiny_data, tmp_path):
    for name in ("a", "b"):
        assert _run(tmp_path / name, tiny_data, "train.epochs=1") == 0
    a, b = (load_file(str(tmp_path / n / "last.safetensors")) for n in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("background", [False, True], ids=["between-epochs", "background"])
def test_failed_checkpoint_write_stops_the_run_and_loses_no_epoch(tiny_data, tmp_path, monkeypatch, capsys,
                                                                  background):
    """Whether files are written between epochs (CPU) or while the next epoch trains (GPU), a failed
    write stops the run with a clear error, the epoch before stays resumable, and the same command
    then finishes the run."""
    monkeypatch.setattr(trainer, "write_in_background", lambda: background)
    real, calls = resume_file.save_state, []

    def disk_full_at_epoch_1(path, state):
        calls.append(state["epoch"])
        if state["epoch"] == 1:
            raise OSError(28, "No space left on device")
        real(path, state)
    monkeypatch.setattr(resume_file, "save_state", disk_full_at_epoch_1)
    out = tmp_path / "run"
    assert _run(out, tiny_data, "train.epochs=4") == 2
    err = capsys.readouterr().err
    assert "writing epoch 1's files in" in err and "No space left on device" in err and str(out) in err
    assert calls == [0, 1]  # stopped at the next epoch boundary, before writing another epoch
    assert resume_file.load_state(out / "resume.pt")["epoch"] == 0
    monkeypatch.setattr(resume_file, "save_state", real)
    assert _run(out, tiny_data, "train.epochs=4") == 0
    assert "after epoch 0" in capsys.readouterr().out  # "resuming ... after epoch 0"
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]


def test_a_finished_run_started_again_says_so_and_writes_nothing(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out, tiny_data, "train.epochs=1") == 0
    capsys.readouterr()
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.name != "status.json"}
    assert _run(out, tiny_data, "train.epochs=1") == 0
    said = capsys.readouterr().out
    assert f"{out} is complete: all 1 epochs done; best val acc" in said and "Nothing to do" in said
    assert "resuming" not in said and "epoch 0 (1 of 1)" not in said
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir() if p.name != "status.json"} == before
    assert json.loads((out / "status.json").read_text())["status"] == "complete"
    assert _run(out, tiny_data, "train.epochs=2") == 0  # more epochs: it continues
    assert "resuming" in capsys.readouterr().out


def test_frozen_backbone_and_bn_buffers_bit_identical(tiny_data, tmp_path):
    init = backbones.create("resnet18", 1000).state_dict()
    save_file(init, str(tmp_path / "init.safetensors"))
    assert _run(tmp_path / "run", tiny_data, "model.mode=frozen", "train.epochs=2",
                f"model.weights={tmp_path / 'init.safetensors'}") == 0
    for name in ("best", "last"):
        got = load_file(str(tmp_path / "run" / f"{name}.safetensors"))
        for k, v in init.items():
            if not k.startswith("fc."):
                assert torch.equal(got[k], v), k  # parameters and BN running stats alike
    # The seed's behaviour on request: BN statistics move although no parameter does.
    assert _run(tmp_path / "seedbn", tiny_data, "model.mode=frozen", "train.epochs=1", "model.frozen_bn=train",
                f"model.weights={tmp_path / 'init.safetensors'}") == 0
    got = load_file(str(tmp_path / "seedbn" / "last.safetensors"))
    assert torch.equal(got["conv1.weight"], init["conv1.weight"])
    assert not torch.equal(got["bn1.running_mean"], init["bn1.running_mean"])


def test_bad_images_stop_or_are_skipped(tmp_path, capsys):
    data_dir = make_images(tmp_path / "d", {"train": {"a": 6, "b": 6}, "val": {"a": 3, "b": 3}})
    (data_dir / "train" / "a" / "broken.jpg").write_bytes(b"")
    (data_dir / "val" / "b" / "fake.png").write_text("hello")
    assert _run(tmp_path / "r1", data_dir, "train.epochs=1") == 2
    err = capsys.readouterr().err
    assert "2 bad image file(s)" in err and "broken.jpg" in err and "fake.png" in err and "skip_bad_images" in err
    assert not (tmp_path / "r1" / "last.safetensors").exists()
    assert _run(tmp_path / "r2", data_dir, "train.epochs=1", "data.skip_bad_images=true") == 0
    assert "leaving out 2 bad image file(s)" in capsys.readouterr().out
    row = json.loads((tmp_path / "r2" / "metrics.jsonl").read_text())
    assert row["train_samples"] == 12 and row["val_samples"] == 6


def test_unwritable_output_dir_fails_before_training(tiny_data, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _run(blocker / "sub", tiny_data, "train.epochs=1") == 2
    assert "is not writable" in capsys.readouterr().err


def test_resume_refuses_other_mode(finetune_run, tiny_data, capsys):
    assert _run(finetune_run, tiny_data, "train.epochs=4", "model.mode=frozen") == 2
    assert "trained with mode='finetune'" in capsys.readouterr().err


def test_grad_accumulation_matches_larger_batch(tiny_data, tmp_path):
    """k accumulated micro-batches == one k-times-larger batch (frozen: BN fixed, so exact in fp32)."""
    save_file(backbones.create("resnet18", 1000).state_dict(), str(tmp_path / "init.safetensors"))
    common = ("model.mode=frozen", f"model.weights={tmp_path / 'init.safetensors'}", "train.epochs=1",
              "optim.lr=0.05")
    assert _run(tmp_path / "big", tiny_data, *common, "data.batch_size=6") == 0
    assert _run(tmp_path / "acc", tiny_data, *common, "data.batch_size=2", "train.grad_accum_steps=3") == 0
    a, b = (load_file(str(tmp_path / n / "last.safetensors")) for n in ("big", "acc"))
    torch.testing.assert_close(a["fc.weight"], b["fc.weight"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["fc.bias"], b["fc.bias"], rtol=1e-5, atol=1e-6)


def test_ranks_out_of_sync_is_an_error():
    from tl_dist.distributed import check_in_sync
    check_in_sync(["ab", "ab", "ab"], epoch=3)
    with pytest.raises(RuntimeError, match=r"out of sync after epoch 3: rank\(s\) \[2\]"):
        check_in_sync(["ab", "ab", "cd"], epoch=3)


def test_bf16_keeps_fp32_master_weights(tiny_data, tmp_path):
    """Mixed precision computes in bf16 but the weights and optimizer state stay fp32."""
    assert _run(tmp_path / "bf16", tiny_data, "train.epochs=1", "train.mixed_precision=bf16") == 0
    best = json.loads((tmp_path / "bf16" / "best.json").read_text())
    assert best["mixed_precision"] == "bf16"
    weights = load_file(str(tmp_path / "bf16" / "last.safetensors"))
    assert {v.dtype for k, v in weights.items() if "num_batches" not in k} == {torch.float32}
    state = torch.load(tmp_path / "bf16" / "resume.pt", weights_only=True)
    momenta = [s["momentum_buffer"] for s in state["optimizer"]["state"].values()]
    assert momenta and all(m.dtype == torch.float32 for m in momenta)


def test_frozen_val_features_reused_bit_for_bit(tiny_data, tmp_path):
    """Frozen: from epoch 2 on, eval runs fc on the kept val features; the numbers are the same as
    running the whole network (cache_gb=0 keeps nothing)."""
    init = tmp_path / "init.safetensors"
    save_file(backbones.create("resnet18", 1000).state_dict(), str(init))
    common = ("model.mode=frozen", f"model.weights={init}", "train.epochs=3", "optim.lr=0.05")
    assert _run(tmp_path / "kept", tiny_data, *common) == 0
    assert _run(tmp_path / "full", tiny_data, *common, "data.cache_gb=0") == 0
    a, b = ([json.loads(l) for l in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("kept", "full"))
    assert len({r["val_loss"] for r in a}) == 3  # fc changes, so the val numbers do
    assert [(r["val_loss"], r["val_acc"]) for r in a] == [(r["val_loss"], r["val_acc"]) for r in b]


def test_device_data_path_trains(tiny_data, tmp_path):
    """data.cache=device (the GPU path: images held and augmented on the training device) end to end."""
    assert _run(tmp_path / "dev", tiny_data, "train.epochs=2", "data.cache=device") == 0
    best = json.loads((tmp_path / "dev" / "best.json").read_text())
    assert best["data_path"].startswith("decoded once, kept in cpu memory; crop/resize/flip on cpu")
    rows = [json.loads(l) for l in (tmp_path / "dev" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_samples"] for r in rows] == [22, 22] and [r["val_samples"] for r in rows] == [13, 13]


def test_a_new_run_removes_temp_files_a_killed_run_left_and_prints_whole_paths(tiny_data, tmp_path):
    """A SIGKILL during a write leaves a checkpoint-sized temp file; the next run in that directory
    removes its own kind (and nothing else). Piped output keeps the 'best weights' path on one line."""
    out = tmp_path / ("a-long-run-directory-name-" * 6) / "run"
    out.mkdir(parents=True)
    stale = [out / ".best.safetensors.k2j3h4.tmp", out / ".resume.pt.x8y7.tmp"]
    for p in stale:
        p.write_bytes(b"\0" * 1000)
    (out / ".notes.tmp").write_text("not tl_dist's")
    r = subprocess.run([sys.executable, "-m", "tl_dist.train", "--config", str(ROOT / "configs" / "demo.yaml"), *FAST,
                        f"data.root={tiny_data}", "data.demo=false", f"train.output_dir={out}", "train.epochs=1"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert not any(p.exists() for p in stale) and (out / ".notes.tmp").read_text() == "not tl_dist's"
    assert f"best weights: {out / 'best.safetensors'}\n" in r.stdout
    assert "epoch 0 (1 of 1)  train loss" in r.stdout


def test_a_second_run_into_a_locked_run_directory_is_refused_before_touching_it(finetune_run, tiny_data, capsys):
    """Two runs into one output_dir would interleave their files: while one holds the directory,
    another gets one line naming the holder and changes nothing there."""
    holder = run_dir.RunLock()
    holder.acquire(finetune_run)
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in finetune_run.iterdir()}
    try:
        assert _run(finetune_run, tiny_data, "train.epochs=5") == 2
        after = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in finetune_run.iterdir()}
    finally:
        holder.release()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"is in use by another run (pid {__import__('os').getpid()} on" in err
    assert after == before


def test_a_lock_left_by_a_killed_run_is_taken_over(tiny_data, tmp_path):
    """The kernel drops a killed process's lock; the next run goes ahead."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from tl_dist.files.run_dir import RunLock; p = Path(sys.argv[1]); p.mkdir(); "
                               "RunLock().acquire(p); print('locked', flush=True); time.sleep(60)", str(out)],
                              stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    assert "pid" in (out / ".lock").read_text()  # what the dead holder left
    assert _run(out, tiny_data, "train.epochs=1") == 0


def test_every_file_of_a_run_has_the_same_mode_as_its_pictures(finetune_run):
    modes = {p.name: p.stat().st_mode & 0o777 for p in finetune_run.iterdir() if not p.name.startswith(".")}
    assert len(set(modes.values())) == 1, modes


@pytest.mark.parametrize("n", [2, 12, 50])
def test_pictures_stay_legible_with_many_classes_and_long_names(tmp_path, n):
    """Captions wrap instead of running into the next tile; the confusion matrix (counts and the
    row-normalised view) grows with the class count instead of cutting names."""
    from tl_dist import visualize
    names = [f"class_{i:02d}_with_a_thirty_char_nm"[:30] for i in range(n)]
    g = torch.Generator().manual_seed(n)
    cm = torch.randint(0, 5, (n, n), generator=g) + torch.diag(torch.randint(10, 40, (n,), generator=g))
    visualize.confusion_matrix(cm, names, tmp_path / "cm.png")
    items = [(torch.zeros(3, 32, 32, dtype=torch.uint8), f"pred: {names[i % n]} (0.90)\ntrue: {names[0]}", i % 2 == 0)
             for i in range(8)]
    visualize.grid(items, tmp_path / "grid.png")
    assert all(len(line) <= visualize.CAPTION_CHARS for line in visualize._wrap(items[1][1]).splitlines())
    with Image.open(tmp_path / "cm.png") as im:
        assert im.width >= 350 + 30 * n and im.height >= 200 + 14 * n
    with Image.open(tmp_path / "grid.png") as im:
        im.verify()


def test_per_step_loss_and_learning_rate_add_up_to_the_epochs_and_resume_exactly(tiny_data, tmp_path, capsys):
    # (StepLR with a warm-up: the curve does not depend on train.epochs, so a run of 1 then 2 epochs
    # must give the same steps as a run of 2)
    common = ("model.mode=frozen", "scheduler.name=step", "scheduler.warmup_epochs=1", "optim.lr=0.01")
    assert _run(tmp_path / "run", tiny_data, *common, "train.epochs=2", "train.plots=true") == 0
    said = capsys.readouterr().out
    steps = resume_file.load_state(tmp_path / "run" / "resume.pt")["steps"]
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sizes = torch.tensor([4.0] * 5 + [2.0])  # 22 train images in batches of 4: six steps an epoch
    assert steps.shape == (12, 4) and torch.all(torch.diff(steps[:, 0]) > 0)
    for e, row in enumerate(rows):
        mine = steps[6 * e:6 * (e + 1)]
        assert float(mine[-1, 0]) == e + 1 and float(mine[0, 0]) == pytest.approx(e + 4 / 22)
        # the steps' losses, weighted by their images, are the epoch's train loss
        assert float((mine[:, 1] * sizes).sum() / sizes.sum()) == pytest.approx(row["train_loss"], rel=1e-9)
    assert float(steps[0, 2]) == pytest.approx(0.01 * 0.01)  # the warm-up's first step: warmup_start_factor x lr
    assert rows[0]["lr_last"] == float(steps[5, 2]) and f"lr {rows[0]['lr']:.2g}->{rows[0]['lr_last']:.2g}" in said
    assert "lr_last" not in rows[1]  # (constant through epoch 1)
    with Image.open(tmp_path / "run" / "curves.png") as im:
        im.verify()
    assert _run(tmp_path / "resumed", tiny_data, *common, "train.epochs=1") == 0
    assert _run(tmp_path / "resumed", tiny_data, *common, "train.epochs=2") == 0
    assert torch.equal(resume_file.load_state(tmp_path / "resumed" / "resume.pt")["steps"], steps)
