"""`launch.py --eval_only --workdir=DIR`: evaluate a trained run again without training.

The latest good checkpoint of DIR is restored (a damaged newest step is reported and the
previous one used) and the eval and test splits are evaluated as at the end of training
(optionally at other `eval.dependency_lengths`); `results.json` gets the metrics (added
to the ones already there). Only `eval.*` and `mesh.*` may differ from the run's own
config. Nothing else in the workdir is written.

It reads only, so it works while a training writes the same workdir (it never takes or
waits for the workdir's lock): the checkpoint it reads is the newest complete one, and
results.json is left to the training while that holds the lock (the metrics are printed).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import flax.linen as nn
import jax

from flaxformer_lite.errors import UserError
from flaxformer_lite.resolve import Run
from flaxformer_lite.runtime import lock as lock_lib
from flaxformer_lite.train import checkpoint, results as results_lib
from flaxformer_lite.train.evaluate import Evaluator
from flaxformer_lite.train.setup import build


def evaluate_run(exp: Run, workdir: str, *, verbose: bool = True) -> dict[str, Any]:
    """Evaluate the latest checkpoint of `workdir`; returns the updated results record."""
    if not checkpoint.check_workdir(workdir, exp.config.to_dict(), exp.derived):
        raise UserError(f'--eval_only: --workdir={workdir} holds no run; train one there first')
    if not checkpoint.steps_saved(workdir):
        raise UserError(f'--eval_only: --workdir={workdir} holds no checkpoint yet; run the training command '
                        f'again to make one')  # before building anything
    setup = build(exp)
    evaluator = Evaluator(exp, setup)
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=exp.config.checkpoint.max_to_keep, async_save=False,
                                   read_only=True)
    warn = (lambda line: print(line, file=sys.stderr, flush=True)) if jax.process_index() == 0 else (lambda _: None)
    try:
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
            restored = ckpt.restore_latest(setup.abstract_state, warn=warn)
            if restored is None:
                raise UserError(f'--eval_only: --workdir={workdir} holds no checkpoint yet; run the training command '
                                f'again to make one')
            step, state, meta, _ = restored
            scalars, curves = {}, {}
            for split in ('eval', 'test'):
                more, more_curves = evaluator(state.params, split)
                scalars.update({k: float(v) for k, v in more.items() if '/loss_at_position/' not in k})
                curves.update(more_curves)
    finally:
        ckpt.close()
    old = results_lib.read(workdir)
    if old is not None and old.get('step') == step:
        record = dict(old, metrics=dict(sorted({**old.get('metrics', {}), **scalars}.items())))
        record['curves'] = {**old.get('curves', {}),
                            **{f'{p}/loss_by_position': [float(x) for x in c] for p, c in curves.items()}}
    else:  # not finished (or finished before results.json existed): a record of this step
        record = results_lib.build(
            exp, name=os.path.basename(os.path.normpath(os.path.abspath(workdir))), workdir=workdir, step=step,
            metrics=scalars, best=meta.get('best', {}), curves=curves, wall_s=float(meta.get('wall_s', 0.0)),
            train_s=float(meta.get('train_s', 0.0)), timed_steps=int(meta.get('timed_steps', 0)),
            skipped_updates=int(meta.get('skipped_updates', 0)))
        record['status'] = 'done' if step >= exp.config.train.steps else 'evaluated'
    writer = lock_lib.holder(workdir)
    if jax.process_index() == 0:
        if writer is not None:
            print(f'{workdir} is being written by {lock_lib.describe(writer)}: results.json is left to it',
                  file=sys.stderr)
        elif old is not None and old['step'] > step:  # the newer checkpoint it describes is damaged
            print(f'{results_lib.RESULTS_FILE} of {workdir} is of step {old["step"]}, newer than the checkpoint '
                  f'evaluated: left as it is', file=sys.stderr)
        else:
            try:
                results_lib.write(workdir, record)
            except OSError as e:
                reason = checkpoint.storage_failure(e) or e.strerror
                print(f'warning: {workdir}: {results_lib.RESULTS_FILE} not updated ({reason})', file=sys.stderr)
    if verbose:
        width = max(map(len, scalars))
        print(f'step {step} of {workdir}:')
        for name, value in sorted(scalars.items()):
            print(f'  {name:<{width}}  {value:.6g}')
    return record
