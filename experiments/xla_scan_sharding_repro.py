"""XLA's SPMD partitioner gets one dot layout wrong on a 2x2x2 mesh, which is why the recurrent
stack does not pin its time-major states. Pure jax, 8 fake CPU devices:

    python experiments/xla_scan_sharding_repro.py      # prints the errors, asserts nothing

Measured with jax/jaxlib 0.10.2, XLA:CPU, Shardy (the default partitioner):
1. scan: an input product and an Elman RNN over a plain `lax.scan` (gradients by autodiff),
   weights sharded ('fsdp', 'tensor'), batch over ('data', 'fsdp'). The gradients match one
   device (~5e-7, largest difference / largest gradient) until the scan outputs are constrained
   to (None, ('data', 'fsdp'), 'tensor'): then ~35% off, the loss still right. No custom VJP
   is involved (flaxformer_lite's fused and plain-scan recurrences are wrong alike). Without the
   input product the unconstrained scan is wrong too: propagation alone reaches the layout.
2. dot: the product the backward step reduces to. d @ w.T, d [B, K] over (('data', 'fsdp'),
   'tensor'), w [N, K] over ('fsdp', 'tensor'), result over (('data', 'fsdp'), 'tensor'): the
   batch blocks of devices (data 0, fsdp 1) and (data 1, fsdp 0) come back swapped (rows
   0 1 4 5 2 3 6 7 instead of 0..7). The partitioner collective-permutes d into (fsdp, data)
   order (pairs {2,4}, {3,5}) and never permutes the result back. Needs all three mesh axes > 1.
   GSPMD (`jax_use_shardy_partitioner=False`) gives the same HLO and the same numbers in both
   parts, so the fault is in the SPMD partitioner's dot handling that both share.
Upstream: no matching report found. The nearest, https://github.com/openxla/xla/issues/40034
(sharded matmul wrong when resharding unreduced axes), is a missing all-reduce; here every
all-reduce is present and rows are permuted. A report should give part 2, the versions, the
HLO after spmd-partitioning (the lone collective-permute) and the GSPMD result.
"""

import json
import os

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jaxlib  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

MESH = jax.make_mesh((2, 2, 2), ('data', 'fsdp', 'tensor'), axis_types=(AxisType.Auto,) * 3)
BATCH = ('data', 'fsdp')


def sharded(*spec):
    return NamedSharding(MESH, P(*spec))


def rel_error(got, want) -> float:
    got, want = (np.concatenate([np.ravel(a) for a in jax.tree.leaves(t)]) for t in (got, want))
    return float(np.abs(got - want).max() / np.abs(want).max())


def rnn_loss(w_DH, w_HH, x_TBD, constrain):
    def step(h, gx):
        h = jnp.tanh(gx + h @ w_HH)
        return h, h
    y_TBH = jax.lax.scan(step, jnp.zeros(x_TBD.shape[1:]), x_TBD @ w_DH)[1]
    if constrain:
        y_TBH = jax.lax.with_sharding_constraint(y_TBH, sharded(None, BATCH, 'tensor'))
    return jnp.sum(y_TBH ** 2)


def main() -> dict:
    k = jax.random.split(jax.random.key(0), 3)
    params = [jax.random.normal(k[i], (32, 32)) / 32**0.5 for i in range(2)] + [jax.random.normal(k[2], (16, 16, 32))]
    grad = jax.jit(jax.grad(rnn_loss, argnums=(0, 1, 2)), static_argnums=3)
    want = grad(*params, False)  # one device
    specs = [('fsdp', 'tensor')] * 2 + [(None, BATCH)]
    args = [jax.device_put(a, sharded(*s)) for a, s in zip(params, specs)]
    out = {'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'devices': jax.device_count()}
    with jax.set_mesh(MESH):
        for constrain in (False, True):
            out[f'scan_grad_error_constraint_{constrain}'.lower()] = rel_error(grad(*args, constrain), want)
    d, w = jnp.repeat(jnp.arange(8.0)[:, None], 8, axis=1), jnp.eye(8)  # row i of d holds i; d @ w.T == d
    dot = jax.jit(lambda d, w: d @ w.T, in_shardings=(sharded(BATCH, 'tensor'), sharded('fsdp', 'tensor')),
                  out_shardings=sharded(BATCH, 'tensor'))
    got = dot(d, w)
    out['dot_error'], out['dot_rows'] = rel_error(got, d), np.asarray(got[:, 0]).astype(int).tolist()
    return out


if __name__ == '__main__':
    result = main()
    for key, value in result.items():
        print(f'{key}: {value:.2e}' if isinstance(value, float) else f'{key}: {value}')
    print(json.dumps(result))
