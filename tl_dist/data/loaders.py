"""ImageFolder splits, a decoded-image cache, world-size-free sampling, and the loaders.

Two properties make runs reproducible across world sizes and resumable bit for bit:
- the global sample order of an epoch is a function of (seed, epoch) only, and the global batch of
  step k holds the same samples whether one process takes all of it or W processes a slice each;
- every augmentation draw is a function of (seed, epoch, sample index) only (see ``augment``), so
  it does not depend on the rank, the world size or the number of loader workers.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from tl_dist.data.augment import eval_transform, fixed_train_transform, host_only, sample_rng, train_transform
from tl_dist.config import DataConfig
from tl_dist.data import device_cache, disk_cache, targets
from tl_dist.data.images import FILES, BadImage, Files
from tl_dist.data.listing import Sample
from tl_dist.data.samplers import EvalBatchSampler, TrainBatchSampler, eval_batch_size, eval_count




class ImageDataset(Dataset):
    """Indexed by keys (index, epoch, weight) from the batch samplers below.

    Returns (image uint8 CHW, label, weight, index). A file that fails to decode during training
    (changed since the pre-flight scan) comes back as a zero image with weight 0 and index -1-i,
    so every rank keeps running and the loop can report the path.
    """

    def __init__(self, samples: list[Sample], cfg: DataConfig, train: bool, seed: int,
                 cache: dict[int, object] | None = None, num_classes: int = 0, reader: Files = FILES):
        self.samples, self.cfg, self.train, self.seed = samples, cfg, train, seed
        self.reader = reader  # image files, tar shards or a dataset's rows
        self.disk: disk_cache.DiskImages | None = None  # data.cache=disk: the images, decoded and resized
        self.disk_start = 0  # this part's first row in it
        self.cache = cache or {}
        self.num_classes = num_classes  # (the length of a multi-hot label)
        self.multi_label = bool(samples) and isinstance(samples[0][1], tuple)

    def __len__(self) -> int:
        return len(self.samples)

    def _decoded(self, index: int) -> Image.Image:
        hit = self.cache.get(index)
        return hit if hit is not None else self.reader.load(self.samples[index][0])

    @property
    def fixed(self) -> bool:
        """Each image comes out the same in every epoch: val, and train with data.augment=none."""
        return not self.train or fixed_train_transform(self.cfg)

    def transformed(self, index: int, epoch: int) -> torch.Tensor:
        hit = self.cache.get(index)
        if isinstance(hit, torch.Tensor):  # a fixed transform: cached fully done
            return hit
        if self.disk is not None and self.disk.ok(self.disk_start + index):
            img, original = self.disk.image(self.disk_start + index)  # (resized as the eval transform resizes)
            if self.train:
                return train_transform(img, sample_rng(self.seed, epoch, index), self.cfg, drawn_on=original)
            return eval_transform(img, self.cfg.resize_size, self.cfg.image_size, self.cfg.interpolation)
        if self.train:
            return train_transform(self._decoded(index), sample_rng(self.seed, epoch, index), self.cfg)
        return eval_transform(self._decoded(index), self.cfg.resize_size, self.cfg.image_size, self.cfg.interpolation)

    def __getitem__(self, key: tuple[int, int, float]):
        index, epoch, weight = key
        try:
            img = self.transformed(index, epoch)
        except BadImage:
            s = self.cfg.image_size
            return torch.zeros(3, s, s, dtype=torch.uint8), targets.blank(self.multi_label, self.num_classes), 0.0, \
                -1 - index
        return img, targets.target(self.samples[index][1], self.num_classes), weight, index


# What a decoded image costs beyond its pixels (Pillow's objects, the allocator's slack): measured
# 5.2 KB for a 32x32 image's 3 KB, so a million small images need 5 GB, not 3.
DECODED_OVERHEAD = 2048


def decoded_bytes(sizes: list[tuple[int, int]]) -> int:
    return sum(w * h * 3 for w, h in sizes)


def fill_cache(ds: ImageDataset, indices: list[int], threads: int) -> dict[int, object]:
    """Decode once, in parallel (Pillow releases the GIL while decoding)."""
    def one(i: int):
        try:  # train: the decoded image (crops differ every epoch); a fixed transform: the finished crop
            return i, ds.transformed(i, 0) if ds.fixed else ds._decoded(i)
        except BadImage:
            return i, None  # left out of the cache; the loader reports it when it is drawn

    with ThreadPoolExecutor(max(1, threads)) as ex:
        return {i: v for i, v in ex.map(one, indices) if v is not None}


@dataclass
class Data:
    classes: list[str]
    train: ImageDataset
    val: ImageDataset
    train_loader: Iterable
    val_loader: Iterable
    train_sampler: TrainBatchSampler
    cache: str  # where decoded images are kept: ram, device or none
    workers: int  # loader workers actually used
    warning: str | None = None  # for the run's log: a data path that was given up, and why

    def describe(self, device) -> str:
        """The data path in a few words, for logs and benchmark tables."""
        if self.cache == "device":
            if self.train.fixed:
                return f"finished crops (data.augment=none) kept in {device.type} memory"
            return f"decoded once, kept in {device.type} memory; crop/resize/flip on {device.type} in batches"
        if self.cache == "ram":
            source = "finished crops (data.augment=none) kept in RAM" if self.train.fixed else "decoded once, kept in RAM"
        elif self.cache == "disk":
            source = "decoded once into the disk cache (memory-mapped, resized to data.resize_size)"
        else:
            source = "images decoded every epoch"
        augment = "" if self.train.fixed else "PIL augment, "
        return f"{source}; {augment}{self.workers} loader worker(s); normalise on {device.type}"


def _loader(ds: ImageDataset, sampler, workers: int, pin: bool) -> DataLoader:
    return DataLoader(ds, batch_sampler=sampler, num_workers=workers, pin_memory=pin,
                      persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)


def gpu_memory_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).total_memory


def cache_place(cfg: DataConfig, train: list[Sample], val: list[Sample], sizes, device: torch.device) -> str:
    """Where decoded images go: ``cache`` as configured, or for ``auto`` the fastest place they fit."""
    if cfg.cache != "auto":
        return cfg.cache
    known = [sizes[p] for p, _ in train if p in sizes] if sizes else []
    if not known:
        return "disk" if cfg.cache_dir else "none"
    crop = 3 * cfg.image_size ** 2  # a finished crop (val; train with a fixed transform)
    train_need = len(train) * crop if fixed_train_transform(cfg) else \
        (decoded_bytes(known) / len(known) + DECODED_OVERHEAD) * len(train)
    need = train_need + len(val) * crop
    if device.type == "cuda":
        # By default half the GPU's memory (the other half for the model's training): an H200
        # holds 64,000 decoded photo-sized images (0.7 MB each: 45 GB), a 24 GB card 8,000.
        budget = cfg.device_cache_gb * 2**30 if cfg.device_cache_gb is not None else gpu_memory_bytes(device) / 2
        if need <= budget:
            return "device"
    if need <= cfg.cache_gb * 2**30:
        return "ram"
    return "disk" if cfg.cache_dir else "none"  # (disk only where a folder for it was named)


def build(cfg: DataConfig, classes: list[str], train: list[Sample], val: list[Sample], *,
          seed: int, world: int = 1, rank: int = 0, device: torch.device = torch.device("cpu"),
          sizes: dict[str, tuple[int, int]] | None = None, limit_train: float | None = None,
          limit_val: float | None = None, reader: Files = FILES, disk_folder: Path | None = None,
          log: Callable[[str], None] = print) -> Data:
    """Datasets and loaders for this rank. ``sizes`` (from the scan) lets cache: auto decide cheaply.
    ``limit_train`` / ``limit_val``: train.limit_*_batches (the epochs' first global batches).
    ``reader``: where the samples' images come from (files, shards, a dataset). ``disk_folder``:
    where data.cache=disk keeps its file."""
    train_ds = ImageDataset(train, cfg, train=True, seed=seed, num_classes=len(classes), reader=reader)
    val_ds = ImageDataset(val, cfg, train=False, seed=seed, num_classes=len(classes), reader=reader)
    place = cache_place(cfg, train, val, sizes, device)
    threads = os.cpu_count() or 1
    warning = None
    if place == "device" and host_only(cfg):
        warning = (f"note: {host_only(cfg)} runs on the host (PIL) path: decoded images are kept in RAM "
                   f"(data.cache=ram) instead of on the {device.type}")
        place = "ram"
    if place == "ram":  # (device: decoded straight into device memory below)
        train_ds.cache = fill_cache(train_ds, list(range(len(train))), threads)
    if place == "disk":
        disk = disk_cache.open_or_build(disk_folder or Path("image_cache"), [p for p, _ in train + val], sizes or {},
                                        reader.load, cfg.resize_size, cfg.interpolation, log, threads)
        train_ds.disk, val_ds.disk, val_ds.disk_start = disk, disk, len(train)
    if place not in ("none", "disk"):
        # The val transform is deterministic, so its cache holds finished uint8 crops (small).
        val_ds.cache = fill_cache(val_ds, list(range(len(val))), threads)
    sampler = TrainBatchSampler(len(train), cfg.batch_size, world, rank, seed,
                                balanced_labels=[y for _, y in train] if cfg.sampler == "balanced" else None)
    sampler.limit = limit_train
    eval_batch = eval_batch_size(cfg.eval_batch_size, cfg.batch_size)
    eval_sampler = EvalBatchSampler(eval_count(len(val), eval_batch, limit_val), eval_batch, world, rank)
    if place == "device" and fixed_train_transform(cfg):  # finished crops, as val's: nothing to augment
        train_ds.cache = fill_cache(train_ds, list(range(len(train))), threads)
        return Data(classes, train_ds, val_ds,
                    device_cache.crop_loader(train_ds.cache, [label for _, label in train], sampler, cfg.image_size,
                                             device, len(classes)),
                    device_cache.crop_loader(val_ds.cache, [label for _, label in val], eval_sampler, cfg.image_size,
                                             device, len(classes)),
                    sampler, place, 0)
    if place == "device":
        train_labels, val_labels = [label for _, label in train], [label for _, label in val]
        train_loader = device_cache.train_loader(train_ds._decoded, train_labels, sampler, cfg, seed, device, threads,
                                                 len(classes))
        problem = device_cache.disagreement(train_loader, train_ds.__getitem__)
        if problem is None:
            return Data(classes, train_ds, val_ds, train_loader,
                        device_cache.crop_loader(val_ds.cache, val_labels, eval_sampler, cfg.image_size, device,
                                                 len(classes)),
                        sampler, place, 0)
        del train_loader
        warning = (f"warning: data.cache=device: the {device.type} augmentation disagrees with the PIL path on "
                   f"the first batch ({problem}); training on the host path (data.cache=ram) instead")
        place = "ram"
        train_ds.cache = fill_cache(train_ds, list(range(len(train))), threads)
    pin = device.type == "cuda"
    # Training on the CPU from the RAM cache: what is left to load is light, and loader workers
    # would only take cores from the model (docs/performance.md: 0 workers is fastest on the CPU).
    workers = 0 if place == "ram" and not pin else cfg.num_workers  # (disk: crops still to make, workers help)
    return Data(classes, train_ds, val_ds, _loader(train_ds, sampler, workers, pin),
                _loader(val_ds, eval_sampler, 0 if place == "ram" else workers, pin), sampler, place, workers,
                warning)
