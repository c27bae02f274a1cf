"""tl-dist data: converting a data set between storage formats.

    tl-dist data shard SRC OUT [--shard-size 1GB] [--labels FILE ...]   image files -> WebDataset shards
    tl-dist data index DIR [--pattern '*.tar']                           index existing shards in place

``shard`` reads SRC as training does (train/ and val/ class folders, test/ too; one folder of class
folders, all train; or a labels file, its split column deciding the parts) and writes
``<part>-NNNNNN.tar`` shards, their indexes and ``classes.txt`` into OUT; ``data.format: wds`` with
``data.root: OUT`` then trains on them. ``index`` writes the ``.idx.json`` index beside shards made
elsewhere (webdataset's ShardWriter, tar), so start-up does not read their headers every time.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from tl_dist.errors import UserError, one_line, printable


def parse(argv: list[str], prog: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description="Convert a data set between storage formats.")
    sub = p.add_subparsers(dest="what", required=True, metavar="{shard,index}")
    s = sub.add_parser("shard", help="write WebDataset tar shards from image folders or a labels file",
                       description="Write WebDataset tar shards (<part>-NNNNNN.tar, an index beside each, "
                                   "classes.txt) from SRC's image files, for data.format=wds.")
    s.add_argument("src", help="a folder: train/ and val/ (and test/) of class folders, one folder of class "
                               "folders (all train), or with --labels the root of a labels file's paths")
    s.add_argument("out", help="a new or empty folder (or one an interrupted run of this command wrote: it resumes)")
    s.add_argument("--shard-size", default="1GB", help="bytes a shard holds, about (default 1GB)")
    s.add_argument("--labels", help="a labels file under SRC (CSV or JSON Lines), as data.labels")
    s.add_argument("--path-column", default="path")
    s.add_argument("--label-column", default="label")
    s.add_argument("--split-column", default="split")
    s.add_argument("--label-delimiter", help="several labels per image, separated by this (multi_label)")
    s.add_argument("--skip-bad-images", action="store_true", help="leave bad image files out (default: stop)")
    i = sub.add_parser("index", help="write the index beside existing shards (start-up then skips reading headers)",
                       description="Write <shard>.idx.json beside every shard under DIR that has no current one.")
    i.add_argument("dir")
    i.add_argument("--pattern", action="append", help="shard file names (glob or braces; repeatable); "
                                                       "default: *.tar")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, prog: str = "tl-dist data") -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv), prog)
    try:
        return shard(args) if args.what == "shard" else index(args)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code


def source_parts(args) -> tuple[list[str], dict[str, list], bool]:
    """(classes, {part: [(path, label)]}, multi_label) of the source, as training would list it."""
    from tl_dist.data import labels_file, listing

    src = listing.data_root(args.src)
    if args.labels:
        rows = labels_file.read(src / args.labels, args.path_column, args.label_column, args.split_column,
                                args.label_delimiter)
        names = {x for label in rows.labels for x in (label if rows.multi_label else (label,))}
        classes = sorted(names)
        index = {c: i for i, c in enumerate(classes)}
        parts: dict[str, list] = {"train": [], "val": [], "test": []}
        for n, (rel, label) in enumerate(zip(rows.paths, rows.labels)):
            y = tuple(index[x] for x in label) if rows.multi_label else index[label]
            parts[rows.splits[n] if rows.splits is not None else "train"].append((str(src / rel), y))
        return classes, parts, rows.multi_label
    if (src / "train").is_dir():
        classes, train = listing.list_split(src, "train")
        parts = {"train": train}
        for part in ("val", "test"):
            if (src / part).is_dir():
                c, samples = listing.list_split(src, part)
                if c != classes:
                    raise UserError(f"data shard: {src / part} has other classes than {src / 'train'}")
                parts[part] = samples
        return classes, parts, False
    classes, samples = listing.class_folders(src)
    return classes, {"train": samples}, False


def shard(args) -> int:
    from tqdm import tqdm

    from tl_dist.data import shard_writer
    from tl_dist.data.images import screen_files

    size = shard_writer.parse_size(args.shard_size)
    out = Path(args.out).expanduser()
    shard_writer.check_out(out)
    src = Path(args.src).expanduser()
    classes, parts, multi = source_parts(args)
    listing_check = [p for part in parts.values() for p, _ in part]
    t0 = time.perf_counter()
    print(f"checking {len(listing_check)} image files (a million take about 4 minutes on 2 cores) ...", flush=True)
    report = screen_files(listing_check, str(src), args.skip_bad_images, "pass --skip-bad-images",
                          lambda line: print(printable(line), file=sys.stderr), who="data shard")
    parts = {k: [s for s in v if s[0] not in report.bad] for k, v in parts.items()}
    print(f"checked {len(listing_check)} image files in {time.perf_counter() - t0:.1f}s; writing "
          f"{', '.join(f'{len(v)} {k}' for k, v in parts.items() if v)} into {printable(out)}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    shard_writer.write_classes(out, classes)
    total = sum(len(v) for v in parts.values())
    written = []
    with tqdm(total=total, unit="img", file=sys.stderr, disable=None) as bar:
        for part, samples in parts.items():
            if samples:
                written.append((part, shard_writer.write_part(part, samples, src, classes, out, size, multi,
                                                              bar.update)))
    for part, w in written:
        kept = f" ({w.skipped} already there)" if w.skipped else ""
        print(f"{part}: {w.shards + w.skipped} shard(s){kept}, {w.bytes / 1e9:.2f} GB written", flush=True)
    print(f"done in {time.perf_counter() - t0:.1f}s: train with data.format=wds data.root={printable(out)}"
          f"{' (multi_label: json labels)' if multi else ''}", flush=True)
    return 0


def index(args) -> int:
    from tl_dist.data import shards

    root = Path(args.dir).expanduser()
    if not root.is_dir():
        raise UserError(f"data index: {root} is not a folder")
    found: list[Path] = []
    for pattern in args.pattern or ["*.tar"]:
        found += [p for p in shards.find(root, pattern, "--pattern") if p not in found]
    if not found:
        raise UserError(f"data index: no shards under {root} match {args.pattern or ['*.tar']}")
    t0, fresh = time.perf_counter(), 0
    for path, idx in zip(found, shards.indexes(found)):
        if shards.read_index(path) is None:
            shards.write_index(path, idx)
            fresh += 1
        if idx["bad"]:
            print(f"warning: {path.name}: {len(idx['bad'])} unusable sample(s), e.g. {idx['bad'][0][1]}",
                  file=sys.stderr)
    print(f"indexed {fresh} of {len(found)} shard(s) in {time.perf_counter() - t0:.1f}s ({len(found) - fresh} were "
          f"current)", flush=True)
    return 0
