"""The steady-state train step under ``torch.cuda.set_sync_debug_mode("error")``: proof, on a GPU,
that the host never waits for the device between optimizer steps (``tl-dist doctor`` and the tests).

The steps are the epoch loop's own pieces in its order (inputs to the device, the schedule, MixUp /
CutMix, the train step, the weights' average, the stop request); the first step runs before the
check, since first uses set things up (allocator pools, cuBLAS handles) that may synchronise once.
"""
from __future__ import annotations

import torch

from tl_dist.training import engine, mixing


def steady_state_steps(run, stop, steps: int = 4) -> int:
    """``steps`` optimizer steps after a first one, on ``run`` (training.setup.Run), with CUDA's
    sync debug mode raising on any synchronising call; returns the steps checked."""
    d, settings, world = run.data, run.settings, run.accelerator.num_processes
    d.train_sampler.set_epoch(0)
    run.schedule.start_epoch(0)
    run.step.begin_epoch(run.net, settings)
    run.net.train()
    done, checked = 0, 0
    try:
        for micro, batch in enumerate(d.train_loader):
            if micro > steps:
                break
            if micro == 1:
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
            x, y, w, _ = engine.to_device(batch, run.accelerator.device, settings)
            images = d.train_sampler.global_count(micro)
            run.schedule.before_optimizer_step(0, done)
            done += images
            mix = None
            if settings.mixes:
                drawn = mixing.draw(settings.seed, 0, micro * world + run.accelerator.process_index,
                                    settings.mixup_alpha, settings.cutmix_alpha, settings.mix_prob, x.shape[2],
                                    x.shape[3])
                x, mix = mixing.apply(x, y, drawn)
            run.step(x, y, w, world / images, True, mix)
            if run.ema is not None:
                run.ema.update()
            stop.check(run.accelerator)
            checked += micro >= 1
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return checked
