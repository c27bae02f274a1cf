"""build(cfg, num_classes) -> a plain nn.Module with a new classifier and its weights; the
architecture checks, and the preprocessing its weights expect (``resolve``).

Any torchvision classification model, or timm's (``timm/<name>``, through ``timm_zoo``). Knows
nothing about processes or devices: the training loop wraps what this returns. The head rule and
freezing are in ``heads``, weights in ``pretrained``.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any

import torch
import torch.nn as nn
import torchvision

from tl_dist.config import IMAGENET_MEAN, IMAGENET_STD, Config, ModelConfig
from tl_dist.errors import UserError, first_line
from tl_dist.models import timm_zoo
from tl_dist.models.heads import frozen_at, set_frozen
from tl_dist.models.pretrained import torchvision_state, load_backbone, read_weights, reference_weights, torchvision_weights


# Models with auxiliary classifiers: turned off (torchvision's pretrained builders do the same), so
# every model returns one tensor of class scores in train and eval mode alike.
AUX_HEADS = ("googlenet", "inception_v3")


# Token models: channels-last changes only their patch embedding, so it is not applied to them.
TOKEN_MODELS = ("vit_", "swin_")


def classification_models() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


def check_arch(arch: str) -> None:
    """One line with the names a user most likely meant, for a name torchvision (or timm) does not know."""
    if timm_zoo.is_timm(arch):
        timm_zoo.check_name(arch)
        return
    names = classification_models()
    if arch in names:
        return
    close = difflib.get_close_matches(arch.lower(), names, n=4, cutoff=0.6)
    hint = (f"did you mean {', '.join(close)}?" if close else
            "e.g. resnet18, resnet50, mobilenet_v3_large, efficientnet_b0, convnext_tiny, vit_b_16, regnet_y_800mf")
    raise UserError(f"model: unknown model.arch {arch!r}: {hint} (every name: "
                    f"python -c 'import torchvision; print(torchvision.models.list_models(torchvision.models))')")


def arch_kwargs(cfg: ModelConfig, image_size: int) -> dict[str, Any]:
    """Constructor arguments beyond num_classes, as torchvision's own builders set them for the weights:
    they travel in the checkpoint so the predictor builds the same model."""
    if timm_zoo.is_timm(cfg.arch):
        return timm_zoo.constructor_kwargs(cfg.arch, image_size, cfg.drop_rate, cfg.drop_path_rate)
    return {**_torchvision_kwargs(cfg, image_size), **regularisation_kwargs(cfg)}


# model.drop_rate / model.drop_path_rate as torchvision's constructors name them.
TORCHVISION_REGULARISATION = {"drop_rate": "dropout", "drop_path_rate": "stochastic_depth_prob"}


def regularisation_kwargs(cfg: ModelConfig) -> dict[str, float]:
    return {tv: getattr(cfg, key) for key, tv in TORCHVISION_REGULARISATION.items() if getattr(cfg, key) is not None}


def _torchvision_kwargs(cfg: ModelConfig, image_size: int) -> dict[str, Any]:
    tv = torchvision_weights(cfg)
    if cfg.arch in AUX_HEADS:
        # Pretrained GoogLeNet / Inception expect ImageNet-normalised input converted inside the model.
        return {"aux_logits": False, "transform_input": tv is not None, "init_weights": tv is None}
    if cfg.arch.startswith("vit_"):  # the position embedding is made for one size: the weights' or ours
        return {"image_size": tv.meta["min_size"][0] if tv is not None else image_size}
    if cfg.arch.startswith("maxvit_"):
        return {"input_size": list(tv.meta["min_size"]) if tv is not None else [image_size, image_size]}
    return {}


def create(arch: str, num_classes: int, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The architecture with a fresh classifier for ``num_classes`` (torchvision's or timm's own
    initialisation)."""
    check_arch(arch)
    if timm_zoo.is_timm(arch):
        return timm_zoo.create(arch, num_classes, kwargs)
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **(kwargs or {}))


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """What the model's inputs look like: the config's values, or else its weights'."""
    image_size: int
    resize_size: int
    interpolation: str
    mean: list[float]
    std: list[float]


def preprocessing(cfg: Config) -> Preprocessing:
    """The eval transform of the reference weights, with every key the config sets taking precedence."""
    crop, resize, interpolation, mean, std = reference_transform(cfg.model)
    d = cfg.data
    image_size = d.image_size or crop
    resize_size = d.resize_size or (resize if image_size == crop else max(image_size, round(image_size * resize / crop)))
    if resize_size < image_size:
        raise UserError(f"config: data.resize_size ({resize_size}) must be at least data.image_size ({image_size}): "
                        f"val images are resized, then centre-cropped")
    return Preprocessing(image_size, resize_size, d.interpolation or interpolation,
                         list(d.mean or mean or IMAGENET_MEAN), list(d.std or std or IMAGENET_STD))


def reference_transform(cfg: ModelConfig) -> tuple[int, int, str, list[float] | None, list[float] | None]:
    """(crop, resize, interpolation, mean, std) of the weights the model's inputs follow: torchvision's
    weights entry, or a timm tag's pretrained_cfg."""
    if timm_zoo.is_timm(cfg.arch):
        r = timm_zoo.reference(cfg.arch)
        return r.image_size, r.resize_size, r.interpolation, r.mean, r.std
    ref = reference_weights(cfg).transforms()
    return ref.crop_size[0], ref.resize_size[0], ref.interpolation.value, ref.mean, ref.std


def resolve(cfg: Config) -> Config:
    """The config with the model checked (name, weights name, input size, its regularisation keys)
    and every preprocessing key filled in. Runs before the data scan: a typo costs no time."""
    check_arch(cfg.model.arch)
    check_layer_decay(cfg)
    pre = preprocessing(cfg)
    check_regularisation(cfg.model)
    check_input_size(cfg.model, pre.image_size, reference_transform(cfg.model)[0])
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **dataclasses.asdict(pre)))


def check_layer_decay(cfg: Config) -> None:
    if cfg.optim.layer_decay is not None and not timm_zoo.is_timm(cfg.model.arch):
        raise UserError(f"config: optim.layer_decay needs a timm model (model.arch=timm/<name>), whose block map "
                        f"it follows; torchvision's {cfg.model.arch} has none: leave optim.layer_decay unset, or "
                        f"use optim.backbone_lr for one lower rate for the whole backbone")


def check_regularisation(cfg: ModelConfig) -> None:
    """model.drop_rate / model.drop_path_rate on a torchvision model whose constructor has no such
    argument: one line naming the models that do."""
    if timm_zoo.is_timm(cfg.arch) or (cfg.drop_rate is None and cfg.drop_path_rate is None):
        return
    with torch.device("meta"):
        takes = inspect.signature(type(torchvision.models.get_model(cfg.arch, weights=None)).__init__).parameters
    for key, tv in TORCHVISION_REGULARISATION.items():
        if getattr(cfg, key) is not None and tv not in takes:
            which = ("EfficientNet, MobileNetV3, ViT, Swin, ..." if tv == "dropout"
                     else "ConvNeXt, EfficientNet, Swin, MaxViT")
            raise UserError(f"config: model.{key}: torchvision's {cfg.arch} has no {tv} argument (it does in "
                            f"{which}, and every timm model has {key}); leave model.{key} unset")


def check_input_size(cfg: ModelConfig, size: int, weights_size: int) -> None:
    """Refuse, in one line, an image size the model cannot take (ViT with pretrained weights, MaxViT,
    Inception below 75 px, AlexNet below 63 px): a shape-only forward pass on the meta device."""
    kwargs = arch_kwargs(cfg, size)
    try:
        with torch.device("meta"):
            probe = (timm_zoo.create(cfg.arch, 2, kwargs) if timm_zoo.is_timm(cfg.arch)
                     else torchvision.models.get_model(cfg.arch, weights=None, num_classes=2, **kwargs))
            probe.eval()(torch.empty(1, 3, size, size))
    except NotImplementedError:
        return  # RegNet computes its widths from real tensors; it takes any size (global pooling)
    except Exception as e:  # noqa: BLE001 - any failure of the shape pass means the size does not fit
        tv = None if timm_zoo.is_timm(cfg.arch) else torchvision_weights(cfg)
        fixed = f" with its {tv.name} weights" if tv is not None and kwargs else ""
        raise UserError(f"model: {cfg.arch}{fixed} cannot take {size}-pixel images (data.image_size): "
                        f"{first_line(e)[:160]}; leave data.image_size unset for the size its weights use "
                        f"({weights_size})") from None


def uses_channels_last(cfg: ModelConfig) -> bool:
    if timm_zoo.is_timm(cfg.arch):
        return cfg.channels_last and timm_zoo.uses_channels_last(cfg.arch)
    return cfg.channels_last and not cfg.arch.startswith(TOKEN_MODELS)


def build(cfg: ModelConfig, num_classes: int, image_size: int = 224) -> nn.Module:
    if timm_zoo.is_timm(cfg.arch):
        return _build_timm(cfg, num_classes, image_size)
    model = create(cfg.arch, num_classes, arch_kwargs(cfg, image_size))
    tv = torchvision_weights(cfg)
    if tv is not None:
        load_backbone(model, torchvision_state(cfg.arch, tv), f"torchvision {cfg.arch} {tv.name}")
    elif cfg.weights != "none":
        load_backbone(model, read_weights(cfg.weights), cfg.weights)
    set_frozen(model, frozen_at(cfg, 0))
    return model


def _build_timm(cfg: ModelConfig, num_classes: int, image_size: int) -> nn.Module:
    """A timm model: the tag's pretrained weights through timm (imagenet), none, or a local file."""
    kwargs = arch_kwargs(cfg, image_size)
    model = timm_zoo.create(cfg.arch, num_classes, kwargs, pretrained=cfg.weights == "imagenet")
    if cfg.weights not in ("imagenet", "none"):
        load_backbone(model, read_weights(cfg.weights), cfg.weights)
    set_frozen(model, frozen_at(cfg, 0))
    return model
