"""MixUp and CutMix (train.mixup_alpha, train.cutmix_alpha, train.mix_prob) with soft targets.

The rule that keeps them world-size free: each micro-batch (one rank's batch of one step) is mixed
within itself, every image with the one before it (``roll(1)``, torchvision's pairing), with draws
from (seed, epoch, global micro-batch index). Rank r's micro-batch at step s is the global
micro-batch ``s x W + r``: the same images, in the same order, as micro-batch ``s x W + r`` of one
process with the same batch accumulating W steps (the rule BatchNorm already follows), so the
two take exactly the same steps. Padding samples (weight 0) never reach the loss.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch


@dataclass
class Mix:
    """A mixed micro-batch's second targets and the weight ``lam`` of the first."""
    y2: torch.Tensor
    lam: float
    kind: str  # mixup or cutmix


def draw(seed: int, epoch: int, micro_batch: int, mixup_alpha: float, cutmix_alpha: float, prob: float,
         height: int, width: int) -> tuple[str, float, tuple[int, int, int, int] | None] | None:
    """(kind, lam, cutmix box) for one micro-batch, or None when it is left unmixed."""
    rng = random.Random(f"tl_dist:mix:{seed}:{epoch}:{micro_batch}")
    if rng.random() >= prob:
        return None
    kind = ("cutmix" if rng.random() < 0.5 else "mixup") if mixup_alpha > 0 and cutmix_alpha > 0 else \
        ("cutmix" if cutmix_alpha > 0 else "mixup")
    lam = rng.betavariate(*(2 * [cutmix_alpha if kind == "cutmix" else mixup_alpha]))
    if kind == "mixup":
        return kind, lam, None
    # torchvision's CutMix box: a (1 - lam) share of the area, centred anywhere, clipped; lam is
    # then the share of the image that stayed.
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = rng.randrange(height), rng.randrange(width)
    top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, height)
    left, right = max(cx - cw // 2, 0), min(cx + cw // 2, width)
    return kind, 1.0 - (bottom - top) * (right - left) / (height * width), (top, bottom, left, right)


def apply(x: torch.Tensor, y: torch.Tensor, drawn) -> tuple[torch.Tensor, Mix | None]:
    """The mixed batch (normalised images) and its Mix; unchanged and None when ``drawn`` is None."""
    if drawn is None:
        return x, None
    kind, lam, box = drawn
    other = x.roll(1, 0)
    if kind == "mixup":
        x = x * lam + other * (1.0 - lam)
    else:
        top, bottom, left, right = box
        x = x.clone()
        x[:, :, top:bottom, left:right] = other[:, :, top:bottom, left:right]
    return x, Mix(y.roll(1, 0), lam, kind)
