"""Time tl_dist against the PyTorch tutorial's code on the same data, in the same run.

    python benchmarks/train_speed.py DATA --tutorial-script PATH/seed_baseline.py [--epochs 3] [--modes finetune frozen]

DATA is an ImageFolder root (train/, val/). The tutorial script is the tutorial's training loop
(batch 4, 4 workers, SGD 0.001/0.9, StepLR 7) with a --mode and --weights switch; the project does
not ship it. Both run as separate processes with the same weights (none: offline-safe) and epochs;
the table shows, per mode: tl_dist's data path and precision, its train and val images/s, seconds
per epoch (train + val, averaged over all epochs, as the tutorial's own timer counts them) next to the
tutorial's and their ratio, whole-process wall times, peak host (and GPU) memory of tl_dist's process,
and best val accuracy of both. Extra tl_dist overrides go last (e.g. data.batch_size=32).
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
    p.add_argument("--tutorial-script", required=True, help="the tutorial's training code (e.g. shared/bench/seed_baseline.py)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--modes", nargs="+", default=["finetune", "frozen"])
    p.add_argument("--weights", default="none")
    p.add_argument("overrides", nargs="*", help="extra tl_dist config overrides (section.key=value)")
    a = p.parse_args()
    rows = []
    for mode in a.modes:
        wall_s, out = run([sys.executable, a.tutorial_script, a.data, "--mode", mode, "--epochs", str(a.epochs),
                           "--weights", a.weights])
        m = re.search(r"train_s=([\d.]+) best_val_acc=([\d.]+)", out)
        seed_epoch, seed_acc = float(m.group(1)) / a.epochs, float(m.group(2))
        with tempfile.TemporaryDirectory() as tmp:
            wall_t, _ = run([sys.executable, "-m", "tl_dist.train", "--config", f"configs/{mode}.yaml",
                             f"data.root={a.data}", f"model.weights={a.weights}", f"train.epochs={a.epochs}",
                             f"train.output_dir={tmp}", "train.plots=false", *a.overrides])
            hist = [json.loads(l) for l in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
            meta = json.loads((Path(tmp) / "best.json").read_text())
        n = len(hist)
        t_epoch = sum(h["seconds"] for h in hist) / n  # train + val, as the tutorial's train_s counts them
        rows.append({
            "mode": mode, "device": "cuda" if "peak_gpu_mb" in hist[0] else "cpu",
            "data path": meta["data_path"], "precision": meta["mixed_precision"],
            "train img/s": sum(h["train_samples"] for h in hist) / sum(h["train_seconds"] for h in hist),
            "val img/s": sum(h["val_samples"] for h in hist) / sum(h["val_seconds"] for h in hist),
            "s/epoch": t_epoch, "tutorial s/epoch": seed_epoch, "speed-up": f"{seed_epoch / t_epoch:.2f}x",
            "wall s": wall_t, "tutorial wall s": wall_s,
            "peak host MB": max(h["peak_host_mb"] for h in hist),
            "peak GPU MB": max((h.get("peak_gpu_mb", 0) for h in hist), default=0) or "-",
            "val acc": max(h["val_acc"] for h in hist), "tutorial val acc": seed_acc,
        })
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{v:.3f}" if k.endswith("acc") else f"{v:.1f}" if isinstance(v, float) else str(v)
                 for k, v in r.items()]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
