"""`python -m tl_dist.evaluate`: the entry point of `tl-dist evaluate` (see tl_dist.commands.evaluate)."""
import sys

from tl_dist.commands.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
