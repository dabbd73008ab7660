"""AdamW with warmup and a decay schedule, global-norm clipping, decay masked to matrices."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax


def schedule(optim: Mapping[str, Any], train_steps: int) -> optax.Schedule:
    """Linear warmup to the peak, then cosine (to end_learning_rate_ratio * peak at
    decay_steps, default train.steps), constant, or the paper's inverse square root."""
    peak, warmup = optim['learning_rate'], int(optim['warmup_steps'])
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


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: not on biases, norm scales or other vectors."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make(optim: Mapping[str, Any], train_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    lr = schedule(optim, train_steps)
    parts = []
    if optim['grad_clip'] > 0:
        parts.append(optax.clip_by_global_norm(optim['grad_clip']))
    parts.append(optax.adamw(lr, b1=optim['b1'], b2=optim['b2'], eps=optim['eps'],
                             weight_decay=optim['weight_decay'], mask=_decay_mask))
    return optax.chain(*parts), lr
