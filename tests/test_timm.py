"""timm's models as backbones (model.arch: timm/<name>): a CNN with BatchNorm, a ConvNeXt (LayerNorm) and
a ViT, with weights from local files (nothing downloaded), through training, the predictor, export,
resume and two processes; layer-wise learning-rate decay in closed form; every refusal in one line."""
import json
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from tl_dist import config
from tl_dist.errors import UserError
from tl_dist.models import backbones, heads
from tl_dist.predictor import Predictor
from tl_dist.training import optim

from .conftest import FAST, ROOT, accelerate_launch, run_cli, train_in_process

timm = pytest.importorskip("timm")

# (model.arch, constructor arguments the weights file is made with)
FAMILIES = {"bn": ("timm/resnet18", {}), "layernorm": ("timm/convnext_atto", {}),
            "vit": ("timm/vit_tiny_patch16_224", {"img_size": 32})}


@pytest.fixture(scope="module")
def weights_files(tmp_path_factory) -> dict[str, str]:
    """Each family's ImageNet-shaped state dict (1000 classes), as a user's local file would be."""
    folder = tmp_path_factory.mktemp("timm_weights")
    files = {}
    for family, (arch, kwargs) in FAMILIES.items():
        torch.manual_seed(1)
        path = folder / f"{family}.safetensors"
        save_file(timm.create_model(arch.removeprefix("timm/"), num_classes=1000, **kwargs).state_dict(), str(path))
        files[family] = str(path)
    return files


def family_args(family: str, files: dict[str, str]) -> tuple[str, ...]:
    return (f"model.arch={FAMILIES[family][0]}", f"model.weights={files[family]}")


# ----------------------------------------------------------------------------- set-up, before any work

def test_without_timm_a_timm_model_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # (import timm now fails, as where it is not installed)
    with pytest.raises(UserError, match=r"timm/convnext_atto is a timm model, and timm is not installed: "
                                        r"pip install -e '.\[timm\]'"):
        backbones.resolve(config.load(None, ["model.arch=timm/convnext_atto"]))


def test_torchvision_runs_and_their_predictor_never_import_timm():
    r = run_cli("-c", "import sys, tl_dist.predictor, tl_dist.commands.train, tl_dist.commands.export; "
                      "from tl_dist.models import backbones; backbones.create('resnet18', 2); print('timm' in sys.modules)")
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]


def test_unknown_names_and_tags_get_close_matches():
    with pytest.raises(UserError, match="did you mean timm/convnext_atto"):
        backbones.resolve(config.load(None, ["model.arch=timm/convnext_atoo"]))
    with pytest.raises(UserError, match="resnet50 has no pretrained tag 'nope'; its tags: a1_in1k, "):
        backbones.resolve(config.load(None, ["model.arch=timm/resnet50.nope"]))


def test_preprocessing_comes_from_the_tags_pretrained_cfg_and_set_keys_win():
    cfg = backbones.resolve(config.load(None, ["model.arch=timm/resnet50.a1_in1k"]))
    assert (cfg.data.image_size, cfg.data.resize_size, cfg.data.interpolation) == (224, 235, "bicubic")  # crop_pct .95
    clip = backbones.resolve(config.load(None, ["model.arch=timm/vit_base_patch16_clip_224.openai"])).data
    assert clip.mean == pytest.approx([0.48145466, 0.4578275, 0.40821073]) and clip.resize_size == 248  # crop_pct .9
    small = backbones.resolve(config.load(None, ["model.arch=timm/vit_tiny_patch16_224", "data.image_size=32",
                                                 "data.interpolation=bilinear"]))
    assert (small.data.image_size, small.data.resize_size, small.data.interpolation) == (32, 35, "bilinear")  # 248 x 32 / 224
    assert backbones.arch_kwargs(small.model, 32) == {"img_size": 32}  # the position embedding made for 32 px


def test_the_head_is_what_timm_calls_the_classifier():
    for arch, head in (("resnet18", "fc"), ("convnext_atto", "head.fc"), ("vit_tiny_patch16_224", "head")):
        model = backbones.create(f"timm/{arch}", 5)
        assert heads.head_name(model) == head and heads.head_module(model).out_features == 5


def test_layer_decay_sets_each_blocks_rate_in_closed_form():
    cfg = config.load(None, ["model.arch=timm/resnet18", "model.weights=none", "optim.lr=1.0",
                             "optim.backbone_lr=0.1", "optim.layer_decay=0.5", "optim.decay_bias_and_norm=false"])
    model = backbones.create("timm/resnet18", 3)
    opt = optim.build_optimizer(model, cfg)
    schedule = optim.Schedule(opt, cfg, train_images=10)
    # timm's block map of ResNet-18: the stem 0, layer1.0 .. layer4.1 are 1 .. 8, the classifier 9
    block = {"conv1": 0, "bn1": 0, **{f"layer{i // 2 + 1}.{i % 2}": i + 1 for i in range(8)}, "fc": 9}
    for epoch, factor in ((0, 1.0), (7, 0.1)):  # StepLR: x0.1 from epoch 7
        schedule.start_epoch(epoch)
        lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        for name, p in model.named_parameters():
            b = next(v for k, v in block.items() if name.startswith(k + "."))
            expected = 1.0 * factor if b == 9 else 0.1 * factor * 0.5 ** (9 - b)
            assert lr_of[id(p)] == pytest.approx(expected, rel=1e-12), name
    with pytest.raises(UserError, match="optim.layer_decay needs a timm model .* torchvision's resnet18 has none"):
        backbones.resolve(config.load(None, ["optim.layer_decay=0.75"]))


def test_regularisation_keys_reach_the_constructor_or_are_refused_in_one_line():
    cfg = config.load(None, ["model.arch=timm/convnext_atto", "model.drop_path_rate=0.2", "model.drop_rate=0.3"])
    assert backbones.arch_kwargs(cfg.model, 224) == {"drop_rate": 0.3, "drop_path_rate": 0.2}
    model = backbones.create(cfg.model.arch, 2, backbones.arch_kwargs(cfg.model, 224))
    assert model.drop_rate == 0.3 and model.stages[-1].blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
    tv = backbones.resolve(config.load(None, ["model.arch=convnext_tiny", "model.drop_path_rate=0.1"]))
    assert backbones.arch_kwargs(tv.model, 224) == {"stochastic_depth_prob": 0.1}
    with pytest.raises(UserError, match="model.drop_path_rate: torchvision's resnet18 has no stochastic_depth_prob"):
        backbones.resolve(config.load(None, ["model.drop_path_rate=0.1"]))


@pytest.mark.slow
def test_offline_pretrained_weights_are_one_line_naming_the_hub_repo_and_file(tmp_path, tiny_data):
    r = run_cli("-m", "tl_dist.train", "--config", str(ROOT / "configs" / "demo.yaml"), f"data.root={tiny_data}",
                "data.demo=false", f"train.output_dir={tmp_path / 'run'}", "model.arch=timm/convnext_atto",
                "model.weights=imagenet", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert "cannot get the pretrained weights of timm/convnext_atto (offline?)" in line
    assert "Hugging Face Hub repo timm/convnext_atto.d2_in1k, file model.safetensors" in line and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------- runs

@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_frozen_run_keeps_the_backbone_bit_identical_and_the_workflow_works(tmp_path, tiny_data, weights_files,
                                                                              family):
    out = tmp_path / "run"
    assert train_in_process(out, tiny_data, *family_args(family, weights_files), "model.mode=frozen",
                            "train.epochs=2", "optim.lr=0.05") == 0
    start, end = load_file(weights_files[family]), load_file(str(out / "last.safetensors"))
    head = json.loads((out / "best.json").read_text())["head"]
    assert end[f"{head}.weight"].shape[0] == 2  # two classes
    backbone = [k for k in end if not k.startswith(head + ".")]
    assert backbone and all(torch.equal(end[k], start[k]) for k in backbone)  # BN buffers included
    best = json.loads((out / "best.json").read_text())
    assert best["arch"] == FAMILIES[family][0] and best["versions"]["timm"] == timm.__version__
    paths = sorted((tiny_data / "val").rglob("*.jpg"))
    results = Predictor.from_checkpoint(out / "best.safetensors", device="cpu").predict([str(p) for p in paths])
    assert sum(r["label"] == p.parent.name for r, p in zip(results, paths)) / len(paths) == best["val_acc"]
    r = run_cli("-m", "tl_dist", "export", str(out), "--format", "onnx")
    assert r.returncode == 0 and "onnx" in r.stdout, r.stdout[-1500:] + r.stderr[-1500:]


@pytest.mark.slow
def test_finetune_with_layer_decay_and_drop_path_moves_the_backbone_and_resumes_bit_identical(tmp_path, tiny_data,
                                                                                             weights_files):
    common = (*family_args("layernorm", weights_files), "model.mode=finetune", "optim.name=adamw", "optim.lr=0.001",
              "optim.layer_decay=0.75", "model.drop_path_rate=0.2")  # (StepLR: the same curve whatever train.epochs)
    assert train_in_process(tmp_path / "straight", tiny_data, *common, "train.epochs=3") == 0
    assert train_in_process(tmp_path / "resumed", tiny_data, *common, "train.epochs=1") == 0
    assert train_in_process(tmp_path / "resumed", tiny_data, *common, "train.epochs=3") == 0
    a, b = load_file(str(tmp_path / "straight" / "last.safetensors")), load_file(str(tmp_path / "resumed" /
                                                                                     "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(weights_files["layernorm"])
    assert not torch.equal(a["stem.0.weight"], start["stem.0.weight"])


@pytest.mark.slow
def test_the_feature_cache_keeps_a_vits_features_bit_identical(tmp_path, tiny_data, weights_files):
    common = (*family_args("vit", weights_files), "model.mode=frozen", "data.augment=none", "train.epochs=3",
              "optim.lr=0.05", "data.batch_size=3")
    assert train_in_process(tmp_path / "on", tiny_data, *common) == 0
    assert train_in_process(tmp_path / "off", tiny_data, *common, "train.feature_cache=off") == 0
    a, b = (load_file(str(tmp_path / n / "last.safetensors")) for n in ("on", "off"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.multiproc
def test_two_processes_equal_one_for_a_timm_model(tmp_path, tiny_data, weights_files):
    args = ("--config", str(ROOT / "configs" / "demo.yaml"), *FAST, f"data.root={tiny_data}", "data.demo=false",
            *family_args("layernorm", weights_files), "model.mode=frozen", "train.epochs=2", "optim.lr=0.05")
    one = run_cli("-m", "tl_dist.train", *args, f"train.output_dir={tmp_path / 'one'}", "data.batch_size=6")
    assert one.returncode == 0, one.stderr[-3000:]
    two = accelerate_launch(2, *args, f"train.output_dir={tmp_path / 'two'}", "data.batch_size=3")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (load_file(str(tmp_path / n / "last.safetensors")) for n in ("one", "two"))
    assert not torch.equal(a["head.fc.weight"], load_file(weights_files["layernorm"])["head.fc.weight"][:2])
    torch.testing.assert_close(a["head.fc.weight"], b["head.fc.weight"], rtol=1e-5, atol=1e-6)
    ra, rb = ([json.loads(l) for l in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("one", "two"))
    assert [x["val_acc"] for x in ra] == [x["val_acc"] for x in rb]
