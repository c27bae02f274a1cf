"""The tutorial's training settings against configs/recipe.yaml, side by side at equal epochs:
best val accuracy (mean and spread over seeds) and seconds per epoch. The table in docs/recipes.md.

    PYTHONPATH=. python benchmarks/recipes.py [--data digits,demo] [--seeds 0,1,2] [--epochs 12]
        [--work /tmp/tl_recipes] [--set KEY=VALUE ...]   (--set: extra overrides for the recipe arm)

Data, both offline and from scratch (model.weights: none; no pretrained weights offline):
- digits: scikit-learn's 1,797 8x8 handwritten digit scans, written as an ImageFolder of 32x32
  PNGs (a fixed stratified 80/20 split), 10 classes;
- demo: tl_dist's synthetic ants/bees set (244 train / 153 val).
The tutorial's arm is configs/finetune.yaml (SGD 0.001 momentum 0.9, StepLR 7 x 0.1, batch 4,
plain cross-entropy), the recipe's configs/recipe.yaml; both at the same image size and epochs.
Needs scikit-learn (pip install scikit-learn) for the digits.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"tutorial": "configs/finetune.yaml", "recipe": "configs/recipe.yaml"}
SIZES = {"digits": ["data.image_size=32", "data.resize_size=36"],
         "demo": ["data.image_size=64", "data.resize_size=72"]}


def write_digits(root: Path) -> Path:
    """scikit-learn's digits as root/{train,val}/<digit>/<i>.png, 32x32 RGB, 80/20 per class."""
    if (root / "val").is_dir():
        return root
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = random.Random(0)
    for digit in range(10):
        idx = [i for i, t in enumerate(d.target) if t == digit]
        rng.shuffle(idx)
        cut = len(idx) * 4 // 5
        for split, part in (("train", idx[:cut]), ("val", idx[cut:])):
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                pixels = (d.images[i] * (255 / 16)).round().astype("uint8")
                Image.fromarray(pixels).resize((32, 32), Image.BICUBIC).convert("RGB").save(folder / f"{i:04d}.png")
    return root


def write_demo(root: Path) -> Path:
    from tl_dist.data import demo

    if not (root / demo.MARKER).exists():
        demo.generate(str(root), seed=0)
    return root


def run(arm: str, data: Path, size: list[str], seed: int, epochs: int, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "tl_dist.train", str(ROOT / ARMS[arm]), f"data.root={data}", *size,
           "model.weights=none", f"train.epochs={epochs}", f"train.seed={seed}", f"train.output_dir={out}",
           "train.plots=false", "train.mixed_precision=no", "data.num_workers=0",
           *(extra if arm == "recipe" else [])]
    shutil.rmtree(out, ignore_errors=True)  # the benchmark's own scratch run: always a fresh one
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if r.returncode != 0:
        sys.exit(f"{arm} seed {seed} failed:\n{r.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    best = json.loads((out / "best.json").read_text())
    return {"best_val_acc": best["val_acc"], "last_val_acc": rows[-1]["val_acc"],
            "s_per_epoch": statistics.mean(r["seconds"] for r in rows), "wall": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="digits,demo")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--work", default="/tmp/tl_recipes")
    p.add_argument("--arms", default="tutorial,recipe")
    p.add_argument("--set", nargs="*", default=[], help="extra overrides for the recipe arm")
    args = p.parse_args()
    work = Path(args.work)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"# {platform.node()}: {os.cpu_count()} cores, {platform.processor() or platform.machine()}; "
          f"{args.epochs} epochs, seeds {seeds}, from scratch (weights none), fp32; recipe extra: {args.set}")
    print("| data | settings | best val acc (mean ± sd) | per seed | last-epoch val acc | s / epoch |")
    print("|---|---|---|---|---|---|")
    for name in args.data.split(","):
        data = write_digits(work / "digits") if name == "digits" else write_demo(work / "demo")
        for arm in args.arms.split(","):
            res = [run(arm, data, SIZES[name], s, args.epochs, work / "runs" / f"{name}-{arm}-{s}", args.set)
                   for s in seeds]
            best = [r["best_val_acc"] for r in res]
            sd = statistics.stdev(best) if len(best) > 1 else 0.0
            print(f"| {name} | {arm} ({ARMS[arm]}) | {statistics.mean(best):.4f} ± {sd:.4f} | "
                  f"{', '.join(f'{b:.4f}' for b in best)} | "
                  f"{statistics.mean(r['last_val_acc'] for r in res):.4f} | "
                  f"{statistics.mean(r['s_per_epoch'] for r in res):.1f} |", flush=True)


if __name__ == "__main__":
    main()
