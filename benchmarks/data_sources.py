"""Every data source at scale: image folders, a labels file, WebDataset shards, a Hugging Face
dataset, and the disk cache, on the same synthetic images.

    PYTHONPATH=. python benchmarks/data_sources.py --samples 10000 --size 500x375 --work /tmp/ds10k
    PYTHONPATH=. python benchmarks/data_sources.py --samples 1000000 --size 32x32 --work /tmp/ds1m

Writes ``--samples`` JPEGs (90% train, 10% val; ``--classes`` classes) as class folders, a labels
file over the same files, shards (``tl-dist data shard``) and a ``save_to_disk`` dataset, keeping
them in ``--work`` for the next run. The images are ``--distinct`` different pictures (noise and a
class-coloured blob) written under every name: what a loader pays per image (open, read, decode)
does not depend on the picture. Then, each in a fresh process:

- listing: ``listing.list_data`` (finding the files / reading the labels file / indexing the shards
  / opening the dataset), seconds and the process's peak memory;
- first step: a whole ``tl-dist train`` run of one train step and one val batch (ResNet18,
  ``weights: none``, ``data.image_size 32``, ``data.cache none`` except the disk row), from process
  start to its end: the time a user waits for training to start, and its peak host memory;
- loader: images/s of the train loader alone (no model), 0 and 2 workers, over ``--batches``
  batches of 64 at ``data.image_size`` 224 (``--loader-size``), read once untimed first (the
  bytes in the page cache: what the loader itself costs, not the disk).

The disk cache row reads the folders through ``data.cache=disk``; its cache is built by the first
run and reused by the others (its build time is reported on its own line).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COLOURS = [(220, 180, 30), (40, 30, 20), (60, 120, 200), (200, 40, 60), (30, 200, 90)]


def pictures(n: int, size: tuple[int, int], classes: int, seed: int = 0) -> list[list[bytes]]:
    """``n`` distinct JPEGs per class."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out = []
    for c in range(classes):
        mine = []
        for _ in range(max(1, n // classes)):
            noise = np.random.default_rng(rng.randrange(1 << 30)).integers(60, 200, (size[1], size[0], 3), np.uint8)
            img = Image.fromarray(noise)
            w, h = size
            x, y = rng.randrange(w // 2), rng.randrange(h // 2)
            ImageDraw.Draw(img).ellipse([x, y, x + w // 2, y + h // 2], fill=COLOURS[c % len(COLOURS)])
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=85)
            mine.append(buf.getvalue())
        out.append(mine)
    return out


def make(work: Path, samples: int, size: tuple[int, int], classes: int, distinct: int) -> dict[str, Path]:
    """The same images as folders, a labels file, shards and a dataset (each made once)."""
    folders, shards, hf = work / "folders", work / "shards", work / "hf"
    done = work / "made.json"
    if done.is_file() and json.loads(done.read_text()) == [samples, list(size), classes, distinct]:
        return {"folders": folders, "labels": folders, "shards": shards, "hf": hf}
    import shutil
    for p in (folders, shards, hf):
        shutil.rmtree(p, ignore_errors=True)
    t0 = time.perf_counter()
    pics = pictures(distinct, size, classes)
    rows = ["path,label,split"]
    names = [f"class_{c:03d}" for c in range(classes)]
    for part in ("train", "val"):
        for name in names:
            (folders / part / name).mkdir(parents=True, exist_ok=True)
    for i in range(samples):
        c, part = i % classes, "val" if (i // classes) % 10 == 0 else "train"
        rel = f"{part}/{names[c]}/{i // 1000:04d}_{i:08d}.jpg"
        p = folders / rel
        p.write_bytes(pics[c][i % len(pics[c])])
        rows.append(f"{rel},{names[c]},{part}")
    (folders / "labels.csv").write_text("\n".join(rows) + "\n")
    print(f"wrote {samples:,} JPEGs ({size[0]}x{size[1]}) in {time.perf_counter() - t0:.0f}s", flush=True)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "tl_dist", "data", "shard", str(folders), str(shards)], cwd=ROOT,
                       capture_output=True, text=True, env=_env())
    if r.returncode:
        sys.exit(r.stderr)
    print(f"tl-dist data shard: {time.perf_counter() - t0:.0f}s", flush=True)
    t0 = time.perf_counter()
    _save_hf(folders, hf, names)
    print(f"save_to_disk dataset: {time.perf_counter() - t0:.0f}s", flush=True)
    done.write_text(json.dumps([samples, list(size), classes, distinct]))
    return {"folders": folders, "labels": folders, "shards": shards, "hf": hf}


def _save_hf(folders: Path, dest: Path, names: list[str]) -> None:
    import datasets

    datasets.disable_progress_bars()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})

    def rows(part):
        for c, name in enumerate(names):
            for p in sorted((folders / part / name).iterdir()):
                yield {"image": {"bytes": p.read_bytes(), "path": None}, "label": c}

    parts = {name: datasets.Dataset.from_generator(rows, gen_kwargs={"part": part}, features=features,
                                                   cache_dir=str(dest.parent / "hf_build"))
             for part, name in (("train", "train"), ("val", "validation"))}
    datasets.DatasetDict(parts).save_to_disk(str(dest))


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}


SOURCES = {  # name -> the data.* settings that read it
    "folders": ["data.format=files"],
    "labels": ["data.format=files", "data.labels=labels.csv"],
    "shards": ["data.format=wds"],
    "hf": ["data.format=hf"],
    "disk": ["data.format=files"],
}

LISTING = r"""
import json, resource, sys, time
from tl_dist import config
from tl_dist.data import listing
cfg = config.load(None, sys.argv[1:])
t0 = time.perf_counter()
d = listing.list_data(cfg.data)
print(json.dumps({"s": time.perf_counter() - t0, "n": len(d.train) + len(d.val),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

LOADER = r"""
import json, sys, time
from pathlib import Path
import torch
from tl_dist import config
from tl_dist.data import listing, loaders
from tl_dist.data.images import screen_files
from tl_dist.models.backbones import resolve
cfg = resolve(config.load(None, sys.argv[2:]))  # (the sizes and interpolation the model's weights give)
batches = int(sys.argv[1])
d = listing.list_data(cfg.data)
report = screen_files([p for p, _ in d.train[:2000]], "", True, "", lambda s: None, reader=d.reader)
data = loaders.build(cfg.data, d.classes, d.train, d.val, seed=0, reader=d.reader, sizes=report.sizes,
                     disk_folder=Path(cfg.data.cache_dir) if cfg.data.cache_dir else None, log=lambda s: None)
it = iter(data.train_loader)
for _ in range(batches + 1):  # the same batches once untimed: their bytes in the page cache, the workers up
    next(it)
it = iter(data.train_loader)
next(it)
t0, n = time.perf_counter(), 0
for _ in range(batches):
    x = next(it)[0]
    n += x.shape[0]
print(json.dumps({"img_s": n / (time.perf_counter() - t0)}))
"""


def child(code: str, args: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, env=_env())
    if r.returncode:
        sys.exit(f"failed: {args}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def first_step(root: Path, settings: list[str], out: Path) -> tuple[float, float, str]:
    """A whole 1-step training run: (wall seconds, peak MB of the process, its data line)."""
    import shutil
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "tl_dist.train", "--config", str(ROOT / "configs" / "demo.yaml"),
           f"data.root={root}", "data.demo=false", "model.weights=none", "data.image_size=32",
           "data.resize_size=36", "train.epochs=1", "train.limit_train_batches=1", "train.limit_val_batches=1",
           "train.plots=false", "data.batch_size=64", "data.num_workers=0", "train.mixed_precision=no",
           f"train.output_dir={out}", *settings]
    # (the run's own peak memory, printed by the process as it ends)
    wrap = ("import resource, runpy, sys; sys.argv = sys.argv[1:]\ntry:\n    runpy.run_module('tl_dist.train', "
            "run_name='__main__')\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
            "print('peak_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True); sys.exit(code)")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", wrap, *cmd[2:]], capture_output=True, text=True, cwd=ROOT, env=_env())
    wall = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    peak = int(next(x for x in r.stdout.splitlines() if x.startswith("peak_kb")).split()[1])
    line = next((x for x in r.stdout.splitlines() if x.startswith("checked")), "")
    return wall, peak / 1024, line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=10_000)
    p.add_argument("--size", default="500x375", help="the JPEGs' width x height")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--distinct", type=int, default=1000, help="different pictures in all")
    p.add_argument("--work", required=True, help="a folder for the data (kept for the next run)")
    p.add_argument("--batches", type=int, default=20, help="loader batches (of 64) timed")
    p.add_argument("--loader-size", type=int, default=224)
    p.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    p.add_argument("--skip-loader", action="store_true")
    args = p.parse_args()
    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    size = tuple(int(x) for x in args.size.split("x"))
    roots = make(work, args.samples, size, args.classes, args.distinct)
    cache = work / "image_cache"
    extra = {"disk": ["data.cache=disk", f"data.cache_dir={cache}"]}
    if "disk" in args.sources and not any(cache.glob("*.json")):
        t0 = time.perf_counter()
        first_step(roots["folders"], SOURCES["disk"] + extra["disk"], work / "run")
        print(f"disk cache built (with a 1-step run) in {time.perf_counter() - t0:.0f}s: "
              f"{sum(f.stat().st_size for f in cache.glob('*.u8')) / 2**30:.2f} GiB", flush=True)
    print(f"\n{args.samples:,} samples, {size[0]}x{size[1]} JPEGs, {args.classes} classes; {os.cpu_count()} cores")
    print("| source | listing s | listing peak MB | first step s | first step peak MB | loader img/s, 0 workers "
          "| 2 workers |")
    print("|---|---|---|---|---|---|---|")
    for name in args.sources:
        settings = SOURCES[name] + extra.get(name, ["data.cache=none"])
        root = roots["folders" if name == "disk" else name]
        common = [f"data.root={root}", "data.demo=false", *settings]
        lst = child(LISTING, common)
        wall, peak, line = first_step(root, settings, work / "run")
        rates = ["-", "-"]
        if not args.skip_loader:
            rates = [f"{child(LOADER, [str(args.batches), *common, f'data.image_size={args.loader_size}', 'data.batch_size=64', f'data.num_workers={w}', f'data.cache_dir={cache}'])['img_s']:.0f}"
                     for w in (0, 2)]
        print(f"| {name} | {lst['s']:.1f} | {lst['peak_mb']:.0f} | {wall:.1f} | {peak:.0f} | {rates[0]} | {rates[1]} |",
              flush=True)
        print(f"|   ({line}) | | | | | | |", flush=True)


if __name__ == "__main__":
    main()
