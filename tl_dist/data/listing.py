"""What a data set holds: its classes and the (path, class) samples of each part, from any of the
layouts (train/ and val/ folders; one folder of class folders split by data.val_split; a labels
file), listed in an order that does not depend on the file system; and an identity ranks compare."""
from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tl_dist.config import DataConfig
from tl_dist.data import labels_file, splits
from tl_dist.data.images import FILES, IMAGE_EXTENSIONS, Files, list_images
from tl_dist.errors import UserError, printable

Sample = tuple[str, "int | tuple[int, ...]"]  # (path, class index; with several labels per image, the indices)


def class_folders(d: Path) -> tuple[list[str], list[Sample]]:
    """ImageFolder's layout: d/<class>/<image>. Returns (classes, samples), sorted."""
    # (__MACOSX: the resource forks macOS's zip puts beside the real folders)
    classes = sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith(".")
                     and e.name != "__MACOSX")
    for c in classes:
        if printable(c) != c:  # the name would reach terminals, checkpoints and plots as it is
            raise UserError(f"data: class folder {d / c} has control characters in its name; rename it")
    if not classes:
        raise UserError(f"data: {d} has no class sub-folders (expected {d}/<class>/<image>)")
    samples = [(path, ci) for ci, c in enumerate(classes) for path in list_images(os.path.join(d, c))]
    present = {ci for _, ci in samples}
    empty = [c for ci, c in enumerate(classes) if ci not in present]
    if samples and empty:
        raise UserError(f"data: class folder(s) under {d} with no image files: {', '.join(empty[:5])}"
                        f"{' ...' if len(empty) > 5 else ''}; add images or remove the folder(s)")
    if not samples:
        raise UserError(f"data: {d} is empty: no image files ({', '.join(IMAGE_EXTENSIONS)}) "
                        f"under its class folders")
    return classes, samples


def list_split(root: Path, split: str) -> tuple[list[str], list[Sample]]:
    """root/split/<class>/<image>: (classes, samples), sorted."""
    d = root / split
    if not d.is_dir():
        raise UserError(f"data: split folder not found: {d} (data.root must hold train/ and val/, "
                        f"one sub-folder per class; or set data.val_split to make val from one folder)")
    return class_folders(d)


def data_root(root: str) -> Path:
    r = Path(root).expanduser()
    if not r.is_dir():
        raise UserError(f"data: data.root not found: {r} (a folder holding train/ and val/, or one folder of "
                        f"class sub-folders with data.val_split, or a labels file's images; see docs/data.md)")
    return r


def list_splits(root: str) -> tuple[list[str], list[Sample], list[Sample]]:
    """The tutorial's layout: root/train/<class>/ and root/val/<class>/ with the same classes."""
    r = data_root(root)
    train_classes, train = list_split(r, "train")
    val_classes, val = list_split(r, "val")
    if train_classes != val_classes:
        only_t = sorted(set(train_classes) - set(val_classes))
        only_v = sorted(set(val_classes) - set(train_classes))
        raise UserError(f"data: train and val must have the same classes under {r}: "
                        f"only in train: {only_t or 'none'}; only in val: {only_v or 'none'}")
    check_classes(train_classes, f"{r}/train")
    return train_classes, train, val


def check_classes(classes: list[str], where: str) -> None:
    if len(classes) < 2:
        raise UserError(f"data: {where} has {len(classes)} class; a classifier needs at least 2")


@dataclass
class DataSet:
    """What the data set gives a run: its classes and the (path, class index) samples of each part."""
    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample] = field(default_factory=list)
    layout: str = "folders"  # folders | one folder + val_split | labels file
    split: dict | None = None  # split.json's content, where the parts were drawn (here or by an earlier segment)
    note: str | None = None  # for the run's log: how a kept split differs from what the data would give now
    rows: labels_file.Rows | None = None  # the labels file's rows (their line numbers name bad files)
    root: str = ""
    multi_label: bool = False  # several labels per image (each sample's label a tuple of class indices)
    reader: Files = FILES  # where the samples' images come from: files, tar shards, a dataset's rows
    bad: dict[str, str] = field(default_factory=dict)  # samples the source's index found unusable, and why

    def as_multi_label(self) -> None:
        """Every label as a set of one (train.task=multi_label on data with one label per image)."""
        if not self.multi_label:
            for part in ("train", "val", "test"):
                setattr(self, part, [(p, (c,)) for p, c in getattr(self, part)])
            self.multi_label = True

    def line_numbers(self, paths) -> dict[str, str]:
        """``labels.csv line N`` for each of ``paths`` that came from the labels file."""
        if self.rows is None:
            return {}
        wanted = {os.path.relpath(p, self.root).replace(os.sep, "/"): p for p in paths}
        return {wanted[rel]: f"line {line}" for rel, line in zip(self.rows.paths, self.rows.lines) if rel in wanted}


def list_data(cfg: DataConfig, recorded: dict | None = None) -> DataSet:
    """The data set ``cfg`` describes: train/ and val/ folders, one folder of class folders split by
    data.val_split, or a labels file (with a split column, or split by data.val_split). Where the
    parts are drawn, ``recorded`` (an earlier segment's split.json) is kept instead of a new draw.
    data.format=wds and hf: tar shards and a Hugging Face dataset (their own modules)."""
    if cfg.format == "wds":
        from tl_dist.data import shards
        return shards.list_shards(cfg, recorded)
    if cfg.format == "hf":
        from tl_dist.data import hf_dataset
        return hf_dataset.list_dataset(cfg, recorded)
    r = data_root(cfg.root)
    if cfg.labels:
        return _from_labels_file(cfg, r, recorded)
    if cfg.val_split == 0:
        classes, train, val = list_splits(cfg.root)
        return DataSet(classes, train, val, root=str(r))
    if (r / "val").is_dir():
        raise UserError(f"data: data.val_split={cfg.val_split:g} makes val from one folder, but {r} holds val/ "
                        f"already; set data.val_split=0 to use it, or point data.root at the one folder")
    pool = r / "train" if (r / "train").is_dir() else r
    classes, samples = class_folders(pool)
    check_classes(classes, str(pool))
    rels = [(os.path.relpath(path, r).replace(os.sep, "/"), ci) for path, ci in samples]
    return _drawn(cfg, r, classes, rels, recorded, "one folder + val_split")


def _from_labels_file(cfg: DataConfig, r: Path, recorded: dict | None) -> DataSet:
    file = r / cfg.labels
    rows = labels_file.read(file, cfg.path_column, cfg.label_column, cfg.split_column, cfg.label_delimiter)
    names = [(line, x) for line, label in zip(rows.lines, rows.labels)
             for x in (label if rows.multi_label else (label,))]
    if cfg.classes:
        classes = list(cfg.classes)
        known = set(classes)
        unknown = [(line, x) for line, x in names if x not in known]
        if unknown:
            named = "; ".join(f"line {line}: {printable(x)!r}" for line, x in unknown[:5])
            raise UserError(f"data: {file}: {len(unknown)} label(s) data.classes does not list: {named}; "
                            f"add them to data.classes or fix the rows")
    else:
        classes = sorted({x for _, x in names})
    del names
    check_classes(classes, str(file))
    index = {c: i for i, c in enumerate(classes)}
    if rows.multi_label:
        index = {label: tuple(index[x] for x in label) for label in set(rows.labels)}
    if rows.splits is not None:
        if cfg.val_split > 0:
            raise UserError(f"data: {file} has a split column ({cfg.split_column!r}) and data.val_split is "
                            f"{cfg.val_split:g}; use one: data.val_split=0 (the column), or another "
                            f"data.split_column")
        parts: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
        for rel, label, split in zip(rows.paths, rows.labels, rows.splits):
            parts[split].append((os.path.join(str(r), rel), index[label]))
        for part in ("train", "val"):
            if not parts[part]:
                raise UserError(f"data: {file}: no row has {cfg.split_column}={part}; a run needs train and val rows")
        return DataSet(classes, parts["train"], parts["val"], parts["test"], "labels file", rows=rows, root=str(r),
                       multi_label=rows.multi_label)
    if cfg.val_split == 0:
        raise UserError(f"data: {file} has no split column ({cfg.split_column!r}); set data.val_split (e.g. 0.2) to "
                        f"make val from its rows, or name the column with data.split_column")
    rels = [(rel, index[label]) for rel, label in zip(rows.paths, rows.labels)]
    data = _drawn(cfg, r, classes, rels, recorded, "labels file")
    data.rows, data.multi_label = rows, rows.multi_label
    return data


def _drawn(cfg: DataConfig, r: Path, classes: list[str], rels: list, recorded: dict | None, layout: str) -> DataSet:
    """Parts drawn from ``rels`` by data.val_split / test_split / split_seed, or the recorded ones."""
    fresh = splits.draw(rels, len(classes), cfg.val_split, cfg.test_split, cfg.split_seed)
    note = None
    if recorded is not None:
        parts = splits.from_record(recorded, classes, "split.json")
        if parts != fresh:
            kept = {rel for part in parts.values() for rel, _ in part}
            listed = {rel for rel, _ in rels}
            new, gone = len(listed - kept), len(kept - listed)
            why = (f"{new} image(s) not in the recorded split are left out, {gone} recorded image(s) are no "
                   f"longer there" if new or gone else "the same images would be drawn into other parts")
            note = f"note: the data would split differently now ({why}); the run keeps its split (split.json)"
        record = recorded
    else:
        parts, record = fresh, splits.record(fresh, classes, cfg.val_split, cfg.test_split, cfg.split_seed, layout)
    for part in ("train", "val"):
        if not parts[part]:
            raise UserError(f"data: data.val_split={cfg.val_split:g} leaves no {part} images from {len(rels)} "
                            f"(each class keeps at least one train image); use more images or another fraction")
    absolute = {name: [(os.path.join(str(r), rel), ci) for rel, ci in part] for name, part in parts.items()}
    return DataSet(classes, absolute["train"], absolute["val"], absolute["test"], layout, record, note, root=str(r))


CONTENT_CHECK_FILES = 50_000  # up to this many images, ranks compare their bytes too (ends of each file)


def identity(root: str, classes: list[str], train: list[Sample], val: list[Sample], deep: bool,
             reader: Files = FILES) -> dict:
    """What this process sees under ``root``, to compare across processes (machines may hold
    different copies of a data set): the classes, each split's count and a hash of its relative
    paths and labels; with ``deep``, a hash of every file's size, and up to CONTENT_CHECK_FILES
    images a hash of their first and last kB too (pixels that differ change the compressed bytes
    at the end of the file, where the data is)."""
    import hashlib

    r = str(Path(root).expanduser())
    out: dict = {"classes": classes}
    everything = train + val
    for split, samples in (("train", train), ("val", val)):
        h = hashlib.blake2b(digest_size=12)
        for path, label in samples:
            h.update(f"{os.path.relpath(path, r)}\0{label}\n".encode("utf-8", "surrogateescape"))
        out[split] = {"images": len(samples), "names": h.hexdigest()}
    if not deep:
        return out
    if reader is not FILES:  # (shards: each shard file's size; a dataset: its splits' fingerprints)
        what, digest = reader.content()
        out["content"] = {"hash": digest, "what": what}
        return out

    def ends(path: str) -> bytes:
        try:
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode) or len(everything) > CONTENT_CHECK_FILES:
                return f"{st.st_mode >> 12}:{st.st_size}".encode()  # (a pipe is never opened: it would wait)
            with open(path, "rb") as f:
                head = f.read(1024)
                f.seek(max(0, st.st_size - 1024))
                return f"{st.st_size}:".encode() + head + f.read()
        except OSError as e:
            return f"unreadable {e.errno}".encode()
    with ThreadPoolExecutor(min(32, (os.cpu_count() or 1) * 4)) as pool:
        h = hashlib.blake2b(digest_size=12)
        for b in pool.map(ends, [p for p, _ in everything], chunksize=64):
            h.update(hashlib.blake2b(b, digest_size=12).digest())
    out["content"] = {"hash": h.hexdigest(),
                      "what": "file sizes" if len(everything) > CONTENT_CHECK_FILES else "file sizes and bytes"}
    return out
