"""Shared fixtures: tiny generated ImageFolder sets (no network, no downloads) and helpers."""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from tl_dist.distributed import free_port  # noqa: F401 - the tests' port helper too

ROOT = Path(__file__).resolve().parents[1]
# Small crops keep every end-to-end run to seconds on 2 cores; the code paths are the real ones.
FAST = ["data.image_size=32", "data.resize_size=36", "data.num_workers=0", "model.weights=none",
        "train.mixed_precision=no", "train.plots=false"]
COLOURS = [(220, 180, 30), (40, 30, 20), (60, 120, 200)]


def make_images(root: Path, counts: dict[str, dict[str, int]], seed: int = 0) -> Path:
    """root/split/class/*.jpg: learnable (class colour blob) small JPEGs of varying size."""
    rng = random.Random(seed)
    for split, per_class in counts.items():
        for ci, (cls, n) in enumerate(per_class.items()):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for j in range(n):
                w, h = rng.choice([(48, 40), (40, 52), (56, 44)])
                img = Image.new("RGB", (w, h), tuple(rng.randint(80, 160) for _ in range(3)))
                dr = ImageDraw.Draw(img)
                x, y = rng.randint(0, w // 2), rng.randint(0, h // 2)
                dr.ellipse([x, y, x + w // 2, y + h // 2], fill=COLOURS[ci % len(COLOURS)])
                img.save(d / f"{cls}_{j:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """2 classes, 22 train, 13 val (odd: exercises uneven sharding)."""
    return make_images(tmp_path_factory.mktemp("tiny"), {"train": {"ants": 11, "bees": 11},
                                                          "val": {"ants": 7, "bees": 6}})


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide state; tests that train in-process each start clean."""
    yield
    from tl_dist.distributed import reset_state
    reset_state()


def train_in_process(out, data_dir, *over) -> int:
    """One training run through the CLI's own main() (exit code), on the demo config at test sizes."""
    from tl_dist.commands import train
    return train.main(["--config", str(ROOT / "configs" / "demo.yaml"), *FAST, f"data.root={data_dir}",
                       "data.demo=false", f"train.output_dir={out}", "data.batch_size=4", *over])


def run_cli(*args: str, env: dict | None = None, timeout: int = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=e, timeout=timeout, cwd=cwd)


def accelerate_launch(n: int, *args: str, timeout: int = 300, extra: tuple = ()) -> subprocess.CompletedProcess:
    port = str(free_port())
    return run_cli("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", port, *extra, "-m", "tl_dist.train", *args, timeout=timeout)


TAG_COLOURS = {"red": (220, 40, 30), "green": (30, 200, 60), "blue": (40, 60, 220)}


def make_tagged(root, n: int, seed: int = 0):
    """n images with a blob per tag (each of red, green, blue with probability 0.45; some none), and
    tags.csv: path,tags with tags separated by ';'."""
    rng = random.Random(seed)
    (root / "img").mkdir(parents=True)
    rows = ["path,tags"]
    for i in range(n):
        tags = sorted(t for t in TAG_COLOURS if rng.random() < 0.45)
        img = Image.new("RGB", (40, 40), (128, 128, 128))
        d = ImageDraw.Draw(img)
        for t in tags:
            x, y = rng.randint(0, 26), rng.randint(0, 26)
            d.ellipse([x, y, x + 14, y + 14], fill=TAG_COLOURS[t])
        img.save(root / "img" / f"{i:03d}.png")
        rows.append(f"img/{i:03d}.png,{';'.join(tags)}")
    (root / "tags.csv").write_text("\n".join(rows) + "\n")
    return root


# a multi-label run over make_tagged's set
ML = ("data.labels=tags.csv", "data.label_column=tags", "data.label_delimiter=;", "data.val_split=0.25")


def sigkill_once_resumable(*args: str, out: Path) -> None:
    """``python ARGS`` (a training run into ``out``), SIGKILLed just after its first epoch is saved
    (resume.pt there): a run killed mid-run, as power loss would."""
    import signal
    import time
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "resume.pt").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"
