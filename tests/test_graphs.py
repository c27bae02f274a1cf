"""train.cuda_graphs: the graph path's bookkeeping, run on the CPU (GraphedStep without capture).

A CUDA graph replays what it recorded. What these tests pin down is everything around the
recording: inputs copied into fixed buffers, the loss scale, the metric sums, warm-up before
capture, a new capture when learning rates or trainable layers change, eager steps for a batch of
another size. The capture itself needs a GPU (benchmarks/gpu_suite.py runs it there).
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from tl_dist.training import cuda_graphs

from .conftest import ML, make_tagged
from .conftest import train_in_process as _run

pytestmark = pytest.mark.slow


@pytest.fixture
def count_graph_steps(monkeypatch):
    monkeypatch.setattr(cuda_graphs, "can_capture", lambda device: True)
    calls = []
    real = cuda_graphs.GraphedStep.step

    def step(self, *a):
        calls.append(self.captures)
        return real(self, *a)
    monkeypatch.setattr(cuda_graphs.GraphedStep, "step", step)
    return calls


@pytest.mark.parametrize("mode, graph_steps", [
    # a new learning rate every epoch: each epoch warms up (3 eager steps), captures, replays
    (["model.mode=finetune", "scheduler.step_size=1"], [0, 1, 1, 2, 2, 3]),
    # frozen epoch 0; the backbone trains from epoch 1 (a new capture); epoch 2 replays from its first step
    (["model.mode=frozen_then_finetune", "model.unfreeze_epoch=1"], [0, 1, 1, 2, 2, 2, 2, 2, 2]),
    # the graph path's own autocast region (no cast cache) against accelerate's
    (["model.mode=finetune", "train.mixed_precision=bf16"], [0] + [1] * 11),
    # another family, frozen: its dropout and stochastic depth are in the backbone, off in eval mode
    (["model.mode=frozen", "model.arch=efficientnet_b0", "data.image_size=64", "data.resize_size=72"],
     [0] + [1] * 11),
], ids=["finetune, new lr every epoch", "frozen then finetune", "bf16", "efficientnet frozen"])
def test_graph_path_trains_exactly_like_the_eager_path(tiny_data, tmp_path, count_graph_steps, mode, graph_steps):
    """22 train images at batch 4: 5 full batches and a short one (always eager) per epoch. The
    weights and metrics must come out bit for bit as without graphs (fp32, CPU). ``graph_steps``:
    the number of captures so far at each step that went through the graph path."""
    assert _run(tmp_path / "eager", tiny_data, "train.epochs=3", "train.cuda_graphs=false", *mode) == 0
    assert count_graph_steps == []
    assert _run(tmp_path / "graph", tiny_data, "train.epochs=3", "train.cuda_graphs=true", *mode) == 0
    assert count_graph_steps == graph_steps
    a, b = (load_file(str(tmp_path / n / "last.safetensors")) for n in ("eager", "graph"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [[json.loads(l) for l in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("eager", "graph")]
    for key in ("train_loss", "train_acc", "train_samples", "val_loss", "val_acc"):
        assert [r[key] for r in rows[0]] == [r[key] for r in rows[1]], key


def test_graph_path_trains_multi_label_exactly_like_the_eager_path(tmp_path, count_graph_steps):
    """Several labels per image (multi-hot targets, a sigmoid per class), with balanced positive
    weights and label smoothing: the graph path's fixed buffers and loss give the eager step's bits."""
    root = make_tagged(tmp_path / "d", 24)
    common = (*ML, "train.epochs=2", "data.image_size=32", "data.resize_size=36", "train.class_weights=balanced",
              "train.label_smoothing=0.1", "optim.lr=0.001")
    assert _run(tmp_path / "eager", root, *common, "train.cuda_graphs=false") == 0
    assert _run(tmp_path / "graph", root, *common, "train.cuda_graphs=true") == 0
    assert count_graph_steps and max(count_graph_steps) >= 1  # (it captured and replayed)
    a, b = (load_file(str(tmp_path / n / "last.safetensors")) for n in ("eager", "graph"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [(tmp_path / n / "metrics.jsonl").read_text() for n in ("eager", "graph")]
    strip = lambda text: [{k: v for k, v in json.loads(l).items() if "seconds" not in k and "peak" not in k}  # noqa: E731
                          for l in text.splitlines()]
    assert strip(rows[0]) == strip(rows[1])


def test_the_default_replays_where_it_can_and_says_so(tiny_data, tmp_path, count_graph_steps, capsys):
    """train.cuda_graphs null on a (pretend) GPU: the graph path, named in the first lines; with a
    setting it cannot replay (AdamW), the eager step and no error."""
    assert _run(tmp_path / "auto", tiny_data, "train.epochs=1") == 0
    assert count_graph_steps and "train step: one CUDA graph (train.cuda_graphs)" in capsys.readouterr().out
    count_graph_steps.clear()
    assert _run(tmp_path / "adamw", tiny_data, "train.epochs=1", "optim.name=adamw") == 0
    assert count_graph_steps == [] and "train step: eager" in capsys.readouterr().out


def test_a_missed_recapture_is_caught():
    """The CPU stand-in checks that nothing a graph bakes in changed under the same key."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    g = cuda_graphs.GraphedStep(opt, torch.device("cpu"), None, warmup=1, capture=False)
    g.begin_epoch(net, ("key",))
    x, y, w = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 0, 1]), torch.ones(4)
    assert not g.can_replay(4)  # no momentum buffers yet: a graph would bake in their creation
    with g.eager():
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    assert g.can_replay(4)
    g.step(x, y, w, 0.25)
    assert g.captures == 1 and g.sums[2].item() == 4.0
    assert not g.can_replay(3)  # a batch of another size runs eagerly
    opt.param_groups[0]["lr"] = 0.01  # changed without a new key
    with pytest.raises(RuntimeError, match="changed under the same key"):
        g.step(x, y, w, 0.25)


def test_cuda_graphs_needs_what_it_needs(tiny_data, tmp_path, capsys, monkeypatch):
    assert _run(tmp_path / "a", tiny_data, "train.cuda_graphs=true") == 2
    assert "train.cuda_graphs=true needs a CUDA GPU (this run is on cpu)" in capsys.readouterr().err
    monkeypatch.setattr(cuda_graphs, "can_capture", lambda device: True)
    assert _run(tmp_path / "b", tiny_data, "train.cuda_graphs=true", "train.grad_accum_steps=2") == 2
    err = capsys.readouterr().err
    assert "train.grad_accum_steps=1 (it is 2)" in err and "CUDA GPU" not in err
    # A train step that draws random numbers (EfficientNet's dropout and stochastic depth when it
    # finetunes) cannot be checked against the eager step: refused before the data is read.
    assert _run(tmp_path / "c", tmp_path / "no data", "train.cuda_graphs=true", "model.arch=efficientnet_b0") == 2
    err = capsys.readouterr().err
    assert "a train step without random draws" in err and "Dropout/StochasticDepth layer(s), the first at features.2.0" in err


def test_a_failed_capture_falls_back_to_eager_steps(tiny_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cuda_graphs, "can_capture", lambda device: True)

    def refuse(self, *a):
        self.opt.zero_grad(set_to_none=True)
        for p in self.model.parameters():  # what a capture leaves behind: .grad that hold nothing
            p.grad = torch.full_like(p, float("nan")) if p.requires_grad else None
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
    monkeypatch.setattr(cuda_graphs.GraphedStep, "_capture", refuse)
    assert _run(tmp_path / "graph", tiny_data, "train.epochs=2", "train.cuda_graphs=true") == 0
    out = capsys.readouterr().out
    assert "warning: train.cuda_graphs: capturing the train step failed" in out and "not permitted" in out
    assert _run(tmp_path / "eager", tiny_data, "train.epochs=2") == 0
    a, b = (load_file(str(tmp_path / n / "last.safetensors")) for n in ("eager", "graph"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_replay_that_disagrees_with_the_eager_step_turns_graphs_off(tiny_data, tmp_path, capsys, monkeypatch):
    """Each capture's first replay is checked against the same step run eagerly; a graph that
    computes something else (here: a replay that also moves one weight) is dropped, the eager
    result kept, and the run says so."""
    monkeypatch.setattr(cuda_graphs, "can_capture", lambda device: True)
    assert _run(tmp_path / "eager", tiny_data, "train.epochs=2") == 0
    assert _run(tmp_path / "graph", tiny_data, "train.epochs=2", "train.cuda_graphs=true") == 0
    assert "warning" not in capsys.readouterr().out  # an honest replay passes the check
    real = cuda_graphs.GraphedStep._replay

    def wrong(self):
        real(self)
        with torch.no_grad():
            self.model.fc.bias.add_(1e-3)
    monkeypatch.setattr(cuda_graphs.GraphedStep, "_replay", wrong)
    assert _run(tmp_path / "wrong", tiny_data, "train.epochs=2", "train.cuda_graphs=true") == 0
    out = capsys.readouterr().out
    assert "warning: train.cuda_graphs: the captured train step changed fc.bias other than the same step run " \
           "eagerly; training goes on without graphs" in out
    for n in ("graph", "wrong"):
        a, b = (load_file(str(tmp_path / m / "last.safetensors")) for m in ("eager", n))
        assert all(torch.equal(a[k], b[k]) for k in a), n
