"""Writing WebDataset tar shards from image files (``tl-dist data shard``).

Each sample is an image member (its file's bytes, unchanged) and a label member: ``cls`` (the class
index; the names in ``classes.txt``) or, with several labels per image, ``json`` (the list of
names). Keys come from the file's path relative to the source (dots in the file name become
``_``, as a key ends at the first dot), so a message about a key names the file it came from.

The samples keep the source's listing order and the shard boundaries follow from the files' sizes
alone, so writing again gives the same shards: each shard is written to a temp file and renamed
whole (a kill leaves whole shards and a temp file), and a second run skips the shards that are
already there and current (their index says so): an interrupted conversion resumes.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tl_dist.data import shards
from tl_dist.errors import UserError, first_few

TAR_BLOCK = 512


def parse_size(text: str) -> int:
    """'1GB', '500MB', '64MiB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not m:
        raise UserError(f"data shard: --shard-size {text!r} is not a size (e.g. 1GB, 500MB)")
    unit = 1024 if m.group(3) else 1000
    try:
        n = float(m.group(1)) * unit ** (1 + "kmgt".index(m.group(2).lower())) if m.group(2) else float(m.group(1))
    except ValueError:
        raise UserError(f"data shard: --shard-size {text!r} is not a size (e.g. 1GB, 500MB)") from None
    if n < 1:
        raise UserError(f"data shard: --shard-size {text} must be a positive size (e.g. 1GB)")
    return int(n)


def keys_for(rels: list[str]) -> list[str]:
    """Each file's key: its relative path without the extension, dots in the file name as '_'
    (made unique with a '_N' suffix where two files would share one)."""
    seen: set[str] = set()
    out = []
    for rel in rels:
        folder, _, base = rel.rpartition("/")
        stem = base.rsplit(".", 1)[0].replace(".", "_") or "_"
        key = f"{folder}/{stem}" if folder else stem
        k, n = key, 1
        while k in seen:
            k, n = f"{key}_{n}", n + 1
        seen.add(k)
        out.append(k)
    return out


def plan(sizes: list[int], shard_bytes: int) -> list[range]:
    """Consecutive runs of samples whose members fill about ``shard_bytes`` each (at least one)."""
    out, start, used = [], 0, 0
    for i, n in enumerate(sizes):
        need = 3 * TAR_BLOCK + -(-n // TAR_BLOCK) * TAR_BLOCK  # headers, the image's blocks, the label's block
        if used and used + need > shard_bytes:
            out.append(range(start, i))
            start, used = i, 0
        used += need
    if start < len(sizes):
        out.append(range(start, len(sizes)))
    return out


@dataclass
class Written:
    shards: int = 0
    skipped: int = 0  # already there from an earlier run
    samples: int = 0
    bytes: int = 0


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444  # (no times or owners: the same bytes every time)
    tf.addfile(info, io.BytesIO(data))


def write_part(part: str, samples: list[tuple[str, object]], src: Path, classes: list[str], out: Path,
               shard_bytes: int, multi_label: bool, advance: Callable[[int], None]) -> Written:
    """``samples`` (path, class index or indices) as ``out/<part>-NNNNNN.tar`` shards."""
    rels = [os.path.relpath(p, src).replace(os.sep, "/") for p, _ in samples]
    if all(r.startswith(f"{part}/") for r in rels):  # (train/ants/x.jpg: the part is the shard's name already)
        rels = [r[len(part) + 1:] for r in rels]
    keys = keys_for(rels)
    sizes = [os.path.getsize(p) for p, _ in samples]
    done = Written()
    chunks = plan(sizes, shard_bytes)
    extra = [p.name for p in out.glob(f"{part}-*.tar") if not p.name[len(part) + 1:-4].isdigit()
             or int(p.name[len(part) + 1:-4]) >= len(chunks)]
    if extra:
        raise UserError(f"data shard: {out} holds {part} shards this conversion would not write "
                        f"({first_few(sorted(extra), 3)}: another source or --shard-size?); write into a new folder")
    for n, chunk in enumerate(chunks):
        path = out / f"{part}-{n:06d}.tar"
        idx = shards.read_index(path)
        if idx is not None and [s[0] for s in idx["samples"]] == [keys[i] for i in chunk] and not idx["bad"]:
            done.skipped += 1
            advance(len(chunk))
            continue
        tmp = out / f".{path.name}.tmp"
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT if _ascii(keys, chunk)
                              else tarfile.PAX_FORMAT) as tf:
                for i in chunk:
                    p, label = samples[i]
                    ext = os.path.splitext(p)[1].lower().lstrip(".")
                    with open(p, "rb") as img:
                        _member(tf, f"{keys[i]}.{ext}", img.read())
                    if multi_label:
                        _member(tf, f"{keys[i]}.json", json.dumps([classes[c] for c in label]).encode())
                    else:
                        _member(tf, f"{keys[i]}.cls", str(label).encode())
                    advance(1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        shards.write_index(path, shards.index_shard(str(path)))
        done.shards += 1
        done.samples += len(chunk)
        done.bytes += path.stat().st_size
    return done


def _ascii(keys: list[str], chunk: range) -> bool:
    return all(keys[i].isascii() and len(keys[i]) < 90 for i in chunk)


def check_out(out: Path) -> None:
    """``out`` must be a new or empty folder, or one this command wrote (shards, their indexes, the
    class list): it never overwrites anything else."""
    if out.exists() and not out.is_dir():
        raise UserError(f"data shard: {out} is a file; OUT must be a folder (new, empty, or earlier shards)")
    if not out.is_dir():
        return
    ours = re.compile(r"(train|val|test)-\d{6}\.tar(\.idx\.json)?|\.(train|val|test)-\d{6}\.tar\.tmp|"
                      + re.escape(shards.CLASS_LIST))
    foreign = [e.name for e in os.scandir(out) if not ours.fullmatch(e.name) and not
               (e.name.startswith(".") and e.name.endswith(".tmp"))]
    if foreign:
        raise UserError(f"data shard: {out} holds other files ({first_few(sorted(foreign), 3)}); write the shards "
                        f"into a new or empty folder")


def write_classes(out: Path, classes: list[str]) -> None:
    from tl_dist.files.atomic import atomic_write_text

    p = out / shards.CLASS_LIST
    text = "".join(f"{c}\n" for c in classes)
    if p.exists() and p.read_text(encoding="utf-8") != text:
        raise UserError(f"data shard: {p} lists other classes (earlier shards of another data set?); write into "
                        f"a new or empty folder")
    atomic_write_text(p, text)
