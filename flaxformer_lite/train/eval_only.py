"""`launch.py --eval_only --workdir=DIR`: evaluate a trained run again without training.

The latest checkpoint of DIR is restored and the eval and test splits are evaluated as
at the end of training (optionally at other `eval.dependency_lengths`); `results.json`
gets the metrics (added to the ones already there). Only `eval.*` and `mesh.*` may
differ from the run's own config. Nothing else in the workdir is written.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax

from flaxformer_lite.errors import UserError
from flaxformer_lite.experiment import Experiment
from flaxformer_lite.train import checkpoint, results as results_lib
from flaxformer_lite.train.evaluate import Evaluator
from flaxformer_lite.train.setup import build


def evaluate_run(exp: Experiment, workdir: str, *, verbose: bool = True) -> dict[str, Any]:
    """Evaluate the latest checkpoint of `workdir`; returns the updated results record."""
    if not checkpoint.check_workdir(workdir, exp.config.to_dict(), exp.derived):
        raise UserError(f'--eval_only: --workdir={workdir} holds no run; train one there first')
    if not os.path.isdir(os.path.join(workdir, checkpoint.CHECKPOINT_DIR)):
        raise UserError(f'--eval_only: --workdir={workdir} holds no checkpoint yet; run the training command '
                        f'again to make one')
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=exp.config.checkpoint.max_to_keep, async_save=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise UserError(f'--eval_only: --workdir={workdir} holds no checkpoint yet; run the training command '
                            f'again to make one')
        setup = build(exp)
        evaluator = Evaluator(exp, setup)
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
            state, meta = ckpt.restore(step, setup.abstract_state)
            scalars, curves = {}, {}
            for split in ('eval', 'test'):
                more, more_curves = evaluator(state.params, split)
                scalars.update({k: float(v) for k, v in more.items() if '/loss_at_position/' not in k})
                curves.update(more_curves)
    finally:
        ckpt.close()
    old = results_lib.read(workdir) if jax.process_index() == 0 else None
    if old is not None and old.get('step') == step:
        record = dict(old, metrics=dict(sorted({**old.get('metrics', {}), **scalars}.items())))
        record['curves'] = {**old.get('curves', {}),
                            **{f'{p}/loss_by_position': [float(x) for x in c] for p, c in curves.items()}}
    else:  # not finished (or finished before results.json existed): a record of this step
        record = results_lib.build(
            exp, name=os.path.basename(os.path.normpath(os.path.abspath(workdir))), workdir=workdir, step=step,
            metrics=scalars, best=meta.get('best', {}), curves=curves, wall_s=float(meta.get('wall_s', 0.0)),
            train_s=float(meta.get('train_s', 0.0)), timed_steps=int(meta.get('timed_steps', 0)))
        record['status'] = 'done' if step >= exp.config.train.steps else 'evaluated'
    if jax.process_index() == 0:
        results_lib.write(workdir, record)
    if verbose:
        width = max(map(len, scalars))
        print(f'step {step} of {workdir}:')
        for name, value in sorted(scalars.items()):
            print(f'  {name:<{width}}  {value:.6g}')
    return record
