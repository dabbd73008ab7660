"""Pure step functions: `train_step(state, batch, hparams) -> (state, metrics)` and evaluation.

`setup.jit_train_step` jits the train step once, with shardings and buffer donation, for
the loop and the benchmark alike (one definition, so what is timed is what trains); nothing
here touches the host, so the loop never waits for the device between steps. Numeric faults
are found on device too: the step carries a small `health` record the loop reads only
where it syncs anyway (log steps, before a checkpoint).
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


# The train step's health, carried on device from step to step (no host sync): the first
# step whose loss or gradients were not finite (-1: none), what was bad there (a bit mask:
# 1 the loss, 2 the gradients) and how many updates train.skip_nonfinite skipped.
LOSS_BAD, GRADS_BAD = 1, 2


def initial_health(skipped: int = 0) -> dict[str, jax.Array]:
    return dict(first_bad=jnp.array(-1, jnp.int32), bad_what=jnp.array(0, jnp.int32),
                skipped=jnp.array(skipped, jnp.int32))


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, lr: optax.Schedule, kind: str,
                    *, label_smoothing: float, seed: int, skip_nonfinite: bool = False
                    ) -> Callable[..., tuple]:
    """`train_step(state, batch, hparams, health) -> (state, metrics, health)`. `lr` is the
    schedule's shape (peak 1) and `hparams` the step's inputs, `{'learning_rate': peak}`
    (float32 scalars, `optimizer.step_inputs`), so one compiled step serves every
    learning rate. A step whose loss or
    gradients are NaN or Inf is recorded in `health`; with `skip_nonfinite` its update is
    dropped instead (parameters and optimizer state stay as they were; the step counter,
    and with it the data and the schedule, moves on) and counted in `health['skipped']`.
    Without `health`, `train_step(state, batch, hparams) -> (state, metrics)`."""
    base_key = jax.random.key(seed)

    def train_step(state: TrainState, batch: Batch, hparams: Mapping[str, jax.Array], health: dict | None = None):
        carry = health is not None
        peak = jnp.asarray(hparams['learning_rate'], jnp.float32)
        health = initial_health() if health is None else health
        # Dropout randomness is a function of (seed, step): a resumed run draws the same.
        rng = jax.random.fold_in(jax.random.fold_in(base_key, 1), state.step)

        def loss_fn(params):
            outputs = model.apply({'params': params}, batch, train=True, rngs={'dropout': rng})
            return losses.metric_sums(outputs, batch, kind, label_smoothing)

        (objective, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params, learning_rate=peak)
        params = optax.apply_updates(state.params, updates)
        loss_ok, grads_ok = jnp.isfinite(objective), _all_finite(grads)
        ok = loss_ok & grads_ok
        what = jnp.where(loss_ok, 0, LOSS_BAD) + jnp.where(grads_ok, 0, GRADS_BAD)
        if skip_nonfinite:
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
            health = dict(health, skipped=health['skipped'] + jnp.where(ok, 0, 1).astype(jnp.int32))
        else:
            first = (health['first_bad'] < 0) & ~ok
            health = dict(health, first_bad=jnp.where(first, state.step + 1, health['first_bad']).astype(jnp.int32),
                          bad_what=jnp.where(first, what, health['bad_what']).astype(jnp.int32))
        metrics = dict(objective=objective, grad_norm=optax.global_norm(grads), learning_rate=lr(state.step) * peak,
                       **{k: v for k, v in sums.items() if jnp.ndim(v) == 0})
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        return (new_state, metrics, health) if carry else (new_state, metrics)

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
