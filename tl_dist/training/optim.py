"""How the model is trained: optimizer groups, the learning-rate schedule, and the loss's class weights.

The schedule is a function of the run's position, ``epoch + images done / train images`` (the
images the epoch's earlier optimizer steps took), set before every optimizer step rather than
stepped. So it is the same for any world size and accumulation that take the same steps (W
processes with batch B, or one with batch B and W accumulation steps), and after a resume.
"""
from __future__ import annotations

import math

import torch

from tl_dist.models import heads, timm_zoo
from tl_dist.config import Config, SchedulerConfig


def base_lrs(cfg: Config) -> list[float]:
    """The learning rate of each part: [head] in frozen mode, [head, backbone] otherwise."""
    if cfg.model.mode == "frozen":
        return [cfg.optim.lr]
    return [cfg.optim.lr, cfg.optim.backbone_lr if cfg.optim.backbone_lr is not None else cfg.optim.lr]


def _cosine(start: float, end: float, p: float) -> float:
    """From ``start`` (p = 0) to ``end`` (p = 1) along half a cosine."""
    return end + (start - end) * (1 + math.cos(math.pi * min(1.0, max(0.0, p)))) / 2


def lr_factor(s: SchedulerConfig, epochs: int, epoch: int, t: float) -> float:
    """The schedule's multiplier of the base learning rates at position ``t`` (fractional epochs,
    ``epoch <= t < epoch + 1``) of a run of ``epochs`` epochs. Closed form, nothing stepped."""
    if s.name == "onecycle":  # torch's OneCycleLR shape (cos, div 25, final div 1e4), on the learning rate
        up = s.pct_start * epochs
        if t < up:
            return _cosine(1 / 25, 1.0, t / up)
        return _cosine(1.0, 1 / 25 / 1e4, (t - up) / (epochs - up))
    warm = 1.0
    if t < s.warmup_epochs:
        warm = s.warmup_start_factor + (1 - s.warmup_start_factor) * t / s.warmup_epochs
    if s.name == "step":  # per epoch, as the tutorial's StepLR
        return warm * s.gamma ** (epoch // s.step_size)
    if s.name == "cosine":
        rest = epochs - s.warmup_epochs
        return warm * (_cosine(1.0, 0.0, (t - s.warmup_epochs) / rest) if rest > 0 else 1.0)
    return warm  # constant


def lrs_at(cfg: Config, epoch: int, t: float | None = None) -> list[float]:
    """The learning rates of [head, backbone] at position ``t`` (default: the epoch's start)."""
    f = lr_factor(cfg.scheduler, cfg.train.epochs, epoch, float(epoch) if t is None else t)
    return [lr * f for lr in base_lrs(cfg)]


def varies_within_epoch(cfg: Config) -> bool:
    """Whether the learning rate changes from one optimizer step to the next inside an epoch."""
    s = cfg.scheduler
    return s.name in ("cosine", "onecycle") or s.warmup_epochs > 0


def set_lrs(optimizer: torch.optim.Optimizer, cfg: Config, epoch: int, t: float | None = None) -> list[float]:
    """Put the learning rates at position ``t`` into the optimizer's groups (a group's ``lr_scale``:
    its block's optim.layer_decay factor); returns [head, backbone]."""
    lrs = lrs_at(cfg, epoch, t)
    for g, part in zip(optimizer.param_groups, group_parts(cfg, len(optimizer.param_groups))):
        g["lr"] = lrs[part] * g.get("lr_scale", 1.0)
    return lrs


def group_parts(cfg: Config, groups: int) -> list[int]:
    """Which part (0 head, 1 backbone) each of the optimizer's ``groups`` belongs to, in
    build_optimizer's order: the head's group (or two), then the backbone's."""
    head = 1 if cfg.optim.decay_bias_and_norm else 2
    return [0] * head + [1] * (groups - head)


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """SGD or AdamW over the new classifier and (unless frozen) the backbone, as groups with their
    own learning rates; with decay_bias_and_norm=false each part is split into the parameters that
    decay and the 1-D ones (biases, normalisation weights) that do not.

    In frozen_then_finetune the backbone is in the optimizer from the start; while it is frozen its
    parameters get no gradient and the optimizer leaves them (and their state) untouched.
    """
    o = cfg.optim
    head, backbone = heads.head_and_backbone(model)
    parts = [[(head, 1.0)]]
    if cfg.model.mode != "frozen":
        parts.append(layer_groups(model, cfg, backbone) if o.layer_decay is not None else [(backbone, 1.0)])
    groups = []
    for blocks, lr in zip(parts, base_lrs(cfg)):
        for params, scale in blocks:
            rate = {"lr": lr * scale, **({"lr_scale": scale} if o.layer_decay is not None else {})}
            if o.decay_bias_and_norm:
                groups.append({"params": params, **rate, "weight_decay": o.weight_decay})
            else:
                groups.append({"params": [p for p in params if p.ndim > 1], **rate, "weight_decay": o.weight_decay})
                groups.append({"params": [p for p in params if p.ndim <= 1], **rate, "weight_decay": 0.0})
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                 foreach=True)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                           weight_decay=o.weight_decay, foreach=True)


def layer_groups(model: torch.nn.Module, cfg: Config, backbone: list[torch.nn.Parameter]
                 ) -> list[tuple[list[torch.nn.Parameter], float]]:
    """optim.layer_decay: the backbone's parameters by block, stem first, each with its factor
    ``layer_decay ** (classifier's block - its block)``: timm's layer-wise decay (BEiT's), from the
    model's own block map. The classifier's block has factor 1; it is the head's group."""
    ids = timm_zoo.layer_ids(model, cfg.model.arch)
    top = max(ids.values())
    names = {id(p): n for n, p in model.named_parameters()}
    blocks: dict[int, list[torch.nn.Parameter]] = {}
    for p in backbone:
        blocks.setdefault(ids.get(names[id(p)], top), []).append(p)
    return [(blocks[b], cfg.optim.layer_decay ** (top - b)) for b in sorted(blocks)]


def class_weights(labels: list[int], num_classes: int) -> torch.Tensor:
    """train.class_weights=balanced: n / (classes x n_c) per class, over the classes the train split
    has (scikit-learn's "balanced"): the mean weight per sample is 1, so the loss keeps its scale."""
    counts = torch.bincount(torch.tensor(labels, dtype=torch.long), minlength=num_classes).double()
    present = int((counts > 0).sum())
    w = torch.where(counts > 0, len(labels) / (present * counts.clamp(min=1)), torch.zeros_like(counts))
    return w.float()


def positive_weights(labels: list[tuple[int, ...]], num_classes: int) -> torch.Tensor:
    """train.class_weights=balanced for multi_label: each class's positives weighted by its
    negatives / positives in the train split (BCE's pos_weight), so a rare label counts as much as
    its absence; 1 for a class with no positives."""
    positives = torch.zeros(num_classes, dtype=torch.float64)
    for label in labels:
        positives[list(label)] += 1
    n = len(labels)
    return torch.where(positives > 0, (n - positives) / positives.clamp(min=1), torch.ones_like(positives)).float()


class Schedule:
    """The run's learning rates, put into the optimizer at each epoch's start and, where they move
    within an epoch (warm-up, cosine, one-cycle), before every optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: Config, train_images: int) -> None:
        self.optimizer, self.cfg, self.train_images = optimizer, cfg, train_images
        self.within_epoch = varies_within_epoch(cfg)
        self.epoch_lrs: list[float] = []

    def start_epoch(self, epoch: int) -> list[float]:
        """The rates at the epoch's start, set; [head, backbone]."""
        self.epoch_lrs = set_lrs(self.optimizer, self.cfg, epoch)
        return self.epoch_lrs

    def before_optimizer_step(self, epoch: int, images_done: int) -> list[float]:
        """The rates for the step that follows ``images_done`` images of the epoch (the global count
        its earlier optimizer steps took: the same for any world size and accumulation)."""
        if not self.within_epoch:
            return self.epoch_lrs
        return set_lrs(self.optimizer, self.cfg, epoch, epoch + images_done / self.train_images)
