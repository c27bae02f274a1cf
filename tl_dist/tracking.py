"""Experiment trackers (train.log_with) through accelerate's tracker API, main process only.

The x axis is images seen (epoch x train images + the images of this epoch's optimizer steps so
far): the same for any world size, batch size or accumulation, so runs compare on one axis and a
resume under another world size continues the same line. Logged: every numeric metrics.jsonl
field once per epoch (at the epoch's last image; ``epoch`` too), the learning rate of each group at
every optimizer step (at the images seen once the step is taken; kept during the epoch and written
with its metrics, one write per epoch), the resolved config as hyperparameters, and the pictures
where the tracker takes images. So everything epoch e logs lies in (e x n, (e + 1) x n].

A resumed run continues the same tracker run: TensorBoard writes into the same folder and purges
what the interrupted segment logged past the resume point (no duplicated steps); W&B resumes the
run by a stable id. The others start a new run per segment.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from tl_dist.errors import UserError
from tl_dist.files.run_dir import PICTURES

PROJECT = "tl_dist"  # TensorBoard: the sub-folder of the run directory; W&B and others: the project


def accelerator_kwargs(log_with: list[str], output_dir: str) -> dict:
    """Accelerator(...) arguments for ``train.log_with``; a tracker that is not installed is refused
    in one line (accelerate would drop it with a warning and the run would log nowhere)."""
    if not log_with:
        return {}
    import accelerate.utils

    for name in log_with:
        if not getattr(accelerate.utils, f"is_{name}_available")():
            extra = "pip install 'tl_dist[track]'" if name == "tensorboard" else f"pip install {name}"
            raise UserError(f"config: train.log_with: {name} is not installed ({extra}), or remove it from "
                            f"train.log_with")
    if "tensorboard" in log_with:  # its event files go into output_dir/tl_dist: that place must take them
        from tl_dist.files.outputs import check_writable

        folder = Path(output_dir) / PROJECT
        if folder.exists() and not folder.is_dir():
            raise UserError(f"config: train.log_with: tensorboard writes into {folder}, which is a file; move it "
                            f"away or choose another train.output_dir")
        check_writable(folder, "config", "train.log_with: tensorboard writes into")
    return {"log_with": list(dict.fromkeys(log_with)), "project_dir": output_dir}


def flat_config(d: dict, prefix: str = "") -> dict:
    """The config as ``section.key: value`` with the value types every tracker takes."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
    return out


class Tracking:
    """The run's trackers. Every method is a no-op without train.log_with or off the main process."""

    def __init__(self, accelerator, cfg_dict: dict, out: Path, train_images: int, next_epoch: int):
        self.acc, self.n = accelerator, train_images
        self.on = bool(getattr(accelerator, "log_with", None)) and accelerator.is_main_process
        self.pending: list[tuple[int, dict]] = []
        if not getattr(accelerator, "log_with", None):
            return
        resume_at = next_epoch * train_images
        # One id per run directory and run: the path and the config.yaml the run started with
        # (a resume keeps both; a new run in the same place is refused or writes a new config).
        config_yaml = out / "config.yaml"
        seed = f"{out.resolve()}:{config_yaml.read_bytes().hex() if config_yaml.exists() else ''}"
        run_id = hashlib.sha256(seed.encode()).hexdigest()[:16]
        # purge_step: TensorBoard hides what an interrupted segment logged past the resume point
        # (+1: the last saved epoch's own events end exactly at it).
        init = {"tensorboard": {"purge_step": resume_at + 1} if resume_at else {},
                "wandb": {"name": out.name, "id": run_id, "resume": "allow", "dir": str(out)}}
        accelerator.init_trackers(PROJECT, config=flat_config(cfg_dict), init_kwargs=init)

    def step(self, epoch: int, images_after: int, lrs: list[float]) -> None:
        """The learning rates of the optimizer step that brings ``epoch`` to ``images_after`` images."""
        if self.on:
            values = {"lr": lrs[0]}
            if len(lrs) > 1:
                values["backbone_lr"] = lrs[-1]
            self.pending.append((epoch * self.n + images_after, values))

    def epoch(self, row: dict) -> None:
        if not self.on:
            return
        for at, values in self.pending:
            self.acc.log(values, step=at)
        self.pending.clear()
        values = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                  and k not in ("lr", "backbone_lr")}  # (those per step, above)
        self.acc.log(values, step=(row["epoch"] + 1) * self.n)

    def pictures(self, out: Path, epochs_done: int) -> None:
        if not self.on:
            return
        at = epochs_done * self.n
        for name in PICTURES:
            path = out / f"{name}.png"
            if not path.exists():
                continue
            with Image.open(path) as im:
                pixels = np.asarray(im.convert("RGB"))
            for tracker in self.acc.trackers:
                if tracker.name == "tensorboard":
                    tracker.log_images({name: pixels[None]}, step=at, dataformats="NHWC")
                elif hasattr(tracker, "log_images"):
                    tracker.log_images({name: [pixels]}, step=at)

    def end(self) -> None:
        # Not Accelerator.end_training(): it also destroys the process group, which the run's own
        # end (and a next run in this process) still uses.
        if self.on:
            for tracker in self.acc.trackers:
                tracker.finish()
            self.acc.trackers.clear()
            self.on = False
