"""Several labels per image: a labels file with a delimiter (or JSON lists), one sigmoid per class and
binary cross-entropy, mAP and F1 everywhere accuracy is shown, the predictor listing every label at or
past its threshold, and the same guarantees as one label per image."""
import json

import pytest
import torch

from tl_dist import config
from tl_dist.commands import evaluate, export, predict
from tl_dist.data import labels_file, listing, splits
from tl_dist.errors import UserError
from tl_dist.metrics import average_precision, best_f1_thresholds, multi_label_metrics
from tl_dist.predictor import Predictor
from tl_dist.training.engine import multi_label_loss
from tl_dist.training.mixing import Mix

from .conftest import ML, make_tagged, train_in_process

# ----------------------------------------------------------------------------- metrics and loss

def test_average_precision_by_hand_and_against_scikit_learn():
    assert average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([1, 0, 1, 0])) == pytest.approx(5 / 6)
    # tied scores count as one threshold: (R 0.5, P 0.5) then (R 1, P 2/3)
    assert average_precision(torch.tensor([0.5, 0.5, 0.2]), torch.tensor([1, 0, 1])) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert average_precision(torch.tensor([0.3, 0.1]), torch.tensor([0, 0])) is None
    from sklearn.metrics import average_precision_score
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        scores = torch.randint(0, 20, (200,), generator=g).double() / 20  # with ties
        truth = torch.rand(200, generator=g) < 0.3
        assert average_precision(scores, truth) == pytest.approx(average_precision_score(truth.numpy(), scores.numpy()))


def test_multi_label_metrics_by_hand():
    probs = torch.tensor([[0.9, 0.2, 0.6], [0.4, 0.7, 0.1], [0.8, 0.6, 0.3], [0.1, 0.3, 0.2]])
    truth = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 0]]).float()
    m = multi_label_metrics(probs, truth, ["a", "b", "c"], 0.5)
    # predictions at 0.5: [a,c] [b] [a,b] [] -> a: tp 2; b: tp 1, fp 1; c: tp 1
    assert m["exact_match"] == 0.75 and m["micro_f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 0))
    assert m["per_class"]["b"] == {"ap": pytest.approx(1.0), "precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3),
                                   "support": 1}
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 1) / 3) and m["map"] == pytest.approx(1.0)
    per_class = multi_label_metrics(probs, truth, ["a", "b", "c"], [0.5, 0.65, 0.5])  # b needs 0.65: row 3 drops it
    assert per_class["exact_match"] == 1.0 and per_class["per_class"]["b"]["precision"] == 1.0


def test_the_multi_label_loss_closed_form():
    out, y = torch.tensor([[2.0, -1.0], [0.5, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    def bce(z, t, w=1.0):
        return -(w * t * torch.log(torch.sigmoid(z)) + (1 - t) * torch.log(1 - torch.sigmoid(z)))
    torch.testing.assert_close(multi_label_loss(out, y), bce(out, y).mean(1))
    torch.testing.assert_close(multi_label_loss(out, y, smoothing=0.2), bce(out, y * 0.8 + 0.1).mean(1))
    pw = torch.tensor([3.0, 1.0])
    torch.testing.assert_close(multi_label_loss(out, y, pos_weight=pw), bce(out, y, pw).mean(1))
    mix = Mix(y.roll(1, 0), 0.7, "mixup")  # mixing the multi-hot targets
    torch.testing.assert_close(multi_label_loss(out, y, mix=mix), bce(out, 0.7 * y + 0.3 * y.roll(1, 0)).mean(1))


def test_tuned_thresholds_reach_the_best_f1_of_the_split():
    g = torch.Generator().manual_seed(1)
    truth = (torch.rand(300, 4, generator=g) < 0.3).float()
    probs = (truth * 0.3 + torch.rand(300, 4, generator=g) * 0.7).clamp(0, 1)
    tuned = best_f1_thresholds(probs, truth, 0.5)
    for c in range(4):
        best = max(multi_label_metrics(probs[:, c:c + 1], truth[:, c:c + 1], ["x"], float(t))["micro_f1"]
                   for t in probs[:, c].unique())
        assert multi_label_metrics(probs[:, c:c + 1], truth[:, c:c + 1], ["x"], tuned[c])["micro_f1"] == \
            pytest.approx(best)


# ----------------------------------------------------------------------------- data

def test_a_delimiter_or_json_lists_give_several_labels_per_image(tmp_path):
    (tmp_path / "a.csv").write_text("path,tags\nx.jpg,b;a\ny.jpg,\nz.jpg, a ; c\n")
    rows = labels_file.read(tmp_path / "a.csv", "path", "tags", "split", ";")
    assert rows.multi_label and rows.labels == [("a", "b"), (), ("a", "c")]
    (tmp_path / "b.jsonl").write_text('{"path": "x.jpg", "label": ["b", "a"]}\n{"path": "y.jpg", "label": "c"}\n')
    rows = labels_file.read(tmp_path / "b.jsonl", "path", "label", "split")
    assert rows.multi_label and rows.labels == [("a", "b"), ("c",)]
    (tmp_path / "c.csv").write_text("path,tags\nx.jpg,a;;b\n")
    with pytest.raises(UserError, match="line 2: an empty label between others for x.jpg"):
        labels_file.read(tmp_path / "c.csv", "path", "tags", "split", ";")


def test_a_multi_label_split_is_stratified_by_the_rarest_label():
    samples = [(f"{i}.jpg", (0,) if i % 10 else (0, 1)) for i in range(50)] + [("none.jpg", ())]
    parts = splits.draw(samples, 2, 0.2, 0.0, seed=0)
    assert sorted(s for p in parts.values() for s in p) == sorted(samples)
    assert sum(1 for _, label in parts["val"] if 1 in label) == 1  # 5 images of the rare class: 1 in val


def test_task_settings_that_cannot_work_are_one_line(tmp_path):
    root = make_tagged(tmp_path / "d", 20)
    for over, message in ((("train.task=single_label",), "train.task=single_label, but the labels file gives images "
                                                        "several labels"),
                          (("data.sampler=balanced",), "data.sampler=balanced draws images by their class")):
        with pytest.raises(UserError, match=message):
            from tl_dist.training.setup import resolve_task
            cfg = config.load(None, [f"data.root={root}", *ML, *over])
            resolve_task(cfg, listing.list_data(cfg.data))
    with pytest.raises(UserError, match="train.select_best_by=map is a multi_label metric, and this run is single_label"):
        from tl_dist.training.setup import resolve_task
        cfg = config.load(None, [f"data.root={tmp_path}", "train.select_best_by=map"])
        resolve_task(cfg, listing.DataSet(["a", "b"], [], []))


# ----------------------------------------------------------------------------- a multi-label run end to end

@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    return make_tagged(tmp_path_factory.mktemp("tagged"), 60)


@pytest.fixture(scope="module")
def ml_run(tagged, tmp_path_factory):
    out = tmp_path_factory.mktemp("ml") / "run"
    assert train_in_process(out, tagged, *ML, "train.epochs=2", "model.mode=frozen", "model.arch=shufflenet_v2_x0_5",
                            "optim.lr=0.05") == 0
    return out


def test_a_multi_label_run_reports_map_and_f1_and_picks_best_by_map(ml_run):
    rows = [json.loads(line) for line in (ml_run / "metrics.jsonl").read_text().splitlines()]
    assert all({"map", "micro_f1", "macro_f1", "val_acc"} <= set(r) for r in rows)
    best = json.loads((ml_run / "best.json").read_text())
    assert best["task"] == "multi_label" and best["threshold"] == 0.5
    assert best["epoch"] == max(rows, key=lambda r: (r["map"], -r["epoch"]))["epoch"]
    cfg = (ml_run / "config.yaml").read_text()
    assert "task: multi_label" in cfg and "select_best_by: map" in cfg
    assert best["map"] == max(r["map"] for r in rows)  # what every checkpoint says of itself


def test_runs_lists_a_multi_label_run_by_its_map(ml_run, capsys):
    from tl_dist.commands import runs
    assert runs.main([str(ml_run.parent)]) == 0
    best = json.loads((ml_run / "best.json").read_text())
    assert f"mAP {best['map']:.4f} ({best['epoch']})" in capsys.readouterr().out


def test_evaluate_reproduces_a_multi_label_runs_val_numbers(ml_run, tagged, tmp_path, capsys):
    capsys.readouterr()
    assert evaluate.main([str(tagged), "--checkpoint", str(ml_run), "--split", "val", "--json", "--out",
                          str(tmp_path / "e"), "--tune-thresholds"]) == 0
    m = json.loads(capsys.readouterr().out.splitlines()[-1])
    best = json.loads((ml_run / "best.json").read_text())
    row = next(json.loads(r) for r in (ml_run / "metrics.jsonl").read_text().splitlines()
               if json.loads(r)["epoch"] == best["epoch"])
    assert (m["map"], m["micro_f1"], m["exact_match"], m["loss"]) == (row["map"], row["micro_f1"], row["val_acc"],
                                                                      row["val_loss"])
    assert {"ap_per_class.png", "pr_curves.png", "predictions.csv", "thresholds.json"} <= \
        {p.name for p in (tmp_path / "e").iterdir()}
    assert m["threshold"] == 0.5 and "tuned_on_this_split" in m  # reported at the given threshold, not the tuned


def test_predict_lists_every_label_past_its_threshold(ml_run, tagged, tmp_path, capsys):
    img = str(tagged / "img" / "003.png")
    capsys.readouterr()
    assert predict.main([img, "--checkpoint", str(ml_run), "--json", "--topk", "3"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [e["label"] for e in r["labels"]] == [e["label"] for e in r["topk"] if e["prob"] >= 0.5]
    (tmp_path / "t.json").write_text(json.dumps({"format": "tl_dist-thresholds/1", "classes": ["blue", "green", "red"],
                                                 "thresholds": [0.01, 0.99, 0.99]}))
    assert predict.main([img, "--checkpoint", str(ml_run), "--json", "--thresholds", str(tmp_path / "t.json")]) == 0
    assert [e["label"] for e in json.loads(capsys.readouterr().out)["labels"]] == ["blue"]
    (tmp_path / "u.json").write_text(json.dumps({"format": "tl_dist-thresholds/1", "classes": ["x", "y", "z"],
                                                 "thresholds": [0.5] * 3}))
    assert predict.main([img, "--checkpoint", str(ml_run), "--thresholds", str(tmp_path / "u.json")]) == 2
    assert "is for other classes than the checkpoint's" in capsys.readouterr().err


def test_an_onnx_export_carries_the_task_and_predicts_the_same_labels(ml_run, tagged, tmp_path, monkeypatch):
    monkeypatch.setattr(export, "LATENCY_BUDGET_S", 0.05)
    out = tmp_path / "m.onnx"
    assert export.main([str(ml_run), "--out", str(out), "--dynamic-batch"]) == 0
    paths = [str(p) for p in sorted((tagged / "img").iterdir())[:8]]
    got = Predictor.from_checkpoint(out, device="cpu")
    assert got.multi_label and got.thresholds == [0.5] * 3
    want = Predictor.from_checkpoint(ml_run, device="cpu").predict(paths)
    assert [[e["label"] for e in r["labels"]] for r in got.predict(paths)] == [[e["label"] for e in r["labels"]]
                                                                               for r in want]
    # per-class thresholds travel in the exported file's description
    (tmp_path / "t.json").write_text(json.dumps({"format": "tl_dist-thresholds/1", "classes": ["blue", "green", "red"],
                                                 "thresholds": [0.01, 0.99, 0.99]}))
    assert export.main([str(ml_run), "--out", str(tmp_path / "t.onnx"), "--thresholds", str(tmp_path / "t.json")]) == 0
    tuned = Predictor.from_checkpoint(tmp_path / "t.onnx", device="cpu")
    assert tuned.thresholds == [0.01, 0.99, 0.99]
    assert [[e["label"] for e in r["labels"]] for r in tuned.predict(paths)] == [["blue"]] * len(paths)


@pytest.mark.slow
def test_a_multi_label_resume_is_bit_identical(ml_run, tagged, tmp_path):
    from safetensors.torch import load_file
    over = (*ML, "model.mode=frozen", "model.arch=shufflenet_v2_x0_5", "optim.lr=0.05")
    assert train_in_process(tmp_path / "r", tagged, *over, "train.epochs=1") == 0
    assert train_in_process(tmp_path / "r", tagged, *over, "train.epochs=2") == 0
    a, b = load_file(str(tmp_path / "r" / "last.safetensors")), load_file(str(ml_run / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = ((tmp_path / "r" / "metrics.jsonl").read_text(), (ml_run / "metrics.jsonl").read_text())
    strip = lambda t: [{k: v for k, v in json.loads(l).items() if "seconds" not in k and k != "peak_host_mb"}
                       for l in t.splitlines()]
    assert strip(ra) == strip(rb)


def test_a_run_from_before_the_task_key_resumes_without_a_reported_change():
    import dataclasses

    from tl_dist.training.run_state import RunState, changes
    c = config.Config()
    old = c.to_dict()
    del old["train"]["task"], old["data"]["label_delimiter"]
    old["train"]["select_best_by"] = "val_acc"  # (what such a run's config.yaml holds)
    resolved = dataclasses.replace(c, train=dataclasses.replace(c.train, task="single_label", select_best_by="val_acc"))
    assert changes(RunState(config=old), {}, resolved.to_dict()) == {}
    multi = dataclasses.replace(c, train=dataclasses.replace(c.train, task="multi_label", select_best_by="map"))
    assert changes(RunState(config=old), {}, multi.to_dict()) == {"train.select_best_by": ["val_acc", "map"],
                                                                   "train.task": [None, "multi_label"]}
