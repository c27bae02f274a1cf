"""A Hugging Face ``datasets`` dataset as a data source (``data.format: hf``; ``pip install -e '.[hf]'``).

``data.root`` is a ``save_to_disk`` folder, a folder of Parquet or Arrow files, or a Hub dataset
name (downloaded by ``datasets`` into its own cache when online). The dataset's ``train`` split
trains; ``validation`` (or ``val`` / ``valid``) validates, or ``data.val_split`` draws val from
train; ``test`` is what ``tl-dist evaluate --split test`` measures. The image column
(``data.image_column``) is read as the encoded bytes it stores (``Image(decode=False)``), so every
image is decoded by the same code as an image file; the label column (``data.label_column``) is a
``ClassLabel`` (its names are the classes), a class name, or a list of either (several labels per
image: multi_label).

A sample's name is ``<data.root>/<split>/<row>``: what messages, split.json and the fingerprint use.
"""
from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from tl_dist.config import DataConfig
from tl_dist.data.images import BadImage, decode_bytes, inspect_bytes, inspect_file, load_rgb
from tl_dist.errors import UserError, first_few, one_line, printable

VAL_NAMES = ("validation", "val", "valid")


def _datasets():
    try:
        import datasets
    except ImportError:
        raise UserError("data: data.format=hf needs Hugging Face datasets: pip install -e '.[hf]' "
                        "(or pip install datasets)") from None
    return datasets


def open_dataset(root: str) -> dict:
    """{split name: Dataset} of ``root``: a save_to_disk folder, a folder of Parquet / Arrow files,
    or a Hub name. One line for anything that cannot be opened, naming it and what to do."""
    datasets = _datasets()
    p = Path(root).expanduser()
    try:
        if p.is_dir():
            if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
                ds = datasets.load_from_disk(str(p))
            else:
                files = sorted(f for f in p.rglob("*") if f.suffix in (".parquet", ".arrow"))
                if not files:
                    raise UserError(f"data: {p} holds no Hugging Face dataset (no dataset_dict.json / state.json "
                                    f"from save_to_disk, no .parquet or .arrow files); see docs/data.md")
                kind = "parquet" if files[0].suffix == ".parquet" else "arrow"
                ds = datasets.load_dataset(kind, data_dir=str(p))
        elif p.exists() or root.startswith((".", "/", "~")) or root.count("/") > 1:
            raise UserError(f"data: data.root={root} is not a folder (a save_to_disk folder, Parquet / Arrow "
                            f"files, or a Hub name such as user/name)")
        else:
            ds = datasets.load_dataset(root)
    except UserError:
        raise
    except Exception as e:  # (datasets raises many kinds: offline, not found, a bad file, a gated repo)
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        hint = ("the Hub is not reachable (offline); download it on a machine with internet "
                "(datasets.load_dataset(...).save_to_disk(DIR)) and set data.root=DIR"
                if offline or "offline" in str(e).lower() or "connect" in str(e).lower() else
                "check the name or folder, and that it is a datasets dataset")
        raise UserError(f"data: cannot open the Hugging Face dataset {root!r} ({type(e).__name__}: "
                        f"{one_line(str(e))[:200]}); {hint}") from None
    if isinstance(ds, datasets.Dataset):
        return {"train": ds}
    return dict(ds)


class RowReader:
    """A sample's image by its name (``<root>/<split>/<row>``): the row's encoded bytes (or the
    file an image feature points at), decoded as an image file would be. Picklable for loader
    workers (a dataset pickles as the Arrow files it maps)."""

    def __init__(self, parts: dict, column: str):
        self.parts, self.column = parts, column
        self._columns: dict = {}  # split -> its image column as Arrow (made in each process, never pickled)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_columns": {}}

    def _row(self, split: str, row: int):
        """The row's image cell: straight from the memory-mapped Arrow column (microseconds), or
        through the dataset where it has an indices mapping (a select / shuffle not yet flattened)."""
        if split not in self._columns:
            ds = self.parts[split]
            self._columns[split] = ds.data.column(self.column) if getattr(ds, "_indices", None) is None else None
        column = self._columns[split]
        return column[row].as_py() if column is not None else self.parts[split][row][self.column]

    def _cell(self, name: str):
        _, split, row = name.rsplit("/", 2)
        try:
            cell = self._row(split, int(row))
        except Exception as e:  # (a damaged Arrow file, a row past the end)
            raise BadImage(f"{display(name)}: unreadable row ({type(e).__name__}: {one_line(str(e))[:120]})") \
                from None
        if isinstance(cell, dict) and cell.get("bytes"):
            return cell["bytes"], None
        if isinstance(cell, dict) and cell.get("path"):
            return None, cell["path"]
        if isinstance(cell, (bytes, bytearray)) and cell:
            return bytes(cell), None
        raise BadImage(f"{display(name)}: no image in column {self.column!r}")

    def content(self) -> tuple[str, str]:
        """What ranks on other machines compare: each split's fingerprint (datasets derives it
        from the data the split holds)."""
        import hashlib
        h = hashlib.blake2b(digest_size=12)
        for split in sorted(self.parts):
            h.update(f"{split}\0{getattr(self.parts[split], '_fingerprint', '')}\n".encode())
        return "dataset fingerprints", h.hexdigest()

    def load(self, name: str) -> Image.Image:
        data, path = self._cell(name)
        return decode_bytes(data, display(name)) if data is not None else load_rgb(path)

    def inspect(self, name: str) -> tuple[int, int, int]:
        data, path = self._cell(name)
        return inspect_bytes(data, display(name)) if data is not None else inspect_file(path)


def display(name: str) -> str:
    """``/data/beans/train/12`` -> ``train row 12`` (for messages)."""
    _, split, row = name.rsplit("/", 2)
    return f"{split} row {row}"


def _label_feature(ds, column: str, root: str):
    if column not in ds.features:
        raise UserError(f"data: the dataset {root} has no column {column!r} (its columns: "
                        f"{first_few(list(ds.features), 8)}); name the label column with data.label_column")
    return ds.features[column]


def _class_names(feature) -> tuple[list[str] | None, bool]:
    """(ClassLabel names or None, several labels per image) of a label feature."""
    datasets = _datasets()
    inner = getattr(feature, "feature", None)
    if isinstance(feature, (list, getattr(datasets, "Sequence", tuple), getattr(datasets, "List", tuple))) \
            or inner is not None:
        element = feature[0] if isinstance(feature, list) else inner
        return (list(element.names) if isinstance(element, datasets.ClassLabel) else None), True
    return (list(feature.names) if isinstance(feature, datasets.ClassLabel) else None), False


def list_dataset(cfg: DataConfig, recorded: dict | None = None):
    """The DataSet of the dataset at data.root (see the module's docstring)."""
    from tl_dist.data import listing

    datasets = _datasets()
    parts = open_dataset(cfg.root)
    if "train" not in parts:
        raise UserError(f"data: the dataset {cfg.root} has no train split (its splits: {', '.join(parts)})")
    val_name = next((n for n in VAL_NAMES if n in parts), None)
    if val_name and cfg.val_split > 0:
        raise UserError(f"data: data.val_split={cfg.val_split:g} draws val from train, but the dataset has a "
                        f"{val_name!r} split; set data.val_split=0 to use it")
    if not val_name and cfg.val_split == 0:
        raise UserError(f"data: the dataset {cfg.root} has no validation split (its splits: {', '.join(parts)}); "
                        f"set data.val_split (e.g. 0.1) to draw val from train")
    wanted = {"train": "train", "val": val_name, "test": "test" if "test" in parts else None}
    root = str(Path(cfg.root).expanduser()) if Path(cfg.root).expanduser().is_dir() else cfg.root
    names, multi = None, False
    for split in (s for s in wanted.values() if s):
        ds = parts[split]
        if cfg.image_column not in ds.features:
            raise UserError(f"data: the dataset {cfg.root} ({split}) has no column {cfg.image_column!r} (its columns: "
                            f"{first_few(list(ds.features), 8)}); name the image column with data.image_column")
        names_here, multi_here = _class_names(_label_feature(ds, cfg.label_column, cfg.root))
        names, multi = names or names_here, multi or multi_here
    # Bytes, not PIL images: every image is decoded by the same code as a file (and only when used).
    for split in list(parts):
        ds = parts[split].select_columns([cfg.image_column, cfg.label_column])
        if isinstance(ds.features[cfg.image_column], datasets.Image):
            ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
        parts[split] = ds
    classes = list(cfg.classes) if cfg.classes else names
    raw = {part: parts[split].data.column(cfg.label_column).to_pylist() if split else []
           for part, split in wanted.items()}
    if classes is None:
        found = {x for labels in raw.values() for label in labels
                 for x in (label if isinstance(label, list) else [label])}
        if any(not isinstance(x, str) for x in found):
            raise UserError(f"data: the label column {cfg.label_column!r} holds numbers without class names (not a "
                            f"ClassLabel); name the classes in their index order with data.classes")
        classes = sorted(found)
    listing.check_classes(classes, cfg.root)
    index = {c: i for i, c in enumerate(classes)}
    bad: dict[str, str] = {}

    def label_of(x, name: str, part: str):
        items = x if isinstance(x, list) else [x]
        out = []
        for item in items:
            if isinstance(item, int) and not isinstance(item, bool) and 0 <= item < len(classes):
                out.append(item)
            elif isinstance(item, str) and item in index:
                out.append(index[item])
            else:
                if part != "test":
                    bad[name] = f"{display(name)}: label {printable(str(item))!r} is not one of the {len(classes)} classes"
                return None
        return tuple(sorted(set(out))) if multi else out[0]

    samples = {}
    for part, split in wanted.items():
        rows = []
        for i, x in enumerate(raw[part]):
            name = f"{root}/{split}/{i}"
            y = label_of(x, name, part) if x is not None else None
            if x is None and part != "test":
                bad[name] = f"{display(name)}: no label"
            if y is not None:
                rows.append((name, y))
        samples[part] = rows
    reader = RowReader(parts, cfg.image_column)
    if val_name:
        out = listing.DataSet(classes, samples["train"], samples["val"], samples["test"], "hf dataset", root=root)
    else:
        # (drawn by "<split>/<row>", joined back to "<root>/<split>/<row>")
        rels = [(n[len(root) + 1:], y) for n, y in samples["train"]]
        out = listing._drawn(cfg, Path(root), classes, rels, recorded, "hf dataset + val_split")
        if samples["test"]:
            if out.test:
                raise UserError(f"data: data.test_split={cfg.test_split:g} draws test from train, but the dataset "
                                f"has a test split; use one")
            out.test = samples["test"]
    out.multi_label, out.reader, out.bad, out.root = multi, reader, bad, root
    return out
