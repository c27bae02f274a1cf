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
import sys
from pathlib import Path
from typing import Sequence

from tl_dist.errors import UserError, one_line, printable
from tl_dist.training import lr_range


def parse(argv: Sequence[str] | None, prog: str) -> tuple[argparse.Namespace, list[str]]:
    from tl_dist.commands.train import flag_overrides

    p = argparse.ArgumentParser(prog=prog, description="The learning-rate range test (fastai's lr_find) for a "
                                "config: a suggested optim.lr, lr_find.png and lr_find.json in train.output_dir.")
    p.add_argument("args", nargs="*", metavar="CONFIG section.key=value", help="a YAML config, then overrides")
    p.add_argument("--start-lr", type=float, default=1e-7)
    p.add_argument("--end-lr", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=100, help="optimizer steps of the test (default 100)")
    args = p.parse_intermixed_args(flag_overrides(list(sys.argv[1:] if argv is None else argv)))
    return args, list(args.args)


MAX_STEPS = 10_000  # a range test is ~100 steps; a bound keeps a typo from running for days


def check_out(out: Path) -> None:
    """Before the test: its two files may replace only an earlier range test's."""
    from tl_dist.files.outputs import check_writable, json_object, refuse_foreign
    from tl_dist.visualize import is_ours

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
        from tl_dist import config
        path = rest.pop(0) if rest and "=" not in rest[0] else None
        cfg = config.load(path, rest)
        check_out(Path(cfg.train.output_dir))
        result = lr_range.run(cfg, args.start_lr, args.end_lr, args.steps)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    out = Path(cfg.train.output_dir)
    tenth = result["min_loss_lr_div10"]
    print(f"suggested optim.lr: {result['suggested']:.2g} (the valley of the smoothed loss)"
          + (f"; a tenth of the minimum's: {tenth:.2g}" if tenth is not None else ""))
    for line in result["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    print(f"{len(result['lr'])} steps from {result['lr'][0]:.1e} to {result['lr'][-1]:.1e}"
          f"{' (stopped: the loss diverged)' if result['diverged'] else ''}; "
          f"wrote {printable(str(out / 'lr_find.png'))} and lr_find.json")
    return 0
