"""How a command's end becomes its exit status, in one place for every entry point (the
command line and a sweep trial, wherever that runs: the local runner's fork server, a
subprocess, a SLURM array task):

    0        done
    1        a bug (its traceback is printed), or a sweep with a failed trial
    2        a user error: one line naming the field and the fix; nothing was written
    3, 4     the run's own failures, each exception class carrying its `exit_status`
             (a NaN/Inf step; a disk that refused a write)
    5        a multi-host run lost a process (runtime/supervisor.py's verdict)
    128 + N  stopped by signal N after saving a checkpoint (130 Ctrl-C, 143 SIGTERM)
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from flaxformer_lite.errors import UserError

USER_ERROR = 2
BUG = 1


def status_of(error: BaseException) -> int | None:
    """The exit status an exception stands for, or None for a bug."""
    if isinstance(error, UserError):
        return USER_ERROR
    return getattr(type(error), 'exit_status', None)


def of_result(result: dict[str, Any]) -> int:
    """A training run's result: 0 when done, 128 + N when signal N stopped it."""
    if result.get('status') == 'interrupted':
        return 128 + int(result['signal'])  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    return 0


def run(body: Callable[[], int]) -> int:
    """`body()`'s status; an error a user or the run caused is printed as one line and
    becomes its status; a bug propagates with its traceback."""
    try:
        return body()
    except Exception as e:  # noqa: BLE001 -- only the classified ones are caught; bugs re-raise
        status = status_of(e)
        if status is None:
            raise
        print(f'error: {e}', file=sys.stderr)
        return status
