"""Traps found by trying tl_dist as a careless or hostile user would: each ends in one line and
exit 2 (or a quiet, correct exit), never a traceback, and nothing the user had is lost."""
import json
import subprocess
import sys

import pytest
import torch

from tl_dist.files import atomic, resume_file

from .conftest import FAST, ROOT, make_images, run_cli
from .conftest import train_in_process as _run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def one_epoch(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    assert _run(out, tiny_data, "train.epochs=1") == 0
    return out


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.split("\r")[-1]  # (after the progress bar's redraws)
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


def test_a_loss_that_becomes_nan_stops_the_run_and_keeps_the_last_good_epoch(one_epoch, tiny_data, tmp_path,
                                                                            capsys):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(one_epoch, out)
    assert _run(out, tiny_data, "train.epochs=3", "optim.lr=1e30") == 2
    err = _one_error_line(capsys)
    assert "loss became nan in epoch 1" in err or "loss became inf in epoch 1" in err
    assert "the last good epoch (0) is kept" in err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]  # strict JSON
    assert [r["epoch"] for r in rows] == [0]
    assert resume_file.load_state(out / "resume.pt")["epoch"] == 0
    json.loads((out / "best.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in best.json"))


def test_starting_afresh_over_a_run_is_refused(one_epoch, tiny_data, capsys):
    best = (one_epoch / "best.safetensors").read_bytes()
    assert _run(one_epoch, tiny_data, "train.epochs=1", "train.resume=none") == 2
    assert "would start afresh in" in _one_error_line(capsys)
    assert (one_epoch / "best.safetensors").read_bytes() == best


def test_a_resume_state_that_does_not_fit_the_model_is_one_line(one_epoch, tiny_data, tmp_path, capsys):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(one_epoch, out)
    state = resume_file.load_state(out / "resume.pt")
    state["model"]["fc.weight"] = torch.zeros(2, 7)
    resume_file.save_state(out / "resume.pt", state)
    assert _run(out, tiny_data, "train.epochs=2") == 2
    assert "do not fit resnet18" in _one_error_line(capsys)
    (out / "resume.pt").write_bytes(b"")  # empty: the error handler must not fail on an empty message
    assert _run(out, tiny_data, "train.epochs=2") == 2
    assert "is damaged or not tl_dist's" in _one_error_line(capsys)


def test_disk_full_when_the_config_is_written_is_one_line(tiny_data, tmp_path, monkeypatch, capsys):
    real = atomic.atomic_write_text

    def full(path, text):
        if str(path).endswith("config.yaml"):
            raise OSError(28, "No space left on device")
        real(path, text)
    monkeypatch.setattr(atomic, "atomic_write_text", full)
    assert _run(tmp_path / "run", tiny_data, "train.epochs=1") == 2
    assert "config.yaml failed: No space left on device" in _one_error_line(capsys)


def test_empty_class_folders_are_refused_and_macos_zip_folders_ignored(tmp_path, capsys):
    root = make_images(tmp_path / "d", {"train": {"a": 3, "b": 3}, "val": {"a": 2, "b": 2}})
    for split in ("train", "val"):
        (root / split / "__MACOSX").mkdir()
    assert _run(tmp_path / "ok", root, "train.epochs=1") == 0
    assert json.loads((tmp_path / "ok" / "best.json").read_text())["classes"] == ["a", "b"]
    capsys.readouterr()
    (root / "train" / "c").mkdir()
    (root / "val" / "c").mkdir()
    assert _run(tmp_path / "bad", root, "train.epochs=1") == 2
    assert "with no image files: c" in _one_error_line(capsys)


def test_predictor_output_into_a_closed_pipe_a_full_disk_or_a_missing_folder(one_epoch, tiny_data, tmp_path):
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    cmd = f"{sys.executable} -m tl_dist.predict {tiny_data / 'val'} --checkpoint {one_epoch} --json"
    r = subprocess.run(f"{cmd} --batch-size 1 | head -1", shell=True, capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=120)
    assert len(r.stdout.splitlines()) == 1 and r.stderr == ""
    r = subprocess.run(f"{cmd} > /dev/full", shell=True, capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "writing the results failed" in r.stderr
    r = run_cli("-m", "tl_dist.predict", str(tiny_data / "val"), "--checkpoint", str(one_epoch),
                "--save-plot", str(tmp_path / "missing" / "p.png"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr


def test_training_with_stdout_on_a_full_disk_still_trains(tiny_data, tmp_path):
    r = subprocess.run(f"{sys.executable} -m tl_dist.train " + " ".join(
        [*FAST, f"data.root={tiny_data}", f"train.output_dir={tmp_path / 'run'}", "train.epochs=1"]) + " > /dev/full",
        shell=True, capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin",
                                                                     "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "run" / "best.safetensors").exists()


@pytest.mark.parametrize("delay", [0.3, 2.5])
def test_ctrl_c_during_start_up_is_a_quiet_interrupt(tiny_data, tmp_path, delay):
    import signal
    import time
    p = subprocess.Popen([sys.executable, "-m", "tl_dist.train", *FAST, f"data.root={tiny_data}",
                          f"train.output_dir={tmp_path / 'run'}", "train.epochs=1"], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "interrupted" in err + out and "is saved in" not in out  # no epoch was complete


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_kept(tiny_data, tmp_path, capsys):
    precious = tmp_path / "thesis.txt"
    precious.write_text("three years of work")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").symlink_to(precious)
    assert _run(out, tiny_data, "train.epochs=1") == 2
    assert ".lock is a symbolic link" in _one_error_line(capsys)
    assert precious.read_text() == "three years of work" and (out / ".lock").is_symlink()


def test_named_pipes_are_reported_never_opened(one_epoch, tiny_data, tmp_path):
    import os
    folder = make_images(tmp_path / "imgs", {"x": {"ants": 2}}) / "x" / "ants"
    os.mkfifo(folder / "pipe.jpg")
    # a pipe named on the command line, and one found inside a folder: no process waits for a writer
    r = run_cli("-m", "tl_dist", "predict", str(folder / "pipe.jpg"), "--checkpoint", str(one_epoch), timeout=120)
    assert r.returncode == 2 or r.returncode == 1
    assert "pipe.jpg: not a regular file (a named pipe (FIFO))" in r.stderr, r.stderr
    r = run_cli("-m", "tl_dist", "predict", str(folder), "--checkpoint", str(one_epoch), "--json", timeout=120)
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert r.returncode == 1 and len(rows) == 3 and sum("error" in row for row in rows) == 1
    r = run_cli("-m", "tl_dist", "export", str(one_epoch), "--format", "torchscript", "--out",
                str(tmp_path / "m.pt"), "--images", str(folder / "pipe.jpg"), timeout=120)
    assert r.returncode == 2 and "not a regular file" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_values_that_would_run_without_bound_are_refused_in_one_line(tiny_data, tmp_path):
    for args, words in ((["train", str(ROOT / "configs" / "demo.yaml"), "train.mixup_alpha=1e308"],
                         "train.mixup_alpha"),
                        (["train", str(ROOT / "configs" / "demo.yaml"), "train.cutmix_alpha=1e6"], "up to 100"),
                        (["lr-find", str(ROOT / "configs" / "demo.yaml"), "--steps", "1000000000000"],
                         "--steps must be from 5 to 10000")):
        r = run_cli("-m", "tl_dist", *args, timeout=60)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr


def test_a_warm_up_longer_than_the_run_is_said(tiny_data, tmp_path, capsys):
    assert _run(tmp_path / "r", tiny_data, "train.epochs=1", "scheduler.warmup_epochs=3") == 0
    assert "warning: scheduler.warmup_epochs (3) is not shorter than train.epochs (1)" in capsys.readouterr().out


def test_a_picture_that_cannot_be_drawn_never_fails_the_run(tiny_data, tmp_path, monkeypatch, capsys):
    from tl_dist import visualize

    def out_of_memory(*a, **k):
        raise MemoryError("std::bad_alloc")
    monkeypatch.setattr(visualize, "confusion_matrix", out_of_memory)
    assert _run(tmp_path / "r", tiny_data, "train.epochs=1", "train.plots=true") == 0
    assert "warning: confusion_matrix.png could not be drawn" in capsys.readouterr().err
    assert json.loads((tmp_path / "r" / "status.json").read_text())["status"] == "complete"
    assert (tmp_path / "r" / "curves.png").exists()


def test_a_folder_no_run_has_used_keeps_its_own_files(one_epoch, tiny_data, tmp_path, capsys):
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("my project's settings\n")
    assert _run(project, tiny_data, "train.epochs=1") == 2
    err = _one_error_line(capsys)
    assert "holds config.yaml, which a run would replace, and no tl_dist run has used it" in err
    assert (project / "config.yaml").read_text() == "my project's settings\n"
    assert sorted(p.name for p in project.iterdir()) == ["config.yaml"]  # no lock, no status left behind


def test_predict_and_lr_find_replace_only_their_own_pictures(one_epoch, tiny_data, tmp_path, capsys):
    from tl_dist.commands import lr_find, predict
    img = str(next((tiny_data / "val" / "ants").iterdir()))
    photo = tmp_path / "holiday.png"
    photo.write_bytes(b"\x89PNG not really")
    assert predict.main([img, "--checkpoint", str(one_epoch), "--save-plot", str(photo)]) == 2
    assert "holiday.png exists and was not written by tl_dist" in _one_error_line(capsys)
    assert photo.read_bytes() == b"\x89PNG not really"
    assert predict.main([img, "--checkpoint", str(one_epoch), "--save-plot", str(photo), "--force"]) == 0
    assert predict.main([img, "--checkpoint", str(one_epoch), "--save-plot", str(photo)]) == 0  # its own now
    capsys.readouterr()
    out = tmp_path / "lr"
    out.mkdir()
    (out / "lr_find.json").write_text('{"mine": 1}')
    assert lr_find.main([str(ROOT / "configs" / "demo.yaml"), *FAST, f"data.root={tiny_data}", "data.demo=false",
                         f"train.output_dir={out}", "--steps", "5"]) == 2
    err = _one_error_line(capsys)
    assert "lr_find.json exists and was not written by tl_dist" in err and "--force" not in err
    assert (out / "lr_find.json").read_text() == '{"mine": 1}'
