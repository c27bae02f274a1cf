"""Single-process predictor: a checkpoint (safetensors + its metadata) -> model + eval transform -> top-k.

    python -m tl_dist.predict IMG [IMG|DIR ...] [--checkpoint RUN_DIR|FILE] [--topk K] [--json]

Needs nothing but the checkpoint: no config file, no training code paths, no torch.distributed.
The checkpoint may also be a file from ``tl-dist export`` (.onnx, .pt, .pt2), run in its own runtime
with the same output. Nothing is unpickled. A .onnx file is data; .pt and .pt2 files are programs, run
only with ``--trust-code`` (see ``exported``). Exit codes: 0 all predicted, 1 some images failed, 2 bad
usage or checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

from .errors import UserError, drop_stdout, first_line, one_line, printable

DEFAULT_RUNS = Path("runs")
TRUST_HELP = ("run a TorchScript (.pt) or torch.export (.pt2) file: these are programs, and loading one runs the "
              "code inside it, so only for files from a source you trust. Without it they are refused; checkpoints "
              "and .onnx files are data and need no trust. A .pt2 with pickled parts is refused even so")


# torch and the model code are imported where they are used, so that --help and usage errors
# answer at once.


class Predictor:
    """``Predictor.from_checkpoint(path).predict([paths or PIL images])`` -> list of result dicts."""

    def __init__(self, model, meta: dict, device: str = "cpu", exported=None):
        # model: the eager nn.Module (a checkpoint); exported: an ExportedModel (a file from tl-dist export)
        self.model, self.meta, self.device, self.exported = model and model.eval(), meta, device, exported
        self.classes: list[str] = meta["classes"]

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", trust_code: bool = False) -> "Predictor":
        """A run directory, a .safetensors checkpoint, or an exported .onnx / .pt / .pt2 file
        (.pt / .pt2 are programs: only with ``trust_code=True``, the caller's word that it trusts
        the file's source)."""
        import torch

        from . import checkpoint
        from .exported import ExportedModel, format_of
        from .model import create, head_name, load_state

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise UserError("predict: --device cuda but no CUDA device is available; use --device cpu")
        if format_of(path) is not None:
            exported = ExportedModel.load(path, device, trust_code=trust_code)
            return cls(None, exported.meta, device, exported)
        state, meta = checkpoint.load_weights(checkpoint.resolve(path))  # metadata checked there
        model = create(meta["arch"], meta["num_classes"], meta.get("arch_kwargs", {}))
        try:
            if head_name(model) != checkpoint.head_of(meta):
                raise RuntimeError(f"its classifier is {head_name(model)}, the checkpoint's is {checkpoint.head_of(meta)}")
            load_state(model, state)
        except RuntimeError as e:
            raise UserError(f"checkpoint: {path}: weights do not match arch {meta['arch']!r}: "
                            f"{first_line(e)}") from None
        return cls(model.to(device), meta, device)

    def eval_tensor(self, item):
        """A path or PIL image as the model sees it: the checkpoint's eval transform, uint8 CHW."""
        from PIL import Image

        from .augment import eval_transform
        from .images import load_rgb, to_rgb

        img = to_rgb(item) if isinstance(item, Image.Image) else load_rgb(str(item))
        return eval_transform(img, self.meta["resize_size"], self.meta["image_size"],
                              self.meta.get("interpolation", "bilinear"))

    def predict(self, items: Iterable, topk: int | None = None, batch_size: int = 32) -> list[dict]:
        """One dict per item, in order: path, label, prob, topk [{label, prob}] -- or path, error."""
        import torch

        from .augment import normalize
        from .images import BadImage

        k = min(topk or 3, len(self.classes))
        items = list(items)
        results: list[dict | None] = [None] * len(items)
        ready: list[tuple[int, torch.Tensor]] = []

        def flush() -> None:
            if not ready:
                return
            x = torch.stack([t for _, t in ready])
            if self.exported is not None:
                probs = self.exported(x).float().softmax(1)
            else:
                x = normalize(x.to(self.device), self.meta["mean"], self.meta["std"], channels_last=False)
                with torch.inference_mode():
                    probs = self.model(x).float().softmax(1).cpu()
            for (i, _), p in zip(ready, probs):
                if not torch.isfinite(p).all():
                    results[i] = {"path": _name(items[i]), "error": f"{_name(items[i])}: the model's output is not "
                                  f"finite (damaged weights in the checkpoint?)"}
                    continue
                top = torch.topk(p, k)
                results[i] = {"path": _name(items[i]), "label": self.classes[int(top.indices[0])],
                              "prob": float(top.values[0]),
                              "topk": [{"label": self.classes[int(c)], "prob": float(v)}
                                       for v, c in zip(top.values, top.indices)]}
            ready.clear()

        for i, item in enumerate(items):
            try:
                ready.append((i, self.eval_tensor(item)))
            except BadImage as e:
                results[i] = {"path": _name(item), "error": str(e)}
            if len(ready) >= batch_size:
                flush()
        flush()
        return results  # type: ignore[return-value]


def _name(item) -> str:
    return str(item) if isinstance(item, (str, Path)) else f"<{type(item).__name__}>"


def expand(inputs: Sequence[str]) -> list[str]:
    """Files as given; directories listed for image files as the trainer lists its class folders."""
    from .images import list_images

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
    from .visualize import grid

    tiles = [(predictor.eval_tensor(r["path"]), f"predicted: {r['label']} ({r['prob']:.2f})", None)
             for r in results[:16] if "error" not in r]
    if not tiles:
        raise UserError(f"predict: --save-plot {path}: no image could be predicted, nothing to draw")
    grid(tiles, Path(path), cols=min(4, len(tiles)))


def print_table(results: list[dict], k: int) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    def cell(text: str) -> str:  # names from files: neither terminal escapes nor rich markup
        return escape(printable(text))

    t = Table()
    t.add_column("image", overflow="fold")
    t.add_column("predicted")
    t.add_column("prob", justify="right")
    if k > 1:
        t.add_column(f"top {k}")
    for r in results:
        if "error" in r:
            continue
        row = [cell(r["path"]), cell(r["label"]), f"{r['prob']:.3f}"]
        if k > 1:
            row.append(cell(", ".join(f"{e['label']} {e['prob']:.3f}" for e in r["topk"])))
        t.add_row(*row)
    # Piped output has no terminal width; keep whole paths on one line there.
    Console(width=None if sys.stdout.isatty() else 200).print(t)


def parse_args(argv: Sequence[str] | None, prog: str = "python -m tl_dist.predict") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog,
                                description="Predict image classes with a tl_dist checkpoint.")
    p.add_argument("images", nargs="+", help="image files and/or directories (walked for images)")
    p.add_argument("--checkpoint", "-c", help="run directory (uses its best.safetensors), a .safetensors "
                   "file, or a file from tl-dist export (.onnx, .pt, .pt2); default: the newest "
                   "runs/*/best.safetensors")
    p.add_argument("--topk", type=int, default=None, help="classes to show per image (default min(3, classes))")
    p.add_argument("--json", action="store_true", help="one JSON object per image on stdout, nothing else")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--save-plot", metavar="FILE.png", help="draw the images with their predicted class (an "
                   "existing file only if tl_dist drew it, or with --force)")
    p.add_argument("--force", action="store_true", help="let --save-plot replace a file tl_dist did not draw")
    p.add_argument("--trust-code", action="store_true", help=TRUST_HELP)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, prog: str = "python -m tl_dist.predict") -> int:
    args = parse_args(argv, prog)
    try:
        if args.topk is not None and args.topk < 1:
            raise UserError("predict: --topk must be 1 or more")
        if args.batch_size < 1:
            raise UserError("predict: --batch-size must be 1 or more")
        ckpt = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
        if not args.checkpoint and not args.json:
            print(f"using checkpoint {printable(ckpt)}", file=sys.stderr)
        if args.save_plot:
            if not Path(args.save_plot).parent.is_dir():
                raise UserError(f"predict: --save-plot {args.save_plot}: folder {Path(args.save_plot).parent} "
                                f"does not exist")
            from .outputs import refuse_foreign
            from .visualize import is_ours
            refuse_foreign([Path(args.save_plot)], is_ours, "predict", args.force)
        paths = expand(args.images)
        if not paths:
            raise UserError(f"predict: no image files found in {' '.join(args.images)}")
        predictor = Predictor.from_checkpoint(ckpt, device=args.device, trust_code=args.trust_code)
        k = min(args.topk or 3, len(predictor.classes))
        results = predictor.predict(paths, topk=k, batch_size=args.batch_size)
        failed = [r for r in results if "error" in r]
        try:
            if args.json:
                for r in results:
                    print(json.dumps(r, allow_nan=False))
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
