"""`python -m tl_dist.train`: the entry point of `tl-dist train` (see tl_dist.commands.train); imported, the
module is callable: `tl_dist.train(...)` is `tl_dist.api.train` (the Python API, docs/python.md)."""
import sys
import types

from tl_dist.commands.train import main


class _Callable(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from tl_dist import api
        return api.train(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _Callable
