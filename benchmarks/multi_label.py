"""A multi-label set from real images, offline: mosaics of scikit-learn's handwritten digit scans,
trained with tl_dist and measured against predicting each label's train frequency.

    PYTHONPATH=. python benchmarks/multi_label.py [--images 1500] [--epochs 12] [--work /tmp/tl_multi_label]

Each 64x64 image is a 2x2 grid whose cells hold one to three distinct digits (8x8 scans scaled to
32x32) or stay blank; its labels are the digits it shows (10 classes, several per image). Train
mosaics use the first 80% of the 1,797 scans and val mosaics the rest, so no scan is in both; the
split is the labels file's split column. The model is ResNet18 from scratch (no pretrained weights
offline) with configs/recipe.yaml's settings. The baseline scores every image with each label's
frequency in the train split: its AP per class is the class's prevalence, and it predicts no label
at the 0.5 threshold unless a label is on more than half the images. Needs scikit-learn.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def write_mosaics(root: Path, n: int, seed: int = 0) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    cut = int(len(d.images) * 0.8)
    pools = {"train": range(cut), "val": range(cut, len(d.images))}
    rng = random.Random(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = ["path,labels,split"]
    for i in range(n):
        split = "val" if i % 5 == 0 else "train"
        digits = rng.sample(range(10), rng.randint(1, 3))
        cells = rng.sample(range(4), len(digits))
        canvas = Image.new("L", (64, 64), 0)
        for digit, cell in zip(digits, cells):
            scan = rng.choice([j for j in pools[split] if d.target[j] == digit])
            tile = Image.fromarray((d.images[scan] * 16).clip(0, 255).astype("uint8")).resize((32, 32), Image.BILINEAR)
            canvas.paste(tile, ((cell % 2) * 32, (cell // 2) * 32))
        canvas.convert("RGB").save(root / "img" / f"{i:05d}.png")
        rows.append(f"img/{i:05d}.png,{';'.join(str(x) for x in sorted(digits))},{split}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def baseline(root: Path) -> dict:
    """Every val image scored with each label's train frequency."""
    sys.path.insert(0, str(ROOT))
    from tl_dist.metrics import multi_label_metrics

    rows = [line.split(",") for line in (root / "labels.csv").read_text().splitlines()[1:]]
    def hot(labels: str) -> list[float]:
        return [1.0 if str(c) in labels.split(";") else 0.0 for c in range(10)]
    train = torch.tensor([hot(r[1]) for r in rows if r[2] == "train"])
    val = torch.tensor([hot(r[1]) for r in rows if r[2] == "val"])
    scores = train.mean(0).expand(len(val), 10)
    return multi_label_metrics(scores, val, [str(c) for c in range(10)], 0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1500)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--work", default="/tmp/tl_multi_label")
    args = p.parse_args()
    work = Path(args.work)
    data = write_mosaics(work / "data", args.images)
    out = work / "run"
    cmd = [sys.executable, "-m", "tl_dist", "train", "configs/recipe.yaml", f"data.root={data}",
           "data.labels=labels.csv", "data.label_column=labels", "data.label_delimiter=;", "model.weights=none",
           "data.image_size=64", "data.resize_size=64", "data.batch_size=32", "data.num_workers=0", "data.hflip=false",
           "data.scale=[0.5,1.0]", "train.mixed_precision=no", f"train.epochs={args.epochs}", f"train.output_dir={out}",
           "train.resume=none", "train.ema_decay=0", "optim.lr=0.002"]
    if out.exists():
        import shutil
        shutil.rmtree(out)
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={"PYTHONPATH": str(ROOT),
                                                                            **__import__("os").environ})
    if r.returncode:
        sys.exit(r.stderr[-3000:])
    ev = subprocess.run([sys.executable, "-m", "tl_dist", "evaluate", str(data), "--checkpoint", str(out), "--split",
                         "val", "--json", "--out", str(work / "eval")], cwd=ROOT, capture_output=True, text=True)
    if ev.returncode:
        sys.exit(ev.stderr[-3000:])
    model = json.loads(ev.stdout.splitlines()[-1])
    base = baseline(data)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    print(f"{args.images} mosaics ({sum(1 for _ in (data / 'img').iterdir())} images, {model['n']} val), "
          f"{args.epochs} epochs, {sum(r['seconds'] for r in rows) / len(rows):.1f} s/epoch; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")
    print("| scores | mAP | micro F1 | macro F1 | exact match |")
    print("|---|---|---|---|---|")
    for name, m in (("tl_dist (ResNet18 from scratch, best epoch by mAP)", model),
                    ("each label's train frequency", base)):
        print(f"| {name} | {m['map']:.4f} | {m['micro_f1']:.4f} | {m['macro_f1']:.4f} | {m['exact_match']:.4f} |")


if __name__ == "__main__":
    main()
