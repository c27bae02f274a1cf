"""Frozen features computed once (train.feature_cache) and data.augment=none: the backbone runs in the
first frozen epoch only, and the weights are the ones the backbone running every epoch gives, bit
for bit: one process, two, across a resume, up to the unfreezing, and when the budget says no."""
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchvision.models.resnet import ResNet

from tl_dist import config
from tl_dist.data import loaders
from tl_dist.data.listing import list_data
from tl_dist.models import backbones
from tl_dist.predictor import Predictor
from tl_dist.training import feature_cache

from .conftest import FAST, ML, ROOT, accelerate_launch, make_tagged, train_in_process

PROBE = 1  # the forward backbones.resolve runs to check the input size
LINEAR_PROBE = ("model.mode=frozen", "data.augment=none", "optim.lr=0.05", "data.batch_size=3")


@pytest.fixture
def forwards(monkeypatch) -> list[int]:
    """Counts the full ResNet forwards (the backbone running) of in-process runs."""
    calls = [0]
    plain = ResNet.forward

    def counted(self, x):
        calls[0] += 1
        return plain(self, x)
    monkeypatch.setattr(ResNet, "forward", counted)
    return calls


def weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "last.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_backbone_runs_in_the_first_epoch_only_and_the_weights_are_bit_identical(tiny_data, tmp_path, forwards,
                                                                                    capsys):
    assert train_in_process(tmp_path / "off", tiny_data, *LINEAR_PROBE, "train.epochs=4",
                            "train.feature_cache=off") == 0
    assert "feature cache off: train.feature_cache=off" in capsys.readouterr().out
    without = forwards[0]
    forwards[0] = 0
    assert train_in_process(tmp_path / "on", tiny_data, *LINEAR_PROBE, "train.epochs=4") == 0
    out = capsys.readouterr().out
    assert "feature cache on" in out and "epoch 0: kept the backbone's output for 22 train images" in out
    # 22 train images in batches of 3: 8 steps; 13 val images in one batch, kept after the first
    # evaluation; and the input-size check's probe before the run
    assert (without, forwards[0]) == (PROBE + 4 * 8 + 1, PROBE + 8 + 1)
    assert same(weights(tmp_path / "on"), weights(tmp_path / "off"))
    on, off = ([json.loads(l) for l in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("on", "off"))
    assert [(r["train_loss"], r["train_acc"], r["val_loss"]) for r in on] == \
        [(r["train_loss"], r["train_acc"], r["val_loss"]) for r in off]


def test_augment_none_trains_on_exactly_the_predictors_transform(tiny_data, tmp_path):
    assert train_in_process(tmp_path / "run", tiny_data, *LINEAR_PROBE, "train.epochs=1") == 0
    predictor = Predictor.from_checkpoint(tmp_path / "run" / "best.safetensors", device="cpu")
    cfg = backbones.resolve(config.load(ROOT / "configs" / "demo.yaml", [*FAST, f"data.root={tiny_data}",
                                                                        *LINEAR_PROBE]))
    data = list_data(cfg.data)
    for cache in ("none", "ram", "device"):  # (the device path runs on the CPU too)
        d = loaders.build(dataclasses.replace(cfg.data, cache=cache), data.classes, data.train, data.val, seed=0)
        assert d.cache == cache
        for epoch in (0, 5):
            d.train_sampler.set_epoch(epoch)
            x, y, w, idx = next(iter(d.train_loader))
            for img, i in zip(x, idx.tolist()):
                assert torch.equal(img, predictor.eval_tensor(data.train[i][0])), (cache, epoch, i)


def test_why_the_cache_is_off_is_said_for_each_reason():
    model = backbones.create("resnet18", 2)

    def why(*over):
        return feature_cache.why_off(config.load(None, ["model.mode=frozen", *over]), model, 1000)
    assert why("data.augment=none") is None
    assert "data.augment=seed" in why()  # the tutorial's crops and flips: other pixels every epoch
    assert "random_erasing=0.25" in why("data.augment=none", "data.random_erasing=0.25")
    assert "MixUp" in why("data.augment=none", "train.mixup_alpha=0.2")
    assert "frozen_bn=train" in why("data.augment=none", "model.frozen_bn=train")
    assert "train.compile" in why("data.augment=none", "train.compile=true")
    assert why("data.augment=none", "train.feature_cache=off") == "train.feature_cache=off"
    assert "over data.cache_gb=0.001" in why("data.augment=none", "data.cache_gb=0.001")  # 1000 x 512 floats: 2 MB
    assert config.load(None, ["train.feature_cache=off"]).train.feature_cache == "off"  # (YAML reads off as false)


@pytest.mark.slow
def test_a_resume_in_the_middle_rebuilds_the_cache_and_ends_bit_identical(tiny_data, tmp_path, forwards, capsys):
    assert train_in_process(tmp_path / "straight", tiny_data, *LINEAR_PROBE, "train.epochs=5") == 0
    assert train_in_process(tmp_path / "resumed", tiny_data, *LINEAR_PROBE, "train.epochs=2") == 0
    capsys.readouterr()
    forwards[0] = 0
    assert train_in_process(tmp_path / "resumed", tiny_data, *LINEAR_PROBE, "train.epochs=5") == 0
    assert "epoch 2: kept the backbone's output" in capsys.readouterr().out
    assert forwards[0] == PROBE + 8 + 1  # the first epoch after the resume records them again
    assert same(weights(tmp_path / "resumed"), weights(tmp_path / "straight"))


@pytest.mark.slow
def test_the_cache_ends_when_the_backbone_unfreezes(tiny_data, tmp_path, forwards, capsys):
    phases = ("model.mode=frozen_then_finetune", "model.unfreeze_epoch=2", "train.epochs=4", "optim.backbone_lr=0.0001")
    assert train_in_process(tmp_path / "off", tiny_data, *LINEAR_PROBE, *phases, "train.feature_cache=off") == 0
    forwards[0] = 0
    assert train_in_process(tmp_path / "on", tiny_data, *LINEAR_PROBE, *phases) == 0
    # epoch 0 records, epoch 1 runs the classifier alone, epochs 2 and 3 train the whole network
    assert forwards[0] == PROBE + 8 + 1 + 2 * (8 + 1)
    a, b = weights(tmp_path / "on"), weights(tmp_path / "off")
    assert same(a, b)
    assert "the backbone trains from now on" in capsys.readouterr().out


@pytest.mark.slow
def test_a_budget_too_small_falls_back_to_running_the_backbone(tiny_data, tmp_path, forwards, capsys):
    assert train_in_process(tmp_path / "off", tiny_data, *LINEAR_PROBE, "train.epochs=3",
                            "train.feature_cache=off") == 0
    capsys.readouterr()
    forwards[0] = 0
    assert train_in_process(tmp_path / "small", tiny_data, *LINEAR_PROBE, "train.epochs=3",
                            "data.cache_gb=0.00001") == 0
    out = capsys.readouterr().out
    assert "feature cache off: 22 train features need 0 MiB, over data.cache_gb=1e-05" in out
    assert forwards[0] == PROBE + 3 * (8 + 1)  # (the val features do not fit either)
    assert same(weights(tmp_path / "small"), weights(tmp_path / "off"))


@pytest.mark.slow
def test_multi_label_features_are_kept_alike(tmp_path, forwards):
    root = make_tagged(tmp_path / "d", 24)
    common = (*ML, *LINEAR_PROBE, "train.epochs=3")
    assert train_in_process(tmp_path / "off", root, *common, "train.feature_cache=off") == 0
    forwards[0] = 0
    assert train_in_process(tmp_path / "on", root, *common) == 0
    assert forwards[0] == PROBE + 6 + 1  # 18 train images in batches of 3, then the classifier alone
    assert same(weights(tmp_path / "on"), weights(tmp_path / "off"))


@pytest.mark.multiproc
def test_two_processes_keep_every_sample_and_end_bit_identical(tiny_data, tmp_path):
    init = tmp_path / "init.safetensors"
    save_file(backbones.create("resnet18", 1000).state_dict(), str(init))
    args = ("--config", str(ROOT / "configs" / "demo.yaml"), *FAST, f"data.root={tiny_data}", "data.demo=false",
            *LINEAR_PROBE, f"model.weights={init}", "train.epochs=4")
    for cache in ("auto", "off"):
        r = accelerate_launch(2, *args, f"train.output_dir={tmp_path / cache}", f"train.feature_cache={cache}")
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("kept the backbone's output for 22 train images" in r.stdout) == (cache == "auto")
    assert same(weights(tmp_path / "auto"), weights(tmp_path / "off"))
