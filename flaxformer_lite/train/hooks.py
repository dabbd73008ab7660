"""What the run-management shell adds to a training run, as hooks the loop calls at fixed
points: refuse a workdir that another process writes (before building anything), hold
the workdir while the run writes it, and stop early on request (saving first).

The defaults do none of it (no lock, no signal handlers, never stop), so the core trains
on its own, in a test or a notebook. The shell's hooks (flaxformer_lite/runtime/hooks.py:
the workdir lock and SIGINT/SIGTERM) are what the command line and the sweep runner pass.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ContextManager, Protocol


class Held(Protocol):
    """A workdir held by this run."""

    @property
    def lost(self) -> str | None:
        """Who took the workdir over while this run held it, in words (None: nobody). The
        loop then stops before its next checkpoint, without saving, so two runs never mix."""

    def release(self, *, undo: bool = False) -> None:
        """Let go of the workdir; `undo`: the run wrote nothing, leave it as it was."""


class StopRequests(Protocol):
    """Requests to stop early, open for the length of the step loop."""
    signal: int | None  # what asked to stop (the exit status is 128 + it), None if nothing did

    def requested(self, step: int, every: int) -> bool:
        """Whether to save and stop after `step`; `every`: how often several processes
        may compare their answers (all of them must stop at the same step)."""


class _Unheld:
    lost = None

    def release(self, *, undo: bool = False) -> None:
        del undo


class _NeverStop:
    signal = None

    def __enter__(self) -> _NeverStop:
        return self

    def __exit__(self, *exc) -> None:
        del exc

    def requested(self, step: int, every: int) -> bool:
        del step, every
        return False


def _anyone_may_write(workdir: str) -> None:
    del workdir


def _hold_nothing(workdir: str) -> Held:
    del workdir
    return _Unheld()


@dataclasses.dataclass(frozen=True)
class RunHooks:
    """The shell's concerns as the loop sees them. `check_free(workdir)` raises UserError
    if another process writes the workdir (it only reads); `claim(workdir)` holds it (or
    raises UserError) once everything is built; `stop_requests()` opens what the loop asks,
    after each step, whether to stop."""
    check_free: Callable[[str], None] = _anyone_may_write
    claim: Callable[[str], Held] = _hold_nothing
    stop_requests: Callable[[], ContextManager[StopRequests]] = _NeverStop
