"""What may refuse or stop a training run, decided alike on every process: the workdir's
lock (process 0 holds it for all), the resume decision, a stop signal, a NaN/Inf step.

Kept apart from loop.py so that the loop reads as the loop. On several processes most of
these are collectives, so every process must call them at the same point of the run.
"""

from __future__ import annotations

import signal
import time
import jax
import numpy as np

from flaxformer_lite.runtime import lock as lock_lib
from flaxformer_lite.errors import UserError
from flaxformer_lite.train import checkpoint, step as step_lib


class NonFiniteError(Exception):
    """A NaN or Inf loss or gradient (train.skip_nonfinite=False). Exit status 3; the last
    checkpoint (written before the bad step) is intact: no bad state is ever saved."""
    exit_status = 3


class StopFlag:
    """SIGINT / SIGTERM ask the loop to save and stop at the next step boundary."""

    def __init__(self):
        self.signal = None
        self._at = 0.0
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        del frame
        # A second signal stops now; the same one again within a second is one request
        # delivered twice (a scheduler signals every process of a job, a supervisor too).
        if self.signal is not None and not (signum == self.signal and time.time() - self._at < 1.0):
            raise KeyboardInterrupt
        if self.signal is None:
            self.signal, self._at = signum, time.time()

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def requested(self, step: int, every: int) -> bool:
        """Whether to stop after `step`. One process checks every step; several agree on
        it every `every` steps (a collective), since all of them must save together."""
        if jax.process_count() == 1:
            return self.signal is not None
        if step % every:
            return False
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.array(self.signal is not None))))


class _NoLock:
    """What processes other than 0 hold: process 0 holds the workdir's lock for all."""
    lost = None

    def release(self, *, undo: bool = False) -> None:
        del undo


def take_lock(workdir: str):
    """Process 0 takes the workdir's lock; every process learns whether it could."""
    if jax.process_count() == 1:
        return lock_lib.acquire(workdir)
    from jax.experimental import multihost_utils
    held, error = _NoLock(), None
    if jax.process_index() == 0:
        try:
            held = lock_lib.acquire(workdir)
        except UserError as e:
            error = e
    if not int(multihost_utils.broadcast_one_to_all(np.int32(error is None))):
        raise error or UserError(f'--workdir={workdir} is in use by another run (process 0 could not take its '
                                 f'lock; see its output); wait for it to finish or choose another --workdir')
    return held


def agreed(resume: bool) -> bool:
    """Process 0's answer for every process, and a barrier: without it a process that
    looked at the workdir after process 0 had started writing it (its config) could
    decide to resume while process 0 starts afresh, and their collectives would no longer
    pair up (seen: an Orbax barrier-name mismatch under load)."""
    if jax.process_count() == 1:
        return resume
    from jax.experimental import multihost_utils
    return bool(int(multihost_utils.broadcast_one_to_all(np.int32(resume))))


def _bad_value(values: list[float]) -> str:
    bad = [v for v in values if not np.isfinite(v)]
    return ('NaN' if np.isnan(bad[0]) else 'Inf' if bad[0] > 0 else '-Inf') if bad else 'not finite'


def check_health(health: dict, ckpt: checkpoint.Checkpointer,
                 pending: list[tuple[int, dict]] | None = None) -> int:
    """The number of updates skipped so far (`health` fetched from the train step); raise
    NonFiniteError if a step since the start went NaN/Inf, naming the step and the value
    (from `pending`, the (step, metrics) fetched with it, where that step is among them)."""
    first = int(health['first_bad'])
    if first < 0:
        return int(health['skipped'])
    what = int(health['bad_what'])
    values = {k: [float(m[k]) for s, m in (pending or []) if s == first] for k in ('objective', 'grad_norm')}
    if what & step_lib.LOSS_BAD:
        name = f"train/loss is {_bad_value(values['objective'])}"
        if what & step_lib.GRADS_BAD:
            name += ' (and so are the gradients)'
    else:
        name = f"the gradients are {_bad_value(values['grad_norm'])} (train/grad_norm)"
    ckpt.wait()
    last = ckpt.latest_step()
    kept = f'the last checkpoint, step {last}, is intact' if last is not None else 'no checkpoint was written'
    raise NonFiniteError(f'{name} at step {first}; the run stopped without saving a bad state ({kept}); lower '
                         f'optim.learning_rate or raise optim.warmup_steps in a new --workdir, or run the same command '
                         f'with --config.train.skip_nonfinite=True to skip such updates')
