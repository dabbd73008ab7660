"""muP's coordinate check: is each layer's activation scale flat in width after training?

    python3 experiments/coord_check.py                        # the Transformer, sp and mup
    python3 experiments/coord_check.py --family=lstm --steps=5 --learning_rate=3e-2

Models of widths base x1, x2, x4, x8 (`--base`, default 16; 2 layers, d_ff = 4 d_model, a
fixed head count, so the head dimension grows with the width) take a few Adam steps at one
learning rate on one fixed batch of `text_lm` bytes, through the project's own train step
and optimizer; then one forward pass records the mean absolute value of each layer's
outputs (microsoft/mup's `coord_check`, its `l1`). Under a correct muP every row is flat
in width (models/mup.py); under the standard parametrisation the outputs of hidden layers
and the logits grow with it, the defect muP removes (Yang et al. 2022, "Tensor Programs V",
Figure 5). tests/test_mup.py asserts both on the Transformer.

Rows: `embed` (token embedding and positions), per layer the mixer's output (`attn`, or
the family's `mixer`), the feed-forward's (`mlp`) and the residual stream after the layer
(`out`); for the Transformer the attention logits q.k * scale before the mask
(`attn_logits`), and `logits`. Recurrent families have one row per layer (its states).

Measured with the defaults (widths 16..128, 4 steps at 1e-2), x8 / x1 of each row:
  transformer  sp: logits 3.7, attn 4.9 and 6.2, mlp 8.0 and 7.4, attention logits 4.7
               and 3.2; mup: 0.59 to 1.16 for every row but the attention logits (0.45,
               0.29: muP's 1/d starts them at O(1/sqrt(width)), a transient microsoft/mup's
               README describes, removable by zero-initialised queries)
  lstm         sp: logits 7.3, states 1.8 and 2.2 (tanh-bounded); mup: 0.54 to 1.09
  mamba        sp: mixer outputs 49 and 22, logits 2.5; mup: 0.47 to 1.43
  mingru       sp: logits 3.8, mlp 6.5 and 7.4; mup: 0.57 to 1.25
  linear_attn  sp: logits 3.6, mlp 7.1 and 9.1; mup: 0.56 to 1.16
Under mup the logits drift down (0.47 to 0.59): the tied readout starts at
O(1/sqrt(width)) (models/mup.py) and four steps have not yet made up for it. A flat check
is necessary, not sufficient, for transfer: for Mamba it says nothing of the SSM's own
state, where Vankadara et al. (2024) find plain muP fails.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))

from flaxformer_lite import config as config_lib  # noqa: E402
from flaxformer_lite import resolve  # noqa: E402
from flaxformer_lite.models import mup  # noqa: E402
from flaxformer_lite.train import optimizer, step as step_lib  # noqa: E402
from flaxformer_lite.train.state import TrainState  # noqa: E402

MULTIPLES = (1, 2, 4, 8)
NUM_HEADS = 2  # fixed: the head dimension grows with the width (the 1/d attention rule has something to do)


def make_config(family: str, width: int, parametrization: str, base: int, steps: int, learning_rate: float,
                batch: int = 8, seq_len: int = 32):
    """A text_lm config at `width`: constant learning rate, no warmup, decay or clipping
    (nothing but the parametrisation differs between widths)."""
    fields = {'model.name': family, 'model.num_layers': 2, 'task.seq_len': seq_len, 'train.batch_size': batch,
              'train.steps': steps, 'optim.learning_rate': learning_rate, 'optim.schedule': 'constant',
              'optim.warmup_steps': 0, 'optim.weight_decay': 0.0, 'optim.grad_clip': 0.0,
              'optim.parametrization': parametrization, 'optim.base_width': base}
    if family == 'transformer':
        fields.update({'model.d_model': width, 'model.num_heads': NUM_HEADS, 'model.d_ff': 4 * width})
    else:
        fields.update({'model.hidden': width, 'model.width_multiple': 1})
        if family == 'linear_attention':
            fields['model.num_heads'] = NUM_HEADS
    cfg = config_lib.base_config('text_lm')
    for key, value in fields.items():
        config_lib.set_field(cfg, key, value)
    cfg.lock()
    return cfg


def _l1(x: Any) -> float:
    return float(jnp.mean(jnp.abs(jnp.asarray(x, jnp.float32))))


def _rows(exp, logits, inter) -> dict[str, float]:
    """{row: mean |activation|} from one forward pass's outputs and intermediates."""
    def out(*path):
        node = inter
        for key in path:
            node = node[key]
        value = node['__call__'][0]
        return value[0] if isinstance(value, tuple) else value  # a recurrent layer returns (states, carry)

    m = exp.model_cfg
    rows = {}
    if exp.family.name == 'transformer':
        rows['embed'] = _l1(out('embedder'))
        for i in range(m['num_layers']):
            layer = ('decoder', f'layer_{i}')
            attn = layer + ('self_attention',)
            q, k = out(*attn, 'query'), out(*attn, 'key')
            q = q * mup.query_multiplier(m['d_model'], m.get('mup_base_width')) / np.sqrt(q.shape[-1])
            rows[f'{i}.attn_logits'] = _l1(jnp.einsum('bthk,bshk->bhts', q, k))
            rows[f'{i}.attn'] = _l1(out(*attn))
            rows[f'{i}.mlp'] = _l1(out(*layer, 'mlp'))
            rows[f'{i}.out'] = _l1(out(*layer))
    elif 'layers_0' in inter:  # the fixed-state families
        rows['embed'] = _l1(out('embed'))
        for i in range(m['num_layers']):
            rows[f'{i}.mixer'] = _l1(out(f'layers_{i}', 'mixer'))
            if m['mlp_expand']:
                rows[f'{i}.mlp'] = _l1(out(f'layers_{i}', 'mlp'))
            rows[f'{i}.out'] = _l1(out(f'layers_{i}'))
    else:  # rnn, lstm, gru: the layers' states (the embedding may be folded into layer 0's product)
        for i in range(m['num_layers']):
            rows[f'{i}.out'] = _l1(out('stack', f'fwd_{i}'))
    rows['logits'] = _l1(logits)
    return rows


def measure(family: str, width: int, parametrization: str, base: int, steps: int, learning_rate: float,
            seed: int = 0) -> dict[str, float]:
    """Initialise, train `steps` Adam steps on one fixed batch (the project's train step
    and optimizer), and measure each row: one program, compiled without XLA's backend
    optimisations (it runs once; as `train/setup.py`'s init)."""
    cfg = make_config(family, width, parametrization, base, steps, learning_rate)
    exp = resolve.from_config(cfg)
    model = exp.family.build(exp.model_cfg, exp.spec)
    examples = [exp.task.example('train', i) for i in range(cfg.train.batch_size)]
    batch = {k: jnp.asarray(np.stack([e[k] for e in examples])) for k in examples[0]}
    tx, lr = optimizer.make(cfg.optim, steps, width=exp.model_cfg[exp.family.width_field])
    train_step = step_lib.make_train_step(model, tx, lr, exp.spec.kind, label_smoothing=0.0, seed=seed)
    inputs = optimizer.step_inputs(cfg.optim)

    def run(rng, batch, inputs):
        params = nn.unbox(model.init({'params': rng}, batch)['params'])
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
        state = jax.lax.fori_loop(0, steps, lambda _, s: train_step(s, batch, inputs)[0], state)
        logits, variables = model.apply({'params': state.params}, batch, capture_intermediates=True,
                                        mutable=['intermediates'])
        return logits, variables['intermediates']

    options = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None
    compiled = jax.jit(run).lower(jax.random.key(seed), batch, inputs).compile(compiler_options=options)
    return _rows(exp, *compiled(jax.random.key(seed), batch, inputs))


def coord_check(family: str = 'transformer', parametrization: str = 'mup', base: int = 16, steps: int = 4,
                learning_rate: float = 1e-2, multiples: Sequence[int] = MULTIPLES) -> dict[str, list[float]]:
    """{row: [mean |activation| at base * k for k in multiples]}."""
    by_width = [measure(family, base * k, parametrization, base, steps, learning_rate) for k in multiples]
    return {row: [r[row] for r in by_width] for row in by_width[0]}


def table(results: dict[str, list[float]], widths: Sequence[int], title: str) -> str:
    """The rows with one column per width and the ratio of the widest to the narrowest."""
    lines = [title, f"{'':>16}" + ''.join(f'{w:>10}' for w in widths) + f"{'x' + str(widths[-1] // widths[0]):>9}"]
    for row, values in results.items():
        lines.append(f'{row:>16}' + ''.join(f'{v:10.3g}' for v in values) + f'{values[-1] / values[0]:9.2f}')
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--family', default='transformer')
    p.add_argument('--base', type=int, default=16)
    p.add_argument('--steps', type=int, default=4)
    p.add_argument('--learning_rate', type=float, default=1e-2)
    p.add_argument('--parametrizations', default='sp,mup')
    a = p.parse_args(argv)
    widths = [a.base * k for k in MULTIPLES]
    out = {}
    for name in a.parametrizations.split(','):
        out[name] = coord_check(a.family, name, a.base, a.steps, a.learning_rate)
        print(table(out[name], widths, f'{a.family}, {name} (base width {a.base}), mean |activation| after '
                                       f'{a.steps} Adam steps at learning rate {a.learning_rate:g}'))
        print()
    return out


if __name__ == '__main__':
    main(sys.argv[1:])
