"""Runs for tests/test_parallel.py in a fresh process with 8 fake CPU devices
(XLA_FLAGS must be set before JAX starts, hence a separate process).

    python tests/parallel_scenarios.py OUTDIR [MODEL]

Prints one JSON object: {run name: {step: train loss}, 'bytes': {...}}.
"""

import json
import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from conftest import read_scalars, tiny_config  # noqa: E402
from flaxformer_lite import experiment, parallel  # noqa: E402
from flaxformer_lite.train import loop, train_and_evaluate  # noqa: E402

MESHES = {
    'one': dict(mesh__num_devices=1),
    'dp': dict(mesh__data=8),
    'fsdp': dict(mesh__data=1, mesh__fsdp=8),
    'tp': dict(mesh__data=4, mesh__tensor=2),
    'fsdp_tp': dict(mesh__data=2, mesh__fsdp=2, mesh__tensor=2),
}
RUN = dict(train__steps=5, optim__decay_steps=10, train__log_every=1, eval__every_steps=5, checkpoint__every_steps=5,
           model__dropout=0.1)


def losses(workdir):
    return read_scalars(workdir)['train/loss']


def main(outdir: str, model: str) -> dict:
    out = {}
    if model != 'transformer':  # a width that splits over tensor=2 and fsdp=8
        RUN['model__hidden'] = 32
    for name, mesh in MESHES.items():
        workdir = os.path.join(outdir, name)
        train_and_evaluate(experiment.resolve(tiny_config(model=model, **RUN, **mesh)), workdir, verbose=False)
        out[name] = losses(workdir)
    # Continue the fsdp_tp run under dp (resharding on restore), and compare with a run
    # that stays under fsdp_tp for all 10 steps.
    switched = os.path.join(outdir, 'fsdp_tp')
    train_and_evaluate(experiment.resolve(tiny_config(model=model, **{**RUN, 'train__steps': 10}, **MESHES['dp'])),
                       switched, verbose=False)
    out['switched'] = losses(switched)
    straight = os.path.join(outdir, 'straight')
    train_and_evaluate(experiment.resolve(tiny_config(model=model, **{**RUN, 'train__steps': 10},
                                                      **MESHES['fsdp_tp'])), straight, verbose=False)
    out['straight'] = losses(straight)
    # Bytes of parameters on each device under FSDP over 8 devices vs one device.
    for name in ('one', 'fsdp'):
        wider = dict(model__d_model=64, model__d_ff=128) if model == 'transformer' else dict(model__hidden=64)
        exp = experiment.resolve(tiny_config(model=model, **wider, **MESHES[name]))
        setup = loop.build(exp)
        with jax.set_mesh(setup.mesh):
            state = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)()
        out[f'bytes_{name}'] = parallel.per_device_bytes(state.params)
    return out


def gradient_error(model: str, mesh: dict) -> float:
    """Largest difference between the gradients on one device and on `mesh`, relative
    to the largest gradient (the same parameters and batch on both)."""
    import flax.linen as nn
    import numpy as np
    from flaxformer_lite import data
    from flaxformer_lite.train import losses
    grads = []
    for layout in (MESHES['one'], mesh):
        extra = {} if model == 'transformer' else {'model__hidden': 32}
        exp = experiment.resolve(tiny_config(model=model, **extra, **layout))
        setup = loop.build(exp)
        batch = next(data.train_iterator(exp.task, batch_size=exp.config.train.batch_size, seed=0))
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
            state = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)()
            batch = data.to_global(batch, setup.batch_sharding)

            def loss(params):
                return losses.metric_sums(setup.model.apply({'params': params}, batch), batch, exp.spec.kind)[0]
            grads.append(jax.device_get(jax.jit(jax.grad(loss))(state.params)))
    one, other = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in grads)
    return float(np.abs(one - other).max() / np.abs(one).max())


if __name__ == '__main__':
    model = sys.argv[2] if len(sys.argv) > 2 else 'transformer'
    result = main(sys.argv[1], model)
    for other in (['rnn', 'gru'] if model == 'lstm' else []) + [model]:
        result[f'gradient_error_{other}'] = gradient_error(other, MESHES['fsdp_tp'])
    print(json.dumps(result))
