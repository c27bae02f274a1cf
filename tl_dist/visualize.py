"""The tutorial's pictures as PNG files, drawn with matplotlib as the tutorial does: a training batch,
val predictions, loss / accuracy / learning-rate curves and the confusion matrix.

Headless: figures are drawn on matplotlib's Agg canvas through its object API, never through pyplot,
so no display is needed and nothing changes the backend of a program that imports this.
Legible from 2 to 50 classes and with long class names: captions wrap, axis labels rotate and the
figures grow with the class count. Past 50 classes the confusion matrix shows the 50 classes most
involved in mistakes, so its size is bounded whatever the class count. A picture is a view of the
files, never a reason to fail: ``drawn`` turns any failure into a warning line.
"""
from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tl_dist.data.augment import normalize
from tl_dist.data.loaders import ImageDataset
from tl_dist.data.samplers import epoch_order

GREEN, RED, BLACK = "#1e8c3c", "#c82828", "#141414"
TRAIN, VAL = "#2a5ad0", "#e6781e"
CAPTION_CHARS = 38  # per caption line under a 2.6-inch tile at 8 pt
LABEL_CHARS = 32  # longer class names are cut (with ...) on the confusion matrix's axes
MATRIX_CLASSES = 50  # the most classes a confusion matrix picture shows


def drawn(draw, *args, **kwargs) -> None:
    """``draw(*args, **kwargs)``; a picture that cannot be drawn (memory, a font, a full disk) is a
    warning line, and the run or evaluation that wanted it carries on."""
    try:
        draw(*args, **kwargs)
    except Exception as e:  # (MemoryError too: C++'s bad_alloc arrives as one)
        from tl_dist.errors import first_line, one_line

        paths = [a for a in (*args, *kwargs.values()) if isinstance(a, Path)]
        name = paths[-1].name if paths else f"the {getattr(draw, '__name__', 'picture').replace('_', ' ')} picture"
        print(f"warning: {name} could not be drawn "
              f"({type(e).__name__}: {one_line(first_line(e))}); the other results are complete",
              file=sys.stderr, flush=True)


def _short(name: str, n: int = LABEL_CHARS) -> str:
    return name if len(name) <= n else name[:n - 3] + "..."


SOFTWARE = "tl_dist"  # in every picture's PNG metadata: how a later command knows the file is its own


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=100, metadata={"Software": SOFTWARE})


def is_ours(path: Path) -> bool:
    """Whether ``path`` is a picture tl_dist drew (its PNG metadata says so)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return str(im.info.get("Software", "")).startswith(SOFTWARE)
    except Exception:  # not an image at all, unreadable: not ours
        return False


def _wrap(text: str) -> str:
    """Each line of a caption wrapped to the tile's width (long class names break, never overflow)."""
    return "\n".join(textwrap.fill(line, CAPTION_CHARS, break_long_words=True) for line in text.split("\n"))


def grid(items: list[tuple[torch.Tensor, str, bool | None]], path: Path, cols: int = 4) -> None:
    """uint8 CHW images with a caption under each: green if right, red (and framed) if wrong,
    black when there is nothing to be right about."""
    cols = max(1, min(cols, len(items)))
    rows = math.ceil(len(items) / cols)
    captions = [_wrap(text) for _, text, _ in items]
    lines = max(c.count("\n") + 1 for c in captions)
    fig = Figure(figsize=(2.6 * cols, (2.6 + 0.17 * lines) * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, _, ok), caption in zip(axes.flat, items, captions):
        ax.imshow(img.permute(1, 2, 0).numpy())
        colour = BLACK if ok is None else (GREEN if ok else RED)
        ax.set_title(caption, fontsize=8, color=colour, loc="left")
        if ok is False:
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color(RED)
                spine.set_linewidth(3)
    _save(fig, path)


def train_batch(ds: ImageDataset, classes: list[str], path: Path, seed: int, n: int = 8) -> None:
    """The first augmented samples of epoch 0, as the tutorial's "visualize a few images" shows them."""
    items = []
    for i in epoch_order(len(ds), seed, 0)[:n]:
        img, label, _, _ = ds[(i, 0, 1.0)]
        items.append((img, names(label, classes), None))
    grid(items, path)


def names(label, classes: list[str]) -> str:
    """A label as text: its class, or (several labels per image: a multi-hot row) the classes it has."""
    if isinstance(label, torch.Tensor) and label.dim() == 1:
        return ", ".join(classes[c] for c in label.nonzero().flatten().tolist()) or "(none)"
    return classes[int(label)]


CANDIDATES = 256  # val images the predictions picture chooses from (spread over the val set)


@torch.inference_mode()
def val_predictions(model, ds: ImageDataset, classes: list[str], ctx, device, path: Path, n: int = 8) -> None:
    """The tutorial's visualize_model, made to teach: val images with predicted and true class,
    the mistakes first (the most confident first), then one right image per class not shown yet,
    up to max(n, classes) images (at most 16)."""
    n = min(16, max(n, len(classes)))
    candidates = list(range(0, len(ds), max(1, len(ds) // CANDIDATES)))[:CANDIDATES]
    model.eval()
    idx = _mistakes_first(model, ds, candidates, ctx, device, n) if not ctx.multi_label else \
        candidates[::max(1, len(candidates) // n)][:n]
    items = [ds[(i, 0, 1.0)] for i in idx]
    x = normalize(torch.stack([it[0] for it in items]).to(device), ctx.mean, ctx.std, ctx.channels_last)
    out = []
    if ctx.multi_label:  # every class at or past the threshold; right when the sets are equal
        pred = torch.sigmoid(model(x).float()).cpu()
        for (img, label, _, _), p in zip(items, pred):
            chosen = (p >= ctx.threshold).float()
            out.append((img, f"pred: {names(chosen, classes)}\ntrue: {names(label, classes)}",
                        bool(torch.equal(chosen, label))))
        grid(out, path)
        return
    pred = model(x).float().softmax(1).cpu()
    for (img, label, _, _), p in zip(items, pred):
        k = int(p.argmax())
        out.append((img, f"pred: {classes[k]} ({p[k]:.2f})\ntrue: {classes[label]}", k == label))
    grid(out, path)


def _mistakes_first(model, ds: ImageDataset, candidates: list[int], ctx, device, n: int) -> list[int]:
    """Of the candidates: the wrong ones, most confident first, then a right one of each class not
    shown yet, then the rest in order, ``n`` in all."""
    probs, labels = [], []
    for lo in range(0, len(candidates), 32):
        items = [ds[(i, 0, 1.0)] for i in candidates[lo:lo + 32]]
        x = normalize(torch.stack([it[0] for it in items]).to(device), ctx.mean, ctx.std, ctx.channels_last)
        probs.append(model(x).float().softmax(1).cpu())
        labels += [int(it[1]) for it in items]
    p = torch.cat(probs)
    conf, pred = p.max(1)
    wrong = sorted((i for i in range(len(candidates)) if int(pred[i]) != labels[i]), key=lambda i: -float(conf[i]))
    chosen = wrong[: max(1, n // 2)] if wrong else []
    shown = {labels[i] for i in chosen}
    for i in range(len(candidates)):
        if len(chosen) < n and labels[i] not in shown and i not in chosen:
            chosen.append(i)
            shown.add(labels[i])
    chosen += [i for i in range(len(candidates)) if i not in chosen][: n - len(chosen)]
    return [candidates[i] for i in chosen]


def _spans_decades(values: list[float]) -> bool:
    pos = [v for v in values if v is not None and v > 0]
    return len(pos) > 1 and max(pos) / min(pos) > 10


def curves(history: list[dict], path: Path, best_epoch: int | None = None, steps: torch.Tensor | None = None) -> None:
    """Loss (log scale when it spans more than 10x), accuracy and the learning rates, the best epoch
    (the run's, by train.select_best_by; default the highest val accuracy, first on ties) marked on
    all three. With the run's per-step rows (``steps``: position, loss, head lr, backbone lr) the x
    axis counts epochs trained: each optimizer step's loss (faint) and its smoothed curve, the epoch
    means at the middle of their epoch, the val points where they were measured (its end), and the
    learning rate as it was set at every step; without them, one point per epoch."""
    per_step = steps is not None and len(steps) > 0 and float(steps[0, 0]) <= 1.0  # (from the run's start)
    at_train = [r["epoch"] + (0.5 if per_step else 0) for r in history]
    at_val = [r["epoch"] + (1 if per_step else 0) for r in history]
    best = next((r for r in history if r["epoch"] == best_epoch), None) or \
        max(history, key=lambda r: (r["val_acc"], -r["epoch"]))
    best_x = best["epoch"] + (1 if per_step else 0)
    fig = Figure(figsize=(15, 4.6), layout="constrained")
    loss, acc, lr = fig.subplots(1, 3)
    if per_step:
        x, y = steps[:, 0].tolist(), steps[:, 1].tolist()
        loss.plot(x, y, color=TRAIN, lw=0.6, alpha=0.25, label="train, per step")
        loss.plot(x, smoothed(y), color=TRAIN, lw=1.4, label="train, smoothed")
    for ax, key, title in ((loss, "loss", "loss"), (acc, "acc", "accuracy")):
        for split, colour, xs in (("train", TRAIN, at_train), ("val", VAL, at_val)):
            ax.plot(xs, [r[f"{split}_{key}"] for r in history], marker="o", ms=4, color=colour,
                    ls="none" if per_step and split == "train" and key == "loss" else "-",
                    label=f"{split}{', epoch mean' if per_step and split == 'train' else ''}")
        ax.set_title(title)
    if all("map" in r for r in history):  # several labels per image: accuracy is the exact match
        acc.plot(at_val, [r["map"] for r in history], marker="^", ms=4, color=BLACK, label="val mAP")
        acc.set_title("exact-match accuracy, mAP")
    if _spans_decades([r[k] for r in history for k in ("train_loss", "val_loss")]):
        loss.set_yscale("log")
    acc.annotate(f"best epoch {best['epoch']}\nval acc {best['val_acc']:.4f}", (best_x, best["val_acc"]),
                 xytext=(0.5, 0.12), textcoords="axes fraction", ha="center", fontsize=9,
                 arrowprops={"arrowstyle": "->", "color": "grey"})
    head, backbone = _learning_rates(history, steps if per_step else None)
    lr.plot(*head, color=BLACK, label="head", **({"drawstyle": "steps-pre"} if per_step else {"marker": "o", "ms": 4}))
    if backbone is not None:  # a line of its own only if it differs
        lr.plot(*backbone, color="#7a3fb0", label="backbone",
                **({"drawstyle": "steps-pre"} if per_step else {"marker": "s", "ms": 4}))
    if _spans_decades(head[1] + (backbone[1] if backbone is not None else [])):
        lr.set_yscale("log")
    lr.set_title("learning rate" + (" (set at every step)" if per_step else " (at each epoch's start)"))
    for ax in (loss, acc, lr):
        ax.axvline(best_x, color="grey", ls="--", lw=1, label=f"best (epoch {best['epoch']})")
        ax.set_xlabel("epochs trained" if per_step else "epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        # below the axes, never over the data
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=9, frameon=False)
    _save(fig, path)


def _learning_rates(history: list[dict], steps: torch.Tensor | None):
    """(x, head lr) and (x, backbone lr) or None where it is the head's: per step, or per epoch."""
    if steps is not None:
        x = steps[:, 0].tolist()
        head, back = steps[:, 2].tolist(), steps[:, 3].tolist()
        frozen = all(r.get("backbone_lr") is None for r in history)
        return (x, head), (None if frozen or back == head else (x, back))
    epochs = [r["epoch"] for r in history]
    head = (epochs, [r["lr"] for r in history])
    if any(r.get("backbone_lr") not in (None, r["lr"]) for r in history):
        return head, (epochs, [r.get("backbone_lr") if r.get("backbone_lr") is not None else float("nan")
                               for r in history])
    return head, None


def smoothed(values: list[float], beta: float = 0.9) -> list[float]:
    """An exponential moving average with the start's bias removed (as lr-find smooths its loss)."""
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def confusion_matrix(cm: torch.Tensor, classes: list[str], path: Path) -> None:
    """Counts and the row-normalised view (each true class's share per prediction: its recall on
    the diagonal) side by side; the figure grows with the class count."""
    totals = cm.double().sum(1, keepdim=True)  # each true class's images (also those predicted as classes left out)
    title_note = ""
    if len(classes) > MATRIX_CLASSES:  # the classes most involved in mistakes, in class order
        errors = cm.double().clone()
        errors.fill_diagonal_(0)
        keep = sorted((errors.sum(0) + errors.sum(1)).topk(MATRIX_CLASSES).indices.tolist())
        title_note = f" ({MATRIX_CLASSES} most confused of {len(classes)} classes)"
        cm, totals, classes = cm[keep][:, keep], totals[keep], [classes[i] for i in keep]
    c = len(classes)
    counts = cm.double()
    rows = counts / totals.clamp(min=1)
    cell = 0.55 if c <= 12 else max(0.28, 6.6 / c)
    label_in = 0.075 * max(len(_short(n)) for n in classes)  # room for the longest label, in inches
    side = max(4.0, c * cell + label_in + 1.2)
    fig = Figure(figsize=(2 * side + 1.0, c * cell + label_in + 1.4), layout="constrained")
    axes = fig.subplots(1, 2)
    font = 9 if c <= 12 else max(6, 9 - c // 10)
    names = [_short(n) for n in classes]
    for ax, data, title, fmt in ((axes[0], counts, "counts", "{:.0f}"),
                                 (axes[1], rows, "row-normalised (recall on the diagonal)", "{:.2f}")):
        im = ax.imshow(data.numpy(), cmap="Blues", vmin=0)
        # (a parenthesis on a line of its own: a narrow figure must not break a phrase in two)
        ax.set_title((title + title_note).replace(" (", "\n("), fontsize=11)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_xticks(range(c), names, rotation=90 if c > 6 else 45, ha="right" if c <= 6 else "center",
                      fontsize=font)
        ax.set_yticks(range(c), names, fontsize=font)
        if c <= 20:  # values in the cells while they fit
            top = float(data.max()) or 1.0
            for t in range(c):
                for p in range(c):
                    v = float(data[t, p])
                    ax.text(p, t, fmt.format(v), ha="center", va="center", fontsize=font,
                            color="white" if v > 0.6 * top else BLACK)
        fig.colorbar(im, ax=ax, shrink=0.8)
    _save(fig, path)


def reliability(bins: list[dict], ece: float, path: Path) -> None:
    """The calibration diagram: accuracy against mean confidence per confidence bin (the diagonal is
    perfect calibration), with how many images each bin holds below."""
    fig = Figure(figsize=(6, 6.4), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    width = bins[0]["hi"] - bins[0]["lo"]
    centres = [(b["lo"] + b["hi"]) / 2 for b in bins]
    most = max(1, max(b["count"] for b in bins))
    # A bin's bar is as solid as its share of the images: one image must not look like seventy
    top.bar(centres, [b["accuracy"] or 0 for b in bins], width=width * 0.9, color=TRAIN, label="accuracy",
            alpha=None)
    for patch, b in zip(top.patches, bins):
        patch.set_alpha(0.15 + 0.85 * b["count"] / most)
        if b["count"]:
            top.text(patch.get_x() + patch.get_width() / 2, (b["accuracy"] or 0) + 0.01, str(b["count"]),
                     ha="center", va="bottom", fontsize=7, color="dimgrey")
    top.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    filled = [(b["confidence"], b["accuracy"]) for b in bins if b["count"]]
    if filled:
        top.plot(*zip(*filled), "o", color=VAL, ms=4, label="mean confidence, accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"reliability (expected calibration error {ece:.4f})")
    top.grid(True, alpha=0.3)
    top.legend(loc="upper left", fontsize=9)
    bottom.bar(centres, [b["count"] for b in bins], width=width * 0.9, color="grey")
    bottom.set_xlabel("confidence (top class probability)")
    bottom.set_ylabel("images")
    bottom.yaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, path)


PR_CLASSES = 12  # precision-recall curves drawn: every class up to this many, else the lowest-AP ones


def ap_per_class(per_class: dict[str, dict], mean_ap: float, path: Path) -> None:
    """Each class's average precision as a bar, lowest first (classes without positives left out),
    up to MATRIX_CLASSES of them (the lowest: where the model needs work)."""
    rows = sorted(((r["ap"], name) for name, r in per_class.items() if r["ap"] is not None))[:MATRIX_CLASSES]
    fig = Figure(figsize=(7, 1.2 + 0.28 * max(1, len(rows))), layout="constrained")
    ax = fig.subplots()
    ax.barh([_short(name) for _, name in rows], [ap for ap, _ in rows], color=VAL)
    ax.axvline(mean_ap, color=BLACK, ls="--", lw=1, label=f"mAP {mean_ap:.4f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("average precision")
    ax.set_title("average precision per class" + (f" (the {len(rows)} lowest)" if len(per_class) > len(rows) else ""))
    ax.invert_yaxis()
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    _save(fig, path)


def pr_curves(probs: torch.Tensor, targets: torch.Tensor, classes: list[str], path: Path) -> None:
    """Precision against recall per class, as the threshold falls: every class up to PR_CLASSES,
    else the PR_CLASSES with the lowest average precision."""
    from tl_dist.metrics import average_precision

    truth = targets >= 0.5
    ap = {c: average_precision(probs[:, c], truth[:, c]) for c in range(len(classes))}
    shown = sorted((c for c in ap if ap[c] is not None), key=lambda c: (ap[c], c))[:PR_CLASSES]
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.subplots()
    for c in shown:
        order = torch.argsort(probs[:, c], descending=True, stable=True)
        t = truth[order, c].double()
        tp, fp = torch.cumsum(t, 0), torch.cumsum(1.0 - t, 0)
        ax.plot((tp / tp[-1]).tolist(), (tp / (tp + fp)).tolist(), lw=1.5,
                label=f"{_short(classes[c])} (AP {ap[c]:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("precision-recall per class" + (" (lowest AP)" if len(shown) < sum(v is not None for v in ap.values())
                                                  else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    _save(fig, path)


def top_losses(items: list[tuple[torch.Tensor, str, bool]], path: Path) -> None:
    """fastai's plot_top_losses: the highest-loss images, wrong ones framed in red."""
    if items:
        grid(items, path)


def lr_find(lrs: list[float], losses: list[float], smoothed: list[float], steep: float, tenth: float | None,
            path: Path, diverged: bool = False) -> None:
    """The range test: loss against learning rate (log axis), raw and smoothed, the suggestions
    marked; the whole smoothed curve is shown, where it blows up too (a log loss axis when it spans
    more than 10x), and the raw loss is cut only above it."""
    fig = Figure(figsize=(7.5, 4.6), layout="constrained")
    ax = fig.subplots()
    top = max(smoothed)
    ax.plot(lrs, [min(v, 2 * top) for v in losses], color=TRAIN, alpha=0.3, lw=1, label="loss")
    ax.plot(lrs, smoothed, color=TRAIN, lw=2, label="smoothed")
    ax.axvline(steep, color=GREEN, ls="--", lw=1.2, label=f"suggested (valley): {steep:.2g}")
    if tenth is not None:
        ax.axvline(tenth, color=VAL, ls=":", lw=1.2, label=f"minimum / 10: {tenth:.2g}")
    if diverged:
        ax.axvline(lrs[-1], color=RED, lw=1, label=f"diverged: {lrs[-1]:.2g}")
    ax.set_xscale("log")
    if _spans_decades(smoothed):
        ax.set_yscale("log")
    ax.set_xlabel("learning rate (optim.lr)")
    ax.set_ylabel("train loss")
    ax.set_title("learning-rate range test")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    _save(fig, path)


def after_training(model, d, ctx, history: list[dict], confusion: torch.Tensor, out: Path, device,
                   best_epoch: int | None = None, steps: torch.Tensor | None = None) -> None:
    drawn(val_predictions, model, d.val, d.classes, ctx, device, out / "val_predictions.png")
    drawn(curves, history, out / "curves.png", best_epoch, steps)
    if confusion is not None:  # (one label per image; tl-dist evaluate draws a multi_label run's per-class AP)
        drawn(confusion_matrix, confusion, d.classes, out / "confusion_matrix.png")
