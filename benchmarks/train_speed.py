"""Time tl_dist against the seed tutorial's code on the same data, in the same run.

    python benchmarks/train_speed.py DATA --seed-script PATH/seed_baseline.py [--epochs 3] [--modes finetune frozen]

DATA is an ImageFolder root (train/, val/). The seed script is the tutorial's training loop
(batch 4, 4 workers, SGD 0.001/0.9, StepLR 7) with a --mode and --weights switch; the project does
not ship it. Both run as separate processes with the same weights (none: offline-safe) and epochs;
the table shows seconds per epoch (train + val), whole-process wall time, the ratio and best val acc.
On a GPU machine tl_dist's figures include images/s; pass extra tl_dist overrides after --.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0, r.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data")
    p.add_argument("--seed-script", required=True, help="the seed's training code (e.g. shared/bench/seed_baseline.py)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--modes", nargs="+", default=["finetune", "frozen"])
    p.add_argument("--weights", default="none")
    p.add_argument("overrides", nargs="*", help="extra tl_dist config overrides (section.key=value)")
    a = p.parse_args()
    rows = []
    for mode in a.modes:
        wall_s, out = run([sys.executable, a.seed_script, a.data, "--mode", mode, "--epochs", str(a.epochs),
                           "--weights", a.weights])
        m = re.search(r"train_s=([\d.]+) best_val_acc=([\d.]+)", out)
        seed_epoch, seed_acc = float(m.group(1)) / a.epochs, float(m.group(2))
        with tempfile.TemporaryDirectory() as tmp:
            wall_t, _ = run([sys.executable, "-m", "tl_dist.train", "--config", f"configs/{mode}.yaml",
                             f"data.root={a.data}", f"model.weights={a.weights}", f"train.epochs={a.epochs}",
                             f"train.output_dir={tmp}", "train.plots=false", *a.overrides])
            hist = [json.loads(l) for l in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
            meta = json.loads((Path(tmp) / "best.json").read_text())
        t_epoch = sum(h["seconds"] for h in hist) / len(hist)
        imgs = (hist[0]["train_samples"] + hist[0]["val_samples"]) / t_epoch
        rows.append((mode, seed_epoch, t_epoch, seed_epoch / t_epoch, wall_s, wall_t, imgs, seed_acc,
                     max(h["val_acc"] for h in hist), meta["mixed_precision"]))
    print(f"| mode | seed s/epoch | tl_dist s/epoch | speed-up | seed wall s | tl_dist wall s | tl_dist images/s "
          f"| seed best acc | tl_dist best acc | precision |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f}x | {r[4]:.1f} | {r[5]:.1f} | {r[6]:.0f} | "
              f"{r[7]:.3f} | {r[8]:.3f} | {r[9]} |")


if __name__ == "__main__":
    main()
