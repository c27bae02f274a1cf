"""A run as a folder to publish (the Hugging Face Hub's model layout): ``model.safetensors`` (the best
weights with their tl_dist metadata), ``config.json`` (the class names, the architecture, the
preprocessing; for a timm model the config timm itself reads, so ``timm.create_model("hf-hub:...")``
loads it), ``README.md`` (the model card) and the run's pictures. ``tl-dist export RUN --format hf``
writes it; ``tl-dist push`` uploads it. The folder is written beside and moved into place whole.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import yaml

from tl_dist.errors import UserError, printable
from tl_dist.files import atomic, checkpoint, resume_file
from tl_dist.metrics import per_class

PICTURES = ("curves.png", "confusion_matrix.png", "val_predictions.png")
MARKER = "tl_dist_export.json"  # says the folder is ours to replace


def config_json(meta: dict) -> dict:
    """config.json: timm's own layout for timm models (architecture, num_classes, label_names,
    pretrained_cfg), the same keys for torchvision ones, and tl_dist's view under "tl_dist"."""
    arch = meta["arch"]
    out = {"architecture": arch.removeprefix("timm/").split(".")[0] if arch.startswith("timm/") else arch,
           "num_classes": meta["num_classes"], "label_names": meta["classes"],
           "pretrained_cfg": {"input_size": [3, meta["image_size"], meta["image_size"]],
                              "interpolation": meta["interpolation"], "mean": meta["mean"], "std": meta["std"],
                              "crop_pct": meta["image_size"] / meta["resize_size"], "crop_mode": "center",
                              "num_classes": meta["num_classes"]},
           "tl_dist": {k: meta[k] for k in ("arch", "arch_kwargs", "head", "mode", "image_size", "resize_size",
                                            "interpolation", "mean", "std", "epoch", "val_acc", "macro_f1")
                       if k in meta}}
    if arch.startswith("timm/") and "." in arch:
        out["pretrained_cfg"]["tag"] = arch.split(".", 1)[1]
    if meta.get("arch_kwargs"):
        out["model_args"] = meta["arch_kwargs"]  # (timm passes these to the model's constructor)
    if meta.get("task") == "multi_label":
        out["tl_dist"].update(task="multi_label", threshold=meta["threshold"])
    return out


def card(meta: dict, name: str, confusion, pictures: list[str]) -> str:
    """The model card: what the model is, its validation results, how it was trained, how to use it."""
    arch, classes, cfg = meta["arch"], meta["classes"], meta.get("config", {})
    timm_model = arch.startswith("timm/")
    front = {"library_name": "timm" if timm_model else "tl_dist", "pipeline_tag": "image-classification",
             "tags": ["image-classification", "tl_dist", *(["timm"] if timm_model else [])]}
    epochs = cfg.get("train", {}).get("epochs")
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# {name}", "",
             f"`{arch}` ({meta['mode']}) trained with tl_dist to tell {len(classes)} classes "
             f"apart: {', '.join(f'`{c}`' for c in classes[:20])}{' ...' if len(classes) > 20 else ''}. Inputs: "
             f"Resize({meta['resize_size']}, {meta['interpolation']}) + CenterCrop({meta['image_size']}), "
             f"normalised with mean {meta['mean']} and std {meta['std']}.", ""]
    if "limited" in meta:
        lines += [f"**A limited run** (a quick trial: {meta['limited']}): not a full training.", ""]
    lines += [f"## Results on the validation images (best epoch {meta['epoch']}"
              + (f" of {epochs}" if epochs else "") + ")", "", "| metric | value |", "|---|---|",
              f"| accuracy{' (exact match)' if meta.get('task') == 'multi_label' else ''} | {meta['val_acc']:.4f} |",
              f"| macro F1 | {meta['macro_f1']:.4f} |", f"| loss | {meta['val_loss']:.4f} |"]
    lines += [f"| {k} | {meta[k]:.4f} |" for k in ("map", "micro_f1") if k in meta]
    if confusion is not None:
        lines += ["", "| class | precision | recall | F1 | images |", "|---|---|---|---|---|"]
        lines += [f"| {r['class']} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1']:.4f} | {r['support']} |"
                  for r in per_class(confusion, classes)]  # (tl-dist evaluate's own per-class numbers)
    lines += ["", "These are the numbers on the run's own validation images, the ones that chose the best epoch; "
              "measure the model on images it has never seen before relying on it.", ""]
    lines += [f"![{p.removesuffix('.png').replace('_', ' ')}]({p})" for p in pictures]
    lines += ["", "## Training", "", f"{meta.get('world_size', 1)} process(es), mixed precision "
              f"{meta.get('mixed_precision', 'no')}, library versions {meta.get('versions', {})}. The config:", "",
              "```yaml", yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", "", "## Use", "",
              "With tl_dist (`pip install tl_dist`; this folder, or its copy from the Hub):", "", "```bash",
              "tl-dist predict image.jpg --checkpoint PATH_TO_THIS_FOLDER", "```", "", "```python", "import tl_dist",
              "predictor = tl_dist.Predictor.from_checkpoint(\"PATH_TO_THIS_FOLDER\")",
              "predictor.predict([\"image.jpg\"])", "```"]
    if timm_model:
        lines += ["", "With timm alone (its config.json is timm's):", "", "```python", "import timm",
                  "model = timm.create_model(\"hf-hub:USER/REPO\", pretrained=True).eval()",
                  "config = timm.data.resolve_data_config({}, model=model)",
                  "transform = timm.data.create_transform(**config)", "```"]
    return "\n".join(lines) + "\n"


def write(ckpt: Path, out: Path, force: bool = False) -> list[Path]:
    """The folder for ``ckpt`` (a run's best.safetensors) at ``out``; returns its files. An existing
    ``out`` is replaced only if tl_dist wrote it, or with ``force``."""
    meta = checkpoint.read_metadata(ckpt)
    if out.exists() and not (out / MARKER).is_file() and not force:
        raise UserError(f"export: {out} exists and is not a folder tl_dist exported; pass --force to replace it, "
                        f"or choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"export: {out} is a file; --format hf writes a folder")
    run = ckpt.parent
    confusion = None
    if (run / "resume.pt").is_file():  # (the best epoch's confusion matrix: per-class results)
        best = resume_file.load_state(run / "resume.pt").get("best_confusion")
        confusion = best if best is not None and meta.get("task") != "multi_label" else None
    pictures = [p for p in PICTURES if (run / p).is_file()]
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copyfile(ckpt, tmp / "model.safetensors")
        for p in pictures:
            shutil.copyfile(run / p, tmp / p)
        (tmp / "config.json").write_text(json.dumps(config_json(meta), indent=2) + "\n")
        (tmp / "README.md").write_text(card(meta, run.name if ckpt.name == "best.safetensors" else ckpt.stem,
                                            confusion, pictures))
        (tmp / MARKER).write_text(json.dumps({"from": str(ckpt)}) + "\n")
        if out.exists():
            shutil.rmtree(out)  # (ours, or --force)
        tmp.rename(out)
        atomic.fsync_dir(out.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"export: writing {printable(str(out))} failed: {e.strerror}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(out.iterdir())
