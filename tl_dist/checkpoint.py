"""Self-describing checkpoints: safetensors weights with the metadata inside, a JSON mirror beside,
and a resume-state file; every file written atomically (temp file, fsync, rename).

The metadata lives in the safetensors header itself, so weights and their description can never
disagree, even when a crash falls between writing ``best.safetensors`` and ``best.json``. Nothing
here unpickles: safetensors for weights, JSON for metadata, ``torch.load(weights_only=True)`` for
the resume state this tool writes itself. ``BackgroundWriter`` lets the loop write an epoch's files
while the next epoch trains.
"""
from __future__ import annotations

import errno
import fcntl
import io
import json
import math
import os
import pickle
import re
import socket
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .config import MAX_IMAGE_SIZE as MAX_SIZE
from .errors import UserError, first_line

FORMAT = "tl_dist/1"
META_KEY = "tl_dist"
# The files a training run writes into its output directory (the pictures are written in place).
RUN_FILES = ("best.safetensors.", "best.json.", "last.safetensors.", "last.json.", "metrics.jsonl.", "resume.pt.",
             "config.yaml.", "resumes.jsonl.")
RUN_FILE_NAMES = tuple(f.rstrip(".") for f in RUN_FILES)


def fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return  # not supported everywhere (e.g. Windows); the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for every thread at once)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return _UMASK_AT_START


_UMASK_AT_START = os.umask(0o022)
os.umask(_UMASK_AT_START)


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never a part.

    The file gets the mode ``open()`` would give a new file (0666 less the umask); a temp file is
    created 0600, and the rename would keep that, hiding checkpoints from a user's team.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def remove_stale_temp_files(folder: Path) -> None:
    """Remove the temp files ``atomic_write`` leaves when its process is killed mid-write (a
    checkpoint's worth each), for the files a run writes."""
    for p in folder.glob(".*.tmp"):
        if p.is_file() and p.name[1:].startswith(RUN_FILES):
            try:
                p.unlink()
            except OSError:
                pass  # not ours to insist on; it is only space


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, text.encode("utf-8"))


def _plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; a detached CPU copy has neither.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def save_weights(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """``path`` (.safetensors, metadata in its header) then ``path`` with .json beside it."""
    meta = {"format": FORMAT, **meta}
    blob = save(_plain(state), metadata={META_KEY: json.dumps(meta, allow_nan=False)})  # strict JSON only
    atomic_write(path, blob)
    atomic_write_text(Path(path).with_suffix(".json"), json.dumps(meta, indent=2, allow_nan=False) + "\n")


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata from a checkpoint's safetensors header, without reading the tensors."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            head = f.read(8)
            if head[:4] == b"PK\x03\x04":  # a torch.save zip: resume.pt, or a .pth
                raise UserError(f"checkpoint: {p} is a resume state or a torch file (what training continues "
                                f"from), not a tl_dist model checkpoint; use {p.parent / 'best.safetensors'} "
                                f"(or give the run directory)")
            if len(head) != 8:
                raise ValueError("file too short for a safetensors header")
            n = int.from_bytes(head, "little")
            if n <= 0 or n > 100_000_000:
                raise ValueError("header size out of range")
            header = json.loads(f.read(n))
        if not isinstance(header, dict) or not isinstance(header.get("__metadata__", {}), dict):
            raise ValueError("the header is not a safetensors header")
        raw = header.get("__metadata__", {}).get(META_KEY)
        if raw is None:
            raise ValueError("no tl_dist metadata in the header (not a tl_dist checkpoint?)")
        meta = json.loads(raw)
    except FileNotFoundError:
        raise UserError(f"checkpoint: file not found: {p}") from None
    except RecursionError:
        raise UserError(f"checkpoint: {p} is damaged or not a tl_dist checkpoint: its metadata is nested too "
                        f"deeply") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint: {p} is damaged or not a tl_dist checkpoint: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"checkpoint: {p} has metadata format {meta.get('format') if isinstance(meta, dict) else '?'!r}, "
                        f"expected {FORMAT!r}")
    problem = metadata_problem(meta)
    if problem:
        raise UserError(f"checkpoint: {p} is damaged or not a tl_dist checkpoint: {problem}")
    return meta




def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _size(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SIZE


_HEAD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}(\.[A-Za-z0-9_]{1,64}){0,7}")
# The only constructor arguments a checkpoint may pass on to torchvision (see model.arch_kwargs).
_ARCH_KWARGS = {"aux_logits": bool, "transform_input": bool, "init_weights": bool, "image_size": int, "input_size": list}


def head_of(meta: dict[str, Any]) -> Any:
    """The classifier's module name; checkpoints written before it was recorded are ResNets (``fc``)."""
    return meta.get("head", "fc")


def _arch_kwargs_ok(kw: Any) -> bool:
    if not isinstance(kw, dict) or not set(kw) <= set(_ARCH_KWARGS):
        return False
    for k, v in kw.items():
        if _ARCH_KWARGS[k] is bool and not isinstance(v, bool):
            return False
        if _ARCH_KWARGS[k] is int and not _size(v):
            return False
        if _ARCH_KWARGS[k] is list and not (isinstance(v, list) and len(v) == 2 and all(map(_size, v))):
            return False
    return True


def metadata_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with a checkpoint's metadata, or None: every field a reader uses, checked
    before anything is allocated from it (the file may come from anywhere)."""
    classes = meta.get("classes")
    checks = (
        ("classes", isinstance(classes, list) and len(classes) > 0
         and all(isinstance(c, str) and c for c in classes) and len(set(classes)) == len(classes),
         "a list of unique, non-empty class names"),
        ("num_classes", isinstance(classes, list) and meta.get("num_classes") == len(classes)
         and not isinstance(meta.get("num_classes"), bool), "the number of classes"),
        ("arch", isinstance(meta.get("arch"), str)
         and meta["arch"] in torchvision.models.list_models(module=torchvision.models), "a torchvision model name"),
        ("head", isinstance(head_of(meta), str) and _HEAD_NAME.fullmatch(head_of(meta)) is not None,
         "a module name such as fc or classifier.1"),
        ("arch_kwargs", _arch_kwargs_ok(meta.get("arch_kwargs", {})), "constructor arguments tl_dist writes"),
        ("interpolation", meta.get("interpolation", "bilinear") in ("bilinear", "bicubic"), "bilinear or bicubic"),
        ("image_size", _size(meta.get("image_size")), f"an integer from 1 to {MAX_SIZE}"),
        ("resize_size", _size(meta.get("resize_size")) and _size(meta.get("image_size"))
         and meta["resize_size"] >= meta["image_size"], f"an integer from image_size to {MAX_SIZE}"),
        ("mean", isinstance(meta.get("mean"), list) and len(meta["mean"]) == 3 and all(map(_number, meta["mean"])),
         "three finite numbers"),
        ("std", isinstance(meta.get("std"), list) and len(meta["std"]) == 3
         and all(_number(s) and s > 0 for s in meta["std"]), "three finite positive numbers"),
        ("epoch", "epoch" not in meta or (isinstance(meta["epoch"], int) and not isinstance(meta["epoch"], bool)
                                          and meta["epoch"] >= 0), "an epoch number"),
        ("val_acc", "val_acc" not in meta or (_number(meta["val_acc"]) and 0 <= meta["val_acc"] <= 1),
         "a number from 0 to 1"),
        ("macro_f1", "macro_f1" not in meta or (_number(meta["macro_f1"]) and 0 <= meta["macro_f1"] <= 1),
         "a number from 0 to 1"),
        ("val_loss", "val_loss" not in meta or _number(meta["val_loss"]), "a finite number"),
    )
    for key, ok, expected in checks:
        if not ok:
            shown = repr(meta.get(key))
            return f"metadata {key} is {shown[:60]}{'...' if len(shown) > 60 else ''}, expected {expected}"
    return None


def load_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, metadata) from a checkpoint; checks that the two describe the same model."""
    meta = read_metadata(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"checkpoint: {path} is damaged (truncated or corrupt tensors): {e}") from None
    classes, head = meta.get("classes"), head_of(meta)
    rows = state.get(f"{head}.weight")
    if not isinstance(classes, list) or rows is None or rows.shape[0] != len(classes) \
            or meta.get("num_classes") != len(classes):
        raise UserError(f"checkpoint: {path}: metadata does not match the weights "
                        f"(classes: {len(classes) if isinstance(classes, list) else '?'}, "
                        f"num_classes: {meta.get('num_classes')}, rows of {head}: "
                        f"{None if rows is None else rows.shape[0]})")
    return state, meta


def resolve(path: str | Path, name: str = "best") -> Path:
    """A run directory means its ``{name}.safetensors``; a file means itself."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / f"{name}.safetensors"
    if not p.is_file():
        raise UserError(f"checkpoint: not found: {p} (give a run directory or a .safetensors file)")
    return p


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


# ----------------------------------------------------------------------------- one writer per run directory

class RunLock:
    """An exclusive lock on a run directory (``.lock`` in it), held for the whole run.

    Two runs writing into one directory would interleave their checkpoints and metrics. The lock is
    ``flock``: the kernel releases it when its process ends in any way, so a lock left by a killed
    run is taken over without a word. The file says who holds it (host, pid, start time) for the
    message a second run gets, and goes when the run ends.
    """

    NAME = ".lock"

    def __init__(self) -> None:
        self._fd: int | None = None
        self._path: Path | None = None
        self.segment_started = False  # set once the run starts writing here (status.json: running)

    def acquire(self, folder: Path) -> None:
        path = folder / self.NAME
        while True:
            try:  # never through a link: the lock record would be written into whatever it points at
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
            except OSError as e:
                if e.errno != errno.ELOOP and not path.is_symlink():
                    raise
                raise UserError(f"train: {path} is a symbolic link; the run's lock is a plain file of its own. "
                                f"Remove the link (what it points at is left as it is) and run again") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace")
                os.close(fd)
                self._refuse(path, e, holder)
            # The holder before us removes the file as it lets go; if it did so between our open and
            # our flock, we hold a lock on a removed file: take the new one instead.
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self._fd, self._path = fd, path

    @staticmethod
    def _refuse(path: Path, e: OSError, holder: str) -> None:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            try:
                who = json.loads(holder)
                who = f"pid {who['pid']} on {who['host']}, started {who['started']}"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise UserError(f"train: {path.parent} is in use by another run ({who}); wait for it to end, "
                            f"or choose another train.output_dir") from None
        raise UserError(f"train: cannot lock {path} ({e.strerror}): this filesystem does not support "
                        f"locks; choose a train.output_dir on a local or lock-capable filesystem") from None

    def release(self) -> None:
        """Remove the file, then let go (a killed run leaves it, unlocked: the next run takes it over)."""
        if self._fd is not None:
            try:
                os.unlink(self._path)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None


# ----------------------------------------------------------------------------- writing while training

def snapshot(obj: Any) -> Any:
    """A CPU copy, taken now, of every tensor in ``obj`` (nested dicts, lists, tuples).

    Training changes weights and optimizer buffers in place; a file written in the background
    must hold them as they were at the end of the epoch, not as the next epoch leaves them.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class BackgroundWriter:
    """Runs write jobs on one thread, one after another, while the next epoch trains.

    At most one job is in flight: ``submit`` first waits for the previous job, so memory holds at
    most one extra copy of the state, files appear in the order they were submitted, and a failed
    write is raised in the training loop at the next epoch boundary (or at ``close``).

    ``background=False`` runs each job inside ``submit``. That is the choice when the CPU trains the
    model: a writer thread then takes cores from the compute threads, which wait for each other at
    every operation (measured on 2 cores: epochs 1.3 s slower, more than the writing itself costs).
    """

    def __init__(self, background: bool = True) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tl_dist-writer") if background else None
        self._pending: Future | None = None

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()
        if self._pool is None:
            job()
        else:
            self._pending = self._pool.submit(job)

    def wait(self) -> None:
        """Block until the submitted job has finished; raise its error, if it had one."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except (UserError, OSError):
            raise  # a file that cannot be written says which, wherever it was written
        except Exception as e:
            if self._pool is None:
                raise
            raise UserError(f"checkpoint: the background writer failed: {first_line(e)}; "
                            f"train.write_in_background=false writes between epochs instead") from e

    def close(self) -> None:
        """Finish what was submitted (so no complete epoch is lost), then stop the thread."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
