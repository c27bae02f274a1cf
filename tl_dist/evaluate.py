"""`python -m tl_dist.evaluate`: the entry point of `tl-dist evaluate` (see tl_dist.commands.evaluate); imported, the
module is callable: `tl_dist.evaluate(...)` is `tl_dist.api.evaluate` (the Python API, docs/python.md)."""
import sys
import types

from tl_dist.commands.evaluate import main


class _Callable(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from tl_dist import api
        return api.evaluate(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _Callable
