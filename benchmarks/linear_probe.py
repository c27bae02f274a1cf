"""The tutorial's frozen workload: its code against tl_dist frozen, with and without the feature cache.

    python benchmarks/linear_probe.py DATA --tutorial-script PATH/seed_baseline.py [--epochs 25] [--weights none]

DATA is the tutorial-shaped set (the bench tools' make_data.py: 2 classes, 244 train / 153 val
photo-sized JPEGs). Rows, each a separate process on the same data and weights:
- the tutorial's code, --mode frozen (batch 4, 4 workers, its crops and flips, BatchNorm statistics moving);
- tl_dist configs/frozen.yaml as it is (the tutorial's crops and flips: the backbone runs every epoch);
- tl_dist configs/frozen.yaml with data.augment=none and train.feature_cache=off (a linear probe, the
  backbone every epoch);
- the same with the feature cache (auto): the backbone in the first epoch only.
Columns: the whole training (the sum of the epochs, train + val, as the tutorial's own timer counts
them), its ratio to the tutorial's, the same with tl_dist's checkpoint files written after every
epoch (its "total" line; the tutorial keeps its best weights in memory and writes nothing), the
first epoch and the mean of the later ones, the process's
wall time (start-up, data scan, checkpoint writing included) and the best val accuracy. Extra
tl_dist overrides go last.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

from train_speed import run  # (the same runner: a command's wall time and output, or the exit)


def tl_dist_row(name: str, a: argparse.Namespace, *overrides: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        wall, out = run([sys.executable, "-m", "tl_dist.train", "--config", "configs/frozen.yaml",
                         f"data.root={a.data}", f"model.weights={a.weights}", f"train.epochs={a.epochs}",
                         f"train.output_dir={tmp}", "train.plots=false", *overrides, *a.overrides])
        hist = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    seconds = [h["seconds"] for h in hist]
    cache = "on" if "feature cache on" in out else "off"
    loop = float(re.search(r"^total ([\d.]+)s", out, re.M).group(1))
    return {"run": name, "feature cache": cache, "train s": sum(seconds), "with checkpoints s": loop,
            "first epoch s": seconds[0],
            "later epochs s": sum(seconds[1:]) / max(1, len(seconds) - 1), "wall s": wall,
            "best val acc": max(h["val_acc"] for h in hist)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data")
    p.add_argument("--tutorial-script", required=True, help="the tutorial's training code (shared/bench/seed_baseline.py)")
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--weights", default="none", help="none (offline), imagenet, or a weights file: the same for all")
    p.add_argument("overrides", nargs="*", help="extra tl_dist config overrides (section.key=value)")
    a = p.parse_args()
    wall, out = run([sys.executable, a.tutorial_script, a.data, "--mode", "frozen", "--epochs", str(a.epochs),
                     "--weights", a.weights])
    m = re.search(r"train_s=([\d.]+) best_val_acc=([\d.]+)", out)
    tutorial = float(m.group(1))
    rows = [{"run": "the tutorial's code, frozen", "feature cache": "-", "train s": tutorial,
             "with checkpoints s": None, "first epoch s": None,
             "later epochs s": tutorial / a.epochs, "wall s": wall, "best val acc": float(m.group(2))}]
    rows.append(tl_dist_row("tl_dist frozen (the tutorial's crops and flips)", a))
    rows.append(tl_dist_row("tl_dist frozen, data.augment=none", a, "data.augment=none", "train.feature_cache=off"))
    rows.append(tl_dist_row("tl_dist frozen, data.augment=none", a, "data.augment=none"))
    cols = ["run", "feature cache", "train s", "x faster", "with checkpoints s", "first epoch s", "later epochs s", "wall s",
            "x faster (wall)", "best val acc"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        r["x faster"] = f"{tutorial / r['train s']:.1f}x"
        r["x faster (wall)"] = f"{wall / r['wall s']:.1f}x"
        cells = ["-" if r[c] is None else f"{r[c]:.3f}" if c == "best val acc" else
                 f"{r[c]:.2f}" if isinstance(r[c], float) else str(r[c]) for c in cols]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
