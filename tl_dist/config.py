"""Typed, strict configuration: dataclasses + YAML (safe_load) + dotted command-line overrides.

A key that is not a field, a value of the wrong type or outside its allowed set is an error that
names the key and where it came from (the file or the command line), never a silent default.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _choice(*values: str, default: str, doc: str = "") -> Any:
    return field(default=default, metadata={"choices": values, "doc": doc})


@dataclass
class DataConfig:
    root: str = "data/hymenoptera_data"  # folder holding train/ and val/
    demo: bool = False  # true: generate the synthetic demo set into root if it is not there
    image_size: int = 224  # RandomResizedCrop / CenterCrop size
    resize_size: int = 256  # val Resize before the centre crop
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop scale
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # RandomResizedCrop ratio
    hflip: bool = True
    batch_size: int = 4  # per process
    eval_batch_size: int = 0  # per process; 0 = 8 x batch_size (no gradients, so it can be larger)
    num_workers: int = 4
    # ram: decoded images in host memory, PIL augmentation; device: in the GPU's memory, augmented there
    cache: str = _choice("auto", "ram", "device", "none", default="auto")
    cache_gb: float = 4.0  # host memory budget per process for cache: auto
    device_cache_gb: float | None = None  # GPU memory budget per process for cache: auto; null = half the GPU's
    skip_bad_images: bool = False  # true: leave bad files out with a warning instead of stopping


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    weights: str = "imagenet"  # imagenet | none | path to a .pth state dict or .safetensors
    # frozen_then_finetune: frozen for unfreeze_epoch epochs, then every layer trains
    mode: str = _choice("finetune", "frozen", "frozen_then_finetune", default="finetune")
    unfreeze_epoch: int | None = None  # frozen_then_finetune: the first epoch (0-based) that trains the backbone
    frozen_bn: str = _choice("eval", "train", default="eval")  # train = the seed: BN stats keep moving
    channels_last: bool = True


@dataclass
class OptimConfig:
    lr: float = 0.001
    backbone_lr: float | None = None  # every layer but fc; null = lr (finetune, frozen_then_finetune)
    momentum: float = 0.9
    weight_decay: float = 0.0


@dataclass
class SchedulerConfig:
    step_size: int = 7
    gamma: float = 0.1


@dataclass
class TrainSection:
    epochs: int = 25
    mixed_precision: str = _choice("auto", "no", "fp16", "bf16", default="auto")
    seed: int = 0
    output_dir: str = "runs/default"
    resume: str = "auto"  # auto | none | path to a run directory
    grad_accum_steps: int = 1
    sync_batchnorm: bool = False
    plots: bool = True
    compile: bool = False
    # reduce-overhead: CUDA graphs, for small batches that are bound by kernel launches on a GPU
    compile_mode: str = _choice("default", "reduce-overhead", "max-autotune", default="default")
    # the whole train step (forward, backward, SGD) replayed as one CUDA graph: small batches on one
    # GPU, without compiling; needs one process, grad_accum_steps 1, mixed_precision bf16 or no
    cuda_graphs: bool = False


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Range checks that a type alone cannot express: key -> (predicate, what is expected).
_CHECKS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "data.image_size": (lambda v: v > 0, "a positive integer"),
    "data.resize_size": (lambda v: v > 0, "a positive integer"),
    "data.batch_size": (lambda v: v > 0, "a positive integer"),
    "data.eval_batch_size": (lambda v: v >= 0, "0 (auto) or a positive integer"),
    "data.num_workers": (lambda v: v >= 0, "0 or more"),
    "data.cache_gb": (lambda v: v >= 0, "0 or more"),
    "data.device_cache_gb": (lambda v: v is None or v >= 0, "0 or more, or null for half the GPU's memory"),
    "data.mean": (lambda v: len(v) == 3, "a list of 3 numbers"),
    "data.std": (lambda v: len(v) == 3 and all(s > 0 for s in v), "a list of 3 positive numbers"),
    "data.scale": (lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "[min, max] with 0 < min <= max <= 1"),
    "data.ratio": (lambda v: len(v) == 2 and 0 < v[0] <= v[1], "[min, max] with 0 < min <= max"),
    "model.unfreeze_epoch": (lambda v: v is None or v > 0, "a positive integer (epochs trained frozen)"),
    "optim.lr": (lambda v: v > 0, "a positive number"),
    "optim.backbone_lr": (lambda v: v is None or v > 0, "a positive number, or null for optim.lr"),
    "optim.momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "optim.weight_decay": (lambda v: v >= 0, "0 or more"),
    "scheduler.step_size": (lambda v: v > 0, "a positive integer"),
    "scheduler.gamma": (lambda v: v > 0, "a positive number"),
    "train.epochs": (lambda v: v > 0, "a positive integer"),
    "train.grad_accum_steps": (lambda v: v > 0, "a positive integer"),
}


def validate(cfg: Config, source: str) -> None:
    """Rules between keys, checked once everything is set."""
    m = cfg.model
    if m.mode == "frozen_then_finetune":
        if m.unfreeze_epoch is None:
            raise UserError(f"config: model.mode=frozen_then_finetune needs model.unfreeze_epoch, the number "
                            f"of epochs to train frozen before the backbone trains (in {source})")
    elif m.unfreeze_epoch is not None:
        raise UserError(f"config: model.unfreeze_epoch applies only to model.mode=frozen_then_finetune, "
                        f"this config has mode {m.mode} (in {source})")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str, choices: tuple | None) -> Any:
    where = f"{key} (in {source})"
    # YAML 1.1 reads a bare `no` as False; for a choice that includes "no" that is what was meant.
    if choices and value is False and "no" in choices:
        value = "no"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, source, choices)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config: {where} must be a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]", source, None) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"config: {where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config: {where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config: {where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise UserError(f"config: {where} must be a string, got {value!r}")
        value = str(value)
        if choices and value not in choices:
            raise UserError(f"config: {where} must be one of {'|'.join(choices)}, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {_type_name(tp)} for {key}")  # a bug, not a user error


def _fields(obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _suggest(name: str, options: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _all_keys() -> list[str]:
    cfg = Config()
    return [f"{s}.{k}" for s in _fields(cfg) for k in _fields(getattr(cfg, s))]


def set_key(cfg: Config, key: str, value: Any, source: str) -> None:
    """Set one dotted key (e.g. ``train.epochs``), type-checked, naming ``source`` on error."""
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in _fields(cfg):
        raise UserError(f"config: unknown key {key!r} (in {source}){_suggest(key, _all_keys())}; "
                        f"keys are section.name, sections: {', '.join(_fields(cfg))}")
    section = getattr(cfg, parts[0])
    fields = _fields(section)
    if parts[1] not in fields:
        raise UserError(f"config: unknown key {key!r} (in {source})"
                        f"{_suggest(key, [f'{parts[0]}.{n}' for n in fields] + _all_keys())}")
    f = fields[parts[1]]
    tp = typing.get_type_hints(type(section))[f.name]
    v = _coerce(value, tp, key, source, f.metadata.get("choices"))
    check = _CHECKS.get(key)
    if check and not check[0](v):
        raise UserError(f"config: {key} (in {source}) must be {check[1]}, got {value!r}")
    setattr(section, f.name, v)


def _apply_mapping(cfg: Config, data: Any, source: str) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        raise UserError(f"config: {source} must hold a mapping of sections (data, model, ...), "
                        f"got {type(data).__name__}")
    for section, values in data.items():
        if section not in _fields(cfg):
            raise UserError(f"config: unknown section {section!r} (in {source})"
                            f"{_suggest(str(section), _fields(cfg))}; sections: {', '.join(_fields(cfg))}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise UserError(f"config: section {section!r} (in {source}) must be a mapping of keys")
        for k, v in values.items():
            set_key(cfg, f"{section}.{k}", v, source)


def read_yaml(path: str | Path) -> Any:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config: file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"config: cannot read {p}: {e}") from None
    try:
        # safe_load: a YAML file never constructs Python objects (no !!python/object tags).
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"config: {p} is not valid YAML: {e}") from None


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise UserError(f"config: command-line override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file, then ``section.key=value`` overrides (the last one wins)."""
    cfg = Config()
    if path is not None:
        _apply_mapping(cfg, read_yaml(path), str(path))
    for item in overrides:
        key, value = parse_override(item)
        set_key(cfg, key, value, "command line")
    validate(cfg, f"{path} and the command line" if path is not None and overrides else str(path or "command line"))
    return cfg


def from_dict(d: dict, source: str = "checkpoint") -> Config:
    cfg = Config()
    _apply_mapping(cfg, d, source)
    validate(cfg, source)
    return cfg


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
