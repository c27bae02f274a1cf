"""Per-sample augmentation draws and the transforms, shared by every data path.

The rule that makes runs reproducible across world sizes, worker counts and resumes: every random
draw for a sample comes from ``sample_rng(seed, epoch, index)``, never from a global RNG, so it
does not depend on which rank or worker handles the sample, or on what ran before it.

The PIL path (``train_transform``) and the device path (``device_data``) both draw through
``train_draws``. The policies after the crop and flip (``data.augment``: torchvision's
TrivialAugmentWide, RandAugment, AutoAugment) and ``data.random_erasing`` use torchvision's own
operations and magnitudes, with every choice drawn from the same per-sample generator; they run on
the PIL path only (the loader falls back to it from ``data.cache: device`` and says so).
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
from torchvision.transforms import autoaugment as tv_auto
from torchvision.transforms import functional as F

from tl_dist.config import DataConfig


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


def fixed_train_transform(cfg: DataConfig) -> bool:
    """data.augment=none without random erasing: a training image comes out the same in every epoch
    (the eval transform), so it can be kept finished, and so can the frozen backbone's output for it."""
    return cfg.augment == "none" and cfg.random_erasing == 0


def host_only(cfg: DataConfig) -> str | None:
    """The augmentation keys the device path does not run, or None."""
    keys = ([f"data.augment={cfg.augment}"] if cfg.augment not in ("seed", "none") else []) + \
        ([f"data.random_erasing={cfg.random_erasing}"] if cfg.random_erasing > 0 else [])
    return ", ".join(keys) or None


def _signed(rng: random.Random, magnitude: float, signed: bool) -> float:
    return -magnitude if signed and rng.random() < 0.5 else magnitude


@functools.lru_cache(maxsize=16)
def _space(policy: str, size: int) -> dict[str, tuple[list[float], bool]]:
    """torchvision's operation table for ``policy``: name -> (magnitude bins, signed); made once."""
    if policy == "trivialaugment":
        space = tv_auto.TrivialAugmentWide()._augmentation_space(31)
    elif policy == "randaugment":
        space = tv_auto.RandAugment()._augmentation_space(31, (size, size))
    else:
        space = tv_auto.AutoAugment()._augmentation_space(10, (size, size))
    return {name: (mags.tolist() if mags.ndim > 0 else [], signed) for name, (mags, signed) in space.items()}


_AUTOAUGMENT_IMAGENET = tv_auto.AutoAugment(tv_auto.AutoAugmentPolicy.IMAGENET).policies


def policy_ops(rng: random.Random, policy: str, size: int) -> list[tuple[str, float]]:
    """The (operation, magnitude) list torchvision's policy would apply, drawn from ``rng``: its
    operation tables and magnitude bins, its choice rules."""
    if policy in ("seed", "none"):
        return []
    space = _space(policy, size)
    if policy == "trivialaugment":
        name = rng.choice(list(space))
        mags, signed = space[name]
        return [(name, _signed(rng, mags[rng.randrange(len(mags))] if mags else 0.0, signed))]
    if policy == "randaugment":  # torchvision's defaults: 2 operations at magnitude 9 of 31 bins
        ops = []
        for _ in range(2):
            name = rng.choice(list(space))
            mags, signed = space[name]
            ops.append((name, _signed(rng, mags[9] if mags else 0.0, signed)))
        return ops
    ops = []  # autoaugment: one of the ImageNet policy's sub-policies, each operation with its probability
    for name, p, idx in _AUTOAUGMENT_IMAGENET[rng.randrange(len(_AUTOAUGMENT_IMAGENET))]:
        if rng.random() <= p:
            mags, signed = space[name]
            ops.append((name, _signed(rng, mags[idx] if idx is not None else 0.0, signed)))
    return ops


def erase_box(rng: random.Random, height: int, width: int) -> Box | None:
    """torchvision's RandomErasing.get_params (scale 0.02-0.33, ratio 0.3-3.3), drawing from ``rng``."""
    area = height * width
    log_ratio = (math.log(0.3), math.log(3.3))
    for _ in range(10):
        target = area * rng.uniform(0.02, 0.33)
        aspect = math.exp(rng.uniform(*log_ratio))
        h, w = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if h < height and w < width:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    return None


PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def train_transform(img: Image.Image, rng: random.Random, cfg: DataConfig,
                    drawn_on: tuple[int, int] | None = None) -> torch.Tensor:
    """The tutorial's RandomResizedCrop + RandomHorizontalFlip, then data.augment's policy and
    data.random_erasing, as uint8 CHW (ToTensor/Normalize on device). Draws in that order.
    data.augment=none: the eval transform instead of the crop, flip and policy (erasing still applies).
    ``drawn_on``: the (width, height) of the original where ``img`` is a resized copy of it (the
    disk cache): the crop is drawn on the original's size, as every other path draws it, and
    taken from the same region of the copy."""
    if cfg.augment == "none":
        x = eval_transform(img, cfg.resize_size, cfg.image_size, cfg.interpolation)
    else:
        width, height = drawn_on or (img.width, img.height)
        (i, j, h, w), flip = train_draws(rng, width, height, cfg)
        if drawn_on is not None and drawn_on != img.size:
            sx, sy = img.width / width, img.height / height
            out = img.resize((cfg.image_size, cfg.image_size), PIL_FILTERS[cfg.interpolation],
                             box=(j * sx, i * sy, (j + w) * sx, (i + h) * sy))
        else:
            out = F.resized_crop(img, i, j, h, w, [cfg.image_size, cfg.image_size],
                                 interpolation=InterpolationMode(cfg.interpolation), antialias=True)
        out = F.hflip(out) if flip else out
        for name, magnitude in policy_ops(rng, cfg.augment, cfg.image_size):
            out = tv_auto._apply_op(out, name, magnitude, interpolation=InterpolationMode.NEAREST, fill=None)
        x = to_uint8_chw(out)
    if cfg.random_erasing > 0 and rng.random() < cfg.random_erasing:
        box = erase_box(rng, cfg.image_size, cfg.image_size)
        if box is not None:  # the mean colour: 0 after Normalize, as torchvision's value=0 there
            t, l, bh, bw = box
            x[:, t:t + bh, l:l + bw] = torch.tensor([round(m * 255) for m in cfg.mean], dtype=torch.uint8)[:, None, None]
    return x


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
