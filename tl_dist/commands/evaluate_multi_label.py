"""tl-dist evaluate for a multi_label checkpoint: the metrics, the files and the summary.

metrics.json holds mAP, micro and macro F1 at the thresholds, the exact-match accuracy, the mean
binary cross-entropy, and per class AP / precision / recall / F1 / support; predictions.csv every
image's true and predicted labels and per-class probabilities; ap_per_class.png and pr_curves.png.
``--tune-thresholds`` writes thresholds.json (per class, the best F1 on this split) for
``--thresholds`` elsewhere: the metrics reported here stay at the thresholds given, never at ones
tuned on the same images.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from tl_dist.errors import printable
from tl_dist.metrics import best_f1_thresholds, multi_label_metrics
from tl_dist.predictor import THRESHOLDS_FORMAT

OUTPUTS = ("metrics.json", "predictions.csv", "ap_per_class.png", "pr_curves.png", "thresholds.json")


def metrics_of(logits: torch.Tensor, targets: torch.Tensor, classes: list[str], thresholds: list[float],
               batch: int) -> dict:
    m = multi_label_metrics(torch.sigmoid(logits), targets, classes, thresholds)
    return {"task": "multi_label", "n": len(logits), "loss": loss_of(logits, targets, batch) / max(1, len(logits)),
            **m, "threshold": thresholds[0] if len(set(thresholds)) == 1 else thresholds}


def loss_of(logits: torch.Tensor, targets: torch.Tensor, batch: int) -> float:
    """Summed binary cross-entropy (each image's mean over the classes): float32 per batch,
    accumulated in float64, the trainer's arithmetic, so a run's val loss is reproduced exactly."""
    total = torch.zeros((), dtype=torch.float64)
    for s in range(0, len(logits), batch):
        total += F.binary_cross_entropy_with_logits(logits[s:s + batch].float(), targets[s:s + batch].float(),
                                                    reduction="none").mean(1).sum()
    return total.item()


def finish(args, metrics_head: dict, paths: list[str], targets: torch.Tensor, logits: torch.Tensor,
           mirrored: torch.Tensor | None, predictor, out: Path) -> dict:
    """Every output of a multi_label evaluation; returns what metrics.json holds."""
    from tl_dist import visualize
    from tl_dist.files import atomic

    classes, thresholds = predictor.classes, predictor.thresholds
    probs = torch.sigmoid(logits)  # (once: the metrics, the tuning, the csv and the curves read it)
    batch = metrics_head["batch_size"]
    metrics = {**metrics_head, **metrics_of(logits, targets, classes, thresholds, batch)}
    if mirrored is not None:
        tta = metrics_of((logits + mirrored) / 2, targets, classes, thresholds, batch)
        metrics["tta_flip"] = {k: tta[k] for k in ("map", "micro_f1", "macro_f1", "exact_match", "loss")}
    if args.tune_thresholds:
        tuned = best_f1_thresholds(probs, targets, predictor.thresholds[0])
        with_tuned = multi_label_metrics(probs, targets, classes, tuned)
        metrics["tuned_on_this_split"] = {"micro_f1": with_tuned["micro_f1"], "macro_f1": with_tuned["macro_f1"],
                                          "file": str(out / "thresholds.json")}
    out.mkdir(parents=True, exist_ok=True)
    if args.tune_thresholds:
        atomic.atomic_write_text(out / "thresholds.json", json.dumps(
            {"format": THRESHOLDS_FORMAT, "checkpoint": metrics["checkpoint"], "tuned_on": metrics["data"],
             "classes": classes, "thresholds": tuned}, indent=1, allow_nan=False) + "\n")
    atomic.atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False) + "\n")
    atomic.atomic_write_text(out / "predictions.csv", predictions_csv(paths, targets, probs, classes,
                                                                      thresholds))
    visualize.drawn(visualize.ap_per_class, metrics["per_class"], metrics["map"], out / "ap_per_class.png")
    visualize.drawn(visualize.pr_curves, probs, targets, classes, out / "pr_curves.png")
    return metrics


def predictions_csv(paths: list[str], targets: torch.Tensor, probs: torch.Tensor, classes: list[str],
                    thresholds: list[float]) -> str:
    """path, true labels, predicted labels (';'-separated), then each class's probability."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "true", "predicted", *[f"p_{c}" for c in classes]])
    for p, t, row in zip(paths, targets.tolist(), probs.tolist()):
        w.writerow([p, ";".join(c for c, v in zip(classes, t) if v >= 0.5),
                    ";".join(c for c, v, th in zip(classes, row, thresholds) if v >= th), *[f"{v:.6f}" for v in row]])
    return buf.getvalue()


def summary(metrics: dict, out: Path) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"{metrics['n']} images: mAP {metrics['map']:.4f}, micro F1 {metrics['micro_f1']:.4f}, macro F1 "
                    f"{metrics['macro_f1']:.4f}, exact match {metrics['exact_match']:.4f}, loss {metrics['loss']:.4f}"
                    + (f"; with flip TTA mAP {metrics['tta_flip']['map']:.4f}" if "tta_flip" in metrics else ""))
    for col in ("class", "AP", "precision", "recall", "f1", "support"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for name, r in metrics["per_class"].items():
        t.add_row(escape(printable(name)), "-" if r["ap"] is None else f"{r['ap']:.4f}", f"{r['precision']:.4f}",
                  f"{r['recall']:.4f}", f"{r['f1']:.4f}", str(r["support"]))
    Console().print(t)
    tuned = metrics.get("tuned_on_this_split")
    if tuned:
        print(f"per-class thresholds tuned on these images: {printable(tuned['file'])} (micro F1 here "
              f"{tuned['micro_f1']:.4f}, optimistic: measure another split with --thresholds)", flush=True)
    print(f"written: {printable(out)}/metrics.json, predictions.csv, ap_per_class.png, pr_curves.png", flush=True)
