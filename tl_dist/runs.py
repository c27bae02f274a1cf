"""tl-dist runs [DIR]: the runs under DIR (default runs/), from their files alone.

One row a run: name, arch, mode, epochs done / planned, best val acc and its epoch, status, size on
disk. Status comes from status.json (written by the run as it starts and ends) and the run's lock:
running (a live process holds it), complete, interrupted or killed (resumable when resume.pt is
there: the same command continues it), failed (with its one-line reason).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import UserError, one_line, printable

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


def _json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
        return obj if isinstance(obj, dict) else {}
    except (OSError, ValueError):
        return {}


def _running(lock: Path) -> str | None:
    """'running' if the process named in a run's lock file still runs; another machine's run cannot
    be asked, so its lock file is taken at its word. None when nobody holds the run."""
    info = _json(lock)
    if not isinstance(info.get("pid"), int):
        return None
    if info.get("host") != socket.gethostname():
        return f"running on {info.get('host')}?"
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # another user's live process
    return "running"


def _epochs_done(run: Path) -> int:
    try:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line]
        return max((r["epoch"] for r in rows if isinstance(r, dict) and isinstance(r.get("epoch"), int)), default=-1) + 1
    except (OSError, ValueError):
        return 0


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
    last, best, status = _json(run / "last.json"), _json(run / "best.json"), _json(run / "status.json")
    config = last.get("config") or {}
    if not config and (run / "config.yaml").exists():
        import yaml
        try:
            config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            config = {}
    model = config.get("model", {}) if isinstance(config, dict) else {}
    planned = (config.get("train", {}) if isinstance(config, dict) else {}).get("epochs")
    done = _epochs_done(run)
    resumable = (run / "resume.pt").exists()
    said = status.get("status")
    state = _running(run / ".lock")
    if state:
        pass
    elif said == "complete" or (said is None and planned and done >= planned):
        state = "complete"
    elif said == "failed":
        state = f"failed: {status.get('detail', '')}".rstrip(": ")
    elif said in ("interrupted", "running"):  # running with no process: it was killed
        what = "interrupted" if said == "interrupted" else "killed"
        state = f"{what}, resumable" if resumable else f"{what}, nothing saved"
    else:
        state = "interrupted, resumable" if resumable else "unknown"
    return {"name": str(run.relative_to(root)) if run != root else run.name, "path": str(run),
            "arch": last.get("arch") or model.get("arch"), "mode": last.get("mode") or model.get("mode"),
            "epochs_done": done, "epochs_planned": planned,
            "best_val_acc": best.get("val_acc"), "best_epoch": best.get("epoch"),
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
    for col, just in (("run", "left"), ("arch", "left"), ("mode", "left"), ("epochs", "right"),
                      ("best val acc (epoch)", "right"), ("status", "left"), ("size", "right")):
        t.add_column(col, justify=just)
    for r in rows:
        best = "-" if r["best_val_acc"] is None else f"{r['best_val_acc']:.4f} ({r['best_epoch']})"
        t.add_row(*(escape(printable(str(v))) for v in (
            r["name"], r["arch"] or "?", r["mode"] or "?", f"{r['epochs_done']}/{r['epochs_planned'] or '?'}",
            best, r["status"], _mb(r["bytes"]))))
    Console().print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
