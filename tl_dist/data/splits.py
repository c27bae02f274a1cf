"""Val and test parts made from one pool of images (``data.val_split`` / ``data.test_split``), and the
record of them (``split.json`` in the run directory).

The draw is stratified (each class split in the same proportions) and a function of
(``data.split_seed``, the image's path relative to ``data.root``) only: not of ``train.seed``, the
world size, the loader workers, the machine or the order the file system lists files in. Within a
class the images are ordered by a keyed hash of their path and cut by count, so adding an image moves
at most the images at the cut. A run keeps its split: a resume, ``tl-dist evaluate`` and the
checkpoint use the recorded one, never a new draw.
"""
from __future__ import annotations

import hashlib

from tl_dist.errors import UserError

FORMAT = "tl_dist-split/1"
PARTS = ("train", "val", "test")

Rel = tuple[str, "int | tuple[int, ...]"]  # (path relative to data.root, '/'-separated; class index, or indices)


def counts(n: int, val: float, test: float) -> tuple[int, int]:
    """(val, test) images of a class of ``n``: the nearest counts, at least one each where asked for
    and the class has the images (val first), and never the class's last train image."""
    n_val = min(n - 1, max(1, round(n * val))) if val > 0 and n >= 2 else 0
    n_test = min(n - 1 - n_val, max(1, round(n * test))) if test > 0 and n - n_val >= 2 else 0
    return n_val, n_test


def draw(samples: list[Rel], num_classes: int, val: float, test: float, seed: int) -> dict[str, list[Rel]]:
    """Stratified parts of ``samples``: {"train": [...], "val": [...], "test": [...]}, each sorted by
    (class, path). An image with several labels is drawn with its rarest class (so rare classes reach
    val), an image with none with the others that have none."""
    strata = _strata(samples, num_classes)
    by_stratum: list[list[tuple[bytes, str, object]]] = [[] for _ in range(num_classes + 1)]
    for (rel, label), stratum in zip(samples, strata):
        by_stratum[stratum].append((_key(seed, rel), rel, label))
    parts: dict[str, list[Rel]] = {p: [] for p in PARTS}
    for members in by_stratum:
        members.sort(key=lambda m: (m[0], m[1]))
        n_val, n_test = counts(len(members), val, test)
        for i, (_, rel, label) in enumerate(members):
            part = "test" if i < n_test else "val" if i < n_test + n_val else "train"
            parts[part].append((rel, label))
    for part in parts.values():
        part.sort(key=lambda s: (s[1] if isinstance(s[1], int) else (min(s[1], default=num_classes), s[1]), s[0]))
    return parts


def _strata(samples: list[Rel], num_classes: int) -> list[int]:
    """Each sample's stratum: its class; with several labels, the one with the fewest images (ties:
    the lower index); num_classes for an image with no label."""
    if all(isinstance(label, int) for _, label in samples):
        return [label for _, label in samples]
    freq = [0] * num_classes
    for _, label in samples:
        for c in label:
            freq[c] += 1
    return [min(label, key=lambda c: (freq[c], c)) if label else num_classes for _, label in samples]


def _key(seed: int, rel: str) -> bytes:
    return hashlib.blake2b(rel.encode("utf-8", "surrogateescape"), digest_size=8,
                           key=str(seed).encode()).digest()


def part_hash(samples: list[Rel], classes: list[str]) -> str:
    """What identifies a part: its relative paths and class names, in order."""
    h = hashlib.blake2b(digest_size=12)
    for rel, label in samples:
        h.update(f"{rel}\0{_names(label, classes)}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _names(label, classes: list[str]) -> str:
    return classes[label] if isinstance(label, int) else "[" + "\x1f".join(classes[c] for c in label) + "]"


def record(parts: dict[str, list[Rel]], classes: list[str], val: float, test: float, seed: int,
           source: str) -> dict:
    """The content of split.json: every part's relative paths and class names, with a hash of each."""
    return {"format": FORMAT, "source": source, "split_seed": seed, "val_split": val, "test_split": test,
            "classes": classes,
            "parts": {name: {"images": len(s), "hash": part_hash(s, classes),
                             "samples": [[rel, classes[c] if isinstance(c, int) else [classes[i] for i in c]]
                                         for rel, c in s]}
                      for name, s in parts.items() if s or name != "test"}}


def summary(rec: dict) -> dict:
    """The record without its lists: what checkpoints carry (the lists stay in split.json)."""
    return {"split_seed": rec["split_seed"], "val_split": rec["val_split"], "test_split": rec["test_split"],
            "parts": {name: {"images": p["images"], "hash": p["hash"]} for name, p in rec["parts"].items()}}


def from_record(rec: dict, classes: list[str], where: str) -> dict[str, list[Rel]]:
    """The parts a record holds, as (relative path, class index) against ``classes``; refuses a
    record that is damaged or names a class the data no longer has."""
    index = {c: i for i, c in enumerate(classes)}
    parts: dict[str, list[Rel]] = {p: [] for p in PARTS}
    try:
        if rec.get("format") != FORMAT:
            raise ValueError(f"format {rec.get('format')!r}")
        for name, part in rec["parts"].items():
            if name not in PARTS:
                raise ValueError(f"part {name!r}")
            samples = [(rel, index[c] if isinstance(c, str) else tuple(index[x] for x in c))
                       for rel, c in part["samples"]]
            if len(samples) != part["images"] or part_hash(samples, classes) != part["hash"]:
                raise ValueError(f"the {name} list does not match its hash")
            parts[name] = samples
    except KeyError as e:
        raise UserError(f"data: {where} names class {e.args[0]!r}, which the data no longer has; train with "
                        f"another train.output_dir (a new split) or restore the class") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise UserError(f"data: {where} is damaged ({e}); it records the run's split: restore it, or train "
                        f"into another train.output_dir") from None
    return parts

