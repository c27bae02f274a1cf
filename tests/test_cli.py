"""The tl-dist command: sub-commands, generated help, --print-config, flag-style overrides."""
import pytest
import yaml

from tl_dist import config
from tl_dist.models import backbones
from tl_dist.commands.train import flag_overrides

from .conftest import ROOT, run_cli


def test_tl_dist_lists_its_commands_and_refuses_unknown_ones():
    r = run_cli("-m", "tl_dist", "--help")
    assert r.returncode == 0 and "train" in r.stdout and "predict" in r.stdout
    r = run_cli("-m", "tl_dist", "trian")
    assert r.returncode == 2 and "unknown command 'trian'" in r.stderr and "did you mean 'train'" in r.stderr


def test_train_help_lists_every_config_key_with_its_default():
    r = run_cli("-m", "tl_dist", "train", "--help")
    assert r.returncode == 0, r.stderr
    for key in config._all_keys():
        section, name = key.split(".")
        default = getattr(getattr(config.Config(), section), name)
        line = next(l for l in r.stdout.splitlines() if l.strip().startswith(f"{key} = "))
        assert yaml.safe_load(line.split(" = ", 1)[1].split(" [")[0]) == default, key
    assert "data.cache = auto [auto|ram|device|disk|none]" in r.stdout


def test_the_docs_key_reference_is_the_generated_one():
    assert config.reference() in (ROOT / "docs" / "configuration.md").read_text()


def test_print_config_prints_the_resolved_yaml_and_trains_nothing(tmp_path):
    out = tmp_path / "never"
    r = run_cli("-m", "tl_dist", "train", "configs/frozen.yaml", "--train.epochs=2", "--data.batch_size", "8",
                f"train.output_dir={out}", "--print-config")
    assert r.returncode == 0, r.stderr
    expected = config.load(ROOT / "configs" / "frozen.yaml", ["train.epochs=2", "data.batch_size=8",
                                                               f"train.output_dir={out}"])
    (tmp_path / "printed.yaml").write_text(r.stdout)
    printed = config.load(tmp_path / "printed.yaml", [])
    assert printed == backbones.resolve(expected) and not out.exists()
    assert (printed.data.image_size, printed.data.resize_size, printed.data.interpolation) == (224, 256, "bilinear")


@pytest.mark.parametrize("argv, expected", [
    (["--train.epochs=2"], ["train.epochs=2"]),
    (["--train.epochs", "2", "c.yaml"], ["train.epochs=2", "c.yaml"]),
    (["--data.mean=[1, 2, 3]", "--config", "x"], ["data.mean=[1, 2, 3]", "--config", "x"]),
    (["--optim.lr", "-1"], ["optim.lr=-1"]),
])
def test_flag_style_overrides_are_overrides(argv, expected):
    assert flag_overrides(argv) == expected


def test_no_config_file_is_said_on_the_first_line(tmp_path):
    r = run_cli("-m", "tl_dist.train", f"data.root={tmp_path / 'missing'}", f"train.output_dir={tmp_path / 'o'}")
    assert r.returncode == 2
    first, *rest = r.stderr.splitlines()
    assert first.startswith("note: no config file given: the built-in defaults and the overrides")
    assert rest[-1].startswith("error: data: data.root not found")


def test_every_test_the_fault_table_names_exists():
    import re
    named = set(re.findall(r"`(test_\w+\.py)::(test_\w+)`", (ROOT / "docs" / "faults.md").read_text()))
    assert len(named) > 40
    for file, test in named:
        assert re.search(rf"^def {test}\(", (ROOT / "tests" / file).read_text(), re.M), f"{file}::{test}"
