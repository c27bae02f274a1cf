"""tl_dist: transfer-learning trainer for image classification (accelerate + torchvision)."""

__version__ = "0.1.0"
