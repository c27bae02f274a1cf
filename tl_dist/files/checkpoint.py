"""Self-describing checkpoints: safetensors weights with the metadata inside, a JSON mirror beside,
every file written atomically (see ``atomic``).

The metadata lives in the safetensors header itself, so weights and their description can never
disagree, even when a crash falls between writing ``best.safetensors`` and ``best.json``. Nothing
here unpickles: safetensors for weights, JSON for metadata. The checks that a file is one (format,
classes, head, arch arguments) are here too: every reader of a checkpoint goes through them.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from tl_dist.config import MAX_IMAGE_SIZE as MAX_SIZE
from tl_dist.errors import UserError
from tl_dist.files.atomic import atomic_write, atomic_write_text


FORMAT = "tl_dist/1"
META_KEY = "tl_dist"


def _plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; a detached CPU copy has neither.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_weights(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """``path`` (.safetensors, metadata in its header) then ``path`` with .json beside it."""
    meta = {"format": FORMAT, **meta}
    blob = save(_plain(state), metadata={META_KEY: json.dumps(meta, allow_nan=False)})  # strict JSON only
    atomic_write(path, blob)
    atomic_write_text(Path(path).with_suffix(".json"), json.dumps(meta, indent=2, allow_nan=False) + "\n")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata from a checkpoint's safetensors header, without reading the tensors."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(8)
            if head[:4] == b"PK\x03\x04":  # a torch.save zip: resume.pt, or a .pth
                raise UserError(f"checkpoint: {p} is a resume state or a torch file (what training continues "
                                f"from), not a tl_dist model checkpoint; use {p.parent / 'best.safetensors'} "
                                f"(or give the run directory)")
            if len(head) != 8:
                raise ValueError("file too short for a safetensors header")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > 100_000_000:
                raise ValueError("header size out of range")
            header = json.loads(f.read(n))
        if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
            raise ValueError("the header is not a safetensors header")
        raw = header.get("__metadata__", {}).get(META_KEY)
        if raw is None:
            raise ValueError("no tl_dist metadata in the header (not a tl_dist checkpoint?)")
        meta = json.loads(raw)
    except FileNotFoundError:
        raise UserError(f"checkpoint: file not found: {p}") from None
    except RecursionError:
        raise UserError(f"checkpoint: {p} is damaged or not a tl_dist checkpoint: its metadata is nested too "
                        f"deeply") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint: {p} is damaged or not a tl_dist checkpoint: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"checkpoint: {p} has metadata format {meta.get('format') if isinstance(meta, dict) else '?'!r}, "
                        f"expected {FORMAT!r}")
    problem = metadata_problem(meta)
    if problem:
        raise UserError(f"checkpoint: {p} is damaged or not a tl_dist checkpoint: {problem}")
    return meta


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _size(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SIZE


_HEAD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}(\.[A-Za-z0-9_]{1,64}){0,7}")


# The only constructor arguments a checkpoint may pass on to torchvision (see model.arch_kwargs).
_ARCH_KWARGS = {"aux_logits": bool, "transform_input": bool, "init_weights": bool, "image_size": int, "input_size": list,
                "img_size": int, "drop_rate": float, "drop_path_rate": float, "dropout": float,
                "stochastic_depth_prob": float}

# A timm model's name as model.arch holds it: timm/<name>[.<tag>] (built only where timm knows it).
_TIMM_ARCH = re.compile(r"timm/[a-z0-9_]{1,100}(\.[A-Za-z0-9_]{1,100})?")


def head_of(meta: dict[str, Any]) -> Any:
    """The classifier's module name; checkpoints written before it was recorded are ResNets (``fc``)."""
    return meta.get("head", "fc")


def _arch_kwargs_ok(kw: Any) -> bool:
    if not isinstance(kw, dict) or not set(kw) <= set(_ARCH_KWARGS):
        return False
    for k, v in kw.items():
        if _ARCH_KWARGS[k] is bool and not isinstance(v, bool):
            return False
        if _ARCH_KWARGS[k] is int and not _size(v):
            return False
        if _ARCH_KWARGS[k] is float and not (_number(v) and 0 <= v < 1):
            return False
        if _ARCH_KWARGS[k] is list and not (isinstance(v, list) and len(v) == 2 and all(map(_size, v))):
            return False
    return True


def _split_ok(split: Any) -> bool:
    """A made split's summary: its seed and fractions, and per part a count and a hash."""
    try:
        return (isinstance(split["split_seed"], int) and _number(split["val_split"]) and _number(split["test_split"])
                and all(name in ("train", "val", "test") and isinstance(p["images"], int) and isinstance(p["hash"], str)
                        for name, p in split["parts"].items()))
    except (TypeError, KeyError, AttributeError):
        return False


def metadata_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with a checkpoint's metadata, or None: every field a reader uses, checked
    before anything is allocated from it (the file may come from anywhere)."""
    classes = meta.get("classes")
    checks = (
        ("classes", isinstance(classes, list) and len(classes) > 0
         and all(isinstance(c, str) and c for c in classes) and len(set(classes)) == len(classes),
         "a list of unique, non-empty class names"),
        ("num_classes", isinstance(classes, list) and meta.get("num_classes") == len(classes)
         and not isinstance(meta.get("num_classes"), bool), "the number of classes"),
        ("arch", isinstance(meta.get("arch"), str)
         and (meta["arch"] in torchvision.models.list_models(module=torchvision.models)
              or _TIMM_ARCH.fullmatch(meta["arch"]) is not None), "a torchvision model name or timm/<name>"),
        ("head", isinstance(head_of(meta), str) and _HEAD_NAME.fullmatch(head_of(meta)) is not None,
         "a module name such as fc or classifier.1"),
        ("arch_kwargs", _arch_kwargs_ok(meta.get("arch_kwargs", {})), "constructor arguments tl_dist writes"),
        ("interpolation", meta.get("interpolation", "bilinear") in ("bilinear", "bicubic"), "bilinear or bicubic"),
        ("image_size", _size(meta.get("image_size")), f"an integer from 1 to {MAX_SIZE}"),
        ("resize_size", _size(meta.get("resize_size")) and _size(meta.get("image_size"))
         and meta["resize_size"] >= meta["image_size"], f"an integer from image_size to {MAX_SIZE}"),
        ("mean", isinstance(meta.get("mean"), list) and len(meta["mean"]) == 3 and all(map(_number, meta["mean"])),
         "three finite numbers"),
        ("std", isinstance(meta.get("std"), list) and len(meta["std"]) == 3
         and all(_number(s) and s > 0 for s in meta["std"]), "three finite positive numbers"),
        ("epoch", "epoch" not in meta or (isinstance(meta["epoch"], int) and not isinstance(meta["epoch"], bool)
                                          and meta["epoch"] >= 0), "an epoch number"),
        ("val_acc", "val_acc" not in meta or (_number(meta["val_acc"]) and 0 <= meta["val_acc"] <= 1),
         "a number from 0 to 1"),
        ("macro_f1", "macro_f1" not in meta or (_number(meta["macro_f1"]) and 0 <= meta["macro_f1"] <= 1),
         "a number from 0 to 1"),
        ("val_loss", "val_loss" not in meta or _number(meta["val_loss"]), "a finite number"),
        ("map", "map" not in meta or (_number(meta["map"]) and 0 <= meta["map"] <= 1), "a number from 0 to 1"),
        ("micro_f1", "micro_f1" not in meta or (_number(meta["micro_f1"]) and 0 <= meta["micro_f1"] <= 1),
         "a number from 0 to 1"),
        ("split", "split" not in meta or _split_ok(meta["split"]), "the summary of a split.json"),
        ("limited", "limited" not in meta or (isinstance(meta["limited"], dict) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in meta["limited"].values())),
         "the images a limited run's epochs took"),
        ("task", meta.get("task", "single_label") in ("single_label", "multi_label"), "single_label or multi_label"),
        ("threshold", "threshold" not in meta or (_number(meta["threshold"]) and 0 < meta["threshold"] < 1),
         "a probability between 0 and 1"),
        ("thresholds", "thresholds" not in meta or (isinstance(meta["thresholds"], list) and isinstance(classes, list)
                                                    and len(meta["thresholds"]) == len(classes)
                                                    and all(_number(t) and 0 < t < 1 for t in meta["thresholds"])),
         "one probability between 0 and 1 per class"),
    )
    for key, ok, expected in checks:
        if not ok:
            shown = repr(meta.get(key))
            return f"metadata {key} is {shown[:60]}{'...' if len(shown) > 60 else ''}, expected {expected}"
    return None


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) from a checkpoint; checks that the two describe the same model."""
    meta = read_metadata(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"checkpoint: {path} is damaged (truncated or corrupt tensors): {e}") from None
    classes, head = meta.get("classes"), head_of(meta)
    rows = state.get(f"{head}.weight")
    if not isinstance(classes, list) or rows is None or rows.shape[0] != len(classes) \
            or meta.get("num_classes") != len(classes):
        raise UserError(f"checkpoint: {path}: metadata does not match the weights "
                        f"(classes: {len(classes) if isinstance(classes, list) else '?'}, "
                        f"num_classes: {meta.get('num_classes')}, rows of {head}: "
                        f"{None if rows is None else rows.shape[0]})")
    return state, meta


def locate(path: str | Path, name: str = "best") -> Path:
    """A run directory means its ``{name}.safetensors`` (a published folder, from ``tl-dist export
    --format hf``, its model.safetensors); a file means itself."""
    p = Path(path).expanduser()
    if p.is_dir():
        published = p / "model.safetensors"
        p = p / f"{name}.safetensors"
        if not p.exists() and published.is_file() and (published.parent / "config.json").is_file():
            p = published
    if not p.is_file():
        raise UserError(f"checkpoint: not found: {p} (give a run directory or a .safetensors file)")
    return p
