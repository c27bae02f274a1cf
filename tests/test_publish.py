"""A run as a folder to publish (tl-dist export RUN --format hf) and its upload (tl-dist push), offline:
the model card's numbers are the run's, the folder predicts as the run does, timm reads its config,
and the upload goes through huggingface_hub's API (intercepted here: no network)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from tl_dist.commands import export, push
from tl_dist.predictor import Predictor

from .conftest import train_in_process


@pytest.fixture(scope="module")
def run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pub") / "run"
    assert train_in_process(out, tiny_data, "model.arch=timm/convnext_atto", "model.mode=frozen", "train.epochs=2",
                            "optim.lr=0.05", "train.plots=true") == 0
    return out


def test_the_published_folder_describes_and_predicts_as_the_run(run, tiny_data, capsys):
    assert export.main([str(run), "--format", "hf"]) == 0
    folder = run / "hf"
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "confusion_matrix.png",
                                                        "curves.png", "model.safetensors", "tl_dist_export.json",
                                                        "val_predictions.png"]
    best = json.loads((run / "best.json").read_text())
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n") and f"| accuracy | {best['val_acc']:.4f} |" in card
    assert f"| macro F1 | {best['macro_f1']:.4f} |" in card and "| ants |" in card and "![curves](curves.png)" in card
    supports = [int(line.rsplit("|", 2)[1]) for line in card.splitlines() if line.startswith(("| ants", "| bees"))]
    assert supports == [7, 6]  # the val images of each class
    config = json.loads((folder / "config.json").read_text())
    assert (config["architecture"], config["num_classes"], config["label_names"]) == ("convnext_atto", 2,
                                                                                     ["ants", "bees"])
    paths = sorted(str(p) for p in (tiny_data / "val").rglob("*.jpg"))
    a = Predictor.from_checkpoint(run, device="cpu").predict(paths)
    b = Predictor.from_checkpoint(folder, device="cpu").predict(paths)
    assert a == [{**r, "path": r["path"]} for r in b]
    # timm alone builds the model from config.json and loads the weights
    import timm
    model = timm.create_model(config["architecture"], num_classes=config["num_classes"], pretrained=True,
                              pretrained_cfg_overlay={**config["pretrained_cfg"], "file": str(folder / "model.safetensors")},
                              **config.get("model_args", {}))
    state = load_file(str(folder / "model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert export.main([str(run), "--format", "hf"]) == 0  # its own folder: replaced
    (run / "mine").mkdir()
    assert export.main([str(run), "--format", "hf", "--out", str(run / "mine")]) == 2  # a user's: refused
    assert "is not a folder tl_dist exported" in capsys.readouterr().err


def test_push_uploads_the_folder_through_the_hub_client(run, monkeypatch, capsys):
    import huggingface_hub
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo, **k: calls.append(("create", repo, k)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder",
                        lambda self, **k: calls.append(("upload", k["repo_id"], sorted(p.name for p in
                                                       __import__("pathlib").Path(k["folder_path"]).iterdir()))))
    assert push.main([str(run), "--repo", "someone/ants-vs-bees", "--private"]) == 0
    assert calls[0] == ("create", "someone/ants-vs-bees", {"private": True, "exist_ok": True})
    assert calls[1][0] == "upload" and "model.safetensors" in calls[1][2] and "README.md" in calls[1][2]
    assert "pushed" in capsys.readouterr().out

    def offline(self, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", offline)
    assert push.main([str(run), "--repo", "someone/ants-vs-bees"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "network unreachable" in err and "the folder stays" in err
    assert push.main([str(run), "--repo", "no-slash"]) == 2


def test_push_without_the_hub_client_is_one_line(run, monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    assert push.main([str(run), "--repo", "a/b"]) == 2
    assert "pip install -e '.[hub]'" in capsys.readouterr().err
