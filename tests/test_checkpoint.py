import json
import os

import pytest
import torch

from tl_dist.files import background_writer, checkpoint, resume_file
from tl_dist.errors import UserError


def _meta(n=2):
    """The metadata every reader needs (as training writes it)."""
    return {"classes": [f"c{i}" for i in range(n)], "num_classes": n, "arch": "resnet18", "image_size": 32,
            "resize_size": 36, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def test_round_trip_metadata_in_header_and_json(tmp_path):
    state = {"fc.weight": torch.randn(2, 4), "fc.bias": torch.zeros(2)}
    checkpoint.save_weights(tmp_path / "best.safetensors", state, _meta())
    got, meta = checkpoint.load_weights(tmp_path / "best.safetensors")
    assert torch.equal(got["fc.weight"], state["fc.weight"]) and meta["classes"] == ["c0", "c1"]
    assert json.loads((tmp_path / "best.json").read_text()) == meta
    assert checkpoint.read_metadata(tmp_path / "best.safetensors") == meta


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    p = tmp_path / "best.safetensors"
    checkpoint.save_weights(p, {"fc.weight": torch.ones(2, 1), "fc.bias": torch.ones(2)}, _meta())
    before = p.read_bytes()

    def crash(*a):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError):
        checkpoint.save_weights(p, {"fc.weight": torch.zeros(2, 1), "fc.bias": torch.zeros(2)}, _meta())
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir() if f.name.endswith(".tmp")] == []


@pytest.mark.parametrize("damage", ["truncate", "header", "empty"])
def test_damaged_checkpoint_names_file(tmp_path, damage):
    p = tmp_path / "best.safetensors"
    checkpoint.save_weights(p, {"fc.weight": torch.ones(2, 1000), "fc.bias": torch.ones(2)}, _meta())
    b = p.read_bytes()
    p.write_bytes({"truncate": b[:-100], "header": b[:8] + b"{nonsense" + b[17:], "empty": b""}[damage])
    with pytest.raises(UserError, match=str(p)):
        checkpoint.load_weights(p)


def test_metadata_must_match_weights(tmp_path):
    p = tmp_path / "best.safetensors"
    checkpoint.save_weights(p, {"fc.weight": torch.ones(3, 4), "fc.bias": torch.ones(3)}, _meta(2))
    with pytest.raises(UserError, match="metadata does not match the weights"):
        checkpoint.load_weights(p)


def test_resume_state_loads_without_unpickling_code(tmp_path):
    resume_file.save_state(tmp_path / "resume.pt", {"epoch": 3, "t": torch.ones(2), "h": [{"a": 1.0}]})
    assert resume_file.load_state(tmp_path / "resume.pt")["epoch"] == 3
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="bad.pt"):
        resume_file.load_state(tmp_path / "bad.pt")


def test_snapshot_is_not_changed_by_later_in_place_updates():
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    weights, state = background_writer.snapshot(net.state_dict()), background_writer.snapshot(opt.state_dict())
    w0, m0 = weights["weight"].clone(), state["state"][0]["momentum_buffer"].clone()
    net(torch.ones(1, 3)).sum().backward()
    opt.step()  # changes the weights and the momentum buffers in place
    assert not torch.equal(net.weight, w0)
    assert torch.equal(weights["weight"], w0) and torch.equal(state["state"][0]["momentum_buffer"], m0)
    assert state["param_groups"][0]["lr"] == 0.1


def test_background_writer_runs_jobs_in_order_one_at_a_time():
    import threading
    w, done, release = background_writer.BackgroundWriter(), [], threading.Event()

    def first():
        release.wait(10)
        done.append(1)
    w.submit(first)
    assert done == []  # submit returned while the job is still running
    release.set()
    w.submit(lambda: done.append(2))  # waits for the first job before starting the second
    assert done[0] == 1
    w.close()
    assert done == [1, 2]


def test_background_writer_raises_a_failed_write():
    w = background_writer.BackgroundWriter()

    def fail():
        raise UserError("checkpoint: disk full")
    w.submit(fail)
    with pytest.raises(UserError, match="disk full"):
        w.submit(lambda: None)  # the next epoch boundary
    w.submit(fail)
    with pytest.raises(UserError, match="disk full"):
        w.close()


def test_written_files_get_the_mode_open_would_give_them(tmp_path):
    """Temp files are created 0600; what is renamed into place must be readable as the umask says
    (teammates on a shared filesystem read the checkpoints)."""
    import subprocess
    import sys
    code = ("import os, sys; os.umask(int(sys.argv[2], 8)); from tl_dist.files import atomic; "
            "atomic.atomic_write(sys.argv[1] + '/a.bin', b'x'); open(sys.argv[1] + '/b.bin', 'w').close()")
    for umask in ("022", "027", "077"):
        d = tmp_path / umask
        d.mkdir()
        subprocess.run([sys.executable, "-c", code, str(d), umask], check=True,
                       cwd=__import__("tests.conftest", fromlist=["ROOT"]).ROOT)
        assert (d / "a.bin").stat().st_mode & 0o777 == (d / "b.bin").stat().st_mode & 0o777 == 0o666 & ~int(umask, 8)


def test_a_failed_background_write_is_one_line_naming_the_key_that_writes_between_epochs():
    w = background_writer.BackgroundWriter(background=True)

    def job():
        raise RuntimeError("CUDA error: unspecified launch failure\nmore")
    w.submit(job)
    with pytest.raises(UserError) as e:
        w.close()
    msg = str(e.value)
    assert msg.startswith("checkpoint: the background writer failed: CUDA error: unspecified launch failure;")
    assert "train.write_in_background=false writes between epochs" in msg and "\n" not in msg


def test_metadata_nested_without_end_is_one_error_naming_the_file(tmp_path):
    from safetensors.torch import save_file
    deep = "[" * 100_000 + "]" * 100_000
    save_file({"fc.weight": torch.zeros(2, 2)}, str(tmp_path / "deep.safetensors"), metadata={"tl_dist": deep})
    with pytest.raises(UserError, match="deep.safetensors is damaged or not a tl_dist checkpoint: its metadata is "
                                        "nested too deeply"):
        checkpoint.read_metadata(tmp_path / "deep.safetensors")
