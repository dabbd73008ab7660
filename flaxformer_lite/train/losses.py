"""Losses and metric sums for every task kind, from model outputs and a batch.

Everything is returned as sums (and the weight they are over) so that evaluation can
add batches and hosts before dividing. The softmax of the output layer lives here, in
log-space, in float32.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax

Metrics = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-target loss. With label smoothing the targets are (1 - eps) on the answer and
    eps / (V - 1) elsewhere, minus that distribution's entropy so a perfect fit is 0."""
    logits = logits.astype(jnp.float32)
    if label_smoothing == 0.0:
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    vocab = logits.shape[-1]
    confidence, low = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
    soft = jax.nn.one_hot(targets, vocab) * (confidence - low) + low
    entropy = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
    return optax.softmax_cross_entropy(logits, soft) - entropy


def metric_sums(outputs: jax.Array, batch: Mapping[str, jax.Array], kind: str,
                label_smoothing: float = 0.0) -> tuple[jax.Array, Metrics]:
    """(objective = mean training loss over weighted targets, metric sums).

    Sums: loss (plain negative log-likelihood, or squared error), correct, weight; for
    sequences also seq_correct / seq_count (all weighted tokens right, teacher-forced)
    and loss_by_position / weight_by_position (summed over the batch)."""
    targets, weights = batch['targets'], batch['weights'].astype(jnp.float32)
    if kind == 'regress':
        err = (outputs.astype(jnp.float32) - targets.astype(jnp.float32)) ** 2 * weights
        total = weights.sum()
        return err.sum() / jnp.maximum(total, 1.0), dict(loss=err.sum(), weight=total)
    nll = cross_entropy(outputs, targets)
    objective = nll if label_smoothing == 0.0 else cross_entropy(outputs, targets, label_smoothing)
    correct = (outputs.argmax(-1) == targets).astype(jnp.float32) * weights
    total = weights.sum()
    sums = dict(loss=(nll * weights).sum(), correct=correct.sum(), weight=total)
    if kind in ('lm', 'seq2seq', 'mlm'):
        has = weights.sum(-1) > 0
        all_right = ((correct == weights) | (weights == 0)).all(-1)
        sums.update(seq_correct=(all_right & has).sum().astype(jnp.float32), seq_count=has.sum().astype(jnp.float32),
                    loss_by_position=(nll * weights).sum(0), weight_by_position=weights.sum(0))
    return (objective * weights).sum() / jnp.maximum(total, 1.0), sums


def summarize(sums: Mapping[str, jax.Array | float], kind: str) -> dict[str, float]:
    """Metric sums (added over batches) -> the scalars that are logged."""
    w = max(float(sums['weight']), 1e-9)
    if kind == 'regress':
        return {'loss': float(sums['loss']) / w, 'mse': float(sums['loss']) / w}
    out = {'loss': float(sums['loss']) / w, 'accuracy': float(sums['correct']) / w}
    if 'seq_count' in sums:
        out['seq_accuracy'] = float(sums['seq_correct']) / max(float(sums['seq_count']), 1e-9)
    if 'exact_match' in sums:
        out['exact_match'] = float(sums['exact_match']) / max(float(sums['seq_count']), 1e-9)
    return out
