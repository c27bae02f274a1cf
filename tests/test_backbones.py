"""Every torchvision family: the new head, frozen means frozen, finetune trains, the predictor and
the checkpoint's eval transform -- and every classification model either builds or is refused."""
import dataclasses
import json

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

from tl_dist.files import checkpoint
from tl_dist import config
from tl_dist.models import backbones, heads, pretrained
from tl_dist.errors import UserError
from tl_dist.predictor import Predictor

from .conftest import make_images, run_cli
from .conftest import train_in_process as _run

# One model per family, at the smallest test size it takes: (arch, image_size, normalisation kind).
FAMILIES = [
    ("resnet18", 32, "bn"), ("regnet_y_400mf", 32, "bn"), ("shufflenet_v2_x0_5", 32, "bn"),
    ("mobilenet_v3_small", 32, "bn"), ("efficientnet_b0", 32, "bn"), ("mnasnet0_5", 32, "bn"),
    ("densenet121", 32, "bn"), ("vgg11_bn", 32, "bn"), ("alexnet", 64, "none"), ("squeezenet1_1", 32, "none"),
    ("googlenet", 32, "bn"), ("inception_v3", 75, "bn"),
    ("convnext_tiny", 32, "ln"), ("vit_b_16", 32, "ln"), ("swin_t", 32, "ln"), ("maxvit_t", 224, "ln"),
]


def _cfg(*over):
    return backbones.resolve(config.load(None, list(over)))


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("bb"), {"train": {"ants": 5, "bees": 5}, "val": {"ants": 4, "bees": 3}})


# VGG's head is AlexNet's (classifier.6) and its 500 MB checkpoints take seconds to write: in-process only.
E2E = [f for f in FAMILIES if f[0] != "vgg11_bn"]


@pytest.mark.slow
@pytest.mark.parametrize("arch,size,norm", E2E, ids=[f[0] for f in E2E])
def test_every_family_frozen_run_keeps_the_backbone_and_predicts_as_it_scored(arch, size, norm, two_classes,
                                                                              tmp_path):
    """Frozen from a weights file: after an epoch every backbone tensor and buffer is the file's,
    the new head has one row per class, the checkpoint carries the eval transform, and the predictor
    on the val folder scores what best.json says."""
    cfg = _cfg(f"model.arch={arch}", "model.weights=none", f"data.image_size={size}")
    init = tmp_path / "init.safetensors"
    save_file(backbones.create(arch, 1000, backbones.arch_kwargs(cfg.model, size)).state_dict(), str(init))
    out = tmp_path / "run"
    assert _run(out, two_classes, f"model.arch={arch}", f"model.weights={init}", "model.mode=frozen",
                f"data.image_size={size}", f"data.resize_size={size + size // 8}", "data.mean=null", "data.std=null",
                "train.epochs=1", "data.batch_size=5", "optim.lr=0.05") == 0
    best = json.loads((out / "best.json").read_text())
    ref = pretrained.reference_weights(cfg.model).transforms()
    assert (best["image_size"], best["resize_size"]) == (size, size + size // 8)
    assert best["interpolation"] == ref.interpolation.value and best["mean"] == list(ref.mean)
    last, start = load_file(str(out / "last.safetensors")), load_file(str(init))
    head = best["head"]
    assert last[f"{head}.weight"].shape[0] == 2 and start[f"{head}.weight"].shape[0] == 1000
    backbone = [k for k in last if not heads.in_head(k, head)]
    assert backbone and all(torch.equal(last[k], start[k]) for k in backbone), arch
    if norm == "bn":
        assert any(k.endswith("running_mean") for k in backbone)  # BN statistics among what stayed fixed
    p = Predictor.from_checkpoint(out, device="cpu")
    paths = sorted((two_classes / "val").rglob("*.jpg"))
    res = p.predict([str(x) for x in paths], batch_size=3)
    assert sum(r["label"] == x.parent.name for r, x in zip(res, paths)) / len(paths) == best["val_acc"]


@pytest.mark.slow  # (in-process, but a minute for all families on 2 cores)
@pytest.mark.parametrize("arch,size,norm", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_every_family_finetune_moves_the_backbone_and_frozen_holds_it(arch, size, norm):
    """SGD steps in train mode: finetune changes backbone weights; frozen changes only the head
    and leaves every buffer (BN statistics) as it was."""
    cfg = _cfg(f"model.arch={arch}", "model.weights=none", f"data.image_size={size}")
    x, y = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 2])
    for mode in ("finetune", "frozen"):
        torch.manual_seed(0)
        m = backbones.build(dataclasses.replace(cfg.model, mode=mode), 3, size)
        head = heads.head_name(m)
        assert heads.head_module(m).weight.shape[0] == 3
        before = {k: v.clone() for k, v in m.state_dict().items()}
        heads.set_train_mode(m, True, frozen=mode == "frozen", frozen_bn="eval")
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01)
        for _ in range(2):  # two: ViT starts its head at zero, so the first step reaches only the head
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
        after = m.state_dict()
        moved = {k for k in before if not torch.equal(before[k], after[k])}
        assert any(heads.in_head(k, head) for k in moved), (arch, mode)
        if mode == "finetune":
            assert any(not heads.in_head(k, head) for k in moved), arch
        else:
            assert all(heads.in_head(k, head) for k in moved), (arch, sorted(moved)[:5])


def _no_init(monkeypatch):
    """Constructors only: skip the random initialisation (seconds for the largest models)."""
    for name in ("kaiming_normal_", "kaiming_uniform_", "normal_", "uniform_", "trunc_normal_", "zeros_", "ones_",
                 "constant_", "xavier_uniform_", "orthogonal_"):
        monkeypatch.setattr(torch.nn.init, name, lambda *a, **k: a[0] if a else k.get("tensor"))


@pytest.mark.slow  # (constructors only, but 80 of them)
def test_every_classification_model_builds_with_a_new_head(monkeypatch):
    """The head rule picks, for every model torchvision ships, exactly the layers whose shape
    follows the class count (aux classifiers are turned off)."""
    _no_init(monkeypatch)
    names = backbones.classification_models()
    assert len(names) >= 80
    for arch in names:
        kw = backbones.arch_kwargs(config.ModelConfig(arch=arch, weights="none"), 224)
        shapes = []
        for n in (7, 1000):
            try:
                with torch.device("meta"):
                    m = backbones.create(arch, n, kw)
            except NotImplementedError:  # built from real tensors (RegNet)
                m = backbones.create(arch, n, kw)
            shapes.append({k: v.shape for k, v in m.state_dict().items()})
            head = heads.head_name(m)
            assert heads.head_module(m).weight.shape[0] == n, arch
        follows = {k.rsplit(".", 1)[0] for k in shapes[0] if shapes[0][k] != shapes[1][k]}
        assert follows == {head}, (arch, follows)


def test_unknown_arch_suggests_what_was_meant():
    with pytest.raises(UserError, match=r"unknown model.arch 'resnet5': did you mean resnet50"):
        _cfg("model.arch=resnet5")
    with pytest.raises(UserError, match="did you mean efficientnet_b0"):
        _cfg("model.arch=EfficientNet_B0")


def test_weights_by_name_and_their_preprocessing():
    assert _cfg("model.arch=resnet50", "model.weights=IMAGENET1K_V1").data.resize_size == 256
    v2 = _cfg("model.arch=resnet50", "model.weights=IMAGENET1K_V2")
    assert (v2.data.image_size, v2.data.resize_size) == (224, 232)
    assert _cfg("model.arch=resnet50", "model.weights=imagenet").data.resize_size == 232  # DEFAULT = V2
    eff = _cfg("model.arch=efficientnet_b3")
    assert (eff.data.image_size, eff.data.resize_size, eff.data.interpolation) == (300, 320, "bicubic")
    # A set size scales the resize in proportion; set keys win over the weights'.
    own = _cfg("model.arch=efficientnet_b3", "data.image_size=150", "data.interpolation=bilinear", "data.mean=[0.5,0.5,0.5]")
    assert (own.data.resize_size, own.data.interpolation, own.data.mean) == (160, "bilinear", [0.5, 0.5, 0.5])
    with pytest.raises(UserError, match=r"resnet18 has no weights named 'IMAGENET1K_V2'; its weights: IMAGENET1K_V1"):
        _cfg("model.weights=IMAGENET1K_V2")


def test_sizes_a_model_cannot_take_are_refused_in_one_line():
    with pytest.raises(UserError, match=r"vit_b_16 with its IMAGENET1K_V1 weights cannot take 256-pixel images .*\(224\)"):
        _cfg("model.arch=vit_b_16", "data.image_size=256")
    assert _cfg("model.arch=vit_b_16", "model.weights=none", "data.image_size=64").data.image_size == 64
    with pytest.raises(UserError, match=r"inception_v3 cannot take 64-pixel images.*\(299\)"):
        _cfg("model.arch=inception_v3", "model.weights=none", "data.image_size=64")
    with pytest.raises(UserError, match="maxvit_t cannot take 96-pixel images"):
        _cfg("model.arch=maxvit_t", "model.weights=none", "data.image_size=96")


def test_offline_weights_name_the_models_own_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    url = torchvision.models.get_model_weights("efficientnet_b0").DEFAULT.url
    with pytest.raises(UserError) as e:
        backbones.build(config.ModelConfig(arch="efficientnet_b0"), 2)
    assert url.rsplit("/", 1)[1] in str(e.value) and str(tmp_path / "hub" / "checkpoints") in str(e.value)


def test_transformers_skip_channels_last():
    assert backbones.uses_channels_last(config.ModelConfig(arch="convnext_tiny"))
    assert not backbones.uses_channels_last(config.ModelConfig(arch="vit_b_16"))
    assert not backbones.uses_channels_last(config.ModelConfig(arch="swin_t"))


def test_checkpoint_head_and_constructor_arguments_are_checked(tmp_path):
    meta = {"format": checkpoint.FORMAT, "classes": ["a", "b"], "num_classes": 2, "arch": "vit_b_16",
            "image_size": 32, "resize_size": 36, "mean": [0.5] * 3, "std": [0.5] * 3, "head": "heads.head",
            "arch_kwargs": {"image_size": 32}}
    assert checkpoint.metadata_problem(meta) is None
    for key, bad in (("head", "heads.head; rm"), ("arch_kwargs", {"weights": "x"}), ("arch_kwargs", {"image_size": -1}),
                     ("interpolation", "lanczos")):
        assert key in checkpoint.metadata_problem({**meta, key: bad})


@pytest.mark.slow
def test_a_continued_run_is_bit_identical_for_a_model_with_dropout_and_stochastic_depth(two_classes, tmp_path):
    """EfficientNet draws random numbers in every train step (dropout, stochastic depth): a run
    continued from its resume state ends bit for bit where one uninterrupted run does."""
    # (64 px: from scratch at 32 px its 1x1 final feature maps give NaN in eval after a few steps)
    common = ("model.arch=efficientnet_b0", "model.mode=finetune", "data.batch_size=4", "data.image_size=64",
              "data.resize_size=72")
    assert _run(tmp_path / "straight", two_classes, *common, "train.epochs=3") == 0
    assert _run(tmp_path / "pieces", two_classes, *common, "train.epochs=1") == 0
    assert _run(tmp_path / "pieces", two_classes, *common, "train.epochs=3") == 0
    a, b = (load_file(str(tmp_path / n / "last.safetensors")) for n in ("straight", "pieces"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_mistyped_arch_stops_before_the_data_is_read(tmp_path):
    r = run_cli("-m", "tl_dist", "train", "configs/finetune.yaml", "model.arch=resnet5",
                f"data.root={tmp_path / 'missing'}", f"train.output_dir={tmp_path / 'run'}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "did you mean resnet50" in r.stderr and not (tmp_path / "run").exists()
