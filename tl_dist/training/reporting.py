"""The console report of a run: its lines, the summary table, the metrics row, peak memory, versions."""
from __future__ import annotations

import platform
import resource
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torchvision
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tl_dist import __version__
from tl_dist.training.engine import EpochResult
from tl_dist.errors import drop_stdout, printable
from tl_dist.metrics import confused_line, most_confused
from tl_dist.training.run_state import RunState


def versions() -> dict[str, str]:
    """The libraries a run's results depend on (timm where it is installed: model.arch=timm/...)."""
    found = {"tl_dist": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
             "accelerate": version("accelerate"), "python": platform.python_version()}
    try:
        found["timm"] = version("timm")
    except PackageNotFoundError:
        pass
    return found


def say(msg: str) -> None:
    """A progress line on stdout. A closed or full stdout (a pipe whose reader left, /dev/full)
    loses the line but never the run: the files are what matters."""
    try:
        print(printable(msg), flush=True)
    except OSError:
        drop_stdout()


def macro_f1(confusion: torch.Tensor) -> float:
    """Mean F1 over the classes the val split has ([true, predicted] counts)."""
    c = confusion.double()
    tp, support, predicted = c.diag(), c.sum(1), c.sum(0)
    f1 = torch.where(support + predicted > 0, 2 * tp / (support + predicted).clamp(min=1), torch.zeros_like(tp))
    present = support > 0
    return float(f1[present].mean()) if present.any() else 0.0


def metrics_row(epoch: int, tr: EpochResult, va: EpochResult, lrs: list[float], frozen: bool,
                digest: str | None, device: torch.device) -> dict:
    """The epoch's line in metrics.jsonl. With several labels per image, the accuracies are exact
    matches (every class on the right side of the threshold) and the row adds map and micro_f1."""
    multi = va.metrics is not None
    row = {"epoch": epoch, "train_loss": tr.loss, "train_acc": tr.acc, "val_loss": va.loss,
           "val_acc": va.acc, "macro_f1": va.metrics["macro_f1"] if multi else macro_f1(va.confusion),
           **({"map": va.metrics["map"], "micro_f1": va.metrics["micro_f1"]} if multi else {}),
           "lr": lrs[0], "backbone_lr": None if frozen else lrs[-1],
           "seconds": tr.seconds + va.seconds, "train_seconds": tr.seconds, "val_seconds": va.seconds,
           "train_samples": tr.samples, "val_samples": va.samples, **peak_memory_mb(device)}
    if tr.steps is not None and len(tr.steps) and float(tr.steps[-1, 2]) != lrs[0]:
        row["lr_last"] = float(tr.steps[-1, 2])  # (a warm-up, cosine or one-cycle moved it within the epoch)
    if digest:
        row["weights_digest"] = digest
    return row


def epoch_line(row: dict, epochs: int, lrs: list[float], frozen: bool, is_best: bool) -> str:
    backbone = "" if frozen or lrs[-1] == lrs[0] else f" (backbone {lrs[-1]:.2g})"
    moved = f"->{row['lr_last']:.2g}" if "lr_last" in row else ""  # (where it went within the epoch)
    return (f"epoch {row['epoch']} ({row['epoch'] + 1} of {epochs})  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.4f}  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  "
            + (f"mAP {row['map']:.4f} F1 {row['micro_f1']:.4f}  " if "map" in row else "")
            + f"lr {lrs[0]:.2g}{moved}{backbone}  {row['seconds']:.1f}s{'  *best' if is_best else ''}")


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """This process's peak resident host memory, and peak GPU memory allocated by torch."""
    peak = {"peak_host_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # KiB on Linux
    if device.type == "cuda":
        peak["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


def summary(state: RunState, total: float, out: Path, classes: list[str] | None = None) -> None:
    multi = bool(state.history) and all("map" in r for r in state.history)  # (several labels per image)
    t = Table(title=f"tl_dist run: {escape(printable(out))}")
    for col in ("epoch", "train loss", "train acc", "val loss", "val acc", *(("val mAP",) if multi else ()), "lr", "s"):
        t.add_column(col, justify="right")
    for r in state.history:
        best = " *" if r["epoch"] == state.best_epoch else ""
        t.add_row(str(r["epoch"]), f"{r['train_loss']:.4f}", f"{r['train_acc']:.4f}", f"{r['val_loss']:.4f}",
                  f"{r['val_acc']:.4f}" + ("" if multi else best), *((f"{r['map']:.4f}{best}",) if multi else ()),
                  f"{r['lr']:.2g}", f"{r['seconds']:.1f}")
    Console().print(t)
    # Plain prints: scripts read these lines, and a console would wrap a long path.
    if multi:
        row = next((r for r in state.history if r["epoch"] == state.best_epoch), None)
        print(f"total {total:.1f}s; best val mAP {row['map'] if row else 0.0:.4f} at epoch {state.best_epoch} "
              f"(exact-match accuracy {state.best_epoch_val_acc:.4f})", flush=True)
    else:
        print(f"total {total:.1f}s; best val acc {state.best_epoch_val_acc:.4f} at epoch {state.best_epoch}",
              flush=True)
        if state.best_confusion is not None and classes:
            pairs = most_confused(state.best_confusion, classes, most=5)
            print(f"most confused at epoch {state.best_epoch} (true -> predicted, val images): "
                  f"{printable(confused_line(pairs))}", flush=True)
    print(f"best weights: {printable(out / 'best.safetensors')}", flush=True)
