"""The head and the backbone: the one rule that decides which layer is the classifier, and what
freezing the backbone means (no gradients; eval-mode BatchNorm by model.frozen_bn).

Everything that treats the head apart (optimizer groups, freezing, eval mode, checkpoint checks, the
predictor) asks ``head_name``."""
from __future__ import annotations

import torch.nn as nn

from tl_dist.config import ModelConfig
from tl_dist.errors import UserError


def head_name(model: nn.Module) -> str:
    """The classifier transfer learning replaces: what a timm model's ``get_classifier()`` returns
    (ConvNeXt ``head.fc``, ViT ``head``), else the model's last Linear or Conv2d (ResNet ``fc``,
    EfficientNet ``classifier.1``, ViT ``heads.head``, Swin ``head``, SqueezeNet's 1x1 conv
    ``classifier.1``, ...). The one place that decides it."""
    get = getattr(model, "get_classifier", None)
    if callable(get):
        classifier = get()
        found = [n for n, m in model.named_modules() if m is classifier and isinstance(m, (nn.Linear, nn.Conv2d))]
        if found:
            return found[0]
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
