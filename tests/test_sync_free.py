"""The steady-state train step and evaluation never make the host wait for the device.

A GPU runs ahead of Python only if the loop never reads a device value: ``.item()``, ``.tolist()``,
``bool(tensor)``, boolean-mask indexing (``out[ok]``: a nonzero), ``.cpu()``... On the CPU there is no
device to wait for, so the test counts the calls of those functions made by tl_dist's own code: an
epoch of 2N steps must make exactly as many as an epoch of N (the epoch's end may read its sums, a
step may not). Where CUDA exists, the same steps run under ``torch.cuda.set_sync_debug_mode("error")``.
"""
from pathlib import Path

import pytest
import torch

from tl_dist import config
from tl_dist.distributed import StopRequest, reset_state
from tl_dist.files.run_dir import RunLock
from tl_dist.training import engine, setup

from .conftest import FAST, ML, ROOT, make_images, make_tagged

PACKAGE = str(Path(engine.__file__).resolve().parents[1])
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero", "cpu", "numpy")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts the device reads tl_dist's code makes (not torch's own internals)."""
    calls: list[str] = []

    def counted(name, real):
        def wrapper(self, *a, **k):
            caller = __import__("sys")._getframe(1).f_code.co_filename
            if caller.startswith(PACKAGE):
                calls.append(f"{name} in {Path(caller).name}")
            return real(self, *a, **k)
        return wrapper
    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    real_getitem = torch.Tensor.__getitem__

    def getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            caller = __import__("sys")._getframe(1).f_code.co_filename
            if caller.startswith(PACKAGE):
                calls.append(f"boolean index in {Path(caller).name}")
        return real_getitem(self, index)
    monkeypatch.setattr(torch.Tensor, "__getitem__", getitem)
    return calls


def epoch_reads(tmp_path, images: int, over: tuple, reads: list[str]) -> tuple[int, int]:
    """(reads in one train epoch, reads in one evaluation) on a fresh run of ``images`` per class."""
    run = set_up_run(tmp_path, images, over)
    d = run.data
    d.train_sampler.set_epoch(0)
    run.schedule.start_epoch(0)
    with StopRequest() as stop:
        before = len(reads)
        engine.train_one_epoch(run.accelerator, run.net, run.step, d.train_loader, d.train_sampler, run.settings, 0,
                               schedule=run.schedule, ema=run.ema, stop=stop, tracking=run.tracking)
        train = len(reads) - before
    before = len(reads)
    engine.evaluate(run.accelerator, run.net, d.val_loader, run.settings, len(d.classes), 0)
    return train, len(reads) - before


def set_up_run(tmp_path, images: int, over: tuple) -> setup.Run:
    reset_state()
    root = tmp_path / f"d{images}"
    if "data.labels=tags.csv" in over:
        make_tagged(root, images * 2)
    else:
        make_images(root, {"train": {"a": images, "b": images}, "val": {"a": images, "b": images}})
    cfg = config.load(ROOT / "configs" / "demo.yaml", [*FAST, f"data.root={root}", "data.demo=false", "data.batch_size=2",
                                                      f"train.output_dir={tmp_path / f'run{images}'}", *over])
    from tl_dist.models import backbones
    return setup.set_up(backbones.resolve(cfg), RunLock())


RECIPE = ("model.arch=shufflenet_v2_x0_5", "train.grad_accum_steps=2", "scheduler.name=cosine",
          "scheduler.warmup_epochs=0.5", "train.ema_decay=0.9", "train.label_smoothing=0.1",
          "train.class_weights=balanced", "train.mixup_alpha=0.2", "train.cutmix_alpha=1.0", "data.eval_batch_size=2")


@pytest.mark.parametrize("task", ["single_label", "multi_label"])
def test_a_step_makes_the_host_wait_for_nothing(tmp_path, host_reads, task):
    over = RECIPE + (ML if task == "multi_label" else ())
    small, large = epoch_reads(tmp_path, 6, over, host_reads), epoch_reads(tmp_path, 12, over, host_reads)
    assert small == large, f"per-step device reads: {host_reads}"
    assert small[0] > 0  # (the epoch's end reads its sums: the counter sees tl_dist's reads)


def test_an_epoch_on_kept_features_makes_the_host_wait_for_nothing(tmp_path, host_reads):
    """train.feature_cache: the epochs after the first run the classifier on kept features."""
    from tl_dist.training import trainer

    def cached_epoch(images: int) -> int:
        run = set_up_run(tmp_path, images, ("model.mode=frozen", "data.augment=none", "train.epochs=3"))
        with StopRequest() as stop:
            for epoch in (0, 1):  # the first records the features, the second uses them
                run.data.train_sampler.set_epoch(epoch)
                run.schedule.start_epoch(epoch)
                before = len(host_reads)
                trainer.train_epoch(run, epoch, stop)
                assert run.features.ready
        return len(host_reads) - before
    assert cached_epoch(6) == cached_epoch(12), f"per-step device reads: {host_reads}"


def test_the_counter_catches_a_read_in_the_step(tmp_path, host_reads, monkeypatch):
    real = engine.hits
    # a step that reads the host's view of something each time (engine.failed: .tolist(), a boolean index)
    monkeypatch.setattr(engine, "hits", lambda out, y, t=0.5: (engine.failed([torch.tensor([0])]), real(out, y, t))[1])
    small, large = epoch_reads(tmp_path, 6, RECIPE, host_reads), epoch_reads(tmp_path, 12, RECIPE, host_reads)
    assert large[0] > small[0]


def test_one_process_decides_to_stop_without_a_tensor():
    class One:
        num_processes = 1
    stop = StopRequest()
    assert stop.check(One()) is False
    stop.signum = 15
    assert stop.check(One()) is True and stop.check(One(), now=True) is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.set_sync_debug_mode checks "
                    "device synchronisation, which the CPU does not have (the counting tests above stand in)")
def test_the_steady_state_step_runs_under_sync_debug_mode_error(tmp_path):
    reset_state()
    root = make_images(tmp_path / "d", {"train": {"a": 8, "b": 8}, "val": {"a": 4, "b": 4}})
    cfg = config.load(ROOT / "configs" / "demo.yaml", [*FAST, f"data.root={root}", "data.demo=false", "data.batch_size=4",
                                                      f"train.output_dir={tmp_path / 'run'}", *RECIPE[:-1],
                                                      "train.mixed_precision=bf16", "data.cache=device"])
    from tl_dist.models import backbones
    from tl_dist.training.sync_check import steady_state_steps
    run = setup.set_up(backbones.resolve(cfg), RunLock())
    with StopRequest() as stop:
        assert steady_state_steps(run, stop, steps=3) == 3
