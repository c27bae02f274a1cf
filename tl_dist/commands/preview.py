"""tl-dist preview: a look at the data as a config would train on it, before any training.

    tl-dist preview CONFIG [section.key=value ...] [--out FILE.png] [--per-class N]

Prints the data set's summary (its layout, classes, images per class in each part, image sizes,
what the bad-image scan found, the train transform) and draws, for every class (up to 12), one
train image as the model sees it at evaluation beside what the train transform makes of it in the
first epochs (the same per-image draws training takes). Notes where a setting is likely wrong for
the data; it never changes one. Writes the picture only (default: train.output_dir/preview.png).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

from tl_dist import config
from tl_dist.errors import UserError, first_few, one_line, printable

MAX_CLASSES = 12  # rows of the picture


def parse(argv: Sequence[str] | None, prog: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description="The data as a config would train on it: a summary and a "
                                "picture of augmented train images of every class. Nothing is trained.")
    p.add_argument("args", nargs="*", metavar="[CONFIG] section.key=value", help="a YAML config, then overrides")
    p.add_argument("--config", "-c", metavar="CONFIG", help="the YAML config (the same as naming it first)")
    p.add_argument("--out", metavar="FILE.png", help="the picture (default: train.output_dir/preview.png)")
    p.add_argument("--per-class", type=int, default=4, help="augmented versions of each class's image (default 4)")
    p.add_argument("--force", action="store_true", help="let --out replace a file tl_dist did not draw")
    return p.parse_args(argv)


def summary_lines(data, report, cfg: config.Config) -> list[str]:
    """The data set in a few lines: parts, per-class counts, sizes, the scan, the transform."""
    parts = [(name, samples) for name, samples in (("train", data.train), ("val", data.val),
                                                  ("test", getattr(data, "test", None) or [])) if samples]
    counts = {name: Counter(c for _, y in samples for c in (y if isinstance(y, tuple) else (y,)))
              for name, samples in parts}
    width = max(8, *(len(c) for c in data.classes[:40]))
    lines = [f"data: {cfg.data.root} ({data.layout}), {len(data.classes)} classes"
             + (", several labels per image" if data.multi_label else ""),
             f"  {'class':<{width}}  " + "  ".join(f"{name:>7}" for name, _ in parts)]
    for ci, c in enumerate(data.classes[:40]):
        lines.append(f"  {printable(c):<{width}}  " + "  ".join(f"{counts[name][ci]:>7}" for name, _ in parts))
    if len(data.classes) > 40:
        lines.append(f"  ... and {len(data.classes) - 40} more classes")
    lines.append(f"  {'images':<{width}}  " + "  ".join(f"{len(samples):>7}" for _, samples in parts))
    sizes = list(report.sizes.values())
    if sizes:
        w, h = [s[0] for s in sizes], [s[1] for s in sizes]
        lines.append(f"image sizes (w x h): {min(w)}x{min(h)} to {max(w)}x{max(h)}, median "
                     f"{int(statistics.median(w))}x{int(statistics.median(h))}")
    lines.append(f"bad-image scan: {len(report.bad)} bad" + (f": {first_few(sorted(report.bad), 5)}"
                                                             if report.bad else ""))
    d = cfg.data
    if d.augment == "none":
        transform = f"none: Resize({d.resize_size}) + CenterCrop({d.image_size}), as at evaluation"
    else:
        transform = (f"RandomResizedCrop({d.image_size}, scale={d.scale}, ratio=[{d.ratio[0]:.3g}, {d.ratio[1]:.3g}])"
                     + (" + horizontal flip" if d.hflip else "")
                     + (f" + {d.augment}" if d.augment != "seed" else ""))
    lines.append(f"train transform: {transform}" + (f" + random erasing {d.random_erasing}" if d.random_erasing else ""))
    return lines


def notes(data, cfg: config.Config) -> list[str]:
    """Settings that are likely wrong for this data: said, never changed."""
    d, out = cfg.data, []
    if d.augment != "none" and d.hflip and data.classes and all(len(c) == 1 and c.isalnum() for c in data.classes):
        out.append("note: the classes look like digits or letters, and data.hflip=true mirrors train images "
                   "(a mirrored 2 or b is another symbol): data.hflip=false keeps them readable")
    if d.augment != "none" and d.scale[0] < 0.25:
        out.append(f"note: data.scale={d.scale} crops as little as {d.scale[0]:.0%} of an image; if the picture "
                   f"shows crops that miss the object, a larger minimum (data.scale=[0.35,1.0]) keeps more of it")
    return out


def draw(data, cfg: config.Config, path: Path, per_class: int) -> None:
    """For each class (up to MAX_CLASSES): its first train image at evaluation, then the train
    transform's draws for it in epochs 0, 1, ... (what training will see)."""
    from tl_dist.data.augment import eval_transform
    from tl_dist.data.images import BadImage
    from tl_dist.data.loaders import ImageDataset
    from tl_dist.visualize import grid

    ds = ImageDataset(data.train, cfg.data, train=True, seed=cfg.train.seed, num_classes=len(data.classes),
                      reader=data.reader)
    first: dict[int, int] = {}
    for i, (_, y) in enumerate(data.train):
        for c in (y if isinstance(y, tuple) else (y,)):
            first.setdefault(c, i)
    items = []
    for c in sorted(first)[:MAX_CLASSES]:
        i = first[c]
        try:
            img = ds._decoded(i)
        except BadImage:
            continue
        name = printable(data.classes[c])
        items.append((eval_transform(img, cfg.data.resize_size, cfg.data.image_size, cfg.data.interpolation),
                      f"{name}: as evaluated", None))
        items += [(ds.transformed(i, epoch), f"{name}: train, epoch {epoch}", None) for epoch in range(per_class)]
    if not items:
        raise UserError("preview: no train image could be read to draw")
    grid(items, path, cols=per_class + 1)


def main(argv: Sequence[str] | None = None, prog: str = "tl-dist preview") -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv), prog)
    try:
        path, overrides = args.config, list(args.args)
        if overrides and "=" not in overrides[0]:
            path = overrides.pop(0)
        if args.per_class < 1:
            raise UserError("preview: --per-class must be 1 or more")
        return _preview(config.load(path, overrides), args)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code


def _preview(cfg: config.Config, args: argparse.Namespace) -> int:
    from tl_dist.data.images import scan_files, to_check
    from tl_dist.data.listing import list_data
    from tl_dist.files.outputs import refuse_foreign
    from tl_dist.models.backbones import resolve
    from tl_dist.visualize import is_ours

    cfg = resolve(cfg)  # (the sizes and interpolation the model's weights give)
    out = Path(args.out).expanduser() if args.out else Path(cfg.train.output_dir) / "preview.png"
    refuse_foreign([out], is_ours, "preview", args.force)  # before any work
    if cfg.data.demo and not Path(cfg.data.root).exists():
        raise UserError(f"preview: the demo set is not generated yet in {cfg.data.root}; tl-dist train "
                        f"makes it on first use (or point data.root at your data)")
    data = list_data(cfg.data, None)
    every = [p for p, _ in data.train + data.val]
    limit = cfg.data.scan_limit  # (a spread sample past the limit, as training checks)
    report = scan_files(to_check(every, limit),
                        inspect=data.reader.inspect)
    report.bad.update(data.bad)
    for line in summary_lines(data, report, cfg) + notes(data, cfg):
        print(line, flush=True)
    bad = set(report.bad)
    data.train = [s for s in data.train if s[0] not in bad]
    out.parent.mkdir(parents=True, exist_ok=True)
    draw(data, cfg, out, args.per_class)
    print(f"picture: {printable(out)} (each class: its image as evaluated, then the train transform's draws in "
          f"epochs 0-{args.per_class - 1})", flush=True)
    return 0
