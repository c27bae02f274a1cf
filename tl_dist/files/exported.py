"""Exported models: the wrapper that goes into the file, and loading and running the files again.

An exported file is the classifier with its input normalisation inside: images in (NCHW, RGB, at
the checkpoint's crop size: resize to ``resize_size``, centre-crop ``image_size``), logits out. It
takes float32 in [0, 1] (what ``ToTensor`` gives) or, exported with ``--input uint8``, the bytes
0..255. Its description (classes, input, eval transform) is stored inside the file, as
``tl_dist.json`` (TorchScript and ``torch.export`` archives' extra files, ONNX metadata_props), and
beside it as ``FILE.json`` for other runtimes' users.

Loading: an ONNX file is data (a protobuf of operators that onnxruntime runs; external data files
are refused). TorchScript and ``torch.export`` files are programs: a TorchScript file's code can call
any operator (write files with ``torch.from_file``), and ``torch.export.load`` unpickles whatever an
archive marks as pickled. So they are opened only with ``trust_code=True`` (``--trust-code``), the
user's word that the file comes from someone they trust, and only when they carry a tl_dist
description (so ``resume.pt`` or an arbitrary torch file is refused before it is read). Even then a
``.pt2`` whose weights, constants or example inputs are pickles is refused before torch reads it:
tl-dist export never writes those, so they can only have been put there by hand.
"""
from __future__ import annotations

import io
import json
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from tl_dist.errors import UserError, first_line, printable


FORMAT = "tl_dist-export/1"


META_NAME = "tl_dist.json"


# format name -> file suffix
SUFFIXES = {"torchscript": ".pt", "onnx": ".onnx", "exported": ".pt2"}


# the formats whose files are programs: loading one runs what is inside it
PROGRAMS = {"torchscript": "a TorchScript program", "exported": "a torch.export program"}


ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


class Deployable(nn.Module):
    """The classifier with ToTensor + Normalize folded in: images in, logits out.

    For uint8 input the mean and std are scaled by 255, as training's ``augment.normalize`` does,
    so the exported model computes what the trained model computed, to the last bit on the CPU."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float], uint8: bool):
        super().__init__()
        self.model = model
        scale = 255.0 if uint8 else 1.0
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * scale)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x.float() - self.mean) / self.std)


def input_spec(uint8: bool, image_size: int, batch: int | None) -> dict[str, Any]:
    return {"dtype": "uint8" if uint8 else "float32", "range": [0, 255] if uint8 else [0, 1],
            "layout": "NCHW", "channels": "RGB", "height": image_size, "width": image_size,
            "batch": batch, "normalized_inside": True}


def as_input(x: torch.Tensor, spec: dict[str, Any]) -> torch.Tensor:
    """uint8 images (the eval transform's output) as the exported model wants them."""
    return x if spec["dtype"] == "uint8" else x.float() / 255


def format_of(path: str | Path) -> str | None:
    suffix = Path(path).suffix.lower()
    return next((f for f, s in SUFFIXES.items() if s == suffix), None)


def missing_onnx_packages() -> list[str]:
    import importlib.util

    return [p for p in ONNX_PACKAGES if importlib.util.find_spec(p) is None]


def _description(raw: Any, path: Path) -> dict[str, Any]:
    from tl_dist.files.checkpoint import metadata_problem

    try:
        desc = json.loads(raw)
    except RecursionError:
        raise UserError(f"exported model: {path}: its tl_dist description is nested too deeply to be one") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"exported model: {path}: its tl_dist description is not JSON: {e}") from None
    problem = "not a JSON object" if not isinstance(desc, dict) else (
        f"format {desc.get('format')!r}, expected {FORMAT!r}" if desc.get("format") != FORMAT else metadata_problem(desc))
    spec = desc.get("input") if isinstance(desc, dict) else None
    if problem is None and not (isinstance(spec, dict) and spec.get("dtype") in ("uint8", "float32")
                                and spec.get("batch") in (None, 1)):
        problem = f"input is {spec!r:.60}, expected the input spec tl-dist export writes"
    if problem:
        raise UserError(f"exported model: {path}: {problem}")
    return desc


def zip_description(path: Path) -> dict[str, Any]:
    """The description inside a TorchScript / torch.export archive, read without running anything."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith(f"/extra/{META_NAME}") or n == f"extra/{META_NAME}"]
            if not names:
                raise UserError(f"checkpoint: {path} is a resume state or a torch file with no tl_dist "
                                f"description (not from tl-dist export); use {path.parent / 'best.safetensors'} "
                                f"(or the run directory), or export one with tl-dist export RUN")
            return _description(z.read(names[0]), path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"exported model: {path} is damaged or not a torch archive: {e}") from None


class ExportedModel:
    """``ExportedModel.load(path)(images) -> logits``: an exported file in its own runtime.

    ``images`` is a uint8 NCHW batch (what ``augment.eval_transform`` gives); it is converted to
    the file's input dtype here. A file exported with a fixed batch of 1 is run one image at a time."""

    def __init__(self, path: Path, fmt: str, desc: dict[str, Any], run: Callable[[torch.Tensor], torch.Tensor],
                 device: str):
        self.path, self.format, self.meta, self._run, self.device = path, fmt, desc, run, device
        self.batch: int | None = desc["input"]["batch"]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = as_input(images, self.meta["input"])
        if self.batch == 1 and len(x) != 1:
            return torch.cat([self._run(x[i:i + 1]) for i in range(len(x))])
        return self._run(x)

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The file's own input (already in its dtype), as a user's runtime would give it."""
        return self._run(x)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", trust_code: bool = False) -> "ExportedModel":
        """The file, checked: its description, its trust rule (see the module), its output width."""
        path = Path(path).expanduser()
        fmt = format_of(path)
        if fmt is None:
            raise UserError(f"exported model: {path}: unknown file type; tl-dist export writes "
                            f"{', '.join(SUFFIXES.values())}")
        if not path.is_file():
            raise UserError(f"exported model: file not found: {path}")
        if fmt in PROGRAMS and not trust_code:
            zip_description(path)  # a torch file that is not an export at all is told so first
            raise UserError(f"exported model: {path} is {PROGRAMS[fmt]}: loading it runs the code inside it. Pass "
                            f"--trust-code only if you trust where the file came from (or use the .onnx export, "
                            f"which runs no code of its own: tl-dist export RUN --format onnx)")
        loader = {"torchscript": _load_torchscript, "exported": _load_program, "onnx": _load_onnx}[fmt]
        desc, run = loader(path, device)
        model = cls(path, fmt, desc, run, device)
        model._check_width()
        return model

    def _check_width(self) -> None:
        """One blank image through the file: its logits must be one per class of its description
        (a mismatch would name the wrong class, or fail at the first real image)."""
        size = self.meta["image_size"]
        try:
            out = self(torch.zeros(1, 3, size, size, dtype=torch.uint8))
        except Exception as e:  # each runtime raises its own types; the file is what is wrong
            raise UserError(f"exported model: {self.path} does not run on its own input spec "
                            f"(1x3x{size}x{size} {self.meta['input']['dtype']}): {first_line(e)}") from None
        n = len(self.meta["classes"])
        if out.ndim != 2 or out.shape[1] != n:
            raise UserError(f"exported model: {self.path}: its description lists {n} classes but the model gives "
                            f"{tuple(out.shape)} outputs per image; the file and its description do not belong "
                            f"together (export again with tl-dist export)")


def _load_torchscript(path: Path, device: str):
    desc = zip_description(path)
    try:
        with warnings.catch_warnings():  # torch.jit's deprecation notice is for torch's developers
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError as e:
        raise UserError(f"exported model: {path} could not be loaded by torch.jit.load: {first_line(e)}") from None
    return desc, _torch_runner(module, device)


def pickled_parts(path: Path) -> list[str]:
    """The members of a ``.pt2`` archive that ``torch.export.load`` would unpickle: weights or
    constants marked ``use_pickle``, custom or opaque objects, legacy pickled weight files, and
    example inputs that ``torch.load(weights_only=True)`` refuses (torch retries those unrestricted)."""
    found: list[str] = []
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            inner = name.split("/", 1)[-1]  # (torch's archives keep everything under one top folder)
            if name.endswith(("_weights_config.json", "_constants_config.json")):
                try:
                    config = json.loads(z.read(name)).get("config", {})
                except (ValueError, RecursionError, AttributeError):
                    found.append(f"{name} (not readable as torch writes it)")
                    continue
                for fqn, entry in (config.items() if isinstance(config, dict) else []):
                    member = entry.get("path_name", "") if isinstance(entry, dict) else ""
                    if not isinstance(entry, dict) or entry.get("use_pickle") is not False \
                            or not str(member).startswith(("weight_", "tensor_")):
                        found.append(f"{fqn} ({name.rsplit('/', 1)[-1]})")
            elif inner.startswith(("data/weights/", "data/constants/")) and inner.endswith(".pt"):
                found.append(name)  # the legacy layout: the whole state dict as one pickle
            elif inner.startswith("data/sample_inputs/"):
                try:
                    torch.load(io.BytesIO(z.read(name)), weights_only=True)
                except Exception:  # whatever weights_only refuses, torch.export.load would unpickle
                    found.append(name)
    return found


def _load_program(path: Path, device: str):
    desc = zip_description(path)
    try:
        pickled = pickled_parts(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"exported model: {path} is damaged or not a torch archive: {e}") from None
    if pickled:
        raise UserError(f"exported model: {path} holds pickled parts ({'; '.join(pickled[:3])}"
                        f"{'; ...' if len(pickled) > 3 else ''}), which would run code when loaded; tl-dist export "
                        f"never writes these, so the file was changed after export. Refused even with --trust-code")
    try:
        module = torch.export.load(str(path)).module().to(device)
    except (RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"exported model: {path} could not be loaded by torch.export.load: {first_line(e)}") from None
    return desc, _torch_runner(module, device)


def _torch_runner(module, device: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x.to(device)).float().cpu()
    return run


def external_data_outside(proto) -> str | None:
    """The first external-data location of an ONNX model that is not a plain file name beside it
    (a path, ``..``): such a model would read any file it names into its weights."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    for tensor in _get_all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        where = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not where or where != Path(where).name or where in (".", "..") or "\\" in where:
            return where or "(no location)"
    return None


def _onnx_proto(path: Path):
    """(the ONNX model without its weights, its tl_dist description or None)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)  # the description only; ORT reads the weights
    except Exception as e:  # onnx raises DecodeError and friends from protobuf
        raise UserError(f"exported model: {path} is damaged or not an ONNX file: {first_line(e)}") from None
    props = {p.key: p.value for p in proto.metadata_props}
    return proto, (_description(props[META_NAME], path) if META_NAME in props else None)


def onnx_description(path: Path) -> dict[str, Any] | None:
    """The tl_dist description of an ONNX file, None if it has none (needs the onnx package)."""
    if "onnx" in missing_onnx_packages():
        raise UserError(f"exported model: {path}: reading ONNX files needs onnx: pip install 'tl_dist[export]'")
    return _onnx_proto(path)[1]


def _load_onnx(path: Path, device: str):
    missing = missing_onnx_packages()
    if "onnx" in missing or "onnxruntime" in missing:
        raise UserError(f"exported model: {path}: running ONNX files needs {' and '.join(missing)}: "
                        f"pip install 'tl_dist[export]'")
    import onnxruntime as ort

    proto, desc = _onnx_proto(path)
    if desc is None:
        raise UserError(f"exported model: {path} has no tl_dist description (not written by tl-dist export)")
    far = external_data_outside(proto)
    if far:
        raise UserError(f"exported model: {path} reads its weights from {printable(far)}, outside its own folder; "
                        f"tl-dist export writes weight files beside the model only. Refused")
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError(f"exported model: {path}: --device cuda but this onnxruntime has no CUDA provider; "
                            f"install onnxruntime-gpu or use --device cpu")
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as e:  # onnxruntime's own exception types
        raise UserError(f"exported model: {path} could not be loaded by onnxruntime: {first_line(e)}") from None
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.cpu().numpy()})[0]).float()
    return desc, run
