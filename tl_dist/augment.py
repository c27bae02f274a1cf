"""Per-sample augmentation draws and the transforms, shared by every data path.

The rule that makes runs reproducible across world sizes, worker counts and resumes: every random
draw for a sample comes from ``sample_rng(seed, epoch, index)``, never from a global RNG, so it
does not depend on which rank or worker handles the sample, or on what ran before it.

The PIL path (``train_transform``) and the device path (``device_data``) both draw through
``train_draws``; a new policy is one draw function here, used by both, plus its test.
Images leave as uint8 CHW (4x less to copy than float); ``normalize`` runs on the device, in batch.
"""
from __future__ import annotations

import functools
import math
import random

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from .config import DataConfig

Box = tuple[int, int, int, int]  # top, left, height, width


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    # str seeds are hashed with SHA-512: stable across processes and Python runs (unlike hash()).
    return random.Random(f"tl_dist:{seed}:{epoch}:{index}")


def rrc_params(rng: random.Random, width: int, height: int, scale: list[float], ratio: list[float]) -> Box:
    """torchvision's RandomResizedCrop.get_params, drawing from ``rng`` instead of the global RNG."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            i = rng.randint(0, height - h)
            j = rng.randint(0, width - w)
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_draws(rng: random.Random, width: int, height: int, cfg: DataConfig) -> tuple[Box, bool]:
    """One sample's augmentation draws, in the tutorial's order: the RandomResizedCrop box, then the
    RandomHorizontalFlip coin. Every data path draws through here."""
    box = rrc_params(rng, width, height, cfg.scale, cfg.ratio)
    return box, cfg.hflip and rng.random() < 0.5


def to_uint8_chw(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def train_transform(img: Image.Image, rng: random.Random, cfg: DataConfig) -> torch.Tensor:
    """The tutorial's RandomResizedCrop + RandomHorizontalFlip, as uint8 CHW (ToTensor/Normalize on device)."""
    (i, j, h, w), flip = train_draws(rng, img.width, img.height, cfg)
    out = F.resized_crop(img, i, j, h, w, [cfg.image_size, cfg.image_size],
                         interpolation=InterpolationMode(cfg.interpolation), antialias=True)
    return to_uint8_chw(F.hflip(out) if flip else out)


def eval_transform(img: Image.Image, resize_size: int, image_size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """The tutorial's val transform: Resize(resize_size) + CenterCrop(image_size), as uint8 CHW."""
    img = F.resize(img, [resize_size], interpolation=InterpolationMode(interpolation), antialias=True)
    return to_uint8_chw(F.center_crop(img, [image_size, image_size]))


@functools.lru_cache(maxsize=8)
def _mean_std(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Made once per device: a fresh tensor each step would be a host-to-GPU copy each step.
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255,
            torch.tensor(std, device=device).view(1, 3, 1, 1) * 255)


def normalize(x: torch.Tensor, mean: list[float], std: list[float], channels_last: bool) -> torch.Tensor:
    """uint8 NCHW batch on any device -> float, normalised as ToTensor + Normalize would."""
    m, s = _mean_std(tuple(mean), tuple(std), x.device)
    x = (x.float() - m) / s
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
