"""The training command line: arguments -> config -> trainer.fit -> exit code.

    tl-dist train CONFIG [section.key=value | --section.key=value ...]
    python -m tl_dist.train --config CONFIG [section.key=value ...]       (the same, for debug runs)
    accelerate launch [...] -m tl_dist.train --config CONFIG [...]        (several processes / machines)

Exit codes: 0 done, 2 bad usage, config, data or file (one line on stderr), 128+N stopped by signal N.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from tl_dist import config
from tl_dist.errors import UserError, one_line


EXIT_INTERRUPTED = 130  # 128 + SIGINT; a SIGTERM stop exits 143


_FLAG_OVERRIDE = re.compile(r"^--([A-Za-z_]\w*\.[A-Za-z_]\w*)(=(.*))?$", re.S)


def train(cfg: config.Config):
    """One training run: ``trainer.fit``, imported here so that --help and config errors answer
    without the seconds torch and accelerate take to import."""
    from tl_dist.training.trainer import fit
    return fit(cfg)


def flag_overrides(argv: Sequence[str]) -> list[str]:
    """``--train.epochs=2`` and ``--train.epochs 2`` (the flag style of timm, HF and LightningCLI) as
    the override ``train.epochs=2``; every other argument as it is."""
    out, i = [], 0
    while i < len(argv):
        m = _FLAG_OVERRIDE.match(argv[i])
        if m and m.group(2) is not None:
            out.append(f"{m.group(1)}={m.group(3)}")
        elif m and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            out.append(f"{m.group(1)}={argv[i + 1]}")
            i += 1
        elif m:
            raise UserError(f"config: {argv[i]} needs a value ({argv[i]}=VALUE or {m.group(1)}=VALUE)")
        else:
            out.append(argv[i])
        i += 1
    return out


def parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Fine-tune an ImageNet model on an ImageFolder data set, or train a new head on its\n"
                    "frozen features. Overrides (section.key=value or --section.key=value) apply after\n"
                    "the config file; the last one wins.",
        epilog="config keys (section.key = default [allowed values]), set in the YAML file or as overrides:\n"
               + config.reference())
    p.add_argument("args", nargs="*", metavar="[CONFIG] section.key=value",
                   help="a YAML config (configs/finetune.yaml, configs/frozen.yaml, ...), then overrides")
    p.add_argument("--config", "-c", metavar="CONFIG", help="the YAML config (the same as naming it first)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--dry-run", action="store_true", help="check the run in seconds: 2 train steps and 2 val batches "
                   "of every phase, every file and picture, into a temporary folder that is then removed")
    return p


def parse(argv: Sequence[str] | None, prog: str) -> tuple[str | None, list[str], argparse.Namespace]:
    """(config file, overrides, the flags) from the command line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser(prog).parse_intermixed_args(flag_overrides(argv))
    path, overrides = args.config, list(args.args)
    if overrides and "=" not in overrides[0]:
        if path is not None:
            raise UserError(f"usage: two configs given ({path} and {overrides[0]}); give one, then "
                            f"section.key=value overrides")
        path = overrides.pop(0)
    return path, overrides, args


DRY_STEPS = 2  # train steps and val batches per epoch of a dry run


def dry_run(cfg: config.Config, path: str | None, overrides: list[str]) -> int:
    """The config's run cut to DRY_STEPS train steps and val batches per epoch (two epochs when
    frozen_then_finetune, so both phases run), with every file and picture, into a temporary
    folder removed afterwards; says what it did and what the real run will write where."""
    import shutil
    import tempfile
    import time

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("usage: --dry-run checks a run in one process; run it without accelerate launch / torchrun")
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="tl_dist-dry-run-"))
    phases = cfg.model.mode == "frozen_then_finetune"
    cut = [f"train.output_dir={work / 'run'}", "train.resume=none", f"train.epochs={2 if phases else 1}",
           f"train.limit_train_batches={DRY_STEPS}", f"train.limit_val_batches={DRY_STEPS}",
           *(["model.unfreeze_epoch=1"] if phases else [])]
    try:
        result = train(config.load(path, [*overrides, *cut]))
        files = sorted(p.name for p in (work / "run").iterdir())
    finally:
        shutil.rmtree(work, ignore_errors=True)  # (ours: made above, nothing else in it)
    if result.interrupted:
        return 128 + result.interrupted
    print(f"dry run: ok in {time.perf_counter() - t0:.1f}s ({len(result.history)} epoch(s) of {DRY_STEPS} train "
          f"steps and {DRY_STEPS} val batches; wrote {', '.join(files)}). The run itself: the same command without "
          f"--dry-run, into {cfg.train.output_dir}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "python -m tl_dist.train") -> int:
    rank0 = os.environ.get("RANK", "0") == "0"  # every rank raises the same error; one says it
    try:
        path, overrides, flags = parse(argv, prog)
        cfg = config.load(path, overrides)
        if flags.dry_run:
            return dry_run(cfg, path, overrides)
        if flags.print_config:  # with what the model's weights fill in (image sizes, normalisation)
            from tl_dist.models.backbones import resolve
            print(config.dump(resolve(cfg)), end="")
            return 0
        if path is None and rank0:
            print(f"note: no config file given: the built-in defaults{' and the overrides' if overrides else ''} "
                  f"(`{prog} --help` lists them; configs/ has examples)", file=sys.stderr, flush=True)
        result = train(cfg)
    except UserError as e:
        if rank0 or e.exit_code != 2:  # a config error is every rank's; a failure is this rank's own
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        if e.exit_code != 2:  # the process group is broken: its teardown at exit could wait forever
            os._exit(e.exit_code)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        try:
            sys.stdout.flush()
        except OSError:
            pass
        # Leave now: an interrupt can land inside an import (torch's take seconds), and tearing down
        # a half-imported module at exit can fail. The run's files were finished before this point.
        os._exit(EXIT_INTERRUPTED)
    return 128 + result.interrupted if result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
