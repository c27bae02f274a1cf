"""Weights: torchvision's pretrained entries (downloaded once into the torch hub cache), a local
.safetensors / .pth file (read without unpickling anything), and loading them into a model whose
classifier is new."""
from __future__ import annotations

import collections
import os
import pickle
import re
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file

from tl_dist.config import ModelConfig
from tl_dist.errors import UserError, first_line
from tl_dist.models.heads import head_name, in_head
from tl_dist.models.timm_zoo import is_timm


_WEIGHTS_NAME = re.compile(r"[A-Z][A-Z0-9_]*")


def torchvision_weights(cfg: ModelConfig):
    """The torchvision weights entry model.weights names (imagenet = the model's DEFAULT), or None
    for none or a file (and for timm models, whose weights come through timm)."""
    if cfg.weights == "none" or is_timm(cfg.arch):
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


def torchvision_state(arch: str, weights) -> dict[str, torch.Tensor]:
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
