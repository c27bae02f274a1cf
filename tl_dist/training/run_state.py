"""The run's state from epoch to epoch, and the one place that saves and resumes it.

The promises kept here: a resumed run continues bit for bit (weights, optimizer, every rank's RNG
states); the files of an epoch are written in an order that leaves the run resumable at every
moment (weights, metrics, then the resume state, which only ever points at complete files); and a
resumed run never replaces a better ``best`` on disk with a worse one.
Knows nothing about processes: the trainer gathers the ranks' RNG states and shares what rank 0 reads.
"""
from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tl_dist.files import checkpoint, resume_file
from tl_dist.files.resume_file import RESUME_FILE
from tl_dist.config import Config
from tl_dist.errors import UserError


def model_identity(cfg: Config, classes: list[str]) -> dict[str, Any]:
    """What a resume state records of the model it describes, and a resuming run must match."""
    return {"classes": classes, "arch": cfg.model.arch, "mode": cfg.model.mode}


# Fields saved in resume.pt under another name (the name files have always used).
RESUME_KEYS = {"best_epoch_val_acc": "best_val_acc"}


@dataclass
class RunState:
    """What a run carries from one epoch to the next; ``resume.pt`` is this, as plain values.

    ``model``, ``optimizer`` and ``rng`` are set when an epoch is saved (rank 0) or resumed.
    """
    epoch: int = -1  # the last complete epoch
    best_epoch_val_acc: float = -1.0  # the val accuracy of the best epoch (by train.select_best_by)
    best_epoch: int = -1
    best_score: float = -math.inf  # the best epoch's train.select_best_by value (val_loss negated)
    history: list[dict] = field(default_factory=list)  # one metrics row per epoch
    best_model: dict[str, torch.Tensor] | None = None
    best_confusion: torch.Tensor | None = None
    model: dict[str, torch.Tensor] | None = None  # the weights at the end of ``epoch``
    ema: dict[str, torch.Tensor] | None = None  # their moving average (train.ema_decay), what is evaluated
    ema_updates: int = 0
    optimizer: dict | None = None
    rng: list[dict] = field(default_factory=list)  # each rank's RNG states, in rank order
    data: dict | None = None  # data_fingerprint() of the data the last segment trained on
    config: dict | None = None  # the resolved config of the last segment (a resume may change it)
    # every optimizer step so far: [position in epochs, mean loss, head lr, backbone lr] (the per-step curves)
    steps: torch.Tensor | None = None

    @property
    def next_epoch(self) -> int:
        return self.epoch + 1

    def improves(self, score: float) -> bool:
        return score > self.best_score  # ties keep the earlier epoch

    def record(self, row: dict, score: float, confusion: torch.Tensor, weights: dict | None,
               ema: dict | None = None) -> bool:
        """Add a finished epoch with its weights (copies taken at its end: the model's and, with
        train.ema_decay, their average, which is what was evaluated); True if it is the best so far."""
        is_best = self.improves(score)
        self.epoch, self.model, self.ema = row["epoch"], weights, ema
        self.history.append(row)
        if is_best:
            self.best_score, self.best_epoch_val_acc, self.best_epoch, self.best_model, self.best_confusion = \
                score, row["val_acc"], row["epoch"], ema if ema is not None else weights, confusion
        return is_best

    def rescore(self, by: str) -> None:
        """The best epoch's score under ``by`` (a resume may change train.select_best_by, and states
        written before it existed carry none): from its metrics row."""
        row = next((r for r in self.history if r["epoch"] == self.best_epoch), None)
        self.best_score = score_of(row, by) if row is not None else -math.inf

    def add_steps(self, steps: torch.Tensor | None) -> None:
        """An epoch's per-step rows (a run resumed from a state without them starts its curve there)."""
        if steps is not None:
            self.steps = steps if self.steps is None else torch.cat([self.steps, steps])

    def epochs_without_improvement(self) -> int:
        return self.epoch - self.best_epoch if self.best_epoch >= 0 else 0

    def to_resume(self, identity: dict[str, Any]) -> dict[str, Any]:
        """The resume state: plain values, the tensors shared (not copied), the history copied (it
        grows while the file is written), and what a resuming run must match."""
        d = {RESUME_KEYS.get(f.name, f.name): getattr(self, f.name) for f in fields(self)}
        return {**d, "history": list(self.history), **identity}

    @classmethod
    def from_resume(cls, d: dict[str, Any]) -> "RunState":
        return cls(**{f.name: d[RESUME_KEYS.get(f.name, f.name)] for f in fields(cls)
                      if RESUME_KEYS.get(f.name, f.name) in d})


def score_of(row: dict, by: str) -> float:
    """An epoch's train.select_best_by value from its metrics row, higher is better."""
    if by == "val_loss":
        return -row.get("val_loss", math.inf)
    return row.get(by, -math.inf)  # macro_f1 is missing from rows written before it was measured


# ----------------------------------------------------------------------------- resuming

def resume_path(cfg: Config) -> Path:
    src = Path(cfg.train.output_dir) if cfg.train.resume == "auto" else Path(cfg.train.resume)
    return src / RESUME_FILE if src.is_dir() or cfg.train.resume == "auto" else src


def read_resume(cfg: Config, identity: dict[str, Any]) -> RunState | None:
    """The state to continue from (None: start fresh); refuses one that cannot fit this run."""
    path = resume_path(cfg)
    if not path.exists():
        if cfg.train.resume != "auto":
            raise UserError(f"resume: no resume state at {path} (train.resume is auto, none or a run directory)")
        return None
    s = resume_file.load_state(path)
    for key, now in identity.items():
        if s.get(key) != now:
            raise UserError(f"resume: {path} was trained with {key}={s.get(key)!r}, this run has "
                            f"{now!r}; use another train.output_dir or train.resume=none")
    state = RunState.from_resume(s)
    steps = state.steps  # (only the pictures read it: a state without it, or with a damaged one, starts the curve anew)
    if not (isinstance(steps, torch.Tensor) and steps.dim() == 2 and steps.shape[1] == 4 and steps.is_floating_point()):
        state.steps = None
    state.rescore(cfg.train.select_best_by)
    best = Path(cfg.train.output_dir) / "best.safetensors"
    if best.exists():  # never let a resumed run overwrite a better best with a worse one
        on_disk = checkpoint.read_metadata(best)
        score = score_of(on_disk, cfg.train.select_best_by)  # (its metadata has the val metrics)
        if score > state.best_score:
            state.best_score, state.best_epoch_val_acc, state.best_epoch = score, on_disk["val_acc"], on_disk["epoch"]
            state.best_model = checkpoint.load_weights(best)[0]
    return state


# ----------------------------------------------------------------------------- what changed at a resume

# Keys whose change at a resume is the normal case, not news.
EXPECTED_CHANGES = ("train.epochs", "train.resume")
# What set-up resolves a null to for runs made before the key existed (one label per image).
RESOLVED_DEFAULTS = {"train.task": "single_label", "train.select_best_by": "val_acc"}


def data_fingerprint(train: list[tuple[str, int]], val: list[tuple[str, int]], nbytes: dict[str, int]) -> dict:
    """Per split: the image count and a hash of every (path, file size, class); what a resume
    compares. The sizes come from the pre-flight scan (``nbytes``), which has read them already."""
    def split(samples: list[tuple[str, int]]) -> dict:
        h = hashlib.blake2b(digest_size=12)
        for path, label in samples:
            h.update(f"{path}\0{nbytes.get(path, -1)}\0{label}\n".encode("utf-8", "surrogateescape"))
        return {"images": len(samples), "hash": h.hexdigest()}
    return {"train": split(train), "val": split(val)}


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def changes(state: RunState, data: dict, config: dict) -> dict[str, list]:
    """What differs between the saved segment and this one: {"data.train images" | "section.key": [old, new]}."""
    out: dict[str, list] = {}
    for split in ("train", "val") if state.data else ():
        old, new = state.data[split], data[split]
        if old["images"] != new["images"]:
            out[f"{split} images"] = [old["images"], new["images"]]
        elif old["hash"] != new["hash"]:
            out[f"{split} files"] = ["changed", f"same count ({new['images']}), other files or sizes"]
    if state.config:
        old, new, default = _flat(state.config), _flat(config), _flat(Config().to_dict())
        # (a key newer than the saved config, at its default or what set-up resolves the default to
        # for such a run, changes nothing the run does)
        out.update({k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))
                    if k not in EXPECTED_CHANGES and old.get(k) != new.get(k)
                    and not (k not in old and new.get(k) in (default.get(k), RESOLVED_DEFAULTS.get(k)))})
    return out


# ----------------------------------------------------------------------------- RNG states

def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's (CPU and every GPU) RNGs, from ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
