"""A labels file (``data.labels``): one row per image, CSV with a header or JSON Lines, holding the
image's path (relative to ``data.root``), its label (or labels: several per image with
``data.label_delimiter``, or a JSON list) and optionally its split (train / val / test).

Read in one streaming pass (a million rows in seconds: benchmarks/labels_file.py); every problem a row
can have is found in that pass and reported in one line naming the file and the line numbers (the
first few and a count), before any image is opened.
"""
from __future__ import annotations

import csv
import json
import posixpath
from array import array
from dataclasses import dataclass
from pathlib import Path

from tl_dist.errors import UserError, first_few, printable

SPLITS = ("train", "val", "test")
SHOWN = 5  # problems named in the one line; the rest are counted


@dataclass
class Rows:
    """The file's rows as parallel lists (a million rows take about 200 MB: benchmarks/labels_file.py):
    the path relative to the data root (normalised, '/'-separated), the label and the split (one
    shared string per distinct value; None without a split column), and the file's line number."""
    paths: list[str]
    labels: list  # a class name per row; with several labels per image, a sorted tuple of names
    splits: list[str] | None
    lines: array
    multi_label: bool = False


def read(file: Path, path_column: str, label_column: str, split_column: str, delimiter: str | None = None) -> Rows:
    """Every row of ``file``, checked; UserError (one line) for a file that cannot be used as it is.
    With ``delimiter`` (or a JSON list in a row) each image has a set of labels, possibly empty."""
    if not file.is_file():
        raise UserError(f"data: data.labels file not found: {file}")
    try:
        with open(file, encoding="utf-8-sig", newline="") as f:
            if file.suffix.lower() in (".jsonl", ".ndjson", ".json"):
                return _check(file, _json_lines(file, f, path_column, label_column, split_column), delimiter)
            return _check(file, _csv(file, f, path_column, label_column, split_column), delimiter)
    except UnicodeDecodeError as e:
        raise UserError(f"data: {file} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"data: cannot read {file}: {e.strerror}") from None


def _csv(file: Path, f, path_column: str, label_column: str, split_column: str):
    delimiter = "\t" if file.suffix.lower() == ".tsv" else ","
    reader = csv.reader(f, delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise UserError(f"data: {file} is empty; it needs a header row naming its columns "
                        f"({path_column},{label_column})") from None
    except csv.Error as e:
        raise UserError(f"data: {file} line 1: {e}") from None
    header = [h.strip() for h in header]
    where = {name: i for i, name in enumerate(header)}
    for key, name in (("data.path_column", path_column), ("data.label_column", label_column)):
        if name not in where:
            raise UserError(f"data: {file} has no column {name!r} (its columns: {first_few(header, 8)}); "
                            f"name the column with {key}")
    ip, il, isp = where[path_column], where[label_column], where.get(split_column)
    yield isp is not None
    need = max(ip, il, isp if isp is not None else 0) + 1
    try:
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank lines
            if len(row) < need:
                yield reader.line_num, None, None, None, f"{len(row)} field(s), the header has {len(header)}"
                continue
            yield reader.line_num, row[ip], row[il], row[isp] if isp is not None else None, None
    except csv.Error as e:
        raise UserError(f"data: {file} line {reader.line_num}: {e}") from None


def _json_lines(file: Path, f, path_column: str, label_column: str, split_column: str):
    # The first object decides whether there is a split column, as a CSV header does; problems on
    # the lines before it are held until then.
    has_split, pending = None, []
    for n, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as e:
            item = (n, None, None, None, f"not a JSON object ({str(e)[:60]})")
        else:
            if not isinstance(obj, dict):
                item = (n, None, None, None, "not a JSON object")
            else:
                if has_split is None:
                    has_split = split_column in obj
                    yield has_split
                    yield from pending
                missing = [c for c in (path_column, label_column) if c not in obj]
                label = obj.get(label_column)
                if missing:
                    item = (n, None, None, None, f"no {missing[0]!r} (set data.path_column / data.label_column)")
                elif not (isinstance(label, str) or isinstance(label, list) and all(isinstance(x, str) for x in label)):
                    item = (n, None, None, None, f"the label is {type(label).__name__}, not a string or a list of them")
                else:
                    item = (n, obj[path_column], label, obj.get(split_column), None)
        if has_split is None:
            pending.append(item)
        else:
            yield item
    if has_split is None:
        if not pending:
            raise UserError(f"data: {file} holds no rows")
        yield False
        yield from pending


def _labels(label, delimiter: str | None) -> tuple[str, ...] | str | None:
    """A row's label: a name; or, with several per image, the sorted set of names (None: malformed)."""
    if isinstance(label, list):
        parts = [x.strip() for x in label]
    elif delimiter is not None:
        parts = [x.strip() for x in label.split(delimiter)]
    else:
        return label.strip()
    if any(not x for x in parts) and (isinstance(label, list) or label.strip()):
        return None  # "a;;b" or ["a", ""]: a label is missing between the others
    return tuple(sorted({x for x in parts if x}))


def _check(file: Path, rows, delimiter: str | None = None) -> Rows:
    has_split = next(rows)
    out = Rows([], [], [] if has_split else None, array("q"))
    problems: list[str] = []
    count = 0
    seen: set[str] = set()
    names: dict[str, str] = {}  # each distinct label once: a million rows of a few classes share them

    def problem(line: int, text: str) -> None:
        nonlocal count
        count += 1
        if len(problems) < SHOWN:
            problems.append(f"line {line}: {text}")

    for line, path, label, split, error in rows:
        if error:
            problem(line, error)
            continue
        path = path.strip() if isinstance(path, str) else path
        label = _labels(label, delimiter)
        if not isinstance(path, str) or not path:
            problem(line, "empty path" if isinstance(path, str) or path is None else "the path is not a string")
            continue
        rel = relative_path(path)
        if rel is None:
            problem(line, f"path {printable(path)!r} leaves data.root (absolute, or '..'); paths are relative to it")
            continue
        if label is None:
            problem(line, f"an empty label between others for {printable(path)}")
            continue
        if label == "":
            problem(line, f"empty label for {printable(path)}")
            continue
        bad = next((x for x in ((label,) if isinstance(label, str) else label) if printable(x) != x), None)
        if bad is not None:  # a class name travels into checkpoints, plots and terminals
            problem(line, f"label {printable(bad)!r} has control characters")
            continue
        if has_split:
            split = split.strip().lower() if isinstance(split, str) else split
            if split not in SPLITS:
                problem(line, f"split {printable(str(split))!r} is not one of {', '.join(SPLITS)}")
                continue
        if rel in seen:  # (the first line is looked up only for the few problems the message names)
            first = out.lines[out.paths.index(rel)] if len(problems) < SHOWN else 0
            problem(line, f"{printable(rel)} is also on line {first}")
            continue
        seen.add(rel)
        out.paths.append(rel)
        out.labels.append(names.setdefault(label, label))
        out.lines.append(line)
        if has_split:
            out.splits.append(SPLITS[SPLITS.index(split)])
    if count:
        raise UserError(f"data: {file}: {count} bad row(s): {'; '.join(problems)}"
                        f"{f'; and {count - len(problems)} more' if count > len(problems) else ''}. Fix the file")
    if not out.paths:
        raise UserError(f"data: {file} holds no rows")
    out.multi_label = delimiter is not None or any(isinstance(x, tuple) for x in names)
    if out.multi_label:  # (JSON Lines may mix names and lists: a name is a set of one)
        out.labels = [x if isinstance(x, tuple) else (x,) for x in out.labels]
    return out


def relative_path(path: str) -> str | None:
    """``path`` normalised and '/'-separated, or None if it is absolute or climbs out of the root."""
    p = path.replace("\\", "/")
    if p.startswith("/") or (len(p) > 1 and p[1] == ":"):  # POSIX or Windows absolute
        return None
    p = posixpath.normpath(p)
    if p == ".." or p.startswith("../") or p == ".":
        return None
    return p
