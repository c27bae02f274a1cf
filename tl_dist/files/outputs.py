"""Where the commands write: the output place checked before any work, and never a file replaced
that tl_dist did not write.

A command that runs for minutes and then fails to write its results wastes the minutes; one that
writes over a user's ``notes.pt`` or ``metrics.json`` loses their work. So each command checks,
before it starts: that the folder can take new files (by making one: permission bits say nothing
for root, read-only mounts or full quotas), and that every file it would replace is one tl_dist wrote
(recognised by its content) or that the user passed ``--force``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from tl_dist.errors import UserError


def check_writable(folder: Path, who: str, what: str) -> None:
    """``folder`` (or, if it does not exist yet, the folder that would hold it) takes new files."""
    probe_in = folder
    while not probe_in.exists() and probe_in != probe_in.parent:
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise UserError(f"{who}: {what} {folder}: {probe_in} is a file, not a folder; choose another place")
    try:  # an unnamed file where the filesystem has them (O_TMPFILE): nothing to leave behind
        with tempfile.TemporaryFile(prefix=".tl_dist-probe.", dir=probe_in):
            pass
    except OSError as e:
        raise UserError(f"{who}: {what} {folder}: cannot write in {probe_in} ({e.strerror}); choose a "
                        f"writable place") from None


def refuse_foreign(paths: list[Path], ours: Callable[[Path], bool], who: str, force: bool,
                   how_to_force: str | None = "pass --force to replace it") -> None:
    """Refuse (one line, naming the first) if any existing file of ``paths`` is not one tl_dist wrote,
    unless ``force``. A folder or a link where a file would go is refused even with ``force``."""
    for p in paths:
        if p.is_symlink() or (p.exists() and not p.is_file()):
            raise UserError(f"{who}: {p} is {'a symbolic link' if p.is_symlink() else 'not a plain file'}; "
                            f"tl_dist writes only plain files there: move it away or choose another place")
        if not force and p.exists() and not ours(p):
            raise UserError(f"{who}: {p} exists and was not written by tl_dist; it is left as it is. Choose "
                            f"another place{', move it away, or ' + how_to_force if how_to_force else ' or move it away'}")


def json_object(path: Path) -> dict | None:
    """The JSON object in ``path``, or None (missing, unreadable, not JSON, not an object): what the
    commands read to recognise a file of their own."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def remove_stale_temp_dirs(folder: Path, prefix: str) -> None:
    """Remove ``.PREFIX.PID.*.tmp`` folders of processes that are gone (a killed export leaves its
    whole temporary folder; the next one to the same place cleans up after it)."""
    for p in folder.glob(f".{prefix}.*.tmp"):
        parts = p.name[len(prefix) + 2:].split(".")
        pid = int(parts[0]) if parts and parts[0].isdigit() else None
        if p.is_dir() and not p.is_symlink() and (pid is None or not alive(pid)):
            shutil.rmtree(p, ignore_errors=True)


def alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine still runs (a zombie has ended)."""
    if not 0 < pid < 2**22:  # Linux's largest pid; -1 or 0 would mean "every process" to kill()
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
