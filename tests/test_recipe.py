"""Training recipes: the schedules' closed forms, optimizer groups, class weights, best-by and early
stopping, one-line config errors, and a SIGKILLed run with every option on resuming bit for bit."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tl_dist import config
from tl_dist.models import backbones
from tl_dist.training import optim
from tl_dist.commands import train
from tl_dist.commands.evaluate import classification_metrics
from tl_dist.training.run_state import RunState
from tl_dist.training.reporting import macro_f1
from tl_dist.training.trainer import stops_early

from .conftest import FAST, ROOT, train_in_process

RECIPE = ["optim.name=adamw", "optim.lr=0.001", "optim.weight_decay=0.05", "optim.decay_bias_and_norm=false",
          "scheduler.name=cosine", "scheduler.warmup_epochs=0.5", "train.label_smoothing=0.1",
          "train.class_weights=balanced", "train.select_best_by=macro_f1", "train.ema_decay=0.9",
          "data.augment=trivialaugment", "data.random_erasing=0.25", "train.mixup_alpha=0.2",
          "train.cutmix_alpha=1.0", "train.mix_prob=0.8", "data.sampler=balanced"]


def cfg_of(*over):
    return config.load(None, ["train.epochs=10", *over])


@pytest.mark.parametrize("t, want", [(0.0, 0.01), (0.25, 0.01 + 0.99 * 0.25), (1.0, 1.0),
                                     (1 + 4.5, 0.5), (10 - 1e-9, 0.0)])
def test_cosine_with_warmup_is_its_closed_form(t, want):
    # warm-up over 1 epoch from 1% of the base, then half a cosine over the remaining 9 epochs
    cfg = cfg_of("scheduler.name=cosine", "scheduler.warmup_epochs=1", "optim.lr=0.2", "optim.backbone_lr=0.02")
    head, backbone = optim.lrs_at(cfg, int(t), t)
    assert head == pytest.approx(0.2 * want, abs=1e-12) and backbone == pytest.approx(0.02 * want, abs=1e-12)


def test_step_onecycle_and_constant_are_their_closed_forms():
    step = cfg_of("scheduler.step_size=3", "scheduler.gamma=0.5", "scheduler.warmup_epochs=0.5")
    assert optim.lrs_at(step, 0, 0.0)[0] == pytest.approx(0.001 * 0.01)
    assert optim.lrs_at(step, 0, 0.25)[0] == pytest.approx(0.001 * (0.01 + 0.99 * 0.5))
    assert optim.lrs_at(step, 4, 4.7)[0] == pytest.approx(0.001 * 0.5)  # StepLR: per epoch, not per step
    assert optim.lrs_at(step, 6, 6.0)[0] == pytest.approx(0.001 * 0.25)
    one = cfg_of("scheduler.name=onecycle", "scheduler.pct_start=0.3")
    assert optim.lrs_at(one, 0, 0.0)[0] == pytest.approx(0.001 / 25)
    assert optim.lrs_at(one, 3, 3.0)[0] == pytest.approx(0.001)
    assert optim.lrs_at(one, 6, 6.5)[0] == pytest.approx(0.001 * (1 / 25e4 + (1 - 1 / 25e4) * 0.5))
    assert optim.lrs_at(cfg_of("scheduler.name=constant"), 9, 9.9) == [0.001, 0.001]
    # without a warm-up, the tutorial's StepLR is exactly what it was: the same floats
    plain = cfg_of("scheduler.step_size=7")
    assert optim.lrs_at(plain, 8, 8.5) == [0.001 * 0.1 ** 1] * 2
    assert not optim.varies_within_epoch(plain) and optim.varies_within_epoch(step)


def test_optimizer_groups_keep_biases_and_norms_out_of_weight_decay():
    net = backbones.create("resnet18", 3)
    cfg = cfg_of(*RECIPE)
    opt = optim.build_optimizer(net, cfg)
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 4
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in net.named_parameters()}
    assert names[id(net.fc.bias)] not in {names[i] for i in decayed}
    assert all(names[i].endswith("weight") and net.get_parameter(names[i]).ndim > 1 for i in decayed)
    assert len(decayed) + sum(len(g["params"]) for g in opt.param_groups if g["weight_decay"] == 0) == \
        len(list(net.parameters()))
    optim.set_lrs(opt, cfg_of(*RECIPE, "optim.backbone_lr=0.0001"), 5, 5.0)
    assert [g["lr"] > 1e-4 for g in opt.param_groups] == [True, True, False, False]  # head, head, backbone x2
    sgd = optim.build_optimizer(net, cfg_of("optim.nesterov=true"))
    assert sgd.param_groups[0]["nesterov"] and len(sgd.param_groups) == 2


def test_balanced_class_weights_and_macro_f1():
    w = optim.class_weights([0, 0, 0, 1], 3)
    assert w.tolist() == pytest.approx([4 / 6, 2.0, 0.0])  # class 2 has no train image
    confusion = torch.tensor([[3, 1, 0], [0, 2, 2], [0, 0, 0]])
    logits = torch.cat([torch.eye(3)[p].repeat(int(n), 1) * 5 for row in confusion.tolist()
                        for p, n in enumerate(row) if n])
    labels = torch.cat([torch.full((int(n),), t) for t, row in enumerate(confusion.tolist()) for n in row if n])
    assert macro_f1(confusion) == pytest.approx(classification_metrics(logits, labels, list("abc"))["macro_avg"]["f1"])


def test_ema_follows_its_closed_form_and_copies_counters():
    from tl_dist.training.ema import EMA
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(net, decay=0.9)
    start = net[0].weight.detach().clone()
    with torch.no_grad():
        net[0].weight.add_(1.0)
    net[1].num_batches_tracked += 5
    ema.update()  # first update: rate min(0.9, 1/10) = 0.1, so 90% of the way to the model
    assert torch.allclose(ema.module[0].weight, start + 0.9) and ema.module[1].num_batches_tracked == 5
    for _ in range(200):
        ema.update()
    assert ema.rate() == 0.9 and torch.allclose(ema.module[0].weight, net[0].weight)
    assert ema.module[0].weight.requires_grad is False


@pytest.mark.slow
def test_with_ema_the_saved_weights_are_the_average_that_was_evaluated(tiny_data, tmp_path):
    from tl_dist.commands import evaluate
    assert train_in_process(tmp_path / "run", tiny_data, "train.ema_decay=0.9", "train.epochs=2") == 0
    resume = torch.load(tmp_path / "run" / "resume.pt", weights_only=True)
    last = load_file(str(tmp_path / "run" / "last.safetensors"))
    assert all(torch.equal(last[k], resume["ema"][k]) for k in last) and resume["ema_updates"] == 12
    assert not torch.equal(last["fc.weight"], resume["model"]["fc.weight"])  # the average, not the model
    assert evaluate.main([str(tiny_data), "--split", "val", "--checkpoint", str(tmp_path / "run"), "--json",
                          "--out", str(tmp_path / "ev")]) == 0
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert (m["accuracy"], m["loss"]) == (best["val_acc"], best["val_loss"])


@pytest.mark.parametrize("policy", ["trivialaugment", "randaugment", "autoaugment"])
def test_augmentation_policies_draw_only_from_the_sample(policy):
    """Each image's policy is a function of (seed, epoch, index): not of the global RNGs (so not of
    the rank, the worker or what ran before), and different from image to image."""
    import random

    from PIL import Image

    from tl_dist.data.augment import policy_ops, sample_rng, train_transform
    cfg = config.load(None, [f"data.augment={policy}", "data.random_erasing=0.5", "data.image_size=32",
                             "data.resize_size=36", "data.mean=[0.5,0.5,0.5]", "data.std=[0.2,0.2,0.2]",
                             "data.interpolation=bilinear"]).data
    img = Image.effect_mandelbrot((80, 60), (-2, -1.2, 1, 1.2), 50).convert("RGB")
    first = [train_transform(img, sample_rng(0, 3, i), cfg) for i in range(8)]
    torch.manual_seed(123)
    random.seed(456)
    again = [train_transform(img, sample_rng(0, 3, i), cfg) for i in range(8)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    plain = config.load(None, ["data.image_size=32", "data.resize_size=36", "data.interpolation=bilinear",
                               "data.mean=[0.5,0.5,0.5]", "data.std=[0.2,0.2,0.2]"]).data
    changed = [not torch.equal(a, train_transform(img, sample_rng(0, 3, i), plain)) for i, a in enumerate(first)]
    assert sum(changed) >= 4  # the policy (and erasing) acted on most images
    ops = {name for i in range(200) for name, _ in policy_ops(sample_rng(0, 0, i), policy, 32)}
    assert len(ops) >= 8  # draws spread over torchvision's operation table


def test_host_only_augmentation_leaves_the_device_path_and_says_so(tiny_data):
    from tl_dist.data import listing, loaders
    classes, train, val = listing.list_splits(str(tiny_data))
    cfg = config.load(None, ["data.image_size=32", "data.resize_size=36", "data.num_workers=0", "data.cache=device",
                             "data.augment=randaugment", "data.interpolation=bilinear", "data.mean=[0.5,0.5,0.5]",
                             "data.std=[0.2,0.2,0.2]"]).data
    d = loaders.build(cfg, classes, train, val, seed=0)
    assert d.cache == "ram" and "data.augment=randaugment runs on the host" in d.warning


def test_mixup_and_cutmix_mix_each_batch_with_itself_shifted_and_mix_the_loss():
    import torch.nn.functional as F

    from tl_dist.training import mixing
    from tl_dist.training.engine import StepSettings, train_loss
    x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
    kinds = {mixing.draw(0, 0, m, 0.2, 1.0, 1.0, 8, 8)[0] for m in range(40)}
    assert kinds == {"mixup", "cutmix"}
    assert mixing.draw(0, 0, 7, 0.2, 1.0, 1.0, 8, 8) == mixing.draw(0, 0, 7, 0.2, 1.0, 1.0, 8, 8)  # (seed, epoch, m)
    assert sum(mixing.draw(0, 1, m, 0.2, 0.0, 0.5, 8, 8) is None for m in range(200)) in range(70, 130)
    mixed, mix = mixing.apply(x, y, ("mixup", 0.7, None))
    assert torch.allclose(mixed, 0.7 * x + 0.3 * x.roll(1, 0)) and mix.y2.tolist() == [1, 0, 1, 2]
    drawn = next(d for m in range(50) if (d := mixing.draw(3, 0, m, 0.0, 1.0, 1.0, 8, 8)) and 0 < d[1] < 1)
    top, bottom, left, right = drawn[2]
    cut, mix = mixing.apply(x, y, drawn)
    assert torch.equal(cut[:, :, top:bottom, left:right], x.roll(1, 0)[:, :, top:bottom, left:right])
    assert mix.lam == pytest.approx(1 - (bottom - top) * (right - left) / 64)  # the share that stayed
    out = torch.randn(4, 3)
    ctx = StepSettings([0.5] * 3, [0.2] * 3, False, False, "eval", label_smoothing=0.1,
                      class_weights=torch.tensor([1.0, 2.0, 0.5]))
    want = [0.7 * ctx.class_weights[a] * F.cross_entropy(out[i:i + 1], torch.tensor([a]), label_smoothing=0.1)
            + 0.3 * ctx.class_weights[b] * F.cross_entropy(out[i:i + 1], torch.tensor([b]), label_smoothing=0.1)
            for i, (a, b) in enumerate(zip([0, 1, 2, 1], [1, 0, 1, 2]))]
    got = train_loss(out, y, ctx, mixing.Mix(y.roll(1, 0), 0.7, "mixup"))
    assert torch.allclose(got, torch.stack(want).flatten())


def test_cuda_graphs_name_every_recipe_option_they_cannot_replay():
    from tl_dist.errors import UserError
    from tl_dist.training.cuda_graphs import check_cuda_graphs
    cfg = cfg_of("train.cuda_graphs=true", "optim.name=adamw", "scheduler.name=cosine", "train.mixup_alpha=0.2")
    with pytest.raises(UserError) as e:
        check_cuda_graphs(cfg, torch.device("cpu"), 1, "no")
    assert all(words in str(e.value) for words in ("optim.name=sgd", "fixed within each epoch", "no MixUp / CutMix"))


def test_cuda_graphs_by_default_where_nothing_is_in_the_way(monkeypatch):
    """train.cuda_graphs null: the graph where the run can be replayed on a GPU, the eager step
    elsewhere, without an error; true is checked, false is off."""
    from tl_dist.training import cuda_graphs
    use = cuda_graphs.use_cuda_graphs
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert not use(cfg_of(), cpu, 1, "no", keeps_features=False)  # no GPU
    monkeypatch.setattr(cuda_graphs, "can_capture", lambda device: True)
    assert use(cfg_of(), gpu, 1, "bf16", keeps_features=False)
    assert not use(cfg_of("train.cuda_graphs=false"), gpu, 1, "bf16", keeps_features=False)
    for blocked in (("optim.name=adamw",), ("train.mixup_alpha=0.2",), ("scheduler.name=cosine",),
                    ("train.grad_accum_steps=2",), ("model.arch=efficientnet_b0",)):
        assert not use(cfg_of(*blocked), gpu, 1, "bf16", keeps_features=False), blocked
    assert not use(cfg_of(), gpu, 2, "bf16", keeps_features=False)  # several processes
    assert not use(cfg_of(), gpu, 1, "fp16", keeps_features=False)  # the loss scaler's host check
    assert not use(cfg_of(), gpu, 1, "bf16", keeps_features=True)  # the classifier on kept features
    assert use(cfg_of("train.cuda_graphs=true"), gpu, 1, "bf16", keeps_features=True)  # (asked for)


def test_early_stopping_counts_epochs_since_the_best():
    state, cfg = RunState(), cfg_of("train.early_stopping_patience=2")
    for epoch, acc in enumerate([0.5, 0.7, 0.7, 0.6]):
        state.record({"epoch": epoch, "val_acc": acc, "val_loss": 1.0}, acc, torch.zeros(2, 2), None)
    assert state.best_epoch == 1 and stops_early(cfg, state, lambda m: None)  # the tie at epoch 2 is no better
    assert not stops_early(cfg_of("train.early_stopping_patience=3"), state, lambda m: None)


@pytest.mark.parametrize("override, words", [
    ("optim.name=adam", "optim.name (in command line) must be one of sgd|adamw"),
    ("scheduler.name=linear", "must be one of step|cosine|onecycle|constant"),
    ("train.label_smoothing=1.5", "train.label_smoothing (in command line) must be a number in [0, 1)"),
    ("train.select_best_by=f1", "must be one of val_acc|macro_f1|val_loss"),
    ("train.class_weights=inverse", "must be one of none|balanced"),
    ("scheduler.warmup_epochs=-1", "0 or more epochs"),
    ("optim.betas=[0.9]", "[beta1, beta2]"),
    ("train.ema_decay=1", "train.ema_decay (in command line) must be a number in [0, 1)"),
    ("train.mixup_alpha=-1", "train.mixup_alpha (in command line) must be 0 (off) or a positive number"),
    ("train.mix_prob=2", "a probability from 0 to 1"),
])
def test_bad_recipe_values_are_one_line(override, words, tmp_path, capsys):
    assert train.main(["--config", str(ROOT / "configs" / "demo.yaml"), override,
                       f"train.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err


def test_rules_between_keys_are_one_line(tmp_path, capsys):
    for over, words in ((["scheduler.name=onecycle", "scheduler.warmup_epochs=1"], "pct_start"),
                        (["optim.name=adamw", "optim.nesterov=true"], "optim.nesterov=true needs optim.name=sgd")):
        assert train.main(["--config", str(ROOT / "configs" / "demo.yaml"), *over, f"train.output_dir={tmp_path}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err


@pytest.mark.slow
def test_early_stopping_stops_and_stays_stopped(tiny_data, tmp_path, capsys):
    # A learning rate too small to change any prediction: val accuracy ties, never improves.
    over = ["optim.lr=1e-12", "train.early_stopping_patience=1", "train.epochs=6"]
    assert train_in_process(tmp_path, tiny_data, *over) == 0
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and "early stop after epoch 1" in capsys.readouterr().out
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "complete"
    assert train_in_process(tmp_path, tiny_data, *over) == 0  # the same command again: nothing more to do
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert "is complete: stopped early after epoch 1 (train.early_stopping_patience=1)" in capsys.readouterr().out


def _cmd(data_dir, out, epochs):
    return [sys.executable, "-m", "tl_dist.train", "--config", str(ROOT / "configs" / "demo.yaml"), *FAST, *RECIPE,
            "data.image_size=64", "data.resize_size=72", f"data.root={data_dir}", "data.demo=false",
            "data.batch_size=4", f"train.epochs={epochs}", f"train.output_dir={out}"]


@pytest.mark.slow
def test_every_recipe_option_resumes_bit_identical_after_sigkill(tiny_data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    r = subprocess.run(_cmd(tiny_data, full, 4), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "killed"
    p = subprocess.Popen(_cmd(tiny_data, out, 4), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "resume.pt").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    done = len((out / "metrics.jsonl").read_text().splitlines())
    assert p.returncode == -signal.SIGKILL and 1 <= done < 4
    r = subprocess.run(_cmd(tiny_data, out, 4), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "resuming" in r.stdout, r.stderr[-2000:]
    a, b = load_file(str(full / "last.safetensors")), load_file(str(out / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def rows(run):
        return [{k: v for k, v in json.loads(l).items() if "seconds" not in k and "peak" not in k}
                for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows(full) == rows(out)  # losses, accuracies, macro F1 and learning rates, epoch by epoch
    assert json.loads((full / "best.json").read_text())["epoch"] == json.loads((out / "best.json").read_text())["epoch"]
    assert not math.isclose(rows(full)[0]["lr"], rows(full)[1]["lr"])  # the schedule really moved


def test_lr_find_suggests_inside_the_falling_stretch():
    from tl_dist.training.lr_range import suggestion
    lrs = [1e-6 * 10 ** (i / 10) for i in range(60)]  # 1e-6 .. ~1e-0.1
    loss = [2.0 if lr < 1e-4 else (2.0 - (math.log10(lr) + 4) if lr < 1e-2 else 0.5 + (math.log10(lr) + 2) ** 2)
            for lr in lrs]  # flat, falls from 1e-4 to 1e-2, then rises
    valley, tenth = suggestion(lrs, loss)
    assert 1e-4 < valley < 1e-2 and tenth == pytest.approx(lrs[loss.index(min(loss))] / 10)
    # a minimum at the sweep's start: a tenth of it was never tried, so it is not suggested
    rising = [1.0 + i / 10 for i in range(60)]
    assert suggestion(lrs, rising)[1] is None
    from tl_dist.training.lr_range import warnings
    assert warnings(lrs, loss) == [] and any("no clear valley" in w for w in warnings(lrs, rising))
    assert any("only 20 steps" in w for w in warnings(lrs[:20], loss[:20]))


@pytest.mark.slow
def test_lr_find_writes_its_two_files_and_nothing_else(tiny_data, tmp_path, capsys):
    from tl_dist.commands import lr_find
    out = tmp_path / "run"
    assert lr_find.main([str(ROOT / "configs" / "demo.yaml"), *FAST, f"data.root={tiny_data}", "data.demo=false",
                         f"train.output_dir={out}", "--steps", "20", "--end-lr", "1"]) == 0
    assert "suggested optim.lr:" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["lr_find.json", "lr_find.png"]  # no run state, no lock
    r = json.loads((out / "lr_find.json").read_text())
    ratios = [b / a for a, b in zip(r["lr"], r["lr"][1:])]
    assert r["lr"][0] == 1e-7 and max(ratios) == pytest.approx(min(ratios))  # exponential
    assert r["lr"][0] <= r["suggested"] <= r["lr"][-1] and len(r["loss"]) == len(r["lr"]) <= 20
    assert lr_find.main([str(ROOT / "configs" / "demo.yaml"), f"train.output_dir={out}", "--steps", "2"]) == 2
    assert "--steps must be from 5 to 10000" in capsys.readouterr().err
