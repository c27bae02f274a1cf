"""The run directory and its files, written by rank 0 only: the lock, status.json, config.yaml,
resumes.jsonl, and each epoch's files (weights, metrics, resume state) in an order that leaves the
run resumable at every moment.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Callable


from tl_dist.errors import UserError, first_few
from tl_dist.files import atomic, checkpoint, resume_file
from tl_dist.files.outputs import alive
from tl_dist.files.resume_file import RESUME_FILE


# The files a training run writes into its output directory (the pictures are written in place).
RUN_FILES = ("best.safetensors.", "best.json.", "last.safetensors.", "last.json.", "metrics.jsonl.", "resume.pt.",
             "config.yaml.", "resumes.jsonl.", "split.json.")


RUN_FILE_NAMES = tuple(f.rstrip(".") for f in RUN_FILES)
# The pictures a run draws into it (train.plots; every tracker shows them too).
PICTURES = ("curves", "confusion_matrix", "val_predictions", "train_batch")


def remove_stale_temp_files(folder: Path) -> None:
    """Remove the temp files ``atomic_write`` leaves when its process is killed mid-write (a
    checkpoint's worth each), for the files a run writes."""
    for p in folder.glob(".*.tmp"):
        if p.is_file() and p.name[1:].startswith(RUN_FILES):
            try:
                p.unlink()
            except OSError:
                pass  # not ours to insist on; it is only space


ORPHAN_WAIT_S = 20  # how long a new run waits for a killed run's loader workers to let go of its lock


def _gone(holder: str) -> bool:
    """Whether the lock record names a process of this machine that no longer runs."""
    try:
        who = json.loads(holder)
        return who["host"] == socket.gethostname() and not alive(int(who["pid"]))
    except (ValueError, KeyError, TypeError):
        return False


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
        self.fresh = False  # the folder held no run when this segment began
        self.created = False  # this segment made the folder
        self.set_up_done = False  # the run got past its set-up (data, model, state): it trains from here

    # What a segment writes before its first epoch (set-up): in a fresh folder, its own files.
    SET_UP_FILES = ("status.json", "config.yaml", "split.json", "train_batch.png")

    def discard(self) -> None:
        """A fresh run refused during its set-up leaves nothing behind: this segment's own files (a
        fresh folder held none of these names: ``refuse_foreign_files``), then the folder, if this
        segment made it and nothing else is in it."""
        if not (self.segment_started and self.fresh and self._path is not None):
            return
        folder = self._path.parent
        for name in self.SET_UP_FILES:
            try:
                (folder / name).unlink()
            except FileNotFoundError:
                pass
        self.release()
        if self.created:  # (the folder is this segment's: the image cache it may have built in it too)
            shutil.rmtree(folder / "image_cache", ignore_errors=True)
            try:
                folder.rmdir()
            except OSError:
                pass  # something else is in it now: not ours to remove

    def acquire(self, folder: Path) -> None:
        path = folder / self.NAME
        patience = time.monotonic() + ORPHAN_WAIT_S
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
                if _gone(holder) and time.monotonic() < patience:
                    # A killed run's loader workers (forked, so sharing its lock) outlive it by a few
                    # seconds, until they notice; the run itself is gone: wait for them.
                    time.sleep(0.2)
                    continue
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


def save_epoch(out: Path, meta: dict, is_best: bool, state: dict) -> None:
    """An epoch's files (rank 0, possibly on the writer's thread) from its resume state, in an order
    that leaves the run resumable at every moment: weights, metrics, then the resume state."""
    evaluated = state["ema"] if state.get("ema") is not None else state["model"]
    try:
        checkpoint.save_weights(out / "last.safetensors", evaluated, {**meta, "kind": "last"})
        if is_best:
            checkpoint.save_weights(out / "best.safetensors", evaluated, {**meta, "kind": "best"})
        atomic.atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r, allow_nan=False) + "\n"
                                                                           for r in state["history"]))
        resume_file.save_state(out / RESUME_FILE, state)
    except OSError as e:
        raise UserError(f"checkpoint: writing epoch {meta['epoch']}'s files in {out} failed: {e}. The files of "
                        f"the epochs before are intact: free space (or fix the folder) and run the same command "
                        f"to resume") from None


STATUS = "status.json"


def write_status(out: Path, status: str, detail: str = "") -> None:
    """How the run's latest segment stands: running (so a killed run still says running, with no
    live process), then complete, interrupted or failed with its one-line reason. ``tl-dist runs``
    reads it."""
    info = {"status": status, "detail": detail, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic.atomic_write_text(out / STATUS, json.dumps(info, allow_nan=False) + "\n")


SPLIT = "split.json"


def write_split(out: Path, record: dict) -> None:
    """The run's val / test split (data.val_split), every part's relative paths: a resume and
    ``tl-dist evaluate`` use it instead of drawing again."""
    _segment_file(out / SPLIT, json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n")


def read_split(folder: Path) -> dict | None:
    """The split a run recorded in ``folder``, or None if it has none."""
    path = folder / SPLIT
    if not path.exists():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"data: {path} cannot be read ({str(e)[:80]}); it records the run's split: restore it, or "
                        f"train into another train.output_dir") from None
    if not isinstance(record, dict):
        raise UserError(f"data: {path} is not a split record; restore it, or train into another train.output_dir")
    return record


def write_config(out: Path, text: str) -> None:
    """A fresh run's resolved config (``config.yaml``): what the run's first weights were made with."""
    _segment_file(out / "config.yaml", text)


def record_resume(out: Path, after_epoch: int, changed: dict[str, list]) -> None:
    """Append this segment's changes to ``resumes.jsonl``: with the first run's ``config.yaml`` it
    tells how the weights were made."""
    log = out / "resumes.jsonl"
    line = json.dumps({"after_epoch": after_epoch, "changes": changed}, allow_nan=False)
    _segment_file(log, lambda: (log.read_text(encoding="utf-8") if log.exists() else "") + line + "\n")


def _segment_file(path: Path, text: str | Callable[[], str]) -> None:
    try:
        atomic.atomic_write_text(path, text() if callable(text) else text)
    except OSError as e:
        raise UserError(f"train: writing {path} failed: {e.strerror}; free space (or fix the folder) and run "
                        f"the same command again") from None


def prepare_output_dir(path: Path, lock: RunLock, resume: str) -> None:
    """Create it, lock it (one run at a time), refuse to start afresh over a run that is there, and
    remove temp files a killed run of ours left."""
    try:
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        lock.acquire(path)  # before anything else here is touched
    except OSError as e:
        raise UserError(f"train: train.output_dir {path} is not writable: {e.strerror}; "
                        f"choose another with train.output_dir=PATH") from None
    lock.created = created
    lock.fresh = not holds_a_run(path)
    refuse_foreign_files(path)
    if resume == "none" and (path / "best.safetensors").exists():
        best = checkpoint.read_metadata(path / "best.safetensors")
        raise UserError(f"train: train.resume=none would start afresh in {path}, replacing its run (best val acc "
                        f"{best['val_acc']:.4f} at epoch {best['epoch']}); choose another train.output_dir, or move "
                        f"that run away first")
    remove_stale_temp_files(path)
    write_status(path, "running")
    lock.segment_started = True  # from here on this run's end is this directory's news


def holds_a_run(path: Path) -> bool:
    """Whether a tl_dist run has used the folder (its status.json or resume state)."""
    from tl_dist.files.outputs import json_object

    said = (json_object(path / "status.json") or {}).get("status")
    return said in ("running", "complete", "interrupted", "failed") or (path / "resume.pt").exists()


def refuse_foreign_files(path: Path) -> None:
    """A folder no tl_dist run has used must not hold files a run would replace (a project folder's
    own config.yaml, say). A run's folder, recognised by its status.json or resume state, is its own."""
    if holds_a_run(path):
        return
    names = [*RUN_FILE_NAMES, "status.json", *(f"{p}.png" for p in PICTURES)]
    found = [n for n in names if (path / n).exists() or (path / n).is_symlink()]
    if found:
        raise UserError(f"train: train.output_dir {path} holds {first_few(found, 4)}, which a run would replace, "
                        f"and no tl_dist run has used it; choose a new or empty folder, or move them away")
