"""What a model family registers: how to fill its config, build it, count it, decode it.

The trainer, `--describe`, parameter matching and decoding only talk to a family
through this record, so a new family is a new `ModelFamily` and one registry line.
Families receive the model config as a plain dict (resolved: no None left) and the
task's `TaskSpec`; modules receive frozen dataclasses built from it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Mapping

from flaxformer_lite.errors import ConfigError
from flaxformer_lite.spec import TaskSpec

if TYPE_CHECKING:  # only for annotations: the registry record imports no jax (see models/__init__.py)
    import flax.linen as nn

ModelCfg = Mapping[str, Any]

# The model shapes each kind of task can run; `model.arch=auto` picks the first.
# decoder_classifier is a causal stack + pooling + head: the shape a causal language
# model (GPT-style pretraining) fine-tunes into, its stack's parameters where the LM's
# are; encoder_mlm is a bidirectional encoder + vocabulary head for masked-language
# modelling (BERT-style), whose encoder loads into encoder_classifier.
ARCHS_FOR_KIND = {'lm': ('decoder_only',), 'seq2seq': ('encoder_decoder',), 'mlm': ('encoder_mlm',),
                  'classify': ('encoder_classifier', 'decoder_classifier'),
                  'regress': ('encoder_classifier', 'decoder_classifier')}
ARCH_FOR_KIND = {kind: archs[0] for kind, archs in ARCHS_FOR_KIND.items()}


def fail(field: str, message: str):
    """A family's config error: one line naming `model.<field>`."""
    raise ConfigError(f'model.{field}: {message}')


def fill(model: Mapping[str, Any], defaults: Mapping[str, Any], size: Mapping[str, Any],
         choices: Mapping[str, tuple], spec: TaskSpec, *,
         renamed: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, Any]:
    """The steps every family's `resolve` starts with: unset fields take the family's
    defaults and the size row's values, named choices are checked, and `arch=auto`
    becomes the shape the task needs (any other shape must be that one). `renamed`
    ({field: {old value: new value}}) names the value that replaced an old one."""
    for key, names in (renamed or {}).items():
        old = model.get(key)
        if isinstance(old, str) and old in names:
            fail(key, f"'{old}' is now called '{names[old]}'; use model.{key}={names[old]}")
    m = dict(model)
    for key, value in {**defaults, **size}.items():
        if m.get(key) is None:
            m[key] = value
    for key, allowed in choices.items():
        if m[key] not in allowed:
            fail(key, f"'{m[key]}' is not one of {', '.join(allowed)}")
    possible = ARCHS_FOR_KIND[spec.kind]
    if m['arch'] == 'auto':
        m['arch'] = possible[0]
    elif m['arch'] not in possible:
        fail('arch', f"{m['arch']} cannot run a '{spec.kind}' task; use model.arch=auto ({possible[0]})"
             + (f" or {' or '.join(possible[1:])}" if len(possible) > 1 else ''))
    return m


@dataclasses.dataclass(frozen=True)
class StepFns:
    """Autoregressive decoding of any model: `init(params, batch) -> state` (encode the
    inputs, start an empty cache or carry) and `step(params, state, tokens_B) ->
    (logits_BV, state)` (feed one token per sequence). Both are pure and jittable.
    Every array in `state` with a leading batch axis is reordered by beam search."""
    init: Callable[..., Any]
    step: Callable[..., Any]
    # (key path, leaf, B * beams) -> the leaf's batch axis or None; for beam search over
    # states whose batch axis is not the leading one (e.g. caches of scanned layers).
    batch_axis_of: Callable[..., Any] | None = None


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    name: str
    # (model config dict, size-table row, task spec) -> resolved config dict; raises
    # ConfigError for configurations that cannot work.
    resolve: Callable[[dict[str, Any], Mapping[str, Any], TaskSpec], dict[str, Any]]
    # (resolved config, spec) -> module with __call__(batch, *, train) -> outputs:
    # lm/seq2seq/mlm logits [B, T, V], classify logits [B, C], regress predictions [B].
    build: Callable[[ModelCfg, TaskSpec], nn.Module]
    # analytic parameter counts: {'total', 'embedding', 'non_embedding'}
    count_params: Callable[[ModelCfg, TaskSpec], dict[str, int]]
    # training FLOPs (forward + backward) for one example of the task
    flops_per_example: Callable[[ModelCfg, TaskSpec], float]
    # (resolved config, spec) -> StepFns, for generative shapes (lm, seq2seq)
    decoder: Callable[[ModelCfg, TaskSpec], StepFns] | None = None
    # (resolved config, spec) -> floats of state a sequence carries: {'fixed': per sequence
    # (recurrent carries, whatever the length), 'per_token': growing with every token (a
    # KV cache)}, optionally 'per_source_token' (what a seq2seq decoder attends over).
    # The quantity Zoology (Arora et al. 2023) relates to recall; `--describe` prints it.
    state_size: Callable[[ModelCfg, TaskSpec], dict[str, int]] | None = None
    # The model field holding the width muP scales by (`models/mup.py`): the Transformer's
    # d_model, the recurrent and fixed-state families' hidden.
    width_field: str = 'hidden'
