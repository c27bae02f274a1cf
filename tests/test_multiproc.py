"""Real multi-process training on CPU (gloo) under accelerate launch."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tl_dist.models import backbones, heads

from .conftest import FAST, ML, ROOT, accelerate_launch, free_port, make_images, make_tagged, run_cli

pytestmark = pytest.mark.multiproc


def _args(data_dir, out, *over):
    return ["--config", str(ROOT / "configs" / "demo.yaml"), *FAST, f"data.root={data_dir}", "data.demo=false",
            f"train.output_dir={out}", *over]


def test_two_processes_one_job_one_writer(tiny_data, tmp_path):
    r = accelerate_launch(2, *_args(tiny_data, tmp_path, "train.epochs=2", "data.batch_size=3"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es)" in r.stdout
    assert r.stdout.count("epoch 0 (1 of 2) ") == 1 and r.stdout.count("epoch 1 (2 of 2) ") == 1  # rank 0 alone prints
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["world_size"] == 2
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_samples"] for r in rows] == [13, 13]  # odd val set: nothing counted twice or dropped
    assert [r["train_samples"] for r in rows] == [22, 22]  # padding to even out ranks is not counted
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no stray temp files


@pytest.mark.parametrize("cache", ["ram", "device"])
def test_frozen_parity_one_vs_two_processes(tiny_data, tmp_path, cache):
    """1 process with batch 2B == 2 processes with batch B: same fc weights, same val metrics, with the
    PIL data path and with the device path (images held and augmented on the training device)."""
    save_file(backbones.create("resnet18", 1000).state_dict(), str(tmp_path / "init.safetensors"))
    common = ("model.mode=frozen", f"model.weights={tmp_path / 'init.safetensors'}", "train.epochs=2",
              "optim.lr=0.05", f"data.cache={cache}")
    one = run_cli("-m", "tl_dist.train", *_args(tiny_data, tmp_path / "one", *common, "data.batch_size=6"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = accelerate_launch(2, *_args(tiny_data, tmp_path / "two", *common, "data.batch_size=3"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (load_file(str(tmp_path / n / "last.safetensors")) for n in ("one", "two"))
    assert not torch.allclose(a["fc.weight"], load_file(str(tmp_path / "init.safetensors"))["fc.weight"][:2])
    torch.testing.assert_close(a["fc.weight"], b["fc.weight"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["fc.bias"], b["fc.bias"], rtol=1e-5, atol=1e-6)
    ra, rb = ([json.loads(l) for l in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("one", "two"))
    for x, y in zip(ra, rb):
        assert x["val_acc"] == y["val_acc"] and x["val_samples"] == y["val_samples"] == 13
        assert abs(x["val_loss"] - y["val_loss"]) < 1e-5 and abs(x["train_loss"] - y["train_loss"]) < 1e-5
    # each optimizer step's loss (over both ranks) and learning rate: the one-process step's
    from tl_dist.files import resume_file
    sa, sb = (resume_file.load_state(tmp_path / n / "resume.pt")["steps"] for n in ("one", "two"))
    assert sa.shape == sb.shape == (8, 4) and torch.equal(sa[:, [0, 2, 3]], sb[:, [0, 2, 3]])
    torch.testing.assert_close(sa[:, 1], sb[:, 1], rtol=1e-5, atol=1e-6)


def test_two_process_resume_continues(tiny_data, tmp_path):
    """The resume state is read on rank 0 and broadcast: every rank continues from it."""
    r = accelerate_launch(2, *_args(tiny_data, tmp_path, "train.epochs=1", "data.batch_size=3"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = accelerate_launch(2, *_args(tiny_data, tmp_path, "train.epochs=2", "data.batch_size=3"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout and r.stdout.count("epoch 1 (2 of 2) ") == 1 and "epoch 0 (1 of 2) " not in r.stdout
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in rows] == [0, 1]


def _node(rank, port, data_dir, out, *over):
    """One machine of a 2-machine job through ./launch.sh and its documented environment variables."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable,
           "NUM_MACHINES": "2", "MACHINE_RANK": str(rank), "MAIN_PROCESS_IP": "127.0.0.1",
           "MAIN_PROCESS_PORT": str(port), "NUM_GPUS": "0"}
    cmd = ["./launch.sh", str(ROOT / "configs" / "demo.yaml"), *_args(data_dir, out, *over)[2:]]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_launch_sh_without_gpu_runs_one_cpu_process(tiny_data, tmp_path):
    import os
    import subprocess
    import sys
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    r = subprocess.run(["./launch.sh", str(ROOT / "configs" / "demo.yaml"),
                        *_args(tiny_data, tmp_path, "train.epochs=1")[2:]],
                       env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "1 process(es) on cpu" in r.stdout and (tmp_path / "best.safetensors").exists()
    r = subprocess.run(["./launch.sh"], env=env, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "usage" in r.stderr


def test_two_machines_one_job(tiny_data, tmp_path):
    """Two launches with num_machines=2 on 127.0.0.1 form one job equal to a 2-process run."""
    port = free_port()
    common = ("train.epochs=1", "data.batch_size=3")
    nodes = [_node(r, port, tiny_data, tmp_path / f"node{r}", *common) for r in (0, 1)]
    outs = [n.communicate(timeout=300) for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert json.loads((tmp_path / "node0" / "best.json").read_text())["world_size"] == 2
    assert not (tmp_path / "node1").exists()  # one writer: global rank 0 only
    single = accelerate_launch(2, *_args(tiny_data, tmp_path / "single", *common))
    assert single.returncode == 0, single.stderr[-2000:]
    a, b = (load_file(str(tmp_path / n / "last.safetensors")) for n in ("node0", "single"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_failure_on_one_rank_ends_the_job_promptly(tiny_data, tmp_path):
    """Machine 1 has no data: both machines stop at once with machine 1's message, no hang."""
    import time
    port = free_port()
    t0 = time.time()
    nodes = [_node(0, port, tiny_data, tmp_path / "out", "train.epochs=1"),
             _node(1, port, tmp_path / "missing", tmp_path / "out", "train.epochs=1")]
    outs = [n.communicate(timeout=120) for n in nodes]
    assert time.time() - t0 < 60
    assert all(n.returncode != 0 for n in nodes)
    assert "(on rank 1) data: data.root not found" in outs[0][1]
    assert not (tmp_path / "out" / "last.safetensors").exists()


@pytest.mark.parametrize("other", ["a class more", "other pixels"])
def test_machines_with_different_copies_of_the_data_are_refused_before_training(tiny_data, tmp_path, other):
    """Machine 1's copy has a class more (DDP would fail on the head's shape), or the same names and
    sizes class by class but other pixels (the job would train on silently): one line names it."""
    counts = {"train": {"ants": 11, "bees": 11}, "val": {"ants": 7, "bees": 6}}
    if other == "a class more":
        copy = make_images(tmp_path / "copy", {s: {**c, "wasps": 3} for s, c in counts.items()})
    else:
        copy = make_images(tmp_path / "copy", counts, seed=1)  # same file names, other images
    port = free_port()
    nodes = [_node(0, port, tiny_data, tmp_path / "out", "train.epochs=1"),
             _node(1, port, copy, tmp_path / "out", "train.epochs=1")]
    outs = [n.communicate(timeout=120) for n in nodes]
    assert all(n.returncode != 0 for n in nodes), outs[0][1][-2000:]
    lines = [line for line in outs[0][1].splitlines() if line.startswith("error:")]
    # one line from tl_dist (the launcher prints its own report of a failed worker)
    assert len(lines) == 1 and f"{ROOT / 'tl_dist'}" not in outs[0][1] + outs[1][1], outs[0][1][-3000:]
    words = "classes differ (only on rank 0: none; only there: wasps)" if other == "a class more" else \
        "the same file names but other contents (compared: file sizes and bytes)"
    assert "data: rank 1" in lines[0] and words in lines[0], lines[0]
    assert not (tmp_path / "out" / "last.safetensors").exists()


def test_file_failing_during_training_handled_on_every_rank(tmp_path):
    """A PNG whose header and end are intact passes the scan but cannot be decoded: no hang."""
    import numpy as np
    from PIL import Image

    from .conftest import make_images
    data_dir = make_images(tmp_path / "d", {"train": {"a": 6, "b": 6}, "val": {"a": 3, "b": 3}})
    bad = data_dir / "train" / "a" / "corrupt.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(bad)
    b = bytearray(bad.read_bytes())
    b[len(b) // 3:len(b) // 3 + 50] = bytes(x ^ 0xFF for x in b[len(b) // 3:len(b) // 3 + 50])
    bad.write_bytes(bytes(b))
    r = accelerate_launch(2, *_args(data_dir, tmp_path / "stop", "train.epochs=1", "data.cache=none"), timeout=120)
    assert r.returncode != 0 and "corrupt.png" in r.stderr and "failed to decode during epoch 0" in r.stderr
    r = accelerate_launch(2, *_args(data_dir, tmp_path / "skip", "train.epochs=1", "data.cache=none",
                                    "data.skip_bad_images=true"), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "corrupt.png" in r.stdout
    assert json.loads((tmp_path / "skip" / "metrics.jsonl").read_text())["train_samples"] == 12


def _params(path):
    """The trainable tensors of a checkpoint (BatchNorm running statistics left out)."""
    return {k: v for k, v in load_file(str(path)).items()
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


# A BatchNorm model and a LayerNorm one; the keys that must move once the backbone trains.
UNFREEZE = {"resnet18": ("conv1.weight", "layer4.1.conv2.weight", "layer1.0.bn1.running_mean"),
            "convnext_tiny": ("features.0.0.weight", "features.7.2.block.5.weight", "features.1.0.block.2.weight")}


@pytest.mark.parametrize("arch", UNFREEZE)
def test_frozen_then_finetune_under_ddp(tiny_data, tmp_path, arch):
    """Frozen epochs leave the backbone bit-identical; after the switch it trains, on every rank alike."""
    init = tmp_path / "init.safetensors"
    save_file(backbones.create(arch, 1000).state_dict(), str(init))
    head = heads.head_name(backbones.create(arch, 2))
    common = ("model.mode=frozen_then_finetune", "model.unfreeze_epoch=2", f"model.weights={init}",
              f"model.arch={arch}", "data.batch_size=3", "optim.lr=0.05", "optim.backbone_lr=0.01")
    r = accelerate_launch(2, *_args(tiny_data, tmp_path / "run", *common, "train.epochs=1"))
    assert r.returncode == 0, r.stderr[-3000:]
    start = {k: v for k, v in load_file(str(init)).items() if not heads.in_head(k, head)}
    after_frozen = load_file(str(tmp_path / "run" / "last.safetensors"))
    for k, v in start.items():  # weights and BN buffers alike
        assert torch.equal(after_frozen[k], v), k
    # Resumed: one more frozen epoch, then the switch, inside this run, under the running DDP job.
    r = accelerate_launch(2, *_args(tiny_data, tmp_path / "run", *common, "train.epochs=3"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the backbone trains from now on" in r.stdout
    end = load_file(str(tmp_path / "run" / "last.safetensors"))
    moved = [k for k in start if not torch.equal(end[k], start[k])]
    assert set(UNFREEZE[arch]) <= set(moved)
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["backbone_lr"] for x in rows] == [None, None, 0.01]
    # Every epoch ended with a cross-rank comparison of the weights (the run stops if they differ).
    assert all(len(x["weights_digest"]) == 24 for x in rows)


# The recipe's options that touch the data, the gradient or the step: AdamW with decay groups, a
# warm-up and cosine set at every optimizer step from the images done, label smoothing, class
# weights, the class-balanced sampler, TrivialAugment and random erasing drawn per image, MixUp /
# CutMix per micro-batch.
RECIPE = ("optim.name=adamw", "optim.lr=0.001", "optim.weight_decay=0.05", "optim.decay_bias_and_norm=false",
          "scheduler.name=cosine", "scheduler.warmup_epochs=0.5", "train.label_smoothing=0.1",
          "train.class_weights=balanced", "data.augment=trivialaugment", "data.random_erasing=0.25",
          "train.mixup_alpha=0.2", "train.cutmix_alpha=1.0", "train.mix_prob=0.8", "data.sampler=balanced")


@pytest.mark.parametrize("recipe", [(), RECIPE], ids=["tutorial", "recipe"])
def test_finetune_two_processes_equal_one_process_accumulating(tiny_data, tmp_path, recipe):
    """Finetune, no SyncBN: each rank's BatchNorm sees its own B samples, exactly as one process with
    batch B accumulating 2 steps does, so the parameters after an epoch match (not BN running stats)."""
    init = tmp_path / "init.safetensors"
    save_file(backbones.create("resnet18", 1000).state_dict(), str(init))
    common = ("model.mode=finetune", f"model.weights={init}", "train.epochs=1", "data.batch_size=3",
              "optim.lr=0.02", *recipe)
    one = run_cli("-m", "tl_dist.train", *_args(tiny_data, tmp_path / "one", *common, "train.grad_accum_steps=2"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = accelerate_launch(2, *_args(tiny_data, tmp_path / "two", *common))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _params(tmp_path / "one" / "last.safetensors"), _params(tmp_path / "two" / "last.safetensors")
    start = _params(init)
    assert not torch.equal(a["conv1.weight"], start["conv1.weight"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def _torchrun(out, tiny_data, port, *extra):
    import os
    import subprocess
    import sys
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           *extra, "-m", "tl_dist.train", *_args(tiny_data, out, "data.image_size=64", "data.resize_size=72",
                                                 "data.batch_size=3", "train.epochs=4")]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            start_new_session=True)  # one process group: a failed test kills it all


def _finish(job, timeout=240):
    import os
    import signal
    try:
        return job.communicate(timeout=timeout)[0]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


def _worker_pids(rank, port):
    """PIDs of the tl_dist worker with this RANK in the job using this MASTER_PORT (Linux /proc)."""
    from pathlib import Path
    pids = []
    for d in Path("/proc").iterdir():
        try:
            env = (d / "environ").read_bytes().split(b"\0") if d.name.isdigit() else []
            cmd = (d / "cmdline").read_bytes() if env else b""
        except OSError:
            continue
        if b"tl_dist.train" in cmd and f"RANK={rank}".encode() in env and f"MASTER_PORT={port}".encode() in env:
            pids.append(int(d.name))
    return pids


def test_torchrun_restarts_a_killed_rank_and_the_job_resumes(tiny_data, tmp_path):
    """torchrun --max-restarts=1: SIGKILL rank 1 after the first epoch; the restarted job resumes from
    the saved state and ends bit-identical to an uninterrupted run."""
    import os
    import signal
    import time
    port = free_port()
    job = _torchrun(tmp_path / "killed", tiny_data, port, "--max-restarts", "1")
    deadline = time.time() + 240
    while not (tmp_path / "killed" / "resume.pt").exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    pids = _worker_pids(1, port)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    log = _finish(job)
    assert pids, "rank 1 not found"
    assert job.returncode == 0, log[-3000:]
    import re
    assert re.search(r"resuming \S+ after epoch [012] ", log), log[-3000:]  # not started afresh
    rows = [json.loads(l) for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in rows] == [0, 1, 2, 3]
    plain = _torchrun(tmp_path / "plain", tiny_data, free_port())
    log = _finish(plain)
    assert plain.returncode == 0, log[-3000:]
    a, b = (load_file(str(tmp_path / n / "last.safetensors")) for n in ("killed", "plain"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _one_then_two(root, tmp_path, *common) -> tuple[list[dict], list[dict]]:
    """The same frozen run on 1 process with batch 6 and 2 with batch 3 (the same global batch): the
    split each recorded must be the same; their metrics rows."""
    one = run_cli("-m", "tl_dist.train", *_args(root, tmp_path / "one", *common, "data.batch_size=6"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = accelerate_launch(2, *_args(root, tmp_path / "two", *common, "data.batch_size=3"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "one" / "split.json").read_bytes() == (tmp_path / "two" / "split.json").read_bytes()
    ra, rb = ([json.loads(l) for l in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("one", "two"))
    assert len(ra) == len(rb) == 2
    return ra, rb


def test_a_split_made_by_val_split_is_the_same_for_one_and_two_processes(tmp_path):
    """The draw is a function of (split_seed, relative path) only: 2 processes record the split 1 does,
    and evaluate the same val images to the same numbers."""
    root = make_images(tmp_path / "photos", {"all": {"ants": 14, "bees": 12}}) / "all"
    ra, rb = _one_then_two(root, tmp_path, "model.mode=frozen", "train.epochs=2", "data.val_split=0.3",
                           "data.test_split=0.1")
    for x, y in zip(ra, rb):
        assert x["val_acc"] == y["val_acc"] and x["val_samples"] == y["val_samples"] == 8
        assert abs(x["val_loss"] - y["val_loss"]) < 1e-5


def test_multi_label_two_processes_equal_one_process(tmp_path):
    """Several labels per image: the same split, and val mAP / F1 / loss computed on the whole val
    set (the ranks' scores gathered), so 2 processes report what 1 does."""
    root = make_tagged(tmp_path / "tagged", 48)
    ra, rb = _one_then_two(root, tmp_path, *ML, "model.mode=frozen", "train.epochs=2", "optim.lr=0.05")
    for x, y in zip(ra, rb):
        assert x["val_samples"] == y["val_samples"] == 12 and x["val_acc"] == y["val_acc"]
        for key in ("map", "micro_f1", "macro_f1", "val_loss", "train_loss"):
            assert abs(x[key] - y[key]) < 1e-5, key
