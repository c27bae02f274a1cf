"""python -m tl_dist: the same as the tl-dist command."""
import sys

from .cli import main

sys.exit(main())
