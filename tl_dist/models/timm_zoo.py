"""timm's model zoo as backbones: ``model.arch: timm/<name>[.<tag>]`` (``timm/convnext_atto``,
``timm/resnet50.a1_in1k``, ``timm/vit_base_patch16_clip_224.openai``).

The names and their close matches, construction (``timm.create_model``: its own classifier reset,
``drop_rate``, ``drop_path_rate``, ``img_size``), the preprocessing a tag's ``pretrained_cfg``
gives, its pretrained weights through the Hugging Face Hub cache (one line naming the repo and the
file when they are not there and cannot be fetched), and its block map for layer-wise learning-rate
decay. timm is imported here only, and only for timm models: a torchvision run or checkpoint never
needs it.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import math
from typing import Any

import torch.nn as nn

from tl_dist.config import IMAGENET_MEAN, IMAGENET_STD
from tl_dist.errors import UserError, first_line, one_line

PREFIX = "timm/"

# Token models (patches and attention): channels-last would change only their patch embedding.
TOKEN_FAMILIES = ("vit_", "deit", "eva", "beit", "swin", "cait", "xcit", "flexivit", "mvit", "levit", "crossvit",
                  "twins", "volo", "coat", "convit", "pit_", "tnt_", "samvit", "naflexvit", "hiera", "sequencer")


def is_timm(arch: str) -> bool:
    return arch.startswith(PREFIX)


def name_of(arch: str) -> str:
    """timm's model name (with its tag, if any): ``timm/resnet50.a1_in1k`` -> ``resnet50.a1_in1k``."""
    return arch[len(PREFIX):]


def require(arch: str):
    """The timm module, or one line naming the extra that installs it."""
    try:
        import timm
    except ImportError:
        raise UserError(f"model: model.arch={arch} is a timm model, and timm is not installed: "
                        f"pip install -e '.[timm]' (or pip install timm)") from None
    return timm


def check_name(arch: str) -> None:
    """One line with the names a user most likely meant, for a name or tag timm does not know."""
    timm = require(arch)
    from timm.models import split_model_name_tag

    base, tag = split_model_name_tag(name_of(arch))
    if not timm.is_model(base):
        names = timm.list_models()
        close = difflib.get_close_matches(base.lower(), names, n=4, cutoff=0.6)
        hint = f"did you mean {', '.join('timm/' + c for c in close)}? " if close else ""
        raise UserError(f"model: timm has no model {base!r} (model.arch={arch}): {hint}every name matching a "
                        f"pattern: python -c \"import timm; print(timm.list_models('*{base[:6]}*'))\"")
    if tag and f"{base}.{tag}" not in timm.list_pretrained(f"{base}.*"):
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{base}.*")]
        raise UserError(f"model: timm's {base} has no pretrained tag {tag!r}; its tags: {', '.join(tags) or 'none'} "
                        f"(model.arch=timm/{base} takes the default one)")


@dataclasses.dataclass(frozen=True)
class Reference:
    """What a tag's pretrained_cfg says about its inputs (timm's eval transform)."""
    image_size: int
    resize_size: int  # floor(image_size / crop_pct): timm's eval resize before the centre crop
    interpolation: str
    mean: list[float]
    std: list[float]
    hub_repo: str | None
    hub_file: str


def reference(arch: str) -> Reference:
    """The tag's (or the model's default tag's) preprocessing and where its weights live."""
    require(arch)
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name_of(arch))
    if cfg is None:  # a model without pretrained weights: timm's defaults
        return Reference(224, 256, "bicubic", list(IMAGENET_MEAN), list(IMAGENET_STD), None, "")
    size = int(cfg.input_size[-1])
    crop_pct = cfg.crop_pct or 0.875
    # (timm's own resamplers beyond these two are rare; bicubic is the closest of ours)
    interpolation = cfg.interpolation if cfg.interpolation in ("bilinear", "bicubic") else "bicubic"
    return Reference(size, max(size, math.floor(size / crop_pct)), interpolation, [float(m) for m in cfg.mean],
                     [float(s) for s in cfg.std], cfg.hf_hub_id, cfg.hf_hub_filename or "model.safetensors")


@functools.lru_cache(maxsize=64)
def takes_img_size(arch: str) -> bool:
    """Whether the model is built for one input size (ViT-style position embeddings: ``img_size``)."""
    timm = require(arch)
    import torch

    with torch.device("meta"):  # (shapes only: nothing allocated, nothing initialised)
        model = timm.create_model(name_of(arch), pretrained=False, num_classes=1)
    return "img_size" in inspect.signature(type(model).__init__).parameters


def constructor_kwargs(arch: str, image_size: int, drop_rate: float | None, drop_path_rate: float | None) -> dict[str, Any]:
    """timm.create_model's arguments beyond the name and num_classes (they travel in the checkpoint)."""
    kwargs: dict[str, Any] = {}
    if takes_img_size(arch):
        kwargs["img_size"] = image_size  # (timm resamples pretrained position embeddings to it)
    if drop_rate is not None:
        kwargs["drop_rate"] = drop_rate
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    return kwargs


def create(arch: str, num_classes: int, kwargs: dict[str, Any] | None = None, pretrained: bool = False) -> nn.Module:
    """The model with a fresh classifier for ``num_classes`` (timm's own reset and initialisation);
    ``pretrained``: every other weight from the tag's pretrained file (the Hugging Face Hub cache)."""
    timm = require(arch)
    if not pretrained:
        return timm.create_model(name_of(arch), pretrained=False, num_classes=num_classes, **(kwargs or {}))
    ref = reference(arch)
    try:
        return timm.create_model(name_of(arch), pretrained=True, num_classes=num_classes, **(kwargs or {}))
    except Exception as e:  # noqa: BLE001 - the Hub client's errors (offline, missing, damaged) vary by version
        where = (f"the Hugging Face Hub repo {ref.hub_repo}, file {ref.hub_file} (on a machine with internet: "
                 f"huggingface-cli download {ref.hub_repo} {ref.hub_file}, then copy its cache, ~/.cache/huggingface "
                 f"or $HF_HOME)" if ref.hub_repo else "timm's download location")
        raise UserError(f"model: cannot get the pretrained weights of {arch} (offline?): "
                        f"{one_line(first_line(e))[:160]}; they come from {where}; or use model.weights=PATH or "
                        f"none") from None


def uses_channels_last(arch: str) -> bool:
    return not name_of(arch).startswith(TOKEN_FAMILIES)


def layer_ids(model: nn.Module, arch: str) -> dict[str, int]:
    """Each parameter's block, 0 for the stem up to the classifier's (the last), from the model's own
    group_matcher: the map timm's layer-wise learning-rate decay uses."""
    require(arch)
    from timm.models import group_parameters

    if not hasattr(model, "group_matcher"):
        raise UserError(f"config: optim.layer_decay: {arch} has no block map in timm (group_matcher); "
                        f"leave optim.layer_decay unset for this model")
    return group_parameters(model, model.group_matcher(coarse=False), reverse=True)
