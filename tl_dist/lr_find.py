"""tl-dist lr-find CONFIG [overrides]: fastai's learning-rate range test, on a copy of the run's model.

    tl-dist lr-find CONFIG [section.key=value ...] [--start-lr 1e-7] [--end-lr 10] [--steps 100]

One process. The model, data (train split, the run's augmentation), optimizer, loss and mixed
precision are the config's; the learning rate grows exponentially from --start-lr to --end-lr over
--steps optimizer steps (every group scaled together, so optim.backbone_lr keeps its ratio), the
loss is smoothed (exponential average, bias-corrected) and the test stops early once it exceeds 4x
its minimum. Prints the suggestion (fastai's "valley": well inside the longest stretch over which
the smoothed loss falls) and the learning rate a tenth of the loss minimum's; writes lr_find.json and lr_find.png into
train.output_dir, and nothing else: no checkpoint, no run state, the run directory's lock untouched.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

from .errors import UserError, one_line, printable

SMOOTH = 0.98
DIVERGE = 4.0


def parse(argv: Sequence[str] | None, prog: str) -> tuple[argparse.Namespace, list[str]]:
    from .train import flag_overrides

    p = argparse.ArgumentParser(prog=prog, description="The learning-rate range test (fastai's lr_find) for a "
                                "config: a suggested optim.lr, lr_find.png and lr_find.json in train.output_dir.")
    p.add_argument("args", nargs="*", metavar="CONFIG section.key=value", help="a YAML config, then overrides")
    p.add_argument("--start-lr", type=float, default=1e-7)
    p.add_argument("--end-lr", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=100, help="optimizer steps of the test (default 100)")
    args = p.parse_intermixed_args(flag_overrides(list(sys.argv[1:] if argv is None else argv)))
    return args, list(args.args)


def suggestion(lrs: list[float], smoothed: list[float]) -> tuple[float, float]:
    """(fastai's "valley": the learning rate a little past the middle of the longest stretch over
    which the smoothed loss keeps falling; a tenth of the one at the loss minimum). The valley is
    robust to the noise a single steepest point picks up on small data."""
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
    return valley, lrs[min(range(n), key=smoothed.__getitem__)] / 10


MAX_STEPS = 10_000  # a range test is ~100 steps; a bound keeps a typo from running for days


def check_out(out: Path) -> None:
    """Before the test: its two files may replace only an earlier range test's."""
    from .outputs import check_writable, json_object, refuse_foreign
    from .visualize import is_ours

    def ours(p: Path) -> bool:
        if p.suffix == ".png":
            return is_ours(p)
        return "suggested" in (json_object(p) or {})
    check_writable(out, "lr-find", "train.output_dir")
    refuse_foreign([out / "lr_find.json", out / "lr_find.png"], ours, "lr-find", force=False, how_to_force=None)


def main(argv: Sequence[str] | None = None, prog: str = "tl-dist lr-find") -> int:
    try:
        args, rest = parse(argv, prog)
        if not 0 < args.start_lr < args.end_lr < float("inf"):
            raise UserError("lr-find: needs 0 < --start-lr < --end-lr, both finite")
        if not 5 <= args.steps <= MAX_STEPS:
            raise UserError(f"lr-find: --steps must be from 5 to {MAX_STEPS} (100, the default, is what the range "
                            f"test needs; each step is one training batch)")
        from . import config
        path = rest.pop(0) if rest and "=" not in rest[0] else None
        cfg = config.load(path, rest)
        check_out(Path(cfg.train.output_dir))
        result = run(cfg, args.start_lr, args.end_lr, args.steps)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    out = Path(cfg.train.output_dir)
    print(f"suggested optim.lr: {result['suggested']:.2g} (the valley of the smoothed loss); "
          f"a tenth of the minimum's: {result['min_loss_lr_div10']:.2g}")
    print(f"{len(result['lr'])} steps from {result['lr'][0]:.1e} to {result['lr'][-1]:.1e}"
          f"{' (stopped: the loss diverged)' if result['diverged'] else ''}; "
          f"wrote {printable(str(out / 'lr_find.png'))} and lr_find.json")
    return 0


def run(cfg, start_lr: float, end_lr: float, steps: int) -> dict:
    import torch

    from . import checkpoint, data, recipe, visualize
    from . import model as model_lib
    from .data import list_splits
    from .distributed import resolve_mixed_precision
    from .engine import StepContext, to_device, train_loss
    from .images import SKIP_BAD_IMAGES, screen_files

    cfg = model_lib.resolve(cfg)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mp = resolve_mixed_precision(cfg.train.mixed_precision, device.type == "cuda")
    out = Path(cfg.train.output_dir)
    classes, train, val = list_splits(cfg.data.root)
    # the training's own pre-flight rule, on the split the test reads
    report = screen_files([p for p, _ in train], cfg.data.root, cfg.data.skip_bad_images, SKIP_BAD_IMAGES,
                          lambda line: print(printable(line), file=sys.stderr))
    train = [s for s in train if s[0] not in report.bad]
    torch.manual_seed(cfg.train.seed)
    d = data.build(cfg.data, classes, train, val[:1], seed=cfg.train.seed, device=device, sizes=report.sizes)
    net = model_lib.build(cfg.model, len(classes), cfg.data.image_size).to(device)
    frozen = model_lib.frozen_at(cfg.model, 0)
    model_lib.set_frozen(net, frozen)
    model_lib.set_train_mode(net, True, frozen, cfg.model.frozen_bn)
    channels_last = model_lib.uses_channels_last(cfg.model)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = recipe.build_optimizer(net, cfg)
    parts = recipe.group_parts(cfg)
    base = recipe.base_lrs(cfg)
    weights = (recipe.class_weights([y for _, y in d.train.samples], len(classes)).to(device)
               if cfg.train.class_weights == "balanced" else None)
    ctx = StepContext(cfg.data.mean, cfg.data.std, channels_last, frozen, cfg.model.frozen_bn, 1,
                      cfg.train.label_smoothing, weights)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
    lrs, losses, smoothed = [], [], []
    avg, best, diverged, epoch = 0.0, math.inf, False, 0
    while len(lrs) < steps and not diverged:
        d.train_sampler.set_epoch(epoch)
        for batch in d.train_loader:
            i = len(lrs)
            lr = start_lr * (end_lr / start_lr) ** (i / (steps - 1))
            for g, part in zip(optimizer.param_groups, parts):
                g["lr"] = lr * base[part] / base[0]
            x, y, w, _ = to_device(batch, device, ctx)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out_ = net(x)
            loss = (train_loss(out_, y, ctx) * w).sum() / w.sum().clamp(min=1)
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
    if not math.isfinite(smoothed[-1]):  # the step that blew up says nothing about the curve
        lrs, losses, smoothed = lrs[:-1], losses[:-1], smoothed[:-1]
    if len(lrs) < 3:
        raise UserError(f"lr-find: the loss diverged within {len(lrs) + 1} steps from --start-lr {start_lr:g}; "
                        f"start lower")
    steep, tenth = suggestion(lrs, smoothed)
    result = {"lr": lrs, "loss": losses, "smoothed": smoothed, "suggested": steep, "min_loss_lr_div10": tenth,
              "diverged": diverged, "config": cfg.to_dict()}
    try:
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_text(out / "lr_find.json", json.dumps(result, indent=1, allow_nan=False) + "\n")
        visualize.lr_find(lrs, losses, smoothed, steep, tenth, out / "lr_find.png")
    except OSError as e:
        raise UserError(f"lr-find: cannot write into {out}: {e.strerror}; set train.output_dir") from None
    return result
