"""A decoded-image cache on disk (``data.cache: disk``): every image decoded once, resized as the
eval transform resizes it (shorter side ``data.resize_size``), and kept as raw uint8 pixels in one
memory-mapped file that every later epoch, every loader worker and every later run reads without
JPEG decoding (the idea FFCV uses).

- What it gives: val (and data.augment=none) pixels identical to decoding the file; train crops
  from the same per-sample draws, drawn on the image's original size and mapped onto the stored
  one (a crop smaller than the stored image is up-sampled from fewer pixels than the original had:
  measured in docs/data.md).
- Where: ``data.cache_dir`` (shared between runs when they name the same folder), else the run's
  own ``image_cache/``. A cache is named by a hash of what it holds (the samples' names, the resize
  and its interpolation), so another data set or size never reads a wrong one. Images changed in
  place under the same names are not noticed (checking would mean reading every file's size at
  every start): remove the cache after editing images.
- One writer: the process that creates ``<key>.lock`` (O_EXCL) writes ``<key>.tmp``, then renames
  it to ``<key>.u8`` and publishes ``<key>.json`` (atomic) last; a reader uses a cache only when
  its index is there. Other processes, on this machine or others sharing the folder, wait for the
  index. A writer that was killed is noticed by its lock (its pid is gone on this host) and the
  next process starts over. A disk without room for the estimate is refused in one line before
  anything is written; running out anyway (ENOSPC) removes the partial file and says so.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from tl_dist.data.images import BadImage
from tl_dist.errors import UserError, one_line
from tl_dist.files.outputs import alive

FORMAT = "tl_dist-image-cache/1"
MARGIN = 1.1  # free space asked for beyond the estimate


def stored_size(w: int, h: int, resize: int) -> tuple[int, int]:
    """(width, height) after torchvision's Resize(resize) (shorter side to ``resize``)."""
    if w <= h:
        return resize, int(resize * h / w)
    return int(resize * w / h), resize


def key_of(names: list[str], resize: int, interpolation: str) -> str:
    """A cache's name: what it holds (the samples' names, in order) and how they were resized."""
    h = hashlib.blake2b(digest_size=10)
    h.update(f"{FORMAT}\0{resize}\0{interpolation}\n".encode())
    for n in names:
        h.update(f"{n}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


class DiskImages:
    """A published cache: the pixels of sample ``i`` (in the order the cache was built) as a PIL
    image, with the size the original had. Picklable: each process maps the file itself."""

    def __init__(self, data: Path, index: dict):
        self.path = str(data)
        self.offset = np.asarray(index["offset"], dtype=np.int64)
        self.shape = np.asarray(index["shape"], dtype=np.int32)  # rows of (stored h, stored w, original w, original h)
        self._map = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_map": None}

    def __len__(self) -> int:
        return len(self.offset)

    def ok(self, i: int) -> bool:
        return self.offset[i] >= 0

    def image(self, i: int) -> tuple[Image.Image, tuple[int, int]]:
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        h, w, ow, oh = (int(x) for x in self.shape[i])
        start = int(self.offset[i])
        pixels = np.asarray(self._map[start:start + h * w * 3]).reshape(h, w, 3)
        return Image.fromarray(pixels.copy(), "RGB"), (ow, oh)


def resized(img: Image.Image, resize: int, interpolation: str) -> Image.Image:
    """The eval transform's Resize, exactly as ``augment.eval_transform`` applies it."""
    return F.resize(img, [resize], interpolation=InterpolationMode(interpolation), antialias=True)


def _lock_holder_gone(lock: Path) -> bool:
    """Whether the writer that holds ``lock`` is known dead (this host, its process no longer runs)."""
    try:
        who = json.loads(lock.read_text())
        return who["host"] == socket.gethostname() and not alive(int(who["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False  # being written right now, unreadable, or another host's: not known dead


def open_or_build(folder: Path, names: list[str], sizes: dict[str, tuple[int, int]],
                  load: Callable[[str], Image.Image], resize: int, interpolation: str, log: Callable[[str], None],
                  threads: int) -> DiskImages:
    """The cache of ``names`` in ``folder``: read if published, else built here (or waited for,
    while another process builds it). ``sizes`` (the scan's, any part of them) sizes the estimate."""
    key = key_of(names, resize, interpolation)
    data, index, lock, tmp = (folder / f"{key}{ext}" for ext in (".u8", ".json", ".lock", ".tmp"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"data: cannot make the image cache folder {folder} ({e.strerror}); set data.cache_dir to "
                        f"a writable folder") from None
    said = False
    while True:
        published = _published(data, index, len(names))
        if published is not None:
            return published
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _lock_holder_gone(lock):
                log(f"note: the image cache {data.name}'s writer is gone (killed?); building it again")
                for p in (lock, tmp):
                    try:
                        p.unlink()
                    except FileNotFoundError:
                        pass
                continue
            if not said:
                log(f"waiting for another process to finish the image cache {folder / data.name} ({lock.name})")
                said = True
            time.sleep(0.5)
            continue
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}, f)
            _build(names, sizes, load, resize, interpolation, data, index, tmp, log, threads)
        finally:
            try:
                lock.unlink()
            except FileNotFoundError:
                pass


def _published(data: Path, index: Path, n: int) -> DiskImages | None:
    try:
        idx = json.loads(index.read_text())
    except (OSError, ValueError):
        return None
    if idx.get("format") != FORMAT or len(idx.get("offset", ())) != n or not data.is_file() \
            or data.stat().st_size != idx.get("bytes"):
        return None
    return DiskImages(data, idx)


def _estimate(names: list[str], sizes: dict[str, tuple[int, int]], resize: int) -> int:
    known = [stored_size(*sizes[n], resize) for n in names if n in sizes]
    per = sum(w * h * 3 for w, h in known) / len(known) if known else 3 * resize * resize * 4 / 3
    return int(per * len(names))


def _build(names, sizes, load, resize, interpolation, data: Path, index: Path, tmp: Path, log, threads) -> None:
    from tl_dist.files.atomic import atomic_write_text, fsync_dir

    need = _estimate(names, sizes, resize)
    free = shutil.disk_usage(data.parent).free
    if need * MARGIN > free:
        raise UserError(f"data: the image cache needs about {need / 2**30:.1f} GiB and {data.parent} has "
                        f"{free / 2**30:.1f} GiB free; free space, set data.cache_dir to a larger disk, or "
                        f"data.cache=none")
    log(f"building the image cache: {len(names)} images decoded once into {data} (about {need / 2**30:.2f} GiB)")
    t0 = time.perf_counter()

    def one(n: str):
        try:
            img = load(n)
        except BadImage:
            return None, (0, 0, 0, 0)  # left out: the loader reports the sample when it is drawn
        small = np.asarray(resized(img, resize, interpolation), dtype=np.uint8)
        return small, (small.shape[0], small.shape[1], img.width, img.height)

    offsets, shapes, pos = [], [], 0
    try:
        with open(tmp, "wb") as f, ThreadPoolExecutor(max(1, threads)) as pool:
            for pixels, shape in pool.map(one, names):  # (in order: the file is written front to back)
                offsets.append(pos if pixels is not None else -1)
                shapes.append(shape)
                if pixels is not None:
                    f.write(pixels.tobytes())
                    pos += pixels.nbytes
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        if e.errno == errno.ENOSPC:
            raise UserError(f"data: the disk under {data.parent} filled up while writing the image cache (the "
                            f"partial file is removed); free space or set data.cache_dir to a larger disk") from None
        raise UserError(f"data: cannot write the image cache {tmp}: {one_line(e)}") from None
    os.replace(tmp, data)
    fsync_dir(data.parent)
    atomic_write_text(index, json.dumps({"format": FORMAT, "bytes": pos, "resize": resize,
                                         "interpolation": interpolation, "offset": offsets, "shape": shapes}))
    log(f"image cache ready in {time.perf_counter() - t0:.1f}s: {pos / 2**30:.2f} GiB")
