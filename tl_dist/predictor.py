"""The single-process predictor: a checkpoint (safetensors + its metadata) -> model + eval transform -> top-k.

Needs nothing but the checkpoint: no config file, no training code paths, no torch.distributed.
The checkpoint may also be a file from ``tl-dist export`` (.onnx, .pt, .pt2), run in its own runtime
with the same output. Nothing is unpickled. A .onnx file is data; .pt and .pt2 files are programs, run
only with ``trust_code=True`` (see ``files.exported``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tl_dist.errors import UserError, first_line


DEFAULT_RUNS = Path("runs")
THRESHOLDS_FORMAT = "tl_dist-thresholds/1"
TRUST_HELP = ("run a TorchScript (.pt) or torch.export (.pt2) file: these are programs, and loading one runs the "
              "code inside it, so only for files from a source you trust. Without it they are refused; checkpoints "
              "and .onnx files are data and need no trust. A .pt2 with pickled parts is refused even so")

# torch and the model code are imported where they are used, so that the commands' --help and usage
# errors answer at once.


class Predictor:
    """``Predictor.from_checkpoint(path).predict([paths or PIL images])`` -> list of result dicts."""

    def __init__(self, model, meta: dict, device: str = "cpu", exported=None):
        # model: the eager nn.Module (a checkpoint); exported: an ExportedModel (a file from tl-dist export)
        self.model, self.meta, self.device, self.exported = model and model.eval(), meta, device, exported
        self.classes: list[str] = meta["classes"]
        self.multi_label = meta.get("task") == "multi_label"
        # multi_label: per class, the probability from which it is predicted (use_thresholds may tune them)
        self.thresholds: list[float] = (list(meta["thresholds"]) if "thresholds" in meta  # (an export's, checked)
                                        else [float(meta.get("threshold", 0.5))] * len(self.classes))

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", trust_code: bool = False) -> "Predictor":
        """A run directory, a .safetensors checkpoint, or an exported .onnx / .pt / .pt2 file
        (.pt / .pt2 are programs: only with ``trust_code=True``, the caller's word that it trusts
        the file's source)."""
        import torch

        from tl_dist.files import checkpoint
        from tl_dist.files.exported import ExportedModel, format_of
        from tl_dist.models.backbones import create
        from tl_dist.models.heads import head_name
        from tl_dist.models.pretrained import load_state

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and not torch.cuda.is_available():
            raise UserError("predict: --device cuda but no CUDA device is available; use --device cpu")
        if format_of(path) is not None:
            exported = ExportedModel.load(path, device, trust_code=trust_code)
            return cls(None, exported.meta, device, exported)
        state, meta = checkpoint.load_weights(checkpoint.locate(path))  # metadata checked there
        model = create(meta["arch"], meta["num_classes"], meta.get("arch_kwargs", {}))
        try:
            if head_name(model) != checkpoint.head_of(meta):
                raise RuntimeError(f"its classifier is {head_name(model)}, the checkpoint's is {checkpoint.head_of(meta)}")
            load_state(model, state)
        except RuntimeError as e:
            raise UserError(f"checkpoint: {path}: weights do not match arch {meta['arch']!r}: "
                            f"{first_line(e)}") from None
        return cls(model.to(device), meta, device)

    def use_thresholds(self, path: str | Path, who: str = "predict") -> None:
        """Per-class thresholds from a file ``tl-dist evaluate --tune-thresholds`` wrote (multi_label)."""
        import json

        if not self.multi_label:
            raise UserError(f"{who}: --thresholds {path}: this checkpoint is single_label (one class per image: "
                            f"the most probable); thresholds apply to multi_label checkpoints")
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError, RecursionError) as e:
            raise UserError(f"{who}: --thresholds {path} cannot be read ({first_line(e)})") from None
        t = doc.get("thresholds") if isinstance(doc, dict) else None
        if not isinstance(doc, dict) or doc.get("format") != THRESHOLDS_FORMAT or not isinstance(t, list):
            raise UserError(f"{who}: --thresholds {path} is not a thresholds file (tl-dist evaluate "
                            f"--tune-thresholds writes them)")
        if doc.get("classes") != self.classes:
            raise UserError(f"{who}: --thresholds {path} is for other classes than the checkpoint's")
        if len(t) != len(self.classes) or not all(isinstance(v, (int, float)) and 0 < v < 1 for v in t):
            raise UserError(f"{who}: --thresholds {path}: expected one probability between 0 and 1 per class")
        self.thresholds = [float(v) for v in t]

    def eval_tensor(self, item):
        """A path or PIL image as the model sees it: the checkpoint's eval transform, uint8 CHW."""
        from PIL import Image

        from tl_dist.data.augment import eval_transform
        from tl_dist.data.images import load_rgb, to_rgb

        img = to_rgb(item) if isinstance(item, Image.Image) else load_rgb(str(item))
        return eval_transform(img, self.meta["resize_size"], self.meta["image_size"],
                              self.meta.get("interpolation", "bilinear"))

    def logits(self, x):
        """Class scores of a uint8 NCHW batch (on the host), as float on the host."""
        import torch

        from tl_dist.data.augment import normalize

        if self.exported is not None:
            return self.exported(x).float()
        x = normalize(x.to(self.device), self.meta["mean"], self.meta["std"], channels_last=False)
        with torch.inference_mode():
            return self.model(x).float().cpu()

    def predict(self, items: Iterable, topk: int | None = None, batch_size: int = 32, tta: bool = False) -> list[dict]:
        """One dict per item, in order: path, label, prob, topk [{label, prob}] -- or path, error. A
        multi_label checkpoint's probabilities are per class (sigmoid), label / prob are the most
        probable class, and labels [{label, prob}] lists every class at or past its threshold.
        ``tta``: the mean logits of each image and its mirror (as tl-dist evaluate --tta flip)."""
        import torch

        from tl_dist.data.images import BadImage

        k = min(topk or 3, len(self.classes))
        items = list(items)
        results: list[dict | None] = [None] * len(items)
        ready: list[tuple[int, torch.Tensor]] = []

        def flush() -> None:
            if not ready:
                return
            x = torch.stack([t for _, t in ready])
            logits = self.logits(x)
            if tta:
                logits = (logits + self.logits(x.flip(-1))) / 2
            probs = torch.sigmoid(logits) if self.multi_label else logits.softmax(1)
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
                if self.multi_label:
                    chosen = sorted((c for c in range(len(self.classes)) if p[c] >= self.thresholds[c]),
                                    key=lambda c: (-float(p[c]), c))
                    results[i]["labels"] = [{"label": self.classes[c], "prob": float(p[c])} for c in chosen]
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
