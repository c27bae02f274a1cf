"""fit(cfg): one training job. Set up (``setup``), then the epoch loop (``_fit``, one screen), then finish.

Rank 0 writes every file; all ranks agree on "best" because they compare the same reduced metric.
Who owns what: the processes (``tl_dist.distributed``), the run state (``run_state``) and the run
directory's files (``tl_dist.files.run_dir``), one epoch's train and eval (``engine``), the optimizer
and its schedule (``optim``), the model (``tl_dist.models``), the data (``tl_dist.data``).
"""
from __future__ import annotations

import functools
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


from tl_dist import visualize
from tl_dist.files import background_writer, run_dir
from tl_dist.data import loaders
from tl_dist.models import backbones, heads, pretrained
from tl_dist.config import Config
from tl_dist.distributed import (StopRequest, as_job_failure, assert_ranks_in_sync, gather_objects, share_buffers)
from tl_dist.training.engine import (EpochResult, evaluate, train_one_epoch)
from tl_dist.errors import UserError, first_few, first_line, one_line
from tl_dist.training.run_state import (RunState, model_identity, rng_state, score_of)
from tl_dist.files.run_dir import save_epoch, write_status
from tl_dist.training.reporting import epoch_line, metrics_row, say, summary
from tl_dist.training.setup import Run, RunComplete, set_up, write_in_background


@dataclass
class RunResult:
    output_dir: Path
    best_epoch_val_acc: float  # the val accuracy of the best epoch (by train.select_best_by)
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    interrupted: int = 0  # the signal that stopped the run, 0 if it ran to the end


def fit(cfg: Config) -> RunResult:
    """One training run; returns its result. SIGTERM/SIGINT stop it cleanly at a step boundary.

    Returns (or raises) only once every epoch's files are on disk.
    """
    cfg = backbones.resolve(cfg)  # the model and its input size checked, preprocessing filled in
    background = cfg.train.write_in_background
    writer = background_writer.BackgroundWriter(background=write_in_background() if background is None else background)
    lock = run_dir.RunLock()  # taken by rank 0 in set-up, released once every file is written
    try:
        with StopRequest() as stop:
            stop.before_forced_exit = lambda: end_status(
                cfg, lock, "interrupted", "stopped by a signal while waiting for another rank (frozen or gone)")
            try:
                result = _fit(cfg, stop, writer, lock)
            except RunComplete as done:
                writer.close()
                end_status(cfg, lock, "complete")
                lock.release()
                return already_complete(cfg, done.state)
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
        if isinstance(e, UserError) and lock.fresh and not lock.set_up_done:
            lock.discard()  # refused before it began (data, weights, settings): no run to list
        else:
            end_status(cfg, lock, "interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
                       "" if isinstance(e, KeyboardInterrupt) else one_line(first_line(e))[:300])
        lock.release()
        raise
    writer.close()
    end_status(cfg, lock, "interrupted" if result.interrupted else "complete")
    lock.release()
    return result


def already_complete(cfg: Config, state: RunState) -> RunResult:
    """A finished run asked to train again: say so (rank 0) and return its result."""
    if os.environ.get("RANK", "0") == "0":
        t = cfg.train
        how = (f"stopped early after epoch {state.epoch} (train.early_stopping_patience={t.early_stopping_patience})"
               if state.next_epoch < t.epochs else f"all {t.epochs} epochs done")
        say(f"{t.output_dir} is complete: {how}; best val acc {state.best_epoch_val_acc:.4f} at epoch "
            f"{state.best_epoch}. Nothing to do: a larger train.epochs continues it; train.resume=none or another "
            f"train.output_dir starts a new run")
    return RunResult(Path(cfg.train.output_dir), state.best_epoch_val_acc, state.best_epoch, state.history)


def end_status(cfg: Config, lock: run_dir.RunLock, status: str, detail: str = "") -> None:
    """Rank 0, once its segment started: how it ended, in status.json. Never hides the run's own error."""
    if not lock.segment_started:
        return  # refused before it began (another run's directory, a lock held): not ours to mark
    try:
        write_status(Path(cfg.train.output_dir), status, detail)
    except OSError as e:
        print(f"warning: cannot write {Path(cfg.train.output_dir) / 'status.json'}: {e.strerror}",
              file=sys.stderr, flush=True)


def _fit(cfg: Config, stop: StopRequest, writer: background_writer.BackgroundWriter, lock: run_dir.RunLock) -> RunResult:
    run = set_up(cfg, lock)
    lock.set_up_done = True
    cfg = run.cfg  # (with what set-up resolved from the data: the task, the best-epoch metric)
    stop.attach(run.accelerator, cfg.train.collective_timeout)
    accelerator, state, d = run.accelerator, run.state, run.data
    t_run, interrupted = time.perf_counter(), 0
    for epoch in range(state.next_epoch, cfg.train.epochs):
        if stops_early(cfg, state, run.log):
            break
        if run.settings.frozen and not heads.frozen_at(cfg.model, epoch):
            run.unfreeze(epoch)
        lrs = run.schedule.start_epoch(epoch)
        d.train_sampler.set_epoch(epoch)
        tr = train_epoch(run, epoch, stop)
        if tr.stopped:
            interrupted = stop.signum or signal.SIGTERM
            break
        check_finite("train", tr.loss, epoch, run)
        run.drop_failed_graphs()
        share_buffers(accelerator, run.net)
        va = evaluate(accelerator, run.ema.module if run.ema else run.net, d.val_loader, run.settings, len(d.classes), epoch,
                      run.head_inputs)
        check_finite("val", va.loss, epoch, run)
        digest = assert_ranks_in_sync(accelerator, run.net, epoch)
        report_bad_images(cfg, d, tr, va, epoch, run.log)
        row = metrics_row(epoch, tr, va, lrs, run.settings.frozen, digest, accelerator.device)
        state.add_steps(tr.steps)
        is_best = record_and_save(run, writer, row, va)
        run.tracking.epoch(row)
        run.log(epoch_line(row, cfg.train.epochs, lrs, run.settings.frozen, is_best))
        if stop.check(accelerator, now=True) and epoch + 1 < cfg.train.epochs:
            interrupted = stop.signum or signal.SIGTERM
            break
    return finish(run, writer, interrupted, time.perf_counter() - t_run)


def train_epoch(run: Run, epoch: int, stop: StopRequest) -> EpochResult:
    """One epoch's optimizer steps: on the train images, or (train.feature_cache) on the backbone
    outputs the first frozen epoch kept, which it records for the epochs after it."""
    d, features = run.data, run.features

    def steps(loader) -> EpochResult:
        return train_one_epoch(run.accelerator, run.net, run.step, loader, d.train_sampler, run.settings, epoch,
                               schedule=run.schedule, ema=run.ema, stop=stop, tracking=run.tracking)

    last_frozen = epoch + 1 >= run.cfg.train.epochs or not heads.frozen_at(run.cfg.model, epoch + 1)
    if features is None or (not features.ready and last_frozen):  # (nothing to keep them for)
        return steps(d.train_loader)
    model = run.accelerator.unwrap_model(run.net)
    if features.ready:
        with features.head_only(model):
            return steps(features.loader(d.train_sampler))
    with features.recording(model, d.train_loader) as loader:
        tr = steps(loader)
    if not tr.stopped:  # (every rank stops at the same step: all record, or none)
        features.collect(run.accelerator, len(d.train))
        run.log(f"epoch {epoch}: kept the backbone's output for {len(d.train)} train images "
                f"({features.nbytes() / 2**20:.1f} MiB); later frozen epochs train the classifier on them")
    return tr


def report_bad_images(cfg: Config, d: loaders.Data, tr: EpochResult, va: EpochResult, epoch: int, log) -> None:
    """Files that passed the scan but failed to decode this epoch: stop, or say they were left out."""
    # Indices are per split: train's from the train set, val's from the val set.
    bad = [d.train.samples[i][0] for i in tr.bad] + [d.val.samples[i][0] for i in va.bad]
    if not bad:
        return
    paths = first_few(bad, 5)
    if not cfg.data.skip_bad_images:
        raise UserError(f"data: {len(bad)} image(s) failed to decode during epoch {epoch} "
                        f"(changed since the check before training, or not checked: past data.scan_limit): {paths}; "
                        f"fix them or set data.skip_bad_images=true")
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


def check_finite(split: str, loss: float, epoch: int, run: Run) -> None:
    """A NaN or infinite loss means the weights are gone: stop before this epoch is saved (every
    rank sees the same reduced loss, so all stop together)."""
    if math.isfinite(loss):
        return
    kept = (f"the last good epoch ({run.state.epoch}) is kept in {run.out}" if run.state.epoch >= 0
            else "no epoch was saved")
    raise UserError(f"train: the {split} loss became {loss} in epoch {epoch}; {kept}. Lower optim.lr "
                    f"(it is {run.cfg.optim.lr}), check data.mean/data.std, or use train.mixed_precision=no")


def record_and_save(run: Run, writer: background_writer.BackgroundWriter, row: dict, va: EpochResult) -> bool:
    """Add the epoch to the run state and (rank 0) hand its files to the writer; True if it is the best."""
    accelerator, state = run.accelerator, run.state
    score = score_of(row, run.cfg.train.select_best_by)
    is_best = state.improves(score)
    # CPU copies, taken now: kept as the best, and written while the next epoch trains. The
    # average (train.ema_decay) is what was evaluated, so it is what best and last hold.
    keep = is_best or accelerator.is_main_process
    weights = (background_writer.snapshot(accelerator.unwrap_model(run.net).state_dict())
               if accelerator.is_main_process or (is_best and run.ema is None) else None)
    ema = background_writer.snapshot(run.ema.state_dict()) if run.ema and keep else None
    state.record(row, score, va.confusion, weights, ema)
    state.ema_updates = run.ema.updates if run.ema else 0
    rngs = gather_objects(accelerator, rng_state())
    if accelerator.is_main_process:
        state.optimizer, state.rng = background_writer.snapshot(run.optimizer.state_dict()), rngs
        meta = {**run.meta, "epoch": row["epoch"], "val_acc": va.acc, "val_loss": va.loss, "macro_f1": row["macro_f1"],
                **{k: row[k] for k in ("map", "micro_f1") if k in row}}  # (several labels per image)
        resume = state.to_resume(model_identity(run.cfg, run.data.classes))
        writer.submit(functools.partial(save_epoch, run.out, meta, is_best, resume))
    return is_best


# ----------------------------------------------------------------------------- finish

def finish(run: Run, writer: background_writer.BackgroundWriter, interrupted: int, total: float) -> RunResult:
    accelerator, state, out = run.accelerator, run.state, run.out
    accelerator.wait_for_everyone()
    if interrupted:
        writer.wait()  # before saying so
        if state.epoch >= 0:
            run.log(f"interrupted: stopped at a step boundary; the last complete epoch ({state.epoch}) is saved in "
                    f"{out}. Resume with the same command (train.resume=auto continues from {out / 'resume.pt'}).")
        else:
            run.log("interrupted: stopped at a step boundary before the first epoch ended; nothing was saved")
        run.tracking.end()
        return RunResult(out, state.best_epoch_val_acc, state.best_epoch, state.history, interrupted=int(interrupted))

    if state.best_model is not None:  # as the tutorial does: the model ends with the best weights
        pretrained.load_state(accelerator.unwrap_model(run.net), state.best_model)
    if accelerator.is_main_process:
        summary(state, total, out, run.data.classes)
        if run.cfg.train.plots and state.best_model is not None:
            visualize.after_training(accelerator.unwrap_model(run.net), run.data, run.settings, state.history,
                                     state.best_confusion, out, accelerator.device, state.best_epoch, state.steps)
        run.tracking.pictures(out, state.epoch + 1)
    run.tracking.end()
    return RunResult(out, state.best_epoch_val_acc, state.best_epoch, state.history)
