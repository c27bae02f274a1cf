"""Training entry point: config -> data -> model -> Accelerator.prepare -> epochs -> best checkpoint.

    python -m tl_dist.train --config configs/finetune.yaml [section.key=value ...]
    accelerate launch -m tl_dist.train --config configs/finetune.yaml [...]

Rank 0 writes every file; all ranks agree on "best" because they compare the same reduced metric.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import __version__, checkpoint, config, data, demo, host_memory, model as model_lib
from .config import Config
from .engine import (GraphedStep, HeadInputs, StepContext, assert_ranks_in_sync, evaluate, share_buffers,
                     train_one_epoch)
from .errors import UserError, one_line
from .images import scan_files

EXIT_INTERRUPTED = 130  # 128 + SIGINT; a SIGTERM stop exits 143
GRACE_SECONDS = 20.0  # after a stop signal, exit even if no step boundary was reached by then


@dataclass
class RunResult:
    output_dir: Path
    best_val_acc: float
    best_epoch: int
    history: list[dict] = field(default_factory=list)
    interrupted: int = 0  # the signal that stopped the run, 0 if it ran to the end


# ----------------------------------------------------------------------------- set-up helpers

def resolve_mixed_precision(mp: str, cuda: bool) -> str:
    """``auto``: bf16 where the hardware runs it fast (Ampere+ GPUs, CPUs with AVX512-BF16/AMX)."""
    if mp != "auto":
        return mp
    if cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "no"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "no"


def join_restarted_group(cuda: bool) -> None:
    """Form the process group of a job that torchrun restarted, in keys of its own.

    torchrun's static rendezvous keeps one store for all attempts, and its workers connect to it
    with no per-attempt prefix, so the process-group keys of the failed attempt are still there. A
    restarted rank could read a dead peer's address from them and fail ("Gloo connectFullMesh
    failed ... Connection refused"). Each attempt gets its own prefix; accelerate then uses this group.
    """
    import torch.distributed as dist
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if attempt == "0" or world == 1 or dist.is_initialized() or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    from datetime import timedelta
    if cuda:  # NCCL binds to the device current when it first communicates
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timedelta(minutes=5))
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.PrefixStore(f"tl_dist/attempt_{attempt}", store),
                            rank=int(os.environ["RANK"]), world_size=world)


def make_accelerator(cfg: Config):
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin
    cuda = torch.cuda.is_available()
    mp = resolve_mixed_precision(cfg.train.mixed_precision, cuda)
    if mp == "fp16" and not cuda:
        raise UserError("config: train.mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")
    join_restarted_group(cuda)
    # cpu=True without CUDA makes N launched processes one gloo group (MULTI_CPU) instead of N
    # independent single-process runs.
    # The loop marks its own accumulation windows (they restart each epoch), not the data loader's end.
    accumulation = GradientAccumulationPlugin(num_steps=cfg.train.grad_accum_steps, sync_with_dataloader=False)
    acc = Accelerator(cpu=not cuda, mixed_precision=mp, gradient_accumulation_plugin=accumulation)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and acc.num_processes != launched:
        raise UserError(f"launch: WORLD_SIZE={launched} but accelerate formed a group of "
                        f"{acc.num_processes}; check the launcher settings (accelerate config)")
    if cfg.train.sync_batchnorm and acc.num_processes > 1 and not cuda:
        raise UserError("config: train.sync_batchnorm=true needs CUDA GPUs (torch's SyncBatchNorm does not "
                        "run on CPU); set train.sync_batchnorm=false")
    return acc, mp


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop stops at the next step boundary, on every rank together."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for s in (signal.SIGTERM, signal.SIGINT):
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user really means now
        if self.signum is None:
            # A rank blocked in a collective with a dead peer never reaches a step boundary; launchers
            # (torchrun: 30 s) then escalate to SIGKILL. Leave on our own before that, so a restart
            # is not held up. Nothing is lost: every file on disk is complete.
            timer = threading.Timer(GRACE_SECONDS, os._exit, args=(128 + signum,))
            timer.daemon = True
            timer.start()
        self.signum = signum

    def check(self, accelerator) -> bool:
        flag = torch.tensor([1.0 if self.signum is not None else 0.0], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = accelerator.reduce(flag, reduction="sum")  # one rank signalled = all stop
        return bool(flag.item() > 0)


def agree(accelerator, fn, *args, **kwargs):
    """Run ``fn`` on every rank; a UserError on any rank is raised on every rank.

    Set-up steps can fail on one rank only (a data folder missing on one machine, rank 0's scan
    finding bad files). Without this the healthy ranks would wait in the next collective until
    its timeout; with it, the whole job ends at once with the failing rank's message.
    ``fn`` itself must not run collectives.
    """
    err, result = None, None
    try:
        result = fn(*args, **kwargs)
    except UserError as e:
        err = str(e)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object
        errors = gather_object([err])
        failed = [(r, e) for r, e in enumerate(errors) if e]
        if failed:
            rank, msg = failed[0]
            raise UserError(msg if rank == accelerator.process_index else f"(on rank {rank}) {msg}")
    elif err:
        raise UserError(err)
    return result


def on_main_then_share(accelerator, fn):
    """``fn()`` on rank 0 only; its result is broadcast to every rank, its UserError raised on all."""
    value = agree(accelerator, lambda: fn() if accelerator.is_main_process else None)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list
        box = [value]
        broadcast_object_list(box, from_process=0)
        value = box[0]
    return value


def first_few(items: list[str], n: int) -> str:
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return "; ".join(items[:n]) + more


def check_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"train: train.output_dir {path} is not writable: {e.strerror}; "
                        f"choose another with train.output_dir=PATH") from None


def versions() -> dict[str, str]:
    import accelerate
    import torchvision
    return {"tl_dist": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "accelerate": accelerate.__version__, "python": platform.python_version()}


def rng_state() -> dict[str, Any]:
    """This process's RNG states as plain Python values (bytes, ints): safe to gather across ranks
    and to load back with torch.load(weights_only=True)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    s = {"python": random.getstate(), "numpy": (name, keys.tobytes(), pos, has_gauss, gauss),
         "torch": torch.get_rng_state().numpy().tobytes()}
    if torch.cuda.is_available():
        s["cuda"] = [t.numpy().tobytes() for t in torch.cuda.get_rng_state_all()]
    return s


def set_rng_state(s: dict[str, Any]) -> None:
    def tensor(b: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(b), dtype=torch.uint8)

    random.setstate(s["python"])
    name, keys, pos, has_gauss, gauss = s["numpy"]
    np.random.set_state((name, np.frombuffer(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(tensor(s["torch"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(b) for b in s["cuda"]])


def base_lrs(cfg: Config) -> list[float]:
    """The learning rate of each optimizer group: [fc] in frozen mode, [fc, backbone] otherwise."""
    if cfg.model.mode == "frozen":
        return [cfg.optim.lr]
    return [cfg.optim.lr, cfg.optim.backbone_lr if cfg.optim.backbone_lr is not None else cfg.optim.lr]


def lrs_at(cfg: Config, epoch: int) -> list[float]:
    """StepLR's values for ``epoch``, computed rather than stepped: the same for any world size or resume."""
    return [lr * cfg.scheduler.gamma ** (epoch // cfg.scheduler.step_size) for lr in base_lrs(cfg)]


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """SGD over fc and (unless frozen) the backbone, as two groups with their own learning rates.

    In frozen_then_finetune the backbone is in the optimizer from the start; while it is frozen its
    parameters get no gradient and SGD leaves them (and their momentum) untouched.
    """
    head, backbone = model_lib.head_and_backbone(model)
    groups = [{"params": head}] + ([{"params": backbone}] if cfg.model.mode != "frozen" else [])
    for g, lr in zip(groups, base_lrs(cfg)):
        g["lr"] = lr
    return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                           weight_decay=cfg.optim.weight_decay, foreach=True)


def can_capture(device: torch.device) -> bool:
    """Whether CUDA graphs can be captured on ``device`` (tests replace this to run the graph path's
    bookkeeping on the CPU, where GraphedStep runs it eagerly)."""
    return device.type == "cuda"


def check_cuda_graphs(cfg: Config, accelerator, mp: str) -> None:
    """train.cuda_graphs=true: a one-line error naming whatever is in the way, before any work."""
    t = cfg.train
    if not t.cuda_graphs:
        return
    why = [w for w, bad in (
        (f"a CUDA GPU (this run is on {accelerator.device.type})", not can_capture(accelerator.device)),
        (f"one process (this run has {accelerator.num_processes}; with several GPUs use a larger batch)",
         accelerator.num_processes > 1),
        (f"train.grad_accum_steps=1 (it is {t.grad_accum_steps})", t.grad_accum_steps > 1),
        ("train.mixed_precision bf16 or no (fp16's loss scaler checks for overflow on the host every step)",
         mp == "fp16"),
        ("train.compile=false (compile_mode=reduce-overhead makes its own graphs)", t.compile),
    ) if bad]
    if why:
        raise UserError(f"config: train.cuda_graphs=true needs {'; and '.join(why)}")


def unfreeze(accelerator, net):
    """Train the backbone from now on, correctly under DDP.

    DDP decides which parameters it all-reduces when it wraps the model: those requiring grad then.
    A backbone unfrozen under the same wrapper would get gradients that are never averaged, and the
    ranks would drift apart (the Lightning BackboneFinetuning bug, issue 20340). So the module is
    wrapped again; the new wrapper registers every parameter (the ranks hold equal weights already).
    """
    inner = accelerator.unwrap_model(net)
    model_lib.set_frozen(inner, False)
    return accelerator.prepare_model(inner) if accelerator.num_processes > 1 else net


# ----------------------------------------------------------------------------- data

def prepare_data(cfg: Config, accelerator, log) -> data.Data:
    if cfg.data.demo:
        if accelerator.is_local_main_process and not (Path(cfg.data.root) / demo.MARKER).exists():
            log(f"generating the synthetic demo data set in {cfg.data.root} (once)")
            demo.generate(cfg.data.root, seed=0)
        accelerator.wait_for_everyone()
    classes, train, val = agree(accelerator, data.list_splits, cfg.data.root)
    # One scan on rank 0, shared with every rank, so all ranks agree on what is left out.
    report = on_main_then_share(accelerator, lambda: scan_split_files(cfg, train, val, log))
    if report.bad:
        train = [s for s in train if s[0] not in report.bad]
        val = [s for s in val if s[0] not in report.bad]
    return agree(accelerator, data.build, cfg.data, classes, train, val, seed=cfg.train.seed,
                 world=accelerator.num_processes, rank=accelerator.process_index,
                 device=accelerator.device, sizes=report.sizes)


def scan_split_files(cfg: Config, train: list, val: list, log):
    """Rank 0's pre-flight check of every file; stops the run on bad files unless told to skip them."""
    t0 = time.perf_counter()
    report = scan_files([p for p, _ in train + val])
    log(f"checked {len(train) + len(val)} image files in {time.perf_counter() - t0:.1f}s: {len(report.bad)} bad")
    if report.bad:
        listing = first_few(list(report.bad.values()), 10)
        if not cfg.data.skip_bad_images:
            raise UserError(f"data: {len(report.bad)} bad image file(s) under {cfg.data.root}: {listing}. "
                            f"Fix or remove them, or set data.skip_bad_images=true to leave them out")
        log(f"warning: leaving out {len(report.bad)} bad image file(s): {listing}")
        for split, samples in (("train", train), ("val", val)):
            if all(p in report.bad for p, _ in samples):
                raise UserError(f"data: no usable images left in {cfg.data.root}/{split} after leaving out bad files")
    return report


# ----------------------------------------------------------------------------- the run

def train(cfg: Config) -> RunResult:
    """One training run; returns its result. SIGTERM/SIGINT stop it cleanly at a step boundary.

    Returns (or raises) only once every epoch's files are on disk.
    """
    writer = checkpoint.BackgroundWriter(background=write_in_background())
    try:
        with StopRequest() as stop:
            result = _train(cfg, stop, writer)
    except BaseException:
        try:  # keep the last complete epoch; the error in flight is the one to report
            writer.close()
        except Exception as e:
            print(f"warning: {one_line(e)}", file=sys.stderr, flush=True)
        raise
    writer.close()
    return result


def write_in_background() -> bool:
    """Checkpoint files are written while the next epoch runs where the model trains on a GPU (the
    host's cores are free); where it trains on the CPU, they are written between epochs."""
    return torch.cuda.is_available()


def save_epoch(out: Path, meta: dict, is_best: bool, state: dict) -> None:
    """An epoch's files (rank 0, on the writer's thread) from its resume state, in an order that
    leaves the run resumable at every moment: weights, metrics, then the resume state, which only
    ever points at complete files."""
    try:
        checkpoint.save_weights(out / "last.safetensors", state["model"], {**meta, "kind": "last"})
        if is_best:
            checkpoint.save_weights(out / "best.safetensors", state["model"], {**meta, "kind": "best"})
        checkpoint.atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state["history"]))
        checkpoint.save_state(out / "resume.pt", state)
    except OSError as e:
        raise UserError(f"checkpoint: writing epoch {meta['epoch']}'s files in {out} failed: {e}. The files of "
                        f"the epochs before are intact: free space (or fix the folder) and run the same command "
                        f"to resume") from None


def _train(cfg: Config, stop: StopRequest, writer: checkpoint.BackgroundWriter) -> RunResult:
    accelerator, mp = make_accelerator(cfg)
    main_proc = accelerator.is_main_process
    if accelerator.device.type == "cpu":  # activations live in host memory: reuse it step to step
        host_memory.keep_freed_memory()
    check_cuda_graphs(cfg, accelerator, mp)

    def log(msg: str) -> None:
        if main_proc:
            print(msg, flush=True)

    out = Path(cfg.train.output_dir)
    agree(accelerator, lambda: check_output_dir(out) if main_proc else None)
    from accelerate.utils import set_seed
    set_seed(cfg.train.seed)

    d = prepare_data(cfg, accelerator, log)
    classes = d.classes
    net = agree(accelerator, model_lib.build, cfg.model, len(classes))

    # Resume: rank 0 reads, every rank receives (no shared filesystem needed across machines).
    state = load_resume(cfg, classes, accelerator) if cfg.train.resume != "none" else None
    start_epoch, best_acc, best_epoch, history, best_state, best_cm = 0, -1.0, -1, [], None, None
    if state is not None:
        net.load_state_dict(state["model"])
        start_epoch, best_acc, best_epoch = state["epoch"] + 1, state["best_val_acc"], state["best_epoch"]
        history, best_state, best_cm = state["history"], state["best_model"], state.get("best_confusion")
        log(f"resuming {out} after epoch {state['epoch']} (best val acc {best_acc:.4f} at epoch {best_epoch})")

    if cfg.train.sync_batchnorm and accelerator.num_processes > 1:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    if cfg.model.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if cfg.train.compile:
        net.compile(mode=cfg.train.compile_mode)
    optimizer = build_optimizer(net, cfg)
    frozen = model_lib.frozen_at(cfg.model, start_epoch)  # the phase the wrapper is built for
    if cfg.model.mode == "frozen_then_finetune" and cfg.model.unfreeze_epoch >= cfg.train.epochs:
        log(f"note: model.unfreeze_epoch={cfg.model.unfreeze_epoch} >= train.epochs={cfg.train.epochs}: "
            f"the backbone stays frozen in this run (a resumed run with more epochs unfreezes it)")
    model_lib.set_frozen(net, frozen)
    if state is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"resume: the optimizer state in {out / 'resume.pt'} does not fit this run ({e}); "
                            f"use another train.output_dir or train.resume=none") from None
        ranks = state.get("rng", [])
        # Data order and augmentation do not depend on these; with another world size they are
        # left as seeded, which changes nothing the run draws.
        if len(ranks) == accelerator.num_processes:
            set_rng_state(ranks[accelerator.process_index])
    net, optimizer = accelerator.prepare(net, optimizer)
    graphed = None
    if cfg.train.cuda_graphs:  # (checked at start-up)
        graphed = GraphedStep(optimizer.optimizer, accelerator.device, torch.bfloat16 if mp == "bf16" else None,
                              capture=accelerator.device.type == "cuda")
    ctx = StepContext(cfg.data.mean, cfg.data.std, cfg.model.channels_last, frozen, cfg.model.frozen_bn,
                      cfg.train.grad_accum_steps)
    base_meta = {
        "classes": classes, "num_classes": len(classes), "arch": cfg.model.arch, "mode": cfg.model.mode,
        "image_size": cfg.data.image_size, "resize_size": cfg.data.resize_size,
        "mean": cfg.data.mean, "std": cfg.data.std, "world_size": accelerator.num_processes,
        "mixed_precision": mp, "config": cfg.to_dict(), "versions": versions(),
        "data_path": d.describe(accelerator.device),
    }
    if main_proc:
        checkpoint.atomic_write_text(out / "config.yaml", config.dump(cfg))
        log(f"tl_dist: {len(d.train)} train / {len(d.val)} val images, {len(classes)} classes; "
            f"{cfg.model.arch} {cfg.model.mode}; {accelerator.num_processes} process(es) on "
            f"{accelerator.device.type}; mixed precision {mp}; data: {base_meta['data_path']}")
        if cfg.train.plots and start_epoch == 0:
            from . import visualize
            visualize.train_batch(d.train, classes, out / "train_batch.png", seed=cfg.train.seed)

    # A fixed backbone computes the same val features every epoch: keep them (see HeadInputs) when
    # they fit the host cache budget (fp32 size, an upper bound: one vector per val image).
    feature_bytes = len(d.val) * getattr(accelerator.unwrap_model(net), model_lib.HEAD).in_features * 4
    keep_features = frozen and cfg.model.frozen_bn == "eval" and feature_bytes <= cfg.data.cache_gb * 2**30
    head_inputs = HeadInputs() if keep_features else None
    t_run = time.perf_counter()
    interrupted = 0
    for epoch in range(start_epoch, cfg.train.epochs):
        if frozen and not model_lib.frozen_at(cfg.model, epoch):
            frozen = False
            net = unfreeze(accelerator, net)
            head_inputs = None
            ctx = dataclasses.replace(ctx, frozen=False)
            log(f"epoch {epoch + 1}/{cfg.train.epochs}: the backbone trains from now on "
                f"(after model.unfreeze_epoch={cfg.model.unfreeze_epoch} frozen epochs)")
        lrs = lrs_at(cfg, epoch)
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
        d.train_sampler.set_epoch(epoch)
        tr = train_one_epoch(accelerator, net, optimizer, d.train_loader, d.train_sampler, ctx, epoch,
                             should_stop=lambda: stop.check(accelerator), graphed=graphed)
        if tr.stopped:
            interrupted = stop.signum or signal.SIGTERM
            break
        if graphed is not None and graphed.failed:
            log(f"warning: train.cuda_graphs: {graphed.failed}; training goes on without graphs")
            graphed = None
        share_buffers(accelerator, net)
        va = evaluate(accelerator, net, d.val_loader, ctx, len(classes), epoch, head_inputs)
        digest = assert_ranks_in_sync(accelerator, net, epoch)
        # Indices are per split: train's from the train set, val's from the val set.
        bad = [d.train.samples[i][0] for i in tr.bad] + [d.val.samples[i][0] for i in va.bad]
        if bad:
            paths = first_few(bad, 5)
            if not cfg.data.skip_bad_images:
                raise UserError(f"data: {len(bad)} image(s) failed to decode during epoch {epoch} "
                                f"(changed since the scan?): {paths}; fix them or set data.skip_bad_images=true")
            log(f"warning: {len(bad)} image(s) failed to decode and were left out this epoch: {paths}")
        row = {"epoch": epoch, "train_loss": tr.loss, "train_acc": tr.acc, "val_loss": va.loss,
               "val_acc": va.acc, "lr": lrs[0], "backbone_lr": None if frozen else lrs[-1],
               "seconds": tr.seconds + va.seconds, "train_seconds": tr.seconds, "val_seconds": va.seconds,
               "train_samples": tr.samples, "val_samples": va.samples, **peak_memory_mb(accelerator.device)}
        if digest:
            row["weights_digest"] = digest
        history.append(row)
        is_best = va.acc > best_acc
        # A CPU copy, taken now: kept as the best, and written while the next epoch trains.
        weights = checkpoint.snapshot(accelerator.unwrap_model(net).state_dict()) if is_best or main_proc else None
        if is_best:
            best_acc, best_epoch, best_state, best_cm = va.acc, epoch, weights, va.confusion
        rngs = gather_rng(accelerator)
        if main_proc:
            meta = {**base_meta, "epoch": epoch, "val_acc": va.acc, "val_loss": va.loss}
            writer.submit(functools.partial(save_epoch, out, meta, is_best, {
                "epoch": epoch, "best_val_acc": best_acc, "best_epoch": best_epoch, "history": list(history),
                "model": weights, "optimizer": checkpoint.snapshot(optimizer.state_dict()), "rng": rngs,
                "best_model": best_state, "best_confusion": best_cm,
                "classes": classes, "arch": cfg.model.arch, "mode": cfg.model.mode,
            }))
            print(f"epoch {epoch + 1}/{cfg.train.epochs}  train loss {tr.loss:.4f} acc {tr.acc:.4f}  "
                  f"val loss {va.loss:.4f} acc {va.acc:.4f}  lr {lrs[0]:.2g}"
                  f"{'' if frozen or lrs[-1] == lrs[0] else f' (backbone {lrs[-1]:.2g})'}  {row['seconds']:.1f}s"
                  f"{'  *best' if is_best else ''}", flush=True)
        if stop.check(accelerator) and epoch + 1 < cfg.train.epochs:
            interrupted = stop.signum or signal.SIGTERM
            break
    total = time.perf_counter() - t_run
    accelerator.wait_for_everyone()
    if interrupted:
        writer.wait()  # before saying so
        log(f"interrupted: stopped at a step boundary; the last complete epoch is saved in {out}. "
            f"Resume with the same command (train.resume=auto continues from {out / 'resume.pt'}).")
        return RunResult(out, best_acc, best_epoch, history, interrupted=int(interrupted))

    if best_state is not None:  # as the seed does: the model ends with the best weights
        accelerator.unwrap_model(net).load_state_dict(best_state)
    if main_proc:
        summary(history, total, best_acc, best_epoch, out)
        if cfg.train.plots and best_state is not None:
            from . import visualize
            visualize.after_training(accelerator.unwrap_model(net), d, ctx, history, best_cm, out, accelerator.device)
    return RunResult(out, best_acc, best_epoch, history)


def peak_memory_mb(device: torch.device) -> dict[str, float]:
    """This process's peak resident host memory, and peak GPU memory allocated by torch."""
    import resource
    peak = {"peak_host_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # KiB on Linux
    if device.type == "cuda":
        peak["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return peak


def gather_rng(accelerator) -> list[dict]:
    if accelerator.num_processes == 1:
        return [rng_state()]
    from accelerate.utils import gather_object
    return gather_object([rng_state()])


def load_resume(cfg: Config, classes: list[str], accelerator) -> dict | None:
    """Rank 0 reads the resume state (if any) and broadcasts it; refuses an incompatible run."""
    return on_main_then_share(accelerator, lambda: read_resume(cfg, classes))


def read_resume(cfg: Config, classes: list[str]) -> dict | None:
    src = Path(cfg.train.output_dir) if cfg.train.resume == "auto" else Path(cfg.train.resume)
    path = src / "resume.pt" if src.is_dir() or cfg.train.resume == "auto" else src
    if not path.exists():
        if cfg.train.resume != "auto":
            raise UserError(f"resume: no resume state at {path} (train.resume is auto, none or a run directory)")
        return None
    s = checkpoint.load_state(path)
    for key, now in (("arch", cfg.model.arch), ("mode", cfg.model.mode), ("classes", classes)):
        if s.get(key) != now:
            raise UserError(f"resume: {path} was trained with {key}={s.get(key)!r}, this run has "
                            f"{now!r}; use another train.output_dir or train.resume=none")
    best = Path(cfg.train.output_dir) / "best.safetensors"
    if best.exists():  # never let a resumed run overwrite a better best with a worse one
        on_disk = checkpoint.read_metadata(best)
        if on_disk.get("val_acc", -1) > s["best_val_acc"]:
            s["best_val_acc"], s["best_epoch"] = on_disk["val_acc"], on_disk["epoch"]
            s["best_model"] = checkpoint.load_weights(best)[0]
    return s


def summary(history: list[dict], total: float, best_acc: float, best_epoch: int, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"tl_dist run: {out}")
    for col in ("epoch", "train loss", "train acc", "val loss", "val acc", "lr", "s"):
        t.add_column(col, justify="right")
    for r in history:
        t.add_row(str(r["epoch"]), f"{r['train_loss']:.4f}", f"{r['train_acc']:.4f}", f"{r['val_loss']:.4f}",
                  f"{r['val_acc']:.4f}" + (" *" if r["epoch"] == best_epoch else ""), f"{r['lr']:.2g}",
                  f"{r['seconds']:.1f}")
    c = Console()
    c.print(t)
    c.print(f"total {total:.1f}s; best val acc {best_acc:.4f} at epoch {best_epoch}; "
            f"best weights: {out / 'best.safetensors'}")


# ----------------------------------------------------------------------------- CLI

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tl_dist.train",
                                description="Fine-tune or train a frozen-backbone image classifier.")
    p.add_argument("--config", "-c", help="YAML config (configs/finetune.yaml, configs/frozen.yaml, ...)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, applied after the file; the last one wins")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = config.load(args.config, args.overrides)
        result = train(cfg)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank raises the same error; one says it
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 128 + result.interrupted if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
