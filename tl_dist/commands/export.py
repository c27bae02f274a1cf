"""tl-dist export RUN --format torchscript|onnx|exported: a checkpoint as a file other runtimes load.

    tl-dist export RUN [--format F] [--out FILE] [--dynamic-batch] [--input float32|uint8] [--images PATH ...]

The file holds the classifier with its normalisation (see ``exported``); its description (classes,
input, eval transform) goes inside it and beside it as FILE.json. Before anything is reported or
put in place, the file is loaded back in its own runtime (torch.jit.load, torch.export.load,
onnxruntime) and its logits on real images (the checkpoint's eval transform of --images, or of the
run's val folder) must match the eager model's within 1e-4 (of the largest logit, where the logits
exceed 1); then it is moved into place, so a failed
export leaves nothing behind and an existing file is replaced whole. Prints the largest difference
and the CPU latency at batch 1 and 32, exported against eager.

It replaces only an earlier export (a file carrying tl_dist's description) unless ``--force``, never
a run's own files (``resume.pt``); the place is checked before any work. The file is serialised in
memory and written by Python, so a full disk is one line, not an abort inside torch's C++ writer;
SIGINT / SIGTERM end it with one line and no temporary folder, and a folder that a killed export
left is removed by the next export to the same place.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from tl_dist.errors import UserError, first_line, one_line, printable


TOLERANCE = 1e-4  # largest |logit difference| accepted, fp32; relative to the largest logit past 1


CHECK_IMAGES = 8


OPSET = 18


LATENCY_BUDGET_S = 1.0  # per measurement: a bound for large models on a laptop


class ExportFailed(Exception):
    """The export ran and its result is wrong or could not be made: not the user's mistake (exit 1)."""


def check_images(paths: list[str], meta: dict, given: bool) -> tuple[list[str], str]:
    """Up to CHECK_IMAGES image files, spread over the listing (so over the classes), and where from."""
    from tl_dist.data.images import list_images

    if given:
        found = [f for p in paths for f in (list_images(p) if os.path.isdir(p) else [p])]
        if not found:
            raise UserError(f"export: no image files in --images {' '.join(paths)}")
        where = "--images"
    else:
        data = meta.get("config", {}).get("data", {})
        val = Path(str(data.get("root", ""))) / "val"
        found = list_images(str(val)) if val.is_dir() else []
        where = str(val)
    step = max(1, len(found) // CHECK_IMAGES)
    return found[::step][:CHECK_IMAGES], where


def export_to(module, example, fmt: str, path: Path, dynamic: bool, description: str) -> None:
    """Write ``module`` as ``fmt`` to ``path`` (data files, if any, beside it)."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():  # torch's deprecation and tracer notes are for its developers
        warnings.simplefilter("ignore")
        # The torch formats into memory, then onto the disk by Python: torch's C++ file writer aborts
        # the process on a full disk instead of raising.
        buf = io.BytesIO()
        if fmt == "torchscript":
            with torch.inference_mode():
                traced = torch.jit.trace(module, example, check_trace=False)
            torch.jit.save(traced, buf, _extra_files={"tl_dist.json": description})
        elif fmt == "exported":
            program = torch.export.export(module, (example,), dynamic_shapes={"x": {0: batch}} if dynamic else None)
            torch.export.save(program, buf, extra_files={"tl_dist.json": description})
        else:
            program = torch.onnx.export(module, (example,), dynamo=True, opset_version=OPSET,
                                        input_names=["images"], output_names=["logits"],
                                        dynamic_shapes={"x": {0: batch}} if dynamic else None, verbose=False)
            program.model.metadata_props["tl_dist.json"] = description
            n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
            program.save(str(path), external_data=n_bytes > 1_800_000_000)  # protobuf's 2 GB limit
            return
    write_file(path, buf.getbuffer(), shown_in=path.parent.parent)  # (path is in the temporary folder)


class WriteFailed(Exception):
    """Writing the exported file failed (a full disk, a quota): the message names the file."""


def write_file(path: Path, data, shown_in: Path) -> None:
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise WriteFailed(f"export: writing {path.name} into {shown_in} failed: {e.strerror}; nothing "
                          f"written (free space, or choose another --out)") from None


def latency_ms(fn, x, most: int = 20) -> float:
    """Median milliseconds of ``fn(x)`` after one warm-up call, over up to ``most`` calls or LATENCY_BUDGET_S."""
    fn(x)
    budget_s = LATENCY_BUDGET_S
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < most and (not times or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def sidecar(out: Path) -> Path:
    """FILE.json beside an exported FILE (model.onnx -> model.onnx.json: formats never share one)."""
    return out.with_name(out.name + ".json")


def move_into_place(tmp: Path, out: Path, force: bool) -> list[Path]:
    """The files of ``tmp`` into out's folder: data files first, the model file last, each by rename.
    A data file (ONNX's external weights) replaces only one an earlier export at ``out`` wrote."""
    from tl_dist.files.atomic import fsync_dir
    from tl_dist.files.outputs import refuse_foreign

    files = sorted(tmp.iterdir(), key=lambda p: p.name == out.name)
    earlier_export = out.exists()  # (checked to be tl_dist's before any work)
    refuse_foreign([out.parent / f.name for f in files if f.name != out.name], lambda p: earlier_export,
                   "export", force)
    placed = []
    for f in files:
        dest = out.parent / f.name
        os.replace(f, dest)
        placed.append(dest)
    fsync_dir(out.parent)
    return placed


def is_export(path: Path) -> bool:
    """Whether ``path`` is a file tl-dist export wrote (it carries tl_dist's description)."""
    from tl_dist.files.exported import FORMAT, format_of, onnx_description, zip_description

    try:
        if format_of(path) == "onnx":
            return onnx_description(path) is not None
        return zip_description(path).get("format") == FORMAT
    except UserError:
        return False


def is_export_sidecar(path: Path) -> bool:
    from tl_dist.files.exported import FORMAT
    from tl_dist.files.outputs import json_object

    return (json_object(path) or {}).get("format") == FORMAT


def parse_args(argv: Sequence[str] | None, prog: str) -> argparse.Namespace:
    from tl_dist.files.exported import SUFFIXES

    p = argparse.ArgumentParser(prog=prog, description="Export a checkpoint for other runtimes, checked against "
                                "the eager model before it is put in place.")
    p.add_argument("checkpoint", metavar="RUN", help="run directory (its best.safetensors) or a .safetensors file")
    p.add_argument("--format", "-f", choices=[*SUFFIXES, "hf"], default="onnx",
                   help="onnx (onnxruntime and others; needs the [export] extra), torchscript (torch.jit.load), "
                        "exported (torch.export.load); default onnx")
    p.add_argument("--out", "-o", help="the file to write (default RUN/model.onnx, .pt or .pt2)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="any batch size (onnx, exported); default a fixed batch of 1. TorchScript takes any batch")
    p.add_argument("--input", choices=["float32", "uint8"], default="float32",
                   help="what the model takes: float32 in [0, 1] (default) or uint8 0..255; NCHW RGB either way")
    p.add_argument("--images", nargs="+", metavar="PATH",
                   help="images (files or folders) for the self-check; default the run's val folder")
    p.add_argument("--force", action="store_true",
                   help="replace --out (and FILE.json) even if they are not an earlier export; a run's own files "
                        "(resume.pt) are never replaced")
    p.add_argument("--thresholds", help="multi_label: per-class thresholds (tl-dist evaluate --tune-thresholds) for "
                   "the exported file's description, which predict then uses")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, prog: str = "tl-dist export") -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv), prog)

    def stop(signum, frame):
        raise Stopped(signum)
    main_thread = threading.current_thread() is threading.main_thread()  # (only it may set handlers)
    # Ctrl-C too raises Stopped, not KeyboardInterrupt: a KeyboardInterrupt raised inside an exporter
    # once ended the process by SIGINT (exit -2) after this function had printed its line and
    # returned 130; the interpreter's own Ctrl-C bookkeeping never sees an exception of ours.
    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    try:
        return _export(args)
    except UserError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return e.exit_code
    except (ExportFailed, WriteFailed) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1 if isinstance(e, ExportFailed) else 2
    except (KeyboardInterrupt, Stopped) as e:
        signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
        done = (f"the export was already in place ({printable(str(args.placed))})" if getattr(args, "placed", None)
                else "nothing written (an earlier file is as it was)")
        print(f"export: stopped by {signal.Signals(signum).name}; {done}", file=sys.stderr)
        return 128 + signum
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Stopped(BaseException):
    """SIGTERM or SIGINT during an export: unwinds like Ctrl-C (past the exporters' own error handling),
    so the temporary folder goes."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _export(args) -> int:
    from tl_dist.files.exported import SUFFIXES, format_of, missing_onnx_packages

    fmt = args.format
    if fmt == "hf":
        return export_hub_folder(args)
    if fmt == "onnx" and missing_onnx_packages():
        raise UserError(f"export: --format onnx needs {', '.join(missing_onnx_packages())}: "
                        f"pip install 'tl_dist[export]' (or pip install onnx onnxscript onnxruntime)")
    from tl_dist.files import checkpoint

    ckpt = checkpoint.locate(args.checkpoint)
    if format_of(ckpt) is not None:
        raise UserError(f"export: {ckpt} is already an exported file; export from the run directory or its "
                        f"best.safetensors")
    out = Path(args.out).expanduser() if args.out else ckpt.parent / f"model{SUFFIXES[fmt]}"
    if out.suffix.lower() != SUFFIXES[fmt]:
        raise UserError(f"export: --out {out}: {fmt} files end in {SUFFIXES[fmt]} (predict tells the "
                        f"formats apart by it)")
    if not out.parent.is_dir():
        raise UserError(f"export: --out {out}: folder {out.parent} does not exist")
    if out.is_dir():
        raise UserError(f"export: --out {out} is a folder; give a file name")
    from tl_dist.files.run_dir import RUN_FILE_NAMES
    from tl_dist.files.outputs import check_writable, refuse_foreign

    if out.name in RUN_FILE_NAMES:
        raise UserError(f"export: --out {out}: {out.name} is a file training writes (a run's own); it is never an "
                        f"export target, even with --force: choose another name")
    check_writable(out.parent, "export", "--out folder")
    refuse_foreign([out], is_export, "export", args.force)
    refuse_foreign([sidecar(out)], is_export_sidecar, "export", args.force)
    return run_export(ckpt, out, fmt, args)


def export_hub_folder(args) -> int:
    """--format hf: the run as a folder to publish (weights, config.json, model card, pictures)."""
    from tl_dist.files import checkpoint, hub_folder

    ckpt = checkpoint.locate(args.checkpoint)
    out = Path(args.out).expanduser() if args.out else ckpt.parent / "hf"
    if not out.parent.is_dir():
        raise UserError(f"export: --out {out}: folder {out.parent} does not exist")
    files = hub_folder.write(ckpt, out, args.force)
    print(f"wrote {printable(str(out))}: {', '.join(p.name for p in files)}; predict with: tl-dist predict IMAGE "
          f"--checkpoint {printable(str(out))}; publish with: tl-dist push {printable(str(ckpt.parent))} --repo NAME")
    return 0


def run_export(ckpt: Path, out: Path, fmt: str, args) -> int:
    import torch

    from tl_dist import __version__
    from tl_dist.files.atomic import atomic_write_text
    from tl_dist.files.exported import FORMAT, Deployable, ExportedModel, as_input, input_spec
    from tl_dist.predictor import Predictor

    predictor = Predictor.from_checkpoint(ckpt, device="cpu")
    if args.thresholds:
        predictor.use_thresholds(args.thresholds, who="export")
    meta = predictor.meta
    uint8, size = args.input == "uint8", meta["image_size"]
    dynamic = args.dynamic_batch or fmt == "torchscript"  # a trace does not fix the batch
    spec = input_spec(uint8, size, None if dynamic else 1)
    files, where = check_images(args.images or [], meta, given=bool(args.images))
    images = []
    for f in files:
        try:
            images.append(predictor.eval_tensor(f))
        except Exception as e:  # a bad check image is the user's to fix; name it
            raise UserError(f"export: check image {f}: {first_line(e)}") from None
    if not images:  # the run's data has gone: still check the numbers, and say on what
        gen = torch.Generator().manual_seed(0)
        images = list(torch.randint(0, 256, (CHECK_IMAGES, 3, size, size), dtype=torch.uint8, generator=gen))
        where = f"random pixels ({where} not found; pass --images for real ones)"
    real = torch.stack(images)
    eager = Deployable(predictor.model, meta["mean"], meta["std"], uint8).eval()

    keep = ("classes", "num_classes", "arch", "arch_kwargs", "head", "mode", "image_size", "resize_size",
            "interpolation", "mean", "std", "epoch", "val_acc", "val_loss", "task", "threshold")
    desc: dict[str, Any] = {"format": FORMAT, "export_format": fmt, **{k: meta[k] for k in keep if k in meta},
                            "input": spec, "source": str(ckpt), "tl_dist": __version__,
                            "torch": torch.__version__}
    if args.thresholds:
        desc["thresholds"] = predictor.thresholds
    example = as_input(real[:2] if dynamic else real[:1], spec)

    from tl_dist.files.outputs import remove_stale_temp_dirs

    remove_stale_temp_dirs(out.parent, out.name)
    try:  # the pid in the name tells the next export whether its maker is gone
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise UserError(f"export: cannot write in {out.parent} ({e.strerror}); choose a writable --out") from None
    try:
        started = time.perf_counter()
        try:
            export_to(eager, example, fmt, tmp / out.name, dynamic, json.dumps(desc, allow_nan=False))
        except WriteFailed:
            raise
        except OSError as e:  # ONNX's own writer: a full disk is said, not taken for an exporter bug
            raise WriteFailed(f"export: writing {out.name} into {out.parent} failed: {e.strerror}; nothing "
                              f"written (free space, or choose another --out)") from None
        except Exception as e:  # the exporters raise many types; the model is not the user's mistake
            raise ExportFailed(f"export: {fmt} could not export {meta['arch']}: {first_line(e)}") from None
        seconds = time.perf_counter() - started
        loaded = ExportedModel.load(tmp / out.name, trust_code=True)  # written by this process a moment ago
        x = as_input(real, spec)
        with torch.inference_mode():
            want = eager(x)
        got = loaded(real)
        diff = float((got - want).abs().max())
        if dynamic and len(x) > 1:  # one image alone too: a batch dimension that was baked in shows here
            diff = max(diff, float((loaded.raw(x[:1]) - want[:1]).abs().max()))
        # fp32 keeps ~7 significant digits: logits in the millions (a model that saw little training)
        # differ in their units' place between two correct runtimes, so past 1 the limit scales
        limit = TOLERANCE * max(1.0, float(want.abs().max()))
        if not diff <= limit:  # (not <= catches NaN)
            raise ExportFailed(f"export: self-check failed: the {fmt} file's logits differ from the eager model's "
                               f"by up to {diff:.2e} (limit {limit:.0e}) on {len(x)} image(s); nothing written")
        timings = measure(eager, loaded, spec, size, dynamic)
        desc["check"] = {"max_abs_logit_diff": diff, "tolerance": limit, "images": len(x), "on": where}
        desc["cpu_latency_ms"] = timings
        # The model and its description land together: no signal between the renames
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            placed = move_into_place(tmp, out, args.force)
            atomic_write_text(sidecar(out), json.dumps(desc, indent=2, allow_nan=False) + "\n")
            args.placed = out
        except OSError as e:
            raise WriteFailed(f"export: putting {out.name} into {out.parent} failed: {e.strerror}") from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(ckpt, out, placed, fmt, desc, seconds, timings)
    return 0


def measure(eager, loaded, spec: dict, size: int, dynamic: bool) -> dict[str, dict[str, float | None]]:
    import torch

    out: dict[str, dict[str, float | None]] = {}
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 32):
        x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=gen)
        if spec["dtype"] == "float32":
            x = x.float() / 255

        def run_eager(t):
            with torch.inference_mode():
                return eager(t)
        out[str(batch)] = {"eager": latency_ms(run_eager, x),
                           "exported": latency_ms(loaded.raw, x) if dynamic or batch == 1 else None}
    return out


def report(ckpt: Path, out: Path, placed: list[Path], fmt: str, desc: dict, seconds: float, timings: dict) -> None:
    from tl_dist.files.exported import PROGRAMS

    spec, check = desc["input"], desc["check"]
    mb = sum(p.stat().st_size for p in placed) / 1e6
    rng = "[0, 1]" if spec["dtype"] == "float32" else "0..255"
    print(f"exported {printable(str(ckpt))} -> {printable(str(out))} ({fmt}, {mb:.1f} MB, "
          f"{'any batch' if spec['batch'] is None else 'batch 1'}, {seconds:.1f} s)")
    print(f"input: {spec['dtype']} NCHW RGB in {rng}, {desc['image_size']}x{desc['image_size']} (resize "
          f"{desc['resize_size']} {desc['interpolation']}, centre crop {desc['image_size']}); normalisation inside")
    print(f"self-check: {check['images']} image(s) from {printable(check['on'])}: max |logit diff| "
          f"{check['max_abs_logit_diff']:.1e} (limit {check['tolerance']:.0e}): ok")

    def ms(v):
        return f"{v:9.1f}" if v is not None else "        -"
    print("CPU latency, ms (median)   batch 1   batch 32")
    print(f"  eager                   {ms(timings['1']['eager'])} {ms(timings['32']['eager'])}")
    print(f"  {fmt:<22}  {ms(timings['1']['exported'])} {ms(timings['32']['exported'])}"
          + ("" if timings["32"]["exported"] is not None else "   (batch 1 only: --dynamic-batch for more)"))
    print(f"description: {printable(str(sidecar(out)))} (also inside the file); "
          f"predict with: tl-dist predict IMAGE --checkpoint {printable(str(out))}"
          + (" --trust-code (a program: see tl-dist predict --help)" if fmt in PROGRAMS else ""))


if __name__ == "__main__":
    sys.exit(main())
