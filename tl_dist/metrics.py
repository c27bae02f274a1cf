"""Multi-label metrics, from every sample's per-class probabilities and multi-hot truth; and the
most confused pairs of a confusion matrix.

One implementation for the epoch's val numbers and ``tl-dist evaluate``. Computed on the whole val
set at once (the ranks' scores gathered first), so a distributed run reports the one-process numbers,
never an average of per-rank ones. Pure torch on the CPU, in float64.
"""
from __future__ import annotations

import torch


def average_precision(scores: torch.Tensor, truth: torch.Tensor) -> float | None:
    """One class's average precision, as scikit-learn's ``average_precision_score`` defines it: the
    sum over distinct score thresholds of (recall gain) x precision. None without positives."""
    positives = int(truth.sum())
    if positives == 0:
        return None
    order = torch.argsort(scores, descending=True, stable=True)
    s, t = scores[order], truth[order].double()
    tp, fp = torch.cumsum(t, 0), torch.cumsum(1.0 - t, 0)
    last = torch.ones(len(s), dtype=torch.bool)  # the last sample of each run of equal scores
    last[:-1] = s[1:] != s[:-1]
    tp, fp = tp[last], fp[last]
    recall = tp / positives
    gain = recall - torch.cat([recall.new_zeros(1), recall[:-1]])
    return float((gain * tp / (tp + fp)).sum())


def multi_label_metrics(probs: torch.Tensor, targets: torch.Tensor, classes: list[str],
                        threshold: float | list[float]) -> dict:
    """mAP (the mean AP over the classes that have positives), micro and macro F1 at ``threshold``
    (one for all classes, or one per class; macro over the classes with positives), the exact-match
    (subset) accuracy, and per class AP, precision, recall, F1 and support. ``probs`` and
    ``targets`` are N x C."""
    probs, truth = probs.double().cpu(), targets.cpu() >= 0.5
    pred = probs >= torch.as_tensor(threshold, dtype=torch.float64)
    tp = (pred & truth).sum(0).double()
    fp = (pred & ~truth).sum(0).double()
    fn = (~pred & truth).sum(0).double()
    support = truth.sum(0)
    ap = [average_precision(probs[:, c], truth[:, c]) for c in range(len(classes))]

    def ratio(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(b > 0, a / b.clamp(min=1), torch.zeros_like(a))
    precision, recall, f1 = ratio(tp, tp + fp), ratio(tp, tp + fn), ratio(2 * tp, 2 * tp + fp + fn)
    present = [c for c in range(len(classes)) if support[c] > 0]
    total = float(2 * tp.sum() + fp.sum() + fn.sum())
    return {
        "map": sum(ap[c] for c in present) / len(present) if present else 0.0,
        "micro_f1": float(2 * tp.sum()) / total if total else 0.0,
        "macro_f1": float(f1[present].mean()) if present else 0.0,
        "exact_match": float((pred == truth).all(1).double().mean()) if len(probs) else 0.0,
        "threshold": threshold,
        "per_class": {name: {"ap": ap[c], "precision": float(precision[c]), "recall": float(recall[c]),
                             "f1": float(f1[c]), "support": int(support[c])} for c, name in enumerate(classes)},
    }


def best_f1_thresholds(probs: torch.Tensor, targets: torch.Tensor, default: float) -> list[float]:
    """Per class, the threshold with the highest F1 on these samples: halfway between the lowest
    probability it predicts and the next one down (the first of equal F1s: the highest threshold).
    ``default`` for a class without positives."""
    probs, truth = probs.double().cpu(), targets.cpu() >= 0.5
    out = []
    for c in range(probs.shape[1]):
        positives = int(truth[:, c].sum())
        if positives == 0:
            out.append(default)
            continue
        order = torch.argsort(probs[:, c], descending=True, stable=True)
        s, t = probs[order, c], truth[order, c].double()
        tp, fp = torch.cumsum(t, 0), torch.cumsum(1.0 - t, 0)
        last = torch.ones(len(s), dtype=torch.bool)
        last[:-1] = s[1:] != s[:-1]
        idx = last.nonzero().flatten()
        f1 = 2 * tp[idx] / (tp[idx] + fp[idx] + positives)
        i = int(idx[int(torch.argmax(f1))])
        below = float(s[i + 1]) if i + 1 < len(s) else 0.0
        out.append(min(max((float(s[i]) + below) / 2, 1e-6), 1 - 1e-6))
    return out


def most_confused(confusion, classes: list[str], most: int = 10) -> list[dict]:
    """fastai's ``most_confused``: the (true, predicted) pairs of different classes the model mixed
    up, most often first (ties in class order), as dicts {true, predicted, count}; at most ``most``."""
    c = torch.as_tensor(confusion).long()
    pairs = [(-int(c[t, p]), t, p) for t in range(len(classes)) for p in range(len(classes)) if t != p and c[t, p] > 0]
    return [{"true": classes[t], "predicted": classes[p], "count": -n} for n, t, p in sorted(pairs)[:most]]


def confused_line(pairs: list[dict]) -> str:
    """The pairs in one line, for the console: ``ants -> bees 3, bees -> ants 1``."""
    return ", ".join(f"{p['true']} -> {p['predicted']} {p['count']}" for p in pairs) or "none"


def class_scores(confusion) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Precision, recall, F1 and support of each class from a [true, predicted] confusion matrix
    (float64; 0 where a class was never predicted or never present)."""
    c = torch.as_tensor(confusion)
    tp = c.diag().double()
    support, predicted = c.sum(1).double(), c.sum(0).double()
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-300),
                     torch.zeros_like(tp))
    return precision, recall, f1, support


def per_class(confusion, classes: list[str]) -> list[dict]:
    """``class_scores`` as one dict per class: class, precision, recall, f1, support."""
    precision, recall, f1, support = class_scores(confusion)
    return [{"class": name, "precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
             "support": int(support[i])} for i, name in enumerate(classes)]
