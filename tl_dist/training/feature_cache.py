"""Frozen features computed once: each train image's classifier input, kept after the first frozen epoch.

With the backbone frozen (eval-mode BatchNorm, no dropout or stochastic depth) and a fixed train
transform (``data.augment=none``), the network up to the classifier maps a train image to the same
vector in every epoch. The first frozen epoch of a run trains as always and records, per sample,
the vector the classifier received; the ranks then exchange theirs, so every rank holds every
sample's. Later epochs draw the same global batches from the same sampler and run the classifier
alone, through the same wrapper (DDP reduces its gradients as before): the same order, the same
per-sample values, the same optimizer steps, with neither the images nor the backbone.

"The same values" is exact where the backbone's output for an image does not depend on the other
images of its batch. That holds for most models on the CPU at batch sizes above one; some kernels
(vectorised activations, a GPU convolution algorithm picked by batch size) round the last bit
differently for another batch composition, and then the run without the cache is the one that
varies, by that last bit, from epoch to epoch (docs/performance.md).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

from tl_dist.config import Config
from tl_dist.data import targets
from tl_dist.data.augment import fixed_train_transform
from tl_dist.distributed import gather_rows
from tl_dist.models.heads import head_module


def why_off(cfg: Config, model: torch.nn.Module, n_train: int) -> str | None:
    """Why train.feature_cache=auto keeps no features for this run (None: it does). Only asked for
    runs that freeze the backbone."""
    head = head_module(model)
    if cfg.train.feature_cache == "off":
        return "train.feature_cache=off"
    if cfg.model.frozen_bn != "eval":
        return "model.frozen_bn=train (BatchNorm statistics move, so the features do)"
    if not fixed_train_transform(cfg.data):
        return ("the train images change every epoch (data.augment=" + cfg.data.augment +
                (f", data.random_erasing={cfg.data.random_erasing}" if cfg.data.random_erasing else "") +
                "; data.augment=none keeps them fixed)")
    if cfg.train.mixup_alpha > 0 or cfg.train.cutmix_alpha > 0:
        return "MixUp / CutMix mix the images before the backbone"
    if cfg.train.limit_train_batches is not None:
        return "train.limit_train_batches: each epoch trains on other images than the first one kept"
    if cfg.train.compile or cfg.train.cuda_graphs:
        return "train.compile / train.cuda_graphs run the whole model as one graph"
    if not isinstance(head, torch.nn.Linear):  # (SqueezeNet's conv head is followed by pooling)
        return f"the classifier ({type(head).__name__}) is not the model's last layer"
    need = n_train * head.in_features * 4  # fp32: an upper bound
    if need > cfg.data.cache_gb * 2**30:
        return (f"{n_train} train features need {need / 2**20:.0f} MiB, over data.cache_gb={cfg.data.cache_gb:g}; "
                f"a larger data.cache_gb keeps them")
    return None


class FeatureCache:
    """The train set's classifier inputs, per sample, on the training device; empty until the
    first frozen epoch has recorded them (``recording``, then ``collect``)."""

    def __init__(self, labels: list, num_classes: int) -> None:
        self.labels = targets.batch(labels, num_classes)
        self.table: torch.Tensor | None = None  # [samples, features]
        self.known: torch.Tensor | None = None  # [samples] bool, host: False for an image that failed to decode
        self._seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # this rank's (indices, features) batches

    @property
    def ready(self) -> bool:
        return self.table is not None

    @contextlib.contextmanager
    def recording(self, model: torch.nn.Module, loader: Iterable) -> Iterator[Iterable]:
        """``loader`` as it is, while the classifier's input of each forward is kept beside the
        batch's indices (one forward per batch: the eager train step)."""
        indices: list[torch.Tensor] = []
        features: list[torch.Tensor] = []

        def batches():
            for batch in loader:
                indices.append(batch[3])
                yield batch

        hook = head_module(model).register_forward_pre_hook(lambda m, args: features.append(args[0].detach()))
        try:
            yield batches()
        finally:
            hook.remove()
        self._seen = list(zip(indices, features, strict=True))

    def collect(self, accelerator, n: int) -> None:
        """Every rank's recorded features, in one table on every rank (after the recording epoch)."""
        if not self._seen:
            return
        idx = torch.cat([i.reshape(-1) for i, _ in self._seen]).to(self._seen[0][1].device)
        feats = torch.cat([f for _, f in self._seen])
        self._seen = []
        idx, feats = gather_rows(accelerator, idx), gather_rows(accelerator, feats)
        idx = idx.cpu()  # (read once a run)
        real = idx >= 0  # (-1-i: failed to decode; its features are of a blank image)
        self.table = feats.new_zeros((n, feats.shape[1]))
        self.table[idx[real].to(feats.device)] = feats[real.to(feats.device)]  # (padding repeats a sample: same values)
        self.known = torch.zeros(n, dtype=torch.bool)
        self.known[idx[real]] = True

    def nbytes(self) -> int:
        return 0 if self.table is None else self.table.numel() * self.table.element_size()

    def loader(self, sampler) -> Iterator[tuple]:
        """The epoch's batches as the image loader gives them (features in place of images): the
        sampler's keys, so the same samples in the same order; a sample that failed to decode when
        it was recorded has weight 0 and index -1-i, as its image would."""
        for keys in sampler:
            ids = torch.tensor([k[0] for k in keys])
            ok = self.known[ids]
            w = torch.tensor([k[2] for k in keys], dtype=torch.float64) * ok
            yield (self.table[ids.to(self.table.device, non_blocking=True)], self.labels[ids], w,
                   torch.where(ok, ids, -1 - ids))

    @contextlib.contextmanager
    def head_only(self, model: torch.nn.Module) -> Iterator[None]:
        """The model's forward is its classifier's while the epoch runs on kept features; the
        wrapper around it (DDP) and its parameters stay as they are."""
        head = head_module(model)
        model.forward = lambda features: head(features)  # (an instance attribute: __call__ finds it first)
        try:
            yield
        finally:
            del model.forward
