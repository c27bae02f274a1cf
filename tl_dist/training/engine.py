"""train_one_epoch / evaluate, as torchvision's reference loop splits them, and the eager train step.

Loss normalisation is what makes any world size and any accumulation give the single-process
gradient: each step's summed loss is divided by the number of real samples in the global batch
(or accumulation window) and multiplied by the world size, because DDP averages gradients over
ranks. Padding samples carry weight 0 and so never reach the gradient or the metrics.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from tqdm import tqdm

from tl_dist.training import mixing
from tl_dist.data.augment import normalize
from tl_dist.data.samplers import TrainBatchSampler
from tl_dist.distributed import gather_objects, gather_union, reduce_sum
from tl_dist.metrics import multi_label_metrics
from tl_dist.training.mixing import Mix
from tl_dist.models.heads import head_module, set_train_mode

if TYPE_CHECKING:  # the loop's collaborators, called by name
    from tl_dist.distributed import StopRequest
    from tl_dist.tracking import Tracking
    from tl_dist.training.ema import EMA
    from tl_dist.training.optim import Schedule


IGNORED = -100  # the label cross-entropy skips: a weight-0 sample's, in evaluation


@dataclass
class EpochResult:
    loss: float
    acc: float
    samples: int
    seconds: float
    bad: list[int] = field(default_factory=list)  # dataset indices that failed to decode
    stopped: bool = False  # interrupted by a stop request before the end of the epoch
    confusion: torch.Tensor | None = None  # [true, predicted] counts (evaluate only, one label per image)
    metrics: dict | None = None  # multi_label evaluation: tl_dist.metrics.multi_label_metrics of the whole val set
    # train only: per optimizer step, [position in epochs at its end, its mean loss over all ranks,
    # the head's and the backbone's learning rate] (float64, on the host)
    steps: torch.Tensor | None = None


@dataclass
class StepSettings:
    """What the loop needs to know about the model that the Accelerator does not."""
    mean: list[float]
    std: list[float]
    channels_last: bool
    frozen: bool
    frozen_bn: str
    grad_accum_steps: int = 1
    label_smoothing: float = 0.0
    class_weights: torch.Tensor | None = None  # per class, on the device (train.class_weights; multi_label: pos_weight)
    seed: int = 0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    multi_label: bool = False  # a sigmoid per class and binary cross-entropy; targets are multi-hot rows
    threshold: float = 0.5  # multi_label: the probability from which a class counts as predicted

    @property
    def mixes(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def train_loss(out: torch.Tensor, y: torch.Tensor, ctx: StepSettings | None, mix: Mix | None = None) -> torch.Tensor:
    """The per-sample train loss: cross-entropy with the run's label smoothing, times the sample's
    class weight; for a mixed batch, the same mixed with the second targets' (soft targets).
    Normalised by the number of samples (not the sum of weights) like every loss here, so the
    world-size rule of the step holds unchanged."""
    if ctx is None:
        return F.cross_entropy(out.float(), y, reduction="none")
    if ctx.multi_label:
        return multi_label_loss(out, y, ctx.label_smoothing, ctx.class_weights, mix)

    def one(target: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(out.float(), target, reduction="none", label_smoothing=ctx.label_smoothing)
        return loss if ctx.class_weights is None else loss * ctx.class_weights[target]
    return one(y) if mix is None else mix.lam * one(y) + (1.0 - mix.lam) * one(mix.y2)


def multi_label_loss(out: torch.Tensor, y: torch.Tensor, smoothing: float = 0.0, pos_weight: torch.Tensor | None = None,
                     mix: Mix | None = None) -> torch.Tensor:
    """The per-sample multi-label loss: binary cross-entropy of each class's sigmoid, averaged over
    the classes; targets smoothed towards 1/2 by ``smoothing``, positives weighted by ``pos_weight``.
    A mixed batch mixes the multi-hot targets (the loss is linear in them)."""
    target = y if mix is None else mix.lam * y + (1.0 - mix.lam) * mix.y2
    if smoothing:
        target = target * (1.0 - smoothing) + 0.5 * smoothing
    return F.binary_cross_entropy_with_logits(out.float(), target, pos_weight=pos_weight, reduction="none").mean(1)


def hits(out: torch.Tensor, y: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per sample, 1.0 where the prediction is right: the top class (one label per image), or every
    class on the right side of ``threshold`` (several: the exact match)."""
    if y.dim() == 1:
        return (out.argmax(1) == y).float()
    return ((torch.sigmoid(out.float()) >= threshold) == (y >= 0.5)).all(1).float()


class TrainStep(Protocol):
    """One train step on a batch: forward, loss, backward, and at the end of an accumulation window
    (``update``) the optimizer step. It adds the batch's (weighted loss, correct, count) to its sums."""

    def begin_epoch(self, model: torch.nn.Module, ctx: StepSettings) -> None: ...
    def __call__(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, scale: float, update: bool,
                 mix: Mix | None = None) -> None: ...
    def epoch_sums(self) -> torch.Tensor: ...


@torch.no_grad()
def step_sums(per_sample: torch.Tensor, out: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
              threshold: float = 0.5) -> torch.Tensor:
    """A train step's (weighted loss, correct, count) sums; padding has weight 0."""
    return torch.stack([(per_sample * w).sum(), (hits(out, y, threshold) * w).sum(), w.sum()]).double()


class EagerStep:
    """The train step as PyTorch runs it, op by op, through the Accelerator (autocast, DDP, scaler)."""

    def __init__(self, accelerator, optimizer) -> None:
        self.acc, self.opt = accelerator, optimizer
        self.model: torch.nn.Module | None = None
        self.ctx: StepSettings | None = None
        self.sums = torch.zeros(3, device=accelerator.device, dtype=torch.float64)

    def begin_epoch(self, model: torch.nn.Module, ctx: StepSettings) -> None:
        self.model, self.ctx = model, ctx
        self.sums.zero_()

    def __call__(self, x, y, w, scale: float, update: bool, mix: Mix | None = None) -> None:
        # Inside an accumulation window DDP must not all-reduce (no_sync); the window's last
        # micro-batch does, and only then does the optimizer step.
        with contextlib.nullcontext() if update else self.acc.no_sync(self.model):
            with self.acc.autocast():
                out = self.model(x)
            per_sample = train_loss(out, y, self.ctx, mix)
            self.acc.backward((per_sample * w).sum() * scale)
        if update:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.sums += step_sums(per_sample, out, y, w, self.ctx.threshold)

    def epoch_sums(self) -> torch.Tensor:
        return self.sums


def to_device(batch, device, ctx: StepSettings):
    """(x, y, w) on the device, and the batch's dataset indices as the loader gave them (host
    memory; -1-i marks sample i that failed to decode: ``failed`` reads them once an epoch).
    Images come as uint8 and are normalised here; kept features (``feature_cache``) pass as they are."""
    x, y, w, idx = batch
    x = x.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = normalize(x, ctx.mean, ctx.std, ctx.channels_last)
    return x, y.to(device, non_blocking=True), w.to(device, torch.float32, non_blocking=True), idx


def failed(indices: list[torch.Tensor]) -> list[int]:
    """The dataset indices of the samples that failed to decode, from the batches' index tensors.
    Read at the epoch's end, not per step: the host never waits for a step to learn about a file."""
    if not indices:
        return []
    idx = torch.cat([i.reshape(-1) for i in indices])  # (host tensors, made by the loaders)
    return (-1 - idx[idx < 0]).tolist()


def train_one_epoch(accelerator, model, train_step: TrainStep, loader, sampler: TrainBatchSampler,
                    settings: StepSettings, epoch: int, *, schedule: Schedule | None = None, ema: EMA | None = None,
                    stop: StopRequest | None = None, tracking: Tracking | None = None) -> EpochResult:
    """One epoch of optimizer steps. Before each one the schedule sets the learning rates (and the
    trackers note them); after each one the weights' average is updated and the stop request is
    checked (every rank at the same step, so all stop together)."""
    t0 = time.perf_counter()
    model.train()
    set_train_mode(accelerator.unwrap_model(model), True, settings.frozen, settings.frozen_bn)
    train_step.begin_epoch(model, settings)
    indices: list[torch.Tensor] = []  # each batch's dataset indices (which samples failed to decode)
    log = StepLog()
    # (closed however the loop ends, so an error the run prints starts a line of its own)
    with tqdm(total=len(sampler), desc=f"epoch {epoch} train", leave=False, dynamic_ncols=True,
              disable=not accelerator.is_main_process) as bar:
        stopped = _train_steps(accelerator, model, loader, sampler, train_step, settings, epoch, bar, indices,
                               schedule, ema, stop, tracking, log)
    sums, marks = reduce_sum(accelerator, [train_step.epoch_sums(), log.stacked(train_step.epoch_sums())])
    loss_sum, correct, count = sums.tolist()
    n = max(1.0, count)
    return EpochResult(loss_sum / n, correct / n, int(count), time.perf_counter() - t0,
                       gather_union(accelerator, failed(indices)), stopped, steps=log.steps(marks))


class StepLog:
    """Each optimizer step's loss and learning rates, for the per-step curves, without a host wait:
    after each step a device copy of the epoch's running sums is kept, and at the epoch's end the
    copies are reduced over the ranks with the sums (one collective) and differenced."""

    def __init__(self) -> None:
        self.marks: list[torch.Tensor] = []  # the running (loss, correct, count) sums after each step
        self.at: list[tuple[float, float, float]] = []  # (position in epochs, head lr, backbone lr)

    def note(self, sums: torch.Tensor, position: float, lrs: list[float]) -> None:
        self.marks.append(sums.clone())
        self.at.append((position, lrs[0], lrs[-1]) if lrs else (position, math.nan, math.nan))

    def stacked(self, like: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.marks) if self.marks else like.new_zeros((0, 3))

    def steps(self, marks: torch.Tensor) -> torch.Tensor:
        """[steps, 4]: position, mean loss of the step over all ranks, head lr, backbone lr."""
        if not self.at:
            return torch.zeros((0, 4), dtype=torch.float64)
        marks = marks.reshape(-1, 3).double()
        delta = torch.diff(marks, dim=0, prepend=torch.zeros_like(marks[:1]))
        loss = delta[:, 0] / delta[:, 2].clamp(min=1)
        return torch.cat([torch.tensor(self.at, dtype=torch.float64), loss[:, None]], 1)[:, [0, 3, 1, 2]]


def _train_steps(accelerator, model, loader, sampler, train_step, settings: StepSettings, epoch: int, bar,
                 indices: list[torch.Tensor], schedule, ema, stop, tracking, log: StepLog) -> bool:
    """The epoch's micro-batches; whether a stop was asked for."""
    world, k, n_micro = accelerator.num_processes, settings.grad_accum_steps, len(sampler)
    done = 0  # images the epoch's earlier optimizer steps took, over all ranks
    epoch_images = sampler.images_per_epoch()
    lrs = schedule.epoch_lrs if schedule is not None else [0.0]
    for micro, batch in enumerate(loader):
        x, y, w, idx = to_device(batch, accelerator.device, settings)
        indices.append(idx)
        # One optimizer step per window of k micro-batches; windows restart each epoch, the last may be short.
        lo = micro // k * k
        hi = min(lo + k, n_micro)
        update = micro == hi - 1  # the window's last micro-batch: gradients reduced, the optimizer steps
        window_images = sum(sampler.global_count(s) for s in range(lo, hi))  # real samples, all ranks
        if micro == lo:
            if schedule is not None:
                lrs = schedule.before_optimizer_step(epoch, done)
                if tracking is not None:
                    tracking.step(epoch, done + window_images, lrs)
            done += window_images
        mix = None
        if settings.mixes:  # this rank's batch is the global micro-batch micro x world + rank (see mixing)
            drawn = mixing.draw(settings.seed, epoch, micro * world + accelerator.process_index,
                                settings.mixup_alpha, settings.cutmix_alpha, settings.mix_prob, x.shape[2], x.shape[3])
            x, mix = mixing.apply(x, y, drawn)
        train_step(x, y, w, world / window_images, update, mix)
        if update:
            log.note(train_step.epoch_sums(), epoch + done / epoch_images, lrs)
        if update and ema is not None:
            ema.update()
        bar.update(1)
        if update and stop is not None and stop.check(accelerator):
            return True
    return False


class HeadInputs:
    """The val set's inputs to the classifier under a fixed backbone, kept after the first evaluation.

    With the backbone frozen and its BatchNorm in eval mode, the network up to the classifier is the same
    function in every epoch and the val transform is deterministic, so these inputs never change:
    later evaluations run the classifier alone on them and get the same bits as a full forward pass, in a
    fraction of the time. The caller creates one only where they fit its memory budget.
    """

    def __init__(self) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None  # (classifier input, y, w)


@torch.inference_mode()
def evaluate(accelerator, model, loader, ctx: StepSettings, num_classes: int, epoch: int = 0,
             head_inputs: HeadInputs | None = None) -> EpochResult:
    """Every val sample exactly once over all ranks; metrics reduced as sums (no padding to drop).

    Runs the unwrapped module: evaluation needs no gradient sync, and ranks may hold different
    numbers of batches, which a DDP forward (buffer broadcast) would turn into a hang.
    """
    t0 = time.perf_counter()
    net = accelerator.unwrap_model(model)
    set_train_mode(net, False, ctx.frozen, ctx.frozen_bn)
    head = head_module(net)
    dev = accelerator.device
    loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, device=dev, dtype=torch.float64)
    indices: list[torch.Tensor] = []
    reuse = head_inputs is not None and head_inputs.batches is not None
    keep: list | None = [] if head_inputs is not None and not reuse else None
    seen: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda m, args: seen.append(args[0])) if keep is not None else None

    def batches():
        if reuse:
            yield from head_inputs.batches
            return
        for batch in tqdm(loader, desc=f"epoch {epoch} val", leave=False, dynamic_ncols=True,
                          disable=not accelerator.is_main_process):
            x, y, w, idx = to_device(batch, dev, ctx)
            indices.append(idx)
            yield x, y, w

    scores: list[tuple[torch.Tensor, ...]] = []  # multi_label: (probabilities, truth, real) per batch
    # Padding and undecodable samples (weight 0) are left out by arithmetic, not by boolean indexing,
    # which would make the host wait for the device at every batch.
    for x, y, w in batches():
        with accelerator.autocast():
            out = head(x) if reuse else net(x)
        if keep is not None:
            keep.append((seen.pop(), y, w))
        real = w > 0
        if ctx.multi_label:  # (plain binary cross-entropy, as the single-label val loss is plain)
            per = F.binary_cross_entropy_with_logits(out.float(), y, reduction="none").mean(1)
            loss_sum += torch.where(real, per, torch.zeros_like(per)).sum()
            scores.append((torch.sigmoid(out.float()), y, real))
            continue
        # (ignore_index leaves them out of the same summed kernel tl-dist evaluate uses: the same bits)
        loss_sum += F.cross_entropy(out.float(), torch.where(real, y, IGNORED), reduction="sum", ignore_index=IGNORED)
        confusion.index_add_(0, y * num_classes + out.argmax(1), real.to(torch.float64))
    if keep is not None:
        hook.remove()
        head_inputs.batches = keep
    bad = failed(indices)
    if ctx.multi_label:
        return _multi_label_result(accelerator, loss_sum, scores, num_classes, ctx.threshold, bad, t0)
    loss_sum, confusion = reduce_sum(accelerator, [loss_sum, confusion])
    confusion = confusion.reshape(num_classes, num_classes).long()
    n = int(confusion.sum())
    return EpochResult(loss_sum.item() / max(1, n), confusion.diag().sum().item() / max(1, n), n,
                       time.perf_counter() - t0, gather_union(accelerator, bad), confusion=confusion)


def _multi_label_result(accelerator, loss_sum: torch.Tensor, scores: list, num_classes: int, threshold: float,
                        bad: list[int], t0: float) -> EpochResult:
    """The ranks' scores gathered in rank order (each rank's shard is contiguous: sample order), and
    the metrics of the whole val set computed alike on every rank, so all agree on the best epoch."""
    empty = torch.zeros(0, num_classes)
    if scores:  # (the real samples picked on the host, once, at the end)
        real = torch.cat([r for _, _, r in scores]).cpu()
        mine = (torch.cat([p for p, _, _ in scores]).cpu()[real], torch.cat([t for _, t, _ in scores]).cpu()[real])
        # (one read each, once an epoch)
    else:
        mine = (empty, empty)
    parts = gather_objects(accelerator, mine)
    probs, truth = torch.cat([p for p, _ in parts]), torch.cat([t for _, t in parts])
    loss_sum = reduce_sum(accelerator, [loss_sum])[0]
    n = len(probs)
    m = multi_label_metrics(probs, truth, [str(c) for c in range(num_classes)], threshold)
    return EpochResult(loss_sum.item() / max(1, n), m["exact_match"], n, time.perf_counter() - t0,
                       gather_union(accelerator, bad), metrics=m)
