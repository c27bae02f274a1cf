"""The GPU measurements in one prepared call, for a machine with one CUDA GPU (device time is scarce).

    PYTHONPATH=. python benchmarks/gpu_suite.py --bench PATH/TO/shared/bench [--budget 540] [--work /tmp/tl_gpu]
    PYTHONPATH=. python benchmarks/gpu_suite.py --bench ... --smoke   # tiny sizes, any machine: checks the script
    --part tutorial | scale runs one half; --no-compile drops the compile rows; --only WORDS runs the rows
    whose names contain WORDS ("frozen tutorial's code", "finetune batch 4", "8k shards", ...)

In order of importance, each row skipped (and said so) once the --budget (seconds) would not hold it:
0. tl-dist doctor --json: every GPU row, among them the steady-state train step under
   torch.cuda.set_sync_debug_mode("error") (no host waits between optimizer steps);
1. the tutorial's workload (hymenoptera-shaped, 25 epochs, both modes): the tutorial's code against tl_dist
   with the tutorial's hyperparameters (batch 4, lr 0.001: the defaults (the step as one CUDA graph), the
   eager step, compiled with CUDA graphs) and with batch 32 / lr 0.008 (linear scaling). With model.weights
   none a frozen random backbone with eval-mode BatchNorm learns nothing, while the tutorial's code moves its
   BN statistics: frozen rows compare speed only;
2. scale: finetune, batch 256, bf16, from photo-sized JPEG files, 8,000 train images: images/s with the
   defaults, with the eager step and with cuDNN's heuristics; then 1k and 64k (the 8k files linked eight
   times) with the automatic data path, and 64k without the GPU cache; then the 8k set from WebDataset
   shards and through the disk cache (the CPU loaders against the step).
Writes --work/gpu_suite.md (the tables) and --work/gpu_suite.json (every row, raw), updated after each
row, so a call cut short keeps what it measured; every run's own output is kept under --work.
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


class Budget:
    """The call's seconds: a row starts only if its estimate fits what is left, and no command runs
    past the end (it is stopped, and its row says so)."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()

    def fits(self, estimate: float) -> bool:
        return self.left() >= estimate


BUDGET = Budget(float("inf"))


class Skipped(Exception):
    """A row left out: it would not fit the budget."""


def sh(cmd: list[str], log: Path, estimate: float = 0.0) -> tuple[str, float]:
    """(stdout, wall seconds) of ``cmd``; raises RunFailed (its error output kept in ``log``) if it
    fails, Skipped if ``estimate`` seconds do not fit the budget or the budget ends while it runs."""
    if not BUDGET.fits(estimate):
        raise Skipped(f"skipped: about {estimate:.0f}s needed, {max(0.0, BUDGET.left()):.0f}s of --budget left")
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=max(1.0, BUDGET.left()) if BUDGET.left() < float("inf") else None,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
    except subprocess.TimeoutExpired:
        log.write_text(f"$ {' '.join(cmd)}\nstopped at the end of --budget\n")
        raise Skipped("stopped: the --budget ended while it ran") from None
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


def tl_dist(config: str, data: Path, out: Path, *over: str, estimate: float = 0.0) -> dict:
    stdout, wall = sh([sys.executable, "-m", "tl_dist.train", "--config", config, f"data.root={data}",
                       f"train.output_dir={out}", "train.resume=none", "train.plots=false", *over],
                      out.with_suffix(".log"), estimate)
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


class Report:
    """The suite's tables: gpu_suite.md and gpu_suite.json in --work, rewritten after every row."""

    def __init__(self, work: Path, header: str) -> None:
        self.work, self.header, self.sections = work, header, {}

    def add(self, section: str, row: dict) -> None:
        self.sections.setdefault(section, []).append({k: v for k, v in row.items() if k != "stdout"})
        md = [self.header] + [f"### {name}\n\n{table(rows)}\n" for name, rows in self.sections.items()]
        for name, text in (("gpu_suite.md", "\n".join(md)), ("gpu_suite.json", json.dumps(self.sections, indent=1))):
            tmp = self.work / f".{name}.tmp"
            tmp.write_text(text + "\n")
            os.replace(tmp, self.work / name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", required=True, type=Path, help="the shared bench folder (make_data.py, seed_baseline.py)")
    p.add_argument("--work", type=Path, default=Path("/tmp/tl_gpu"))
    p.add_argument("--budget", type=float, default=float("inf"),
                   help="seconds this call may take: rows that would not fit are skipped, in order of importance")
    p.add_argument("--smoke", action="store_true", help="tiny sizes and epochs, to check the script on any machine")
    p.add_argument("--part", choices=("all", "tutorial", "scale"), default="all",
                   help="tutorial: the doctor and the tutorial's workload; scale: the scaling rows")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile rows (minutes of compiling)")
    p.add_argument("--only", nargs="+", metavar="WORDS",
                   help="run only the rows whose name contains one of these (e.g. doctor, 'finetune batch 4', "
                        "'frozen tutorial', '8k shards'); the others are left out, unlisted")
    a = p.parse_args()
    import torch
    if not torch.cuda.is_available() and not a.smoke:
        sys.exit("no CUDA GPU here; use --smoke to check the script itself")
    global BUDGET
    BUDGET = Budget(a.budget)
    a.work.mkdir(parents=True, exist_ok=True)
    a.cost = 0.05 if a.smoke else 1.0  # (the row estimates below are for an H200)
    epochs, scale_epochs = (2, 2) if a.smoke else (25, 3)
    sizes = (40, 80, 8) if a.smoke else (1000, 8000, 8)  # 1k, 8k, and 8k x 8 = 64k
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none (smoke)"
    report = Report(a.work, f"GPU: {gpu}; torch {torch.__version__}; {os.cpu_count()} CPU cores; "
                            f"`python benchmarks/gpu_suite.py{' --smoke' if a.smoke else ''} --part {a.part} --budget {a.budget:g}"
                            f"{' --only ' + ' '.join(repr(w) for w in a.only) if a.only else ''}`\n")
    t_start = time.perf_counter()
    if a.part in ("all", "tutorial"):
        doctor(a, report)
        tutorial_workload(a, epochs, report)
    if a.part in ("all", "scale"):
        scale(a, scale_epochs, sizes, report)
    print(f"suite time {time.perf_counter() - t_start:.0f}s; GPU: {gpu}; tables in {a.work / 'gpu_suite.md'}", flush=True)


def wanted(a: argparse.Namespace, name: str) -> bool:
    return not a.only or any(words in name for words in a.only)


def doctor(a: argparse.Namespace, report: Report) -> None:
    """tl-dist doctor's rows on this machine (the sync-free step among them)."""
    if not wanted(a, "doctor"):
        return
    try:
        out, _ = sh([sys.executable, "-m", "tl_dist", "doctor", "--json"], a.work / "doctor.log", 120 * a.cost)
        for c in json.loads(out.splitlines()[-1])["checks"]:
            report.add("tl-dist doctor", {"feature": c["feature"], "status": c["status"], "detail": c["detail"],
                                          "seconds": c["seconds"]})
    except (RunFailed, Skipped) as e:
        report.add("tl-dist doctor", {"feature": "all", "status": str(e)})


def tutorial_workload(a: argparse.Namespace, epochs: int, report: Report) -> None:
    """The tutorial's code and tl_dist on the tutorial's workload."""
    section = f"The tutorial's workload, {epochs} epochs, weights none (frozen rows: speed only)"
    hym = a.work / "hym"
    if not (hym / "val").exists():
        subprocess.run([sys.executable, str(a.bench / "make_data.py"), str(hym)], check=True)
    for mode in ("finetune", "frozen"):
        seed_s = seed_acc = seed_wall = None  # (--only without "<mode> tutorial's code": tl_dist's rows alone)
        if wanted(a, f"{mode} tutorial's code"):
            try:
                out, seed_wall = sh([sys.executable, str(a.bench / "seed_baseline.py"), str(hym), "--mode", mode,
                                     "--epochs", str(epochs)], a.work / f"tutorial_{mode}.log", 60 * a.cost)
            except (RunFailed, Skipped) as e:
                report.add(section, {"mode": mode, "tl_dist": "the tutorial's code", "error": str(e)})
                continue
            m = re.search(r"train_s=([\d.]+) best_val_acc=([\d.]+)", out)
            seed_s, seed_acc = float(m.group(1)), float(m.group(2))
        for i, (label, over, estimate) in enumerate((
                ("batch 4, lr 0.001 (the tutorial's)", (), 60),
                ("batch 4, eager (train.cuda_graphs=false)", ("train.cuda_graphs=false",), 60),
                ("batch 32, lr 0.008", ("data.batch_size=32", "optim.lr=0.008"), 40),
                ("batch 4, compiled, CUDA graphs", ("train.compile=true", "train.compile_mode=reduce-overhead"), 180),
                ("batch 4, data.augment=none: the features computed once", ("data.augment=none",), 20))):
            if (a.smoke or a.no_compile) and "train.compile=true" in over:
                continue  # minutes of compiling (on a small CPU, many)
            if mode == "finetune" and "data.augment=none" in over:
                continue  # (the feature cache is for a frozen backbone)
            if not wanted(a, f"{mode} {label}"):
                continue
            try:
                r = tl_dist(f"configs/{mode}.yaml", hym, a.work / f"t2_{mode}_{i}", "model.weights=none",
                            f"train.epochs={epochs}", *over, estimate=estimate * a.cost)
            except (RunFailed, Skipped) as e:
                report.add(section, {"mode": mode, "tl_dist": label, "error": str(e)})
                continue
            report.add(section, {
                "mode": mode, "tl_dist": label, "tutorial train s": seed_s or "-", "tl_dist train s": r["train s"],
                "speed-up": f"{seed_s / r['train s']:.1f}x" if seed_s else "-", "tutorial wall s": seed_wall or "-",
                "tl_dist wall s": r["wall s"], "tutorial acc": seed_acc if mode == "finetune" and seed_acc else "-",
                "tl_dist acc": r["best acc"] if mode == "finetune" else "-", "train img/s": r["train img/s"],
                "data path": r["data path"], "precision": r["precision"], "warnings": r["warnings"]})


def scale(a: argparse.Namespace, scale_epochs: int, sizes: tuple[int, int, int], report: Report) -> None:
    """Scaling: finetune at batch 256 from JPEG files: 8k first, then 1k and 64k."""
    section = f"Scaling: finetune, batch 256, bf16, from JPEG files, {scale_epochs} epochs (img/s: epochs 2+)"
    parts = 2 if a.smoke else 16
    if not BUDGET.fits(150 * a.cost):
        report.add(section, {"train images": "all", "error": "skipped: the --budget has no room to make the data"})
        return
    k8 = make_set(a.bench, a.work / "k8", sizes[1], 200 if not a.smoke else 10, parts)
    k1 = subset(k8, a.work / "k1", sizes[0])
    k64 = linked_copies(k8, a.work / "k64", sizes[2])
    common = ("model.weights=none", f"train.epochs={scale_epochs}", "data.batch_size=256" if not a.smoke
              else "data.batch_size=8", "optim.lr=0.1", "train.mixed_precision=auto", "data.num_workers=16")
    shards = a.work / "k8_shards"  # the 8k set as WebDataset shards: the same images through the shard reader
    if wanted(a, "8k shards") and not (shards / "classes.txt").is_file():
        sh([sys.executable, "-m", "tl_dist", "data", "shard", str(k8), str(shards), "--shard-size", "256MB"],
           a.work / "shard.log", 60 * a.cost)
    for row, (name, data, extra, estimate) in enumerate((("8k, defaults", k8, (), 90),
                                        ("8k, eager step (train.cuda_graphs=false)", k8, ("train.cuda_graphs=false",), 90),
                                        ("8k, cuDNN heuristics (train.cudnn_benchmark=false)", k8,
                                         ("train.cudnn_benchmark=false",), 90),
                                        ("1k", k1, (), 40), ("64k", k64, (), 150),
                                        ("64k, no GPU cache (CPU loader)", k64, ("data.device_cache_gb=0",), 200),
                                        ("8k shards, CPU loader", shards, ("data.format=wds", "data.cache=none"), 90),
                                        ("8k, disk cache, CPU loader", k8,
                                         ("data.cache=disk", f"data.cache_dir={a.work / 'image_cache'}"), 120))):
        if not wanted(a, name):
            continue
        try:
            r = tl_dist("configs/finetune.yaml", data, a.work / f"scale_{row}",
                        *common, *extra, estimate=estimate * a.cost)
        except (RunFailed, Skipped) as e:
            report.add(section, {"train images": name, "error": str(e)})
            continue
        report.add(section, {"train images": name, "train img/s": r["train img/s"], "val img/s": r["val img/s"],
                             "peak host MB": r["peak host MB"], "peak GPU MB": r["peak GPU MB"],
                             "data path": r["data path"], "precision": r["precision"]})


if __name__ == "__main__":
    main()
