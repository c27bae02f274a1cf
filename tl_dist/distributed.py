"""Everything that knows there may be more than one process: the Accelerator, agreeing on errors,
sharing results from rank 0, stop signals, torchrun restarts, and the cross-rank checks.

Model, data, checkpoint, augmentation and recipe code never import accelerate; the trainer and the
epoch functions reach the other processes only through this module (and the Accelerator it makes).
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import socket
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast, broadcast_object_list, gather_object

from tl_dist.models import heads
from tl_dist import tracking
from tl_dist.config import Config
from tl_dist.errors import UserError, first_line

CHECK_EVERY = 8  # several processes: optimizer steps between exchanges of the stop flags
GRACE_SECONDS = 20.0  # after a stop signal, exit even if no step boundary was reached by then


# ----------------------------------------------------------------------------- set-up

def resolve_mixed_precision(mp: str, cuda: bool) -> str:
    """``auto``: bf16 where the hardware runs it fast (Ampere+ GPUs, CPUs with AVX512-BF16/AMX)."""
    if mp != "auto":
        return mp
    if cuda:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    flags = cpu_flags()
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "no"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux; empty where /proc/cpuinfo is not there)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def join_restarted_group(cuda: bool, timeout: timedelta) -> None:
    """Form the process group of a job that torchrun restarted, in keys of its own.

    torchrun's static rendezvous keeps one store for all attempts, and its workers connect to it
    with no per-attempt prefix, so the process-group keys of the failed attempt are still there. A
    restarted rank could read a dead peer's address from them and fail ("Gloo connectFullMesh
    failed ... Connection refused"). Each attempt gets its own prefix; accelerate then uses this group.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if attempt == "0" or world == 1 or dist.is_initialized() or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return
    if cuda:  # NCCL binds to the device current when it first communicates
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timedelta(minutes=5))
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.PrefixStore(f"tl_dist/attempt_{attempt}", store),
                            rank=int(os.environ["RANK"]), world_size=world, timeout=timeout)


def make_accelerator(cfg: Config):
    """(Accelerator, resolved mixed precision). Accumulation windows are the epoch loop's own."""
    cuda = torch.cuda.is_available()
    mp = resolve_mixed_precision(cfg.train.mixed_precision, cuda)
    if mp == "fp16" and not cuda:
        raise UserError("config: train.mixed_precision=fp16 needs a GPU; use bf16 or no on CPU")
    # How long a rank waits for the others in a collective before the job ends (a rank frozen or hung).
    timeout = timedelta(seconds=cfg.train.collective_timeout)
    join_restarted_group(cuda, timeout)
    # cpu=True without CUDA makes N launched processes one gloo group (MULTI_CPU) instead of N
    # independent single-process runs.
    acc = Accelerator(cpu=not cuda, mixed_precision=mp, kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)],
                      **tracking.accelerator_kwargs(cfg.train.log_with, cfg.train.output_dir))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and acc.num_processes != launched:
        raise UserError(f"launch: WORLD_SIZE={launched} but accelerate formed a group of "
                        f"{acc.num_processes}; check the launcher settings (accelerate config)")
    if cfg.train.sync_batchnorm and acc.num_processes > 1 and not cuda:
        raise UserError("config: train.sync_batchnorm=true needs CUDA GPUs (torch's SyncBatchNorm does not "
                        "run on CPU); set train.sync_batchnorm=false")
    return acc, mp


def plain_accelerator(cuda: bool):
    """An Accelerator for work without training (evaluation): this process's device and rank, fp32."""
    return Accelerator(cpu=not cuda, mixed_precision="no")


def reset_state() -> None:
    """Forget this process's Accelerator, so the next run in the same process (the doctor's
    self-test runs several) can make its own with other settings."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def rewrap_unfrozen(accelerator, net):
    """Train the backbone from now on, correctly under DDP.

    DDP decides which parameters it all-reduces when it wraps the model: those requiring grad then.
    A backbone unfrozen under the same wrapper would get gradients that are never averaged, and the
    ranks would drift apart (the Lightning BackboneFinetuning bug, issue 20340). So the module is
    wrapped again; the new wrapper registers every parameter (the ranks hold equal weights already).
    """
    inner = accelerator.unwrap_model(net)
    heads.set_frozen(inner, False)
    return accelerator.prepare_model(inner) if accelerator.num_processes > 1 else net


def free_port() -> int:
    """A port for a local 2-process job's rendezvous that nothing holds now. Drawn below Linux's
    ephemeral range (32768 and up), where gloo's own connections and every outgoing socket take their
    ports, so the job's store cannot lose its port to one of them between this check and its bind."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(100):
        port = random.randint(20000, max(20001, low - 1))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free local port for the 2-process job")


# ----------------------------------------------------------------------------- agreeing and sharing

def agree(accelerator, fn: Callable, *args, **kwargs):
    """Run ``fn`` on every rank; a UserError on any rank is raised on every rank.

    Set-up steps can fail on one rank only (a data folder missing on one machine, rank 0's scan
    finding bad files). Without this the healthy ranks would wait in the next collective until
    its timeout; with it, the whole job ends at once with the failing rank's message.
    ``fn`` itself must not run collectives.
    """
    err, result = None, None
    try:
        result = fn(*args, **kwargs)
    except UserError as e:
        err = str(e)
    if accelerator.num_processes > 1:
        errors = gather_objects(accelerator, err)
        failed = [(r, e) for r, e in enumerate(errors) if e]
        if failed:
            rank, msg = failed[0]
            raise UserError(msg if rank == accelerator.process_index else f"(on rank {rank}) {msg}")
    elif err:
        raise UserError(err)
    return result


def on_main_then_share(accelerator, fn: Callable):
    """``fn()`` on rank 0 only; its result is broadcast to every rank, its UserError raised on all."""
    value = agree(accelerator, lambda: fn() if accelerator.is_main_process else None)
    if accelerator.num_processes > 1:
        box = [value]
        broadcast_object_list(box, from_process=0)
        value = box[0]
    return value


def gather_objects(accelerator, obj: Any) -> list:
    """Every rank's ``obj``, in rank order (picklable values of this process's own making)."""
    if accelerator.num_processes == 1:
        return [obj]
    return gather_object([obj])


def gather_union(accelerator, items: list[int]) -> list[int]:
    """The sorted union of every rank's ``items``."""
    if accelerator.num_processes == 1:
        return items
    return sorted({i for part in gather_objects(accelerator, items) for i in part})


def gather_rows(accelerator, rows: torch.Tensor) -> torch.Tensor:
    """Every rank's rows (any number each, the same trailing shape and dtype), concatenated in rank
    order, on every rank: one all-gather of the rows padded to the longest rank's count."""
    if accelerator.num_processes == 1:
        return rows
    counts = gather_objects(accelerator, len(rows))
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))
    padded[:len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def reduce_sum(accelerator, values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor summed over ranks (in float64, in one collective), returned on the CPU."""
    flat = torch.cat([v.reshape(-1).to(accelerator.device, torch.float64) for v in values])
    if accelerator.num_processes > 1:
        flat = accelerator.reduce(flat, reduction="sum")
    out, i = [], 0
    for v in values:
        out.append(flat[i:i + v.numel()].reshape(v.shape).cpu())
        i += v.numel()
    return out


def share_buffers(accelerator, model) -> None:
    """Every rank takes rank 0's BatchNorm statistics.

    In train mode each rank updates its running statistics from its own slice; DDP hands rank 0's
    to the others only at the next forward. Evaluating and saving right after an epoch must use the
    same statistics on every rank, namely those in the saved checkpoint (rank 0's).
    """
    if accelerator.num_processes > 1:
        buffers = list(accelerator.unwrap_model(model).buffers())
        if buffers:
            broadcast(buffers, from_process=0)


# ----------------------------------------------------------------------------- checks

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
    digests = gather_objects(accelerator, weights_digest(accelerator.unwrap_model(model)))
    check_in_sync(digests, epoch)
    return digests[0]


def spans_machines(accelerator) -> bool:
    """Whether the job's processes run on more than one machine (the launchers say how many run
    on this one; without that word, assume they may)."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    return local is None or not local.isdigit() or int(local) < accelerator.num_processes


def check_same_data(accelerator, mine: dict | None) -> None:
    """Every process must train on the same data: a machine with another copy (a class more, a
    re-encoded image) would fail deep inside DDP or, worse, train on silently. Rank 0 compares each
    rank's ``data.identity`` with its own and names the first difference (every rank raises it)."""
    if accelerator.num_processes == 1:
        return
    seen = gather_objects(accelerator, (socket.gethostname(), mine))

    def compare() -> None:
        if not accelerator.is_main_process:
            return
        _, ref = seen[0]
        for rank, (host, other) in enumerate(seen[1:], start=1):
            why = data_difference(ref, other)
            if why:
                raise UserError(f"data: rank {rank} (on {host}) sees other data under data.root than rank 0: {why}; "
                                f"every machine must hold the same copy of the data set")
    agree(accelerator, compare)


def data_difference(a: dict, b: dict) -> str | None:
    """The first difference between two ``data.identity`` records, in words (rank 0's first)."""
    if a["classes"] != b["classes"]:
        only_a, only_b = sorted(set(a["classes"]) - set(b["classes"])), sorted(set(b["classes"]) - set(a["classes"]))
        return (f"classes differ (only on rank 0: {', '.join(only_a[:5]) or 'none'}; only there: "
                f"{', '.join(only_b[:5]) or 'none'})" if only_a or only_b else "the classes are in another order")
    for split in ("train", "val"):
        if a[split]["images"] != b[split]["images"]:
            return f"{split} images {a[split]['images']} on rank 0, {b[split]['images']} there"
        if a[split]["names"] != b[split]["names"]:
            return f"other {split} file names (same count, {a[split]['images']})"
    if "content" in a and "content" in b and a["content"] != b["content"]:
        return f"the same file names but other contents (compared: {a['content']['what']})"
    return None


class JobFailure(UserError):
    """The job cannot go on, through no fault of the config (a rank stopped answering): one line, exit 1."""

    exit_code = 1


# rank -> (host, pid) of every process of the job, learnt at start-up: who to name when one is gone
_PEERS: list[tuple[str, int]] = []
# how gloo / NCCL / the store say that the other end of a connection has gone
_LOST = ("connection reset by peer", "connection closed by peer", "broken pipe", "socket closed",
         "remote process exited", "connection refused")


def note_peers(accelerator) -> None:
    """Learn every rank's host and pid (one small collective at start-up)."""
    global _PEERS
    _PEERS = list(gather_objects(accelerator, (socket.gethostname(), os.getpid())))


def gone_peers() -> list[str]:
    """The ranks on this machine whose process has ended, as "rank R (pid P)"."""
    from tl_dist.files.outputs import alive

    here = socket.gethostname()
    return [f"rank {r} (pid {pid})" for r, (host, pid) in enumerate(_PEERS)
            if host == here and pid != os.getpid() and not alive(pid)]


def _waited_in(e: BaseException) -> str:
    """Where this rank was when ``e`` was raised: the innermost frame of tl_dist's own code."""
    where, epoch, tb = "set-up", None, e.__traceback__
    while tb is not None:
        frame, code = tb.tb_frame, tb.tb_frame.f_code
        if f"{os.sep}tl_dist{os.sep}" in code.co_filename:
            where = f"{getattr(code, 'co_qualname', code.co_name)} ({os.path.basename(code.co_filename)}:{tb.tb_lineno})"
            epoch = frame.f_locals.get("epoch", epoch) if code.co_name == "_fit" else epoch
        tb = tb.tb_next
    return where if epoch is None else f"epoch {epoch}, {where}"


def as_job_failure(e: BaseException, timeout_s: int) -> JobFailure | None:
    """A collective that timed out, or whose peer went away, as one line naming the rank that is
    gone (where it can be known) and where this rank was waiting; else None."""
    text = str(e)
    if isinstance(e, RuntimeError) and any(w in text.lower() for w in _LOST):
        time.sleep(0.5)  # a killed peer's process may take a moment to be reaped by its launcher
        gone = gone_peers()
        who = (f"{' and '.join(gone)} ended (killed or crashed)" if gone
               else "another rank went away (killed, crashed, or its machine is unreachable)")
        said = re.sub(r"^\[[^\]]*\]\s*", "", first_line(e, 300))[:100]  # without gloo's source location
        return JobFailure(f"distributed: {who} while this one waited in {_waited_in(e)} ({said}). "
                          f"The last complete epoch is saved: run the same command to resume")
    if not isinstance(e, RuntimeError) or not any(w in text.lower() for w in ("timed out", "timeout")):
        return None
    where = _waited_in(e)
    return JobFailure(f"distributed: another rank did not answer for train.collective_timeout={timeout_s}s, while "
                      f"this one waited in {where} ({first_line(e, 120)}); a rank is frozen, hung or much slower. "
                      f"The last complete epoch is saved: run the same command to resume")


# ----------------------------------------------------------------------------- stopping

class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop stops at the next step boundary, on every rank together.

    Python runs signal handlers in the main thread, between bytecodes: a rank blocked in a
    collective (a peer gone or frozen) never runs them. So the signal also wakes a watchdog thread,
    through the wakeup fd that Python's C-level handler writes to whatever the main thread does,
    and the watchdog ends the process GRACE_SECONDS later unless it has stopped by then. Nothing is
    lost (every file on disk is complete), and launchers, which escalate to SIGKILL (torchrun:
    30 s), are not kept waiting.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._group = None  # several processes: the CPU (gloo) group the flags are exchanged over
        self._calls = 0  # in-loop checks so far: the same count on every rank
        # called by the watchdog just before it ends the process (the run's status file says so)
        self.before_forced_exit: Callable[[], None] = lambda: None
        self._previous: dict[int, Any] = {}
        self._previous_fd = -1
        self._wake: int | None = None

    def __enter__(self) -> "StopRequest":
        for s in (signal.SIGTERM, signal.SIGINT):
            self._previous[s] = signal.signal(s, self._handle)
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._wake = w
        self._previous_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        threading.Thread(target=self._watchdog, args=(r, self._forced_exit), daemon=True,
                         name="tl_dist-stop-watchdog").start()
        return self

    def __exit__(self, *exc) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        for s, h in self._previous.items():
            signal.signal(s, h)
        os.close(self._wake)  # the watchdog reads the end of the pipe and leaves

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user really means now
        self.signum = signum

    def _forced_exit(self, code: int) -> None:
        try:
            self.before_forced_exit()
        except BaseException:  # the exit matters more than the record of it
            pass
        os._exit(code)

    @staticmethod
    def _watchdog(r: int, forced_exit: Callable[[int], None]) -> None:
        armed = False
        try:
            while received := os.read(r, 64):  # until __exit__ closes the other end
                first = next((s for s in received if s in (signal.SIGTERM, signal.SIGINT)), None)
                if first is not None and not armed:
                    armed = True
                    timer = threading.Timer(GRACE_SECONDS, forced_exit, args=(128 + first,))
                    timer.daemon = True
                    timer.start()
        finally:
            os.close(r)

    def attach(self, accelerator, timeout_s: float) -> None:
        """Several processes: a CPU (gloo) group for the flags, so that exchanging them never waits for
        the GPU: the job's own group where it is gloo, else one of its own (every rank calls this at
        the same point)."""
        if accelerator.num_processes > 1 and self._group is None:
            self._group = (dist.group.WORLD if dist.get_backend() == "gloo"
                           else dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)))

    def check(self, accelerator, now: bool = False) -> bool:
        """Whether a rank was asked to stop: every rank calls it at the same step boundaries and gets
        the same answer, so all stop at the same boundary. It never waits for the device: with one
        process it reads its own flag; with several the flags are summed over the CPU group every
        CHECK_EVERY calls (a signal is acted on within that many optimizer steps), and at once with
        ``now`` (an epoch's end)."""
        mine = 1.0 if self.signum is not None else 0.0
        if accelerator.num_processes == 1 or self._group is None:
            return mine > 0
        self._calls += 1
        if not now and self._calls % CHECK_EVERY:
            return False
        flag = torch.tensor([mine])  # (a CPU tensor on a gloo group: the device is not involved)
        dist.all_reduce(flag, group=self._group)
        return flag.tolist()[0] > 0
