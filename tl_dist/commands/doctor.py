"""tl-dist doctor: what this machine has, and a self-test of every feature it can run.

    tl-dist doctor            the environment, then a table: feature, PASS / FAIL / SKIPPED, why
    tl-dist doctor --json     the same as one JSON object (for scripts)

Run it first on a new machine or cluster node. The self-test trains on a tiny generated data set
(nothing is downloaded) and takes under a minute: fp32 and the precision `auto` picks,
channels-last, the RAM cache, the device cache with its augmentation against the PIL path, a CUDA
graph replay against the eager step, the background checkpoint writer, and a 2-process job with the
cross-rank weight check (gloo on the CPU, NCCL across 2 GPUs). Exit 0 when nothing failed, 1 if
something did; a FAIL names the config key that avoids the feature.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from tl_dist.errors import one_line


PASS, FAIL, SKIPPED = "PASS", "FAIL", "SKIPPED"


EXIT_FAILED = 1


@dataclass
class Check:
    feature: str
    status: str
    detail: str
    seconds: float = 0.0


class Skip(Exception):
    """A feature this machine cannot run (no GPU, one GPU, ...): the reason is the message."""


# ----------------------------------------------------------------------------- environment

def environment() -> dict:
    import torch

    from tl_dist.config import ModelConfig
    from tl_dist.distributed import cpu_flags, resolve_mixed_precision
    from tl_dist.models.pretrained import reference_weights
    from tl_dist.training.reporting import versions

    cuda = torch.cuda.is_available()
    gpus = []
    for i in range(torch.cuda.device_count() if cuda else 0):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / 2**30, 1),
                     "capability": f"{p.major}.{p.minor}", "bf16": p.major >= 8})
    flags = cpu_flags()
    weights = reference_weights(ModelConfig())
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    return {
        **versions(), "platform": platform.platform(),
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda and hasattr(torch.cuda, "nccl") else None,
        "gpus": gpus,
        "cpu": {"cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
                "avx512f": "avx512f" in flags},
        "mixed_precision_auto": resolve_mixed_precision("auto", cuda),
        "torch_hub_dir": torch.hub.get_dir(),
        "default_weights": {"file": str(cached), "cached": cached.is_file()},
    }


# ----------------------------------------------------------------------------- the self-test

def tiny_set(root: Path, per_class: int = 8, val_per_class: int = 4) -> Path:
    """Two learnable classes (a dark or a light disc) as small JPEGs: root/train|val/class/*.jpg."""
    from PIL import Image, ImageDraw

    rng = random.Random(0)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for ci, cls in enumerate(("dark", "light")):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for j in range(n):
                img = Image.new("RGB", (48, 40), tuple(rng.randint(90, 150) for _ in range(3)))
                x, y = rng.randint(0, 20), rng.randint(0, 16)
                ImageDraw.Draw(img).ellipse([x, y, x + 24, y + 20], fill=(20, 20, 20) if ci == 0 else (240, 240, 240))
                img.save(d / f"{cls}_{j}.jpg", quality=90)
    return root


class SelfTest:
    """The checks, sharing one scratch folder and one tiny data set."""

    def __init__(self, work: Path):
        import torch

        self.work = work
        self.data = tiny_set(work / "data")
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.runs = 0

    def train(self, *overrides: str) -> tuple[Path, str]:
        """A one-epoch run in this process, its output folder and log; raises on failure."""
        from tl_dist import config, distributed
        from tl_dist.training import trainer

        self.runs += 1
        out = self.work / f"run{self.runs}"
        cfg = config.load(None, [f"data.root={self.data}", f"train.output_dir={out}", "model.weights=none",
                                 "data.image_size=32", "data.resize_size=36", "data.batch_size=4",
                                 "data.num_workers=0", "train.epochs=1", "train.plots=false",
                                 "train.mixed_precision=no", *overrides])
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                trainer.fit(cfg)
        finally:
            distributed.reset_state()  # the next run makes its own Accelerator
        return out, log.getvalue()

    # Each check returns its detail for PASS, raises Skip(why) or fails with any other exception.

    def fp32(self) -> str:
        from tl_dist.predictor import Predictor

        out, _ = self.train()
        best = json.loads((out / "best.json").read_text())
        p = Predictor.from_checkpoint(out, device="cpu")
        paths = sorted((self.data / "val").rglob("*.jpg"))
        acc = sum(r["label"] == x.parent.name for r, x in zip(p.predict([str(x) for x in paths]), paths)) / len(paths)
        if acc != best["val_acc"]:
            raise RuntimeError(f"the predictor scores {acc:.4f} on val, the run {best['val_acc']:.4f}")
        return f"train, checkpoint, predict on {self.device.type}"

    def timm_backbone(self) -> str:
        import importlib.util

        from tl_dist.predictor import Predictor

        if importlib.util.find_spec("timm") is None:
            raise Skip("timm is not installed (pip install -e '.[timm]' for model.arch=timm/<name>)")
        out, _ = self.train("model.arch=timm/resnet18", "model.mode=frozen")
        best = json.loads((out / "best.json").read_text())
        paths = sorted((self.data / "val").rglob("*.jpg"))
        p = Predictor.from_checkpoint(out, device="cpu")
        acc = sum(r["label"] == x.parent.name for r, x in zip(p.predict([str(x) for x in paths]), paths)) / len(paths)
        if acc != best["val_acc"]:
            raise RuntimeError(f"the predictor scores {acc:.4f} on val, the run {best['val_acc']:.4f}")
        return f"timm/resnet18 (timm {best['versions'].get('timm')}): train, checkpoint, predict"

    def auto_precision(self) -> str:
        from tl_dist.distributed import resolve_mixed_precision

        mp = resolve_mixed_precision("auto", self.cuda)
        if mp == "no":
            raise Skip("auto picks no here (no GPU; the CPU has no AVX512-BF16/AMX): the fp32 row covers it")
        out, _ = self.train("train.mixed_precision=auto")
        loss = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["train_loss"]
        if not loss == loss or loss > 1e3:
            raise RuntimeError(f"train loss {loss}")
        return f"auto = {mp} on {self.device.type}"

    def channels_last(self) -> str:
        import torch
        import torchvision

        torch.manual_seed(0)
        m = torchvision.models.resnet18(num_classes=2).eval().to(self.device)
        x = torch.randn(4, 3, 64, 64, device=self.device)
        with torch.inference_mode():
            a = m(x)
            b = m.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
        diff = (a - b).abs().max().item()
        if diff > 1e-3:
            raise RuntimeError(f"channels-last output differs by {diff:.2e} (set model.channels_last=false)")
        self.train("model.channels_last=true", "model.mode=frozen")
        return f"same outputs (max difference {diff:.1e}); a run trains"

    def ram_cache(self) -> str:
        import torch

        from tl_dist.data import listing, loaders
        from tl_dist.config import load
        from tl_dist.models.backbones import resolve

        classes, train, val = listing.list_splits(str(self.data))
        batches = []
        for cache in ("none", "ram"):
            cfg = resolve(load(None, ["data.image_size=32", "data.num_workers=0", f"data.cache={cache}"])).data
            d = loaders.build(cfg, classes, train, val, seed=0)
            batches.append(torch.cat([b[0] for b in d.train_loader]))
        if not torch.equal(*batches):
            raise RuntimeError("the RAM cache gives other pixels than reading the files (set data.cache=none)")
        self.train("data.cache=ram")
        return "same pixels as from the files; a run trains"

    def device_cache(self) -> str:
        import torch

        from tl_dist.data import device_cache, listing, loaders
        from tl_dist.config import load
        from tl_dist.models.backbones import resolve

        if not self.cuda:
            raise Skip("no CUDA device")
        classes, train, val = listing.list_splits(str(self.data))
        over = ["data.image_size=32", "data.num_workers=0", "data.batch_size=8"]
        ram = loaders.build(resolve(load(None, [*over, "data.cache=ram"])).data, classes, train, val, seed=0)
        dev = loaders.build(resolve(load(None, [*over, "data.cache=device"])).data, classes, train, val, seed=0,
                         device=self.device)
        if dev.warning:
            raise RuntimeError(f"{dev.warning} (set data.cache=ram)")
        a = torch.cat([b[0] for b in ram.train_loader]).float()
        b = torch.cat([b[0].cpu() for b in dev.train_loader]).float()
        diff = (a - b).abs()
        if diff.mean() > device_cache.AGREE_MEAN or diff.max() > device_cache.AGREE_MAX:
            raise RuntimeError(f"GPU augmentation differs from PIL's by {diff.mean():.2f} on average "
                               f"(set data.cache=ram)")
        self.train("data.cache=device")
        return f"GPU crops within {diff.mean():.2f} (mean) / {diff.max():.0f} (max) of 255 of PIL's; a run trains"

    def cuda_graph(self) -> str:
        import torch
        from safetensors.torch import load_file

        if not self.cuda:
            raise Skip("no CUDA device")
        common = ("model.mode=finetune", "data.batch_size=2", "data.cache=ram")
        eager, _ = self.train(*common)
        graph, log = self.train(*common, "train.cuda_graphs=true")
        if "warning: train.cuda_graphs" in log:
            raise RuntimeError(next(line for line in log.splitlines() if "train.cuda_graphs" in line)[:200]
                               + " (set train.cuda_graphs=false)")
        a, b = load_file(str(eager / "last.safetensors")), load_file(str(graph / "last.safetensors"))
        worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].is_floating_point())
        if worst > 1e-3:
            raise RuntimeError(f"weights after graph replays differ from eager steps by {worst:.1e} "
                               f"(set train.cuda_graphs=false)")
        torch.cuda.synchronize()
        return f"captured and replayed; weights match the eager run within {worst:.1e}"

    def sync_free(self) -> str:
        """The steady-state step under torch.cuda.set_sync_debug_mode("error")."""
        from tl_dist import config, distributed
        from tl_dist.distributed import StopRequest
        from tl_dist.files.run_dir import RunLock
        from tl_dist.models.backbones import resolve
        from tl_dist.training import setup
        from tl_dist.training.sync_check import steady_state_steps

        if not self.cuda:
            raise Skip("no CUDA device (the CPU has no device to wait for)")
        self.runs += 1
        cfg = config.load(None, [f"data.root={self.data}", f"train.output_dir={self.work / f'run{self.runs}'}",
                                 "model.weights=none", "data.image_size=32", "data.resize_size=36",
                                 "data.batch_size=2", "data.num_workers=0", "train.plots=false",
                                 "train.ema_decay=0.9", "scheduler.name=cosine", "train.mixup_alpha=0.2"])
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), StopRequest() as stop:
                steps = steady_state_steps(setup.set_up(resolve(cfg), RunLock()), stop, steps=3)
        finally:
            distributed.reset_state()
        return f"{steps} steps (schedule, MixUp, EMA, stop check) ran with no synchronising call"

    def background_writer(self) -> str:
        import torch
        from safetensors.torch import load_file

        from tl_dist.files import background_writer, checkpoint

        w = background_writer.BackgroundWriter(background=True)
        state = {"w": torch.arange(1000, dtype=torch.float32).reshape(10, 100)}
        path = self.work / "writer" / "x.safetensors"
        path.parent.mkdir()
        w.submit(lambda: checkpoint.save_weights(path, state, {"classes": ["a", "b"], "num_classes": 2}))
        w.close()
        back = load_file(str(path))
        if not torch.equal(back["w"], state["w"]):
            raise RuntimeError("the file written in the background reads back different")
        return "a file written on the writer thread reads back identical"

    def two_processes(self) -> str:
        import torch

        from tl_dist import distributed

        gpus = torch.cuda.device_count() if self.cuda else 0
        backend = "nccl, 2 GPUs" if gpus >= 2 else "gloo, CPU"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        if gpus < 2:
            env["CUDA_VISIBLE_DEVICES"] = ""  # one GPU cannot hold two ranks: the CPU group checks the rest
        out = self.work / "two"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(distributed.free_port()), "-m", "tl_dist.train",
               f"data.root={self.data}", f"train.output_dir={out}", "model.weights=none", "data.image_size=32",
               "data.resize_size=36", "data.batch_size=4", "data.num_workers=0", "train.epochs=1",
               "train.plots=false", "train.mixed_precision=no", "train.collective_timeout=60"]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
        if r.returncode != 0:
            last = next((line for line in reversed(r.stderr.splitlines()) if line.strip()), "no output")
            raise RuntimeError(f"exit {r.returncode}: {last[:200]}")
        row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        if not row.get("weights_digest"):
            raise RuntimeError("the cross-rank weight check did not run")
        return f"{backend}: one epoch, both ranks hold the same weights"


# feature, check method, the config key that turns the feature off
CHECKS: list[tuple[str, str, str]] = [
    ("fp32 train + predict", "fp32", "-"),
    ("mixed precision auto", "auto_precision", "train.mixed_precision=no"),
    ("channels-last", "channels_last", "model.channels_last=false"),
    ("RAM image cache", "ram_cache", "data.cache=none"),
    ("device cache + GPU augmentation", "device_cache", "data.cache=ram"),
    ("CUDA graph replay", "cuda_graph", "train.cuda_graphs=false"),
    ("train step without host waits", "sync_free", "-"),
    ("background checkpoint writer", "background_writer", "-"),
    ("2-process group + rank check", "two_processes", "-"),
    ("timm backbone", "timm_backbone", "-"),
]


def run_checks(work: Path, on_result: Callable[[Check], None] = lambda c: None) -> list[Check]:
    test = SelfTest(work)
    results = []
    for feature, method, key in CHECKS:
        t0 = time.perf_counter()
        try:
            status, detail = PASS, getattr(test, method)()
        except Skip as e:
            status, detail = SKIPPED, str(e)
        except Exception as e:  # noqa: BLE001 - a failed feature is a row, not the end of the doctor
            status, detail = FAIL, one_line(f"{type(e).__name__}: {e}")[:300]
            if key != "-" and key not in detail:
                detail += f" (runs avoid it with {key})"
        results.append(Check(feature, status, detail, round(time.perf_counter() - t0, 1)))
        on_result(results[-1])
    return results


# ----------------------------------------------------------------------------- command line

def _print_environment(env: dict) -> None:
    gpus = "; ".join(f"{g['index']}: {g['name']} {g['memory_gib']} GiB, sm {g['capability']}, "
                     f"bf16 {'yes' if g['bf16'] else 'no'}" for g in env["gpus"]) or "none"
    cpu = env["cpu"]
    lines = [
        f"tl_dist {env['tl_dist']}  python {env['python']}  {env['platform']}",
        f"torch {env['torch']}  torchvision {env['torchvision']}  accelerate {env['accelerate']}",
        f"CUDA {env['cuda'] or '-'}  cuDNN {env['cudnn'] or '-'}  NCCL {env['nccl'] or '-'}",
        f"GPUs: {gpus}",
        f"CPU: {cpu['cores']} cores; AVX512-BF16 {'yes' if cpu['avx512_bf16'] else 'no'}, "
        f"AMX-BF16 {'yes' if cpu['amx_bf16'] else 'no'} -> mixed_precision auto = {env['mixed_precision_auto']}",
        f"torch hub: {env['torch_hub_dir']}; resnet18 ImageNet weights "
        f"{'cached' if env['default_weights']['cached'] else 'not cached (downloaded on first use)'}",
    ]
    print("\n".join(lines), flush=True)


def main(argv: Sequence[str] | None = None, prog: str = "tl-dist doctor") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0].split(": ", 1)[1],
                                epilog="Run it first on a new machine or node. Exit 0: nothing failed; 1: a "
                                       "feature failed (the row names the config key that avoids it).")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))

    env = environment()
    if not args.json:
        _print_environment(env)
        print("self-test (under a minute):", flush=True)

    def show(c: Check) -> None:
        if not args.json:
            print(f"  {c.feature:<32} {c.status:<8} {c.detail}  ({c.seconds:.1f}s)", flush=True)

    with tempfile.TemporaryDirectory(prefix="tl_dist-doctor-") as work:
        results = run_checks(Path(work), show)
    failed = [c for c in results if c.status == FAIL]
    if args.json:
        print(json.dumps({"environment": env, "checks": [asdict(c) for c in results], "ok": not failed}))
    else:
        print(f"{len(failed)} failed, {sum(c.status == PASS for c in results)} passed, "
              f"{sum(c.status == SKIPPED for c in results)} skipped", flush=True)
    return EXIT_FAILED if failed else 0


if __name__ == "__main__":
    sys.exit(main())
