"""World-size-free sampling: the global sample order of an epoch is a function of (seed, epoch)
only, and global batch k holds the same samples whether one process takes all of it or W processes
a slice each. Evaluation shards whole global batches, so every sample is evaluated exactly once, in
the same batches, for any world size."""
from __future__ import annotations

import math
import random
from typing import Iterator

import torch



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


def limited_steps(limit: float | None, steps: int) -> int:
    """train.limit_*_batches: the first ``limit`` of an epoch's ``steps`` batches (a count, or a
    fraction below 1; at least one), or all of them."""
    if limit is None:
        return steps
    wanted = math.ceil(limit * steps) if limit < 1 else int(limit)
    return max(1, min(steps, wanted))


def eval_count(n: int, batch: int, limit: float | None) -> int:
    """The val images evaluated each epoch: all ``n``, or train.limit_val_batches' first batches."""
    return min(n, limited_steps(limit, math.ceil(n / batch)) * batch)


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
        self.limit: float | None = None  # train.limit_train_batches: the epoch's first global batches only

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return limited_steps(self.limit, math.ceil(self.n / (self.bs * self.world)))

    def images_per_epoch(self) -> int:
        """The real samples an epoch trains on over all ranks (all of them unless limited)."""
        return sum(self.global_count(s) for s in range(len(self)))

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


def eval_batch_size(configured: int | None, train_batch: int) -> int:
    """data.eval_batch_size, or 8x the train batch (evaluation keeps no activations for a backward)."""
    return configured or 8 * train_batch


def eval_shard(n: int, batch: int, world: int, rank: int) -> range:
    """This rank's samples for evaluation: whole global batches (the same batches whatever the world
    size), in contiguous blocks, so concatenating the ranks' results in rank order is sample order."""
    batches = math.ceil(n / batch)
    lo, hi = batches * rank // world, batches * (rank + 1) // world
    return range(lo * batch, min(n, hi * batch))


class EvalBatchSampler:
    """This rank's ``eval_shard``, unpadded: every sample is evaluated exactly once."""

    def __init__(self, n: int, batch_size: int, world: int, rank: int):
        self.indices = eval_shard(n, batch_size, world, rank)
        self.bs = batch_size

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.bs)

    def __iter__(self):
        for s in range(0, len(self.indices), self.bs):
            yield [(i, 0, 1.0) for i in self.indices[s:s + self.bs]]
