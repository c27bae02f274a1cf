"""Setting a run up: the accelerator, the run directory, the data, the model, the optimizer and step."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tl_dist import config, tracking, visualize
from tl_dist.files import atomic, run_dir
from tl_dist.data import demo, listing, loaders
from tl_dist.training import host_memory, optim
from tl_dist.models import backbones, heads, pretrained
from tl_dist.config import Config
from tl_dist.distributed import (agree, check_same_data, make_accelerator, note_peers, on_main_then_share, rewrap_unfrozen,
                          spans_machines)
from tl_dist.training.ema import EMA
from tl_dist.training.engine import (EagerStep, HeadInputs, StepContext, TrainStep)
from tl_dist.errors import UserError, first_line, one_line
from tl_dist.training.cuda_graphs import GraphedStep, check_cuda_graphs
from tl_dist.data.images import SKIP_BAD_IMAGES, screen_files
from tl_dist.training.run_state import (RunState, changes, data_fingerprint, model_identity, read_resume, seed_everything,
                                        set_rng_state)
from tl_dist.files.run_dir import prepare_output_dir, record_resume
from tl_dist.training.reporting import say, versions


@dataclass
class Run:
    """What set-up builds and the epoch loop works with."""
    cfg: Config
    accelerator: object
    out: Path
    data: loaders.Data
    net: torch.nn.Module  # as prepared (DDP-wrapped with several processes)
    optimizer: torch.optim.Optimizer
    step: TrainStep
    ctx: StepContext
    state: RunState
    meta: dict  # what every checkpoint of this run says about itself
    tracking: tracking.Tracking
    ema: EMA | None = None
    head_inputs: HeadInputs | None = None

    def log(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            say(msg)

    def before_step(self, epoch: int, epoch_lrs: list[float], done: int, size: int) -> None:
        """Before each optimizer step: the schedule's learning rates at this point of the run (from
        the images done, see recipe), and the tracker's note of them."""
        lrs = epoch_lrs
        if optim.varies_within_epoch(self.cfg):
            lrs = optim.set_lrs(self.optimizer, self.cfg, epoch, epoch + done / len(self.data.train))
        self.tracking.step(epoch, done + size, lrs)

    def unfreeze(self, epoch: int) -> None:
        self.net = rewrap_unfrozen(self.accelerator, self.net)
        self.head_inputs = None  # the backbone moves from now on: its outputs do too
        self.ctx = dataclasses.replace(self.ctx, frozen=False)
        self.log(f"epoch {epoch}: the backbone trains from now on "
                 f"(after model.unfreeze_epoch={self.cfg.model.unfreeze_epoch} frozen epochs)")

    def drop_failed_graphs(self) -> None:
        failed = getattr(self.step, "failed", None)
        if failed:
            self.log(f"warning: train.cuda_graphs: {failed}; training goes on without graphs")
            self.step = self.step.fallback


def set_up(cfg: Config, lock: run_dir.RunLock) -> Run:
    """Accelerator, data, model, resume state, optimizer, train step and the run's first files."""
    accelerator, mp = make_accelerator(cfg)
    if accelerator.num_processes > 1:
        note_peers(accelerator)  # (to name a rank that dies later)
    main_proc = accelerator.is_main_process
    if accelerator.device.type == "cpu":  # activations live in host memory: reuse it step to step
        host_memory.keep_freed_memory()
    check_cuda_graphs(cfg, accelerator.device, accelerator.num_processes, mp)
    log = say if main_proc else (lambda msg: None)

    out = Path(cfg.train.output_dir)
    agree(accelerator, lambda: prepare_output_dir(out, lock, cfg.train.resume) if main_proc else None)
    seed_everything(cfg.train.seed)

    d, fingerprint = prepare_data(cfg, accelerator, log)
    if d.warning:
        log(d.warning)
    net = agree(accelerator, backbones.build, cfg.model, len(d.classes), cfg.data.image_size)
    # Resume: rank 0 reads, every rank receives (no shared filesystem needed across machines).
    state = (on_main_then_share(accelerator, lambda: read_resume(cfg, model_identity(cfg, d.classes)))
             if cfg.train.resume != "none" else None)
    if state is not None:
        try:
            pretrained.load_state(net, state.model)
        except (RuntimeError, KeyError, TypeError) as e:
            raise UserError(f"resume: the weights in {out / 'resume.pt'} do not fit {cfg.model.arch} "
                            f"({one_line(first_line(e))}); use another train.output_dir or train.resume=none") from None
        log(f"resuming {out} after epoch {state.epoch} (best val acc {state.best_val_acc:.4f} "
            f"at epoch {state.best_epoch})")

    if cfg.train.sync_batchnorm and accelerator.num_processes > 1:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    channels_last = backbones.uses_channels_last(cfg.model)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        net.compile(mode=cfg.train.compile_mode)
    optimizer = optim.build_optimizer(net, cfg)
    start = state.next_epoch if state is not None else 0
    frozen = heads.frozen_at(cfg.model, start)  # the phase the wrapper is built for
    if cfg.model.mode == "frozen_then_finetune" and cfg.model.unfreeze_epoch >= cfg.train.epochs:
        log(f"note: model.unfreeze_epoch={cfg.model.unfreeze_epoch} >= train.epochs={cfg.train.epochs}: "
            f"the backbone stays frozen in this run (a resumed run with more epochs unfreezes it)")
    heads.set_frozen(net, frozen)
    if state is not None:
        try:
            optimizer.load_state_dict(state.optimizer)
        except (ValueError, KeyError) as e:
            raise UserError(f"resume: the optimizer state in {out / 'resume.pt'} does not fit this run ({e}); "
                            f"use another train.output_dir or train.resume=none") from None
        # Data order and augmentation do not depend on these; with another world size they are
        # left as seeded, which changes nothing the run draws.
        if len(state.rng) == accelerator.num_processes:
            set_rng_state(state.rng[accelerator.process_index])
    net, optimizer = accelerator.prepare(net, optimizer)
    step: TrainStep = EagerStep(accelerator, optimizer)
    if cfg.train.cuda_graphs:  # (its needs were checked above)
        step = GraphedStep(optimizer.optimizer, accelerator.device, torch.bfloat16 if mp == "bf16" else None,
                           capture=accelerator.device.type == "cuda", fallback=step)
    weights = (optim.class_weights([y for _, y in d.train.samples], len(d.classes)).to(accelerator.device)
               if cfg.train.class_weights == "balanced" else None)
    t = cfg.train
    ctx = StepContext(cfg.data.mean, cfg.data.std, channels_last, frozen, cfg.model.frozen_bn, t.grad_accum_steps,
                      t.label_smoothing, weights, t.seed, t.mixup_alpha, t.cutmix_alpha, t.mix_prob)
    meta = {
        "classes": d.classes, "num_classes": len(d.classes), "arch": cfg.model.arch, "mode": cfg.model.mode,
        "arch_kwargs": backbones.arch_kwargs(cfg.model, cfg.data.image_size),
        "head": heads.head_name(accelerator.unwrap_model(net)),
        "image_size": cfg.data.image_size, "resize_size": cfg.data.resize_size,
        "interpolation": cfg.data.interpolation,
        "mean": cfg.data.mean, "std": cfg.data.std, "world_size": accelerator.num_processes,
        "mixed_precision": mp, "config": cfg.to_dict(), "versions": versions(),
        "data_path": d.describe(accelerator.device),
    }
    state = state or RunState()
    # (through agree: a failed write stops every rank at once, not only rank 0)
    agree(accelerator, lambda: note_segment(cfg, out, state, fingerprint, log) if main_proc else None)
    if main_proc:
        log(f"tl_dist: {len(d.train)} train / {len(d.val)} val images, {len(d.classes)} classes; "
            f"{cfg.model.arch} {cfg.model.mode}; {accelerator.num_processes} process(es) on "
            f"{accelerator.device.type}; mixed precision {mp}; data: {meta['data_path']}")
        if cfg.scheduler.warmup_epochs >= cfg.train.epochs:
            log(f"warning: scheduler.warmup_epochs ({cfg.scheduler.warmup_epochs:g}) is not shorter than train.epochs "
                f"({cfg.train.epochs}): the learning rate rises for the whole run and never trains at optim.lr; "
                f"shorten the warm-up (a few epochs, or a fraction of one)")
        if cfg.train.plots and start == 0:
            visualize.drawn(visualize.train_batch, d.train, d.classes, out / "train_batch.png", seed=cfg.train.seed)

    # A fixed backbone computes the same val features every epoch: keep them (see HeadInputs) when
    # they fit the host cache budget (fp32 size, an upper bound: one vector per val image).
    # Only for a Linear head: its output is the model's (SqueezeNet's conv head is followed by pooling).
    head = heads.head_module(accelerator.unwrap_model(net))
    feature_bytes = len(d.val) * getattr(head, "in_features", 0) * 4
    keep_features = (frozen and cfg.model.frozen_bn == "eval" and isinstance(head, torch.nn.Linear)
                     and feature_bytes <= cfg.data.cache_gb * 2**30)
    trackers = tracking.Tracking(accelerator, cfg.to_dict(), out, len(d.train), start)
    ema = None
    if cfg.train.ema_decay > 0:  # (after prepare: the average lives where the model does)
        ema = EMA(accelerator.unwrap_model(net), cfg.train.ema_decay)
        if state.ema is not None:
            ema.load(state.ema, state.ema_updates)
        elif state.epoch >= 0:
            log(f"note: train.ema_decay is new at this resume: the average starts from epoch {state.epoch}'s weights")
    return Run(cfg, accelerator, out, d, net, optimizer, step, ctx, state, meta, trackers, ema,
               HeadInputs() if keep_features else None)


def note_segment(cfg: Config, out: Path, state: RunState, data_fp: dict, log) -> None:
    """The run directory's account of how its weights are made (rank 0): a fresh run writes its
    config.yaml; a resume keeps it, says what changed since (data, settings) and appends that to
    resumes.jsonl. The state then describes this segment."""
    now = cfg.to_dict()
    target = out / ("config.yaml" if state.epoch < 0 else "resumes.jsonl")
    try:
        if state.epoch < 0:
            atomic.atomic_write_text(out / "config.yaml", config.dump(cfg))
        else:
            changed = changes(state, data_fp, now)
            if changed:
                log("note: changed since epoch {}: {}".format(state.epoch, "; ".join(
                    f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())))
            record_resume(out, state.epoch, changed)
    except OSError as e:
        raise UserError(f"train: writing {target} failed: {e.strerror}; free space (or fix the folder) and run "
                        f"the same command again") from None
    state.data, state.config = data_fp, now


def write_in_background() -> bool:
    """Checkpoint files are written while the next epoch runs where the model trains on a GPU (the
    host's cores are free); where it trains on the CPU, they are written between epochs."""
    return torch.cuda.is_available()


def prepare_data(cfg: Config, accelerator, log) -> tuple[loaders.Data, dict | None]:
    """This rank's data, and (rank 0) the fingerprint of what it trains on."""
    if cfg.data.demo:
        if accelerator.is_local_main_process and not (Path(cfg.data.root) / demo.MARKER).exists():
            log(f"generating the synthetic demo data set in {cfg.data.root} (once)")
        # (on every node's first rank; the others wait, then all learn of a refusal together)
        agree(accelerator, lambda: demo.generate(cfg.data.root, seed=0) if accelerator.is_local_main_process else None)
    classes, train, val = agree(accelerator, listing.list_splits, cfg.data.root)
    if accelerator.num_processes > 1:  # (one copy of the data per machine: its first rank reads the bytes,
        # when there are other machines to compare with)
        check_same_data(accelerator, listing.identity(cfg.data.root, classes, train, val,
                                                   deep=accelerator.is_local_main_process and spans_machines(accelerator)))
    # One scan on rank 0, shared with every rank, so all ranks agree on what is left out.
    report = on_main_then_share(accelerator, lambda: scan_split_files(cfg, train, val, log))
    if report.bad:
        train = [s for s in train if s[0] not in report.bad]
        val = [s for s in val if s[0] not in report.bad]
    fingerprint = data_fingerprint(train, val, report.nbytes) if accelerator.is_main_process else None
    return agree(accelerator, loaders.build, cfg.data, classes, train, val, seed=cfg.train.seed,
                 world=accelerator.num_processes, rank=accelerator.process_index,
                 device=accelerator.device, sizes=report.sizes), fingerprint


def scan_split_files(cfg: Config, train: list, val: list, log):
    """Rank 0's pre-flight check of every file; stops the run on bad files unless told to skip them."""
    t0, warnings = time.perf_counter(), []
    report = screen_files([p for p, _ in train + val], cfg.data.root, cfg.data.skip_bad_images, SKIP_BAD_IMAGES,
                          warnings.append)
    log(f"checked {len(train) + len(val)} image files in {time.perf_counter() - t0:.1f}s: {len(report.bad)} bad")
    for line in warnings:
        log(line)
    if report.bad:
        for split, samples in (("train", train), ("val", val)):
            if all(p in report.bad for p, _ in samples):
                raise UserError(f"data: no usable images left in {cfg.data.root}/{split} after leaving out bad files")
    return report
