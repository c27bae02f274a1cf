"""`python -m tl_dist.predict`: the entry point of `tl-dist predict` (see tl_dist.commands.predict)."""
import sys

from tl_dist.commands.predict import main

if __name__ == "__main__":
    sys.exit(main())
