"""tl-dist runs: every run under a folder with how it stands, from its files alone."""
import json

import pytest

from .conftest import run_cli
from .conftest import train_in_process as _run


@pytest.mark.slow
def test_runs_lists_complete_and_failed_runs_and_a_refused_start_changes_nothing(tiny_data, tmp_path):
    root = tmp_path / "runs"
    assert _run(root / "good", tiny_data, "train.epochs=2") == 0
    assert _run(root / "nan" / "deep", tiny_data, "train.epochs=3", "optim.lr=1e30") == 2
    # A second start into the finished run is refused before it begins: its account stays as it was.
    assert _run(root / "good", tiny_data, "train.epochs=2", "train.resume=none") == 2
    # A fresh run refused in its set-up (bad data, missing weights) leaves no run behind to list: the
    # folder it made goes; a folder that was there stays, without this run's files.
    assert _run(root / "refused", tmp_path / "no_data") == 2
    assert _run(root / "missing_weights", tiny_data, f"model.weights={tmp_path / 'none.safetensors'}") == 2
    (root / "was_there").mkdir()
    assert _run(root / "was_there", tmp_path / "no_data") == 2
    assert not (root / "refused").exists() and not (root / "missing_weights").exists()
    assert list((root / "was_there").iterdir()) == []
    r = run_cli("-m", "tl_dist", "runs", str(root), "--json")
    assert r.returncode == 0, r.stderr
    rows = {x["name"]: x for x in map(json.loads, r.stdout.splitlines())}
    assert set(rows) == {"good", "nan/deep"}  # (was_there: no run in it)
    good, nan = rows["good"], rows["nan/deep"]
    best = json.loads((root / "good" / "best.json").read_text())
    assert (good["arch"], good["mode"], good["epochs_done"], good["epochs_planned"]) == ("resnet18", "finetune", 2, 2)
    assert (good["status"], good["best_val_acc"], good["best_epoch"]) == ("complete", best["val_acc"], best["epoch"])
    assert good["bytes"] > (root / "good" / "best.safetensors").stat().st_size
    assert nan["status"].startswith("failed: train: the train loss became") and nan["epochs_done"] == 0
    table = run_cli("-m", "tl_dist", "runs", str(root))
    assert table.returncode == 0 and "complete" in table.stdout and "nan/deep" in table.stdout
    line = next(l for l in table.stdout.splitlines() if "nan/deep" in l)  # one line per run, the reason cut
    assert "failed: train: the train loss" in line and "…" in line and "--json has it in full" in table.stdout
    assert table.stdout.count("the train loss became") == 1


def test_runs_on_a_missing_folder_is_one_line():
    r = run_cli("-m", "tl_dist", "runs", "/no/such/runs")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no such folder: /no/such/runs" in r.stderr


def test_one_bad_run_folder_is_marked_and_the_others_listed(tmp_path):
    import os
    root = tmp_path / "runs"

    def run(name, **files):
        d = root / name
        d.mkdir(parents=True)
        for f, text in files.items():
            (d / f.replace("_", ".", 1) if f != "dot_lock" else d / ".lock").write_text(text)
        return d
    run("good", status_json='{"status": "complete"}', best_json='{"val_acc": 0.9, "epoch": 3}',
        last_json='{"arch": "resnet18", "mode": "finetune", "config": {"train": {"epochs": 4}}}')
    run("acc", status_json='{"status": "complete"}', best_json='{"val_acc": "x", "epoch": 3}')
    run("model", status_json='{"status": "complete"}', last_json='{"config": {"model": [1, 2], "train": {}}}')
    run("epochs", status_json='{"status": "running"}', last_json='{"config": {"train": {"epochs": "10"}}}')
    run("pid", status_json='{"status": "running"}', dot_lock=json.dumps({"pid": 2**70, "host": os.uname().nodename}))
    run("everyone", status_json='{"status": "running"}', dot_lock=json.dumps({"pid": -1, "host": os.uname().nodename}))
    run("deep", status_json="[" * 100_000 + "]" * 100_000, best_json='{"val_acc": 0.5, "epoch": 0}')
    big = run("big", status_json='{"status": "complete"}')
    with open(big / "metrics.jsonl", "w") as f:  # 30 MB of rows: only the end is read
        row = json.dumps({"epoch": 0, "pad": "x" * 1000})
        for e in range(30_000):
            f.write(row.replace('"epoch": 0', f'"epoch": {e}') + "\n")
    r = run_cli("-m", "tl_dist", "runs", str(root), "--json")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    rows = {x["name"]: x for x in map(json.loads, r.stdout.splitlines())}
    assert set(rows) == {"good", "acc", "model", "epochs", "pid", "everyone", "deep", "big"}
    assert rows["good"]["status"] == "complete" and rows["good"]["best_val_acc"] == 0.9
    for name, words in (("acc", "best.json val_acc is 'x'"), ("model", "config model is [1, 2]"),
                        ("epochs", "config train. epochs is '10'"), ("pid", ".lock pid is"),
                        ("everyone", ".lock pid is -1"), ("deep", "status.json: nested too deeply")):
        assert words in rows[name]["status"], rows[name]
    assert not rows["everyone"]["status"].startswith("running") and rows["deep"]["best_val_acc"] == 0.5
    assert rows["big"]["epochs_done"] == 30_000
    table = run_cli("-m", "tl_dist", "runs", str(root))
    assert table.returncode == 0 and "unreadable" in table.stdout, table.stderr
