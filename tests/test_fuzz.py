"""A checkpoint comes from anywhere: a few hundred damaged copies of a real one, through the
predictor. Each must end with exit 0 or with one line and exit 2: never a traceback, and never
more memory than a prediction needs."""
import json
import subprocess
import sys

import pytest
import torch

from tl_dist.files import checkpoint
from tl_dist.models import backbones

from .conftest import ROOT, make_images

pytestmark = pytest.mark.slow

CHILD = r'''
import contextlib, io, json, random, resource, struct, sys
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a runaway allocation fails here, not the machine
from tl_dist.commands import predict
from tl_dist import predictor

src, image, work, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
blob = open(src, "rb").read()
hlen = struct.unpack("<Q", blob[:8])[0]
header = json.loads(blob[8:8 + hlen])
BAD = [None, -5, 0, 1, 4097, 200000, 1e308, float("nan"), float("inf"), "x", "", [], [1, 2], [0, 0, 0],
       ["a", "a"], [""], ["a"], {"a": 1}, True, "\x1b]0;title\x07", [float("nan"), 0, 0], [1, -1, 1],
       "resnet18\n", "googlenet_", ["c%d" % i for i in range(3)], 2 ** 64, -1e-9, "1" * 5000]

def with_header(h, tail=None):
    raw = json.dumps(h).encode()
    return struct.pack("<Q", len(raw)) + raw + (blob[8 + hlen:] if tail is None else tail)

def mutate(rng, i):
    kind = rng.choice(["meta value", "meta value", "meta value", "meta key gone", "meta not json",
                       "tensor entry", "length field", "header bytes", "truncated", "data bytes"])
    h = json.loads(json.dumps(header))
    meta = json.loads(h["__metadata__"]["tl_dist"])
    if kind == "meta value":
        for _ in range(rng.randint(1, 3)):
            meta[rng.choice(sorted(meta) + ["format"])] = rng.choice(BAD)
        h["__metadata__"]["tl_dist"] = json.dumps(meta)
        return kind, with_header(h)
    if kind == "meta key gone":
        del meta[rng.choice(sorted(meta))]
        h["__metadata__"]["tl_dist"] = json.dumps(meta)
        return kind, with_header(h)
    if kind == "meta not json":
        h["__metadata__"]["tl_dist"] = rng.choice(["{", "[]", "null", "1", '"s"', "{\"format\": 1}"])
        return kind, with_header(h)
    if kind == "tensor entry":
        name = rng.choice([k for k in h if k != "__metadata__"])
        field = rng.choice(["dtype", "shape", "data_offsets"])
        h[name][field] = rng.choice([["x"], [0, 10 ** 12], [3, 512], [2, 512, 1], "F64", "XX", [], None, -1])
        return kind, with_header(h)
    if kind == "length field":
        return kind, struct.pack("<Q", rng.choice([0, 1, hlen - 1, hlen + 1, 2 ** 40, 2 ** 63])) + blob[8:]
    if kind == "header bytes":
        b = bytearray(blob)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(8, 8 + hlen)] = rng.randrange(256)
        return kind, bytes(b)
    if kind == "truncated":
        return kind, blob[:rng.choice([0, 4, 8, 9, 8 + hlen // 2, 8 + hlen, rng.randrange(len(blob))])]
    b = bytearray(blob)
    for _ in range(16):
        b[rng.randrange(8 + hlen, len(b))] = rng.randrange(256)
    return kind, bytes(b)

results = []
for i in range(n):
    kind, data = mutate(random.Random(i), i)
    path = f"{work}/m.safetensors"
    open(path, "wb").write(data)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = predict.main([image, "--checkpoint", path, "--json", "--device", "cpu"])
        results.append({"i": i, "kind": kind, "rc": rc, "err": err.getvalue()})
    except BaseException as e:
        results.append({"i": i, "kind": kind, "rc": "raised", "err": f"{type(e).__name__}: {e}"[:300]})
# VmHWM: this process's own peak. (getrusage's ru_maxrss keeps the parent's peak across fork + exec.)
peak_kb = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"results": results, "peak_mb": peak_kb // 1024}))
'''


def test_damaged_checkpoints_end_in_one_line_never_a_traceback(tmp_path):
    ckpt = tmp_path / "best.safetensors"
    meta = {"classes": ["ants", "bees"], "num_classes": 2, "arch": "resnet18", "mode": "finetune",
            "image_size": 32, "resize_size": 36, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "epoch": 3, "val_acc": 0.75, "val_loss": 0.5, "kind": "best"}
    torch.manual_seed(0)
    checkpoint.save_weights(ckpt, backbones.create("resnet18", 2).state_dict(), meta)
    image = next((make_images(tmp_path / "img", {"x": {"a": 1}}) / "x" / "a").iterdir())
    r = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(image), str(tmp_path), "200"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600,
                       env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.splitlines()[-1])
    bad = [x for x in report["results"] if x["rc"] not in (0, 2) or (x["rc"] == 2 and x["err"].count("\n") != 1)
           or (x["rc"] == 2 and not x["err"].startswith("error: checkpoint: "))]
    assert not bad, bad[:5]
    refused = {x["kind"] for x in report["results"] if x["rc"] == 2}
    assert refused == {x["kind"] for x in report["results"]} - {"data bytes"}  # every kind reached a check
    assert sum(x["rc"] == 0 for x in report["results"]) > 10  # and harmless ones still predict
    assert report["peak_mb"] < 3000
