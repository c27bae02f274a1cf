"""The predictor CLI on a tiny trained run: table, JSON, bad files, exit codes, plot."""
import json

import pytest
from PIL import Image

from tl_dist.commands import train

from .conftest import FAST, ROOT, make_images, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pred")
    assert train.main(["--config", str(ROOT / "configs" / "demo.yaml"), *FAST, f"data.root={tiny_data}",
                       "data.demo=false", f"train.output_dir={out}", "train.epochs=1"]) == 0
    return out


def test_json_output_fields(run_dir, tiny_data):
    r = run_cli("-m", "tl_dist.predict", str(tiny_data / "val"), "--checkpoint", str(run_dir), "--json", "--topk", "2")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(l) for l in r.stdout.splitlines()]
    assert len(rows) == 13
    for row in rows:
        assert set(row) == {"path", "label", "prob", "topk"} and row["label"] in ("ants", "bees")
        assert [t["label"] for t in row["topk"]][0] == row["label"] and len(row["topk"]) == 2
        assert abs(sum(t["prob"] for t in row["topk"]) - 1) < 1e-4


def test_csv_tta_and_the_per_class_count(run_dir, tiny_data, tmp_path):
    import csv
    import io

    import tl_dist
    from tl_dist.predictor import Predictor

    (tmp_path / "text.jpg").write_text("nope")
    r = run_cli("-m", "tl_dist.predict", str(tiny_data / "val"), str(tmp_path / "text.jpg"), "--checkpoint",
                str(run_dir), "--format", "csv", "--topk", "2")
    assert r.returncode == 1 and r.stderr == "", r.stderr  # (a failed image is a row with its error)
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert list(rows[0]) == ["path", "label", "prob", "top1_label", "top1_prob", "top2_label", "top2_prob", "labels",
                             "error"]
    assert len(rows) == 14 and rows[-1]["error"].startswith(str(tmp_path / "text.jpg")) and rows[-1]["label"] == ""
    jsonl = run_cli("-m", "tl_dist.predict", str(tiny_data / "val"), "--checkpoint", str(run_dir), "--json", "--topk",
                    "2")
    for row, j in zip(rows, map(json.loads, jsonl.stdout.splitlines())):
        assert (row["path"], row["label"], row["top2_label"]) == (j["path"], j["label"], j["topk"][1]["label"])
        assert abs(float(row["prob"]) - j["prob"]) < 1e-6
    table = run_cli("-m", "tl_dist.predict", str(tiny_data / "val"), "--checkpoint", str(run_dir))
    counts = {}
    for j in map(json.loads, jsonl.stdout.splitlines()):
        counts[j["label"]] = counts.get(j["label"], 0) + 1
    assert table.stdout.strip().splitlines()[-1].startswith("predicted for 13 image(s): ")
    assert all(f"{c} {n}" in table.stdout.strip().splitlines()[-1] for c, n in counts.items())
    # --tta flip scores the same mean logits as tl-dist evaluate --tta flip
    paths = sorted(str(p) for p in (tiny_data / "val").rglob("*.jpg"))
    p = Predictor.from_checkpoint(run_dir, device="cpu")
    flipped = p.predict(paths, tta=True)
    m = tl_dist.evaluate(tiny_data, run_dir, split="val", out=tmp_path / "ev", tta=True, device="cpu")
    right = sum(r["label"] == r["path"].split("/")[-2] for r in flipped) / len(paths)
    assert right == m["tta_flip"]["accuracy"]


def test_mixed_good_and_bad_files(run_dir, tiny_data, tmp_path):
    good = next((tiny_data / "val" / "ants").iterdir())
    (tmp_path / "text.jpg").write_text("nope")
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(good.read_bytes()[:300])
    args = [str(good), str(tmp_path / "missing.png"), str(tmp_path / "text.jpg"), str(trunc)]
    r = run_cli("-m", "tl_dist.predict", *args, "--checkpoint", str(run_dir / "best.safetensors"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert good.name in r.stdout  # the good one is still predicted, in the table
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 3 and all(l.startswith("error: ") for l in lines)
    assert "missing.png: file not found" in r.stderr and "text.jpg" in r.stderr and "trunc.jpg" in r.stderr
    r = run_cli("-m", "tl_dist.predict", *args, "--checkpoint", str(run_dir), "--json")
    rows = [json.loads(l) for l in r.stdout.splitlines()]
    assert r.returncode == 1 and [("error" in x) for x in rows] == [False, True, True, True]
    r = run_cli("-m", "tl_dist.predict", str(good), "--checkpoint", str(run_dir))
    assert r.returncode == 0


def test_bad_checkpoint_exit_2(run_dir, tiny_data, tmp_path):
    img = str(next((tiny_data / "val" / "ants").iterdir()))
    r = run_cli("-m", "tl_dist.predict", img, "--checkpoint", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "not found" in r.stderr
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes((run_dir / "best.safetensors").read_bytes()[:5000])
    r = run_cli("-m", "tl_dist.predict", img, "--checkpoint", str(broken))
    assert r.returncode == 2 and "broken.safetensors" in r.stderr and "Traceback" not in r.stderr


def test_save_plot(run_dir, tiny_data, tmp_path):
    img = str(next((tiny_data / "val" / "bees").iterdir()))
    r = run_cli("-m", "tl_dist.predict", img, "--checkpoint", str(run_dir), "--save-plot", str(tmp_path / "p.png"))
    assert r.returncode == 0, r.stderr
    with Image.open(tmp_path / "p.png") as im:
        assert im.width >= 224 and im.height >= 224


def test_names_from_files_never_reach_the_terminal_as_control_sequences(tmp_path, tiny_data):
    """Class names come from checkpoint metadata and paths from the user's folders; escape
    sequences in them are shown escaped in tables and errors, and kept exact in JSON."""
    import torch

    from tl_dist.files import checkpoint
    from tl_dist.models import backbones
    evil = ["ants\x1b]0;pwned\x07", "bees\x1b[2J[bold]x[/bold]"]
    meta = {"classes": evil, "num_classes": 2, "arch": "resnet18", "image_size": 32, "resize_size": 36,
            "mean": [0.5] * 3, "std": [0.25] * 3}
    torch.manual_seed(0)
    checkpoint.save_weights(tmp_path / "best.safetensors", backbones.create("resnet18", 2).state_dict(), meta)
    img = next((tiny_data / "val" / "ants").iterdir())
    missing = tmp_path / "gone\x1b[31m.jpg"
    r = run_cli("-m", "tl_dist.predict", str(img), str(missing), "--checkpoint", str(tmp_path), "--topk", "2")
    assert r.returncode == 1
    for stream in (r.stdout, r.stderr):
        assert "\x1b" not in stream and "\x07" not in stream
    assert "\\x1b]0;pwned\\x07" in r.stdout and "[bold]x[/bold]" in r.stdout  # shown, not obeyed
    assert "gone\\x1b[31m.jpg" in r.stderr
    r = run_cli("-m", "tl_dist.predict", str(img), "--checkpoint", str(tmp_path), "--json", "--topk", "2")
    assert {t["label"] for t in json.loads(r.stdout)["topk"]} == set(evil)  # JSON: exact


def test_training_refuses_class_folders_with_control_characters(tmp_path):
    root = make_images(tmp_path / "d", {"train": {"a\x1b[31m": 2, "b": 2}, "val": {"a\x1b[31m": 1, "b": 1}})
    r = run_cli("-m", "tl_dist.train", *FAST, f"data.root={root}", f"train.output_dir={tmp_path / 'o'}")
    assert r.returncode == 2 and "\x1b" not in r.stderr
    assert "has control characters in its name; rename it" in r.stderr.splitlines()[-1]


def test_predicting_with_the_resume_state_says_which_file_to_use(run_dir, tiny_data):
    r = run_cli("-m", "tl_dist.predict", str(tiny_data / "val"), "--checkpoint", str(run_dir / "resume.pt"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "is a resume state" in r.stderr and str(run_dir / "best.safetensors") in r.stderr
