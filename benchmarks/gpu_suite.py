"""The GPU measurements in one go, for a machine with one CUDA GPU (device time is scarce).

    PYTHONPATH=. python benchmarks/gpu_suite.py --bench PATH/TO/shared/bench [--work /tmp/tl_gpu]
    PYTHONPATH=. python benchmarks/gpu_suite.py --bench ... --smoke   # tiny sizes, any machine: checks the script
    --part tutorial | scale runs one half (each fits one 10-minute device call); --no-compile drops the compile rows

1. the tutorial's workload (hymenoptera-shaped, 25 epochs, both modes): the tutorial's code against tl_dist
   with the tutorial's hyperparameters (batch 4, lr 0.001: eager, the whole step as one CUDA graph,
   compiled with CUDA graphs) and with batch 32 / lr 0.008 (linear scaling);
2. scale: finetune, batch 256, bf16, from photo-sized JPEG files, 8,000 train images: images/s;
3. cost as work grows: 1k, 8k and 64k train images (64k = the 8k files linked eight times), images/s
   and peak host and GPU memory, with the automatic data path (the GPU cache while the decoded set
   fits half the GPU's memory) and, at 64k, without the GPU cache: what a set too large for it gets.
Prints markdown tables; every run's own output is kept under --work.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class RunFailed(Exception):
    """One run of the suite failed; its row says so and the suite goes on (GPU minutes are scarce)."""


def sh(cmd: list[str], log: Path) -> tuple[str, float]:
    """(stdout, wall seconds) of ``cmd``; raises RunFailed (its error output kept in ``log``) if it fails."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    log.write_text(f"$ {' '.join(cmd)}\n{r.stdout}\n{r.stderr}\nrc={r.returncode} {wall:.1f}s\n")
    if r.returncode != 0:
        print(f"failed: {' '.join(cmd)} (see {log})\n{r.stderr[-1500:]}", file=sys.stderr, flush=True)
        raise RunFailed(f"failed, rc {r.returncode}: see {log.name}")
    return r.stdout, wall


def link_all(pairs, out: Path) -> Path:
    """Hard-link each (source, destination) pair, then mark ``out`` complete."""
    for src, dst in pairs:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, dst)
    (out / ".done").touch()
    return out


def make_set(bench: Path, out: Path, train: int, val: int, parts: int) -> Path:
    """make_data.py in ``parts`` parallel processes (different seeds), merged by hard links."""
    if (out / ".done").exists():
        return out
    per = max(1, train // parts)
    with ThreadPoolExecutor(parts) as ex:
        list(ex.map(lambda i: subprocess.run(
            [sys.executable, str(bench / "make_data.py"), str(out / f"part{i}"), "--train", str(per),
             "--val", str(val if i == 0 else 0), "--seed", str(i)], check=True), range(parts)))
    return link_all(((f, out / f.relative_to(out / f"part{i}").parent / f"p{i}_{f.name}")
                     for i in range(parts) for f in (out / f"part{i}").rglob("*.jpg")), out)


def linked_copies(src: Path, out: Path, times: int) -> Path:
    """``times`` x the train files of ``src`` (hard links, new names), and its val set."""
    if (out / ".done").exists():
        return out
    train = ((f, out / "train" / f.parent.name / f"c{k}_{f.name}")
             for f in (src / "train").rglob("*.jpg") for k in range(times))
    val = ((f, out / f.relative_to(src)) for f in (src / "val").rglob("*.jpg"))
    return link_all(itertools.chain(train, val), out)


def subset(src: Path, out: Path, n: int) -> Path:
    """``n`` of the train files of ``src``, spread over its classes, and its val set."""
    if (out / ".done").exists():
        return out
    files = sorted((src / "train").rglob("*.jpg"))
    files = files[:: max(1, len(files) // n)][:n]
    return link_all(((f, out / f.relative_to(src)) for f in files + sorted((src / "val").rglob("*.jpg"))), out)


def tl_dist(config: str, data: Path, out: Path, *over: str) -> dict:
    stdout, wall = sh([sys.executable, "-m", "tl_dist.train", "--config", config, f"data.root={data}",
                 f"train.output_dir={out}", "train.resume=none", "train.plots=false", *over], out.with_suffix(".log"))
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    meta = json.loads((out / "best.json").read_text())
    steady = rows[1:] or rows  # epoch 1 includes cache filling and first-call overheads
    return {
        "train s": sum(r["train_seconds"] + r["val_seconds"] for r in rows),
        "wall s": wall,  # the whole process: start-up, cache filling, checkpoint writing
        "train img/s": sum(r["train_samples"] for r in steady) / sum(r["train_seconds"] for r in steady),
        "val img/s": sum(r["val_samples"] for r in steady) / sum(r["val_seconds"] for r in steady),
        "peak host MB": max(r["peak_host_mb"] for r in rows),
        "peak GPU MB": max(r.get("peak_gpu_mb", 0) for r in rows),
        "best acc": max(r["val_acc"] for r in rows), "data path": meta["data_path"],
        "precision": meta["mixed_precision"], "stdout": stdout[-300:],
        "warnings": " / ".join(l[9:120] for l in stdout.splitlines() if l.startswith("warning: ")) or "-",
    }


def table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(c for r in rows for c in r if c != "stdout"))  # a failed row has fewer
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) and v < 1.5 else f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                     + ["| " + " | ".join(fmt(r.get(c, "-")) for c in cols) + " |" for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", required=True, type=Path, help="the shared bench folder (make_data.py, seed_baseline.py)")
    p.add_argument("--work", type=Path, default=Path("/tmp/tl_gpu"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes and epochs, to check the script on any machine")
    p.add_argument("--part", choices=("all", "tutorial", "scale"), default="all",
                   help="tutorial: the tutorial's workload only; scale: the scaling rows only (each fits one 10-minute device call)")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows (minutes of compiling)")
    a = p.parse_args()
    import torch
    if not torch.cuda.is_available() and not a.smoke:
        sys.exit("no CUDA GPU here; use --smoke to check the script itself")
    a.work.mkdir(parents=True, exist_ok=True)
    epochs, scale_epochs = (2, 2) if a.smoke else (25, 3)
    sizes = (40, 80, 8) if a.smoke else (1000, 8000, 8)  # 1k, 8k, and 8k x 8 = 64k
    t_start = time.perf_counter()

    if a.part in ("all", "tutorial"):
        tutorial_workload(a, epochs)
    if a.part in ("all", "scale"):
        scale(a, scale_epochs, sizes)
    print(f"suite time {time.perf_counter() - t_start:.0f}s; GPU: "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'none (smoke)'}", flush=True)


def tutorial_workload(a: argparse.Namespace, epochs: int) -> None:
    """The tutorial's code and tl_dist on the tutorial's workload."""
    hym = a.work / "hym"
    if not (hym / "val").exists():
        subprocess.run([sys.executable, str(a.bench / "make_data.py"), str(hym)], check=True)
    rows = []
    for mode in ("finetune", "frozen"):
        try:
            out, seed_wall = sh([sys.executable, str(a.bench / "seed_baseline.py"), str(hym), "--mode", mode,
                                 "--epochs", str(epochs)], a.work / f"tutorial_{mode}.log")
        except RunFailed as e:
            rows.append({"mode": mode, "tl_dist": "the tutorial's code", "error": str(e)})
            continue
        m = re.search(r"train_s=([\d.]+) best_val_acc=([\d.]+)", out)
        seed_s, seed_acc = float(m.group(1)), float(m.group(2))
        for i, (label, over) in enumerate((
                ("batch 4, lr 0.001 (the tutorial's)", ()),
                ("batch 4, whole step as a CUDA graph", ("train.cuda_graphs=true",)),
                ("batch 4, compiled, CUDA graphs", ("train.compile=true", "train.compile_mode=reduce-overhead")),
                ("batch 32, lr 0.008", ("data.batch_size=32", "optim.lr=0.008")))):
            if (a.smoke or a.no_compile) and "train.compile=true" in over:
                continue  # minutes of compiling (on a small CPU, many)
            if a.smoke and "train.cuda_graphs=true" in over:
                continue  # needs CUDA
            try:
                r = tl_dist(f"configs/{mode}.yaml", hym, a.work / f"t2_{mode}_{i}", "model.weights=none",
                            f"train.epochs={epochs}", *over)
            except RunFailed as e:
                rows.append({"mode": mode, "tl_dist": label, "error": str(e)})
                continue
            rows.append({"mode": mode, "tl_dist": label, "tutorial train s": seed_s, "tl_dist train s": r["train s"],
                         "speed-up": f"{seed_s / r['train s']:.1f}x", "tutorial wall s": seed_wall,
                         "tl_dist wall s": r["wall s"], "tutorial acc": seed_acc, "tl_dist acc": r["best acc"],
                         "train img/s": r["train img/s"], "data path": r["data path"], "precision": r["precision"],
                         "warnings": r["warnings"]})
    print(f"\n### The tutorial's workload, {epochs} epochs, weights none\n\n{table(rows)}\n", flush=True)



def scale(a: argparse.Namespace, scale_epochs: int, sizes: tuple[int, int, int]) -> None:
    """Scaling: finetune at batch 256 from JPEG files, 1k / 8k / 64k images."""
    parts = 2 if a.smoke else 16
    k8 = make_set(a.bench, a.work / "k8", sizes[1], 200 if not a.smoke else 10, parts)
    k1 = subset(k8, a.work / "k1", sizes[0])
    k64 = linked_copies(k8, a.work / "k64", sizes[2])
    common = ("model.weights=none", f"train.epochs={scale_epochs}", "data.batch_size=256" if not a.smoke
              else "data.batch_size=8", "optim.lr=0.1", "train.mixed_precision=auto", "data.num_workers=16")
    rows = []
    for name, data, extra in (("1k", k1, ()), ("8k", k8, ()), ("64k", k64, ()),
                              ("64k, no GPU cache (CPU loader)", k64, ("data.device_cache_gb=0",))):
        try:
            r = tl_dist("configs/finetune.yaml", data, a.work / f"scale_{name.split(',')[0]}_{len(extra)}",
                        *common, *extra)
        except RunFailed as e:
            rows.append({"train images": name, "error": str(e)})
            continue
        rows.append({"train images": name, "train img/s": r["train img/s"], "val img/s": r["val img/s"],
                     "peak host MB": r["peak host MB"], "peak GPU MB": r["peak GPU MB"], "data path": r["data path"],
                     "precision": r["precision"]})
    print(f"### Scaling: finetune, batch 256, from JPEG files, {scale_epochs} epochs (img/s: epochs 2+)\n\n"
          f"{table(rows)}\n", flush=True)


if __name__ == "__main__":
    main()
