"""tl-dist: one command, a sub-command per job.

    tl-dist train CONFIG [section.key=value ...]        train (also: python -m tl_dist.train)
    tl-dist predict IMAGE|DIR ... [--checkpoint RUN]    predict (also: python -m tl_dist.predict)
    tl-dist preview CONFIG [section.key=value ...]      the data: counts, sizes, augmented samples per class
    tl-dist lr-find CONFIG [section.key=value ...]      the learning-rate range test, a suggested optim.lr
    tl-dist evaluate DATA_DIR --checkpoint RUN          metrics, confusion, calibration, top losses
    tl-dist export RUN [--format onnx|torchscript|exported|hf]  a file other runtimes load, self-checked
    tl-dist push RUN --repo USER/NAME                   publish the run on the Hugging Face Hub, with a model card
    tl-dist data shard SRC OUT [--shard-size 1GB]       image files -> WebDataset tar shards (data.format=wds)
    tl-dist runs [DIR] [--json]                         the runs under DIR (runs/) and how they stand
    tl-dist doctor [--json]                             environment and a self-test of every feature

Several processes: accelerate launch [...] -m tl_dist.train CONFIG [...], or ./launch.sh CONFIG.
"""
from __future__ import annotations

import difflib
import importlib
import sys
from typing import Sequence

from tl_dist import __version__

# name -> (module with main(argv, prog), one line for the listing)
COMMANDS = {
    "train": ("tl_dist.commands.train", "fine-tune or train a frozen-backbone classifier from a YAML config"),
    "predict": ("tl_dist.commands.predict", "predict image classes with a checkpoint (needs nothing else)"),
    "preview": ("tl_dist.commands.preview", "the data as a config trains on it: counts, sizes, augmented samples"),
    "lr-find": ("tl_dist.commands.lr_find", "the learning-rate range test for a config: a suggested optim.lr and its curve"),
    "evaluate": ("tl_dist.commands.evaluate", "measure a checkpoint on a labelled folder: metrics, errors, calibration"),
    "export": ("tl_dist.commands.export", "export a checkpoint to ONNX, TorchScript or torch.export, checked before it "
                                          "is kept; or as a folder to publish (hf)"),
    "push": ("tl_dist.commands.push", "publish a run on the Hugging Face Hub: weights, config, a model card"),
    "runs": ("tl_dist.commands.runs", "the runs under a folder (runs/): arch, epochs, best val acc, status, size"),
    "data": ("tl_dist.commands.data", "convert image folders or a labels file to WebDataset shards; index shards"),
    "doctor": ("tl_dist.commands.doctor", "this machine's environment, and a self-test of every feature it can run"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: tl-dist COMMAND [ARGS ...]   (tl-dist COMMAND --help for its own)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "several processes or machines: accelerate launch [...] -m tl_dist.train CONFIG [...], "
                  "or ./launch.sh CONFIG"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"tl-dist {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"error: unknown command {name!r}{hint}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest, prog=f"tl-dist {name}")


if __name__ == "__main__":
    sys.exit(main())
