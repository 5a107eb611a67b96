"""`python -m kubetune.train.torchrun ARGS`: torchrun, quiet and patient on a stop signal.

Each worker writes its own result (message, exit code) and the launcher prints it; torchrun's
ChildFailedError traceback on top would break the rule that bad input never prints one.
On SIGTERM/SIGINT torchrun passes the signal to the workers (they checkpoint) and waits
`--shutdown-timeout` seconds before it kills them; a second signal (the terminal's Ctrl-C reaches
both us and the launcher, which passes it on) must not cut that wait short and orphan the workers.
"""

import os
import signal
import sys
from types import FrameType

_pending: list[int] = []


def _remember(signum: int, frame: FrameType | None) -> None:
    _pending.append(signum)  # before torchrun's own handlers exist: no worker runs yet


if __name__ == "__main__":
    for _sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(_sig, _remember)
    os.environ.setdefault("LOGLEVEL", "ERROR")  # torchrun's per-signal warnings repeat what the workers say

    from torch.distributed.elastic.multiprocessing import api
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    first_signal = api._terminate_process_handler

    def _once(signum: int, frame: FrameType | None) -> None:
        for handled in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(handled, signal.SIG_IGN)  # repeats would abort the shutdown wait mid-way
        first_signal(signum, frame)

    api._terminate_process_handler = _once  # looked up when torchrun registers its handlers
    if _pending:
        sys.exit(128 + _pending[0])
    try:
        main()
    except ChildFailedError:
        sys.exit(1)
    except SignalException as exc:  # it has already passed the signal on to the workers and waited for them
        sys.exit(128 + int(exc.sigval))
