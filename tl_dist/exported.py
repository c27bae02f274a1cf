"""Exported models: the wrapper that goes into the file, and loading and running the files again.

An exported file is the classifier with its input normalisation inside: images in (NCHW, RGB, at
the checkpoint's crop size: resize to ``resize_size``, centre-crop ``image_size``), logits out. It
takes float32 in [0, 1] (what ``ToTensor`` gives) or, exported with ``--input uint8``, the bytes
0..255. Its description (classes, input, eval transform) is stored inside the file, as
``tl_dist.json`` (TorchScript and ``torch.export`` archives' extra files, ONNX metadata_props), and
beside it as ``FILE.json`` for other runtimes' users.

Loading: an ONNX file is a protobuf (runs in onnxruntime); TorchScript and ``torch.export`` files
are programs for torch's own interpreters, not pickles, and are opened only when they carry a
tl_dist description (so ``resume.pt`` or an arbitrary torch file is refused before it is read).
"""
from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import UserError, first_line

FORMAT = "tl_dist-export/1"
META_NAME = "tl_dist.json"
# format name -> file suffix
SUFFIXES = {"torchscript": ".pt", "onnx": ".onnx", "exported": ".pt2"}
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
    from .checkpoint import metadata_problem

    try:
        desc = json.loads(raw)
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


def _zip_description(path: Path) -> dict[str, Any]:
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
    def load(cls, path: str | Path, device: str = "cpu") -> "ExportedModel":
        path = Path(path).expanduser()
        fmt = format_of(path)
        if fmt is None:
            raise UserError(f"exported model: {path}: unknown file type; tl-dist export writes "
                            f"{', '.join(SUFFIXES.values())}")
        if not path.is_file():
            raise UserError(f"exported model: file not found: {path}")
        loader = {"torchscript": _load_torchscript, "exported": _load_program, "onnx": _load_onnx}[fmt]
        desc, run = loader(path, device)
        return cls(path, fmt, desc, run, device)


def _load_torchscript(path: Path, device: str):
    desc = _zip_description(path)
    try:
        with warnings.catch_warnings():  # torch.jit's deprecation notice is for torch's developers
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError as e:
        raise UserError(f"exported model: {path} could not be loaded by torch.jit.load: {first_line(e)}") from None
    return desc, _torch_runner(module, device)


def _load_program(path: Path, device: str):
    desc = _zip_description(path)
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


def _load_onnx(path: Path, device: str):
    missing = missing_onnx_packages()
    if "onnx" in missing or "onnxruntime" in missing:
        raise UserError(f"exported model: {path}: running ONNX files needs {' and '.join(missing)}: "
                        f"pip install 'tl_dist[export]'")
    import onnx
    import onnxruntime as ort

    try:
        proto = onnx.load(str(path), load_external_data=False)  # the description only; ORT reads the weights
    except Exception as e:  # onnx raises DecodeError and friends from protobuf
        raise UserError(f"exported model: {path} is damaged or not an ONNX file: {first_line(e)}") from None
    props = {p.key: p.value for p in proto.metadata_props}
    if META_NAME not in props:
        raise UserError(f"exported model: {path} has no tl_dist description (not written by tl-dist export)")
    desc = _description(props[META_NAME], path)
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
