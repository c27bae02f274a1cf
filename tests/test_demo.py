import hashlib

import pytest

from tl_dist.data import demo, listing
from tl_dist.errors import UserError

from .conftest import run_cli


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.jpg")):
        h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_demo_set_is_seed_shaped_and_deterministic(tmp_path):
    a = demo.generate(tmp_path / "a", n_train=20, n_val=11)
    b = demo.generate(tmp_path / "b", n_train=20, n_val=11)
    classes, train, val = listing.list_splits(str(a))
    assert classes == ["ants", "bees"] and len(train) == 20 and len(val) == 11
    assert _digest(a) == _digest(b)
    assert demo.generate(a) == a and _digest(a) == _digest(b)  # present: not generated again
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_demo_never_touches_a_folder_it_did_not_create(tmp_path):
    user = tmp_path / "my_dataset"
    (user / "train" / "cats").mkdir(parents=True)
    photo = user / "train" / "cats" / "tom.jpg"
    photo.write_bytes(b"precious")
    with pytest.raises(UserError, match="already holds files that are not tl_dist's demo set"):
        demo.generate(user, n_train=4, n_val=2)
    assert photo.read_bytes() == b"precious" and sorted(p.name for p in user.rglob("*")) == ["cats", "tom.jpg", "train"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing half-written left beside it
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(UserError, match="is not a folder"):
        demo.generate(a_file, n_train=4, n_val=2)
    assert a_file.read_text() == "mine"


def test_demo_fills_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    root = demo.generate(tmp_path / "empty", n_train=4, n_val=2)
    assert (root / demo.MARKER).exists() and len(list(root.rglob("*.jpg"))) == 6


def test_demo_config_pointed_at_a_real_data_set_refuses_and_keeps_it(tmp_path):
    user = tmp_path / "real"
    (user / "val" / "dogs").mkdir(parents=True)
    (user / "val" / "dogs" / "rex.jpg").write_bytes(b"precious")
    r = run_cli("-m", "tl_dist.train", "--config", "configs/demo.yaml", f"data.root={user}",
                f"train.output_dir={tmp_path / 'out'}")
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and str(user) in r.stderr and "data.demo=false" in r.stderr
    assert (user / "val" / "dogs" / "rex.jpg").read_bytes() == b"precious"
    assert [p.name for p in user.iterdir()] == ["val"]
    assert "generating" not in r.stdout and not (tmp_path / "out").exists()  # refused: nothing said, no run left
