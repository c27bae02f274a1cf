"""How the model is trained: optimizer groups and the learning-rate schedule.

The schedule is computed from the epoch rather than stepped, so it is the same for any world size,
any accumulation, and after a resume.
"""
from __future__ import annotations

import torch

from . import model as model_lib
from .config import Config


def base_lrs(cfg: Config) -> list[float]:
    """The learning rate of each optimizer group: [head] in frozen mode, [head, backbone] otherwise."""
    if cfg.model.mode == "frozen":
        return [cfg.optim.lr]
    return [cfg.optim.lr, cfg.optim.backbone_lr if cfg.optim.backbone_lr is not None else cfg.optim.lr]


def lrs_at(cfg: Config, epoch: int) -> list[float]:
    """StepLR's values for ``epoch``, computed rather than stepped: the same for any world size or resume."""
    return [lr * cfg.scheduler.gamma ** (epoch // cfg.scheduler.step_size) for lr in base_lrs(cfg)]


def set_lrs(optimizer: torch.optim.Optimizer, cfg: Config, epoch: int) -> list[float]:
    """Put ``epoch``'s learning rates into the optimizer's groups; returns them."""
    lrs = lrs_at(cfg, epoch)
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    return lrs


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """SGD over the new classifier and (unless frozen) the backbone, as two groups with their own learning rates.

    In frozen_then_finetune the backbone is in the optimizer from the start; while it is frozen its
    parameters get no gradient and SGD leaves them (and their momentum) untouched.
    """
    head, backbone = model_lib.head_and_backbone(model)
    groups = [{"params": head}] + ([{"params": backbone}] if cfg.model.mode != "frozen" else [])
    for g, lr in zip(groups, base_lrs(cfg)):
        g["lr"] = lr
    return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                           weight_decay=cfg.optim.weight_decay, foreach=True)
