"""build(cfg, num_classes) -> a plain torchvision nn.Module with a new classifier; weights; freezing;
the preprocessing its weights expect.

Any torchvision classification model. One rule decides what "the head" is (``head_name``): the
model's last Linear or Conv2d, the layer whose outputs are the class scores. Everything that treats
the head apart (optimizer groups, freezing, eval mode, checkpoint checks, the predictor) asks it.
Knows nothing about processes or devices: the training loop wraps what this returns.
"""
from __future__ import annotations

import collections
import dataclasses
import difflib
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import IMAGENET_MEAN, IMAGENET_STD, Config, ModelConfig
from .errors import UserError, first_line

# Models with auxiliary classifiers: turned off (torchvision's pretrained builders do the same), so
# every model returns one tensor of class scores in train and eval mode alike.
AUX_HEADS = ("googlenet", "inception_v3")
# Token models: channels-last changes only their patch embedding, so it is not applied to them.
TOKEN_MODELS = ("vit_", "swin_")
_WEIGHTS_NAME = re.compile(r"[A-Z][A-Z0-9_]*")


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


def torchvision_weights(cfg: ModelConfig):
    """The torchvision weights entry model.weights names (imagenet = the model's DEFAULT), or None
    for none or a file."""
    if cfg.weights == "none":
        return None
    enum = torchvision.models.get_model_weights(cfg.arch)
    if cfg.weights == "imagenet":
        return enum.DEFAULT
    if cfg.weights in enum.__members__:
        return enum[cfg.weights]
    if _WEIGHTS_NAME.fullmatch(cfg.weights) and not Path(cfg.weights).exists():
        names = ", ".join(w.name for w in enum)
        raise UserError(f"model: {cfg.arch} has no weights named {cfg.weights!r}; its weights: {names} "
                        f"(imagenet = {enum.DEFAULT.name}); or model.weights=none, or a file path")
    return None


def reference_weights(cfg: ModelConfig):
    """The torchvision weights whose preprocessing the model's inputs follow: those model.weights
    names, or for none / a file the model's DEFAULT ones (the size and statistics it was made for)."""
    return torchvision_weights(cfg) or torchvision.models.get_model_weights(cfg.arch).DEFAULT


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


def head_name(model: nn.Module) -> str:
    """The classifier transfer learning replaces: the model's last Linear or Conv2d (ResNet ``fc``,
    EfficientNet ``classifier.1``, ViT ``heads.head``, Swin ``head``, SqueezeNet's 1x1 conv
    ``classifier.1``, ...). The one place that decides it."""
    name = None
    for n, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            name = n
    if name is None:
        raise UserError(f"model: {type(model).__name__} has no Linear or Conv2d classifier to replace")
    return name


def head_module(model: nn.Module) -> nn.Module:
    return model.get_submodule(head_name(model))


def in_head(name: str, head: str) -> bool:
    """Whether a parameter or state-dict key belongs to the classifier named ``head``."""
    return name.startswith(head + ".")


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


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """A local state dict: .safetensors, or a .pth/.pt through torch.load(weights_only=True)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"model: weights file not found: {p} (model.weights is imagenet, none, or a path)")
    if p.suffix == ".safetensors":
        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"model: {p} is not a readable safetensors file: {e}") from None
    try:
        # weights_only=True: a pickle that would run code is refused, not executed.
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message starts by saying how to load it anyway; quote only what it refused.
        what = next((line.strip() for line in str(e).splitlines() if "global" in line.lower()), "")
        raise UserError(f"model: refusing to load {p}: it holds Python objects beyond tensors, and unpickling "
                        f"them (torch.load with weights_only=False) could run arbitrary code"
                        f"{f' ({what[:160]})' if what else ''}. Only if you trust its source: convert it to a "
                        f"plain state dict or .safetensors") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise UserError(f"model: cannot read weights file {p}: {first_line(e)}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"model: {p} does not hold a state dict of tensors")
    return obj


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load every tensor but the classifier; the classifier is new (its class count differs)."""
    head = head_name(model)
    state = {k.removeprefix("module."): v for k, v in state.items() if not in_head(k.removeprefix("module."), head)}
    own = {k: v for k, v in model.state_dict().items() if not in_head(k, head)}
    if getattr(model, "aux_logits", None) is False:  # GoogLeNet / Inception v3 with their aux heads off
        state = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2.", "AuxLogits."))}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in own if k in state and own[k].shape != state[k].shape)
    if missing or unexpected or shape:
        detail = "; ".join(f"{n}: {', '.join(v[:3])}{' ...' if len(v) > 3 else ''}"
                           for n, v in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shape)) if v)
        raise UserError(f"model: weights from {source} do not fit this model.arch ({detail})")
    load_state(model, state, strict=False)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """load_state_dict for a state read from a file. A file keeps no per-module version numbers
    (torch's ``_metadata``); some modules refuse to load without them (MNASNet), so the model's own
    are used: files come from the current layout."""
    own = getattr(model.state_dict(), "_metadata", None)
    state = collections.OrderedDict(state)
    if own is not None:
        state._metadata = own  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=strict)


def frozen_at(cfg: ModelConfig, epoch: int) -> bool:
    """Whether the backbone is frozen during ``epoch`` (0-based)."""
    return cfg.mode == "frozen" or (cfg.mode == "frozen_then_finetune" and epoch < cfg.unfreeze_epoch)


def head_and_backbone(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The parameters of the new classifier, and all the others (two learning rates)."""
    head, backbone, name = [], [], head_name(model)
    for n, p in model.named_parameters():
        (head if in_head(n, name) else backbone).append(p)
    return head, backbone


def set_frozen(model: nn.Module, frozen: bool) -> None:
    """Frozen: only the head trains. DDP registers the parameters that require grad when it wraps
    the model, so changing this afterwards needs a new wrapper (the training loop does that)."""
    head = head_name(model)
    for n, p in model.named_parameters():
        p.requires_grad = (not frozen) or in_head(n, head)


def set_train_mode(model: nn.Module, training: bool, frozen: bool, frozen_bn: str) -> None:
    """model.train(training), but a frozen backbone stays in eval mode: its BatchNorm statistics stay
    fixed and its dropout and stochastic depth are off, so it is the same function every step.

    ``frozen_bn: train`` reproduces the tutorial, whose frozen backbone kept updating BN running stats.
    """
    model.train(training)
    if training and frozen and frozen_bn == "eval":
        model.eval()
        head_module(model).train()


def uses_channels_last(cfg: ModelConfig) -> bool:
    return cfg.channels_last and not cfg.arch.startswith(TOKEN_MODELS)


def _torchvision_state(arch: str, weights) -> dict[str, torch.Tensor]:
    url = weights.url
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    try:
        # Real loading path: torch hub cache, downloaded on first use with a hash check.
        return torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:  # URLError is an OSError
        if target.exists():
            raise UserError(f"model: cached weights are damaged: {target} ({first_line(e)}); delete the file "
                            f"and run again with internet access") from None
        raise UserError(f"model: cannot get the {weights.name} weights of {arch} (offline?). Download {url} on a "
                        f"machine with internet and put it at {target} (or set TORCH_HOME), or use "
                        f"model.weights=none / model.weights=PATH") from None


def build(cfg: ModelConfig, num_classes: int, image_size: int = 224) -> nn.Module:
    model = create(cfg.arch, num_classes, arch_kwargs(cfg, image_size))
    tv = torchvision_weights(cfg)
    if tv is not None:
        load_backbone(model, _torchvision_state(cfg.arch, tv), f"torchvision {cfg.arch} {tv.name}")
    elif cfg.weights != "none":
        load_backbone(model, read_weights(cfg.weights), cfg.weights)
    set_frozen(model, frozen_at(cfg, 0))
    return model
