"""Pure step functions: `train_step(state, batch) -> (state, metrics)` and evaluation.

They are jitted once by the loop with shardings and buffer donation; nothing here
touches the host, so the loop never waits for the device between steps.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from flaxformer_lite.models import decoding
from flaxformer_lite.models.family import StepFns
from flaxformer_lite.train import losses
from flaxformer_lite.train.state import TrainState

Batch = Mapping[str, jax.Array]


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, lr: optax.Schedule, kind: str,
                    *, label_smoothing: float, seed: int) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    base_key = jax.random.key(seed)

    def train_step(state: TrainState, batch: Batch):
        # Dropout randomness is a function of (seed, step): a resumed run draws the same.
        rng = jax.random.fold_in(jax.random.fold_in(base_key, 1), state.step)

        def loss_fn(params):
            outputs = model.apply({'params': params}, batch, train=True, rngs={'dropout': rng})
            return losses.metric_sums(outputs, batch, kind, label_smoothing)

        (objective, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(objective=objective, grad_norm=optax.global_norm(grads), learning_rate=lr(state.step),
                       **{k: v for k, v in sums.items() if jnp.ndim(v) == 0})
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(model: nn.Module, kind: str) -> Callable[[Any, Batch], dict]:
    def eval_step(params, batch: Batch):
        outputs = model.apply({'params': params}, batch, train=False)
        return losses.metric_sums(outputs, batch, kind)[1]

    return eval_step


def make_decode_step(step_fns: StepFns, bos_id: int) -> Callable[[Any, Batch], dict]:
    """Exact match of greedy autoregressive output against the weighted targets."""
    def decode_step(params, batch: Batch):
        targets, weights = batch['targets'], batch['weights']
        tokens = decoding.greedy(step_fns, params, batch, length=targets.shape[1], bos_id=bos_id)
        right = ((tokens == targets) | (weights == 0)).all(-1)
        has = weights.sum(-1) > 0
        return dict(exact_match=(right & has).sum().astype(jnp.float32))

    return decode_step
