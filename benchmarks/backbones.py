"""What each backbone family costs and what tl_dist does with it: the tables in docs/backbones.md.

    PYTHONPATH=. python benchmarks/backbones.py [--archs resnet18,resnet50,timm/convnext_atto,...] [--batch 16] [--steps 3]

For each model (weights none: nothing is downloaded; timm/<name> needs the [timm] extra): its new
head, what a frozen backbone fixes, its default weights (torchvision's DEFAULT, or the timm tag)
and their eval transform, its parameter count, and the images/s of a full
train step (forward, backward, SGD) at the weights' input size on this machine's CPU, as tl_dist
runs it (channels-last where it applies, bf16 autocast where the CPU runs it fast).
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn as nn
import torchvision

from tl_dist import config
from tl_dist.models import backbones, heads, pretrained, timm_zoo
from tl_dist.distributed import resolve_mixed_precision

ARCHS = "resnet18,resnet50,mobilenet_v3_large,efficientnet_b0,convnext_tiny,vit_b_16,regnet_y_800mf,swin_t"
STOCHASTIC_DEPTH = ("StochasticDepth", "DropPath")


def frozen_fixes(m: nn.Module) -> str:
    """What eval mode holds still in a frozen backbone of this model."""
    what = []
    if any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules()):
        what.append("BN stats")
    if any(isinstance(x, nn.LayerNorm) or "LayerNorm" in type(x).__name__ for x in m.modules()):
        what.append("LayerNorm (no stats)")
    if any(isinstance(x, nn.Dropout) and x.p > 0 for x in m.modules()):
        what.append("dropout")
    if any(type(x).__name__ in STOCHASTIC_DEPTH and getattr(x, "p", getattr(x, "drop_prob", 0)) > 0
           for x in m.modules()):
        what.append("stochastic depth")
    return ", ".join(what) or "nothing (no BN/dropout)"


def images_per_second(m: nn.Module, size: int, batch: int, steps: int, bf16: bool, channels_last: bool) -> float:
    m.train()
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=0.001, momentum=0.9)
    x = torch.randn(batch, 3, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(m(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, oneDNN primitive choice
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default=ARCHS)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    bf16 = resolve_mixed_precision("auto", cuda=False) == "bf16"
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}; batch {args.batch}, {'bf16' if bf16 else 'fp32'}\n")
    print("| model | head | frozen backbone fixes | DEFAULT weights | eval transform | params | train images/s |")
    print("|---|---|---|---|---|---:|---:|")
    for arch in args.archs.split(","):
        mcfg = config.ModelConfig(arch=arch, weights="none")
        size, resize, interpolation, _, _ = backbones.reference_transform(mcfg)
        if timm_zoo.is_timm(arch):
            from timm.models import get_pretrained_cfg
            tag = get_pretrained_cfg(timm_zoo.name_of(arch))
            weights = f"{tag.architecture}.{tag.tag}" if tag is not None else "-"
        else:
            weights = pretrained.reference_weights(mcfg).name
        torch.manual_seed(0)
        m = backbones.create(arch, 10, backbones.arch_kwargs(mcfg, size))
        params = sum(p.numel() for p in m.parameters())
        ips = images_per_second(m, size, args.batch, args.steps, bf16, backbones.uses_channels_last(mcfg))
        print(f"| {arch} | `{heads.head_name(m)}` | {frozen_fixes(m)} | {weights} | resize {resize}, "
              f"crop {size}, {interpolation} | {params / 1e6:.1f} M | {ips:.1f} |", flush=True)


if __name__ == "__main__":
    main()
