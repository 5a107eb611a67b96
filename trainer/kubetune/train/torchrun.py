"""`python -m kubetune.train.torchrun ARGS`: torchrun without its traceback when a worker fails.

Each worker writes its own result (message, exit code) and the launcher prints it; torchrun's
ChildFailedError traceback on top would break the rule that bad input never prints one.
"""

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main

if __name__ == "__main__":
    try:
        main()
    except ChildFailedError:
        sys.exit(1)
    except SignalException as exc:  # it has already passed the signal on to the workers and waited for them
        sys.exit(128 + int(exc.sigval))
