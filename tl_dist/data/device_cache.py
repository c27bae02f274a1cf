"""Decoded train images held in the device's memory and augmented there, a batch at a time.

With the images on the GPU the CPU loader is out of the way: per step the host draws the crop boxes
and flips (the same draws as the PIL path, from (seed, epoch, index)), and the device crops,
resizes (bilinear or bicubic, antialiased, like PIL) and flips. The val set's finished crops sit
there too (and the train set's, when its transform is fixed: data.augment=none). Works on any device; on a CPU it is only useful for testing this path. The first batch
is checked against the PIL path (``disagreement``); a CUDA error here names data.cache.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import torch
from PIL import Image

from tl_dist.data.augment import sample_rng, to_uint8_chw, train_draws
from tl_dist.config import DataConfig
from tl_dist.errors import UserError, first_line
from tl_dist.data.images import BadImage
from tl_dist.data import targets


# data.py's batch samplers: per step, this rank's (sample index, epoch, weight) keys.
BatchSampler = Sequence[list[tuple[int, int, float]]]


# The antialiased resampling F.interpolate dispatches to, called directly: at batch 256 a step makes
# 256 of these calls, and interpolate's argument checks in Python cost more host time than the
# kernel launch itself. Same kernels, same bits (tests/test_data.py compares them).
_RESAMPLE = {"bilinear": getattr(torch._C._nn, "_upsample_bilinear2d_aa", None),
             "bicubic": getattr(torch._C._nn, "_upsample_bicubic2d_aa", None)}


def crop_resize_flip(images: list[torch.Tensor], boxes: list[tuple[int, int, int, int]], flips: list[bool],
                     size: int, mode: str = "bilinear") -> torch.Tensor:
    """uint8 CHW images of any size -> uint8 [N, 3, size, size]: RandomResizedCrop's resampling + flip.

    The same arithmetic as torchvision's resized_crop on a uint8 tensor (float, antialiased
    bilinear or bicubic, round, clamp), with the per-image part cut to two kernels (to float, resample
    into the batch) and the rest done once for the batch: per image, the host's time is the cost.
    """
    out = torch.empty(len(images), images[0].shape[0], size, size, dtype=torch.float32, device=images[0].device)
    resample = _RESAMPLE.get(mode)
    if resample is None:  # (a torch without the private entry point: the public one, same kernels)
        for k, (img, (i, j, h, w)) in enumerate(zip(images, boxes)):
            out[k] = torch.nn.functional.interpolate(img[None, :, i:i + h, j:j + w].float(), size=(size, size),
                                                     mode=mode, antialias=True, align_corners=False)[0]
    else:
        shape = [size, size]
        for slot, img, (i, j, h, w) in zip(out.split(1), images, boxes):
            resample(img[None, :, i:i + h, j:j + w].float(), shape, False, None, None, out=slot)
    out = out.round_().clamp_(0, 255).to(torch.uint8)
    if any(flips):
        # non_blocking: a blocking host-to-GPU copy would make the host wait for the GPU every step
        which = torch.tensor(flips).to(out.device, non_blocking=True)
        out = torch.where(which.view(-1, 1, 1, 1), out.flip(-1), out)
    return out


class DeviceTrainLoader:
    """Yields what the DataLoader path yields, (x uint8, label, weight, index), built on the device.

    An image that failed to decode when the store was filled comes back as a zero image with weight
    0 and index -1-i, as in ImageDataset, so every rank keeps running and the loop reports the path.
    """

    def __init__(self, images: list[torch.Tensor | None], labels: list, sampler: BatchSampler,
                 cfg: DataConfig, seed: int, device: torch.device, num_classes: int = 0):
        self.images, self.labels, self.sampler, self.num_classes = images, labels, sampler, num_classes
        self.multi_label = bool(labels) and isinstance(labels[0], tuple)
        self.cfg, self.seed, self.device = cfg, seed, device

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for keys in self.sampler:
            with device_errors("augmenting on the device"):
                batch = self.batch(keys)
            yield batch

    def batch(self, keys: list[tuple[int, int, float]]):
        s = self.cfg.image_size
        blank = torch.zeros(3, s, s, dtype=torch.uint8, device=self.device)
        imgs, boxes, flips, y, w, idx = [], [], [], [], [], []
        for index, epoch, weight in keys:
            img = self.images[index]
            if img is None:
                imgs.append(blank)
                boxes.append((0, 0, s, s))
                flips.append(False)
                y.append(targets.blank(self.multi_label, self.num_classes))
                w.append(0.0)
                idx.append(-1 - index)
                continue
            box, flip = train_draws(sample_rng(self.seed, epoch, index), img.shape[2], img.shape[1], self.cfg)
            imgs.append(img)
            boxes.append(box)
            flips.append(flip)
            y.append(targets.target(self.labels[index], self.num_classes))
            w.append(weight)
            idx.append(index)
        return (crop_resize_flip(imgs, boxes, flips, s, self.cfg.interpolation), targets.batch(y, self.num_classes),
                torch.tensor(w, dtype=torch.float64), torch.tensor(idx))


@contextlib.contextmanager
def device_errors(doing: str):
    """A CUDA error (out of memory, a faulting kernel) in the device cache path, as one line naming
    the feature and the key that avoids it."""
    try:
        yield
    except RuntimeError as e:  # torch.OutOfMemoryError and torch.AcceleratorError are RuntimeErrors
        if "CUDA" not in str(e) and "out of memory" not in str(e) and not isinstance(e, torch.OutOfMemoryError):
            raise
        raise UserError(f"data.cache=device: {first_line(e)[:200]} while {doing}; set data.cache=ram to keep "
                        f"the images in host memory (or a smaller data.device_cache_gb)") from e


# Pixel agreement of the device path with the PIL path, in uint8 levels: float resampling differs
# from Pillow's fixed point by about a level (the first-batch check and the doctor use these bounds); a
# wrong crop or flip is tens of levels off.
AGREE_MEAN, AGREE_MAX = 1.0, 4


def disagreement(loader: DeviceTrainLoader, pil_item: Callable[[tuple[int, int, float]], tuple]) -> str | None:
    """The first batch through the device path against the PIL path for the same samples: None if
    they agree, else how far apart they are. A fault in the device code (or the GPU's kernels) shows
    here, before it trains on wrong images."""
    keys = next(iter(loader.sampler), None)
    if not keys:
        return None
    ours = loader.batch(keys)[0].cpu().float()
    ref = torch.stack([pil_item(k)[0] for k in keys]).float()
    if ours.shape != ref.shape:
        return f"shape {tuple(ours.shape)} against {tuple(ref.shape)}"
    diff = (ours - ref).abs()
    if diff.mean() > AGREE_MEAN or diff.max() > AGREE_MAX:
        return f"mean difference {diff.mean():.2f}, max {diff.max():.0f} of 255"
    return None


class DeviceCropLoader:
    """Finished crops (val; train with a fixed transform) in one device tensor, sliced by the rank's
    batch sampler. A sample's weight is its key's (0 for padding), and 0 where it failed to decode."""

    def __init__(self, crops: torch.Tensor, labels: list, ok: list[bool], sampler: BatchSampler, num_classes: int = 0):
        self.crops, self.sampler = crops, sampler
        self.labels, self.ok = targets.batch(labels, num_classes), torch.tensor(ok)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for keys in self.sampler:
            ids = torch.tensor([k[0] for k in keys])
            ok = self.ok[ids]
            w = torch.tensor([k[2] for k in keys], dtype=torch.float64) * ok
            yield (self.crops[ids.to(self.crops.device, non_blocking=True)], self.labels[ids], w,
                   torch.where(ok, ids, -1 - ids))


def train_loader(decode: Callable[[int], Image.Image], labels: list, sampler: BatchSampler, cfg: DataConfig,
                 seed: int, device: torch.device, threads: int, num_classes: int = 0) -> DeviceTrainLoader:
    """Decodes every train image once, in threads, straight into device memory (the host holds only
    the images in flight, not the whole set)."""
    def one(i: int) -> torch.Tensor | None:
        try:
            return to_uint8_chw(decode(i)).to(device)
        except BadImage:
            return None  # drawn as a weight-0 placeholder; the loop reports the path

    with device_errors("filling the device cache"), ThreadPoolExecutor(max(1, threads)) as ex:
        images = list(ex.map(one, range(len(labels))))
    return DeviceTrainLoader(images, labels, sampler, cfg, seed, device, num_classes)


def crop_loader(crops: dict[int, torch.Tensor], labels: list, sampler: BatchSampler, image_size: int,
                device: torch.device, num_classes: int = 0) -> DeviceCropLoader:
    """The finished crops (index -> uint8 CHW; a missing index failed to decode) in one device tensor."""
    ok = [i in crops for i in range(len(labels))]
    blank = torch.zeros(3, image_size, image_size, dtype=torch.uint8)
    with device_errors("filling the device cache"):
        stacked = torch.stack([crops.pop(i) if ok[i] else blank for i in range(len(labels))]).to(device)
    return DeviceCropLoader(stacked, labels, ok, sampler, num_classes)
