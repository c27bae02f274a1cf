"""build(cfg, num_classes) -> a plain torchvision nn.Module with a new classifier and its weights;
the architecture checks, and the preprocessing its weights expect (``resolve``).

Any torchvision classification model. Knows nothing about processes or devices: the training loop
wraps what this returns. The head rule and freezing are in ``heads``, weights in ``pretrained``.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import torch
import torch.nn as nn
import torchvision

from tl_dist.config import IMAGENET_MEAN, IMAGENET_STD, Config, ModelConfig
from tl_dist.errors import UserError, first_line
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
    """One line with the names a user most likely meant, for a name torchvision does not know."""
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
    """The architecture with a fresh classifier for ``num_classes`` (torchvision's own initialisation)."""
    check_arch(arch)
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
    ref = reference_weights(cfg.model).transforms()
    crop, resize = ref.crop_size[0], ref.resize_size[0]
    d = cfg.data
    image_size = d.image_size or crop
    resize_size = d.resize_size or (resize if image_size == crop else max(image_size, round(image_size * resize / crop)))
    if resize_size < image_size:
        raise UserError(f"config: data.resize_size ({resize_size}) must be at least data.image_size ({image_size}): "
                        f"val images are resized, then centre-cropped")
    return Preprocessing(image_size, resize_size, d.interpolation or ref.interpolation.value,
                         list(d.mean or ref.mean or IMAGENET_MEAN), list(d.std or ref.std or IMAGENET_STD))


def resolve(cfg: Config) -> Config:
    """The config with the model checked (name, weights name, input size) and every preprocessing
    key filled in. Runs before the data scan: a typo costs no time."""
    check_arch(cfg.model.arch)
    pre = preprocessing(cfg)
    check_input_size(cfg.model, pre.image_size, reference_weights(cfg.model).transforms().crop_size[0])
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **dataclasses.asdict(pre)))


def check_input_size(cfg: ModelConfig, size: int, weights_size: int) -> None:
    """Refuse, in one line, an image size the model cannot take (ViT with pretrained weights, MaxViT,
    Inception below 75 px, AlexNet below 63 px): a shape-only forward pass on the meta device."""
    kwargs = arch_kwargs(cfg, size)
    try:
        with torch.device("meta"):
            probe = torchvision.models.get_model(cfg.arch, weights=None, num_classes=2, **kwargs)
            probe.eval()(torch.empty(1, 3, size, size))
    except NotImplementedError:
        return  # RegNet computes its widths from real tensors; it takes any size (global pooling)
    except Exception as e:  # noqa: BLE001 - any failure of the shape pass means the size does not fit
        tv = torchvision_weights(cfg)
        fixed = f" with its {tv.name} weights" if tv is not None and kwargs else ""
        raise UserError(f"model: {cfg.arch}{fixed} cannot take {size}-pixel images (data.image_size): "
                        f"{first_line(e)[:160]}; leave data.image_size unset for the size its weights use "
                        f"({weights_size})") from None


def uses_channels_last(cfg: ModelConfig) -> bool:
    return cfg.channels_last and not cfg.arch.startswith(TOKEN_MODELS)


def build(cfg: ModelConfig, num_classes: int, image_size: int = 224) -> nn.Module:
    model = create(cfg.arch, num_classes, arch_kwargs(cfg, image_size))
    tv = torchvision_weights(cfg)
    if tv is not None:
        load_backbone(model, torchvision_state(cfg.arch, tv), f"torchvision {cfg.arch} {tv.name}")
    elif cfg.weights != "none":
        load_backbone(model, read_weights(cfg.weights), cfg.weights)
    set_frozen(model, frozen_at(cfg, 0))
    return model
