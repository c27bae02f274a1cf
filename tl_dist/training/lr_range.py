"""The learning-rate range test (fastai's lr_find): the config's model, data, optimizer groups, loss and
precision, with a learning rate that grows exponentially step by step; the smoothed loss and the
suggestion. ``tl-dist lr-find`` is its command."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from tl_dist.errors import UserError, printable


SMOOTH = 0.98  # the loss's exponential average
DIVERGE = 4.0  # stop once the smoothed loss exceeds this many times its minimum


FEW_STEPS = 50  # fewer steps than this make a noisy curve: said
FLAT = 0.05  # a smoothed loss that falls less than this share from its start has no clear valley: said


def warnings(lrs: list[float], smoothed: list[float]) -> list[str]:
    """What makes this curve's suggestion doubtful: too few steps, or a loss that hardly fell."""
    out = []
    if len(lrs) < FEW_STEPS:
        out.append(f"only {len(lrs)} steps: the curve is noisy, and its suggestion with it (--steps 100 or more)")
    start, low = smoothed[0], min(smoothed)
    if start > 0 and (start - low) / start < FLAT:
        out.append(f"no clear valley: the smoothed loss fell only from {start:.4g} to {low:.4g} over the sweep; widen it "
                   f"(--start-lr / --end-lr), or check the data and labels (preview) before trusting the suggestion")
    return out


def suggestion(lrs: list[float], smoothed: list[float]) -> tuple[float, float | None]:
    """(fastai's "valley": the learning rate a little past the middle of the longest stretch over
    which the smoothed loss keeps falling; a tenth of the one at the loss minimum, or None where the
    minimum is at the sweep's start, which makes a tenth of it a rate the sweep never tried). The
    valley is robust to the noise a single steepest point picks up on small data."""
    n = len(smoothed)
    run = [1] * n  # the longest falling sequence ending at i
    start = end = 0
    for i in range(1, n):
        for j in range(i):
            if smoothed[i] < smoothed[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
        if run[end] < run[i]:
            end, start = i, i - run[i]
    third = (end - start) / 3
    valley = lrs[max(0, min(n - 1, start + int(third) + int(third / 2)))]
    lowest = min(range(n), key=smoothed.__getitem__)
    tenth = lrs[lowest] / 10
    return valley, tenth if tenth >= lrs[0] else None


def run(cfg, start_lr: float, end_lr: float, steps: int) -> dict:
    """The range test on one process, with the training's own builders; writes lr_find.json and
    lr_find.png into train.output_dir and returns what the json holds."""
    from tl_dist.models import backbones

    cfg = backbones.resolve(cfg)
    cfg, net, optimizer, d, settings, dtype = set_up(cfg)
    lrs, losses, smoothed, diverged = _sweep(cfg, net, optimizer, d, settings, dtype, start_lr, end_lr, steps)
    if not math.isfinite(smoothed[-1]):  # the step that blew up says nothing about the curve
        lrs, losses, smoothed = lrs[:-1], losses[:-1], smoothed[:-1]
    if len(lrs) < 3:
        raise UserError(f"lr-find: the loss diverged within {len(lrs) + 1} steps from --start-lr {start_lr:g}; "
                        f"start lower")
    steep, tenth = suggestion(lrs, smoothed)
    result = {"lr": lrs, "loss": losses, "smoothed": smoothed, "suggested": steep, "min_loss_lr_div10": tenth,
              "diverged": diverged, "warnings": warnings(lrs, smoothed), "config": cfg.to_dict()}
    write(Path(cfg.train.output_dir), result)
    return result


def set_up(cfg):
    """The config (its task resolved), and the model, optimizer, train data and step settings a run of
    ``cfg`` starts with (the training's builders, on one process); and the autocast dtype of its
    mixed precision."""
    import torch

    from tl_dist.data import loaders
    from tl_dist.distributed import plain_accelerator, resolve_mixed_precision
    from tl_dist.models import backbones, heads
    from tl_dist.training import optim, setup
    from tl_dist.training.run_state import seed_everything

    accelerator = plain_accelerator(cuda=torch.cuda.is_available())
    device = accelerator.device
    mp = resolve_mixed_precision(cfg.train.mixed_precision, device.type == "cuda")
    seed_everything(cfg.train.seed)
    # progress and warnings on stderr: stdout is the suggestion
    cfg, data, report = setup.screened_splits(cfg, accelerator, lambda line: print(printable(line), file=sys.stderr))
    classes, train, val = data.classes, data.train, data.val
    # (the val split is scanned with the rest but not read: one image keeps the loaders' shape; with
    # data.cache=disk all of it, so that the cache is the one training builds and reads)
    say = lambda line: print(printable(line), file=sys.stderr)  # noqa: E731
    d = loaders.build(cfg.data, classes, train, val if cfg.data.cache == "disk" else val[:1], seed=cfg.train.seed,
                      device=device, sizes=report.sizes, reader=data.reader,
                      disk_folder=setup.image_cache_folder(cfg), log=say)
    net = backbones.build(cfg.model, len(classes), cfg.data.image_size).to(device)
    net, channels_last = setup.shape_model(cfg, net, processes=1)
    optimizer = optim.build_optimizer(net, cfg)
    frozen = heads.frozen_at(cfg.model, 0)
    heads.set_frozen(net, frozen)
    heads.set_train_mode(net, True, frozen, cfg.model.frozen_bn)
    settings = setup.step_settings(cfg, frozen, channels_last, d, device)
    return cfg, net, optimizer, d, settings, {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)


def _sweep(cfg, net, optimizer, d, settings, dtype, start_lr: float, end_lr: float, steps: int):
    """Optimizer steps at exponentially growing learning rates (every group scaled together) until
    ``steps`` or the loss diverges: (lrs, losses, smoothed losses, diverged)."""
    import torch

    from tl_dist.training import optim
    from tl_dist.training.engine import to_device, train_loss

    parts = optim.group_parts(cfg, len(optimizer.param_groups))
    base, device = optim.base_lrs(cfg), next(net.parameters()).device
    lrs, losses, smoothed = [], [], []
    avg, best, diverged, epoch = 0.0, math.inf, False, 0
    while len(lrs) < steps and not diverged:
        d.train_sampler.set_epoch(epoch)
        for batch in d.train_loader:
            i = len(lrs)
            lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))
            for g, part in zip(optimizer.param_groups, parts):
                g["lr"] = lr * base[part] / base[0] * g.get("lr_scale", 1.0)
            x, y, w, _ = to_device(batch, device, settings)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = net(x)
            loss = (train_loss(out, y, settings) * w).sum() / w.sum().clamp(min=1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            avg = SMOOTH * avg + (1 - SMOOTH) * value
            s = avg / (1 - SMOOTH ** (i + 1))
            lrs.append(lr)
            losses.append(value)
            smoothed.append(s)
            best = min(best, s)
            if not math.isfinite(s) or s > DIVERGE * best:
                diverged = True
                break
            if len(lrs) >= steps:
                break
        epoch += 1
    return lrs, losses, smoothed, diverged


def write(out: Path, result: dict) -> None:
    from tl_dist import visualize
    from tl_dist.files import atomic

    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic.atomic_write_text(out / "lr_find.json", json.dumps(result, indent=1, allow_nan=False) + "\n")
        visualize.lr_find(result["lr"], result["loss"], result["smoothed"], result["suggested"],
                          result["min_loss_lr_div10"], out / "lr_find.png", result["diverged"])
    except OSError as e:
        raise UserError(f"lr-find: cannot write into {out}: {e.strerror}; set train.output_dir") from None
