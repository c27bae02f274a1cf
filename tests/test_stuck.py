"""A rank that stops answering (frozen, or hung in a collective) must not hold the job forever."""
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from .conftest import FAST, ROOT, free_port

pytestmark = pytest.mark.multiproc


def _launch(tmp_path, *over):
    tag = uuid.uuid4().hex
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TL_DIST_TEST_TAG": tag}
    port = str(free_port())
    p = subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--main_process_port", port, "-m", "tl_dist.train", str(ROOT / "configs" / "demo.yaml"),
                          *FAST, f"data.root={tmp_path.parent / 'data'}", "data.demo=false",
                          f"train.output_dir={tmp_path / 'run'}", "train.epochs=200", *over],
                         env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    return p, tag.encode()


def _ranks(tag: bytes) -> dict[int, int]:
    """rank -> pid of the job's worker processes (found by their environment)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            env = dict(e.split(b"=", 1) for e in (d / "environ").read_bytes().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if env.get(b"TL_DIST_TEST_TAG") == tag and b"LOCAL_RANK" in env and b"tl_dist.train" in (d / "cmdline").read_bytes():
            out[int(env[b"RANK"])] = int(d.name)
    return out


def _alive(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]) != "Z"
    except OSError:
        return False


def _frozen_after_an_epoch(tmp_path, *over):
    p, tag = _launch(tmp_path, *over)
    deadline = time.time() + 180
    metrics = tmp_path / "run" / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    ranks = _ranks(tag)
    assert p.poll() is None and set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGSTOP)
    return p, ranks


def _finish(p, ranks):
    # The whole job, the frozen rank too (SIGKILL needs no SIGCONT); the launcher may have put its
    # workers in sessions of their own.
    for pid in ranks.values():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return p.communicate(timeout=60)


@pytest.fixture
def data_dir(tiny_data, tmp_path):
    (tmp_path / "data").symlink_to(tiny_data)
    return tmp_path / "t"


def test_a_stop_signal_ends_a_rank_blocked_by_a_frozen_peer(data_dir):
    from tl_dist.distributed import GRACE_SECONDS
    p, ranks = _frozen_after_an_epoch(data_dir, "train.collective_timeout=600")
    try:
        time.sleep(2)  # rank 0 is now waiting for rank 1 inside a collective
        os.kill(ranks[0], signal.SIGTERM)
        t0 = time.time()
        while _alive(ranks[0]) and time.time() - t0 < GRACE_SECONDS + 30:
            time.sleep(0.2)
        assert not _alive(ranks[0]), "rank 0 still alive"
        assert time.time() - t0 < GRACE_SECONDS + 5
    finally:
        _finish(p, ranks)
    # the run's record says how it ended (not "running", as if a live process still held it)
    status = json.loads((data_dir / "run" / "status.json").read_text())
    assert status["status"] == "interrupted" and "waiting for another rank" in status["detail"], status


def test_a_frozen_rank_ends_the_job_at_the_collective_timeout_with_one_line(data_dir):
    p, ranks = _frozen_after_an_epoch(data_dir, "train.collective_timeout=5")
    try:
        t0 = time.time()
        while _alive(ranks[0]) and time.time() - t0 < 90:
            time.sleep(0.2)
        assert not _alive(ranks[0]) and time.time() - t0 < 45
    finally:
        _, err = _finish(p, ranks)
    lines = [line for line in err.splitlines() if line.startswith("error: distributed:")]
    assert len(lines) == 1, err[-3000:]
    assert "train.collective_timeout=5s" in lines[0] and "waited in epoch " in lines[0]


def test_a_killed_rank_is_named_in_one_line(data_dir):
    p, tag = _launch(data_dir, "train.collective_timeout=600")
    deadline = time.time() + 180
    metrics = data_dir / "run" / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    ranks = _ranks(tag)
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGKILL)
    try:
        t0 = time.time()
        while _alive(ranks[0]) and time.time() - t0 < 90:
            time.sleep(0.2)
    finally:
        _, err = _finish(p, ranks)
    lines = [line for line in err.splitlines() if line.startswith("error: distributed:")]
    assert len(lines) == 1, err[-3000:]
    assert f"rank 1 (pid {ranks[1]}) ended (killed or crashed)" in lines[0] and "resume" in lines[0]
    assert "Connection reset by peer" not in err.replace(lines[0], "") and "pair.cc" not in err, err[-3000:]
