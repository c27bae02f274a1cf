"""python -m tl_dist: the same as the tl-dist command."""
import sys

from tl_dist.cli import main

sys.exit(main())
