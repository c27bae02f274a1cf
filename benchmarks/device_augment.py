"""The device cache's augmentation alone, at a training batch: where a GPU step's host time goes.

    PYTHONPATH=. python benchmarks/device_augment.py [--batch 256] [--images 2048] [--steps 20]

Photo-sized uint8 images (the synthetic set's sizes) held on the device, batches built by
DeviceTrainLoader exactly as training builds them (the per-sample draws, crop, antialiased resize,
flip). Per batch: the host's time to issue it (what competes with launching the train step) and
the time until the device has finished it, for the resampling called directly and through
F.interpolate (the same kernels). Runs on a CPU too, where both times are the whole work.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from tl_dist.config import DataConfig
from tl_dist.data import device_cache

SIZES = [(500, 375), (375, 500), (500, 333), (500, 281), (640, 480), (400, 400), (800, 600)]  # make_data.py's


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rng = random.Random(0)
    images = []
    for _ in range(a.images):
        w, h = rng.choice(SIZES)
        images.append(torch.randint(0, 256, (3, h, w), dtype=torch.uint8, device=dev))
    cfg = DataConfig()
    cfg.image_size, cfg.resize_size, cfg.interpolation = 224, 256, "bilinear"
    batches = [[(rng.randrange(a.images), s, 1.0) for _ in range(a.batch)] for s in range(a.steps)]
    loader = device_cache.DeviceTrainLoader(images, [0] * a.images, batches, cfg, 0, dev, 2)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    direct = dict(device_cache._RESAMPLE)
    print(f"device {dev} ({torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}), torch {torch.__version__}, "
          f"batch {a.batch}, {a.steps} batches")
    for name, table in (("resampling called directly", direct), ("through F.interpolate", {})):
        device_cache._RESAMPLE = table
        loader.batch(batches[0])  # (first-call costs)
        sync()
        host, whole = [], []
        for keys in batches:
            t0 = time.perf_counter()
            loader.batch(keys)
            host.append(time.perf_counter() - t0)
            sync()
            whole.append(time.perf_counter() - t0)
        h, w = statistics.median(host) * 1e3, statistics.median(whole) * 1e3
        print(f"{name}: host {h:.1f} ms/batch ({h * 1e3 / a.batch:.0f} us/image), until done {w:.1f} ms/batch = "
              f"{a.batch / w * 1e3:,.0f} images/s")
    device_cache._RESAMPLE = direct


if __name__ == "__main__":
    main()
