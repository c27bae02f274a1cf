import hashlib

from tl_dist import data, demo


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.jpg")):
        h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_demo_set_is_seed_shaped_and_deterministic(tmp_path):
    a = demo.generate(tmp_path / "a", n_train=20, n_val=11)
    b = demo.generate(tmp_path / "b", n_train=20, n_val=11)
    classes, train, val = data.list_splits(str(a))
    assert classes == ["ants", "bees"] and len(train) == 20 and len(val) == 11
    assert _digest(a) == _digest(b)
    assert demo.generate(a) == a and _digest(a) == _digest(b)  # present: not generated again
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left
