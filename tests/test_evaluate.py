"""tl-dist evaluate: the run's own numbers reproduced, metrics against a hand computation, one line
for bad input, and the same metrics.json for 1 and 2 processes."""
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from tl_dist.commands import evaluate

from .conftest import free_port, make_images, run_cli
from .conftest import train_in_process as _run


def test_metrics_agree_with_a_hand_computation():
    # 3 classes; true/pred pairs chosen so the confusion matrix is [[3,1,0],[0,2,2],[0,0,0]]
    # (class c is in the checkpoint but not in this folder) and every image is predicted with
    # probability ~0.9 for the chosen class.
    pairs = [(0, 0)] * 3 + [(0, 1)] + [(1, 1)] * 2 + [(1, 2)] * 2
    labels = torch.tensor([t for t, _ in pairs])
    logits = torch.full((len(pairs), 3), 0.0)
    for i, (_, p) in enumerate(pairs):
        logits[i, p] = math.log(0.9 / 0.05)  # softmax: 0.9 for p, 0.05 for the others
    m = evaluate.classification_metrics(logits, labels, ["a", "b", "c"], batch=3)
    assert m["confusion_matrix"] == [[3, 1, 0], [0, 2, 2], [0, 0, 0]]
    assert m["accuracy"] == 5 / 8 and m["n"] == 8
    a, b, c = m["per_class"]
    assert (a["precision"], a["recall"], a["support"]) == (1.0, 0.75, 4)
    assert (b["precision"], b["recall"], b["support"]) == (2 / 3, 0.5, 4)
    assert (c["precision"], c["recall"], c["support"]) == (0.0, 0.0, 0)
    assert a["f1"] == pytest.approx(2 * 0.75 / 1.75) and b["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    # macro over the classes this folder has (a, b); weighted by support
    assert m["macro_avg"]["recall"] == pytest.approx((0.75 + 0.5) / 2)
    assert m["weighted_avg"]["precision"] == pytest.approx((1.0 * 4 + 2 / 3 * 4) / 8)
    # every confidence is 0.9 (one bin): |accuracy - confidence| = |0.625 - 0.9|
    assert m["ece"] == pytest.approx(0.275, abs=1e-6)
    assert m["loss"] == pytest.approx(-(5 * math.log(0.9) + 3 * math.log(0.05)) / 8, rel=1e-5)
    assert m["top3_accuracy"] == 1.0  # (top-k: k = min(5, classes))
    # fastai's most_confused: off-diagonal pairs, most images first, ties in class order
    assert m["most_confused"] == [{"true": "b", "predicted": "c", "count": 2},
                                  {"true": "a", "predicted": "b", "count": 1}]


def test_most_confused_orders_pairs_and_the_training_summary_names_them(tiny_data, tmp_path, capsys):
    from tl_dist.metrics import confused_line, most_confused
    c = torch.tensor([[5, 2, 0], [3, 4, 1], [0, 2, 6]])
    pairs = most_confused(c, ["a", "b", "c"], most=3)
    assert confused_line(pairs) == "b -> a 3, a -> b 2, c -> b 2" and most_confused(torch.eye(2), ["a", "b"]) == []
    assert _run(tmp_path / "run", tiny_data, "train.epochs=1") == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("most confused at epoch 0"))
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    wrong = round((1 - best["val_acc"]) * 13)  # every val mistake is in some pair
    assert sum(int(x.rsplit(" ", 1)[1]) for x in line.split(": ", 1)[1].split(", ") if "->" in x) == wrong


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ev")
    data = make_images(root / "data", {"train": {"ants": 9, "bees": 9, "wasps": 6},
                                       "val": {"ants": 7, "bees": 6, "wasps": 4}})
    assert _run(root / "run", data, "train.epochs=2", "data.batch_size=3") == 0
    return data, root / "run"


@pytest.mark.slow
def test_evaluate_on_the_val_folder_reproduces_the_runs_own_numbers(trained, tmp_path):
    data, run = trained
    r = run_cli("-m", "tl_dist", "evaluate", str(data), "--split", "val", "--checkpoint", str(run),
                "--out", str(tmp_path / "ev"), "--tta", "flip", "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.splitlines()[-1])
    best = json.loads((run / "best.json").read_text())
    assert (m["accuracy"], m["loss"], m["n"]) == (best["val_acc"], best["val_loss"], 17)  # exactly
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text()) == m
    assert set(m["tta_flip"]) >= {"accuracy", "loss", "ece"}
    rows = (tmp_path / "ev" / "predictions.csv").read_text().splitlines()
    assert rows[0] == "path,true,predicted,p_ants,p_bees,p_wasps" and len(rows) == 18
    for name in ("confusion_matrix", "reliability", "top_losses"):
        with Image.open(tmp_path / "ev" / f"{name}.png") as im:
            im.verify()


@pytest.mark.slow
def test_bad_input_is_one_line(trained, tmp_path):
    data, run = trained
    extra = make_images(tmp_path / "x", {"test": {"ants": 2, "hornets": 2}})
    r = run_cli("-m", "tl_dist", "evaluate", str(extra), "--checkpoint", str(run), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not know: hornets" in r.stderr, r.stderr
    only_ants = make_images(tmp_path / "y", {"test": {"ants": 3}})
    (only_ants / "test" / "ants" / "broken.jpg").write_bytes(b"not a jpeg")
    r = run_cli("-m", "tl_dist", "evaluate", str(only_ants), "--checkpoint", str(run), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "broken.jpg" in r.stderr, r.stderr
    r = run_cli("-m", "tl_dist", "evaluate", str(only_ants), "--checkpoint", str(run), "--out", str(tmp_path / "o"),
                "--skip-bad-images", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["n"] == 3  # a subset of the classes is fine
    r = run_cli("-m", "tl_dist", "evaluate", str(data), "--checkpoint", str(run), "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr  # a root with train/ and val/, no test/
    assert "looks like a data root with no test/ split: pass --split val to measure its val images" in r.stderr


@pytest.mark.multiproc
def test_two_processes_write_the_same_metrics_as_one(trained, tmp_path):
    data, run = trained
    common = [str(data), "--split", "val", "--checkpoint", str(run), "--batch-size", "4"]
    one = run_cli("-m", "tl_dist", "evaluate", *common, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = run_cli("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                  "-m", "tl_dist.evaluate", *common, "--out", str(tmp_path / "two"), timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = ((tmp_path / n / "metrics.json").read_text() for n in ("one", "two"))
    assert a == b and json.loads(a)["n"] == 17
    assert (tmp_path / "one" / "predictions.csv").read_text() == (tmp_path / "two" / "predictions.csv").read_text()


@pytest.mark.slow
def test_the_output_place_is_checked_before_any_work_and_user_files_are_kept(trained, tmp_path, capsys):
    data, run = trained
    args = [str(data), "--split", "val", "--checkpoint", str(run)]
    a_file = tmp_path / "results.txt"
    a_file.write_text("mine")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.json").write_text('{"my": "numbers"}')

    def refused(*extra, words):
        assert evaluate.main([*args, *extra]) == 2
        out, err = capsys.readouterr()
        assert err.count("\n") == 1 and words in err and "images:" not in out, err  # before the evaluation
    for out, words in ((a_file, "is a file"), (Path("/proc/ev"), "cannot write in /proc"),
                       (mine, "metrics.json exists and was not written by tl_dist")):
        refused("--out", str(out), words=words)
    assert a_file.read_text() == "mine" and (mine / "metrics.json").read_text() == '{"my": "numbers"}'
    assert evaluate.main([*args, "--out", str(mine), "--force", "--json"]) == 0
    assert json.loads((mine / "metrics.json").read_text())["n"] == 17
    assert evaluate.main([*args, "--out", str(mine), "--json"]) == 0  # its own files: replaced without a word
    args = [str(data), "--checkpoint", str(run), "--out", str(tmp_path / "o")]
    refused("--split", "nosuch", words="--split nosuch: no folder")
    refused("--split", "nosuch", words="holds train; val")
    refused(words="no test/ split: pass --split val")


@pytest.mark.slow
def test_a_picture_that_cannot_be_drawn_is_a_warning_not_a_failed_evaluation(trained, tmp_path, monkeypatch, capsys):
    from tl_dist import visualize

    def out_of_memory(*a, **k):
        raise MemoryError("std::bad_alloc")
    monkeypatch.setattr(visualize, "confusion_matrix", out_of_memory)
    data, run = trained
    assert evaluate.main([str(data), "--split", "val", "--checkpoint", str(run), "--out", str(tmp_path / "e")]) == 0
    err = capsys.readouterr().err
    assert "warning: confusion_matrix.png could not be drawn (MemoryError" in err
    assert (tmp_path / "e" / "metrics.json").exists() and (tmp_path / "e" / "reliability.png").exists()


def test_the_confusion_matrix_of_thousands_of_classes_is_bounded(tmp_path):
    from tl_dist import visualize

    n = 2000
    cm = torch.eye(n, dtype=torch.long) * 5
    cm[7, 1500] = cm[1500, 7] = 3  # the two classes most involved in mistakes must be shown
    visualize.confusion_matrix(cm, [f"class {i}" for i in range(n)], tmp_path / "cm.png")
    with Image.open(tmp_path / "cm.png") as im:
        assert im.width * im.height < 4000 * 2000
