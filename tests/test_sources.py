"""Other storage formats of the same images: WebDataset tar shards (data.format=wds, tl-dist data
shard / index) and Hugging Face datasets (data.format=hf). They are storage, not other data: the
same run from folders, shards or a dataset of the same images gives the same numbers."""
import io
import json
import os
import sys
import tarfile

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tl_dist.commands import data as data_cmd
from tl_dist.config import DataConfig
from tl_dist.data import listing, shards
from tl_dist.data.images import load_rgb

from .conftest import FAST, ROOT, accelerate_launch, make_tagged, run_cli, sigkill_once_resumable, train_in_process


def hf_from_folders(src, dest, splits=(("train", "train"), ("val", "validation"))):
    """A save_to_disk dataset of the images under src/<part>/<class>/, in the folders' order."""
    datasets = pytest.importorskip("datasets")
    parts = {}
    classes = sorted(p.name for p in (src / "train").iterdir())
    for part, name in splits:
        paths = [p for c in classes for p in sorted((src / part / c).glob("*.jpg"))]
        parts[name] = datasets.Dataset.from_dict(
            {"image": [{"bytes": p.read_bytes(), "path": None} for p in paths],
             "label": [classes.index(p.parent.name) for p in paths]},
            features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)}))
    datasets.DatasetDict(parts).save_to_disk(str(dest))
    return dest


@pytest.fixture(scope="module")
def sources(tiny_data, tmp_path_factory):
    """The tiny set as folders, as shards (several per part) and as a save_to_disk dataset."""
    base = tmp_path_factory.mktemp("sources")
    assert data_cmd.main(["shard", str(tiny_data), str(base / "shards"), "--shard-size", "8kB"]) == 0
    return {"folders": tiny_data, "shards": base / "shards", "hf": hf_from_folders(tiny_data, base / "hf")}


FORMAT = {"folders": "data.format=files", "shards": "data.format=wds", "hf": "data.format=hf"}


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- the same run from each source

@pytest.mark.parametrize("settings", [("data.cache=ram",), ("data.cache=none", "data.num_workers=2")],
                         ids=["ram-cache", "files-read-by-2-workers"])
def test_folders_shards_and_a_dataset_of_the_same_images_train_the_same(sources, tmp_path, settings):
    for name, root in sources.items():
        assert train_in_process(tmp_path / name, root, FORMAT[name], "train.epochs=2", *settings) == 0, name
    ref = _rows(tmp_path / "folders")
    for name in ("shards", "hf"):
        rows = _rows(tmp_path / name)
        assert [(r["train_loss"], r["val_loss"], r["val_acc"], r["val_samples"]) for r in rows] == \
            [(r["train_loss"], r["val_loss"], r["val_acc"], r["val_samples"]) for r in ref], name
        a, b = (load_file(str(tmp_path / n / "last.safetensors")) for n in ("folders", name))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_reproduces_the_runs_val_numbers_on_shards_and_a_dataset(sources, tmp_path, capsys):
    from tl_dist.commands import evaluate
    for name in ("shards", "hf"):
        assert train_in_process(tmp_path / name, sources[name], FORMAT[name], "train.epochs=1") == 0
        best = json.loads((tmp_path / name / "best.json").read_text())
        capsys.readouterr()
        assert evaluate.main([str(sources[name]), "--checkpoint", str(tmp_path / name), "--json",
                              "--out", str(tmp_path / f"eval_{name}")]) == 0
        metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert metrics["n"] == 13 and metrics["accuracy"] == best["val_acc"]


def test_a_member_reads_back_as_the_file_it_came_from(sources, tiny_data):
    data = listing.list_data(DataConfig(root=str(sources["shards"]), format="wds"))
    assert len(data.train) == 22 and len(data.val) == 13 and data.classes == ["ants", "bees"]
    folder = listing.list_data(DataConfig(root=str(tiny_data)))
    for (name, y), (path, z) in zip(data.train, folder.train):
        assert y == z and name.endswith(os.path.relpath(path, tiny_data / "train")[:-4])
        assert data.reader.load(name).tobytes() == load_rgb(path).tobytes()


# ----------------------------------------------------------------------------- writing shards

def test_shard_writing_resumes_and_never_overwrites_other_files(tiny_data, tmp_path, capsys):
    out = tmp_path / "s"
    assert data_cmd.main(["shard", str(tiny_data), str(out), "--shard-size", "8kB"]) == 0
    first = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.endswith(".idx.json")}
    (out / "train-000001.tar").unlink()  # as if killed before it was renamed into place
    (out / ".train-000001.tar.tmp").write_bytes(b"partial")
    capsys.readouterr()
    assert data_cmd.main(["shard", str(tiny_data), str(out), "--shard-size", "8kB"]) == 0
    assert "already there" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.endswith(".idx.json")} == first  # the
    # same bytes, and no temp file left
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    assert data_cmd.main(["shard", str(tiny_data), str(other)]) == 2
    assert "holds other files (notes.txt)" in capsys.readouterr().err and (other / "notes.txt").read_text() == "keep"
    assert data_cmd.main(["shard", str(tiny_data), str(out), "--shard-size", "1MB"]) == 2  # other boundaries
    assert "would not write" in capsys.readouterr().err


def test_shards_from_a_multi_label_labels_file(tmp_path):
    root = make_tagged(tmp_path / "tagged", 20)
    assert data_cmd.main(["shard", str(root), str(tmp_path / "s"), "--labels", "tags.csv",
                          "--label-column", "tags", "--label-delimiter", ";"]) == 0
    data = listing.list_data(DataConfig(root=str(tmp_path / "s"), format="wds", val_split=0.25,
                                        label_delimiter=None))
    files = listing.list_data(DataConfig(root=str(root), labels="tags.csv", label_column="tags", label_delimiter=";",
                                         val_split=0.25))
    assert data.multi_label and data.classes == files.classes
    assert sorted(y for _, y in data.train + data.val) == sorted(y for _, y in files.train + files.val)


def test_brace_patterns_and_keys():
    assert shards.expand_braces("t-{000..002}.tar") == ["t-000.tar", "t-001.tar", "t-002.tar"]
    assert shards.expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert shards.split_name("a/b.seg.png") == ("a/b", "seg.png") and shards.split_name("README")[1] is None
    from tl_dist.data.shard_writer import keys_for, parse_size
    assert keys_for(["a/x.1.jpg", "a/x_1.jpg", "b.png"]) == ["a/x_1", "a/x_1_1", "b"]
    assert parse_size("1GB") == 10**9 and parse_size("64MiB") == 64 * 2**20


# ----------------------------------------------------------------------------- bad input, one line each

def _jpeg(colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), colour).save(buf, "JPEG")
    return buf.getvalue()


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _wds_root(tmp_path, train_members, val_members=None, classes="ants\nbees\n"):
    root = tmp_path / "wds"
    root.mkdir()
    good = [(f"v{i}.jpg", _jpeg()) for i in range(2)] + [("v0.cls", b"0"), ("v1.cls", b"1")]
    good = [good[0], good[2], good[1], good[3]]
    _tar(root / "train-000000.tar", train_members)
    _tar(root / "val-000000.tar", val_members if val_members is not None else good)
    if classes is not None:
        (root / "classes.txt").write_text(classes)
    return root


GOOD = [("a.jpg", _jpeg()), ("a.cls", b"0"), ("b.jpg", _jpeg((0, 0, 200))), ("b.cls", b"1")]


@pytest.mark.parametrize("members, message", [
    (GOOD + [("c.jpg", _jpeg())], "train-000000.tar key c: no label member"),
    (GOOD + [("c.cls", b"1")], "train-000000.tar key c: no image member"),
    (GOOD + [("c.jpg", _jpeg()), ("c.cls", b"seven")], "train-000000.tar key c: the cls label 'seven' is not a class index"),
    (GOOD + [("c.jpg", _jpeg()), ("c.cls", b"5")], "train-000000.tar key c: class index 5 is outside the 2 classes"),
    (GOOD + [("c.jpg", _jpeg()), ("c.txt", b"wasps")], "train-000000.tar key c: label 'wasps' is not in the class list"),
    (GOOD + [("c.jpg", b"not a jpeg"), ("c.cls", b"1")], "train-000000.tar key c: not an image"),
])
def test_every_bad_member_is_one_line_naming_shard_and_key_or_left_out(tmp_path, members, message, capsys):
    root = _wds_root(tmp_path, members)
    assert train_in_process(tmp_path / "run", root, "data.format=wds", "train.epochs=1") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "data.skip_bad_images" in err
    assert not (tmp_path / "run").exists()  # refused before any work
    assert train_in_process(tmp_path / "run2", root, "data.format=wds", "train.epochs=1",
                            "data.skip_bad_images=true") == 0
    assert _rows(tmp_path / "run2")[0]["train_samples"] == 2


def test_a_truncated_shard_keeps_its_whole_samples_and_names_the_damage(tmp_path, capsys):
    root = _wds_root(tmp_path, GOOD + [("c.jpg", _jpeg()), ("c.cls", b"1")])
    data = (root / "train-000000.tar").read_bytes()
    c_image = shards.index_shard(str(root / "train-000000.tar"))["samples"][2][2]
    (root / "train-000000.tar").write_bytes(data[:c_image + 100])  # inside c's image
    idx = shards.index_shard(str(root / "train-000000.tar"))
    assert [s[0] for s in idx["samples"]] == ["a", "b"] and idx["bad"][0][0] == "c"
    assert "truncated shard" in idx["bad"][0][1]


@pytest.mark.parametrize("over, message", [
    (("data.train_shards=nope-*.tar",), "no train shards under"),
    (("data.val_shards=nope-*.tar",), "no val shards under"),
    (("data.train_shards=train-{000000..000003}.tar",), "3 of 4 shard(s) not found"),
    (("data.val_split=0.2",), "holds val shards"),
    (("data.labels=x.csv",), "data.labels is a labels file of image files"),
])
def test_shard_layout_errors_are_one_line(tmp_path, over, message, capsys):
    root = _wds_root(tmp_path, GOOD)
    assert train_in_process(tmp_path / "run", root, "data.format=wds", *over) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_class_indices_without_class_names_are_one_line(tmp_path, capsys):
    root = _wds_root(tmp_path, GOOD, classes=None)
    assert train_in_process(tmp_path / "run", root, "data.format=wds") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "key a: a class index (0) needs the class names: put classes.txt" in err


def test_an_index_beside_the_shards_is_used_until_the_shard_changes(tmp_path, capsys):
    root = _wds_root(tmp_path, GOOD)
    assert data_cmd.main(["index", str(root)]) == 0
    assert "indexed 2 of 2" in capsys.readouterr().out
    assert shards.read_index(root / "train-000000.tar")["samples"][0][0] == "a"
    _tar(root / "train-000000.tar", GOOD[:2])
    os.utime(root / "train-000000.tar", ns=(1, 1))
    assert shards.read_index(root / "train-000000.tar") is None  # stale: rebuilt in memory at start-up
    assert len(listing.list_data(DataConfig(root=str(root), format="wds")).train) == 1


# ----------------------------------------------------------------------------- Hugging Face datasets

def test_a_dataset_without_validation_split_is_drawn_by_val_split(tiny_data, tmp_path, capsys):
    root = hf_from_folders(tiny_data, tmp_path / "hf", splits=(("train", "train"),))
    capsys.readouterr()
    assert train_in_process(tmp_path / "run", root, "data.format=hf", "train.epochs=1") == 2
    assert "has no validation split" in capsys.readouterr().err
    data = listing.list_data(DataConfig(root=str(root), format="hf", val_split=0.25))
    assert len(data.train) + len(data.val) == 22 and data.split["source"] == "hf dataset + val_split"
    assert data.reader.load(data.val[0][0]).size in ((48, 40), (40, 52), (56, 44))


def test_dataset_problems_are_one_line(tiny_data, tmp_path, capsys, monkeypatch):
    root = hf_from_folders(tiny_data, tmp_path / "hf")
    capsys.readouterr()
    for over, message in ((("data.image_column=img",), "has no column 'img'"),
                          (("data.label_column=y",), "has no column 'y'")):
        assert train_in_process(tmp_path / "run", root, "data.format=hf", *over) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    r = run_cli("-m", "tl_dist.train", *_args("nobody/no-such-dataset", tmp_path / "run", "data.format=hf"),
                env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})  # (read as the libraries load)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "nobody/no-such-dataset" in r.stderr and "not reachable (offline)" in r.stderr and "save_to_disk" in r.stderr
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the extra were not installed
    assert train_in_process(tmp_path / "run", root, "data.format=hf") == 2
    assert "pip install -e '.[hf]'" in capsys.readouterr().err


def test_a_list_of_class_labels_is_multi_label(tmp_path):
    datasets = pytest.importorskip("datasets")
    names = ["red", "green", "blue"]
    rows = {"image": [{"bytes": _jpeg(), "path": None}] * 6, "tags": [[0], [1, 2], [], [2], [0, 1], [1]]}
    ds = datasets.Dataset.from_dict(rows, features=datasets.Features(
        {"image": datasets.Image(), "tags": datasets.Sequence(datasets.ClassLabel(names=names))}))
    datasets.DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "ml"))
    data = listing.list_data(DataConfig(root=str(tmp_path / "ml"), format="hf", label_column="tags"))
    assert data.multi_label and data.classes == names and [y for _, y in data.train][:3] == [(0,), (1, 2), ()]


# ----------------------------------------------------------------------------- processes and resume

def _args(root, out, *over):
    return ["--config", str(ROOT / "configs" / "demo.yaml"), *FAST, f"data.root={root}", "data.demo=false",
            f"train.output_dir={out}", *over]


@pytest.mark.multiproc
@pytest.mark.parametrize("name", ["shards", "hf"])
def test_two_processes_equal_one_process(sources, tmp_path, name):
    common = (FORMAT[name], "model.mode=frozen", "train.epochs=2", "optim.lr=0.05", "data.cache=none",
              "data.num_workers=1")
    one = run_cli("-m", "tl_dist.train", *_args(sources[name], tmp_path / "one", *common, "data.batch_size=6"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = accelerate_launch(2, *_args(sources[name], tmp_path / "two", *common, "data.batch_size=3"))
    assert two.returncode == 0, two.stderr[-3000:]
    for x, y in zip(_rows(tmp_path / "one"), _rows(tmp_path / "two")):
        assert x["val_acc"] == y["val_acc"] and x["val_samples"] == y["val_samples"] == 13
        assert abs(x["val_loss"] - y["val_loss"]) < 1e-5 and abs(x["train_loss"] - y["train_loss"]) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shards", "hf"])
def test_sigkill_mid_run_then_resume_is_bit_identical(sources, tmp_path, name):
    over = (FORMAT[name], "data.image_size=64", "data.resize_size=72", "data.batch_size=4", "train.epochs=4",
            "data.cache=none", "data.num_workers=2")
    full = run_cli("-m", "tl_dist.train", *_args(sources[name], tmp_path / "full", *over))
    assert full.returncode == 0, full.stderr[-2000:]
    out = tmp_path / "run"
    sigkill_once_resumable("-m", "tl_dist.train", *_args(sources[name], out, *over), out=out)
    assert len(_rows(out)) < 4
    again = run_cli("-m", "tl_dist.train", *_args(sources[name], out, *over))
    assert again.returncode == 0 and "resuming" in again.stdout, again.stderr[-2000:]
    a, b = load_file(str(out / "last.safetensors")), load_file(str(tmp_path / "full" / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["val_loss"] for r in _rows(out)] == [r["val_loss"] for r in _rows(tmp_path / "full")]


# ----------------------------------------------------------------------------- data.scan_limit

def test_past_the_scan_limit_a_bad_image_is_found_as_it_is_decoded(tiny_data, tmp_path, capsys, monkeypatch):
    """A million files take minutes to check; past data.scan_limit a sample is checked before training
    and the rest as they are decoded: a bad one stops the run after that epoch in one line naming it,
    or is left out with data.skip_bad_images."""
    import shutil
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root)
    (root / "train" / "bees" / "bees_010.jpg").write_bytes(b"not a jpeg")
    assert train_in_process(tmp_path / "all", root, "train.epochs=1") == 2  # the default: every file, up front
    assert "bees_010.jpg: not an image" in capsys.readouterr().err and not (tmp_path / "all").exists()
    from tl_dist.data import images
    monkeypatch.setattr(images, "SAMPLED", 4)  # (a sample of 4 of the 35, every 8th: not the bad one, the 22nd)
    assert train_in_process(tmp_path / "run", root, "train.epochs=2", "data.scan_limit=0", "data.cache=none") == 2
    out, err = capsys.readouterr()
    assert "checked a sample of" in out and err.count("\n") == 1
    assert "1 image(s) failed to decode during epoch 0" in err and "bees_010.jpg" in err
    assert train_in_process(tmp_path / "skip", root, "train.epochs=2", "data.scan_limit=0", "data.cache=none",
                            "data.skip_bad_images=true") == 0
    assert "left out this epoch" in capsys.readouterr().out
    assert [r["train_samples"] for r in _rows(tmp_path / "skip")] == [21, 21]


def test_a_folder_of_parquet_files_trains_as_the_saved_dataset(sources, tmp_path, monkeypatch):
    """Parquet files (what the Hub serves) with the split in their names: datasets converts them into
    its own cache once (here a temporary one); the run equals the one from the save_to_disk folder."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    saved = datasets.load_from_disk(str(sources["hf"]))
    (tmp_path / "pq").mkdir()
    for split in ("train", "validation"):
        saved[split].to_parquet(str(tmp_path / "pq" / f"{split}-00000-of-00001.parquet"))
    for name, root in (("saved", sources["hf"]), ("parquet", tmp_path / "pq")):
        assert train_in_process(tmp_path / name, root, "data.format=hf", "train.epochs=1") == 0
    assert [r["val_loss"] for r in _rows(tmp_path / "saved")] == [r["val_loss"] for r in _rows(tmp_path / "parquet")]


def test_machines_compare_shards_by_their_sizes_and_datasets_by_their_fingerprints(sources, tmp_path):
    """What ranks on other machines compare (docs/running.md): the same names over other bytes differ."""
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(sources["shards"], copy)
    with open(copy / "val-000000.tar", "ab") as f:
        f.write(b"\0" * 10240)  # (a tar's end blocks: the same samples, another file)
    seen = []
    for root in (sources["shards"], copy):
        d = listing.list_data(DataConfig(root=str(root), format="wds"))
        seen.append(listing.identity(str(root), d.classes, d.train, d.val, deep=True, reader=d.reader))
    assert seen[0]["train"] == seen[1]["train"] and seen[0]["content"] != seen[1]["content"]
    d = listing.list_data(DataConfig(root=str(sources["hf"]), format="hf"))
    ident = listing.identity(str(sources["hf"]), d.classes, d.train, d.val, deep=True, reader=d.reader)
    assert ident["content"]["what"] == "dataset fingerprints"
