"""What the fixed-state families (linear_attention, mamba, mingru) share as registry entries:
config resolution with parameter matching, building, analytic counts, FLOPs, decoding
and the state size. A family is a `Mixer` (its module and its per-layer numbers)
turned into a `ModelFamily` by `make_family`.

Width matching, as for rnn, lstm and gru (`recurrent_family.matched_width`): when
`model.hidden` is unset, the width whose non-embedding count lands closest to the
Transformer of the same `model.size`, a multiple of the mixer's quantum (e.g. the head
count) and of `model.width_multiple` (unset: 8, or at small widths where no multiple of 8
lands within the tolerance, 4 or 2: mamba's micro width is 36); depth is the row's
`num_layers`. `--describe` prints the ratio.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

from flaxformer_lite.models import family, knobs, recurrent_family
from flaxformer_lite.models.family import ModelFamily, StepFns
from flaxformer_lite.models.fixed_state import FixedStateClassifier, FixedStateConfig, FixedStateLM
from flaxformer_lite.spec import TaskSpec

COMMON_DEFAULTS = dict(dropout=0.0, pooling='mean', share_embeddings=True, scale_embeddings=True, dtype='float32',
                       arch='auto', hidden=None, width_multiple=None, ffn='relu', norm='layernorm', mlp_expand=4)
COMMON_CHOICES = dict(pooling=('mean', 'first', 'last'), dtype=('float32', 'bfloat16'), ffn=('relu', 'gelu', 'swiglu'),
                      norm=('layernorm', 'rmsnorm'),
                      arch=('auto', 'decoder_only', 'encoder_decoder', 'encoder_classifier', 'decoder_classifier'))


@dataclasses.dataclass(frozen=True)
class Mixer:
    """A family's sequence mixer and its per-layer numbers (all from a FixedStateConfig)."""
    name: str
    module: type  # nn.Module class: (cfg) -> __call__ / step / zero_state (see models/fixed_state.py)
    param_count: Callable[[FixedStateConfig], int]  # parameters of one mixer
    forward_macs: Callable[[FixedStateConfig], int]  # multiply-accumulates per token of one mixer
    state_floats: Callable[[FixedStateConfig], int]  # recurrent state of one mixer, per sequence
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # beyond its knobs' (models/knobs.py)
    choices: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
    positive: tuple[str, ...] = ()  # integer fields that must be >= 1
    quantum: Callable[[Mapping[str, Any]], int] = lambda m: 1  # the width must be a multiple of this
    check: Callable[[dict[str, Any], TaskSpec], None] = lambda m, spec: None  # the family's own checks
    renamed: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)  # see family.fill


def _positive_int(m: Mapping[str, Any], key: str, minimum: int = 1) -> None:
    value = m[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        family.fail(key, f'must be an integer >= {minimum} (got {value!r})')


def resolve(mixer: Mixer, model: dict[str, Any], size: Mapping[str, Any], spec: TaskSpec) -> dict[str, Any]:
    """Fill unset fields, check them, pick the shape from the task and, when
    `model.hidden` is unset, the matched width. Raises ConfigError naming the field."""
    defaults = {**COMMON_DEFAULTS, **knobs.defaults(mixer.name), **mixer.defaults}
    m = family.fill(model, defaults, size, {**COMMON_CHOICES, **mixer.choices}, spec, renamed=mixer.renamed)
    if m['arch'] == 'encoder_decoder':
        family.fail('arch', f"model.name={mixer.name} has no encoder_decoder shape: a causal state-passing stack "
                    f"would carry the source through its padding into the target; for '{spec.kind}' tasks use "
                    f"model.name=transformer (or lstm, gru, rnn), or pose the task as a language model")
    if m['arch'] == 'encoder_mlm':
        family.fail('arch', f"masked-language modelling (task.objective=mlm) needs model.name=transformer (its "
                            f"encoder_mlm shape); {mixer.name} pretrains as a language model (objective=lm)")
    if m['bidirectional']:
        family.fail('bidirectional', f'{mixer.name} reads left to right only; set it to false')
    if m['rnn_attention'] != 'none':
        family.fail('rnn_attention', f"is for recurrent seq2seq models (rnn, lstm, gru), not {mixer.name}; "
                    f"set it to none")
    for key in ('num_layers',) + mixer.positive:
        _positive_int(m, key)
    recurrent_family.check_width_multiple(m['width_multiple'])
    _positive_int(m, 'mlp_expand', minimum=0)
    if not 0.0 <= m['dropout'] < 1.0:
        family.fail('dropout', 'must be in [0, 1)')
    if m['share_embeddings'] and spec.kind == 'lm' and spec.vocab_size != spec.num_outputs:
        family.fail('share_embeddings', f'the task has {spec.vocab_size} input and {spec.num_outputs} output '
                    f'tokens; one shared table needs one vocabulary (set it to false)')
    mixer.check(m, spec)
    quantum = mixer.quantum(m)
    if m['hidden'] is None:
        m['hidden'] = _matched_width(mixer, m, model, size, spec)
    else:
        _positive_int(m, 'hidden')
        if m['hidden'] % quantum:
            family.fail('hidden', f"{m['hidden']} is not a multiple of {quantum} ({mixer.name}'s width quantum, "
                        f"e.g. model.num_heads); pick a multiple or leave it unset")
    return m


def _matched_width(mixer: Mixer, m: dict[str, Any], model: Mapping[str, Any], size: Mapping[str, Any],
                   spec: TaskSpec) -> int:
    target = recurrent_family.matched_transformer_params(model, size, spec)

    def count(h: int) -> int:
        return count_params(mixer, {**m, 'hidden': h}, spec)['non_embedding']

    return recurrent_family.matched_width(count, target, m['width_multiple'], mixer.quantum(m))


def hparams(m: Mapping[str, Any], spec: TaskSpec, **changes) -> FixedStateConfig:
    cfg = FixedStateConfig.from_mapping({**m, 'vocab_size': spec.vocab_size, 'num_outputs': spec.num_outputs,
                                     'pad_id': spec.pad_id, 'bos_id': spec.bos_id})
    return dataclasses.replace(cfg, **changes)


def build(mixer: Mixer, m: Mapping[str, Any], spec: TaskSpec, **changes):
    cfg = hparams(m, spec, **changes)
    if m['arch'] == 'decoder_only':
        return FixedStateLM(cfg, mixer.module)
    return FixedStateClassifier(cfg, mixer.module, regression=spec.kind == 'regress')


def _norm_params(c: FixedStateConfig) -> int:
    return 2 * c.hidden if c.norm == 'layernorm' else c.hidden


def _mlp(c: FixedStateConfig) -> tuple[int, int]:
    """(parameters, multiply-accumulates per token) of the channel mixer."""
    h, f = c.hidden, c.mlp_width
    if not c.mlp_expand:
        return 0, 0
    if c.ffn == 'swiglu':
        return 3 * h * f, 3 * h * f
    return 2 * h * f + f + h, 2 * h * f


def count_params(mixer: Mixer, m: Mapping[str, Any], spec: TaskSpec) -> dict[str, int]:
    """Analytic counts; tests hold them equal to the real parameter trees. As for the
    Transformer, the output projection / head is non-embedding."""
    c = hparams(m, spec)
    h, o = c.hidden, c.num_outputs
    mlp_params = _mlp(c)[0] + (_norm_params(c) if c.mlp_expand else 0)
    body = c.num_layers * (_norm_params(c) + mixer.param_count(c) + mlp_params) + _norm_params(c)
    if m['arch'] == 'decoder_only':
        body += 0 if c.share_embeddings else h * o + o
    else:
        body += h * o + o
    embedding = c.vocab_size * h
    return dict(total=embedding + body, embedding=embedding, non_embedding=body)


def flops_per_example(mixer: Mixer, m: Mapping[str, Any], spec: TaskSpec) -> float:
    """Training FLOPs of one example under `accounting`'s convention: 3x the forward
    matrix products, 2 FLOPs per multiply-accumulate. Per token of the sequence: every
    layer's projections, the mixer's own state products (`Mixer.forward_macs`, which
    counts the recurrent form: see each family's docstring) and the channel mixer; the
    output projection (tied or not) per predicted token; a classifier head per example."""
    c = hparams(m, spec)
    per_token = c.num_layers * (mixer.forward_macs(c) + _mlp(c)[1])
    if m['arch'] == 'decoder_only':
        macs = spec.input_len * (per_token + c.hidden * c.num_outputs)
    else:
        macs = spec.input_len * per_token + c.hidden * c.num_outputs
    return 3.0 * 2.0 * macs


def state_size(mixer: Mixer, m: Mapping[str, Any], spec: TaskSpec) -> dict[str, int]:
    """Floats of recurrent state per sequence: fixed, nothing grows with the length."""
    return dict(fixed=hparams(m, spec).num_layers * mixer.state_floats(hparams(m, spec)), per_token=0)


def decoder(mixer: Mixer, m: Mapping[str, Any], spec: TaskSpec) -> StepFns:
    """Decoding with the fixed-size state: `init` zeroes it, `step` feeds one token.
    Every state array has a leading batch axis (beam search reorders them as they are)."""
    if m['arch'] != 'decoder_only':
        raise ValueError(f"decoding needs an lm task, not {m['arch']}")
    model = build(mixer, m, spec, dropout=0.0)

    def init(params, batch):
        return model.apply({'params': params}, batch, method=FixedStateLM.initial_state)

    def step(params, state, tokens_B):
        return model.apply({'params': params}, state, tokens_B, method=FixedStateLM.step)

    return StepFns(init=init, step=step)


def make_family(mixer: Mixer) -> ModelFamily:
    def bind(fn):
        return functools.partial(fn, mixer)
    return ModelFamily(name=mixer.name, resolve=bind(resolve), build=bind(build), count_params=bind(count_params),
                       flops_per_example=bind(flops_per_example), decoder=bind(decoder), state_size=bind(state_size))
