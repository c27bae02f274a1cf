"""What a data set holds: the ImageFolder layout's classes and (path, class) samples per split, listed
in an order that does not depend on the file system, and an identity that ranks compare."""
from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


from tl_dist.errors import UserError, printable
from tl_dist.data.images import IMAGE_EXTENSIONS, list_images

Sample = tuple[str, int]  # (path, class index)


def list_split(root: Path, split: str) -> tuple[list[str], list[Sample]]:
    """ImageFolder's layout: root/split/<class>/<image>. Returns (classes, samples), sorted."""
    d = root / split
    if not d.is_dir():
        raise UserError(f"data: split folder not found: {d} (data.root must hold train/ and val/, "
                        f"one sub-folder per class)")
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
        raise UserError(f"data: split {d} is empty: no image files ({', '.join(IMAGE_EXTENSIONS)}) "
                        f"under its class folders")
    return classes, samples


def list_splits(root: str) -> tuple[list[str], list[Sample], list[Sample]]:
    r = Path(root).expanduser()
    if not r.is_dir():
        raise UserError(f"data: data.root not found: {r} (a folder holding train/ and val/; "
                        f"see the README for the hymenoptera data or configs/demo.yaml)")
    train_classes, train = list_split(r, "train")
    val_classes, val = list_split(r, "val")
    if train_classes != val_classes:
        only_t = sorted(set(train_classes) - set(val_classes))
        only_v = sorted(set(val_classes) - set(train_classes))
        raise UserError(f"data: train and val must have the same classes under {r}: "
                        f"only in train: {only_t or 'none'}; only in val: {only_v or 'none'}")
    if len(train_classes) < 2:
        raise UserError(f"data: {r}/train has {len(train_classes)} class; a classifier needs at least 2")
    return train_classes, train, val


CONTENT_CHECK_FILES = 50_000  # up to this many images, ranks compare their bytes too (ends of each file)


def identity(root: str, classes: list[str], train: list[Sample], val: list[Sample], deep: bool) -> dict:
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
