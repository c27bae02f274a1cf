import pytest

from tl_dist import config
from tl_dist.models import backbones
from tl_dist.errors import UserError

from .conftest import ROOT, run_cli


def test_defaults_are_the_seeds_values():
    c = backbones.resolve(config.load())  # sizes, interpolation, mean and std: resnet18's ImageNet weights'
    assert (c.data.image_size, c.data.resize_size, c.data.batch_size, c.data.num_workers) == (224, 256, 4, 4)
    assert (c.data.interpolation, c.data.mean, c.data.std) == ("bilinear", config.IMAGENET_MEAN, config.IMAGENET_STD)
    assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay) == (0.001, 0.9, 0.0)
    assert (c.scheduler.step_size, c.scheduler.gamma, c.train.epochs) == (7, 0.1, 25)
    assert c.model.arch == "resnet18" and c.model.weights == "imagenet"


def test_shipped_configs_load():
    names = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    assert {"finetune", "frozen", "frozen_then_finetune", "linear_probe", "recipe", "demo"} <= set(names)
    for name in names:
        config.load(ROOT / "configs" / f"{name}.yaml")
    assert config.load(ROOT / "configs" / "frozen.yaml").model.mode == "frozen"
    assert config.load(ROOT / "configs" / "finetune.yaml").model.mode == "finetune"
    probe = config.load(ROOT / "configs" / "linear_probe.yaml")
    assert (probe.model.mode, probe.data.augment, probe.train.feature_cache) == ("frozen", "none", "auto")


def test_overrides_typed_and_last_wins(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  epochs: 5\n")
    c = config.load(f, ["train.epochs=2", "data.mean=[0.5, 0.5, 0.5]", "train.epochs=3", "optim.lr=1e-2"])
    assert c.train.epochs == 3 and c.data.mean == [0.5, 0.5, 0.5] and c.optim.lr == 0.01


def test_yaml_bare_no_means_no(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  mixed_precision: no\n")
    assert config.load(f).train.mixed_precision == "no"


@pytest.mark.parametrize("text, needle", [
    ("train:\n  epoch: 3\n", "'train.epoch' (in {f}) (did you mean 'train.epochs'?)"),
    ("trian:\n  epochs: 3\n", "unknown section 'trian' (in {f}) (did you mean 'train'?)"),
    ("train:\n  epochs: three\n", "train.epochs (in {f}) must be an integer"),
    ("model:\n  mode: frozn\n", "model.mode (in {f}) must be one of finetune|frozen"),
    ("model:\n  mode: frozen_then_finetune\n", "needs model.unfreeze_epoch"),
    ("model:\n  unfreeze_epoch: 2\n", "model.unfreeze_epoch applies only to model.mode=frozen_then_finetune"),
    ("model:\n  mode: frozen_then_finetune\n  unfreeze_epoch: 0\n", "model.unfreeze_epoch (in {f}) must be a positive"),
    ("optim:\n  backbone_lr: -1\n", "optim.backbone_lr (in {f}) must be a positive number"),
    ("data:\n  batch_size: 0\n", "data.batch_size (in {f}) must be a positive integer"),
    ("train:\n  plots: maybe\n", "train.plots (in {f}) must be true or false"),
    ("data:\n  image_size: 100000\n", "data.image_size (in {f}) must be an integer from 1 to 4096"),
    ("data:\n  image_size: 300\n  resize_size: 256\n", "data.resize_size (256) must be at least data.image_size (300)"),
    ("- a\n- b\n", "must hold a mapping"),
    ("train: [\n", "is not valid YAML"),
])
def test_bad_file_names_key_and_file(tmp_path, text, needle):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(UserError) as e:
        config.load(f)
    assert needle.format(f=f) in str(e.value)


def test_bad_override_names_command_line():
    with pytest.raises(UserError, match=r"'optim.lrr' \(in command line\) \(did you mean 'optim.lr'\?\)"):
        config.load(None, ["optim.lrr=0.1"])
    with pytest.raises(UserError, match="section.key=value"):
        config.load(None, ["epochs"])


def test_python_tags_refused(tmp_path):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.yaml"
    f.write_text(f"train: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        config.load(f)
    assert not marker.exists()


def test_cli_error_is_one_line_exit_2(tmp_path):
    r = run_cli("-m", "tl_dist.train", "--config", "configs/demo.yaml", "train.epohcs=1")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "train.epohcs" in r.stderr and "train.epochs" in r.stderr
    r = run_cli("-m", "tl_dist.train", "--config", str(tmp_path / "nope.yaml"))
    assert r.returncode == 2 and "file not found" in r.stderr


def test_dump_round_trips(tmp_path):
    c = config.load(None, ["train.epochs=2", "model.mode=frozen"])
    (tmp_path / "c.yaml").write_text(config.dump(c))
    assert config.load(tmp_path / "c.yaml", []) == c


def test_backbone_lr_null_means_lr():
    c = config.load(None, ["optim.lr=0.01", "model.mode=frozen_then_finetune", "model.unfreeze_epoch=3"])
    assert c.optim.backbone_lr is None and c.model.unfreeze_epoch == 3
    from tl_dist.training.optim import lrs_at
    assert lrs_at(c, 0) == [0.01, 0.01]
    c = config.load(None, ["optim.lr=0.01", "optim.backbone_lr=1e-4", "scheduler.step_size=2"])
    assert lrs_at(c, 2) == pytest.approx([0.001, 1e-5])
    assert lrs_at(config.load(None, ["model.mode=frozen"]), 0) == [0.001]  # fc only


# "Billion laughs": nine levels of nine aliases each, about 10^9 items if anything expanded it.
BOMB = "[&a [x, x, x, x, x, x, x, x, x], " + ", ".join(
    f"&{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")) + "]"


@pytest.mark.parametrize("content, needle", [
    ("data:\n  mean: " + BOMB + "\n", "data.mean[0] (in {f}) must be a number, got ["),
    ("train:\n  output_dir: " + BOMB + "\n", "train.output_dir (in {f}) must be a string, got ["),
    ("train:\n  epochs: 2\n  epochs: 3\n", "key 'epochs' given twice"),
    (b"train:\n  output_dir: \xff\xfe\n", "cannot read"),
    (bytes(range(256)) * 8, "cannot read"),
    ("# " + "x" * (2 << 20) + "\n", "is 2.0 MiB, not a config file"),
    ("scheduler:\n  gamma: 1e308\n", "scheduler.gamma (in {f}) must be a number in (0, 1]"),
    ("train:\n  seed: -1\n", "train.seed (in {f}) must be an integer from 0"),
    ("optim:\n  lr: .inf\n", "optim.lr (in {f}) must be a finite number"),
    ("data:\n  mean: [.nan, 0, 0]\n", "data.mean[0] (in {f}) must be a finite number"),
    ("train:\n  output_dir: ''\n", "train.output_dir (in {f}) must be a folder path (not empty)"),
    ("data:\n  num_workers: 100000\n", "data.num_workers (in {f}) must be from 0 to 256"),
    ("optim:\n  lr: 1e400\n", "optim.lr (in {f}) must be a finite number"),
])
def test_abusive_config_files_get_one_short_line(tmp_path, content, needle):
    f = tmp_path / "c.yaml"
    f.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(UserError) as e:
        config.load(f)
    msg = str(e.value)
    assert needle.format(f=f) in msg and len(msg) < 600


def test_abusive_override_on_the_command_line_is_one_line():
    r = run_cli("-m", "tl_dist.train", "configs/demo.yaml", "train.seed=-1")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "train.seed" in r.stderr
