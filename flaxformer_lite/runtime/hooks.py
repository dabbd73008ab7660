"""The shell's hooks for a training run (`train.hooks.RunHooks`): the workdir's lock
(runtime/lock.py), which process 0 holds for all processes of a run, and SIGINT/SIGTERM
as a request to save and stop (runtime/signals.py). The command line and the sweep
runner pass `shell_hooks()` to `train_and_evaluate`.

On several processes `claim` is a collective: every process calls it at the same point
and learns whether process 0 could take the lock.
"""

from __future__ import annotations

import jax
import numpy as np

from flaxformer_lite.errors import UserError
from flaxformer_lite.runtime import lock as lock_lib
from flaxformer_lite.runtime.signals import StopFlag
from flaxformer_lite.train.hooks import RunHooks


class _Locked:
    """The workdir's lock as the loop holds it (`train.hooks.Held`)."""

    def __init__(self, lock: lock_lib.WorkdirLock):
        self.lock = lock

    @property
    def lost(self) -> str | None:
        return None if self.lock.lost is None else lock_lib.describe(self.lock.lost)

    def release(self, *, undo: bool = False) -> None:
        self.lock.release(undo=undo)


class _HeldByProcess0:
    """What processes other than 0 hold: process 0 holds the workdir's lock for all."""
    lost = None

    def release(self, *, undo: bool = False) -> None:
        del undo


def check_free(workdir: str) -> None:
    """Refuse a workdir that a live process holds, at once (reads only). With several
    processes only process 0 can judge it, in `take_lock`."""
    if jax.process_count() == 1:
        lock_lib.check_free(workdir)


def take_lock(workdir: str) -> _Locked | _HeldByProcess0:
    """Process 0 takes the workdir's lock; every process learns whether it could."""
    if jax.process_count() == 1:
        return _Locked(lock_lib.acquire(workdir))
    from jax.experimental import multihost_utils
    held, error = _HeldByProcess0(), None
    if jax.process_index() == 0:
        try:
            held = _Locked(lock_lib.acquire(workdir))
        except UserError as e:
            error = e
    if not int(multihost_utils.broadcast_one_to_all(np.int32(error is None))):
        raise error or UserError(f'--workdir={workdir} is in use by another run (process 0 could not take its '
                                 f'lock; see its output); wait for it to finish or choose another --workdir')
    return held


def shell_hooks() -> RunHooks:
    """The lock and the stop signals, for a run the command line or a sweep starts."""
    return RunHooks(check_free=check_free, claim=take_lock, stop_requests=StopFlag)
