"""tl-dist predict: images -> the top-k classes of a checkpoint, as a table, JSON lines or CSV.

    python -m tl_dist.predict IMG [IMG|DIR ...] [--checkpoint RUN_DIR|FILE] [--topk K]
                              [--format table|json|csv] [--tta flip]

One process; needs nothing but the checkpoint (see ``tl_dist.predictor``). Exit codes: 0 all predicted, 1 some images failed, 2 bad
usage or checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from tl_dist.errors import UserError, drop_stdout, one_line, printable
from tl_dist.predictor import DEFAULT_RUNS, TRUST_HELP, Predictor


def expand(inputs: Sequence[str]) -> list[str]:
    """Files as given; directories listed for image files as the trainer lists its class folders."""
    from tl_dist.data.images import list_images

    out: list[str] = []
    for s in inputs:
        # a missing file is reported per image, not as a usage error
        out += list_images(s) if os.path.isdir(s) else [s]
    return out


def default_checkpoint() -> Path:
    found = sorted(DEFAULT_RUNS.glob("*/best.safetensors"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise UserError(f"predict: no --checkpoint given and no {DEFAULT_RUNS}/*/best.safetensors here; "
                        f"train first (python -m tl_dist.train --config configs/demo.yaml) or pass --checkpoint")
    return found[-1]


def save_plot(predictor: Predictor, results: list[dict], path: str) -> None:
    """The images as the model saw them (the checkpoint's val transform), captioned with the prediction."""
    from tl_dist.visualize import grid

    def caption(r: dict) -> str:
        if "labels" in r:  # several labels per image: every class at or past its threshold
            return "predicted: " + (", ".join(f"{e['label']} ({e['prob']:.2f})" for e in r["labels"]) or "(none)")
        return f"predicted: {r['label']} ({r['prob']:.2f})"
    tiles = [(predictor.eval_tensor(r["path"]), caption(r), None) for r in results[:16] if "error" not in r]
    if not tiles:
        raise UserError(f"predict: --save-plot {path}: no image could be predicted, nothing to draw")
    grid(tiles, Path(path), cols=min(4, len(tiles)))


def print_table(results: list[dict], k: int) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    def cell(text: str) -> str:  # names from files: neither terminal escapes nor rich markup
        return escape(printable(text))

    multi = any("labels" in r for r in results)
    t = Table()
    t.add_column("image", overflow="fold")
    if multi:  # several labels per image: the classes at or past their thresholds
        t.add_column("predicted labels")
    else:
        t.add_column("predicted")
        t.add_column("prob", justify="right")
    if k > 1:
        t.add_column(f"top {k}")
    for r in results:
        if "error" in r:
            continue
        if multi:
            row = [cell(r["path"]), cell(", ".join(f"{e['label']} {e['prob']:.3f}" for e in r["labels"]) or "(none)")]
        else:
            row = [cell(r["path"]), cell(r["label"]), f"{r['prob']:.3f}"]
        if k > 1:
            row.append(cell(", ".join(f"{e['label']} {e['prob']:.3f}" for e in r["topk"])))
        t.add_row(*row)
    # Piped output has no terminal width; keep whole paths on one line there.
    Console(width=None if sys.stdout.isatty() else 200).print(t)
    print(class_counts(results), flush=True)


def class_counts(results: list[dict]) -> str:
    """How many images each class was predicted for (several labels per image: each label counts)."""
    from collections import Counter

    done = [r for r in results if "error" not in r]
    counts = Counter(e["label"] for r in done for e in (r["labels"] if "labels" in r else [r]))
    per_class = ", ".join(f"{printable(c)} {n}" for c, n in sorted(counts.items(), key=lambda cn: (-cn[1], cn[0])))
    return f"predicted for {len(done)} image(s): {per_class or 'nothing'}"


def write_csv(results: list[dict], k: int) -> None:
    """One row per image: path, label, prob, the top k (label, prob) pairs, labels (multi_label:
    every class at or past its threshold, ';'-separated), error (empty when it was predicted)."""
    import csv

    w = csv.writer(sys.stdout, lineterminator="\n")
    w.writerow(["path", "label", "prob", *[f"top{i}_{f}" for i in range(1, k + 1) for f in ("label", "prob")],
                "labels", "error"])
    for r in results:
        if "error" in r:
            w.writerow([r["path"], "", "", *[""] * (2 * k), "", r["error"]])
            continue
        top = [v for e in r["topk"] for v in (e["label"], f"{e['prob']:.6f}")]
        labels = ";".join(e["label"] for e in r["labels"]) if "labels" in r else ""
        w.writerow([r["path"], r["label"], f"{r['prob']:.6f}", *top, *[""] * (2 * k - len(top)), labels, ""])


def parse_args(argv: Sequence[str] | None, prog: str = "python -m tl_dist.predict") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog,
                                description="Predict image classes with a tl_dist checkpoint.")
    p.add_argument("images", nargs="+", help="image files and/or directories (walked for images)")
    p.add_argument("--checkpoint", "-c", help="run directory (uses its best.safetensors), a .safetensors "
                   "file, or a file from tl-dist export (.onnx, .pt, .pt2); default: the newest "
                   "runs/*/best.safetensors")
    p.add_argument("--topk", type=int, default=None, help="classes to show per image (default min(3, classes))")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table", help="table (default), json (one "
                   "object per image on stdout, nothing else) or csv (a header, then one row per image)")
    p.add_argument("--json", action="store_true", help="the same as --format json")
    p.add_argument("--tta", choices=["flip"], help="score the mean logits of each image and its mirror")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--save-plot", metavar="FILE.png", help="draw the images with their predicted class (an "
                   "existing file only if tl_dist drew it, or with --force)")
    p.add_argument("--force", action="store_true", help="let --save-plot replace a file tl_dist did not draw")
    p.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    p.add_argument("--thresholds", help="multi_label: per-class thresholds from tl-dist evaluate --tune-thresholds "
                   "(default: the checkpoint's train.threshold for every class)")
    args = p.parse_args(argv)
    if args.json:
        args.format = "json"
    return args


def main(argv: Sequence[str] | None = None, prog: str = "python -m tl_dist.predict") -> int:
    args = parse_args(argv, prog)
    try:
        if args.topk is not None and args.topk < 1:
            raise UserError("predict: --topk must be 1 or more")
        if args.batch_size < 1:
            raise UserError("predict: --batch-size must be 1 or more")
        ckpt = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
        if not args.checkpoint:  # (stderr: JSON and CSV on stdout stay clean)
            print(f"using checkpoint {printable(ckpt)}", file=sys.stderr)
        if args.save_plot:
            if not Path(args.save_plot).parent.is_dir():
                raise UserError(f"predict: --save-plot {args.save_plot}: folder {Path(args.save_plot).parent} "
                                f"does not exist")
            from tl_dist.files.outputs import refuse_foreign
            from tl_dist.visualize import is_ours
            refuse_foreign([Path(args.save_plot)], is_ours, "predict", args.force)
        paths = expand(args.images)
        if not paths:
            raise UserError(f"predict: no image files found in {' '.join(args.images)}")
        predictor = Predictor.from_checkpoint(ckpt, device=args.device, trust_code=args.trust_code)
        if args.thresholds:
            predictor.use_thresholds(args.thresholds)
        k = min(args.topk or 3, len(predictor.classes))
        results = predictor.predict(paths, topk=k, batch_size=args.batch_size, tta=args.tta == "flip")
        failed = [r for r in results if "error" in r]
        try:
            if args.format == "json":
                for r in results:
                    print(json.dumps(r, allow_nan=False))
            elif args.format == "csv":
                write_csv(results, k)
            else:
                for r in failed:
                    print(f"error: {one_line(r['error'])}", file=sys.stderr)
                if len(failed) < len(results):
                    print_table(results, k)
            sys.stdout.flush()
        except BrokenPipeError:
            drop_stdout()  # the reader left (predict ... | head -1) with what it wanted: say nothing
            return 0
        except OSError as e:
            drop_stdout()
            raise UserError(f"predict: writing the results failed: {e.strerror}") from None
        if args.save_plot:
            save_plot(predictor, results, args.save_plot)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
