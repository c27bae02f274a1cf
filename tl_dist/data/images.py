"""Reading image files: decode to RGB, and check files before training (headers only, in parallel)."""
from __future__ import annotations

import io
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from PIL import Image, ImageOps

from tl_dist.errors import UserError, first_few


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_images(folder: str) -> list[str]:
    """Every image file under ``folder``: its own files (sorted), then each sub-folder's (sorted).

    Symbolic links are followed, as people link data sets together; a link that leads back to a
    folder it sits in would make the listing endless, so it is an error that names the link.
    """
    out: list[str] = []

    def walk(d: str, ancestors: dict[tuple[int, int], str], via: str | None) -> None:
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            raise UserError(f"data: cannot read folder {d}: {e.strerror}") from None
        subdirs = []
        for e in entries:
            try:
                is_dir = e.is_dir()  # follows links
            except OSError:
                is_dir = False
            if not is_dir:
                if is_image_name(e.name):
                    out.append(e.path)
                continue
            try:
                st = os.stat(e.path)
            except OSError as err:
                raise UserError(f"data: cannot read folder {e.path}: {err.strerror}") from None
            key = (st.st_dev, st.st_ino)
            link = e.path if e.is_symlink() else via
            if key in ancestors:
                raise UserError(f"data: symbolic link loop: {e.path} is {ancestors[key]} again (through the "
                                f"link {link}); listing it would never end. Remove or fix the link")
            subdirs.append((e.path, key, link))
        for path, key, link in subdirs:
            walk(path, {**ancestors, key: path}, link)

    try:
        st = os.stat(folder)
    except OSError as e:
        raise UserError(f"data: cannot read folder {folder}: {e.strerror}") from None
    walk(str(folder), {(st.st_dev, st.st_ino): str(folder)}, None)
    return out


class BadImage(Exception):
    """A file that cannot be used as an image; the message names the file and why."""


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, for files and for images handed in directly."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: convert("RGB") would clip everything above 255 to white.
        img = img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")  # avoids Pillow's palette-transparency warning
    return img.convert("RGB")


def regular_file(path: str) -> None:
    """BadImage unless ``path`` is a regular file (links followed): opening a named pipe would wait
    for a writer forever, and a device could be endless."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: the caller's own open says so, in its words
    if not stat.S_ISREG(mode):
        kind = "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else \
            "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special"
        raise BadImage(f"{path}: not a regular file ({kind}); only image files are read")


@contextmanager
def _open(path: str) -> Iterator[Image.Image]:
    """Image.open, with every way it fails turned into BadImage naming the file.

    Pillow raises over 2x MAX_IMAGE_PIXELS and only warns between 1x and 2x; the pixel count is
    checked here rather than by turning that warning into an error, because warning filters are
    process-global and the scan opens files from many threads at once.
    """
    regular_file(path)
    try:
        img = Image.open(path)
    except FileNotFoundError:
        raise BadImage(f"{path}: file not found") from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"{path}: too many pixels (decompression bomb?): {e}") from None
    except Image.UnidentifiedImageError:
        raise BadImage(f"{path}: not an image (Pillow cannot identify it)") from None
    except OSError as e:
        raise BadImage(f"{path}: unreadable: {e}") from None
    with img:
        _within_limit(img, path)
        yield img


def _within_limit(img: Image.Image, name: str) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        raise BadImage(f"{name}: too many pixels (decompression bomb?): {img.width}x{img.height} "
                       f"is over Pillow's limit of {limit}")


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` fully into an RGB image (EXIF rotation applied); BadImage on any failure."""
    with _open(path) as img:
        return _decoded(img, path)


def _decoded(img: Image.Image, name: str) -> Image.Image:
    try:
        img = ImageOps.exif_transpose(img)
        img.load()
        return to_rgb(img)
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"{name}: cannot decode: {e}") from None


@contextmanager
def _open_bytes(data: bytes, name: str) -> Iterator[Image.Image]:
    """Image.open on an image held in memory (a shard member, a dataset row), failures as BadImage
    naming ``name``; the same pixel limit as files."""
    if not data:
        raise BadImage(f"{name}: empty (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage(f"{name}: too many pixels (decompression bomb?): {e}") from None
    except (Image.UnidentifiedImageError, OSError):
        raise BadImage(f"{name}: not an image (Pillow cannot identify it)") from None
    with img:
        _within_limit(img, name)
        yield img


def decode_bytes(data: bytes, name: str) -> Image.Image:
    """``load_rgb`` for an encoded image held in memory; ``name`` says where it came from."""
    with _open_bytes(data, name) as img:
        return _decoded(img, name)


def inspect_bytes(data: bytes, name: str) -> tuple[int, int, int]:
    """``inspect_file`` for an encoded image held in memory: (width, height, bytes)."""
    with _open_bytes(data, name) as img:
        fmt, wh = img.format, img.size
    _check_end(fmt, wh, data[-1024:], name)
    return wh[0], wh[1], len(data)


def _check_end(fmt: str | None, wh: tuple[int, int], tail: bytes, name: str) -> None:
    if wh[0] <= 0 or wh[1] <= 0:
        raise BadImage(f"{name}: image has no pixels ({wh[0]}x{wh[1]})")
    # A truncated file keeps its header; its end-of-stream marker is what goes missing.
    if fmt == "JPEG" and b"\xff\xd9" not in tail:
        raise BadImage(f"{name}: truncated JPEG (no end-of-image marker)")
    if fmt == "PNG" and b"IEND" not in tail:
        raise BadImage(f"{name}: truncated PNG (no IEND chunk)")


def check_file(path: str) -> tuple[int, int]:
    """Cheap check of one file: header, size, and a complete end of stream. Returns (width, height)."""
    return inspect_file(path)[:2]


def inspect_file(path: str) -> tuple[int, int, int]:
    """``check_file``, returning (width, height, bytes).

    Reads the header and the tail, never decodes pixels, so a 10k-image folder takes seconds.
    """
    regular_file(path)
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise BadImage(f"{path}: unreadable: {e.strerror}") from None
    if size == 0:
        raise BadImage(f"{path}: empty file (0 bytes)")
    with _open(path) as img:
        fmt, wh = img.format, img.size
    try:
        with open(path, "rb") as f:
            f.seek(max(0, size - 1024))
            tail = f.read()
    except OSError as e:
        raise BadImage(f"{path}: unreadable: {e.strerror}") from None
    _check_end(fmt, wh, tail, path)
    return wh[0], wh[1], size


@dataclass
class ScanReport:
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (w, h) of good files
    nbytes: dict[str, int] = field(default_factory=dict)  # path -> file size of good files
    bad: dict[str, str] = field(default_factory=dict)  # path -> reason


def scan_files(paths: list[str], workers: int | None = None,
               inspect: Callable[[str], tuple[int, int, int]] = inspect_file) -> ScanReport:
    """Check every file (or, with ``inspect``, every sample of another source) in parallel
    (I/O-bound: threads); the report lists each bad one with why."""
    report = ScanReport()
    workers = workers or min(32, (os.cpu_count() or 1) * 4)

    def one(p: str):
        try:
            return p, inspect(p), None
        except BadImage as e:
            return p, None, str(e)

    with ThreadPoolExecutor(workers) as ex:
        for p, whb, err in ex.map(one, paths, chunksize=64):
            if err is None:
                report.sizes[p], report.nbytes[p] = whb[:2], whb[2]
            else:
                report.bad[p] = err
    return report


class Files:
    """The samples are image files: a sample's name is its path. Other sources (tar shards, a
    Hugging Face dataset) have the same two methods, so the loaders and the scan take any of them."""

    def load(self, name: str) -> Image.Image:
        return load_rgb(name)

    def inspect(self, name: str) -> tuple[int, int, int]:
        return inspect_file(name)


FILES = Files()
SAMPLED = 256  # where a data set is too large to check ahead, the images whose sizes guide the cache


def to_check(paths: list[str], limit: int | None) -> list[str]:
    """The images checked before training: all of them up to ``limit`` (data.scan_limit), else a
    spread sample of about SAMPLED."""
    return paths if limit is None or len(paths) <= limit else paths[::max(1, len(paths) // SAMPLED)]


SKIP_BAD_IMAGES = "set data.skip_bad_images=true"  # how a training config leaves bad files out


def screen_files(paths: list[str], where: str, skip: bool, how_to_skip: str, warn: Callable[[str], None],
                 who: str = "data", lines: Callable[[list[str]], dict[str, str]] | None = None,
                 reader: Files = FILES, known_bad: dict[str, str] | None = None,
                 limit: int | None = None) -> ScanReport:
    """The bad-image rule, one for training, lr-find and evaluate: scan ``paths``; bad files stop
    the command with one line listing them, unless ``skip`` (the user's ``how_to_skip``), when they
    are left out with a warning. The report says which. ``lines`` names where a path came from (a
    labels file's line), for the message. ``known_bad``: samples the source's index already found
    unusable (a shard member without a label, ...), under the same rule.

    ``limit`` (data.scan_limit): every image is checked up to that many; above it, a spread sample
    (for the sizes), and the rest are checked as they are decoded (a failure stops the run at the
    end of that epoch, or is left out with ``skip``, as for a file that changes after the scan)."""
    report = scan_files(to_check(paths, limit), inspect=reader.inspect)
    report.bad.update(known_bad or {})
    if report.bad:
        named = lines(list(report.bad)) if lines else {}
        listing = first_few([f"{named[p]}: {why}" if p in named else why for p, why in report.bad.items()], 10)
        if not skip:
            raise UserError(f"{who}: {len(report.bad)} bad image file(s) under {where}: {listing}. "
                            f"Fix or remove them, or {how_to_skip} to leave them out")
        warn(f"warning: leaving out {len(report.bad)} bad image file(s): {listing}")
    return report
