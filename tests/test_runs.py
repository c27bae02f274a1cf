"""tl-dist runs: every run under a folder with how it stands, from its files alone."""
import json

import pytest

from .conftest import run_cli
from .conftest import train_in_process as _run


@pytest.mark.e2e
def test_runs_lists_complete_and_failed_runs_and_a_refused_start_changes_nothing(tiny_data, tmp_path):
    root = tmp_path / "runs"
    assert _run(root / "good", tiny_data, "train.epochs=2") == 0
    assert _run(root / "nan" / "deep", tiny_data, "train.epochs=3", "optim.lr=1e30") == 2
    # A second start into the finished run is refused before it begins: its account stays as it was.
    assert _run(root / "good", tiny_data, "train.epochs=2", "train.resume=none") == 2
    r = run_cli("-m", "tl_dist", "runs", str(root), "--json")
    assert r.returncode == 0, r.stderr
    rows = {x["name"]: x for x in map(json.loads, r.stdout.splitlines())}
    assert set(rows) == {"good", "nan/deep"}
    good, nan = rows["good"], rows["nan/deep"]
    best = json.loads((root / "good" / "best.json").read_text())
    assert (good["arch"], good["mode"], good["epochs_done"], good["epochs_planned"]) == ("resnet18", "finetune", 2, 2)
    assert (good["status"], good["best_val_acc"], good["best_epoch"]) == ("complete", best["val_acc"], best["epoch"])
    assert good["bytes"] > (root / "good" / "best.safetensors").stat().st_size
    assert nan["status"].startswith("failed: train: the train loss became") and nan["epochs_done"] == 0
    table = run_cli("-m", "tl_dist", "runs", str(root))
    assert table.returncode == 0 and "complete" in table.stdout and "nan/deep" in table.stdout


def test_runs_on_a_missing_folder_is_one_line():
    r = run_cli("-m", "tl_dist", "runs", "/no/such/runs")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such folder: /no/such/runs" in r.stderr
