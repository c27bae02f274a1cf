"""Interruption and resume: SIGKILL and SIGTERM mid-run, then the same command again."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tl_dist.commands import runs

from .conftest import FAST, ROOT

pytestmark = pytest.mark.slow
EPOCHS = 5


def _cmd(data_dir, out):
    return [sys.executable, "-m", "tl_dist.train", "--config", str(ROOT / "configs" / "demo.yaml"), *FAST,
            "data.image_size=64", "data.resize_size=72", f"data.root={data_dir}", "data.demo=false",
            "data.batch_size=4", f"train.epochs={EPOCHS}", f"train.output_dir={out}"]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _epochs_done(out):
    f = out / "metrics.jsonl"
    return len(f.read_text().splitlines()) if f.exists() else 0


def _interrupt(data_dir, out, sig, after_epochs):
    p = subprocess.Popen(_cmd(data_dir, out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while _epochs_done(out) < after_epochs and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    if sig == signal.SIGTERM:
        time.sleep(0.15)  # land mid-epoch, between step boundaries
    t0 = time.time()
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=60)
    return p.returncode, time.time() - t0, stdout, stderr


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    r = subprocess.run(_cmd(tiny_data, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return load_file(str(out / "last.safetensors")), json.loads((out / "best.json").read_text())


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_then_resume_is_bit_identical(tiny_data, tmp_path, uninterrupted):
    out = tmp_path / "run"
    rc, _, _, _ = _interrupt(tiny_data, out, signal.SIGKILL, after_epochs=2)
    assert rc == -signal.SIGKILL and _epochs_done(out) < EPOCHS  # it really died mid-run
    assert runs.describe(out, tmp_path)["status"] == "killed, resumable"  # as `tl-dist runs` shows it
    r = subprocess.run(_cmd(tiny_data, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stdout and runs.describe(out, tmp_path)["status"] == "complete"
    assert _same(load_file(str(out / "last.safetensors")), uninterrupted[0])
    best = json.loads((out / "best.json").read_text())
    assert (best["epoch"], best["val_acc"]) == (uninterrupted[1]["epoch"], uninterrupted[1]["val_acc"])
    assert [json.loads(l)["epoch"] for l in (out / "metrics.jsonl").read_text().splitlines()] == list(range(EPOCHS))


def test_sigterm_stops_promptly_resumable(tiny_data, tmp_path, uninterrupted):
    out = tmp_path / "run"
    rc, seconds, stdout, stderr = _interrupt(tiny_data, out, signal.SIGTERM, after_epochs=1)
    assert rc == 128 + signal.SIGTERM and seconds < 10
    assert "Resume with the same command" in stdout
    assert _epochs_done(out) < EPOCHS
    r = subprocess.run(_cmd(tiny_data, out), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert _same(load_file(str(out / "last.safetensors")), uninterrupted[0])



def test_a_resume_says_what_changed_and_the_run_directory_keeps_the_history(tiny_data, tmp_path):
    """Data or settings changed between segments: the resumed run says so (epochs extended is the
    normal case, not news), keeps the first run's config.yaml and appends the changes to resumes.jsonl."""
    import shutil
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_data, data_dir)
    out = tmp_path / "run"
    cmd = [*_cmd(data_dir, out)[:-2], f"train.output_dir={out}"]
    r = subprocess.run([*cmd, "train.epochs=1"], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    first_config = (out / "config.yaml").read_bytes()
    r = subprocess.run([*cmd, "train.epochs=2"], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "note: changed" not in r.stdout  # more epochs: nothing to report
    shutil.copy(next((data_dir / "train" / "ants").iterdir()), data_dir / "train" / "ants" / "new.jpg")
    r = subprocess.run([*cmd, "train.epochs=3", "data.batch_size=2", "optim.lr=0.02"], env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    note = next(line for line in r.stdout.splitlines() if line.startswith("note: changed since epoch 1"))
    assert "train images 22 -> 23" in note and "data.batch_size 4 -> 2" in note and "optim.lr 0.01 -> 0.02" in note
    assert "train.epochs" not in note
    assert (out / "config.yaml").read_bytes() == first_config
    lines = [json.loads(line) for line in (out / "resumes.jsonl").read_text().splitlines()]
    assert [x["after_epoch"] for x in lines] == [0, 1] and lines[0]["changes"] == {}
    assert lines[1]["changes"]["data.batch_size"] == [4, 2] and lines[1]["changes"]["train images"] == [22, 23]
