"""Data as users have it: one folder split by data.val_split (stratified, recorded in split.json), and a
labels file (CSV / JSON Lines, with or without a split column); every problem a labels file can have
as one line naming the file and the line."""
import json
import random
import shutil

import pytest

from tl_dist import config
from tl_dist.commands import evaluate
from tl_dist.data import labels_file, listing, splits
from tl_dist.errors import UserError

from .conftest import make_images, train_in_process


def data_cfg(*over: str) -> config.DataConfig:
    return config.load(None, list(over)).data


# ----------------------------------------------------------------------------- the draw

def test_the_draw_is_stratified_and_covers_every_image_once():
    samples = [(f"c{c}/img{i:03d}.jpg", c) for c, n in enumerate((10, 20, 7, 1, 2)) for i in range(n)]
    parts = splits.draw(samples, 5, 0.2, 0.1, seed=0)
    assert sorted(s for p in parts.values() for s in p) == sorted(samples)
    for c, n in enumerate((10, 20, 7, 1, 2)):
        got = tuple(sum(1 for _, ci in parts[p] if ci == c) for p in ("val", "test"))
        assert got == splits.counts(n, 0.2, 0.1)
    assert [splits.counts(n, 0.2, 0.1) for n in (10, 20, 7, 1, 2)] == [(2, 1), (4, 2), (1, 1), (0, 0), (1, 0)]


def test_the_draw_depends_on_the_split_seed_and_the_paths_only():
    samples = [(f"c{c}/img{i:03d}.jpg", c) for c in range(3) for i in range(30)]
    shuffled = samples[:]
    random.Random(1).shuffle(shuffled)  # another listing order: another file system, machine or world size
    a = splits.draw(samples, 3, 0.25, 0.0, seed=7)
    assert splits.draw(shuffled, 3, 0.25, 0.0, seed=7) == a
    assert splits.draw(samples, 3, 0.25, 0.0, seed=8) != a


def test_an_added_image_moves_at_most_the_images_at_the_cut():
    samples = [(f"c0/img{i:03d}.jpg", 0) for i in range(40)]
    before = splits.draw(samples, 1, 0.2, 0.0, seed=0)
    after = splits.draw(samples + [("c0/new.jpg", 0)], 1, 0.2, 0.0, seed=0)
    moved = {s for s in samples if (s in before["val"]) != (s in after["val"])}
    assert len(moved) <= 1


def test_a_record_round_trips_and_a_damaged_one_is_one_line():
    classes = ["ants", "bees"]
    parts = splits.draw([(f"{c}/{i}.jpg", ci) for ci, c in enumerate(classes) for i in range(9)], 2, 0.3, 0.0, 0)
    rec = json.loads(json.dumps(splits.record(parts, classes, 0.3, 0.0, 0, "one folder + val_split")))
    assert {k: v for k, v in splits.from_record(rec, classes, "split.json").items() if v} == \
        {k: v for k, v in parts.items() if v}
    rec["parts"]["val"]["samples"][0][0] = "ants/other.jpg"
    with pytest.raises(UserError, match="split.json is damaged .*does not match its hash"):
        splits.from_record(rec, classes, "split.json")
    with pytest.raises(UserError, match="names class 'bees', which the data no longer has"):
        splits.from_record(json.loads(json.dumps(splits.record(parts, classes, 0.3, 0.0, 0, "x"))), ["ants", "wasps"],
                           "split.json")


# ----------------------------------------------------------------------------- one folder + val_split

@pytest.fixture(scope="module")
def one_folder(tmp_path_factory):
    """Class sub-folders and no split: ants 14, bees 12, wasps 9."""
    root = make_images(tmp_path_factory.mktemp("photos"), {"all": {"ants": 14, "bees": 12, "wasps": 9}})
    return root / "all"


def test_one_folder_is_split_per_class(one_folder):
    d = listing.list_data(data_cfg(f"data.root={one_folder}", "data.val_split=0.3", "data.test_split=0.2"))
    assert d.classes == ["ants", "bees", "wasps"] and d.layout == "one folder + val_split"
    counts = {p: [sum(1 for _, c in getattr(d, p) if c == ci) for ci in range(3)] for p in ("train", "val", "test")}
    assert counts == {"val": [4, 4, 3], "test": [3, 2, 2], "train": [7, 6, 4]}
    assert d.split["parts"]["val"]["images"] == 11 and d.split["split_seed"] == 0


def test_a_root_with_val_and_a_val_split_is_refused(tiny_data):
    with pytest.raises(UserError, match="holds val/ already; set data.val_split=0"):
        listing.list_data(data_cfg(f"data.root={tiny_data}", "data.val_split=0.2"))


def test_a_root_with_train_only_splits_its_train_folder(tmp_path):
    root = make_images(tmp_path, {"train": {"a": 5, "b": 5}})
    d = listing.list_data(data_cfg(f"data.root={root}", "data.val_split=0.2"))
    assert (len(d.train), len(d.val)) == (8, 2) and all("/train/" in p for p, _ in d.train + d.val)


@pytest.mark.parametrize("over, message", [
    (("data.val_split=0.6", "data.test_split=0.4"), "must leave images to train on"),
    (("data.test_split=0.2",), "data.test_split needs data.val_split"),
    (("data.val_split=1",), "data.val_split .* must be a fraction from 0 to below 1"),
    (("data.classes=[a, b]",), "data.classes applies to a labels file"),
])
def test_split_settings_that_cannot_work_are_one_line(over, message):
    with pytest.raises(UserError, match=message):
        config.load(None, list(over))


@pytest.fixture(scope="module")
def split_run(one_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("split_run") / "run"
    # (frozen: an untrained backbone in train mode on 32 px images can overflow; the split is what is tested)
    assert train_in_process(out, one_folder, "data.val_split=0.3", "data.test_split=0.2", "train.epochs=2",
                            "model.arch=shufflenet_v2_x0_5", "model.mode=frozen") == 0
    return out


def test_a_made_split_is_recorded_and_evaluate_reproduces_the_runs_val_numbers(split_run, one_folder, tmp_path,
                                                                                 capsys):
    rec = json.loads((split_run / "split.json").read_text())
    best = json.loads((split_run / "best.json").read_text())
    assert best["split"] == splits.summary(rec) and rec["parts"]["test"]["images"] == 7
    capsys.readouterr()
    assert evaluate.main([str(one_folder), "--checkpoint", str(split_run), "--split", "val", "--json",
                          "--out", str(tmp_path / "val")]) == 0
    m = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (m["n"], m["accuracy"], m["loss"]) == (11, best["val_acc"], best["val_loss"])
    # without --split: the test part, which training never read
    assert evaluate.main([str(one_folder), "--checkpoint", str(split_run), "--json", "--out", str(tmp_path / "t")]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["n"] == 7


def test_evaluate_without_the_runs_split_json_says_where_it_belongs(split_run, one_folder, tmp_path, capsys):
    shutil.copy(split_run / "best.safetensors", tmp_path / "best.safetensors")
    assert evaluate.main([str(one_folder), "--checkpoint", str(tmp_path / "best.safetensors"), "--split", "val",
                          "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "split.json, which is not in" in err and "copy it there" in err


# ----------------------------------------------------------------------------- labels files

@pytest.fixture(scope="module")
def flat(tmp_path_factory):
    """A flat folder of images with no class folders, and the classes they belong to."""
    src = make_images(tmp_path_factory.mktemp("src"), {"all": {"ants": 12, "bees": 12}}) / "all"
    root = tmp_path_factory.mktemp("kaggle")
    (root / "images").mkdir()
    rows = []
    for i, p in enumerate(sorted(src.rglob("*.jpg"))):
        shutil.copy(p, root / "images" / f"{i:03d}.jpg")
        rows.append((f"images/{i:03d}.jpg", p.parent.name, "val" if i % 4 == 0 else "train"))
    (root / "labels.csv").write_text("path,label,split\n" + "".join(f"{a},{b},{c}\n" for a, b, c in rows))
    (root / "nosplit.jsonl").write_text("".join(json.dumps({"file": a, "tag": b}) + "\n" for a, b, _ in rows))
    return root


def test_a_labels_file_with_a_split_column_trains_and_evaluate_reproduces_it(flat, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_in_process(out, flat, "data.labels=labels.csv", "train.epochs=1", "model.mode=frozen") == 0
    assert "(labels file)" in capsys.readouterr().out and not (out / "split.json").exists()
    best = json.loads((out / "best.json").read_text())
    assert evaluate.main([str(flat), "--checkpoint", str(out), "--split", "val", "--json", "--out",
                          str(tmp_path / "e")]) == 0
    m = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (m["n"], m["accuracy"], m["loss"]) == (6, best["val_acc"], best["val_loss"])


def test_a_json_lines_file_without_a_split_column_is_split_by_val_split(flat):
    d = listing.list_data(data_cfg(f"data.root={flat}", "data.labels=nosplit.jsonl", "data.path_column=file",
                                   "data.label_column=tag", "data.val_split=0.25"))
    assert (len(d.train), len(d.val), d.layout) == (18, 6, "labels file") and d.split is not None
    d2 = listing.list_data(data_cfg(f"data.root={flat}", "data.labels=nosplit.jsonl", "data.path_column=file",
                                    "data.label_column=tag", "data.val_split=0.25", "data.classes=[bees, ants]"))
    assert d2.classes == ["bees", "ants"] and {p for p, _ in d2.val} == {p for p, _ in d.val}


def test_labels_file_layout_errors_are_one_line(flat):
    with pytest.raises(UserError, match="has no split column .*set data.val_split"):
        listing.list_data(data_cfg(f"data.root={flat}", "data.labels=nosplit.jsonl", "data.path_column=file",
                                   "data.label_column=tag"))
    with pytest.raises(UserError, match="has a split column .* and data.val_split is 0.2"):
        listing.list_data(data_cfg(f"data.root={flat}", "data.labels=labels.csv", "data.val_split=0.2"))
    with pytest.raises(UserError, match="1[0-9] label.* data.classes does not list: line 2: 'ants'"):
        listing.list_data(data_cfg(f"data.root={flat}", "data.labels=labels.csv", "data.classes=[bees, wasps]"))
    with pytest.raises(UserError, match="data.labels file not found"):
        listing.list_data(data_cfg(f"data.root={flat}", "data.labels=nope.csv"))


@pytest.mark.parametrize("text, message", [
    ("file,label\na.jpg,x\n", "no column 'path' \\(its columns: file; label\\); name the column with data.path_column"),
    ("path,label\na.jpg,\nb.jpg,y\n", "1 bad row\\(s\\): line 2: empty label for a.jpg"),
    ("path,label\na.jpg,x\n./a.jpg,y\n", "line 3: a.jpg is also on line 2"),
    ("path,label\n../a.jpg,x\n/etc/passwd,y\n", "2 bad row.*line 2: path '../a.jpg' leaves data.root.*line 3: path "
                                                "'/etc/passwd' leaves"),
    ("path,label,split\na.jpg,x,train\nb.jpg,y,holdout\n", "line 3: split 'holdout' is not one of train, val, test"),
    ("path,label,extra\na.jpg\n", "line 2: 1 field\\(s\\), the header has 3"),
    ("", "is empty; it needs a header row"),
    ("path,label\n" + "".join(f"../{i}.jpg,x\n" for i in range(12)), "12 bad row.*; and 7 more. Fix the file"),
])
def test_every_labels_file_problem_is_one_line_naming_the_line(tmp_path, text, message):
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(UserError, match=message) as e:
        labels_file.read(tmp_path / "labels.csv", "path", "label", "split")
    assert "\n" not in str(e.value) and "labels.csv" in str(e.value)


def test_json_lines_problems_name_their_lines(tmp_path):
    (tmp_path / "l.jsonl").write_text('{"path": "a.jpg", "label": "x"}\nnot json\n[1]\n{"path": "c.jpg", "label": 3}\n'
                                      '{"label": "x"}\n')
    with pytest.raises(UserError, match="4 bad row.*line 2: not a JSON object.*line 3: not a JSON object.*line 4: the "
                                        "label is int, not a string.*line 5: no 'path'"):
        labels_file.read(tmp_path / "l.jsonl", "path", "label", "split")


def test_a_row_whose_image_is_missing_is_named_by_its_line(flat, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(flat, root)
    lines = (root / "labels.csv").read_text().splitlines()
    (root / "labels.csv").write_text("\n".join(lines + ["images/gone.jpg,ants,train"]) + "\n")
    assert train_in_process(tmp_path / "run", root, "data.labels=labels.csv") == 2
    err = capsys.readouterr().err.strip()
    assert f"line {len(lines) + 1}: " in err and "gone.jpg" in err and "\n" not in err


# ----------------------------------------------------------------------------- a split is the run's

@pytest.mark.slow
def test_train_seed_does_not_move_images_between_parts(one_folder, tmp_path):
    for seed in (0, 1):
        assert train_in_process(tmp_path / f"s{seed}", one_folder, "data.val_split=0.3", f"train.seed={seed}",
                                "train.epochs=1", "model.mode=frozen") == 0
    assert (tmp_path / "s0" / "split.json").read_bytes() == (tmp_path / "s1" / "split.json").read_bytes()


@pytest.mark.slow
def test_a_resume_keeps_its_split_when_the_data_would_split_differently(one_folder, tmp_path, capsys):
    root = tmp_path / "photos"
    shutil.copytree(one_folder, root)
    out = tmp_path / "run"
    common = ("data.val_split=0.3", "model.mode=frozen")
    assert train_in_process(out, root, *common, "train.epochs=1") == 0
    recorded = (out / "split.json").read_bytes()
    shutil.copy(root / "ants" / "ants_000.jpg", root / "ants" / "ants_new.jpg")  # a new image arrives
    capsys.readouterr()
    assert train_in_process(out, root, *common, "train.epochs=2") == 0
    said = capsys.readouterr().out
    assert "note: the data would split differently now (1 image(s) not in the recorded split are left out" in said
    assert "the run keeps its split (split.json)" in said and "resuming" in said
    assert (out / "split.json").read_bytes() == recorded
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_samples"] for r in rows] == [rows[0]["train_samples"]] * 2  # the new image is not trained on
