"""What a label becomes for the loss: a class index (one label per image), or a multi-hot vector of
floats (several labels per image: a tuple of class indices, possibly empty)."""
from __future__ import annotations

import torch


def target(label, num_classes: int):
    """A sample's label as the loaders return it: the index itself, or its multi-hot vector."""
    if isinstance(label, int):
        return label
    t = torch.zeros(num_classes)
    t[list(label)] = 1.0
    return t


def blank(multi_label: bool, num_classes: int):
    """The label of a placeholder sample (weight 0: never reaches the loss or the metrics)."""
    return torch.zeros(num_classes) if multi_label else 0


def batch(labels: list, num_classes: int) -> torch.Tensor:
    """A batch of labels: int64 indices, or float multi-hot rows."""
    if labels and isinstance(labels[0], tuple):
        return torch.stack([target(x, num_classes) for x in labels])
    if labels and isinstance(labels[0], torch.Tensor):  # (multi-hot already, or blanks among them)
        return torch.stack(labels)
    return torch.tensor(labels, dtype=torch.int64)
