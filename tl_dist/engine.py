"""train_one_epoch / evaluate: the only code inside the epoch loop that talks to the Accelerator.

Loss normalisation is what makes any world size and any accumulation give the single-process
gradient: each step's summed loss is divided by the number of real samples in the global batch
(or accumulation window) and multiplied by the world size, because DDP averages gradients over
ranks. Padding samples carry weight 0 and so never reach the gradient or the metrics.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .augment import normalize
from .data import TrainBatchSampler
from .model import HEAD, set_train_mode


@dataclass
class EpochResult:
    loss: float
    acc: float
    samples: int
    seconds: float
    bad: list[int] = field(default_factory=list)  # dataset indices that failed to decode
    stopped: bool = False  # interrupted by a stop request before the end of the epoch
    confusion: torch.Tensor | None = None  # [true, predicted] counts (evaluate only)


@dataclass
class StepContext:
    """What the loop needs to know about the model that the Accelerator does not."""
    mean: list[float]
    std: list[float]
    channels_last: bool
    frozen: bool
    frozen_bn: str
    grad_accum_steps: int = 1


def _to_device(batch, device, ctx: StepContext):
    """(x, y, w) on the device, and the dataset indices of samples that failed to decode."""
    x, y, w, idx = batch
    x = normalize(x.to(device, non_blocking=True), ctx.mean, ctx.std, ctx.channels_last)
    failed = (-1 - idx[idx < 0]).tolist() if (idx < 0).any() else []
    return x, y.to(device, non_blocking=True), w.to(device, torch.float32, non_blocking=True), failed


def _reduce_sum(accelerator, values: list[torch.Tensor]) -> list[torch.Tensor]:
    flat = torch.cat([v.reshape(-1).to(accelerator.device, torch.float64) for v in values])
    if accelerator.num_processes > 1:
        flat = accelerator.reduce(flat, reduction="sum")
    out, i = [], 0
    for v in values:
        out.append(flat[i:i + v.numel()].reshape(v.shape).cpu())
        i += v.numel()
    return out


def _gather_bad(accelerator, bad: list[int]) -> list[int]:
    if accelerator.num_processes == 1:
        return bad
    from accelerate.utils import gather_object
    return sorted(set(gather_object(bad)))


class GraphedStep:
    """The whole train step as one CUDA graph: forward, loss, backward, SGD step and metric sums.

    At the seed's batch size a GPU step is bound by launching its several hundred kernels one at a
    time from Python (an H200 runs the eager batch-4 step at 442 images/s); replaying a captured
    graph launches them all at once. A graph bakes in what it saw when it was captured; this class
    keeps each of those right:
    - the tensors it reads and writes: every batch is copied into fixed input buffers;
    - the learning rates, the trainable parameters and each layer's train/eval mode: the loop
      passes them as the epoch's key, and another key means a new capture;
    - the optimizer's state: SGD creates its momentum buffers in its first step, and a graph
      captured before that would replay the creation forever, so capture waits for ``warmup``
      eager steps under the key and for every buffer to exist;
    - the batch size: a batch of another size (a short last batch) runs eagerly.
    Each replay writes the gradients (there were none when it was captured) rather than adding to
    them; an eager step in between drops them first (``eager``).

    Conditions, checked by the caller: one process, no accumulation, bf16 or fp32 (fp16's loss
    scaler checks for overflow on the host), an optimizer whose step never waits for the host.
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
                 warmup: int = 3, capture: bool = True):
        self.opt, self.device, self.dtype = optimizer, device, autocast_dtype
        self.warmup, self.capture = warmup, capture
        self.sums = torch.zeros(3, device=device, dtype=torch.float64)  # weighted loss, correct, count
        self.model: torch.nn.Module | None = None
        self.captures = 0
        self.failed: str | None = None
        self._key: tuple | None = None
        self._eager = 0
        self._graph = None
        self._static: tuple[torch.Tensor, ...] | None = None  # x, y, w, loss scale
        self._baked: tuple | None = None
        self._stream = torch.cuda.Stream(device) if capture else None  # warm-up and capture run here

    def begin_epoch(self, model: torch.nn.Module, key: tuple) -> None:
        self.sums.zero_()
        self.model = model
        if key != self._key:
            self._key, self._eager, self._graph, self._static, self._baked = key, 0, None, None, None

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
        per_sample = F.cross_entropy(out.float(), y, reduction="none")
        ((per_sample * w).sum() * scale).backward()
        self.opt.step()
        self.sums += _step_sums(per_sample, out, y, w)

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


@torch.no_grad()
def _step_sums(per_sample: torch.Tensor, out: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A train step's (weighted loss, correct, count) sums; padding has weight 0."""
    return torch.stack([(per_sample * w).sum(), ((out.argmax(1) == y).float() * w).sum(), w.sum()]).double()


def _same_change(before: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rtol: float = 0.01) -> bool:
    """Whether ``a`` and ``b`` moved away from ``before`` alike (relative to the move's size)."""
    da, db = (a.double() - before.double()), (b.double() - before.double())
    return bool(torch.linalg.vector_norm(da - db) <= rtol * torch.linalg.vector_norm(db) + 1e-12)


def train_one_epoch(accelerator, model, optimizer, loader, sampler: TrainBatchSampler, ctx: StepContext,
                    epoch: int, should_stop: Callable[[], bool] = lambda: False,
                    graphed: GraphedStep | None = None) -> EpochResult:
    t0 = time.perf_counter()
    model.train()
    set_train_mode(accelerator.unwrap_model(model), True, ctx.frozen, ctx.frozen_bn)
    if graphed is not None:
        graphed.begin_epoch(model, (id(model), tuple(g["lr"] for g in optimizer.param_groups), ctx.frozen,
                                    ctx.frozen_bn))
    world, k, n_steps = accelerator.num_processes, ctx.grad_accum_steps, len(sampler)
    dev = accelerator.device
    sums = torch.zeros(3, device=dev, dtype=torch.float64)  # weighted loss, correct, count
    bad: list[int] = []
    stopped = False
    bar = tqdm(total=n_steps, desc=f"epoch {epoch} train", leave=False, dynamic_ncols=True,
               disable=not accelerator.is_main_process)
    for step, batch in enumerate(loader):
        x, y, w, failed = _to_device(batch, dev, ctx)
        bad += failed
        lo = step // k * k
        hi = min(lo + k, n_steps)
        if step == lo:
            # accumulate() counts micro-steps and syncs when the count reaches k. Windows restart each
            # epoch and the last one may be short, so its count starts where it ends on our last step.
            accelerator.step = k - (hi - lo)
        denom = sum(sampler.global_count(s) for s in range(lo, hi))
        # (one process and k = 1 on the graph path: the same step as the eager one below)
        if graphed is not None and graphed.can_replay(len(y)) and graphed.step(x, y, w, world * k / denom):
            boundary = True
        else:
            # Inside a window DDP skips the all-reduce (no_sync); the window's last step syncs, and
            # only then do the prepared optimizer's step() and zero_grad() act.
            with graphed.eager() if graphed is not None else contextlib.nullcontext():
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        out = model(x)
                    per_sample = F.cross_entropy(out.float(), y, reduction="none")
                    # backward() divides by k; this loss is already the window's exact share, so undo that.
                    loss = (per_sample * w).sum() * (world * k / denom)
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                sums += _step_sums(per_sample, out, y, w)
            boundary = accelerator.sync_gradients
        bar.update(1)
        if boundary and should_stop():
            stopped = True
            break
    bar.close()
    if graphed is not None:
        sums += graphed.sums
    loss_sum, correct, count = _reduce_sum(accelerator, [sums])[0].tolist()
    n = max(1.0, count)
    return EpochResult(loss_sum / n, correct / n, int(count), time.perf_counter() - t0,
                       _gather_bad(accelerator, bad), stopped)


def share_buffers(accelerator, model) -> None:
    """Every rank takes rank 0's BatchNorm statistics.

    In train mode each rank updates its running statistics from its own slice; DDP hands rank 0's
    to the others only at the next forward. Evaluating and saving right after an epoch must use the
    same statistics on every rank, namely those in the saved checkpoint (rank 0's).
    """
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast
        buffers = list(accelerator.unwrap_model(model).buffers())
        if buffers:
            broadcast(buffers, from_process=0)


def weights_digest(module: torch.nn.Module) -> str:
    """A hash of every parameter and buffer, bit for bit."""
    h = hashlib.blake2b(digest_size=12)
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_in_sync(digests: list[str], epoch: int) -> None:
    """All ranks must hold the same weights; if not, training is silently wrong from here on."""
    off = [r for r, d in enumerate(digests) if d != digests[0]]
    if off:
        raise RuntimeError(f"ranks out of sync after epoch {epoch}: rank(s) {off} hold other weights than "
                           f"rank 0. This is a bug (or a hardware fault); please report it with the config")


def assert_ranks_in_sync(accelerator, model, epoch: int) -> str | None:
    """Compare a digest of the weights across ranks; returns it (None on a single process)."""
    if accelerator.num_processes == 1:
        return None
    from accelerate.utils import gather_object
    digests = gather_object([weights_digest(accelerator.unwrap_model(model))])
    check_in_sync(digests, epoch)
    return digests[0]


class HeadInputs:
    """The val set's inputs to ``fc`` under a fixed backbone, kept after the first evaluation.

    With the backbone frozen and its BatchNorm in eval mode, the network up to ``fc`` is the same
    function in every epoch and the val transform is deterministic, so these inputs never change:
    later evaluations run ``fc`` alone on them and get the same bits as a full forward pass, in a
    fraction of the time. The caller creates one only where they fit its memory budget.
    """

    def __init__(self) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None  # (x_fc, y, w)


@torch.inference_mode()
def evaluate(accelerator, model, loader, ctx: StepContext, num_classes: int, epoch: int = 0,
             head_inputs: HeadInputs | None = None) -> EpochResult:
    """Every val sample exactly once over all ranks; metrics reduced as sums (no padding to drop).

    Runs the unwrapped module: evaluation needs no gradient sync, and ranks may hold different
    numbers of batches, which a DDP forward (buffer broadcast) would turn into a hang.
    """
    t0 = time.perf_counter()
    net = accelerator.unwrap_model(model)
    set_train_mode(net, False, ctx.frozen, ctx.frozen_bn)
    head = getattr(net, HEAD)
    dev = accelerator.device
    loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, device=dev, dtype=torch.float64)
    bad: list[int] = []
    reuse = head_inputs is not None and head_inputs.batches is not None
    keep: list | None = [] if head_inputs is not None and not reuse else None
    seen: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda m, args: seen.append(args[0])) if keep is not None else None

    def batches():
        if reuse:
            yield from head_inputs.batches
            return
        for batch in tqdm(loader, desc=f"epoch {epoch} val", leave=False, dynamic_ncols=True,
                          disable=not accelerator.is_main_process):
            x, y, w, failed = _to_device(batch, dev, ctx)
            bad.extend(failed)
            yield x, y, w

    for x, y, w in batches():
        with accelerator.autocast():
            out = head(x) if reuse else net(x)
        if keep is not None:
            keep.append((seen.pop(), y, w))
        ok = w > 0
        loss_sum += F.cross_entropy(out.float()[ok], y[ok], reduction="sum")
        confusion += torch.bincount(y[ok] * num_classes + out.argmax(1)[ok],
                                    minlength=num_classes * num_classes).to(torch.float64)
    if keep is not None:
        hook.remove()
        head_inputs.batches = keep
    loss_sum, confusion = _reduce_sum(accelerator, [loss_sum, confusion])
    confusion = confusion.reshape(num_classes, num_classes).long()
    n = int(confusion.sum())
    return EpochResult(loss_sum.item() / max(1, n), confusion.diag().sum().item() / max(1, n), n,
                       time.perf_counter() - t0, _gather_bad(accelerator, bad), confusion=confusion)
