"""`python -m tl_dist.train`: the entry point of `tl-dist train` (see tl_dist.commands.train)."""
import sys

from tl_dist.commands.train import main

if __name__ == "__main__":
    sys.exit(main())
