"""torchrun's per-process module: `python -m kubetune.train.worker SPEC`."""

import sys

from kubetune.train.entry import run_worker

if __name__ == "__main__":
    sys.exit(run_worker(sys.argv[1], standalone=False))
