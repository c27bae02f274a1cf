"""fit(cfg): one training job. Set up, then the epoch loop (``_fit``, one screen), then finish.

Rank 0 writes every file; all ranks agree on "best" because they compare the same reduced metric.
Who owns what: the processes (``distributed``), the run state and its files (``runstate``), one
epoch's train and eval (``engine``), the optimizer and schedule (``recipe``), the model (``model``),
the data (``data``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import platform
import resource
import signal
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch
import torchvision
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import __version__, checkpoint, config, data, demo, host_memory, recipe, tracking, visualize
from . import model as model_lib
from .config import Config
from .distributed import (StopRequest, agree, as_job_failure, assert_ranks_in_sync, check_same_data, gather_objects,
                          make_accelerator, note_peers, on_main_then_share, rewrap_unfrozen, share_buffers,
                          spans_machines)
from .ema import EMA
from .engine import EagerStep, EpochResult, HeadInputs, StepContext, TrainStep, evaluate, train_one_epoch
from .errors import UserError, drop_stdout, first_few, first_line, one_line, printable
from .graphs import GraphedStep, check_cuda_graphs
from .images import SKIP_BAD_IMAGES, screen_files
from .runstate import (RunState, changes, data_fingerprint, model_identity, read_resume, record_resume,
                       rng_state, save_epoch, score_of, seed_everything, set_rng_state, write_status)


@dataclass
class RunResult:
    output_dir: Path
    best_val_acc: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    interrupted: int = 0  # the signal that stopped the run, 0 if it ran to the end


def fit(cfg: Config) -> RunResult:
    """One training run; returns its result. SIGTERM/SIGINT stop it cleanly at a step boundary.

    Returns (or raises) only once every epoch's files are on disk.
    """
    cfg = model_lib.resolve(cfg)  # the model and its input size checked, preprocessing filled in
    background = cfg.train.write_in_background
    writer = checkpoint.BackgroundWriter(background=write_in_background() if background is None else background)
    lock = checkpoint.RunLock()  # taken by rank 0 in set-up, released once every file is written
    try:
        with StopRequest() as stop:
            stop.before_forced_exit = lambda: end_status(
                cfg, lock, "interrupted", "stopped by a signal while waiting for another rank (frozen or gone)")
            try:
                result = _fit(cfg, stop, writer, lock)
            except RuntimeError as e:
                failure = as_job_failure(e, cfg.train.collective_timeout)
                if failure is None:
                    raise
                raise failure from None
    except BaseException as e:
        try:  # keep the last complete epoch; the error in flight is the one to report
            writer.close()
        except Exception as e2:
            print(f"warning: {one_line(e2)}", file=sys.stderr, flush=True)
        end_status(cfg, lock, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                   "" if isinstance(e, KeyboardInterrupt) else one_line(first_line(e))[:300])
        lock.release()
        raise
    writer.close()
    end_status(cfg, lock, "interrupted" if result.interrupted else "complete")
    lock.release()
    return result


def end_status(cfg: Config, lock: checkpoint.RunLock, status: str, detail: str = "") -> None:
    """Rank 0, once its segment started: how it ended, in status.json. Never hides the run's own error."""
    if not lock.segment_started:
        return  # refused before it began (another run's directory, a lock held): not ours to mark
    try:
        write_status(Path(cfg.train.output_dir), status, detail)
    except OSError as e:
        print(f"warning: cannot write {Path(cfg.train.output_dir) / 'status.json'}: {e.strerror}",
              file=sys.stderr, flush=True)


def _fit(cfg: Config, stop: StopRequest, writer: checkpoint.BackgroundWriter, lock: checkpoint.RunLock) -> RunResult:
    run = set_up(cfg, lock)
    acc, state, d = run.accelerator, run.state, run.data
    t_run, interrupted = time.perf_counter(), 0
    for epoch in range(state.next_epoch, cfg.train.epochs):
        if stops_early(cfg, state, run.log):
            break
        if run.ctx.frozen and not model_lib.frozen_at(cfg.model, epoch):
            run.unfreeze(epoch)
        lrs = recipe.set_lrs(run.optimizer, cfg, epoch)
        d.train_sampler.set_epoch(epoch)
        tr = train_one_epoch(acc, run.net, run.step, d.train_loader, d.train_sampler, run.ctx, epoch,
                             should_stop=lambda: stop.check(acc),
                             on_window=functools.partial(run.before_step, epoch, lrs),
                             after_step=run.ema.update if run.ema else lambda: None)
        if tr.stopped:
            interrupted = stop.signum or signal.SIGTERM
            break
        check_finite("train", tr.loss, epoch, run)
        run.drop_failed_graphs()
        share_buffers(acc, run.net)
        va = evaluate(acc, run.ema.module if run.ema else run.net, d.val_loader, run.ctx, len(d.classes), epoch,
                      run.head_inputs)
        check_finite("val", va.loss, epoch, run)
        digest = assert_ranks_in_sync(acc, run.net, epoch)
        report_bad_images(cfg, d, tr, va, epoch, run.log)
        row = metrics_row(epoch, tr, va, lrs, run.ctx.frozen, digest, acc.device)
        is_best = record_and_save(run, writer, row, va)
        run.tracking.epoch(row)
        run.log(epoch_line(row, cfg.train.epochs, lrs, run.ctx.frozen, is_best))
        if stop.check(acc) and epoch + 1 < cfg.train.epochs:
            interrupted = stop.signum or signal.SIGTERM
            break
    return finish(run, writer, interrupted, time.perf_counter() - t_run)


# ----------------------------------------------------------------------------- set-up

@dataclass
class Run:
    """What set-up builds and the epoch loop works with."""
    cfg: Config
    accelerator: object
    out: Path
    data: data.Data
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
        if recipe.varies_within_epoch(self.cfg):
            lrs = recipe.set_lrs(self.optimizer, self.cfg, epoch, epoch + done / len(self.data.train))
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


def set_up(cfg: Config, lock: checkpoint.RunLock) -> Run:
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
    net = agree(accelerator, model_lib.build, cfg.model, len(d.classes), cfg.data.image_size)
    # Resume: rank 0 reads, every rank receives (no shared filesystem needed across machines).
    state = (on_main_then_share(accelerator, lambda: read_resume(cfg, model_identity(cfg, d.classes)))
             if cfg.train.resume != "none" else None)
    if state is not None:
        try:
            model_lib.load_state(net, state.model)
        except (RuntimeError, KeyError, TypeError) as e:
            raise UserError(f"resume: the weights in {out / 'resume.pt'} do not fit {cfg.model.arch} "
                            f"({one_line(first_line(e))}); use another train.output_dir or train.resume=none") from None
        log(f"resuming {out} after epoch {state.epoch} (best val acc {state.best_val_acc:.4f} "
            f"at epoch {state.best_epoch})")

    if cfg.train.sync_batchnorm and accelerator.num_processes > 1:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    channels_last = model_lib.uses_channels_last(cfg.model)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        net.compile(mode=cfg.train.compile_mode)
    optimizer = recipe.build_optimizer(net, cfg)
    start = state.next_epoch if state is not None else 0
    frozen = model_lib.frozen_at(cfg.model, start)  # the phase the wrapper is built for
    if cfg.model.mode == "frozen_then_finetune" and cfg.model.unfreeze_epoch >= cfg.train.epochs:
        log(f"note: model.unfreeze_epoch={cfg.model.unfreeze_epoch} >= train.epochs={cfg.train.epochs}: "
            f"the backbone stays frozen in this run (a resumed run with more epochs unfreezes it)")
    model_lib.set_frozen(net, frozen)
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
    weights = (recipe.class_weights([y for _, y in d.train.samples], len(d.classes)).to(accelerator.device)
               if cfg.train.class_weights == "balanced" else None)
    t = cfg.train
    ctx = StepContext(cfg.data.mean, cfg.data.std, channels_last, frozen, cfg.model.frozen_bn, t.grad_accum_steps,
                      t.label_smoothing, weights, t.seed, t.mixup_alpha, t.cutmix_alpha, t.mix_prob)
    meta = {
        "classes": d.classes, "num_classes": len(d.classes), "arch": cfg.model.arch, "mode": cfg.model.mode,
        "arch_kwargs": model_lib.arch_kwargs(cfg.model, cfg.data.image_size),
        "head": model_lib.head_name(accelerator.unwrap_model(net)),
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
    head = model_lib.head_module(accelerator.unwrap_model(net))
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
            checkpoint.atomic_write_text(out / "config.yaml", config.dump(cfg))
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


def prepare_output_dir(path: Path, lock: checkpoint.RunLock, resume: str) -> None:
    """Create it, lock it (one run at a time), refuse to start afresh over a run that is there, and
    remove temp files a killed run of ours left."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock.acquire(path)  # before anything else here is touched
    except OSError as e:
        raise UserError(f"train: train.output_dir {path} is not writable: {e.strerror}; "
                        f"choose another with train.output_dir=PATH") from None
    refuse_foreign_files(path)
    if resume == "none" and (path / "best.safetensors").exists():
        best = checkpoint.read_metadata(path / "best.safetensors")
        raise UserError(f"train: train.resume=none would start afresh in {path}, replacing its run (best val acc "
                        f"{best['val_acc']:.4f} at epoch {best['epoch']}); choose another train.output_dir, or move "
                        f"that run away first")
    checkpoint.remove_stale_temp_files(path)
    write_status(path, "running")
    lock.segment_started = True  # from here on this run's end is this directory's news


def refuse_foreign_files(path: Path) -> None:
    """A folder no tl_dist run has used must not hold files a run would replace (a project folder's
    own config.yaml, say). A run's folder, recognised by its status.json or resume state, is its own."""
    from .outputs import json_object

    said = (json_object(path / "status.json") or {}).get("status")
    if said in ("running", "complete", "interrupted", "failed") or (path / "resume.pt").exists():
        return
    names = [*checkpoint.RUN_FILE_NAMES, "status.json", *(f"{p}.png" for p in tracking.PICTURES)]
    found = [n for n in names if (path / n).exists() or (path / n).is_symlink()]
    if found:
        raise UserError(f"train: train.output_dir {path} holds {first_few(found, 4)}, which a run would replace, "
                        f"and no tl_dist run has used it; choose a new or empty folder, or move them away")


def versions() -> dict[str, str]:
    return {"tl_dist": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "accelerate": version("accelerate"), "python": platform.python_version()}


def write_in_background() -> bool:
    """Checkpoint files are written while the next epoch runs where the model trains on a GPU (the
    host's cores are free); where it trains on the CPU, they are written between epochs."""
    return torch.cuda.is_available()


# ----------------------------------------------------------------------------- data

def say(msg: str) -> None:
    """A progress line on stdout. A closed or full stdout (a pipe whose reader left, /dev/full)
    loses the line but never the run: the files are what matters."""
    try:
        print(printable(msg), flush=True)
    except OSError:
        drop_stdout()


def prepare_data(cfg: Config, accelerator, log) -> tuple[data.Data, dict | None]:
    """This rank's data, and (rank 0) the fingerprint of what it trains on."""
    if cfg.data.demo:
        if accelerator.is_local_main_process and not (Path(cfg.data.root) / demo.MARKER).exists():
            log(f"generating the synthetic demo data set in {cfg.data.root} (once)")
        # (on every node's first rank; the others wait, then all learn of a refusal together)
        agree(accelerator, lambda: demo.generate(cfg.data.root, seed=0) if accelerator.is_local_main_process else None)
    classes, train, val = agree(accelerator, data.list_splits, cfg.data.root)
    if accelerator.num_processes > 1:  # (one copy of the data per machine: its first rank reads the bytes,
        # when there are other machines to compare with)
        check_same_data(accelerator, data.identity(cfg.data.root, classes, train, val,
                                                   deep=accelerator.is_local_main_process and spans_machines(accelerator)))
    # One scan on rank 0, shared with every rank, so all ranks agree on what is left out.
    report = on_main_then_share(accelerator, lambda: scan_split_files(cfg, train, val, log))
    if report.bad:
        train = [s for s in train if s[0] not in report.bad]
        val = [s for s in val if s[0] not in report.bad]
    fingerprint = data_fingerprint(train, val, report.nbytes) if accelerator.is_main_process else None
    return agree(accelerator, data.build, cfg.data, classes, train, val, seed=cfg.train.seed,
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


def report_bad_images(cfg: Config, d: data.Data, tr: EpochResult, va: EpochResult, epoch: int, log) -> None:
    """Files that passed the scan but failed to decode this epoch: stop, or say they were left out."""
    # Indices are per split: train's from the train set, val's from the val set.
    bad = [d.train.samples[i][0] for i in tr.bad] + [d.val.samples[i][0] for i in va.bad]
    if not bad:
        return
    paths = first_few(bad, 5)
    if not cfg.data.skip_bad_images:
        raise UserError(f"data: {len(bad)} image(s) failed to decode during epoch {epoch} "
                        f"(changed since the scan?): {paths}; fix them or set data.skip_bad_images=true")
    log(f"warning: {len(bad)} image(s) failed to decode and were left out this epoch: {paths}")


# ----------------------------------------------------------------------------- each epoch

def stops_early(cfg: Config, state: RunState, log) -> bool:
    """train.early_stopping_patience: every rank sees the same reduced metrics, so all stop together;
    checked before each epoch, so a resumed run that had stopped stays stopped."""
    patience = cfg.train.early_stopping_patience
    if not patience or state.epochs_without_improvement() < patience:
        return False
    log(f"early stop after epoch {state.epoch}: no better {cfg.train.select_best_by} for {patience} epoch(s) "
        f"(best at epoch {state.best_epoch})")
    return True


def macro_f1(confusion: torch.Tensor) -> float:
    """Mean F1 over the classes the val split has ([true, predicted] counts)."""
    c = confusion.double()
    tp, support, predicted = c.diag(), c.sum(1), c.sum(0)
    f1 = torch.where(support + predicted > 0, 2 * tp / (support + predicted).clamp(min=1), torch.zeros_like(tp))
    present = support > 0
    return float(f1[present].mean()) if present.any() else 0.0


def check_finite(split: str, loss: float, epoch: int, run: Run) -> None:
    """A NaN or infinite loss means the weights are gone: stop before this epoch is saved (every
    rank sees the same reduced loss, so all stop together)."""
    if math.isfinite(loss):
        return
    kept = (f"the last good epoch ({run.state.epoch}) is kept in {run.out}" if run.state.epoch >= 0
            else "no epoch was saved")
    raise UserError(f"train: the {split} loss became {loss} in epoch {epoch}; {kept}. Lower optim.lr "
                    f"(it is {run.cfg.optim.lr}), check data.mean/data.std, or use train.mixed_precision=no")


def metrics_row(epoch: int, tr: EpochResult, va: EpochResult, lrs: list[float], frozen: bool,
                digest: str | None, device: torch.device) -> dict:
    """The epoch's line in metrics.jsonl."""
    row = {"epoch": epoch, "train_loss": tr.loss, "train_acc": tr.acc, "val_loss": va.loss,
           "val_acc": va.acc, "macro_f1": macro_f1(va.confusion), "lr": lrs[0], "backbone_lr": None if frozen else lrs[-1],
           "seconds": tr.seconds + va.seconds, "train_seconds": tr.seconds, "val_seconds": va.seconds,
           "train_samples": tr.samples, "val_samples": va.samples, **peak_memory_mb(device)}
    if digest:
        row["weights_digest"] = digest
    return row


def record_and_save(run: Run, writer: checkpoint.BackgroundWriter, row: dict, va: EpochResult) -> bool:
    """Add the epoch to the run state and (rank 0) hand its files to the writer; True if it is the best."""
    acc, state = run.accelerator, run.state
    score = score_of(row, run.cfg.train.select_best_by)
    is_best = state.improves(score)
    # CPU copies, taken now: kept as the best, and written while the next epoch trains. The
    # average (train.ema_decay) is what was evaluated, so it is what best and last hold.
    keep = is_best or acc.is_main_process
    weights = (checkpoint.snapshot(acc.unwrap_model(run.net).state_dict())
               if acc.is_main_process or (is_best and run.ema is None) else None)
    ema = checkpoint.snapshot(run.ema.state_dict()) if run.ema and keep else None
    state.record(row, score, va.confusion, weights, ema)
    state.ema_updates = run.ema.updates if run.ema else 0
    rngs = gather_objects(acc, rng_state())
    if acc.is_main_process:
        state.optimizer, state.rng = checkpoint.snapshot(run.optimizer.state_dict()), rngs
        meta = {**run.meta, "epoch": row["epoch"], "val_acc": va.acc, "val_loss": va.loss, "macro_f1": row["macro_f1"]}
        resume = state.to_resume(model_identity(run.cfg, run.data.classes))
        writer.submit(functools.partial(save_epoch, run.out, meta, is_best, resume))
    return is_best


def epoch_line(row: dict, epochs: int, lrs: list[float], frozen: bool, is_best: bool) -> str:
    backbone = "" if frozen or lrs[-1] == lrs[0] else f" (backbone {lrs[-1]:.2g})"
    return (f"epoch {row['epoch']} ({row['epoch'] + 1} of {epochs})  train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.4f}  val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}  "
            f"lr {lrs[0]:.2g}{backbone}  {row['seconds']:.1f}s{'  *best' if is_best else ''}")


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """This process's peak resident host memory, and peak GPU memory allocated by torch."""
    peak = {"peak_host_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # KiB on Linux
    if device.type == "cuda":
        peak["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


# ----------------------------------------------------------------------------- finish

def finish(run: Run, writer: checkpoint.BackgroundWriter, interrupted: int, total: float) -> RunResult:
    acc, state, out = run.accelerator, run.state, run.out
    acc.wait_for_everyone()
    if interrupted:
        writer.wait()  # before saying so
        if state.epoch >= 0:
            run.log(f"interrupted: stopped at a step boundary; the last complete epoch ({state.epoch}) is saved in "
                    f"{out}. Resume with the same command (train.resume=auto continues from {out / 'resume.pt'}).")
        else:
            run.log("interrupted: stopped at a step boundary before the first epoch ended; nothing was saved")
        run.tracking.end()
        return RunResult(out, state.best_val_acc, state.best_epoch, state.history, interrupted=int(interrupted))

    if state.best_model is not None:  # as the tutorial does: the model ends with the best weights
        model_lib.load_state(acc.unwrap_model(run.net), state.best_model)
    if acc.is_main_process:
        summary(state, total, out)
        if run.cfg.train.plots and state.best_model is not None:
            visualize.after_training(acc.unwrap_model(run.net), run.data, run.ctx, state.history,
                                     state.best_confusion, out, acc.device, state.best_epoch)
        run.tracking.pictures(out, state.epoch + 1)
    run.tracking.end()
    return RunResult(out, state.best_val_acc, state.best_epoch, state.history)


def summary(state: RunState, total: float, out: Path) -> None:
    t = Table(title=f"tl_dist run: {escape(printable(out))}")
    for col in ("epoch", "train loss", "train acc", "val loss", "val acc", "lr", "s"):
        t.add_column(col, justify="right")
    for r in state.history:
        t.add_row(str(r["epoch"]), f"{r['train_loss']:.4f}", f"{r['train_acc']:.4f}", f"{r['val_loss']:.4f}",
                  f"{r['val_acc']:.4f}" + (" *" if r["epoch"] == state.best_epoch else ""), f"{r['lr']:.2g}",
                  f"{r['seconds']:.1f}")
    Console().print(t)
    # Plain prints: scripts read these lines, and a console would wrap a long path.
    print(f"total {total:.1f}s; best val acc {state.best_val_acc:.4f} at epoch {state.best_epoch}", flush=True)
    print(f"best weights: {printable(out / 'best.safetensors')}", flush=True)
