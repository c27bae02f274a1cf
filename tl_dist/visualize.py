"""The tutorial's pictures as PNG files, drawn with Pillow (no display, no plotting dependency):
a training batch, val predictions, loss/accuracy curves and the confusion matrix.
"""
from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .augment import normalize
from .data import ImageDataset, epoch_order

TILE = 224
WHITE, BLACK, GREY = (255, 255, 255), (20, 20, 20), (150, 150, 150)
GREEN, RED, BLUE, ORANGE = (30, 140, 60), (200, 40, 40), (40, 90, 200), (230, 120, 20)


def font(size: int = 14) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def tile(img: torch.Tensor) -> Image.Image:
    """uint8 CHW -> PIL, scaled to the tile size."""
    return Image.fromarray(img.permute(1, 2, 0).numpy()).resize((TILE, TILE))


def grid(tiles: list[tuple[Image.Image, str, tuple]], path: Path, cols: int = 4) -> None:
    """Tiles with a caption line under each; caption colour per tile."""
    rows = (len(tiles) + cols - 1) // cols
    cap = 22
    canvas = Image.new("RGB", (cols * (TILE + 8) + 8, rows * (TILE + cap + 8) + 8), WHITE)
    d = ImageDraw.Draw(canvas)
    f = font(14)
    for k, (im, text, colour) in enumerate(tiles):
        x, y = 8 + (k % cols) * (TILE + 8), 8 + (k // cols) * (TILE + cap + 8)
        canvas.paste(im, (x, y))
        if colour == RED:
            d.rectangle([x - 3, y - 3, x + TILE + 2, y + TILE + 2], outline=RED, width=3)
        d.text((x, y + TILE + 4), text, fill=colour, font=f)
    canvas.save(path)


def train_batch(ds: ImageDataset, classes: list[str], path: Path, seed: int, n: int = 8) -> None:
    """The first augmented samples of epoch 0, as the tutorial's "visualize a few images" shows them."""
    tiles = []
    for i in epoch_order(len(ds), seed, 0)[:n]:
        img, label, _, _ = ds[(i, 0, 1.0)]
        tiles.append((tile(img), classes[label], BLACK))
    grid(tiles, path)


@torch.inference_mode()
def val_predictions(model, ds: ImageDataset, classes: list[str], ctx, device, path: Path, n: int = 8) -> None:
    """The tutorial's visualize_model: val images with predicted and true class; wrong ones in red."""
    idx = [i for i in range(0, len(ds), max(1, len(ds) // n))][:n]
    items = [ds[(i, 0, 1.0)] for i in idx]
    x = normalize(torch.stack([it[0] for it in items]).to(device), ctx.mean, ctx.std, ctx.channels_last)
    model.eval()
    pred = model(x).float().softmax(1).cpu()
    tiles = []
    for (img, label, _, _), p in zip(items, pred):
        k = int(p.argmax())
        ok = k == label
        tiles.append((tile(img), f"pred: {classes[k]} ({p[k]:.2f}) true: {classes[label]}", GREEN if ok else RED))
    grid(tiles, path)


def _plot(d: ImageDraw.ImageDraw, box: tuple[int, int, int, int], series: list[tuple[str, list[float], tuple]],
          title: str, f) -> None:
    x0, y0, x1, y1 = box
    values = [v for _, s, _ in series for v in s]
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    d.rectangle(box, outline=GREY)
    d.text((x0, y0 - 20), title, fill=BLACK, font=f)
    d.text((x0 - 52, y0), f"{hi:.3f}", fill=GREY, font=f)
    d.text((x0 - 52, y1 - 14), f"{lo:.3f}", fill=GREY, font=f)
    n = max(len(s) for _, s, _ in series)
    for k, (name, s, colour) in enumerate(series):
        pts = [(x0 + (x1 - x0) * (i / max(1, n - 1)), y1 - (y1 - y0) * (v - lo) / (hi - lo)) for i, v in enumerate(s)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for px, py in pts:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        d.text((x1 - 90, y0 + 6 + 16 * k), name, fill=colour, font=f)
    d.text((x0, y1 + 4), "epoch 0", fill=GREY, font=f)
    d.text((x1 - 60, y1 + 4), f"epoch {n - 1}", fill=GREY, font=f)


def curves(history: list[dict], path: Path) -> None:
    img = Image.new("RGB", (1000, 420), WHITE)
    d = ImageDraw.Draw(img)
    f = font(14)
    _plot(d, (70, 40, 480, 370), [("train", [r["train_loss"] for r in history], BLUE),
                                  ("val", [r["val_loss"] for r in history], ORANGE)], "loss", f)
    _plot(d, (570, 40, 980, 370), [("train", [r["train_acc"] for r in history], BLUE),
                                   ("val", [r["val_acc"] for r in history], ORANGE)], "accuracy", f)
    img.save(path)


def confusion_matrix(cm: torch.Tensor, classes: list[str], path: Path) -> None:
    c = len(classes)
    cell = max(28, min(90, 700 // c))
    left, top = 150, 60
    img = Image.new("RGB", (left + c * cell + 20, top + c * cell + 40), WHITE)
    d = ImageDraw.Draw(img)
    f = font(12)
    d.text((left, 8), "confusion matrix (rows: true, columns: predicted)", fill=BLACK, font=f)
    peak = max(1, int(cm.max()))
    for t in range(c):
        d.text((8, top + t * cell + cell // 2 - 7), classes[t][:18], fill=BLACK, font=f)
        d.text((left + t * cell + 2, top - 20), classes[t][:max(3, cell // 8)], fill=BLACK, font=f)
        for p in range(c):
            v = int(cm[t, p])
            shade = int(255 - 200 * v / peak)
            box = [left + p * cell, top + t * cell, left + (p + 1) * cell - 1, top + (t + 1) * cell - 1]
            d.rectangle(box, fill=(shade, shade, 255) if t == p else (255, shade, shade), outline=GREY)
            d.text((box[0] + 4, box[1] + cell // 2 - 7), str(v), fill=BLACK, font=f)
    img.save(path)


def after_training(model, d, ctx, history: list[dict], confusion: torch.Tensor, out: Path, device) -> None:
    val_predictions(model, d.val, d.classes, ctx, device, out / "val_predictions.png")
    curves(history, out / "curves.png")
    confusion_matrix(confusion, d.classes, out / "confusion_matrix.png")
