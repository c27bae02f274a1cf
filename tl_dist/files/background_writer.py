"""Writing an epoch's files while the next epoch trains: ``snapshot`` takes CPU copies of the state
now, ``BackgroundWriter`` writes them on one thread, in order, and reports a failure at the next
epoch boundary (or writes in place, between epochs, where the host's cores are busy training)."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch

from tl_dist.errors import UserError, first_line


def snapshot(obj: Any) -> Any:
    """A CPU copy, taken now, of every tensor in ``obj`` (nested dicts, lists, tuples).

    Training changes weights and optimizer buffers in place; a file written in the background
    must hold them as they were at the end of the epoch, not as the next epoch leaves them.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class BackgroundWriter:
    """Runs write jobs on one thread, one after another, while the next epoch trains.

    At most one job is in flight: ``submit`` first waits for the previous job, so memory holds at
    most one extra copy of the state, files appear in the order they were submitted, and a failed
    write is raised in the training loop at the next epoch boundary (or at ``close``).

    ``background=False`` runs each job inside ``submit``. That is the choice when the CPU trains the
    model: a writer thread then takes cores from the compute threads, which wait for each other at
    every operation, and costs more than the writing itself (docs/performance.md has the figures).
    """

    def __init__(self, background: bool = True) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tl_dist-writer") if background else None
        self._pending: Future | None = None

    def submit(self, job: Callable[[], None]) -> None:
        self.wait()
        if self._pool is None:
            job()
        else:
            self._pending = self._pool.submit(job)

    def wait(self) -> None:
        """Block until the submitted job has finished; raise its error, if it had one."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except (UserError, OSError):
            raise  # a file that cannot be written says which, wherever it was written
        except Exception as e:
            if self._pool is None:
                raise
            raise UserError(f"checkpoint: the background writer failed: {first_line(e)}; "
                            f"train.write_in_background=false writes between epochs instead") from e

    def close(self) -> None:
        """Finish what was submitted (so no complete epoch is lost), then stop the thread."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
