"""ImageFolder splits, a decoded-image cache, world-size-free sampling, and the loaders.

Two properties make runs reproducible across world sizes and resumable bit for bit:
- the global sample order of an epoch is a function of (seed, epoch) only, and the global batch of
  step k holds the same samples whether one process takes all of it or W processes a slice each;
- every augmentation draw is a function of (seed, epoch, sample index) only (see ``augment``), so
  it does not depend on the rank, the world size or the number of loader workers.
"""
from __future__ import annotations

import math
import os
import random
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .augment import eval_transform, host_only, sample_rng, train_transform
from .config import DataConfig
from .errors import UserError, printable
from . import device_data
from .images import IMAGE_EXTENSIONS, BadImage, list_images, load_rgb

Sample = tuple[str, int]  # (path, class index)


# ----------------------------------------------------------------------------- folders

def list_split(root: Path, split: str) -> tuple[list[str], list[Sample]]:
    """ImageFolder's layout: root/split/<class>/<image>. Returns (classes, samples), sorted."""
    d = root / split
    if not d.is_dir():
        raise UserError(f"data: split folder not found: {d} (data.root must hold train/ and val/, "
                        f"one sub-folder per class)")
    # (__MACOSX: the resource forks macOS's zip puts beside the real folders)
    classes = sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith(".")
                     and e.name != "__MACOSX")
    for c in classes:
        if printable(c) != c:  # the name would reach terminals, checkpoints and plots as it is
            raise UserError(f"data: class folder {d / c} has control characters in its name; rename it")
    if not classes:
        raise UserError(f"data: {d} has no class sub-folders (expected {d}/<class>/<image>)")
    samples = [(path, ci) for ci, c in enumerate(classes) for path in list_images(os.path.join(d, c))]
    present = {ci for _, ci in samples}
    empty = [c for ci, c in enumerate(classes) if ci not in present]
    if samples and empty:
        raise UserError(f"data: class folder(s) under {d} with no image files: {', '.join(empty[:5])}"
                        f"{' ...' if len(empty) > 5 else ''}; add images or remove the folder(s)")
    if not samples:
        raise UserError(f"data: split {d} is empty: no image files ({', '.join(IMAGE_EXTENSIONS)}) "
                        f"under its class folders")
    return classes, samples


def list_splits(root: str) -> tuple[list[str], list[Sample], list[Sample]]:
    r = Path(root).expanduser()
    if not r.is_dir():
        raise UserError(f"data: data.root not found: {r} (a folder holding train/ and val/; "
                        f"see the README for the hymenoptera data or configs/demo.yaml)")
    train_classes, train = list_split(r, "train")
    val_classes, val = list_split(r, "val")
    if train_classes != val_classes:
        only_t = sorted(set(train_classes) - set(val_classes))
        only_v = sorted(set(val_classes) - set(train_classes))
        raise UserError(f"data: train and val must have the same classes under {r}: "
                        f"only in train: {only_t or 'none'}; only in val: {only_v or 'none'}")
    if len(train_classes) < 2:
        raise UserError(f"data: {r}/train has {len(train_classes)} class; a classifier needs at least 2")
    return train_classes, train, val


CONTENT_CHECK_FILES = 50_000  # up to this many images, ranks compare their bytes too (ends of each file)


def identity(root: str, classes: list[str], train: list[Sample], val: list[Sample], deep: bool) -> dict:
    """What this process sees under ``root``, to compare across processes (machines may hold
    different copies of a data set): the classes, each split's count and a hash of its relative
    paths and labels; with ``deep``, a hash of every file's size, and up to CONTENT_CHECK_FILES
    images a hash of their first and last kB too (pixels that differ change the compressed bytes
    at the end of the file, where the data is)."""
    import hashlib

    r = str(Path(root).expanduser())
    out: dict = {"classes": classes}
    everything = train + val
    for split, samples in (("train", train), ("val", val)):
        h = hashlib.blake2b(digest_size=12)
        for path, label in samples:
            h.update(f"{os.path.relpath(path, r)}\0{label}\n".encode("utf-8", "surrogateescape"))
        out[split] = {"images": len(samples), "names": h.hexdigest()}
    if not deep:
        return out

    def ends(path: str) -> bytes:
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode) or len(everything) > CONTENT_CHECK_FILES:
                return f"{st.st_mode >> 12}:{st.st_size}".encode()  # (a pipe is never opened: it would wait)
            with open(path, "rb") as f:
                head = f.read(1024)
                f.seek(max(0, st.st_size - 1024))
                return f"{st.st_size}:".encode() + head + f.read()
        except OSError as e:
            return f"unreadable {e.errno}".encode()
    with ThreadPoolExecutor(min(32, (os.cpu_count() or 1) * 4)) as pool:
        h = hashlib.blake2b(digest_size=12)
        for b in pool.map(ends, [p for p, _ in everything], chunksize=64):
            h.update(hashlib.blake2b(b, digest_size=12).digest())
    out["content"] = {"hash": h.hexdigest(),
                      "what": "file sizes" if len(everything) > CONTENT_CHECK_FILES else "file sizes and bytes"}
    return out


# ----------------------------------------------------------------------------- datasets

class ImageDataset(Dataset):
    """Indexed by keys (index, epoch, weight) from the batch samplers below.

    Returns (image uint8 CHW, label, weight, index). A file that fails to decode during training
    (changed since the pre-flight scan) comes back as a zero image with weight 0 and index -1-i,
    so every rank keeps running and the loop can report the path.
    """

    def __init__(self, samples: list[Sample], cfg: DataConfig, train: bool, seed: int,
                 cache: dict[int, object] | None = None):
        self.samples, self.cfg, self.train, self.seed = samples, cfg, train, seed
        self.cache = cache or {}

    def __len__(self) -> int:
        return len(self.samples)

    def _decoded(self, index: int) -> Image.Image:
        hit = self.cache.get(index)
        return hit if hit is not None else load_rgb(self.samples[index][0])

    def transformed(self, index: int, epoch: int) -> torch.Tensor:
        if self.train:
            return train_transform(self._decoded(index), sample_rng(self.seed, epoch, index), self.cfg)
        hit = self.cache.get(index)
        if isinstance(hit, torch.Tensor):  # the val transform is deterministic: cached fully done
            return hit
        return eval_transform(self._decoded(index), self.cfg.resize_size, self.cfg.image_size, self.cfg.interpolation)

    def __getitem__(self, key: tuple[int, int, float]):
        index, epoch, weight = key
        try:
            img = self.transformed(index, epoch)
        except BadImage:
            s = self.cfg.image_size
            return torch.zeros(3, s, s, dtype=torch.uint8), 0, 0.0, -1 - index
        return img, self.samples[index][1], weight, index


def decoded_bytes(sizes: list[tuple[int, int]]) -> int:
    return sum(w * h * 3 for w, h in sizes)


def fill_cache(ds: ImageDataset, indices: list[int], threads: int) -> dict[int, object]:
    """Decode once, in parallel (Pillow releases the GIL while decoding)."""
    def one(i: int):
        try:  # train: the decoded image (crops differ every epoch); val: the finished crop
            return i, ds._decoded(i) if ds.train else ds.transformed(i, 0)
        except BadImage:
            return i, None  # left out of the cache; the loader reports it when it is drawn

    with ThreadPoolExecutor(max(1, threads)) as ex:
        return {i: v for i, v in ex.map(one, indices) if v is not None}


# ----------------------------------------------------------------------------- samplers

def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def balanced_order(labels: list[int], seed: int, epoch: int) -> list[int]:
    """data.sampler=balanced: len(labels) draws with replacement, each class equally likely
    (each image weighted 1 / its class's count), from (seed, epoch) alone: one global order."""
    counts: dict[int, int] = {}
    for y in labels:
        counts[y] = counts.get(y, 0) + 1
    rng = random.Random(f"tl_dist:balanced:{seed}:{epoch}")
    return rng.choices(range(len(labels)), weights=[1 / counts[y] for y in labels], k=len(labels))


# An image drawn k times in one epoch (data.sampler=balanced) takes its k-th augmentation draws from
# the key epoch + k x this: distinct from every real epoch (train.epochs is at most 1,000,000).
REPEAT_STRIDE = 1 << 20


def draw_epochs(order: list[int], epoch: int) -> list[int]:
    """The augmentation key of each position: the epoch, moved on for a repeat of an earlier image."""
    seen: dict[int, int] = {}
    keys = []
    for i in order:
        k = seen.get(i, 0)
        seen[i] = k + 1
        keys.append(epoch + k * REPEAT_STRIDE)
    return keys


class TrainBatchSampler:
    """Global batches of batch_size * world samples in (seed, epoch) order; this rank's slice of each.

    The last global batch may be short. A rank whose slice is empty (or holds one sample) is padded
    to two samples with weight 0, so every rank runs the same number of steps (DDP needs that) and
    BatchNorm has more than one value per channel, while the padding never reaches the loss. A lone
    sample is padded with a copy of itself: a duplicated sample has the same batch mean and variance,
    so in train mode BatchNorm normalises it exactly as it would alone. ``global_count(step)`` is
    the number of real samples in a global step.
    """

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int, shuffle: bool = True,
                 balanced_labels: list[int] | None = None):
        self.n, self.bs, self.world, self.rank, self.seed, self.shuffle = n, batch_size, world, rank, seed, shuffle
        self.labels = balanced_labels  # data.sampler=balanced: draw classes equally often
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / (self.bs * self.world))

    def global_count(self, step: int) -> int:
        g = self.bs * self.world
        return min(g, self.n - step * g)

    def __iter__(self) -> Iterator[list[tuple[int, int, float]]]:
        if self.labels is not None:
            order = balanced_order(self.labels, self.seed, self.epoch)
        else:
            order = epoch_order(self.n, self.seed, self.epoch) if self.shuffle else list(range(self.n))
        slots = list(zip(order, draw_epochs(order, self.epoch)))  # (image, its augmentation key)
        g = self.bs * self.world
        for step in range(len(self)):
            chunk = slots[step * g:(step + 1) * g]
            mine = chunk[self.rank * self.bs:(self.rank + 1) * self.bs]
            keys = [(i, e, 1.0) for i, e in mine]
            # At least 2 per step: BatchNorm in train mode cannot normalise a single 1x1 feature map.
            pool = mine or chunk
            while len(keys) < 2:
                i, e = pool[len(keys) % len(pool)]
                keys.append((i, e, 0.0))
            yield keys


class EvalBatchSampler:
    """A contiguous, unpadded shard per rank: every sample is evaluated exactly once."""

    def __init__(self, n: int, batch_size: int, world: int, rank: int):
        lo, hi = n * rank // world, n * (rank + 1) // world
        self.indices = list(range(lo, hi))
        self.bs = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.bs)

    def __iter__(self):
        for s in range(0, len(self.indices), self.bs):
            yield [(i, 0, 1.0) for i in self.indices[s:s + self.bs]]


# ----------------------------------------------------------------------------- build

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
            return f"decoded once, kept in {device.type} memory; crop/resize/flip on {device.type} in batches"
        source = "decoded once, kept in RAM" if self.cache == "ram" else "image files decoded every epoch"
        return f"{source}; PIL augment, {self.workers} loader worker(s); normalise on {device.type}"


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
        return "none"
    need = decoded_bytes(known) * len(train) / len(known) + len(val) * 3 * cfg.image_size ** 2
    if device.type == "cuda":
        # By default half the GPU's memory (the other half for the model's training): an H200
        # holds 64,000 decoded photo-sized images (0.7 MB each: 45 GB), a 24 GB card 8,000.
        budget = cfg.device_cache_gb * 2**30 if cfg.device_cache_gb is not None else gpu_memory_bytes(device) / 2
        if need <= budget:
            return "device"
    return "ram" if need <= cfg.cache_gb * 2**30 else "none"


def build(cfg: DataConfig, classes: list[str], train: list[Sample], val: list[Sample], *,
          seed: int, world: int = 1, rank: int = 0, device: torch.device = torch.device("cpu"),
          sizes: dict[str, tuple[int, int]] | None = None) -> Data:
    """Datasets and loaders for this rank. ``sizes`` (from the scan) lets cache: auto decide cheaply."""
    train_ds = ImageDataset(train, cfg, train=True, seed=seed)
    val_ds = ImageDataset(val, cfg, train=False, seed=seed)
    place = cache_place(cfg, train, val, sizes, device)
    threads = os.cpu_count() or 1
    warning = None
    if place == "device" and host_only(cfg):
        warning = (f"note: {host_only(cfg)} runs on the host (PIL) path: decoded images are kept in RAM "
                   f"(data.cache=ram) instead of on the {device.type}")
        place = "ram"
    if place == "ram":  # (device: decoded straight into device memory below)
        train_ds.cache = fill_cache(train_ds, list(range(len(train))), threads)
    if place != "none":
        # The val transform is deterministic, so its cache holds finished uint8 crops (small).
        val_ds.cache = fill_cache(val_ds, list(range(len(val))), threads)
    sampler = TrainBatchSampler(len(train), cfg.batch_size, world, rank, seed,
                                balanced_labels=[y for _, y in train] if cfg.sampler == "balanced" else None)
    eval_sampler = EvalBatchSampler(len(val), cfg.eval_batch_size or 8 * cfg.batch_size, world, rank)
    if place == "device":
        train_labels, val_labels = [label for _, label in train], [label for _, label in val]
        train_loader = device_data.train_loader(train_ds._decoded, train_labels, sampler, cfg, seed, device, threads)
        problem = device_data.disagreement(train_loader, train_ds.__getitem__)
        if problem is None:
            return Data(classes, train_ds, val_ds, train_loader,
                        device_data.eval_loader(val_ds.cache, val_labels, eval_sampler, cfg.image_size, device),
                        sampler, place, 0)
        del train_loader
        warning = (f"warning: data.cache=device: the {device.type} augmentation disagrees with the PIL path on "
                   f"the first batch ({problem}); training on the host path (data.cache=ram) instead")
        place = "ram"
        train_ds.cache = fill_cache(train_ds, list(range(len(train))), threads)
    pin = device.type == "cuda"
    # Training on the CPU from the RAM cache: what is left to load is light, and loader workers
    # would only take cores from the model (measured on 2 cores: 0 workers is fastest).
    workers = 0 if place == "ram" and not pin else cfg.num_workers
    return Data(classes, train_ds, val_ds, _loader(train_ds, sampler, workers, pin),
                _loader(val_ds, eval_sampler, 0 if place == "ram" else workers, pin), sampler, place, workers,
                warning)
