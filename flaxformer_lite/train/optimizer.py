"""AdamW with warmup and a decay schedule, global-norm clipping, weight decay by parameter role.

The peak learning rate is an input of the compiled train step, not a constant in it: the
schedule here has peak 1 and the optimizer's last transformation multiplies the update by
the peak it is given (`tx.update(..., learning_rate=x)`). Runs that differ only in their
learning rate (a tuning grid) or their seed therefore share one compiled program, which a
sweep's persistent compilation cache serves to every trial after the first. The update is
AdamW's with a learning rate of `peak * shape(step)`, decoupled weight decay included.

Under `optim.parametrization=mup` (models/mup.py) the Adam direction of every hidden matrix
(HIDDEN) is multiplied by base_width / width before the decay is added, so the decay stays
`weight_decay * peak * shape(step)` for every parameter (as microsoft/mup's MuAdamW, whose
lr * wd is the same for every parameter group). The multipliers are Python floats fixed by
the parameter tree: the peak stays the step's only learning-rate input.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax


# The hyperparameters that are inputs of the train step (float32 scalars), by config field.
STEP_INPUTS = {'learning_rate': 'optim.learning_rate'}


def step_inputs(optim: Mapping[str, Any]) -> dict[str, float]:
    """{'learning_rate': peak}: the values the loop gives the compiled step."""
    return {name: float(optim[field.split('.')[-1]]) for name, field in STEP_INPUTS.items()}


def schedule(optim: Mapping[str, Any], train_steps: int, peak: float = 1.0) -> optax.Schedule:
    """The learning rate's shape with peak `peak` (default 1: multiplied by the step's
    input): linear warmup to the peak, then cosine (to end_learning_rate_ratio * peak at
    decay_steps, default train.steps), constant, or the paper's inverse square root."""
    warmup = int(optim['warmup_steps'])
    kind = optim['schedule']
    if kind == 'cosine':
        decay = int(optim['decay_steps'] or train_steps)
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=peak, warmup_steps=warmup, decay_steps=max(decay, warmup + 1),
            end_value=peak * optim['end_learning_rate_ratio'])
    if kind == 'constant':
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
                                    [warmup])
    if kind == 'rsqrt':  # Vaswani et al. 5.3, with `peak` reached at the end of warmup
        w = max(warmup, 1)

        def rsqrt(step):
            step = jnp.maximum(step, 1).astype(jnp.float32)
            return peak * jnp.minimum(step / w, jnp.sqrt(w / step))
        return rsqrt
    raise ValueError(f'unknown schedule {kind}')


# Weight decay by a parameter's role, read from its name (the last key of its path), so
# that `nn.scan` stacking a norm scale into [layers, D] or a gate bias being [gates, H]
# changes nothing. The one place this is decided:
#   decayed:     weights that multiply activations or are looked up: Dense kernels, the
#                recurrent input/recurrent kernels, attention projections (Bahdanau's v
#                is the kernel of a projection to one score), embedding and position tables;
#                Mamba's depthwise conv_kernel (a weight that multiplies activations, as
#                a Dense kernel does);
#   not decayed: additive biases (the LSTM forget-gate bias of 1 included, the GRU
#                candidate's b_hn, Mamba's conv_bias and dt_bias: Delta's range is set by
#                its init), norm scales / offsets, and Mamba's A_log (the decay rates: decay
#                would pull A towards -1 in every channel) and D (a skip gain).
DECAYED = frozenset({'kernel', 'embedding', 'pos_embedding', 'w_ih', 'w_hh', 'w_q', 'w_k', 'v', 'conv_kernel'})
NOT_DECAYED = frozenset({'bias', 'b_hn', 'scale', 'conv_bias', 'dt_bias', 'A_log', 'D'})


def decay_mask(params: Any) -> Any:
    """A tree of bools: True where AdamW applies weight decay (see DECAYED). A parameter
    name in neither set is a new kind of parameter: deciding its role is required, so it
    fails loudly instead of silently decaying (or not)."""
    def role(path, _):
        name = getattr(path[-1], 'key', getattr(path[-1], 'name', None))
        if name in DECAYED:
            return True
        if name in NOT_DECAYED:
            return False
        raise ValueError(f'parameter {jax.tree_util.keystr(path)}: add {name!r} to DECAYED or NOT_DECAYED '
                         f'in train/optimizer.py')
    return jax.tree_util.tree_map_with_path(role, params)


# muP's Adam learning rate by a parameter's role (models/mup.py), read from its name as
# the decay above is:
#   hidden (x base_width / width): matrices whose fan-in and fan-out both grow with the
#            width: Dense kernels (attention, feed-forward, the fixed-state mixers'
#            projections), the recurrent w_ih and w_hh, Bahdanau's w_q and w_k;
#   base rate: the embedding and position tables (input weights), vectors (NOT_DECAYED),
#            Bahdanau's v and Mamba's depthwise conv_kernel (one weight per channel), and
#            the Dense kernels of the modules in NOT_HIDDEN_MODULES: the readouts (`head`,
#            `logits`: their 1/m is a forward multiplier, MuReadout's) and linear
#            attention's `gate_up` (fan-in GATE_RANK, fixed: an input weight).
HIDDEN = frozenset({'kernel', 'w_ih', 'w_hh', 'w_q', 'w_k'})
BASE_RATE = frozenset({'embedding', 'pos_embedding', 'v', 'conv_kernel'}) | NOT_DECAYED
NOT_HIDDEN_MODULES = frozenset({'head', 'logits', 'gate_up'})


def _key(entry) -> Any:
    return getattr(entry, 'key', getattr(entry, 'name', None))


def is_hidden(path) -> bool:
    """Whether the parameter at `path` (a key path) is a hidden matrix under muP. A name
    in neither HIDDEN nor BASE_RATE must be given a role (ValueError), as in decay_mask."""
    name = _key(path[-1])
    if name in HIDDEN:
        return not (len(path) > 1 and _key(path[-2]) in NOT_HIDDEN_MODULES)
    if name in BASE_RATE:
        return False
    raise ValueError(f'parameter {jax.tree_util.keystr(path)}: add {name!r} to HIDDEN or BASE_RATE in '
                     f'train/optimizer.py')


def lr_multipliers(params: Any, hidden: float) -> Any:
    """A tree of Python floats like `params`: `hidden` (base_width / width) for hidden
    matrices, 1.0 for the rest (see HIDDEN)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: hidden if is_hidden(path) else 1.0, params)


def scale_hidden(hidden: float) -> optax.GradientTransformation:
    """Multiplies the updates of hidden matrices by `hidden`; a multiplier of 1 (muP at
    its base width) leaves them as they are."""
    def update(updates, state, params=None):
        del params
        def scale(path, u):
            return (u * hidden).astype(u.dtype) if hidden != 1.0 and is_hidden(path) else u
        return jax.tree_util.tree_map_with_path(scale, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def scale_by_peak(default: float) -> optax.GradientTransformationExtraArgs:
    """Multiplies the update by `learning_rate`, given to `update` as an extra argument
    (an array: the step's input), or by `default` (the configured peak, a constant) when
    none is given."""
    def update(updates, state, params=None, *, learning_rate=None, **extra):
        del params, extra
        peak = default if learning_rate is None else learning_rate
        return jax.tree.map(lambda u: (u * peak).astype(u.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def make(optim: Mapping[str, Any], train_steps: int, frozen: Any | None = None, width: int | None = None
         ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW as configured, and the schedule's shape (peak 1). `frozen`: a tree of bools
    like the parameters (`train.freeze`): those parameters get zero updates (no decay
    either) and no optimizer moments, and the clipping norm is that of the trained
    parameters' gradients alone. `width`: the model's width (`ModelFamily.width_field`),
    which optim.parametrization=mup scales hidden matrices' rates by (base_width / width)."""
    lr = schedule(optim, train_steps)
    parts = []
    if optim['grad_clip'] > 0:
        parts.append(optax.clip_by_global_norm(optim['grad_clip']))
    if optim.get('parametrization', 'sp') == 'mup':
        if width is None:
            raise ValueError("optim.parametrization=mup: give make() the model's width")
        parts.append(optax.chain(  # optax.adamw's chain with muP's multipliers before the decay
            optax.scale_by_adam(b1=optim['b1'], b2=optim['b2'], eps=optim['eps']),
            scale_hidden(optim['base_width'] / width),
            optax.add_decayed_weights(optim['weight_decay'], decay_mask),
            optax.scale_by_learning_rate(lr)))
    else:
        parts.append(optax.adamw(lr, b1=optim['b1'], b2=optim['b2'], eps=optim['eps'],
                                 weight_decay=optim['weight_decay'], mask=decay_mask))
    parts.append(scale_by_peak(step_inputs(optim)['learning_rate']))
    tx = optax.chain(*parts)
    if frozen is not None:
        labels = jax.tree.map(lambda f: 'frozen' if f else 'trained', frozen)  # a tree, not a function of
        tx = optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)  # params: sharding needs it
    return tx, lr
