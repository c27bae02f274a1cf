"""train.log_with: TensorBoard gets every epoch's metrics, the learning rate per optimizer step, the
config and the pictures; a resumed run continues the same log with no step twice, even after a
segment that logged an epoch whose files never landed."""
import shutil

import pytest

from tl_dist.commands import train

from .conftest import ROOT, train_in_process

pytestmark = pytest.mark.slow
RUN_FILES = ("resume.pt", "last.safetensors", "last.json", "best.safetensors", "best.json", "metrics.jsonl",
             "status.json")


def scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tl_dist"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return ea, {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_tensorboard_logs_a_resumed_run_once(tiny_data, tmp_path):
    run = tmp_path / "run"
    log = ["train.log_with=tensorboard", "data.batch_size=4"]  # 22 train images: 6 steps, the last of 2
    assert train_in_process(run, tiny_data, *log, "train.epochs=1") == 0
    saved = tmp_path / "after_epoch_0"
    saved.mkdir()
    for f in RUN_FILES:
        shutil.copy2(run / f, saved / f)
    assert train_in_process(run, tiny_data, *log, "train.epochs=2") == 0
    # As if epoch 1 was logged but the process was killed before its files landed: resuming redoes it.
    for f in RUN_FILES:
        shutil.copy2(saved / f, run / f)
    assert train_in_process(run, tiny_data, *log, "train.epochs=3", "train.plots=true") == 0

    ea, s = scalars(run)
    assert [step for step, _ in s["val_acc"]] == [22, 44, 66]  # images seen at each epoch's end, once each
    assert [v for _, v in s["epoch"]] == [0, 1, 2]
    import json
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [pytest.approx(r["val_acc"]) for r in rows] == [v for _, v in s["val_acc"]]
    steps = [step for step, _ in s["lr"]]
    assert steps == [e * 22 + min(22, i * 4) for e in range(3) for i in range(1, 7)]  # each optimizer step, once
    assert {"train_loss", "train_acc", "val_loss", "seconds", "backbone_lr"} <= set(s)
    assert set(ea.Tags()["images"]) >= {"curves", "confusion_matrix", "val_predictions"}
    hparams = list((run / "tl_dist").glob("*/hparams.yml"))
    assert hparams and f"data.root: {tiny_data}" in hparams[0].read_text()


def test_a_tracker_that_is_not_there_is_one_line_before_any_work(tiny_data, tmp_path, capsys):
    import importlib.util
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    for value, words in (("wandb", "wandb is not installed (pip install wandb)"),
                         ("tensorbored", "must be one of tensorboard|wandb")):
        assert train.main(["--config", str(ROOT / "configs" / "demo.yaml"), f"data.root={tiny_data}",
                           "data.demo=false", f"train.output_dir={tmp_path / value}",
                           f"train.log_with={value}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "wandb").exists()


def test_a_tracker_folder_that_is_a_file_is_one_line_before_any_work(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "tl_dist").write_text("not a folder")
    assert train_in_process(out, tiny_data, "train.epochs=1", "train.log_with=[tensorboard]") == 2
    err = capsys.readouterr().err.split("\r")[-1]
    assert err.count("\n") == 1 and "tensorboard writes into" in err and "which is a file" in err, err
    assert (out / "tl_dist").read_text() == "not a folder" and not (out / "status.json").exists()
