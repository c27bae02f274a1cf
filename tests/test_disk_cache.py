"""data.cache=disk: images decoded once into a memory-mapped file: the same pixels as decoding the
files (val exactly, train from the same draws), one writer among many processes, a killed writer
taken over, a full disk refused in one line, and runs sharing a data.cache_dir."""
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from tl_dist.config import DataConfig
from tl_dist.data import disk_cache, listing, loaders
from tl_dist.data.images import FILES
from tl_dist.errors import UserError

from .conftest import FAST, ROOT, accelerate_launch, run_cli, sigkill_once_resumable, train_in_process


def _cfg(root, **kw):
    return DataConfig(**{"root": str(root), "image_size": 32, "resize_size": 40, "interpolation": "bilinear",
                         "mean": [0.5] * 3, "std": [0.25] * 3, **kw})


def _datasets(cfg, folder):
    data = listing.list_data(cfg)
    names = [p for p, _ in data.train + data.val]
    disk = disk_cache.open_or_build(folder, names, {}, FILES.load, cfg.resize_size, cfg.interpolation,
                                    lambda line: None, 2)
    plain = (loaders.ImageDataset(data.train, cfg, True, 0), loaders.ImageDataset(data.val, cfg, False, 0))
    cached = (loaders.ImageDataset(data.train, cfg, True, 0), loaders.ImageDataset(data.val, cfg, False, 0))
    cached[0].disk, cached[1].disk, cached[1].disk_start = disk, disk, len(data.train)
    return data, plain, cached


def test_the_disk_cache_gives_the_pixels_decoding_gives(tiny_data, tmp_path):
    """val: identical. train: the same draws; where the stored image is the original's size (shorter
    side == resize_size) identical, elsewhere the same region re-sampled from the smaller copy."""
    cfg = _cfg(tiny_data)
    data, (tr, va), (tr2, va2) = _datasets(cfg, tmp_path / "c")
    for i in range(len(data.val)):
        assert torch.equal(va.transformed(i, 0), va2.transformed(i, 0))
    same_size = [i for i, (p, _) in enumerate(data.train) if min(Image.open(p).size) == cfg.resize_size]
    assert 0 < len(same_size) < len(data.train)
    for epoch in (0, 3):
        for i in range(len(data.train)):
            a, b = tr.transformed(i, epoch).float(), tr2.transformed(i, epoch).float()
            if i in same_size:
                assert torch.equal(a, b)
            else:
                assert (a - b).abs().mean() < 4  # of 255 (docs/data.md: the measured difference on photos)
    augmented = _cfg(tiny_data, augment="trivialaugment", random_erasing=0.5)  # the policies follow the same draws
    _, (tr, _), (tr2, _) = _datasets(augmented, tmp_path / "c")
    for i in same_size:
        assert torch.equal(tr.transformed(i, 1), tr2.transformed(i, 1))


def test_one_cache_per_content_reused_and_never_a_wrong_one(tiny_data, tmp_path):
    cfg = _cfg(tiny_data)
    _datasets(cfg, tmp_path / "c")
    first = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert len(first) == 2 and {Path(n).suffix for n in first} == {".u8", ".json"}  # no lock or temp file left
    _datasets(cfg, tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == first  # reused
    _datasets(_cfg(tiny_data, resize_size=44), tmp_path / "c")  # another size: another cache
    assert len(list((tmp_path / "c").glob("*.u8"))) == 2


def test_a_killed_writer_is_taken_over(tiny_data, tmp_path):
    cfg = _cfg(tiny_data)
    names = [p for p, _ in listing.list_data(cfg).train]
    key = disk_cache.key_of(names, 40, "bilinear")
    folder = tmp_path / "c"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket
    (folder / f"{key}.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    (folder / f"{key}.tmp").write_bytes(b"half written")
    said = []
    disk = disk_cache.open_or_build(folder, names, {}, FILES.load, 40, "bilinear", said.append, 2)
    assert len(disk) == len(names) and any("writer is gone" in s for s in said)
    assert sorted(p.suffix for p in folder.iterdir()) == [".json", ".u8"]


def test_two_processes_build_one_cache_and_both_read_it(tiny_data, tmp_path):
    code = ("import sys; from tl_dist.data import disk_cache, listing; from tl_dist.data.images import FILES; "
            "from tl_dist.config import DataConfig; "
            f"names = [p for p, _ in listing.list_data(DataConfig(root={str(tiny_data)!r})).train]; "
            f"d = disk_cache.open_or_build(__import__('pathlib').Path({str(tmp_path / 'c')!r}), names, {{}}, "
            "FILES.load, 40, 'bilinear', lambda s: print(s, flush=True), 1); print('rows', len(d))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs) and all("rows 22" in o for o in outs)
    assert sum("building the image cache" in o for o in outs) == 1  # one writer


def test_a_full_disk_is_refused_before_writing_and_a_failed_write_leaves_nothing(tiny_data, tmp_path, monkeypatch):
    cfg = _cfg(tiny_data)
    names = [p for p, _ in listing.list_data(cfg).train]
    real = disk_cache.shutil.disk_usage
    monkeypatch.setattr(disk_cache.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(UserError, match=r"the image cache needs about .* GiB free; free space, set data.cache_dir"):
        disk_cache.open_or_build(tmp_path / "c", names, {}, FILES.load, 40, "bilinear", print, 2)
    assert list((tmp_path / "c").iterdir()) == []
    monkeypatch.setattr(disk_cache.shutil, "disk_usage", real)

    def full(name):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(UserError, match="filled up while writing the image cache"):
        disk_cache.open_or_build(tmp_path / "c", names, {}, full, 40, "bilinear", print, 2)
    assert list((tmp_path / "c").iterdir()) == []


def test_runs_share_a_cache_dir_and_train_as_from_files(tiny_data, tmp_path, capsys):
    shared = tmp_path / "cache"
    over = ("train.epochs=2", "data.cache=disk", f"data.cache_dir={shared}", "data.num_workers=2")
    assert train_in_process(tmp_path / "a", tiny_data, *over) == 0
    assert "building the image cache" in capsys.readouterr().out
    assert train_in_process(tmp_path / "b", tiny_data, *over) == 0
    out = capsys.readouterr().out
    assert "building the image cache" not in out and "disk cache" in out
    assert not (tmp_path / "a" / "image_cache").exists()
    rows = [[json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in "ab"]
    assert [(r["train_loss"], r["val_loss"]) for r in rows[0]] == [(r["train_loss"], r["val_loss"]) for r in rows[1]]


@pytest.mark.slow
def test_sigkill_then_resume_with_the_disk_cache_is_bit_identical(tiny_data, tmp_path):
    from safetensors.torch import load_file

    args = ["-m", "tl_dist.train", "--config", str(ROOT / "configs" / "demo.yaml"), *FAST, f"data.root={tiny_data}",
            "data.demo=false", "data.image_size=64", "data.resize_size=72", "data.batch_size=4", "train.epochs=4",
            "data.cache=disk", "data.num_workers=2"]
    full = run_cli(*args, f"train.output_dir={tmp_path / 'full'}")
    assert full.returncode == 0, full.stderr[-2000:]
    out = tmp_path / "run"
    sigkill_once_resumable(*args, f"train.output_dir={out}", out=out)
    again = run_cli(*args, f"train.output_dir={out}")
    assert again.returncode == 0 and "resuming" in again.stdout, again.stderr[-2000:]
    a, b = load_file(str(out / "last.safetensors")), load_file(str(tmp_path / "full" / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.multiproc
def test_two_processes_with_the_disk_cache_equal_one_process(tiny_data, tmp_path):
    def args(out, batch):
        return ["--config", str(ROOT / "configs" / "demo.yaml"), *FAST, f"data.root={tiny_data}", "data.demo=false",
                f"train.output_dir={out}", "model.mode=frozen", "train.epochs=2", "optim.lr=0.05",
                "data.cache=disk", f"data.cache_dir={tmp_path / 'cache'}", f"data.batch_size={batch}"]
    one = run_cli("-m", "tl_dist.train", *args(tmp_path / "one", 6))
    assert one.returncode == 0, one.stderr[-3000:]
    two = accelerate_launch(2, *args(tmp_path / "two", 3))
    assert two.returncode == 0, two.stderr[-3000:]
    ra, rb = ([json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("one", "two"))
    for x, y in zip(ra, rb):
        assert x["val_acc"] == y["val_acc"] and x["val_samples"] == y["val_samples"] == 13
        assert abs(x["val_loss"] - y["val_loss"]) < 1e-5 and abs(x["train_loss"] - y["train_loss"]) < 1e-5
