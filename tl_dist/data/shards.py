"""WebDataset tar shards as a data source (``data.format: wds``), read by random access.

A shard is a plain tar file; a sample is the run of consecutive members that share a key (the
member's path up to the first dot of its file name): an image (``jpg``, ``png``, ``webp``, ...) and
a label, ``cls`` (a class index), ``txt`` (a class name; several with ``data.label_delimiter``) or
``json`` (a name, a list of names, a class index, or an object holding one under
``data.label_column``). This is the layout ``webdataset``'s ``ShardWriter`` and ``tl-dist data
shard`` write.

Streaming readers cannot give tl_dist's guarantees (every sample exactly once per epoch over all
ranks, the same global order for any world size, a resume mid-run), so shards are indexed instead:
each member's offset and size, read from the tar headers once (a shard of 1 GB in a fraction of a
second), then every image is one ``pread``. ``tl-dist data shard`` and ``tl-dist data index`` write
the index beside each shard (``<shard>.idx.json``); without one, the index is built at start-up, in
memory, and nothing is written beside the user's shards.
"""
from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from multiprocessing import get_context
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tl_dist.config import DataConfig
from tl_dist.data.images import BadImage, decode_bytes, inspect_bytes
from tl_dist.errors import UserError, first_few, printable

INDEX_FORMAT = "tl_dist-shard-index/1"
INDEX_SUFFIX = ".idx.json"
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff", "pgm")
LABEL_MEMBERS = ("cls", "txt", "json")
CLASS_LIST = "classes.txt"  # beside the shards: the class names, one a line, in the order of cls indices


# ----------------------------------------------------------------------------- finding shards

def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar; ``{a,b}`` alternatives; nested and
    several groups, as the shell (and webdataset's braceexpand) expand them."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = r.group(1), r.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        return [head + "{" + body + "}" + x for x in expand_braces(tail)]
    return [x for item in items for x in expand_braces(head + item + tail)]


def find(root: Path, pattern: str, key: str) -> list[Path]:
    """The shard files ``pattern`` names under ``root``, in order (braces in the written order,
    glob matches sorted). A brace pattern must find every file it names."""
    names = expand_braces(pattern)
    if len(names) > 1 or "{" in pattern:
        paths = [root / n for n in names]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise UserError(f"data: {key}={pattern!r}: {len(missing)} of {len(paths)} shard(s) not found: "
                            f"{first_few(missing, 3)}; fix the pattern or copy the shards")
        return paths
    return [Path(p) for p in sorted(glob.glob(str(root / pattern))) if Path(p).is_file()]


# ----------------------------------------------------------------------------- indexing one shard

def index_shard(path: str) -> dict:
    """Every sample of the tar file ``path``: [key, image extension, offset, size, label] rows, and
    [key, why] for the samples that cannot be used. Reads the headers and the (small) label members
    only. A shard that ends early keeps the samples before the damage and names it."""
    samples, bad = [], []
    st = os.stat(path)
    size = st.st_size
    current: dict | None = None

    def close(s: dict | None) -> None:
        if s is None:
            return
        key = s["key"]
        if s.get("problem"):
            bad.append([key, s["problem"]])
        elif "image" not in s:
            bad.append([key, f"no image member ({'/'.join(IMAGE_MEMBERS[:4])}, ...)"])
        elif "label" not in s:
            bad.append([key, "no label member (cls, txt or json)"])
        else:
            ext, off, n = s["image"]
            samples.append([key, ext, off, n, s["label"]])

    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = split_name(m.name)
                if ext is None:
                    continue  # (a stray file without an extension: not part of any sample)
                if current is None or current["key"] != key:
                    close(current)
                    current = {"key": key}
                if m.offset_data + m.size > size:
                    current["problem"] = "the shard ends inside this sample (truncated shard)"
                    break
                ext = ext.lower()
                if ext in IMAGE_MEMBERS:
                    if "image" in current:
                        current["problem"] = f"two images ({current['image'][0]} and {ext})"
                    current["image"] = (ext, m.offset_data, m.size)
                elif ext in LABEL_MEMBERS and "label" not in current:
                    f.seek(m.offset_data)
                    current["label"] = label_value(ext, f.read(m.size)) if m.size < 1 << 16 else \
                        _Problem(f"{ext} label of {m.size} bytes")
                    if isinstance(current["label"], _Problem):
                        current["problem"] = current.pop("label").why
    except (tarfile.TarError, EOFError, OSError) as e:
        close(current)
        current = None
        bad.append(["", f"the shard is damaged after {len(samples) + len(bad)} sample(s) ({e}); the rest of it "
                        f"cannot be read"])
    close(current)
    return {"format": INDEX_FORMAT, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "samples": samples, "bad": bad}


@dataclass
class _Problem:
    why: str


def split_name(name: str) -> tuple[str, str | None]:
    """A member's (key, extension) as WebDataset reads them: the extension starts at the first dot
    of the file name (``a/b.seg.png`` is key ``a/b``, extension ``seg.png``)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return name, None
    return (f"{folder}/{stem}" if folder else stem), ext


def label_value(ext: str, raw: bytes):
    """A label member's value: an int (cls), a string (txt), or what the JSON holds."""
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return _Problem(f"the {ext} label is not UTF-8 text")
    if ext == "cls":
        try:
            return int(text)
        except ValueError:
            return _Problem(f"the cls label {printable(text[:40])!r} is not a class index")
    if ext == "txt":
        return text
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _Problem("the json label is not valid JSON")


def read_index(shard: Path) -> dict | None:
    """The index written beside ``shard``, if it is there and describes the shard as it is now."""
    p = Path(str(shard) + INDEX_SUFFIX)
    try:
        idx = json.loads(p.read_text(encoding="utf-8"))
        st = shard.stat()
    except (OSError, ValueError):
        return None
    if not isinstance(idx, dict) or idx.get("format") != INDEX_FORMAT or idx.get("size") != st.st_size \
            or idx.get("mtime_ns") != st.st_mtime_ns:
        return None
    return idx


def write_index(shard: Path, idx: dict) -> None:
    from tl_dist.files.atomic import atomic_write_text

    atomic_write_text(Path(str(shard) + INDEX_SUFFIX), json.dumps(idx, separators=(",", ":")) + "\n")


def indexes(shards: list[Path]) -> list[dict]:
    """Each shard's index: the one beside it where current, else built (in parallel processes when
    there are many: the headers are parsed in Python)."""
    out: list[dict | None] = [read_index(s) for s in shards]
    todo = [i for i, x in enumerate(out) if x is None]
    if len(todo) > 4 and (os.cpu_count() or 1) > 1:
        # (spawned, not forked: the caller may hold threads, a process group, a GPU context)
        with ProcessPoolExecutor(min(len(todo), os.cpu_count() or 1), mp_context=get_context("spawn")) as pool:
            for i, idx in zip(todo, pool.map(index_shard, [str(shards[i]) for i in todo], chunksize=4)):
                out[i] = idx
    else:
        for i in todo:
            out[i] = index_shard(str(shards[i]))
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- reading

class ShardReader:
    """A sample's image by its name (``<shard path>/<key>``): one positioned read from the shard.

    Picklable for loader workers: the open files stay behind and each process opens its own."""

    def __init__(self) -> None:
        self.shards: list[str] = []
        self.where: dict[str, int] = {}  # sample name -> row of the arrays below
        self._shard, self._offset, self._size = [], [], []
        self._files: dict[int, int] = {}

    def add(self, shard: str, key: str, offset: int, size: int) -> str:
        if not self.shards or self.shards[-1] != shard:
            self.shards.append(shard)
        name = f"{shard}/{key}"
        self.where[name] = len(self._shard)
        self._shard.append(len(self.shards) - 1)
        self._offset.append(offset)
        self._size.append(size)
        return name

    def freeze(self) -> None:
        """Lists to arrays (a million samples: 20 MB instead of 100)."""
        self._shard = np.asarray(self._shard, dtype=np.int32)
        self._offset = np.asarray(self._offset, dtype=np.int64)
        self._size = np.asarray(self._size, dtype=np.int64)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}

    def __del__(self) -> None:
        for fd in getattr(self, "_files", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def read(self, name: str) -> bytes:
        row = self.where[name]
        s = int(self._shard[row])
        fd = self._files.get(s)
        if fd is None:
            try:
                fd = self._files[s] = os.open(self.shards[s], os.O_RDONLY)
            except OSError as e:
                raise BadImage(f"{display(name)}: cannot open the shard: {e.strerror}") from None
        size = int(self._size[row])
        try:
            data = os.pread(fd, size, int(self._offset[row]))
        except OSError as e:
            raise BadImage(f"{display(name)}: unreadable: {e.strerror}") from None
        if len(data) != size:
            raise BadImage(f"{display(name)}: the shard is shorter than its index (changed since it was indexed?)")
        return data

    def load(self, name: str) -> Image.Image:
        return decode_bytes(self.read(name), display(name))

    def content(self) -> tuple[str, str]:
        """What ranks on other machines compare: each shard's name and size."""
        import hashlib
        h = hashlib.blake2b(digest_size=12)
        for s in self.shards:
            h.update(f"{os.path.basename(s)}\0{os.path.getsize(s)}\n".encode("utf-8", "surrogateescape"))
        return "shard sizes", h.hexdigest()

    def inspect(self, name: str) -> tuple[int, int, int]:
        return inspect_bytes(self.read(name), display(name))


def display(name: str) -> str:
    """``/data/train-000003.tar/ants/0001`` -> ``train-000003.tar key ants/0001`` (for messages)."""
    shard, sep, key = name.partition(".tar/")
    return f"{os.path.basename(shard)}.tar key {key}" if sep else name


# ----------------------------------------------------------------------------- listing

def class_list(root: Path, cfg: DataConfig) -> list[str] | None:
    """The class names: data.classes, else classes.txt beside the shards, else None (from the labels)."""
    if cfg.classes:
        return list(cfg.classes)
    p = root / CLASS_LIST
    if not p.is_file():
        return None
    try:
        names = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"data: cannot read {p}: {e}") from None
    if len(set(names)) != len(names) or any(printable(n) != n for n in names):
        raise UserError(f"data: {p} must list distinct class names without control characters, one a line")
    return names


def label_names(raw, cfg: DataConfig, classes: list[str] | None):
    """A label value as class names: a name, or a sorted tuple of names (several per image); a
    ``_Problem`` where it cannot be one."""
    if isinstance(raw, dict):
        if cfg.label_column not in raw:
            return _Problem(f"the json label has no {cfg.label_column!r} (set data.label_column)")
        raw = raw[cfg.label_column]
    if isinstance(raw, bool):
        return _Problem("the label is true/false, not a class")
    if isinstance(raw, int):
        if classes is None:
            return _Problem(f"a class index ({raw}) needs the class names: put {CLASS_LIST} beside the shards "
                            f"or set data.classes")
        if not 0 <= raw < len(classes):
            return _Problem(f"class index {raw} is outside the {len(classes)} classes")
        return classes[raw]
    if isinstance(raw, str):
        if cfg.label_delimiter is not None:
            parts = [x.strip() for x in raw.split(cfg.label_delimiter)]
            if any(not x for x in parts) and raw.strip():
                return _Problem("an empty label between others")
            return tuple(sorted({x for x in parts if x}))
        return raw.strip() or _Problem("empty label")
    if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        return tuple(sorted({x.strip() for x in raw if x.strip()}))
    return _Problem(f"the label is {type(raw).__name__}, not a class name, index or list of names")


@dataclass
class Part:
    names: list[str]
    labels: list  # class names (or tuples of them)


def list_shards(cfg: DataConfig, recorded: dict | None = None):
    """The DataSet of shards under data.root: train (and test) from their patterns; val from its
    shards, or drawn from train's by data.val_split (keeping ``recorded``, as for image folders)."""
    from tl_dist.data import listing

    root = listing.data_root(cfg.root)
    train_shards = find(root, cfg.train_shards, "data.train_shards")
    if not train_shards:
        raise UserError(f"data: no train shards under {root} match data.train_shards={cfg.train_shards!r} "
                        f"(write shards with tl-dist data shard, or set the pattern)")
    val_shards = find(root, cfg.val_shards, "data.val_shards")
    test_shards = find(root, cfg.test_shards, "data.test_shards")
    if val_shards and cfg.val_split > 0:
        raise UserError(f"data: data.val_split={cfg.val_split:g} draws val from the train shards, but {root} holds "
                        f"val shards ({cfg.val_shards}); set data.val_split=0 to use them")
    if not val_shards and cfg.val_split == 0:
        raise UserError(f"data: no val shards under {root} match data.val_shards={cfg.val_shards!r}; set "
                        f"data.val_split (e.g. 0.1) to draw val from the train shards, or set the pattern")
    classes = class_list(root, cfg)
    reader = ShardReader()
    bad: dict[str, str] = {}
    parts = {}
    every = train_shards + val_shards + test_shards
    index_of_shard = dict(zip(every, indexes(every)))  # (one pool for all parts' shards)
    for part, shards in (("train", train_shards), ("val", val_shards), ("test", test_shards)):
        names, labels = [], []
        noted = bad if part != "test" else {}  # (training never reads test: its problems wait for evaluate)
        for shard, idx in ((s, index_of_shard[s]) for s in shards):
            for key, why in idx["bad"]:
                noted[f"{shard}/{key}" if key else str(shard)] = f"{display(f'{shard}/{key}')}: {why}"
            for key, _ext, off, size, raw in idx["samples"]:
                label = label_names(raw, cfg, classes)
                if classes is None and isinstance(raw, int) and not isinstance(raw, bool):
                    raise UserError(f"data: {display(f'{shard}/{key}')}: a class index ({raw}) needs the class "
                                    f"names: put {CLASS_LIST} beside the shards (one name a line, in index order) "
                                    f"or set data.classes")
                if isinstance(label, _Problem):
                    noted[f"{shard}/{key}"] = f"{display(f'{shard}/{key}')}: {label.why}"
                    continue
                names.append(reader.add(str(shard), key, off, size))
                labels.append(label)
        parts[part] = Part(names, labels)
    reader.freeze()
    multi = any(isinstance(x, tuple) for p in parts.values() for x in p.labels) or cfg.label_delimiter is not None
    if classes is None:
        found = {x for p in parts.values() for label in p.labels for x in (label if isinstance(label, tuple) else
                                                                            (label,))}
        classes = sorted(found)
    known = {c: i for i, c in enumerate(classes)}
    for which, part in parts.items():  # a name the class list does not hold is a bad sample, as a missing label
        keep = []
        for name, label in zip(part.names, part.labels):
            unknown = next((x for x in (label if isinstance(label, tuple) else (label,)) if x not in known), None)
            if unknown is not None:
                (bad if which != "test" else {})[name] = f"{display(name)}: label {printable(unknown)!r} is not in the class list " \
                            f"({'data.classes' if cfg.classes else CLASS_LIST})"
            else:
                keep.append((name, label))
        part.names = [n for n, _ in keep]
        part.labels = [lab for _, lab in keep]
    listing.check_classes(classes, str(root))

    def index_of(label):
        if multi:
            return tuple(sorted(known[x] for x in (label if isinstance(label, tuple) else (label,))))
        return known[label]

    samples = {name: [(n, index_of(lab)) for n, lab in zip(p.names, p.labels)] for name, p in parts.items()}
    if not samples["train"]:
        raise UserError(f"data: the train shards under {root} hold no usable sample "
                        f"({first_few(list(bad.values()), 3) if bad else 'they are empty'})")
    if val_shards:
        if not samples["val"]:
            raise UserError(f"data: the val shards under {root} hold no usable sample")
        out = listing.DataSet(classes, samples["train"], samples["val"], samples["test"], "shards", root=str(root))
    else:
        rels = [(os.path.relpath(n, root).replace(os.sep, "/"), y) for n, y in samples["train"]]
        out = listing._drawn(cfg, root, classes, rels, recorded, "shards + val_split")
        missing = [n for part in (out.train, out.val, out.test) for n, _ in part if n not in reader.where]
        if missing:  # (a recorded split naming samples the shards no longer hold)
            raise UserError(f"data: the run's split.json names {len(missing)} sample(s) the shards no longer hold "
                            f"({first_few([display(n) for n in missing], 3)}); train into another "
                            f"train.output_dir (a new split) or restore the shards")
        if samples["test"]:
            if out.test:
                raise UserError(f"data: data.test_split={cfg.test_split:g} draws test from the train shards, but "
                                f"{root} holds test shards ({cfg.test_shards}); use one")
            out.test = samples["test"]
    out.multi_label, out.reader, out.bad = multi, reader, bad
    return out
