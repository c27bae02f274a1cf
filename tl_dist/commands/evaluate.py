"""tl-dist evaluate DATA_DIR --checkpoint RUN: a trained model measured on a labelled folder.

DATA_DIR is an ImageFolder split (DATA_DIR/<class>/<image>) or a root holding one (DATA_DIR/test/,
or --split NAME). Its class folders must be classes of the checkpoint (a subset is fine). Writes,
into --out (default RUN/eval_<split>): metrics.json (accuracy, top-k, loss, per-class precision /
recall / F1 / support, macro and weighted averages, the confusion matrix, the expected calibration
error over 15 bins), predictions.csv, confusion_matrix.png, reliability.png and top_losses.png.
``--tta flip`` also scores the mean of each image's and its mirror's logits.

One process, or several under ``accelerate launch`` for large sets: images are cut into global
batches in file order and each rank takes a contiguous block of them, so every image is counted once
and computed in the same batch whatever the world size (identical metrics.json for 1 and N processes
on one kind of device). With the run's own eval batch size on its val folder, fp32, it reproduces
the run's val_acc and val_loss exactly.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from tl_dist.errors import UserError, first_few, one_line, printable
from tl_dist.predictor import TRUST_HELP


ECE_BINS = 15


# ----------------------------------------------------------------------------- metrics (pure)

def classification_metrics(logits, labels, classes: list[str], batch: int = 64, top_k: int = 5) -> dict:
    from tl_dist.metrics import class_scores, most_confused, per_class

    """Every number evaluate reports, from the logits (float, N x C) and true labels (N,).

    The loss is summed per ``batch`` (the batches the logits were computed in) in float32 and
    accumulated in float64, as the trainer's evaluation does: the same logits, the same loss."""
    import torch

    logits, labels = logits.float(), labels.long()
    n, c = logits.shape
    _, pred = logits.softmax(1).max(1)
    confusion = torch.bincount(labels * c + pred, minlength=c * c).reshape(c, c)
    k = min(top_k, c)
    topk = logits.topk(k, 1).indices.eq(labels[:, None]).any(1).double().mean().item()
    precision, recall, f1, support = class_scores(confusion)
    present = support > 0  # classes of the checkpoint this folder has
    weights = support / support.sum()

    def avg(v, w):
        return float((v * w).sum() / w.sum())
    correct = pred.eq(labels).double()
    ece = sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in reliability_bins(logits, labels)
              if b["count"])
    return {
        "n": n, "accuracy": correct.mean().item(), f"top{k}_accuracy": topk,
        "loss": loss_of(logits, labels, batch) / max(1, n),
        "ece": ece,
        "per_class": per_class(confusion, classes),
        "macro_avg": {m: avg(v, present.double()) for m, v in (("precision", precision), ("recall", recall),
                                                                ("f1", f1))},
        "weighted_avg": {m: avg(v, weights) for m, v in (("precision", precision), ("recall", recall), ("f1", f1))},
        "confusion_matrix": confusion.tolist(),
        "most_confused": most_confused(confusion, classes),
    }


def loss_of(logits, labels, batch: int) -> float:
    """Summed cross-entropy: float32 per batch, accumulated in float64 (the trainer's arithmetic)."""
    import torch
    import torch.nn.functional as F

    total = torch.zeros((), dtype=torch.float64)
    for s in range(0, len(labels), batch):
        total += F.cross_entropy(logits[s:s + batch], labels[s:s + batch], reduction="sum")
    return total.item()


def reliability_bins(logits, labels) -> list[dict]:
    """Images binned by confidence (top class probability; the first bin includes 0): how many,
    their accuracy and mean confidence. The calibration error and diagram both read these."""
    conf, pred = logits.float().softmax(1).max(1)
    out = []
    for b in range(ECE_BINS):
        lo, hi = b / ECE_BINS, (b + 1) / ECE_BINS
        inside = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        count = int(inside.sum())
        out.append({"lo": lo, "hi": hi, "count": count,
                    "accuracy": float(pred[inside].eq(labels[inside]).double().mean()) if count else None,
                    "confidence": float(conf[inside].double().mean()) if count else None})
    return out


# ----------------------------------------------------------------------------- data

def find_split(data_dir: Path, split: str | None) -> Path:
    """DATA_DIR/<split>; without --split, DATA_DIR/test if it is there, else DATA_DIR itself (a split
    folder of class folders)."""
    if not data_dir.is_dir():
        raise UserError(f"evaluate: data folder not found: {data_dir}")
    if split is None:
        return data_dir / "test" if (data_dir / "test").is_dir() else data_dir
    if not (data_dir / split).is_dir():
        there = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise UserError(f"evaluate: --split {split}: no folder {data_dir / split}; {data_dir} holds "
                        f"{first_few(there, 8) if there else 'no folders'}")
    return data_dir / split


OUTPUTS = ("metrics.json", "predictions.csv", "confusion_matrix.png", "reliability.png", "top_losses.png",
           "ap_per_class.png", "pr_curves.png", "thresholds.json")  # (the last three: multi_label)


def check_out(out: Path, force: bool) -> None:
    """--out can take the results, and holds nothing they would replace that evaluate did not write."""
    from tl_dist import visualize
    from tl_dist.files.outputs import check_writable, refuse_foreign

    if out.exists() and not out.is_dir():
        raise UserError(f"evaluate: --out {out} is a file; give a folder (new, or one an earlier evaluate wrote)")
    check_writable(out, "evaluate", "--out")
    earlier = _is_metrics(out / "metrics.json")  # an earlier evaluation's folder: its pictures are ours

    def ours(p: Path) -> bool:
        if p.name == "metrics.json":
            return earlier
        if p.name == "thresholds.json":
            from tl_dist.files.outputs import json_object
            from tl_dist.predictor import THRESHOLDS_FORMAT
            return (json_object(p) or {}).get("format") == THRESHOLDS_FORMAT
        if p.name == "predictions.csv":
            try:
                with open(p, encoding="utf-8") as f:
                    return f.readline().startswith("path,true,predicted")
            except (OSError, UnicodeDecodeError):
                return False
        return earlier or visualize.is_ours(p)
    refuse_foreign([out / name for name in OUTPUTS], ours, "evaluate", force)


def _is_metrics(path: Path) -> bool:
    from tl_dist.files.outputs import json_object

    keys = set(json_object(path) or {})
    return {"checkpoint", "n"} <= keys and ({"accuracy", "confusion_matrix"} <= keys or {"map", "exact_match"} <= keys)


def list_labelled(folder: Path, classes: list[str]) -> list[tuple[str, int]]:
    """(path, checkpoint class index) for every image under folder/<class>/; unknown classes refused."""
    from tl_dist.data.listing import list_split

    found, samples = list_split(folder.parent, folder.name)
    unknown = [c for c in found if c not in classes]
    if unknown:
        names = ("val", "valid", "validation", "test", "train")  # (the one to name first, first)
        splits = sorted((c for c in unknown if c.lower() in names), key=lambda c: names.index(c.lower()))
        hint = (f"; {folder} looks like a data root with no test/ split: pass --split {splits[0]} to measure its "
                f"{splits[0]} images" if splits else "")
        raise UserError(f"evaluate: class folder(s) under {folder} the checkpoint does not know: "
                        f"{first_few(unknown, 5)}; its classes: {first_few(classes, 10)}{hint}")
    index = {c: classes.index(c) for c in found}
    return [(path, index[found[ci]]) for path, ci in samples]


def logits_for(predictor, paths: list[str], indices: range, batch: int, flip: bool, channels_last: bool,
               load=None):
    """(logits, mirrored-image logits or None) for ``paths[indices]``, batch by batch, in the memory
    format the run evaluated in (other convolution kernels would change the last bits). An exported
    file runs in its own runtime, on the same images. ``load``: a sample's image by its name where
    the samples are not files (shards, a dataset's rows)."""
    import torch

    from tl_dist.data.augment import normalize

    if channels_last and predictor.exported is None:
        predictor.model.to(memory_format=torch.channels_last)

    def forward(images):
        if predictor.exported is not None:
            return predictor.exported(images)
        x = normalize(images.to(predictor.device), predictor.meta["mean"], predictor.meta["std"],
                      channels_last=channels_last)
        with torch.inference_mode():
            return predictor.model(x).float().cpu()

    plain, mirrored = [], []
    with ThreadPoolExecutor(8) as pool:
        for s in range(indices.start, indices.stop, batch):
            images = torch.stack(list(pool.map(lambda p: predictor.eval_tensor(load(p) if load else p),
                                               paths[s:min(s + batch, indices.stop)])))
            plain.append(forward(images))
            if flip:
                mirrored.append(forward(images.flip(-1)))
    empty = torch.zeros(0, len(predictor.classes))
    return (torch.cat(plain) if plain else empty), ((torch.cat(mirrored) if mirrored else empty) if flip else None)


# The data keys that decide a run's parts: evaluate rebuilds them from the checkpoint's config.
PART_KEYS = ("format", "train_shards", "val_shards", "test_shards", "image_column", "val_split", "test_split",
             "split_seed", "labels", "path_column", "label_column", "split_column", "classes", "label_delimiter")


def run_data_set(ckpt: Path, meta: dict, data_dir: Path):
    """The run's own parts under ``data_dir``, for a run whose parts were drawn (data.val_split: the
    split.json beside the checkpoint) or listed in a labels file; None for train/ and val/ folders."""
    from tl_dist import config
    from tl_dist.data import listing, splits
    from tl_dist.files import run_dir

    run = meta.get("config", {}).get("data", {}) if isinstance(meta.get("config"), dict) else {}
    if not isinstance(run, dict) or not (run.get("labels") or run.get("val_split")
                                         or run.get("format", "files") != "files"):
        return None
    cfg = config.Config()
    for key in PART_KEYS:
        if key in run:
            config.set_key(cfg, f"data.{key}", run[key], f"{ckpt}'s config")
    cfg.data.root = str(data_dir)
    recorded = None
    if "split" in meta:
        recorded = run_dir.read_split(ckpt.parent)
        if recorded is None:
            raise UserError(f"evaluate: {ckpt} was trained on parts drawn by data.val_split, recorded in the run's "
                            f"split.json, which is not in {ckpt.parent}; copy it there beside the checkpoint")
        if splits.summary(recorded) != meta["split"]:
            raise UserError(f"evaluate: {ckpt.parent / 'split.json'} is not the split {ckpt.name} was trained on "
                            f"(its parts' hashes differ); use the run directory the checkpoint came from")
    return listing.list_data(cfg.data, recorded)


def run_part(data, part: str, classes: list[str], ckpt: Path) -> list[tuple[str, int]]:
    """``part`` of the run's data, as (path, checkpoint class index)."""
    if part not in ("train", "val", "test"):
        raise UserError(f"evaluate: --split {part}: this run's parts are train, val{', test' if data.test else ''}")
    samples = getattr(data, part)
    if not samples:
        raise UserError(f"evaluate: --split {part}: the run has no {part} part (data.test_split was 0); "
                        f"use --split val")
    if data.classes != classes:
        raise UserError(f"evaluate: the data's classes ({first_few(data.classes, 6)}) are not {ckpt}'s "
                        f"({first_few(classes, 6)}); evaluate on the data the run was trained on")
    return samples


# ----------------------------------------------------------------------------- outputs

def write_outputs(out: Path, metrics: dict, paths: list[str], labels, logits, classes: list[str],
                  predictor, tta: dict | None, load=None) -> None:
    from tl_dist.files import atomic
    from tl_dist import visualize

    out.mkdir(parents=True, exist_ok=True)
    atomic.atomic_write_text(out / "metrics.json", json.dumps({**metrics, **({"tta_flip": tta} if tta else {})},
                                                                  indent=2, allow_nan=False) + "\n")
    probs = logits.softmax(1)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "true", "predicted", *[f"p_{c}" for c in classes]])
    for p, y, row in zip(paths, labels.tolist(), probs.tolist()):
        w.writerow([p, classes[y], classes[max(range(len(row)), key=row.__getitem__)], *[f"{v:.6f}" for v in row]])
    atomic.atomic_write_text(out / "predictions.csv", buf.getvalue())
    import torch
    visualize.drawn(visualize.confusion_matrix, torch.tensor(metrics["confusion_matrix"]), classes,
                    out / "confusion_matrix.png")
    visualize.drawn(visualize.reliability, reliability_bins(logits, labels), metrics["ece"], out / "reliability.png")
    def top_losses_png(path: Path) -> None:
        visualize.top_losses(top_losses(paths, labels, logits, classes, predictor, load=load), path)
    visualize.drawn(top_losses_png, out / "top_losses.png")


def top_losses(paths, labels, logits, classes, predictor, most: int = 16, least: int = 8, load=None) -> list:
    """The images the model is most confidently wrong about (fastai's plot_top_losses), highest loss
    first, up to ``most``; with fewer than ``least`` wrong, the highest-loss right ones fill up to it."""
    import torch.nn.functional as F

    losses = F.cross_entropy(logits, labels, reduction="none")
    probs = logits.softmax(1)
    order = losses.argsort(descending=True).tolist()
    wrong = [i for i in order if int(probs[i].argmax()) != int(labels[i])][:most]
    chosen = wrong + [i for i in order if i not in set(wrong)][:max(0, least - len(wrong))]
    items = []
    for i in chosen:
        k = int(probs[i].argmax())
        image = predictor.eval_tensor(load(paths[i]) if load else paths[i])
        items.append((image, f"{Path(paths[i]).name}\ntrue: {classes[labels[i]]}\n"
                      f"pred: {classes[k]} ({probs[i, k]:.2f}), loss {max(0.0, float(losses[i])):.2f}",
                      k == int(labels[i])))
    return items


def summary(metrics: dict, tta: dict | None, out: Path) -> None:
    from rich.console import Console

    from tl_dist.metrics import confused_line
    from rich.markup import escape
    from rich.table import Table

    k = next(key for key in metrics if key.startswith("top") and key.endswith("_accuracy"))
    t = Table(title=f"{metrics['n']} images: accuracy {metrics['accuracy']:.4f}, {k.replace('_', ' ')} "
                    f"{metrics[k]:.4f}, loss {metrics['loss']:.4f}, ECE {metrics['ece']:.4f}"
                    + (f"; with flip TTA accuracy {tta['accuracy']:.4f}" if tta else ""))
    for col in ("class", "precision", "recall", "f1", "support"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for r in metrics["per_class"]:
        t.add_row(escape(printable(r["class"])), f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}",
                  str(r["support"]))
    for name in ("macro_avg", "weighted_avg"):
        a = metrics[name]
        t.add_row(name.replace("_", " "), f"{a['precision']:.4f}", f"{a['recall']:.4f}", f"{a['f1']:.4f}",
                  str(metrics["n"]))
    Console().print(t)
    print(f"most confused (true -> predicted, images): {printable(confused_line(metrics['most_confused']))}")
    print(f"written: {printable(out)}/metrics.json, predictions.csv, confusion_matrix.png, reliability.png, "
          f"top_losses.png", flush=True)


# ----------------------------------------------------------------------------- command line

def parse_args(argv: Sequence[str], prog: str = "tl-dist evaluate") -> argparse.Namespace:
    """The command line's options (the Python API builds its call through here too)."""
    p = argparse.ArgumentParser(prog=prog, description="Measure a checkpoint on a labelled ImageFolder split.")
    p.add_argument("data_dir", help="a split folder (class sub-folders) or a root holding --split")
    p.add_argument("--checkpoint", "-c", required=True, help="run directory (its best.safetensors), a .safetensors, "
                   "or a file from tl-dist export (.onnx; .pt / .pt2 with --trust-code)")
    p.add_argument("--split", help="sub-folder of DATA_DIR to use (default: test when DATA_DIR has one, else "
                   "DATA_DIR itself)")
    p.add_argument("--out", help="folder for the results (default RUN/eval_<split folder name>)")
    p.add_argument("--force", action="store_true", help="replace files in --out that an earlier evaluate did not write")
    p.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    p.add_argument("--json", action="store_true", help="print metrics.json instead of the table")
    p.add_argument("--tta", choices=["flip"], help="also score the mean logits of each image and its mirror")
    p.add_argument("--thresholds", help="multi_label: per-class thresholds from an earlier --tune-thresholds")
    p.add_argument("--tune-thresholds", action="store_true", help="multi_label: write thresholds.json, per class "
                   "the best F1 on these images (the metrics reported stay at the thresholds given)")
    p.add_argument("--batch-size", type=int, help="images per forward pass (default: the run's eval batch)")
    p.add_argument("--skip-bad-images", action="store_true", help="leave unreadable images out with a warning")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return p.parse_args(list(argv))


def main(argv: Sequence[str] | None = None, prog: str = "tl-dist evaluate") -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv, prog)
    try:
        _evaluate(args)
        return 0
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank meets the same bad input; one says so
            print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code


def _evaluate(args, quiet: bool = False) -> dict | None:
    """The evaluation ``args`` describe: its files in the out folder; the metrics (what
    metrics.json holds) on rank 0, None on the others. ``quiet``: nothing printed (the Python API)."""
    import torch

    from tl_dist.files import checkpoint
    from tl_dist import distributed
    from tl_dist.config import ModelConfig
    from tl_dist.files.exported import format_of
    from tl_dist.data.images import FILES, screen_files
    from tl_dist.models.backbones import uses_channels_last
    from tl_dist.predictor import Predictor
    from tl_dist.data import targets
    from tl_dist.data.samplers import eval_batch_size, eval_shard

    ckpt = Path(args.checkpoint).expanduser() if format_of(args.checkpoint) else checkpoint.locate(args.checkpoint)
    data_dir = Path(args.data_dir).expanduser()
    # A run whose parts came from data.val_split or a labels file is evaluated on those parts.
    run_data = None if format_of(ckpt) else run_data_set(ckpt, checkpoint.read_metadata(ckpt), data_dir)
    if run_data is not None:
        part = args.split or ("test" if run_data.test else "val")
        folder = data_dir / part  # (names the default --out; the images come from the run's parts)
        described = f"{data_dir} ({part} part: {run_data.layout})"
    else:
        folder = find_split(data_dir, args.split)
        described = str(folder)
    out = Path(args.out).expanduser() if args.out else ckpt.parent / f"eval_{folder.name}"
    check_out(out, args.force)  # before any work: a place that cannot take the results fails now
    acc = distributed.plain_accelerator(cuda=args.device != "cpu" and torch.cuda.is_available())
    device = "cuda" if acc.device.type == "cuda" else "cpu"
    predictor = Predictor.from_checkpoint(ckpt, device=str(acc.device) if device == "cuda" else "cpu",
                                          trust_code=args.trust_code)
    if args.thresholds:
        predictor.use_thresholds(args.thresholds)
    classes = predictor.classes
    samples = list_labelled(folder, classes) if run_data is None else run_part(run_data, part, classes, ckpt)
    lines = run_data.line_numbers if run_data is not None and run_data.rows is not None else None
    reader = run_data.reader if run_data is not None else FILES
    load = reader.load if reader is not FILES else None
    report = distributed.on_main_then_share(acc, lambda: screen_files(
        [s for s, _ in samples], str(folder), args.skip_bad_images, "pass --skip-bad-images",
        lambda line: print(printable(line), file=sys.stderr), who="evaluate", lines=lines,
        reader=reader))  # (rank 0 scans and says)
    samples = [s for s in samples if s[0] not in report.bad]
    cfg = predictor.meta.get("config", {}).get("data", {})
    batch = args.batch_size or eval_batch_size(cfg.get("eval_batch_size"), cfg.get("batch_size", 4))
    if batch < 1:
        raise UserError("evaluate: --batch-size must be 1 or more")
    paths = [s for s, _ in samples]
    if predictor.multi_label:  # multi-hot rows (a folder's one class per image is a set of one)
        labels = targets.batch([y if isinstance(y, tuple) else (y,) for _, y in samples], len(classes))
    else:
        labels = torch.tensor([y for _, y in samples])
    mine = eval_shard(len(paths), batch, acc.num_processes, acc.process_index)
    run_model = predictor.meta.get("config", {}).get("model", {})
    channels_last = bool(run_model.get("channels_last")) and uses_channels_last(
        ModelConfig(arch=predictor.meta["arch"], channels_last=True))
    part = logits_for(predictor, paths, mine, batch, flip=args.tta == "flip", channels_last=channels_last, load=load)
    parts = distributed.gather_objects(acc, part)
    if not acc.is_main_process:
        return None
    logits = torch.cat([a for a, _ in parts])
    if predictor.multi_label:
        from tl_dist.commands import evaluate_multi_label
        metrics = evaluate_multi_label.finish(args, {"checkpoint": str(ckpt), "data": described, "batch_size": batch},
                                              paths, labels, logits, torch.cat([b for _, b in parts]) if args.tta
                                              else None, predictor, out)
        if args.json:
            print(json.dumps(metrics, allow_nan=False))
        elif not quiet:
            evaluate_multi_label.summary(metrics, out)
        return metrics
    if args.tune_thresholds:
        raise UserError("evaluate: --tune-thresholds applies to multi_label checkpoints (a class per threshold); "
                        "this one is single_label")
    metrics = {"checkpoint": str(ckpt), "data": described, "batch_size": batch,
               **classification_metrics(logits, labels, classes, batch)}
    tta = None
    if args.tta:
        tta = classification_metrics((logits + torch.cat([b for _, b in parts])) / 2, labels, classes, batch)
        tta.pop("per_class")
    write_outputs(out, metrics, paths, labels, logits, classes, predictor, tta, load=load)
    written = {**metrics, **({"tta_flip": tta} if tta else {})}
    if args.json:
        print(json.dumps(written, allow_nan=False))
    elif not quiet:
        summary(metrics, tta, out)
    return written


if __name__ == "__main__":
    sys.exit(main())
