"""resume.pt: the state a run continues from (optimizer, RNGs, counters, history).

Written by torch.save into an atomic file; read with ``torch.load(weights_only=True)``, which
refuses any pickled object: tensors and plain containers only.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from tl_dist.errors import UserError, first_line
from tl_dist.files.atomic import atomic_write

RESUME_FILE = "resume.pt"


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """The resume state (optimizer, scheduler, RNGs, counters): tensors and plain containers only."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue())


def load_state(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint: resume state not found: {path}") from None
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise UserError(f"checkpoint: resume state {path} is damaged or not tl_dist's ({first_line(e)}); "
                        f"delete it to start afresh, or set train.resume=none with another "
                        f"train.output_dir") from None

