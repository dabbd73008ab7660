"""The command line: run one experiment, a sweep, a report, an evaluation or a description.

    python launch.py --config=configs/recall.py:quick --workdir=runs/recall_quick
    python launch.py --help

Everything lives in `flaxformer_lite/cli/` (importable, so tests call it in-process).
"""

import sys

from flaxformer_lite.cli import main

if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
