"""Typed, strict configuration: dataclasses + YAML (safe_load) + dotted command-line overrides.

A key that is not a field, a value of the wrong type or outside its allowed set is an error that
names the key and where it came from (the file or the command line), never a silent default.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tl_dist.errors import UserError

MAX_IMAGE_SIZE = 4096  # larger crops would allocate gigabytes per image
MAX_MIX_ALPHA = 100.0  # Beta(alpha, alpha) for MixUp / CutMix: recipes use 0.1..2; past ~1e300 Python's draw never returns
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _key(default: Any, doc: str, choices: tuple[str, ...] | None = None) -> Any:
    """A config field with its one-line help (shown by ``tl-dist train --help``) and allowed values."""
    meta = {"doc": doc, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    root: str = _key("data/hymenoptera_data", "folder holding train/ and val/, one sub-folder per class; or one "
                     "folder of class sub-folders (with val_split); or the images of a labels file")
    format: str = _key("files", "how the images are stored: files (image files: train/ and val/ class folders, one "
                        "folder with val_split, or a labels file), wds (WebDataset tar shards under root) or hf (a "
                        "Hugging Face dataset: a save_to_disk folder, Parquet / Arrow files, or a Hub name)",
                        ("files", "wds", "hf"))
    train_shards: str = _key("train-*.tar", "wds: the train shards under root (a glob, or braces: "
                             "train-{000000..000099}.tar)")
    val_shards: str = _key("val-*.tar", "wds: the val shards (none there: set val_split to draw val from train's)")
    test_shards: str = _key("test-*.tar", "wds: the test shards (tl-dist evaluate --split test), if any")
    image_column: str = _key("image", "hf: the column with the image")
    demo: bool = _key(False, "generate the synthetic demo set into root (a missing or empty folder) if not there")
    val_split: float = _key(0.0, "the share of each class's images made into val (0 = root's val/ folder, or the "
                            "labels file's split column); drawn from split_seed, recorded in split.json")
    test_split: float = _key(0.0, "the share of each class's images held out as test (never read by training; "
                             "tl-dist evaluate --split test); needs val_split")
    split_seed: int = _key(0, "the seed of the val / test draw (its own: train.seed does not move images between parts)")
    labels: str | None = _key(None, "a labels file under root (CSV with a header, or JSON Lines): one row per image "
                              "with its path (relative to root), its label and optionally its split")
    path_column: str = _key("path", "labels file: the column with the image's path")
    label_column: str = _key("label", "labels file and hf: the column with the image's class (a list of classes: "
                             "multi_label)")
    split_column: str = _key("split", "labels file: the column with train / val / test, if it has one")
    classes: list[str] | None = _key(None, "labels file, wds and hf: the class names in the order of the head's "
                                     "outputs; null = the dataset's (ClassLabel, classes.txt) or the labels found, "
                                     "sorted")
    label_delimiter: str | None = _key(None, "labels file and wds txt labels: the separator of several labels per image, e.g. ';' (the "
                                       "task is then multi_label; a JSON list in a row does the same)")
    image_size: int | None = _key(None, "RandomResizedCrop / CenterCrop size; null = the size the model's weights "
                                  "were trained at (224 for resnet18)")
    resize_size: int | None = _key(None, "val Resize before the centre crop; null = the weights' (256 for resnet18), "
                                   "scaled in proportion when image_size is set")
    interpolation: str | None = _key(None, "resize interpolation (train crop and val resize); null = the weights' "
                                     "(bilinear for resnet18, bicubic for EfficientNet)", ("bilinear", "bicubic"))
    mean: list[float] | None = _key(None, "Normalize mean (RGB); null = the weights' (ImageNet's)")
    std: list[float] | None = _key(None, "Normalize std (RGB); null = the weights' (ImageNet's)")
    scale: list[float] = _key([0.08, 1.0], "RandomResizedCrop scale [min, max]")
    ratio: list[float] = _key([3 / 4, 4 / 3], "RandomResizedCrop aspect ratio [min, max]")
    hflip: bool = _key(True, "RandomHorizontalFlip")
    sampler: str = _key("shuffle", "train order: shuffle (each image once per epoch) or balanced (as many draws as "
                        "images, with replacement, every class equally likely)", ("shuffle", "balanced"))
    augment: str = _key("seed", "after the crop and flip: seed (nothing more, the tutorial's), or torchvision's "
                        "trivialaugment (TrivialAugmentWide), randaugment (2 ops, magnitude 9) or autoaugment "
                        "(the ImageNet policy), host (PIL) path; or none: no crop, flip or policy, training "
                        "images get the val/predictor transform (Resize + CenterCrop: a linear probe)",
                        ("seed", "trivialaugment", "randaugment", "autoaugment", "none"))
    random_erasing: float = _key(0.0, "probability of erasing a random rectangle of each train image (torchvision's "
                                 "RandomErasing: 2-33% of the area, filled with the mean colour)")
    batch_size: int = _key(4, "train batch per process (the global batch is this x processes)")
    eval_batch_size: int = _key(0, "val batch per process; 0 = 8 x batch_size (no gradients, so it can be larger)")
    num_workers: int = _key(4, "loader worker processes per training process")
    cache: str = _key("auto", "where decoded images are kept: ram (host memory, PIL augmentation), device (GPU "
                      "memory, augmented there), disk (decoded once, resized to resize_size, memory-mapped from "
                      "cache_dir: no JPEG decoding after the first time), none, or auto (the fastest place they "
                      "fit; disk only where cache_dir is set)", ("auto", "ram", "device", "disk", "none"))
    cache_dir: str | None = _key(None, "cache: disk: the folder for decoded-image caches (runs naming the same "
                                 "folder share them); null = the run's own image_cache/")
    cache_gb: float = _key(4.0, "host memory budget per process for cache: auto (GiB)")
    device_cache_gb: float | None = _key(None, "GPU memory budget per process for cache: auto (GiB); "
                                         "null = half the GPU's memory")
    skip_bad_images: bool = _key(False, "leave bad image files out with a warning instead of stopping")
    scan_limit: int | None = _key(100_000, "check every image before training up to this many (a header and end "
                                  "read each: minutes at a million); above it a spread sample, the rest as they are "
                                  "decoded (a bad one stops the run at the end of that epoch, or is left out with "
                                  "skip_bad_images); null = always every image")


@dataclass
class ModelConfig:
    arch: str = _key("resnet18", "any torchvision classification model (resnet50, efficientnet_b0, convnext_tiny, "
                     "vit_b_16, ...: torchvision.models.list_models()), or timm/<name>[.<tag>] for timm's (timm/"
                     "convnext_atto, timm/resnet50.a1_in1k; pip install -e '.[timm]')")
    weights: str = _key("imagenet", "imagenet (the model's DEFAULT torchvision weights, downloaded once), a weights "
                        "name such as IMAGENET1K_V2, none, or a path to a .pth state dict or .safetensors")
    mode: str = _key("finetune", "finetune: every layer trains; frozen: only the new classifier; frozen_then_finetune: "
                     "frozen for unfreeze_epoch epochs, then every layer", ("finetune", "frozen", "frozen_then_finetune"))
    unfreeze_epoch: int | None = _key(None, "frozen_then_finetune: the first epoch (0-based) that trains the backbone")
    frozen_bn: str = _key("eval", "a frozen backbone in eval mode: BatchNorm statistics fixed, dropout and stochastic "
                          "depth off; train = the tutorial (BatchNorm statistics keep moving)", ("eval", "train"))
    channels_last: bool = _key(True, "channels-last memory format (faster convolutions; ViT and Swin ignore it)")
    drop_rate: float | None = _key(None, "dropout before the classifier (timm's drop_rate; torchvision models with "
                                   "a dropout argument: EfficientNet, MobileNetV3, ViT, ...); null = the model's own")
    drop_path_rate: float | None = _key(None, "stochastic depth: the largest rate of dropping a residual block in "
                                        "training (timm's drop_path_rate; torchvision's stochastic_depth_prob: "
                                        "ConvNeXt, EfficientNet, Swin, MaxViT); null = the model's own")


@dataclass
class OptimConfig:
    name: str = _key("sgd", "the optimizer: sgd (the tutorial's) or adamw", ("sgd", "adamw"))
    lr: float = _key(0.001, "learning rate of the new classifier (and of the backbone unless backbone_lr is set)")
    backbone_lr: float | None = _key(None, "learning rate of every layer but the new classifier; null = lr")
    momentum: float = _key(0.9, "SGD momentum")
    nesterov: bool = _key(False, "SGD with Nesterov momentum")
    betas: list[float] = _key([0.9, 0.999], "AdamW betas")
    eps: float = _key(1e-8, "AdamW eps")
    weight_decay: float = _key(0.0, "weight decay (SGD: L2 in the gradient; AdamW: decoupled)")
    layer_decay: float | None = _key(None, "layer-wise learning-rate decay (timm models): each block's rate is the "
                                     "backbone's times layer_decay^(blocks between it and the classifier), e.g. "
                                     "0.75; null = off")
    decay_bias_and_norm: bool = _key(True, "weight decay on 1-D parameters (biases, normalisation weights) too; "
                                     "false = only on weight matrices and kernels")


@dataclass
class SchedulerConfig:
    name: str = _key("step", "learning-rate schedule, set at every optimizer step from the epoch and the images "
                     "done: step (the tutorial's StepLR, per epoch), cosine (to 0 at the end of train.epochs), "
                     "onecycle (up over pct_start, then down, cosine), constant",
                     ("step", "cosine", "onecycle", "constant"))
    step_size: int = _key(7, "step: decay the learning rate every step_size epochs")
    gamma: float = _key(0.1, "step: the decay factor")
    warmup_epochs: float = _key(0.0, "linear warm-up over this many epochs (may be fractional), step / cosine / "
                                "constant")
    warmup_start_factor: float = _key(0.01, "the warm-up's first learning rate, as a fraction of the base")
    pct_start: float = _key(0.3, "onecycle: the fraction of train.epochs spent rising from lr/25 to lr")


@dataclass
class TrainConfig:
    epochs: int = _key(25, "epochs to train (a resumed run continues up to this many)")
    mixed_precision: str = _key("auto", "auto: bf16 where the hardware runs it fast (fp16 on older GPUs), else no",
                                ("auto", "no", "fp16", "bf16"))
    seed: int = _key(0, "RNG seed: model init, data order and augmentation")
    output_dir: str = _key("runs/default", "run directory: checkpoints, metrics, config, pictures")
    resume: str = _key("auto", "auto: continue output_dir's run if there is one; none: start fresh; or a run "
                       "directory / resume.pt to continue from")
    grad_accum_steps: int = _key(1, "micro-batches per optimizer step")
    collective_timeout: int = _key(1800, "seconds a process waits for the others in a collective before the "
                                   "job ends with an error (a process frozen or hung)")
    sync_batchnorm: bool = _key(False, "BatchNorm statistics over the global batch (CUDA, several processes)")
    write_in_background: bool | None = _key(None, "write checkpoint files on a thread while the next epoch trains; "
                                            "null = on a GPU yes, on the CPU no (between epochs)")
    log_with: list[str] = _key([], "experiment trackers to log to, e.g. [tensorboard] (pip install 'tl_dist[track]'): "
                               "the epoch metrics, the learning rate per step, the config and the pictures",
                               ("tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive", "swanlab",
                                "trackio"))
    label_smoothing: float = _key(0.0, "cross-entropy label smoothing (the train loss; val loss stays plain)")
    class_weights: str = _key("none", "balanced: weigh each train sample's loss by n / (classes x n_class), the "
                              "inverse of its class's frequency in the train split", ("none", "balanced"))
    task: str | None = _key(None, "single_label (softmax, cross-entropy) or multi_label (a sigmoid per class, binary "
                            "cross-entropy); null = from the data: multi_label when images have several labels",
                            ("single_label", "multi_label"))
    threshold: float = _key(0.5, "multi_label: a class is predicted when its probability is at least this (F1, "
                            "exact match, the predictor)")
    select_best_by: str | None = _key(None, "the val metric that picks best.safetensors (ties: the earlier epoch); "
                                      "null = val_acc, or map for multi_label (val_acc is then the exact-match "
                                      "accuracy)", ("val_acc", "macro_f1", "val_loss", "map", "micro_f1"))
    mixup_alpha: float = _key(0.0, "MixUp: mix each train batch with itself shifted by one, lam ~ Beta(alpha, alpha), "
                              "soft-target loss (e.g. 0.2; 0 = off)")
    cutmix_alpha: float = _key(0.0, "CutMix: paste a box of the shifted batch, its area from Beta(alpha, alpha) (e.g. "
                               "1.0; 0 = off); with mixup_alpha too, each batch takes one of the two at random")
    mix_prob: float = _key(1.0, "the share of train batches MixUp / CutMix is applied to")
    ema_decay: float = _key(0.0, "keep an exponential moving average of the weights with this decay (e.g. 0.999; "
                            "0 = off): it is what is evaluated, picked as best and saved")
    early_stopping_patience: int = _key(0, "stop after this many epochs without a better select_best_by value "
                                        "(0 = off); the best weights are kept as always")
    plots: bool = _key(True, "draw train_batch.png, val_predictions.png, curves.png, confusion_matrix.png")
    compile: bool = _key(False, "torch.compile the model")
    compile_mode: str = _key("default", "torch.compile mode; reduce-overhead = CUDA graphs, for small batches "
                             "bound by kernel launches", ("default", "reduce-overhead", "max-autotune"))
    cuda_graphs: bool | None = _key(None, "replay the whole train step (forward, backward, SGD) as one CUDA graph "
                                    "(one GPU; needs grad_accum_steps 1, mixed_precision bf16 or no, SGD, a learning "
                                    "rate fixed within the epoch, no MixUp / CutMix, no dropout trained); null = on "
                                    "where the run meets those needs and trains no kept features, true = an error "
                                    "where it does not")
    cudnn_benchmark: bool = _key(False, "let cuDNN time its convolution algorithms on the first step of each input "
                                 "shape and keep the fastest (GPU): seconds of timing per new shape for a few "
                                 "percent on long runs; the choice can differ between runs")
    limit_train_batches: float | None = _key(None, "a quick trial: train on the first N global batches of each "
                                             "epoch (a count, or a fraction of the epoch's batches below 1); the run's "
                                             "files say it was limited; null = every batch")
    limit_val_batches: float | None = _key(None, "a quick trial: evaluate the first N val batches of "
                                           "data.eval_batch_size (a count, or a fraction below 1); null = all")
    feature_cache: str = _key("auto", "a frozen backbone with a deterministic train transform (data.augment=none): "
                              "keep each train image's backbone output from the first epoch and train only the "
                              "head on them afterwards, within data.cache_gb; auto = whenever that is exact, off = "
                              "run the backbone every epoch", ("auto", "off"))


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Range checks that a type alone cannot express: key -> (predicate, what is expected).
_CHECKS: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "data.image_size": (lambda v: v is None or 0 < v <= MAX_IMAGE_SIZE, f"an integer from 1 to {MAX_IMAGE_SIZE}"),
    "data.resize_size": (lambda v: v is None or 0 < v <= MAX_IMAGE_SIZE, f"an integer from 1 to {MAX_IMAGE_SIZE}"),
    "data.batch_size": (lambda v: v > 0, "a positive integer"),
    "data.random_erasing": (lambda v: 0 <= v <= 1, "a probability from 0 to 1"),
    "data.eval_batch_size": (lambda v: v >= 0, "0 (auto) or a positive integer"),
    "data.num_workers": (lambda v: 0 <= v <= 256, "from 0 to 256"),
    "data.cache_gb": (lambda v: v >= 0, "0 or more"),
    "model.drop_rate": (lambda v: v is None or 0 <= v < 1, "from 0 to below 1, or null"),
    "model.drop_path_rate": (lambda v: v is None or 0 <= v < 1, "from 0 to below 1, or null"),
    "train.limit_train_batches": (lambda v: v is None or 0 < v < 1 or (v >= 1 and v == int(v)),
                                  "a whole number of batches (1 or more), a fraction between 0 and 1, or null"),
    "train.limit_val_batches": (lambda v: v is None or 0 < v < 1 or (v >= 1 and v == int(v)),
                                "a whole number of batches (1 or more), a fraction between 0 and 1, or null"),
    "optim.layer_decay": (lambda v: v is None or 0 < v <= 1, "above 0 and at most 1 (e.g. 0.75), or null"),
    "data.device_cache_gb": (lambda v: v is None or v >= 0, "0 or more, or null for half the GPU's memory"),
    "data.mean": (lambda v: v is None or len(v) == 3, "a list of 3 numbers"),
    "data.std": (lambda v: v is None or (len(v) == 3 and all(s > 0 for s in v)), "a list of 3 positive numbers"),
    "data.scale": (lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1, "[min, max] with 0 < min <= max <= 1"),
    "data.ratio": (lambda v: len(v) == 2 and 0 < v[0] <= v[1], "[min, max] with 0 < min <= max"),
    "model.unfreeze_epoch": (lambda v: v is None or v > 0, "a positive integer (epochs trained frozen)"),
    "optim.lr": (lambda v: v > 0, "a positive number"),
    "optim.backbone_lr": (lambda v: v is None or v > 0, "a positive number, or null for optim.lr"),
    "optim.momentum": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "optim.betas": (lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "[beta1, beta2], each in [0, 1)"),
    "optim.eps": (lambda v: v > 0, "a positive number"),
    "scheduler.warmup_epochs": (lambda v: v >= 0, "0 or more epochs"),
    "scheduler.warmup_start_factor": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "scheduler.pct_start": (lambda v: 0 < v < 1, "a number in (0, 1)"),
    "train.label_smoothing": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    # (bounded: Beta draws with huge parameters never return)
    "train.mixup_alpha": (lambda v: 0 <= v <= MAX_MIX_ALPHA, f"0 (off) or a positive number up to {MAX_MIX_ALPHA}"),
    "train.cutmix_alpha": (lambda v: 0 <= v <= MAX_MIX_ALPHA, f"0 (off) or a positive number up to {MAX_MIX_ALPHA}"),
    "train.mix_prob": (lambda v: 0 <= v <= 1, "a probability from 0 to 1"),
    "train.ema_decay": (lambda v: 0 <= v < 1, "a number in [0, 1) (0 = off)"),
    "train.early_stopping_patience": (lambda v: v >= 0, "0 (off) or a positive number of epochs"),
    "optim.weight_decay": (lambda v: v >= 0, "0 or more"),
    "scheduler.step_size": (lambda v: v > 0, "a positive integer"),
    "scheduler.gamma": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "train.epochs": (lambda v: 0 < v <= 1_000_000, "a positive integer"),
    "train.seed": (lambda v: 0 <= v < 2**32, "an integer from 0 to 2**32-1"),
    "train.output_dir": (lambda v: v.strip() != "", "a folder path (not empty)"),
    "train.resume": (lambda v: v.strip() != "", "auto, none or a run directory"),
    "data.root": (lambda v: v.strip() != "", "a folder path (not empty)"),
    "data.val_split": (lambda v: 0 <= v < 1, "a fraction from 0 to below 1 (e.g. 0.2)"),
    "data.label_delimiter": (lambda v: v is None or (v != "" and v.strip() == v), "a separator such as ';', or null"),
    "train.threshold": (lambda v: 0 < v < 1, "a probability between 0 and 1 (e.g. 0.5)"),
    "data.test_split": (lambda v: 0 <= v < 1, "a fraction from 0 to below 1 (e.g. 0.1)"),
    "data.split_seed": (lambda v: 0 <= v < 2**32, "an integer from 0 to 2**32-1"),
    "data.labels": (lambda v: v is None or v.strip() != "", "a file path under data.root, or null"),
    "data.train_shards": (lambda v: v.strip() != "", "a file name pattern under data.root (train-*.tar)"),
    "data.val_shards": (lambda v: v.strip() != "", "a file name pattern under data.root (val-*.tar)"),
    "data.test_shards": (lambda v: v.strip() != "", "a file name pattern under data.root (test-*.tar)"),
    "data.image_column": (lambda v: v.strip() != "", "a column name"),
    "data.cache_dir": (lambda v: v is None or v.strip() != "", "a folder path, or null"),
    "data.scan_limit": (lambda v: v is None or v >= 0, "a number of images (0: a sample only), or null (all)"),
    "data.path_column": (lambda v: v.strip() != "", "a column name"),
    "data.label_column": (lambda v: v.strip() != "", "a column name"),
    "data.split_column": (lambda v: v.strip() != "", "a column name"),
    "data.classes": (lambda v: v is None or (len(v) >= 2 and len(set(v)) == len(v) and all(c.strip() == c != ""
                                                                                           for c in v)),
                     "a list of at least 2 distinct, non-empty class names, or null"),
    "train.grad_accum_steps": (lambda v: v > 0, "a positive integer"),
    "train.collective_timeout": (lambda v: v > 0, "a positive number of seconds"),
}


def validate(cfg: Config, source: str) -> None:
    """Rules between keys, checked once everything is set."""
    if None not in (cfg.data.resize_size, cfg.data.image_size) and cfg.data.resize_size < cfg.data.image_size:
        raise UserError(f"config: data.resize_size ({cfg.data.resize_size}) must be at least data.image_size "
                        f"({cfg.data.image_size}): val images are resized, then centre-cropped (in {source})")
    if cfg.scheduler.name == "onecycle" and cfg.scheduler.warmup_epochs > 0:
        raise UserError(f"config: scheduler.warmup_epochs does not apply to scheduler.name=onecycle, which rises "
                        f"over scheduler.pct_start of the run; set warmup_epochs to 0 (in {source})")
    if cfg.optim.nesterov and (cfg.optim.name != "sgd" or cfg.optim.momentum == 0):
        raise UserError(f"config: optim.nesterov=true needs optim.name=sgd with optim.momentum > 0 (in {source})")
    d = cfg.data
    if d.val_split + d.test_split >= 1:
        raise UserError(f"config: data.val_split + data.test_split must leave images to train on (they add up to "
                        f"{d.val_split + d.test_split:g}) (in {source})")
    if d.test_split > 0 and d.val_split == 0:
        raise UserError(f"config: data.test_split needs data.val_split too: both parts are drawn from the same "
                        f"images (in {source})")
    if d.label_delimiter is not None and not d.labels and d.format != "wds":
        raise UserError(f"config: data.label_delimiter applies to a labels file (data.labels) and to shards' txt "
                        f"labels (data.format=wds) (in {source})")
    if d.format != "files" and d.labels:
        raise UserError(f"config: data.labels is a labels file of image files; data.format={d.format} keeps the "
                        f"labels in the {'shards' if d.format == 'wds' else 'dataset'}: set data.labels=null "
                        f"(in {source})")
    if d.format != "files" and d.demo:
        raise UserError(f"config: data.demo generates image files; set data.format=files (in {source})")
    if cfg.train.task != "multi_label" and cfg.train.select_best_by in ("map", "micro_f1") \
            and cfg.train.task is not None:
        raise UserError(f"config: train.select_best_by={cfg.train.select_best_by} is a multi_label metric; "
                        f"train.task is {cfg.train.task} (in {source})")
    if d.classes is not None and not d.labels and d.format == "files":
        raise UserError(f"config: data.classes applies to a labels file (data.labels), shards and datasets; class "
                        f"folders name the classes themselves (in {source})")
    m = cfg.model
    if m.mode == "frozen_then_finetune":
        if m.unfreeze_epoch is None:
            raise UserError(f"config: model.mode=frozen_then_finetune needs model.unfreeze_epoch, the number "
                            f"of epochs to train frozen before the backbone trains (in {source})")
    elif m.unfreeze_epoch is not None:
        raise UserError(f"config: model.unfreeze_epoch applies only to model.mode=frozen_then_finetune, "
                        f"this config has mode {m.mode} (in {source})")


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 4, 4, 80, 80
MAX_FILE_BYTES = 1 << 20  # a config is a few hundred bytes; anything near this is not one


def _shown(value: Any) -> str:
    """A value for an error message, cut short: a YAML alias bomb expands to billions of items."""
    shown = _REPR.repr(value)
    return shown if len(shown) <= 120 else shown[:117] + "..."


class _StrictLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error (YAML would keep the last)."""


def _mapping_without_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, typing.Hashable):
            continue  # construct_mapping says what is wrong with it
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {_shown(key)} given twice",
                                                    key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str, choices: tuple | None) -> Any:
    where = f"{key} (in {source})"
    # YAML 1.1 reads a bare `no` / `off` as False; for a choice that includes it, that is what was meant.
    if choices and value is False:
        value = next((word for word in ("no", "off") if word in choices), value)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key, source, choices)
    if origin is list:
        (item,) = typing.get_args(tp)
        if item is str and isinstance(value, str):  # log_with=tensorboard: a list of one
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config: {where} must be a list, got {_shown(value)}")
        return [_coerce(v, item, f"{key}[{i}]", source, choices) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"config: {where} must be true or false, got {_shown(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config: {where} must be an integer, got {_shown(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config: {where} must be a number, got {_shown(value)}")
        try:
            value = float(value)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise UserError(f"config: {where} must be a finite number, got {_shown(value)}")
        return value
    if tp is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise UserError(f"config: {where} must be a string, got {_shown(value)}")
        value = str(value)
        if choices and value not in choices:
            raise UserError(f"config: {where} must be one of {'|'.join(choices)}, got {_shown(value)}")
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
        raise UserError(f"config: {key} (in {source}) must be {check[1]}, got {_shown(value)}")
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
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise UserError(f"config: {p} is {size / 2**20:.1f} MiB, not a config file (they are a few hundred "
                            f"bytes; at most {MAX_FILE_BYTES >> 20} MiB)")
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config: file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"config: cannot read {p}: {e}") from None
    try:
        # A safe loader: a YAML file never constructs Python objects (no !!python/object tags).
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as e:
        raise UserError(f"config: {p} is not valid YAML: {' '.join(str(e).split())[:300]}") from None


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise UserError(f"config: command-line override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load(path: str | Path | None = None, overrides: typing.Sequence[str] = (), source: str = "command line") -> Config:
    """Defaults, then the YAML file, then ``section.key=value`` overrides (the last one wins);
    ``source`` names where the overrides came from in messages."""
    cfg = Config()
    if path is not None:
        _apply_mapping(cfg, read_yaml(path), str(path))
    for item in overrides:
        key, value = parse_override(item)
        set_key(cfg, key, value, source)
    validate(cfg, f"{path} and the {source}" if path is not None and overrides else str(path or source))
    return cfg


def dump(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def reference() -> str:
    """Every key with its default and help line, from the schema itself (for ``--help`` and docs)."""
    cfg, lines = Config(), []
    for section in _fields(cfg):
        lines.append(f"{section}:")
        for name, f in _fields(getattr(cfg, section)).items():
            default = yaml.safe_dump(getattr(getattr(cfg, section), name), default_flow_style=True).strip()
            default = default.removesuffix("\n...").removesuffix("...").strip()
            choices = f.metadata.get("choices")
            allowed = f" [{'|'.join(choices)}]" if choices else ""
            lines.append(f"  {section}.{name} = {default}{allowed}")
            lines.append(f"      {f.metadata.get('doc', '')}")
    return "\n".join(lines)
