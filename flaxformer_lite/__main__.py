"""`python -m flaxformer_lite ...` is `python launch.py ...` (how sweep trials are started)."""

import sys

from flaxformer_lite.cli import main

sys.exit(main(sys.argv[1:]))
