"""Exported files from elsewhere run no code unless trusted, exports never replace a file tl_dist did
not write, and a full disk or a signal during an export ends in one line with nothing left behind."""
import json
import os
import resource
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from tl_dist.commands import evaluate, export, predict
from tl_dist import predictor

from .conftest import ROOT
from .test_export import leftovers, run  # noqa: F401 - the checkpoint fixture

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _quick_latency(monkeypatch):
    monkeypatch.setattr(export, "LATENCY_BUDGET_S", 0.05)


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory):  # noqa: F811
    """One real file of each format, written by tl-dist export."""
    out = tmp_path_factory.mktemp("exports")
    for fmt, name in (("onnx", "m.onnx"), ("torchscript", "m.pt"), ("exported", "m.pt2")):
        assert export.main([str(run), "--format", fmt, "--out", str(out / name)]) == 0
    return out


def one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and all(w in err for w in words), err
    return err


def rewrite_zip(src, dst, change):
    """A copy of the archive ``src`` with ``change(name, bytes) -> bytes`` applied to every member."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, change(info.filename, zin.read(info.filename)))


class Payload:
    """Unpickling it touches a file, then hands back a tensor of the right shape (the attack works silently)."""

    def __init__(self, marker, shape):
        self.marker, self.shape = str(marker), list(shape)

    def __reduce__(self):
        return eval, (f"(__import__('pathlib').Path({self.marker!r}).touch(), "
                      f"__import__('torch').zeros({self.shape}))[1]",)


def test_a_pt2_with_a_pickled_weight_runs_no_code_even_when_trusted(exports, tiny_data, tmp_path, capsys):
    marker = tmp_path / "the-attack-ran"
    config_name = next(n for n in zipfile.ZipFile(exports / "m.pt2").namelist() if n.endswith("_weights_config.json"))
    config = json.loads(zipfile.ZipFile(exports / "m.pt2").read(config_name))
    fqn, entry = next(iter(config["config"].items()))
    entry["use_pickle"] = True
    import io
    buf = io.BytesIO()
    torch.save(Payload(marker, [d["as_int"] for d in entry["tensor_meta"]["sizes"]]), buf)
    member = config_name.rsplit("/", 1)[0] + "/" + entry["path_name"]
    hostile = tmp_path / "hostile.pt2"
    rewrite_zip(exports / "m.pt2", hostile, lambda name, data: json.dumps(config).encode() if name == config_name
                else buf.getvalue() if name == member else data)
    img = str(next((tiny_data / "val" / "ants").iterdir()))
    assert predict.main([img, "--checkpoint", str(hostile)]) == 2
    one_line_error(capsys, "a torch.export program", "--trust-code")
    assert predict.main([img, "--checkpoint", str(hostile), "--trust-code"]) == 2
    one_line_error(capsys, "pickled parts", fqn, "Refused even with --trust-code")
    with pytest.raises(Exception, match="pickled parts"):
        predictor.Predictor.from_checkpoint(hostile, device="cpu", trust_code=True)
    assert not marker.exists()
    # the file tl-dist export wrote itself has no pickled part, and runs when trusted
    assert predict.main([img, "--checkpoint", str(exports / "m.pt2"), "--trust-code", "--json"]) == 0


def test_a_torchscript_file_is_a_program_and_runs_only_when_trusted(exports, tiny_data, tmp_path, capsys):
    written = tmp_path / "written-by-the-model"

    class Writes(torch.nn.Module):
        def __init__(self, path: str):
            super().__init__()
            self.path = path

        def forward(self, x):
            torch.from_file(self.path, shared=True, size=16, dtype=torch.uint8)
            return torch.zeros(x.shape[0], 2)
    z = zipfile.ZipFile(exports / "m.pt")
    description = z.read(next(n for n in z.namelist() if n.endswith("extra/tl_dist.json"))).decode()
    hostile = tmp_path / "hostile.pt"
    torch.jit.save(torch.jit.script(Writes(str(written))), str(hostile), _extra_files={"tl_dist.json": description})
    img = str(next((tiny_data / "val" / "ants").iterdir()))
    for command in (predict.main, evaluate.main):
        args = [img, "--checkpoint", str(hostile)] if command is predict.main else \
            [str(tiny_data / "val"), "--checkpoint", str(hostile), "--out", str(tmp_path / "e")]
        assert command(args) == 2
        one_line_error(capsys, "a TorchScript program", "loading it runs the code inside it", "--trust-code")
    assert not written.exists() and not (tmp_path / "e").exists()
    with pytest.raises(Exception, match="--trust-code"):
        predictor.Predictor.from_checkpoint(hostile, device="cpu")
    assert not written.exists()


def test_evaluate_measures_an_exported_file_as_it_measures_the_checkpoint(run, exports, tiny_data, tmp_path, capsys):  # noqa: F811
    for ckpt, extra in ((run, []), (exports / "m.pt", ["--trust-code"]), (exports / "m.onnx", [])):
        out = tmp_path / ckpt.name
        assert evaluate.main([str(tiny_data), "--split", "val", "--checkpoint", str(ckpt), "--out", str(out),
                              "--json", *extra]) == 0
    capsys.readouterr()
    want = json.loads((tmp_path / run.name / "metrics.json").read_text())
    for name in ("m.pt", "m.onnx"):
        got = json.loads((tmp_path / name / "metrics.json").read_text())
        assert got["confusion_matrix"] == want["confusion_matrix"] and got["n"] == 13
        assert abs(got["loss"] - want["loss"]) < 1e-4


def test_a_description_that_does_not_fit_the_model_is_refused_at_load(exports, tiny_data, tmp_path, capsys):
    import onnx

    img = str(next((tiny_data / "val" / "ants").iterdir()))
    for classes in (["ants", "bees", "wasps"], ["ants"]):
        proto = onnx.load(str(exports / "m.onnx"))
        prop = next(p for p in proto.metadata_props if p.key == "tl_dist.json")
        desc = json.loads(prop.value)
        prop.value = json.dumps({**desc, "classes": classes, "num_classes": len(classes)})
        f = tmp_path / f"{len(classes)}.onnx"
        onnx.save(proto, str(f))
        assert predict.main([img, "--checkpoint", str(f)]) == 2
        one_line_error(capsys, f"lists {len(classes)} classes", "(1, 2)")


def test_an_onnx_file_that_reads_weights_from_elsewhere_is_refused(exports, tiny_data, tmp_path, capsys):
    import onnx

    proto = onnx.load(str(exports / "m.onnx"))
    tensor = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../etc/hostname"
    f = tmp_path / "far.onnx"
    onnx.save(proto, str(f))
    assert predict.main([str(next((tiny_data / "val" / "ants").iterdir())), "--checkpoint", str(f)]) == 2
    one_line_error(capsys, "outside its own folder", "../../etc/hostname")


def test_export_replaces_only_its_own_files(run, tmp_path, capsys):  # noqa: F811
    notes, notes_json = tmp_path / "notes.pt", tmp_path / "notes.pt.json"
    notes.write_bytes(b"my notes")
    assert export.main([str(run), "--format", "torchscript", "--out", str(notes)]) == 2
    one_line_error(capsys, str(notes), "not written by tl_dist", "--force")
    notes.unlink()
    notes_json.write_text('{"mine": true}')
    assert export.main([str(run), "--format", "torchscript", "--out", str(notes)]) == 2
    one_line_error(capsys, str(notes_json), "not written by tl_dist")
    assert notes_json.read_text() == '{"mine": true}' and not notes.exists() and leftovers(tmp_path) == []
    # the run's own resume state: never, not even with --force
    (run / "resume.pt").write_bytes(b"resume state")
    try:
        for extra in ([], ["--force"]):
            assert export.main([str(run), "--format", "torchscript", "--out", str(run / "resume.pt"), *extra]) == 2
            one_line_error(capsys, "resume.pt is a file training writes", "never an export target")
        assert (run / "resume.pt").read_bytes() == b"resume state"
    finally:
        (run / "resume.pt").unlink()
    # --force replaces the user's files; an earlier export is replaced without it
    notes.write_bytes(b"my notes")
    assert export.main([str(run), "--format", "torchscript", "--out", str(notes), "--force"]) == 0
    assert export.main([str(run), "--format", "torchscript", "--out", str(notes)]) == 0
    assert json.loads(notes_json.read_text())["format"] == "tl_dist-export/1"


def test_an_unwritable_place_is_one_line_before_any_work(run, capsys):  # noqa: F811
    assert export.main([str(run), "--out", "/proc/m.onnx"]) == 2  # read-only even for root
    one_line_error(capsys, "/proc", "cannot write in")


def export_process(run, out, fmt, limit=None):  # noqa: F811
    def child():
        if limit:  # a disk that fills: writes past the limit fail (EFBIG) instead of killing the process
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen([sys.executable, "-m", "tl_dist", "export", str(run), "--format", fmt, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, preexec_fn=child)


@pytest.mark.parametrize("fmt", ["torchscript", "exported"])
def test_a_full_disk_is_one_line_and_leaves_nothing(run, tmp_path, fmt):  # noqa: F811
    p = export_process(run, tmp_path / ("m.pt" if fmt == "torchscript" else "m.pt2"), fmt, limit=1 << 20)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2, err
    assert err.count("\n") == 1 and "File too large" in err and "nothing written" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_an_export_ends_in_one_line_with_no_temporary_folder(run, tmp_path, signum):  # noqa: F811
    p = export_process(run, tmp_path / "m.pt2", "exported")
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".m.pt2.*.tmp")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(tmp_path.glob(".m.pt2.*.tmp")), "the export never started writing"
    p.send_signal(signum)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signum and "Traceback" not in err, err
    assert err.count("\n") == 1 and f"stopped by {signal.Signals(signum).name}" in err, err
    assert list(tmp_path.iterdir()) == []


def test_the_next_export_removes_what_a_killed_one_left(run, tmp_path):  # noqa: F811
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f".m.onnx.{gone.pid}.x1y2.tmp"
    live = tmp_path / f".m.onnx.{os.getpid()}.a1b2.tmp"  # an export still running here: not touched
    for d in (stale, live):
        d.mkdir()
        (d / "m.onnx").write_bytes(b"half a model")
    assert export.main([str(run), "--out", str(tmp_path / "m.onnx")]) == 0
    assert not stale.exists() and live.exists()


def test_a_description_nested_without_end_is_one_line(exports, tiny_data, tmp_path, capsys):
    import onnx

    proto = onnx.load(str(exports / "m.onnx"))
    next(p for p in proto.metadata_props if p.key == "tl_dist.json").value = "[" * 100_000 + "]" * 100_000
    onnx.save(proto, str(tmp_path / "deep.onnx"))
    assert predict.main([str(next((tiny_data / "val" / "ants").iterdir())), "--checkpoint",
                         str(tmp_path / "deep.onnx")]) == 2
    one_line_error(capsys, "nested too deeply")
