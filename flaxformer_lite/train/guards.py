"""What the run itself decides alike on every process: whether to resume (process 0's
answer for all) and whether a NaN/Inf step stops it.

Kept apart from loop.py so that the loop reads as the loop. On several processes `agreed`
is a collective, so every process must call it at the same point of the run. (The
workdir's lock and stop signals are the shell's: they reach the loop as hooks,
train/hooks.py.)
"""

from __future__ import annotations

import jax
import numpy as np

from flaxformer_lite.train import checkpoint, step as step_lib


class NonFiniteError(Exception):
    """A NaN or Inf loss or gradient (train.skip_nonfinite=False). Exit status 3; the last
    checkpoint (written before the bad step) is intact: no bad state is ever saved."""
    exit_status = 3


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
