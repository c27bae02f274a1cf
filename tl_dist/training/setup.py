"""Setting a run up: ``set_up`` reads as the list of builders it calls; ``lr-find`` uses the same ones.

Order matters for reproducibility: the seed is set before the data and the model are built, the
resume state is read before the model is wrapped, and freezing happens before ``prepare`` (DDP
must see which parameters train).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tl_dist import config, tracking, visualize
from tl_dist.config import Config
from tl_dist.data import demo, listing, loaders, samplers, splits
from tl_dist.data.images import SKIP_BAD_IMAGES, ScanReport, screen_files
from tl_dist.distributed import (agree, check_same_data, make_accelerator, note_peers, on_main_then_share,
                                 rewrap_unfrozen, spans_machines)
from tl_dist.errors import UserError, first_line, one_line
from tl_dist.files import run_dir
from tl_dist.models import backbones, heads, pretrained
from tl_dist.training import feature_cache, host_memory, optim
from tl_dist.training.cuda_graphs import GraphedStep, check_cuda_graphs, use_cuda_graphs
from tl_dist.training.ema import EMA
from tl_dist.training.feature_cache import FeatureCache
from tl_dist.training.engine import EagerStep, HeadInputs, StepSettings, TrainStep
from tl_dist.training.reporting import say, versions
from tl_dist.training.run_state import (RunState, changes, data_fingerprint, model_identity, read_resume,
                                        resume_path, seed_everything, set_rng_state)


@dataclass
class Run:
    """What set-up builds and the epoch loop works with."""
    cfg: Config
    accelerator: object
    out: Path
    data: loaders.Data
    net: torch.nn.Module  # as prepared (DDP-wrapped with several processes)
    optimizer: torch.optim.Optimizer
    schedule: optim.Schedule
    step: TrainStep
    settings: StepSettings
    state: RunState
    meta: dict  # what every checkpoint of this run says about itself
    tracking: tracking.Tracking
    ema: EMA | None = None
    head_inputs: HeadInputs | None = None
    features: FeatureCache | None = None  # the train set's, while the backbone is frozen (train.feature_cache)

    def log(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            say(msg)

    def unfreeze(self, epoch: int) -> None:
        self.net = rewrap_unfrozen(self.accelerator, self.net)
        self.head_inputs = self.features = None  # the backbone moves from now on: its outputs do too
        self.settings = dataclasses.replace(self.settings, frozen=False)
        self.log(f"epoch {epoch}: the backbone trains from now on "
                 f"(after model.unfreeze_epoch={self.cfg.model.unfreeze_epoch} frozen epochs)")

    def drop_failed_graphs(self) -> None:
        failed = getattr(self.step, "failed", None)
        if failed:
            self.log(f"warning: train.cuda_graphs: {failed}; training goes on without graphs")
            self.step = self.step.fallback


def set_up(cfg: Config, lock: run_dir.RunLock) -> Run:
    """Accelerator, run directory, data, model, resume state, optimizer, train step and the first files."""
    accelerator, mp = start_processes(cfg)
    main_proc = accelerator.is_main_process
    log = say if main_proc else (lambda msg: None)
    out = Path(cfg.train.output_dir)
    agree(accelerator, lambda: run_dir.prepare_output_dir(out, lock, cfg.train.resume) if main_proc else None)
    seed_everything(cfg.train.seed)

    cfg, d, fingerprint, listed = prepare_data(cfg, accelerator, log)
    net = agree(accelerator, backbones.build, cfg.model, len(d.classes), cfg.data.image_size)
    state = read_state(cfg, accelerator, net, d.classes, log)
    start = state.next_epoch if state is not None else 0
    net, channels_last = shape_model(cfg, net, accelerator.num_processes)
    optimizer = optim.build_optimizer(net, cfg)
    frozen = heads.frozen_at(cfg.model, start)  # the phase the wrapper is built for
    if cfg.model.mode == "frozen_then_finetune" and cfg.model.unfreeze_epoch >= cfg.train.epochs:
        log(f"note: model.unfreeze_epoch={cfg.model.unfreeze_epoch} >= train.epochs={cfg.train.epochs}: "
            f"the backbone stays frozen in this run (a resumed run with more epochs unfreezes it)")
    heads.set_frozen(net, frozen)
    if state is not None:
        restore_optimizer_and_rngs(optimizer, state, accelerator, out)
    net, optimizer = accelerator.prepare(net, optimizer)
    model = accelerator.unwrap_model(net)
    # (asked once: the train step and the feature cache both follow the answer)
    no_features = feature_cache.why_off(cfg, model, len(d.train)) if frozen else "the backbone trains"
    step = build_step(cfg, accelerator, optimizer, mp, keeps_features=no_features is None)
    settings = step_settings(cfg, frozen, channels_last, d, accelerator.device)
    meta = run_metadata(cfg, accelerator, net, d, mp, listed.split)
    state = state or RunState()
    # (through agree: a failed write stops every rank at once, not only rank 0)
    agree(accelerator, lambda: note_segment(cfg, out, state, fingerprint, listed.split, log) if main_proc else None)
    if main_proc:
        first_lines(cfg, accelerator, d, listed, meta, mp, start, log, step)
    epoch_images = d.train_sampler.images_per_epoch()  # (all, unless limited)
    return Run(cfg, accelerator, out, d, net, optimizer, optim.Schedule(optimizer, cfg, epoch_images), step, settings,
               state, meta, tracking.Tracking(accelerator, cfg.to_dict(), out, epoch_images, start),
               build_ema(cfg, model, state, log),
               HeadInputs() if keeps_val_features(cfg, model, frozen, len(d.val)) else None,
               build_feature_cache(d, frozen, no_features, log))


# ----------------------------------------------------------------------------- the builders

def start_processes(cfg: Config):
    """The Accelerator and its mixed precision; what this machine needs checked before any work."""
    accelerator, mp = make_accelerator(cfg)
    if accelerator.num_processes > 1:
        note_peers(accelerator)  # (to name a rank that dies later)
    if accelerator.device.type == "cpu":  # activations live in host memory: reuse it step to step
        host_memory.keep_freed_memory()
    check_cuda_graphs(cfg, accelerator.device, accelerator.num_processes, mp)
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    return accelerator, mp


def screened_splits(cfg: Config, accelerator, log,
                    recorded: dict | None = None) -> tuple[Config, listing.DataSet, ScanReport]:
    """The data set's classes and parts (train and val without the files the scan left out), every
    file checked (rank 0 scans, every rank gets the result, so all agree on what is left out); the
    demo set generated first where asked for. A split made by data.val_split keeps ``recorded``.
    The config comes back with the task resolved (``resolve_task``)."""
    if cfg.data.demo:
        # (on every node's first rank, which says so once it knows the folder takes it; the others
        # wait, then all learn of a refusal together)
        agree(accelerator, lambda: demo.generate(cfg.data.root, seed=0, log=log) if accelerator.is_local_main_process
              else None)
    data = agree(accelerator, listing.list_data, cfg.data, recorded)
    cfg = resolve_task(cfg, data)
    if data.note:
        log(data.note)
    if accelerator.num_processes > 1:  # (one copy of the data per machine: its first rank reads the
        # bytes, when there are other machines to compare with)
        deep = accelerator.is_local_main_process and spans_machines(accelerator)
        check_same_data(accelerator, listing.identity(cfg.data.root, data.classes, data.train, data.val, deep=deep,
                                                      reader=data.reader))
    report = on_main_then_share(accelerator, lambda: scan_split_files(cfg, data, log))
    if report.bad:
        data.train = [s for s in data.train if s[0] not in report.bad]
        data.val = [s for s in data.val if s[0] not in report.bad]
    return cfg, data, report


def resolve_task(cfg: Config, data: listing.DataSet) -> Config:
    """train.task from the data where it is not set (multi_label when images have several labels),
    and train.select_best_by's default for it; the data's labels as the task takes them."""
    task = cfg.train.task or ("multi_label" if data.multi_label else "single_label")
    if task == "single_label" and data.multi_label:
        raise UserError("train: train.task=single_label, but the labels file gives images several labels "
                        "(data.label_delimiter, or JSON lists); set train.task=multi_label, or one label per row")
    by = cfg.train.select_best_by or ("map" if task == "multi_label" else "val_acc")
    if task == "single_label" and by in ("map", "micro_f1"):
        raise UserError(f"config: train.select_best_by={by} is a multi_label metric, and this run is single_label "
                        f"(one label per image); use val_acc, macro_f1 or val_loss")
    if task == "multi_label":
        if cfg.data.sampler == "balanced":
            raise UserError("config: data.sampler=balanced draws images by their class, and a multi_label image "
                            "has several (or none); use data.sampler=shuffle, or train.class_weights=balanced")
        data.as_multi_label()
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, task=task, select_best_by=by))


def prepare_data(cfg: Config, accelerator, log) -> tuple[Config, loaders.Data, dict | None, listing.DataSet]:
    """The config with its task resolved; this rank's data, (rank 0) the fingerprint of what it
    trains on, and the data set's listing (its layout, and the split it made or kept)."""
    recorded = on_main_then_share(accelerator, lambda: recorded_split(cfg))
    cfg, data, report = screened_splits(cfg, accelerator, log, recorded)
    fingerprint = data_fingerprint(data.train, data.val, report.nbytes) if accelerator.is_main_process else None
    d = agree(accelerator, loaders.build, cfg.data, data.classes, data.train, data.val, seed=cfg.train.seed,
              world=accelerator.num_processes, rank=accelerator.process_index,
              device=accelerator.device, sizes=report.sizes, limit_train=cfg.train.limit_train_batches,
              limit_val=cfg.train.limit_val_batches, reader=data.reader, disk_folder=image_cache_folder(cfg), log=log)
    if d.warning:
        log(d.warning)
    return cfg, d, fingerprint, data


def image_cache_folder(cfg: Config) -> Path:
    """data.cache=disk's folder: data.cache_dir, or the run's own image_cache/."""
    return Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else Path(cfg.train.output_dir) / "image_cache"


def recorded_split(cfg: Config) -> dict | None:
    """The split of the run this one continues (its split.json), if it made one."""
    if cfg.train.resume == "none":
        return None
    return run_dir.read_split(resume_path(cfg).parent)


def scan_split_files(cfg: Config, data: listing.DataSet, log) -> ScanReport:
    """The pre-flight check of every file training reads (train and val; a test part is never
    read); stops the run on bad files unless told to skip them."""
    t0, warnings = time.perf_counter(), []
    train, val = data.train, data.val
    every = [p for p, _ in train + val]
    report = screen_files(every, cfg.data.root, cfg.data.skip_bad_images, SKIP_BAD_IMAGES, warnings.append,
                          lines=data.line_numbers if data.rows is not None else None, reader=data.reader,
                          known_bad=data.bad, limit=cfg.data.scan_limit)
    limit = cfg.data.scan_limit
    checked = f"checked {len(every)} images" if limit is None or len(every) <= limit else \
        f"checked a sample of {len(report.sizes)} of {len(every)} images (the rest as they are decoded)"
    log(f"{checked} in {time.perf_counter() - t0:.1f}s: {len(report.bad)} bad")
    for line in warnings:
        log(line)
    if report.bad:
        for split, samples in (("train", train), ("val", val)):
            if all(p in report.bad for p, _ in samples):
                raise UserError(f"data: no usable images left in {cfg.data.root}/{split} after leaving out bad files")
    return report


def read_state(cfg: Config, accelerator, net: torch.nn.Module, classes: list[str], log) -> RunState | None:
    """The state to resume from, its weights loaded into ``net``; None for a fresh start. Rank 0
    reads, every rank receives (no shared filesystem needed across machines)."""
    if cfg.train.resume == "none":
        return None
    state = on_main_then_share(accelerator, lambda: read_resume(cfg, model_identity(cfg, classes)))
    if state is None:
        return None
    out = Path(cfg.train.output_dir)
    try:
        pretrained.load_state(net, state.model)
    except (RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"resume: the weights in {out / 'resume.pt'} do not fit {cfg.model.arch} "
                        f"({one_line(first_line(e))}); use another train.output_dir or train.resume=none") from None
    if complete(cfg, state):
        raise RunComplete(state)
    log(f"resuming {out} after epoch {state.epoch} (best val acc {state.best_epoch_val_acc:.4f} "
        f"at epoch {state.best_epoch})")
    return state


class RunComplete(Exception):
    """The run to resume has nothing left to do: every epoch of train.epochs is done, or it stopped
    early. Nothing is trained or written; the trainer says so and returns the run's result."""

    def __init__(self, state: RunState) -> None:
        super().__init__("complete")
        self.state = state


def complete(cfg: Config, state: RunState) -> bool:
    patience = cfg.train.early_stopping_patience
    return state.next_epoch >= cfg.train.epochs or bool(patience and state.epochs_without_improvement() >= patience)


def shape_model(cfg: Config, net: torch.nn.Module, processes: int) -> tuple[torch.nn.Module, bool]:
    """The network as it trains: SyncBatchNorm across processes if asked, channels-last where it
    helps, compiled if asked; and whether it is channels-last (the inputs must follow)."""
    if cfg.train.sync_batchnorm and processes > 1:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    channels_last = backbones.uses_channels_last(cfg.model)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        net.compile(mode=cfg.train.compile_mode)
    return net, channels_last


def restore_optimizer_and_rngs(optimizer: torch.optim.Optimizer, state: RunState, accelerator, out: Path) -> None:
    try:
        optimizer.load_state_dict(state.optimizer)
    except (ValueError, KeyError) as e:
        raise UserError(f"resume: the optimizer state in {out / 'resume.pt'} does not fit this run ({e}); "
                        f"use another train.output_dir or train.resume=none") from None
    # Data order and augmentation do not depend on these; with another world size they are
    # left as seeded, which changes nothing the run draws.
    if len(state.rng) == accelerator.num_processes:
        set_rng_state(state.rng[accelerator.process_index])


def build_step(cfg: Config, accelerator, optimizer, mp: str, keeps_features: bool = False) -> TrainStep:
    step: TrainStep = EagerStep(accelerator, optimizer)
    if use_cuda_graphs(cfg, accelerator.device, accelerator.num_processes, mp, keeps_features):
        step = GraphedStep(optimizer.optimizer, accelerator.device, torch.bfloat16 if mp == "bf16" else None,
                           capture=accelerator.device.type == "cuda", fallback=step)
    return step


def step_settings(cfg: Config, frozen: bool, channels_last: bool, d: loaders.Data, device) -> StepSettings:
    multi = cfg.train.task == "multi_label"
    weighted = optim.positive_weights if multi else optim.class_weights
    weights = (weighted([y for _, y in d.train.samples], len(d.classes)).to(device)
               if cfg.train.class_weights == "balanced" else None)
    t = cfg.train
    return StepSettings(cfg.data.mean, cfg.data.std, channels_last, frozen, cfg.model.frozen_bn, t.grad_accum_steps,
                        t.label_smoothing, weights, t.seed, t.mixup_alpha, t.cutmix_alpha, t.mix_prob, multi,
                        t.threshold)


def run_metadata(cfg: Config, accelerator, net: torch.nn.Module, d: loaders.Data, mp: str, split: dict | None) -> dict:
    """What every checkpoint of this run says about itself (the predictor needs nothing else)."""
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
    if split is not None:  # (the lists stay in split.json)
        meta["split"] = splits.summary(split)
    if limited(cfg):  # (a quick trial: never to be mistaken for a full run)
        meta["limited"] = {"train_images": d.train_sampler.images_per_epoch(), "val_images": val_images(cfg, d)}
    if cfg.train.task == "multi_label":  # (a checkpoint without "task" is single_label)
        meta["task"], meta["threshold"] = "multi_label", cfg.train.threshold
    return meta


def limited(cfg: Config) -> bool:
    return cfg.train.limit_train_batches is not None or cfg.train.limit_val_batches is not None


def val_images(cfg: Config, d: loaders.Data) -> int:
    """The val images each epoch evaluates (all, unless train.limit_val_batches)."""
    return samplers.eval_count(len(d.val), samplers.eval_batch_size(cfg.data.eval_batch_size, cfg.data.batch_size),
                               cfg.train.limit_val_batches)


def build_ema(cfg: Config, model: torch.nn.Module, state: RunState, log) -> EMA | None:
    """train.ema_decay's average of the weights (after prepare: it lives where the model does)."""
    if cfg.train.ema_decay <= 0:
        return None
    ema = EMA(model, cfg.train.ema_decay)
    if state.ema is not None:
        ema.load(state.ema, state.ema_updates)
    elif state.epoch >= 0:
        log(f"note: train.ema_decay is new at this resume: the average starts from epoch {state.epoch}'s weights")
    return ema


def keeps_val_features(cfg: Config, model: torch.nn.Module, frozen: bool, val_images: int) -> bool:
    """A fixed backbone computes the same val features every epoch: keep them (see HeadInputs) when
    they fit the host cache budget (fp32 size, an upper bound: one vector per val image). Only for
    a Linear head: its output is the model's (SqueezeNet's conv head is followed by pooling)."""
    head = heads.head_module(model)
    feature_bytes = val_images * getattr(head, "in_features", 0) * 4
    return (frozen and cfg.model.frozen_bn == "eval" and isinstance(head, torch.nn.Linear)
            and feature_bytes <= cfg.data.cache_gb * 2**30)


def build_feature_cache(d: loaders.Data, frozen: bool, why: str | None, log) -> FeatureCache | None:
    """train.feature_cache for a run that starts frozen: kept train features where they are exact
    and fit data.cache_gb (``why``: feature_cache.why_off's answer); the first lines say which, and why not."""
    if not frozen:
        return None
    if why is not None:
        log(f"feature cache off: {why}; the backbone runs on every train image every epoch")
        return None
    log("feature cache on: the first frozen epoch keeps each train image's backbone output; later frozen epochs "
        "train the classifier on them (train.feature_cache=off runs the backbone every epoch)")
    return FeatureCache([y for _, y in d.train.samples], len(d.classes))


# ----------------------------------------------------------------------------- the run's first lines and files

def note_segment(cfg: Config, out: Path, state: RunState, data_fp: dict, split: dict | None, log) -> None:
    """The run directory's account of how its weights are made (rank 0): a fresh run writes its
    config.yaml (and split.json, when it made a split); a resume keeps them, says what changed since
    (data, settings) and appends that to resumes.jsonl. The state then describes this segment."""
    now = cfg.to_dict()
    if split is not None and run_dir.read_split(out) != split:
        run_dir.write_split(out, split)
    if state.epoch < 0:
        run_dir.write_config(out, config.dump(cfg))
    else:
        changed = changes(state, data_fp, now)
        if changed:
            log("note: changed since epoch {}: {}".format(state.epoch, "; ".join(
                f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())))
        run_dir.record_resume(out, state.epoch, changed)
    state.data, state.config = data_fp, now


def first_lines(cfg: Config, accelerator, d: loaders.Data, listed: listing.DataSet, meta: dict, mp: str, start: int,
                log, step: TrainStep) -> None:
    """Rank 0: what this run is, settings that are likely a mistake, and the first picture."""
    layout = "" if listed.layout == "folders" else f" ({listed.layout}{', in split.json' if listed.split else ''})"
    log(f"tl_dist: {len(d.train)} train / {len(d.val)} val images{layout}, {len(d.classes)} classes; "
        f"{cfg.model.arch} {cfg.model.mode}; {accelerator.num_processes} process(es) on "
        f"{accelerator.device.type}; mixed precision {mp}; train step: {step_kind(step)}; data: {meta['data_path']}")
    if limited(cfg):
        log(f"limited run (train.limit_train_batches / limit_val_batches): {d.train_sampler.images_per_epoch()} "
            f"train and {val_images(cfg, d)} val images per epoch; a quick trial, and its files say so")
    if cfg.scheduler.warmup_epochs >= cfg.train.epochs:
        log(f"warning: scheduler.warmup_epochs ({cfg.scheduler.warmup_epochs:g}) is not shorter than train.epochs "
            f"({cfg.train.epochs}): the learning rate rises for the whole run and never trains at optim.lr; "
            f"shorten the warm-up (a few epochs, or a fraction of one)")
    if cfg.train.plots and start == 0:
        visualize.drawn(visualize.train_batch, d.train, d.classes, Path(cfg.train.output_dir) / "train_batch.png",
                        seed=cfg.train.seed)


def step_kind(step: TrainStep) -> str:
    return "one CUDA graph (train.cuda_graphs)" if isinstance(step, GraphedStep) else "eager"


def write_in_background() -> bool:
    """Checkpoint files are written while the next epoch runs where the model trains on a GPU (the
    host's cores are free); where it trains on the CPU, they are written between epochs."""
    return torch.cuda.is_available()
