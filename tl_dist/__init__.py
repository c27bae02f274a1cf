"""tl_dist: transfer-learning trainer for image classification (accelerate + torchvision, timm).

From Python (docs/python.md): ``tl_dist.train(config, **settings)``, ``tl_dist.evaluate(data, run)``,
``tl_dist.Predictor``, ``tl_dist.load_config``. Importing the package imports nothing heavy: each
name loads what it needs when it is first used.
"""

__version__ = "0.1.0"

__all__ = ["train", "evaluate", "Predictor", "load_config", "UserError", "__version__"]


def __getattr__(name: str):
    # (tl_dist.train and tl_dist.evaluate are also the `python -m` entry modules: they are callable)
    if name in ("train", "evaluate"):
        import importlib
        return importlib.import_module(f"tl_dist.{name}")
    if name == "load_config":
        from tl_dist.api import load_config
        return load_config
    if name == "Predictor":
        from tl_dist.predictor import Predictor
        return Predictor
    if name == "UserError":
        from tl_dist.errors import UserError
        return UserError
    raise AttributeError(f"module 'tl_dist' has no attribute {name!r}")
