"""tl-dist runs [DIR]: the runs under DIR (default runs/), from their files alone.

One row a run: name, arch, mode, epochs done / planned, best val acc and its epoch, status, size on
disk. Status comes from status.json (written by the run as it starts and ends) and the run's lock:
running (a live process holds it), complete, interrupted or killed (resumable when resume.pt is
there: the same command continues it), failed (with its one-line reason). A file or field that is not
as a run writes it (damaged, hand-edited, nested without end) marks that run's row, naming the
field; the other runs are listed as usual. metrics.jsonl is read from its end (64 kB), whatever its size.
"""
from __future__ import annotations

import argparse
import json
import os
import reprlib
import socket
import sys
from pathlib import Path
from typing import Any, Sequence

from tl_dist.errors import UserError, one_line, printable
from tl_dist.files.outputs import alive


STATUS_WIDTH = 48  # characters of a run's status in the table


MARKERS = ("config.yaml", "last.json", "resume.pt", "status.json")


MAX_DEPTH = 4


def find_runs(root: Path) -> list[Path]:
    """Folders under ``root`` (itself included) that hold a run; links are not followed."""
    found = []
    for folder, dirs, files in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        if any(m in files for m in MARKERS):
            found.append(Path(folder))
            dirs.clear()  # a run's own folder holds no other runs
        elif depth >= MAX_DEPTH:
            dirs.clear()
        dirs.sort()
    return found


TAIL_BYTES = 1 << 16  # of metrics.jsonl: its last rows say how far the run got, whatever its length


class Problems:
    """What is wrong in one run's files, field by field: the row is still listed, marked."""

    def __init__(self) -> None:
        self.found: list[str] = []

    def json(self, path: Path) -> dict:
        """The JSON object in ``path``; {} when it is missing; {} and a note when it is not one."""
        try:
            if path.stat().st_size > 1 << 20:  # status / best / last / lock files are a few kB
                raise ValueError("over 1 MB")
            obj = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except RecursionError:
            self.found.append(f"{path.name}: nested too deeply")
            return {}
        except (OSError, ValueError) as e:
            self.found.append(f"{path.name}: not readable as JSON ({str(e)[:60]})")
            return {}
        if not isinstance(obj, dict):
            self.found.append(f"{path.name}: not a JSON object")
            return {}
        return obj

    def field(self, obj: dict, key: str, kind, where: str, check=lambda v: True):
        """``obj[key]`` if it has the expected type (and passes ``check``), else None and a note."""
        if key not in obj or obj[key] is None:
            return None
        v = obj[key]
        ok = isinstance(v, kind) and not (isinstance(v, bool) and kind is not bool) and check(v)
        if not ok:
            self.found.append(f"{where} {key} is {reprlib.repr(v)[:40]}")
            return None
        return v


def _running(lock: dict, problems: Problems) -> str | None:
    """'running' if the process named in a run's lock file still runs; another machine's run cannot
    be asked, so its lock file is taken at its word. None when nobody holds the run."""
    pid = problems.field(lock, "pid", int, ".lock", lambda v: 0 < v < 2**22)
    host = problems.field(lock, "host", str, ".lock")
    if pid is None:
        return None
    if host != socket.gethostname():
        return f"running on {host}?"
    return "running" if alive(pid) else None


def _epochs_done(run: Path, problems: Problems) -> int:
    """One more than the highest epoch in the last rows of metrics.jsonl (read from its end, bounded)."""
    try:
        with open(run / "metrics.jsonl", "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        return 0
    except OSError as e:
        problems.found.append(f"metrics.jsonl: {e.strerror}")
        return 0
    if size > TAIL_BYTES:
        lines = lines[1:]  # the first is cut
    epochs = []
    for line in lines:
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue  # a half-written last line of a killed run, or a cut one
        if isinstance(row, dict) and isinstance(row.get("epoch"), int) and not isinstance(row["epoch"], bool):
            epochs.append(row["epoch"])
    return max(epochs, default=-1) + 1


def _size(run: Path) -> int:
    total = 0
    for folder, _, files in os.walk(run):
        for f in files:
            try:
                total += os.lstat(os.path.join(folder, f)).st_size
            except OSError:
                pass
    return total


def describe(run: Path, root: Path) -> dict[str, Any]:
    """One row; a file or field that is not as the run writes it is named in the status, never fatal."""
    problems = Problems()
    try:
        row = _describe(run, root, problems)
    except Exception as e:  # a case the checks above missed still costs one row, not the listing
        problems.found.append(f"{type(e).__name__}: {str(e)[:80]}")
        row = {"name": str(run.relative_to(root)) if run != root else run.name, "path": str(run), "arch": None,
               "mode": None, "epochs_done": 0, "epochs_planned": None, "best_val_acc": None, "best_map": None, "best_epoch": None,
               "status": "unknown", "bytes": _size(run)}
    if problems.found:
        row["status"] = f"{row['status']}; unreadable: {'; '.join(problems.found[:3])}"
        row["problems"] = problems.found
    return row


def _describe(run: Path, root: Path, problems: Problems) -> dict[str, Any]:
    last, best = problems.json(run / "last.json"), problems.json(run / "best.json")
    status = problems.json(run / "status.json")
    config = problems.field(last, "config", dict, "last.json") or {}
    if not config and (run / "config.yaml").exists():
        import yaml
        try:
            loaded = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, RecursionError, ValueError):
            loaded = None
            problems.found.append("config.yaml: not readable as YAML")
        config = loaded if isinstance(loaded, dict) else {}
    model = problems.field(config, "model", dict, "config") or {}
    train = problems.field(config, "train", dict, "config") or {}
    planned = problems.field(train, "epochs", int, "config train.", lambda v: v > 0)
    done = _epochs_done(run, problems)
    resumable = (run / "resume.pt").exists()
    said = problems.field(status, "status", str, "status.json")
    state = _running(problems.json(run / ".lock"), problems)
    if state:
        pass
    elif said == "complete" or (said is None and planned and done >= planned):
        state = "complete"
    elif said == "failed":
        state = f"failed: {problems.field(status, 'detail', str, 'status.json') or ''}".rstrip(": ")
    elif said in ("interrupted", "running"):  # running with no process: it was killed
        what = "interrupted" if said == "interrupted" else "killed"
        state = f"{what}, resumable" if resumable else f"{what}, nothing saved"
    else:
        state = "interrupted, resumable" if resumable else "unknown"
    number = (int, float)
    return {"name": str(run.relative_to(root)) if run != root else run.name, "path": str(run),
            "arch": problems.field(last, "arch", str, "last.json") or problems.field(model, "arch", str, "config model."),
            "mode": problems.field(last, "mode", str, "last.json") or problems.field(model, "mode", str, "config model."),
            "epochs_done": done, "epochs_planned": planned,
            "best_val_acc": problems.field(best, "val_acc", number, "best.json", lambda v: 0 <= v <= 1),
            # (several labels per image: the best epoch's mAP, shown instead of its exact-match accuracy)
            "best_map": problems.field(best, "map", number, "best.json", lambda v: 0 <= v <= 1),
            "best_epoch": problems.field(best, "epoch", int, "best.json", lambda v: v >= 0),
            "status": state, "bytes": _size(run)}


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n < 2**30 else f"{n / 2**30:.2f} GB"


def main(argv: Sequence[str] | None = None, prog: str = "tl-dist runs") -> int:
    p = argparse.ArgumentParser(prog=prog, description="The runs under DIR (default runs/): arch, mode, epochs, "
                                                       "best val acc, status, size; from their files alone.")
    p.add_argument("dir", nargs="?", default="runs", help="a folder of runs, or one run (default: runs)")
    p.add_argument("--json", action="store_true", help="one JSON object per run, a line each")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    root = Path(args.dir).expanduser()
    try:
        if not root.is_dir():
            raise UserError(f"runs: no such folder: {root} (train.output_dir's parent, runs/ by default)")
        rows = [describe(r, root) for r in find_runs(root)]
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    if not rows:
        print(f"no runs under {printable(root)}")
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"runs under {escape(printable(root))}")
    t.caption = "status cut to the column: --json has it in full" if any(
        len(r["status"]) > STATUS_WIDTH for r in rows) else None
    for col, just in (("run", "left"), ("arch", "left"), ("mode", "left"), ("epochs", "right"),
                      ("best val acc (epoch)", "right"), ("status", "left"), ("size", "right")):
        if col == "status":  # one line per run: a failure's reason cut to the column (in full with --json)
            t.add_column(col, justify=just, no_wrap=True, overflow="ellipsis", max_width=STATUS_WIDTH)
        else:
            t.add_column(col, justify=just, overflow="fold")
    for r in rows:
        epoch = r["best_epoch"] if r["best_epoch"] is not None else "?"
        best = ("-" if r["best_val_acc"] is None else f"{r['best_val_acc']:.4f} ({epoch})" if r.get("best_map") is None
                else f"mAP {r['best_map']:.4f} ({epoch})")
        t.add_row(*(escape(printable(str(v))) for v in (
            r["name"], r["arch"] or "?", r["mode"] or "?", f"{r['epochs_done']}/{r['epochs_planned'] or '?'}",
            best, r["status"], _mb(r["bytes"]))))
    # Piped output has no terminal width; keep each run on whole lines there.
    Console(width=None if sys.stdout.isatty() else 200).print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
