"""How long a large labels file takes to read and check, and how much memory its rows take.

    PYTHONPATH=. python benchmarks/labels_file.py [--rows 1000000] [--classes 1000]

Writes a CSV (path,label,split) and the same rows as JSON Lines into a temporary folder, then times
``labels_file.read`` (parse + every row check: paths, labels, duplicates, splits) and the stratified
draw of val / test parts from the rows (``data.val_split``), each in a fresh process so that peak
memory is the step's own. The image files are not opened: that is the bad-image scan's work, the
same for every layout (docs/performance.md).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEP = r"""
import json, resource, sys, time
from pathlib import Path
from tl_dist.data import labels_file, splits
kind, file, split_column = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
rows = labels_file.read(file, "path", "label", split_column)
read_s = time.perf_counter() - t0
draw_s = None
if kind == "draw":
    classes = sorted(set(rows.labels))
    index = {c: i for i, c in enumerate(classes)}
    t1 = time.perf_counter()
    splits.draw([(p, index[l]) for p, l in zip(rows.paths, rows.labels)], len(classes), 0.2, 0.1, 0)
    draw_s = time.perf_counter() - t1
peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(json.dumps({"read_s": read_s, "draw_s": draw_s, "rows": len(rows.paths), "extra_peak_mb": peak}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--classes", type=int, default=1000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        csv_file, jsonl = Path(tmp) / "labels.csv", Path(tmp) / "labels.jsonl"
        t0 = time.perf_counter()
        with open(csv_file, "w") as c, open(jsonl, "w") as j:
            c.write("path,label,split\n")
            for i in range(args.rows):
                path, label = f"images/{i // 1000:04d}/{i:08d}.jpg", f"class_{i % args.classes:04d}"
                split = "val" if i % 10 == 0 else "train"
                c.write(f"{path},{label},{split}\n")
                j.write(json.dumps({"path": path, "label": label}) + "\n")
        print(f"wrote {args.rows:,} rows ({csv_file.stat().st_size / 2**20:.0f} MB CSV) in "
              f"{time.perf_counter() - t0:.1f}s", flush=True)
        print("| file | what | rows | seconds | draw seconds | extra peak memory (MB) |")
        print("|---|---|---|---|---|---|")
        for kind, file, column, what in (("read", csv_file, "split", "read + check, split column"),
                                         ("draw", csv_file, "none", "read + check, then val/test drawn"),
                                         ("read", jsonl, "split", "read + check (JSON Lines)")):
            out = subprocess.run([sys.executable, "-c", STEP, kind, str(file), column], capture_output=True,
                                 text=True, check=True).stdout
            r = json.loads(out)
            draw = f"{r['draw_s']:.2f}" if r["draw_s"] is not None else "-"
            print(f"| {file.suffix[1:]} | {what} | {r['rows']:,} | {r['read_s']:.2f} | {draw} | "
                  f"{r['extra_peak_mb']:.0f} |", flush=True)
    print(f"(python {sys.version.split()[0]}, {sys.platform})")


if __name__ == "__main__":
    main()
