"""build(cfg, num_classes) -> a plain torchvision nn.Module; weights imagenet|none|file; freezing.

Knows nothing about processes or devices: the training loop wraps what this returns.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import ModelConfig
from .errors import UserError, first_line

HEAD = "fc"  # the classifier that transfer learning replaces (torchvision ResNet family)


def create(arch: str, num_classes: int) -> nn.Module:
    """The architecture with a fresh ``fc`` for ``num_classes``, randomly initialised."""
    try:
        m = torchvision.models.get_model(arch, weights=None)
    except (ValueError, KeyError):
        known = [a for a in torchvision.models.list_models(torchvision.models) if _resnet_family(a)]
        raise UserError(f"model: unknown model.arch {arch!r}; use a torchvision model with an fc head, "
                        f"e.g. {', '.join(known[:8])}") from None
    if not isinstance(getattr(m, HEAD, None), nn.Linear):
        raise UserError(f"model: model.arch {arch!r} has no Linear 'fc' head; use a ResNet-family model")
    m.fc = nn.Linear(m.fc.in_features, num_classes)
    return m


def _resnet_family(arch: str) -> bool:
    return arch.startswith(("resnet", "resnext", "wide_resnet", "regnet"))


def _imagenet_state(arch: str) -> dict[str, torch.Tensor]:
    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    url = weights.url
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    try:
        # Real loading path: torch hub cache, downloaded on first use with a hash check.
        return torch.hub.load_state_dict_from_url(url, progress=True, check_hash=True, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:  # URLError is an OSError
        if target.exists():
            raise UserError(f"model: cached ImageNet weights are damaged: {target} ({first_line(e)}); delete the file "
                            f"and run again with internet access") from None
        raise UserError(f"model: cannot get ImageNet weights for {arch} (offline?). Download {url} on a "
                        f"machine with internet and put it at {target} (or set TORCH_HOME), or use "
                        f"model.weights=none / model.weights=PATH") from None


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
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not in_head(k)}
    own = {k: v for k, v in model.state_dict().items() if not in_head(k)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in own if k in state and own[k].shape != state[k].shape)
    if missing or unexpected or shape:
        detail = "; ".join(f"{n}: {', '.join(v[:3])}{' ...' if len(v) > 3 else ''}"
                           for n, v in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shape)) if v)
        raise UserError(f"model: weights from {source} do not fit this model.arch ({detail})")
    model.load_state_dict(state, strict=False)


def in_head(name: str) -> bool:
    """Whether a parameter or state-dict key belongs to the new classifier."""
    return name.startswith(HEAD + ".")


def frozen_at(cfg: ModelConfig, epoch: int) -> bool:
    """Whether the backbone is frozen during ``epoch`` (0-based)."""
    return cfg.mode == "frozen" or (cfg.mode == "frozen_then_finetune" and epoch < cfg.unfreeze_epoch)


def head_and_backbone(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The parameters of the new classifier, and all the others (two learning rates)."""
    head, backbone = [], []
    for name, p in model.named_parameters():
        (head if in_head(name) else backbone).append(p)
    return head, backbone


def set_frozen(model: nn.Module, frozen: bool) -> None:
    """Frozen: only the head trains. DDP registers the parameters that require grad when it wraps
    the model, so changing this afterwards needs a new wrapper (the training loop does that)."""
    for name, p in model.named_parameters():
        p.requires_grad = (not frozen) or in_head(name)


def set_train_mode(model: nn.Module, training: bool, frozen: bool, frozen_bn: str) -> None:
    """model.train(training), but a frozen backbone stays in eval mode so its BN statistics stay fixed.

    ``frozen_bn: train`` reproduces the tutorial, whose frozen backbone kept updating BN running stats.
    """
    model.train(training)
    if training and frozen and frozen_bn == "eval":
        for name, m in model.named_modules():
            if name and not name.startswith(HEAD):
                m.eval()


def build(cfg: ModelConfig, num_classes: int) -> nn.Module:
    model = create(cfg.arch, num_classes)
    if cfg.weights == "imagenet":
        load_backbone(model, _imagenet_state(cfg.arch), f"torchvision {cfg.arch} IMAGENET1K_V1")
    elif cfg.weights != "none":
        load_backbone(model, read_weights(cfg.weights), cfg.weights)
    set_frozen(model, frozen_at(cfg, 0))
    return model

