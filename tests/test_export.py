"""tl-dist export: each format checks itself, predicts as the checkpoint does, is readable by its
own runtime without tl_dist, and a failed or refused export leaves nothing behind."""
import json

import pytest
import torch

from tl_dist.files import checkpoint, exported
from tl_dist.commands import export, predict
from tl_dist.models import backbones
from tl_dist.data.augment import eval_transform
from tl_dist.data.images import load_rgb
from tl_dist.predictor import Predictor

from .conftest import run_cli

pytestmark = pytest.mark.slow
FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "exported": ".pt2"}


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_data):
    """A checkpoint as training writes it (BatchNorm statistics moved off their init), at 32 px."""
    out = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    net = backbones.create("resnet18", 2)
    with torch.no_grad():  # a few train-mode passes: running statistics a real run would have
        for _ in range(3):
            net(torch.rand(8, 3, 32, 32) * 2 - 1)
    meta = {"classes": ["ants", "bees"], "num_classes": 2, "arch": "resnet18", "head": "fc", "image_size": 32,
            "resize_size": 36, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225], "epoch": 3, "val_acc": 0.75,
            "config": {"data": {"root": str(tiny_data)}}}
    checkpoint.save_weights(out / "best.safetensors", net.state_dict(), meta)
    return out


@pytest.fixture(autouse=True)
def _quick_latency(monkeypatch):
    monkeypatch.setattr(export, "LATENCY_BUDGET_S", 0.05)  # the numbers are not under test, their presence is


def leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_checks_itself_and_predicts_as_the_checkpoint(run, tiny_data, tmp_path, fmt, capsys):
    out = tmp_path / f"m{FORMATS[fmt]}"
    assert export.main([str(run), "--format", fmt, "--out", str(out), "--dynamic-batch"]) == 0
    printed = capsys.readouterr().out
    assert "self-check: 8 image(s) from" in printed and str(tiny_data / "val") in printed  # real images, the run's
    desc = json.loads(out.with_name(out.name + ".json").read_text())
    assert desc["check"]["max_abs_logit_diff"] <= 1e-4 and desc["classes"] == ["ants", "bees"]
    assert desc["input"] == {"dtype": "float32", "range": [0, 1], "layout": "NCHW", "channels": "RGB",
                             "height": 32, "width": 32, "batch": None, "normalized_inside": True}
    assert set(desc["cpu_latency_ms"]) == {"1", "32"} and desc["cpu_latency_ms"]["32"]["exported"] > 0
    assert leftovers(tmp_path) == []

    images = sorted(str(p) for p in (tiny_data / "val").rglob("*.jpg"))
    want = Predictor.from_checkpoint(run, device="cpu").predict(images, topk=2)
    trust = fmt != "onnx"  # TorchScript and torch.export files are programs: run only when trusted
    got = Predictor.from_checkpoint(out, device="cpu", trust_code=trust).predict(images, topk=2)
    assert [r["label"] for r in got] == [r["label"] for r in want]
    assert max(abs(a["prob"] - b["prob"]) for a, b in zip(got, want)) < 1e-4
    capsys.readouterr()
    assert predict.main([*images[:3], "--checkpoint", str(out), "--json"] + ["--trust-code"] * trust) == 0
    assert [json.loads(l)["label"] for l in capsys.readouterr().out.splitlines()] == [w["label"] for w in want[:3]]


def test_an_onnx_file_alone_gives_the_checkpoints_logits_in_onnxruntime(run, tiny_data, tmp_path):
    """What a user of another runtime does: the eval transform, /255, the file; nothing of tl_dist."""
    import onnxruntime as ort

    out = tmp_path / "model.onnx"
    assert export.main([str(run), "--out", str(out)]) == 0  # default: a fixed batch of 1
    predictor = Predictor.from_checkpoint(run, device="cpu")
    img = next((tiny_data / "val" / "bees").iterdir())
    x = eval_transform(load_rgb(str(img)), 36, 32)[None]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: (x.float() / 255).numpy()})[0]
    from tl_dist.data.augment import normalize
    with torch.no_grad():
        want = predictor.model(normalize(x, predictor.meta["mean"], predictor.meta["std"], channels_last=False))
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-4)
    assert session.get_inputs()[0].shape == [1, 3, 32, 32]
    # a fixed-batch file still predicts folders (one image at a time)
    rows = Predictor.from_checkpoint(out, device="cpu").predict(sorted((tiny_data / "val" / "ants").iterdir()))
    assert len(rows) == 7 and all("label" in r for r in rows)


def test_uint8_input_runs_on_the_bytes(run, tiny_data, tmp_path):
    out = tmp_path / "bytes.pt2"
    assert export.main([str(run), "--format", "exported", "--input", "uint8", "--out", str(out)]) == 0
    program = torch.export.load(str(out)).module()
    img = next((tiny_data / "val" / "ants").iterdir())
    x = eval_transform(load_rgb(str(img)), 36, 32)[None]  # uint8, as the eval transform leaves it
    p = Predictor.from_checkpoint(run, device="cpu")
    from tl_dist.data.augment import normalize
    with torch.no_grad():
        assert torch.allclose(program(x), p.model(normalize(x, p.meta["mean"], p.meta["std"], False)), atol=1e-4)


def test_a_failed_self_check_keeps_the_old_file_and_leaves_nothing(run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "model.pt"
    assert export.main([str(run), "--format", "torchscript", "--out", str(out)]) == 0
    yesterday, description = out.read_bytes(), (tmp_path / "model.pt.json").read_bytes()
    capsys.readouterr()
    real = exported.ExportedModel.__call__
    monkeypatch.setattr(exported.ExportedModel, "__call__", lambda self, x: real(self, x) + 1e-3)
    assert export.main([str(run), "--format", "torchscript", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "self-check failed" in err and "1.00e-03" in err and "nothing written" in err
    assert out.read_bytes() == yesterday and (tmp_path / "model.pt.json").read_bytes() == description
    assert leftovers(tmp_path) == []


def test_without_the_export_extra_onnx_says_what_to_install(run, tmp_path, monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    assert export.main([str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "onnxscript" in err and "pip install 'tl_dist[export]'" in err
    assert list(tmp_path.iterdir()) == []


def test_bad_usage_is_one_line_and_files_that_are_not_exports_are_refused(run, tiny_data, tmp_path, capsys):
    (tmp_path / "m.onnx").write_bytes(b"an export")
    for args, words in (([str(run), "--format", "onnx", "--out", str(tmp_path / "m.pt")], "onnx files end in .onnx"),
                        ([str(run), "--out", str(tmp_path / "no" / "m.onnx")], "does not exist"),
                        ([str(tmp_path / "missing")], "not found"),
                        ([str(run), "--images", str(tmp_path)], "no image files"),
                        ([str(run / "best.json")], "not a tl_dist checkpoint"),
                        ([str(tmp_path / "m.onnx")], "is already an exported file")):
        assert export.main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    img = str(next((tiny_data / "val" / "ants").iterdir()))
    zipped = tmp_path / "resume.pt"
    torch.save({"model": {}}, zipped)  # a torch archive with no tl_dist description
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07garbage")
    for f, words in ((zipped, "is a resume state or a torch file"), (tmp_path / "broken.onnx", "not an ONNX file")):
        assert predict.main([img, "--checkpoint", str(f)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    r = run_cli("-m", "tl_dist", "export", "--help")  # the command is wired into tl-dist
    assert r.returncode == 0 and "--dynamic-batch" in r.stdout
