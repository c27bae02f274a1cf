"""train.cuda_graphs: the whole train step captured once as a CUDA graph and replayed.

The eager step (engine.EagerStep) stays the reference: every capture's first replay is checked
against it, and whatever a graph cannot replay runs through it.
"""
from __future__ import annotations

import contextlib

import torch
import torchvision

from tl_dist.models import backbones, heads
from tl_dist.training import optim
from tl_dist.config import Config
from tl_dist.training.engine import StepSettings, TrainStep, step_sums, train_loss
from tl_dist.errors import UserError


def can_capture(device: torch.device) -> bool:
    """Whether CUDA graphs can be captured on ``device`` (tests replace this to run the graph path's
    bookkeeping on the CPU, where GraphedStep runs it eagerly)."""
    return device.type == "cuda"


def blockers(cfg: Config, device: torch.device, processes: int, mp: str) -> list[str]:
    """What in this run keeps the train step from being replayed as a CUDA graph (empty: nothing)."""
    t = cfg.train
    why = [w for w, bad in (
        (f"a CUDA GPU (this run is on {device.type})", not can_capture(device)),
        (f"one process (this run has {processes}; with several GPUs use a larger batch)", processes > 1),
        (f"train.grad_accum_steps=1 (it is {t.grad_accum_steps})", t.grad_accum_steps > 1),
        ("train.mixed_precision bf16 or no (fp16's loss scaler checks for overflow on the host every step)",
         mp == "fp16"),
        ("train.compile=false (compile_mode=reduce-overhead makes its own graphs)", t.compile),
        (f"optim.name=sgd (it is {cfg.optim.name})", cfg.optim.name != "sgd"),
        ("a learning rate fixed within each epoch (scheduler.name step or constant, warmup_epochs 0)",
         optim.varies_within_epoch(cfg)),
        ("no MixUp / CutMix (train.mixup_alpha, train.cutmix_alpha 0)", t.mixup_alpha > 0 or t.cutmix_alpha > 0),
    ) if bad]
    drawn = random_layers(cfg)
    if drawn:
        kinds = "/".join(sorted({type(m).__name__ for _, m in drawn}))
        why.append(f"a train step without random draws, which a replay could not be checked against "
                   f"({cfg.model.arch} in {cfg.model.mode} mode trains {len(drawn)} {kinds} layer(s), "
                   f"the first at {drawn[0][0]})")
    return why


def check_cuda_graphs(cfg: Config, device: torch.device, processes: int, mp: str) -> None:
    """train.cuda_graphs=true: a one-line error naming whatever is in the way, before any work."""
    if cfg.train.cuda_graphs:
        why = blockers(cfg, device, processes, mp)
        if why:
            raise UserError(f"config: train.cuda_graphs=true needs {'; and '.join(why)}")


def use_cuda_graphs(cfg: Config, device: torch.device, processes: int, mp: str, keeps_features: bool) -> bool:
    """Whether this run replays its train step as a CUDA graph: train.cuda_graphs=true (checked by
    ``check_cuda_graphs``), or null where nothing is in the way. Measured on one H200 (see
    docs/performance.md): the eager step waits on Python launching its kernels, and the graph trained
    the tutorial's batch of 4 about 4x faster and batch 256 (with the device cache's augmentation,
    which the freed host then issues) 1.4x faster. A run that trains the classifier on kept
    features (train.feature_cache) needs no graph."""
    t = cfg.train
    if t.cuda_graphs is not None:
        return t.cuda_graphs
    # (can_capture first: a run on the CPU builds no model to look for random layers)
    return can_capture(device) and not keeps_features and not blockers(cfg, device, processes, mp)


RANDOM_LAYERS = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
                 torch.nn.FeatureAlphaDropout, torchvision.ops.StochasticDepth)


def random_layers(cfg: Config) -> list[tuple[str, torch.nn.Module]]:
    """Layers that draw random numbers in some train step of this run (dropout, stochastic depth in
    train mode), as (name, module). A frozen backbone runs in eval mode: only its head would count."""
    try:
        with torch.device("meta"):  # shapes only: no memory, no initialisation cost
            net = backbones.create(cfg.model.arch, 2, backbones.arch_kwargs(cfg.model, cfg.data.image_size or 224))
    except NotImplementedError:  # RegNet (built from real tensors) has neither
        return []
    head = heads.head_name(net)
    whole = cfg.model.mode != "frozen" or cfg.model.frozen_bn == "train"
    return [(n, m) for n, m in net.named_modules()
            if draws(m) and (whole or n == head or heads.in_head(n, head))]


def draws(m: torch.nn.Module) -> bool:
    """Whether the layer draws random numbers in train mode: dropout, stochastic depth (torchvision's,
    or timm's DropPath)."""
    if isinstance(m, RANDOM_LAYERS):
        return m.p > 0
    return type(m).__name__ == "DropPath" and getattr(m, "drop_prob", 0) > 0


class GraphedStep:
    """The whole train step as one CUDA graph: forward, loss, backward, SGD step and metric sums.

    At the tutorial's batch size a GPU step is bound by launching its several hundred kernels one at
    a time from Python (see docs/performance.md); replaying a captured graph launches them all at once. A graph bakes in what it saw when it was captured; this class
    keeps each of those right:
    - the tensors it reads and writes: every batch is copied into fixed input buffers;
    - the learning rates, the trainable parameters and each layer's train/eval mode: they make
      the epoch's key (``begin_epoch``), and another key means a new capture;
    - the optimizer's state: SGD creates its momentum buffers in its first step, and a graph
      captured before that would replay the creation forever, so capture waits for ``warmup``
      eager steps under the key and for every buffer to exist;
    - the batch size: a batch of another size (a short last batch) runs eagerly.
    Each replay writes the gradients (there were none when it was captured) rather than adding to
    them; an eager step in between drops them first (``eager``).

    Called as a ``TrainStep``: a batch it cannot replay runs through ``fallback`` (the eager step),
    inside ``eager()``. Conditions, checked by ``check_cuda_graphs``: one process, no accumulation,
    bf16 or fp32 (fp16's loss scaler checks for overflow on the host), an optimizer whose step never
    waits for the host.
    If a capture fails all the same (an operation that cannot be captured), nothing was executed
    by it: the step runs eagerly, ``failed`` says why, and the run goes on without graphs.
    The first replay of every capture is checked: the same step is run again eagerly from the
    same state and inputs, and every parameter's, buffer's and momentum's change must agree
    (within 1%, for kernels that sum in another order); the eager result is kept. If they
    disagree, ``failed`` says where and the run goes on without graphs.
    ``capture=False`` (no CUDA) runs the same buffers and bookkeeping eagerly, and checks on every
    step that nothing a graph would have baked in has changed: the logic is tested on the CPU.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, autocast_dtype: torch.dtype | None,
                 warmup: int = 3, capture: bool = True, fallback: TrainStep | None = None):
        self.opt, self.device, self.dtype = optimizer, device, autocast_dtype
        self.warmup, self.capture, self.fallback = warmup, capture, fallback
        self.sums = torch.zeros(3, device=device, dtype=torch.float64)  # weighted loss, correct, count
        self.model: torch.nn.Module | None = None
        self.loss_ctx: StepSettings | None = None
        self.captures = 0
        self.failed: str | None = None
        self._key: tuple | None = None
        self._eager = 0
        self._graph = None
        self._static: tuple[torch.Tensor, ...] | None = None  # x, y, w, loss scale
        self._baked: tuple | None = None
        self._stream = torch.cuda.Stream(device) if capture else None  # warm-up and capture run here

    def begin_epoch(self, model: torch.nn.Module, ctx: StepSettings | tuple) -> None:
        """Another model wrapper, learning rate or frozen state than last epoch (``ctx``, or an
        explicit key) means a new capture."""
        self.sums.zero_()
        self.model = model
        self.loss_ctx = ctx if isinstance(ctx, StepSettings) else None
        if self.fallback is not None:
            self.fallback.begin_epoch(model, ctx)
        key = ctx if isinstance(ctx, tuple) else (id(model), tuple(g["lr"] for g in self.opt.param_groups),
                                                  ctx.frozen, ctx.frozen_bn)
        if key != self._key:
            self._key, self._eager, self._graph, self._static, self._baked = key, 0, None, None, None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, scale: float, update: bool,
                 mix=None) -> None:
        if mix is None and self.can_replay(len(y)) and self.step(x, y, w, scale):
            return
        with self.eager():
            self.fallback(x, y, w, scale, update, mix)

    def epoch_sums(self) -> torch.Tensor:
        return self.fallback.epoch_sums() + self.sums

    def can_replay(self, batch_size: int) -> bool:
        if self.failed:
            return False
        if self._static is not None:
            return self._static[0].shape[0] == batch_size
        return self._eager >= self.warmup and self._state_ready()

    @contextlib.contextmanager
    def eager(self):
        """The context for a step the caller runs eagerly (warm-up, or a batch of another size)."""
        if self._static is not None:  # the parameters' .grad are the graph's buffers: start afresh
            self.opt.zero_grad(set_to_none=True)
        # Before a capture, warm up on the stream the capture will use, as PyTorch's whole-network
        # example does: libraries set up per-stream state (cuBLAS workspaces, handles) on first
        # use, and that must not happen while capturing.
        warming = self._stream is not None and self._static is None
        with _on_stream(self._stream) if warming else contextlib.nullcontext():
            yield
        self._eager += 1

    def step(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, scale: float) -> bool:
        """One train step through the graph (captured first if needed). False: the capture failed
        and nothing was done; the caller runs this step eagerly."""
        fresh = self._static is None
        if fresh:
            try:
                self._capture(x, y, w)
            except RuntimeError as e:
                self._give_up(f"capturing the train step failed: {' '.join(str(e).split())[:300]}")
                return False
        sx, sy, sw, ss = self._static
        sx.copy_(x)
        sy.copy_(y)
        sw.copy_(w)
        ss.fill_(scale)
        if fresh:
            self._checked_replay()
        else:
            self._replay()
        return True

    def _replay(self) -> None:
        if self._graph is not None:
            self._graph.replay()
            return
        if self._bake() != self._baked:
            raise RuntimeError("GraphedStep: learning rates, trainable parameters or layer modes changed "
                               "under the same key; a CUDA graph would have replayed stale ones")
        self.opt.zero_grad(set_to_none=True)  # a replay writes the gradients; an eager backward would add
        self._body(*self._static)

    def _checked_replay(self) -> None:
        """A capture's first replay, against the same step run eagerly; the eager result is kept."""
        before = self._state()
        self._replay()
        replayed = self._state()
        with torch.no_grad():
            for (_, t), (_, b) in zip(self._live(), before):
                t.copy_(b)
        self.opt.zero_grad(set_to_none=True)
        self._body(*self._static)
        self.opt.zero_grad(set_to_none=True)
        off = [name for (name, b), (_, r), (_, e) in zip(before, replayed, self._state())
               if not _same_change(b, r, e)]
        if off:
            self._give_up(f"the captured train step changed {', '.join(off[:3])}{' ...' if len(off) > 3 else ''} "
                          f"other than the same step run eagerly")

    def _give_up(self, why: str) -> None:
        self.failed = why
        self._graph = self._static = None
        self.opt.zero_grad(set_to_none=True)  # .grad may be the graph's buffers

    def _live(self) -> list[tuple[str, torch.Tensor]]:
        """Everything a train step changes: trainable weights, buffers, momentum, the metric sums."""
        params = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        momentum = [(f"momentum of {n}", self.opt.state[p]["momentum_buffer"]) for n, p in params
                    if self.opt.state.get(p, {}).get("momentum_buffer") is not None]
        return params + list(self.model.named_buffers()) + momentum + [("metric sums", self.sums)]

    def _state(self) -> list[tuple[str, torch.Tensor]]:
        return [(n, t.detach().clone()) for n, t in self._live()]

    def _state_ready(self) -> bool:
        return all(self.opt.state.get(p, {}).get("momentum_buffer") is not None
                   for g in self.opt.param_groups if g.get("momentum", 0) for p in g["params"] if p.requires_grad)

    def _bake(self) -> tuple:
        return (tuple(g["lr"] for g in self.opt.param_groups),
                tuple(p.requires_grad for g in self.opt.param_groups for p in g["params"]),
                tuple(m.training for m in self.model.modules()))

    def _body(self, x, y, w, scale) -> None:
        # No autocast cache: every cast must happen inside the graph, none may come from before it.
        cast = (torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=False) if self.dtype is not None
                else contextlib.nullcontext())
        with cast:
            out = self.model(x)
        per_sample = train_loss(out, y, self.loss_ctx)
        ((per_sample * w).sum() * scale).backward()
        self.opt.step()
        self.sums += step_sums(per_sample, out, y, w, self.loss_ctx.threshold if self.loss_ctx else 0.5)

    def _capture(self, x, y, w) -> None:
        static = (torch.empty_like(x), torch.empty_like(y), torch.empty_like(w),
                  torch.zeros((), device=x.device, dtype=torch.float32))
        self.opt.zero_grad(set_to_none=True)  # so the captured backward allocates .grad in the graph's pool
        if self.capture:
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (pin-memory, checkpoint writer) may use CUDA meanwhile
            with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                self._body(*static)
            self._graph = graph
        self._static, self._baked = static, self._bake()
        self.captures += 1


@contextlib.contextmanager
def _on_stream(stream):
    """Run the block on ``stream``, ordered after what came before it and before what follows."""
    current = torch.cuda.current_stream(stream.device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        yield
    current.wait_stream(stream)


def _same_change(before: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rtol: float = 0.01) -> bool:
    """Whether ``a`` and ``b`` moved away from ``before`` alike (relative to the move's size)."""
    da, db = (a.double() - before.double()), (b.double() - before.double())
    return bool(torch.linalg.vector_norm(da - db) <= rtol * torch.linalg.vector_norm(db) + 1e-12)
