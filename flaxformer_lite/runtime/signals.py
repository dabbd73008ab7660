"""SIGINT / SIGTERM as a request to stop a training run: the loop saves a checkpoint at
the next step boundary and ends (exit status 128 + the signal), so the same command
resumes it. A scheduler or a supervisor that signals every process of a job delivers
one request several times; a second, different signal stops at once."""

from __future__ import annotations

import signal
import time

import jax
import numpy as np


class StopFlag:
    """SIGINT / SIGTERM ask the loop to save and stop at the next step boundary (the
    shell's `RunHooks.stop_requests`). The handlers are installed for the length of the
    `with` block, in the main thread only."""

    def __init__(self):
        self.signal: int | None = None
        self._at = 0.0
        self._old = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        del frame
        # A second signal stops now; the same one again within a second is one request
        # delivered twice (a scheduler signals every process of a job, a supervisor too).
        if self.signal is not None and not (signum == self.signal and time.time() - self._at < 1.0):
            raise KeyboardInterrupt
        if self.signal is None:
            self.signal, self._at = signum, time.time()

    def __exit__(self, *exc) -> None:
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
