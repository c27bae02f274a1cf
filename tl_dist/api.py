"""The Python API: the commands' work from a notebook or a script, with the same files and guarantees.

    import tl_dist
    result = tl_dist.train("configs/frozen.yaml", data={"root": "data/hymenoptera_data"}, train={"epochs": 3})
    metrics = tl_dist.evaluate("data/hymenoptera_data", result.output_dir, split="val")
    predictor = tl_dist.Predictor.from_checkpoint(result.output_dir)

One process from Python; several through ``accelerate launch`` as with the commands. A mistake in
the config or the data raises ``tl_dist.UserError`` with the one-line message the command prints.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from tl_dist import config
from tl_dist.config import Config


SOURCE = "Python settings"  # (messages say where a bad value came from)


def overrides_of(settings: Mapping[str, Any]) -> list[str]:
    """``section.key=value`` overrides from keyword arguments: ``train={"epochs": 2}`` (a section's
    keys) or ``**{"train.epochs": 2}`` (dotted names). Values pass through the config's own checks."""
    out = []
    for key, value in settings.items():
        if isinstance(value, Mapping) and "." not in key:
            out += overrides_of({f"{key}.{k}": v for k, v in value.items()})
        else:
            out.append(f"{key}={value if isinstance(value, str) else json.dumps(value)}")
    return out


def load_config(config_or_path: str | Path | Config | None = None, /, **settings: Any) -> Config:
    """The config a run would use: the defaults, a YAML file (or a Config), then ``settings``."""
    if isinstance(config_or_path, Config):
        return config.load(None, overrides_of(config_or_path.to_dict()) + overrides_of(settings), SOURCE)
    return config.load(None if config_or_path is None else str(config_or_path), overrides_of(settings), SOURCE)


def train(config_or_path: str | Path | Config | None = None, /, **settings: Any):
    """Train as ``tl-dist train`` does (the same run directory, checkpoints and guarantees); returns
    the run's result: output_dir, best_epoch_val_acc, best_epoch, history (the metrics rows)."""
    from tl_dist.distributed import reset_state
    from tl_dist.training.trainer import fit

    cfg = load_config(config_or_path, **settings)
    try:
        return fit(cfg)
    finally:
        reset_state()  # (the next call in this process makes its own Accelerator)


def evaluate(data_dir: str | Path, checkpoint: str | Path, *, split: str | None = None, out: str | Path | None = None,
             tta: bool = False, thresholds: str | Path | None = None, tune_thresholds: bool = False,
             batch_size: int | None = None, skip_bad_images: bool = False, force: bool = False,
             device: str = "auto", trust_code: bool = False) -> dict:
    """Measure a checkpoint as ``tl-dist evaluate`` does (its files in ``out``, default
    RUN/eval_<split>); returns what metrics.json holds."""
    from tl_dist.commands.evaluate import _evaluate, parse_args
    from tl_dist.distributed import reset_state

    options = {"--split": split, "--out": out, "--thresholds": thresholds, "--batch-size": batch_size,
               "--device": device, "--tta": "flip" if tta else None}
    flags = {"--tune-thresholds": tune_thresholds, "--skip-bad-images": skip_bad_images, "--force": force,
             "--trust-code": trust_code}
    argv = [str(data_dir), "--checkpoint", str(checkpoint),
            *[x for k, v in options.items() if v is not None for x in (k, str(v))], *[k for k, v in flags.items() if v]]
    try:
        return _evaluate(parse_args(argv, "tl_dist.evaluate"), quiet=True)
    finally:
        reset_state()
