"""RNN, LSTM and GRU as registry entries: config resolution (with parameter matching to
the Transformer of the same `model.size`), building, analytic counts, FLOPs, decoding."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

from flaxformer_lite.models import transformer_family
from flaxformer_lite.models import family
from flaxformer_lite.models.family import ARCH_FOR_KIND, ModelFamily, StepFns
from flaxformer_lite.models.recurrent import (RecurrentClassifier, RecurrentConfig, RecurrentLM,
                                              RecurrentSeq2Seq)
from flaxformer_lite.models.recurrent_cells import CARRY_SIZE, cell_param_count
from flaxformer_lite.tasks.base import TaskSpec

DEFAULTS = dict(dropout=0.0, pooling='mean', bidirectional=False, residual=False, rnn_attention='none',
                unroll=1, share_embeddings=True, scale_embeddings=True, dtype='float32', arch='auto',
                encoder_layers=None, hidden=None)
CHOICES = dict(pooling=('mean', 'first', 'last'), rnn_attention=('none', 'bahdanau', 'luong'),
               dtype=('float32', 'bfloat16'), arch=('auto',) + tuple(sorted(set(ARCH_FOR_KIND.values()))))
# Relative tolerance within which the matched width is rounded to a multiple of 8
# (shardable over up to 8 tensor-parallel devices); the contract is 5%.
MATCH_ROUNDING = 0.025


def matched_transformer_params(model: Mapping[str, Any], size: Mapping[str, Any], spec: TaskSpec) -> int:
    """Non-embedding parameters of the Transformer this config would build with
    model.name=transformer, in the shape the task needs (the target of the matching).
    Knobs that cannot change that count (positions, attention kernels) are reset, so
    that a recurrent config never fails on Transformer-only checks."""
    t = {'num_kv_heads': None, 'encoder_layers': None, 'norm': 'layernorm', 'ffn': None,
         'norm_position': None, 'share_embeddings': True, 'scale_embeddings': True, 'dropout': None,
         'num_layers': None, 'd_model': None, 'num_heads': None, 'd_ff': None}
    t.update({k: v for k, v in model.items() if k in t})  # the knobs that shape the count
    t.update(arch='auto', max_len=None, pos_encoding=None, attention_impl='einsum', attention_dropout=0.0,
             attention_block_size=128, pooling='mean')
    resolved = transformer_family.resolve(t, size, spec)
    return transformer_family.count_params(resolved, spec)['non_embedding']


def match_hidden(count: Callable[[int], int], target: int) -> int:
    """The width whose count is closest to `target` (count is increasing in the width);
    the closest multiple of 8 instead when it is within MATCH_ROUNDING."""
    lo, hi = 1, 1
    while count(hi) < target:
        hi *= 2
    while lo < hi:  # smallest width with count >= target
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(mid) < target else (lo, mid)
    def error(h: int) -> float:
        return abs(count(h) - target) / target

    best = min((h for h in (lo - 1, lo) if h >= 1), key=error)
    eights = [h for h in (8 * (lo // 8), 8 * (lo // 8 + 1)) if h >= 8]
    rounded = min(eights, key=error) if eights else best
    return rounded if error(rounded) <= MATCH_ROUNDING else best


def resolve(cell: str, model: dict[str, Any], size: Mapping[str, Any], spec: TaskSpec) -> dict[str, Any]:
    """Fill unset fields (defaults, then the size row's), pick the shape from the task,
    and, when `model.hidden` is unset, the width matched to the Transformer of the same
    size (`matched_transformer_params`); depth is the row's `num_layers`. Adds no keys:
    the cell is the family's (bound by `_family`). Raises ConfigError naming the field."""
    m = family.fill(model, DEFAULTS, size, CHOICES, spec)
    if m['num_layers'] is None or m['num_layers'] < 1:
        family.fail('num_layers', 'must be a positive integer')
    m['encoder_layers'] = m['encoder_layers'] or m['num_layers']
    if m['encoder_layers'] < 1:
        family.fail('encoder_layers', 'must be a positive integer (or unset: model.num_layers)')
    if m['bidirectional'] and spec.kind == 'lm':
        family.fail('bidirectional', "a language model must not read the future; set it to false "
                               "(bidirectional is for classifier and seq2seq encoders)")
    if m['rnn_attention'] != 'none' and spec.kind != 'seq2seq':
        family.fail('rnn_attention', f"'{m['rnn_attention']}' needs a seq2seq task (this one is '{spec.kind}'); "
                               f"set it to none")
    if not isinstance(m['unroll'], int) or m['unroll'] < 1:
        family.fail('unroll', 'must be a positive integer (1: no unrolling)')
    if not 0.0 <= m['dropout'] < 1.0:
        family.fail('dropout', 'must be in [0, 1)')
    if m['share_embeddings'] and spec.kind in ('lm', 'seq2seq') and spec.vocab_size != spec.num_outputs:
        family.fail('share_embeddings', f'the task has {spec.vocab_size} input and {spec.num_outputs} output '
                                  f'tokens; one shared table needs one vocabulary (set it to false)')
    if m['hidden'] is None:
        target = matched_transformer_params(model, size, spec)
        m['hidden'] = match_hidden(lambda h: count_params(cell, {**m, 'hidden': h}, spec)['non_embedding'],
                                   target)
    elif not isinstance(m['hidden'], int) or m['hidden'] < 1:
        family.fail('hidden', 'must be a positive integer (or unset: matched to the Transformer of model.size)')
    return m


def hparams(cell: str, m: Mapping[str, Any], spec: TaskSpec, **changes) -> RecurrentConfig:
    cfg = RecurrentConfig.from_mapping({**m, 'cell': cell, 'vocab_size': spec.vocab_size,
                                        'num_outputs': spec.num_outputs, 'pad_id': spec.pad_id,
                                        'bos_id': spec.bos_id})
    return dataclasses.replace(cfg, **changes)


def build(cell: str, m: Mapping[str, Any], spec: TaskSpec, **changes):
    cfg = hparams(cell, m, spec, **changes)
    if m['arch'] == 'decoder_only':
        return RecurrentLM(cfg)
    if m['arch'] == 'encoder_decoder':
        return RecurrentSeq2Seq(cfg)
    return RecurrentClassifier(cfg, regression=spec.kind == 'regress')


def _stack_params(c: RecurrentConfig, layers: int, in_features: int, directions: int) -> int:
    h = c.hidden
    if layers == 0:
        return 0
    widths = [in_features] + [directions * h] * (layers - 1)
    return directions * sum(cell_param_count(c.cell, w, h) for w in widths)


def _parts(cell: str, m: Mapping[str, Any], spec: TaskSpec) -> dict[str, int]:
    """Non-embedding parameters by how often they are used (FLOPs accounting): once per
    source token (`per_source`), per target token (`per_target`), per sequence
    (`per_example`: heads, bridges) or per (target, source) pair (`per_pair`: Bahdanau's v).
    `tied_output` is the shared embedding's use as the output projection (not counted)."""
    c = hparams(cell, m, spec)
    h, o = c.hidden, c.num_outputs
    width = c.directions * h  # encoder output width
    out = dict(embedding=c.vocab_size * h, per_source=0, per_target=0, per_example=0, per_pair=0,
               tied_output=h * o if c.share_embeddings and m['arch'] != 'encoder_classifier' else 0)
    head = 0 if c.share_embeddings else h * o + o
    if m['arch'] == 'decoder_only':
        out['per_source'] = _stack_params(c, c.num_layers, h, 1) + head
    elif m['arch'] == 'encoder_classifier':
        out['per_source'] = _stack_params(c, c.num_layers, h, c.directions)
        out['per_example'] = width * o + o
    else:
        out['embedding'] += 0 if c.share_embeddings else o * h
        out['per_source'] = _stack_params(c, c.encoder_layers, h, c.directions)
        out['per_example'] = c.num_layers * CARRY_SIZE[c.cell] * (2 * h * h + h) if c.bidirectional else 0
        if c.rnn_attention == 'bahdanau':
            out['per_source'] += width * h  # W_k
            out['per_target'] = (cell_param_count(c.cell, h + width, h) + h * h  # layer 0 (+ context), W_q
                                 + _stack_params(c, c.num_layers - 1, h, 1))
            out['per_pair'] = h  # v
        else:
            out['per_target'] = _stack_params(c, c.num_layers, h, 1)
        if c.rnn_attention == 'luong':
            out['per_target'] += h * width + (width + h) * h  # W_a, W_c
        out['per_target'] += head
    return out


def count_params(cell: str, m: Mapping[str, Any], spec: TaskSpec) -> dict[str, int]:
    """Analytic counts; tests hold them equal to the real parameter trees. As for the
    Transformer, the output projection / head is non-embedding."""
    p = _parts(cell, m, spec)
    non_embedding = p['per_source'] + p['per_target'] + p['per_example'] + p['per_pair']
    return dict(total=p['embedding'] + non_embedding, embedding=p['embedding'], non_embedding=non_embedding)


def flops_per_example(cell: str, m: Mapping[str, Any], spec: TaskSpec) -> float:
    """Training FLOPs for one example, 3x the forward (backward = 2x forward), with the
    forward 2 FLOPs per weight use: every cell weight (input and recurrent), once per
    token of the sequence it reads; the tied output projection once per predicted token;
    heads and bridges once per sequence; Bahdanau's W_k once per source token. Attention
    adds, per (target, source) pair, the scores (Luong's dot: 2 * width; Bahdanau's
    v . tanh(.): 2 * hidden) and the context sum (2 * width), width being the encoder's
    output width (hidden, or 2 * hidden when bidirectional). Gate nonlinearities and the elementwise state update (O(hidden) per token
    against O(hidden^2)) are left out, like the Transformer's norms and softmax."""
    c = hparams(cell, m, spec)
    p = _parts(cell, m, spec)
    s, t = spec.input_len, spec.target_len
    if m['arch'] == 'decoder_only':
        return 6.0 * (p['per_source'] + p['tied_output']) * s
    flops = 6.0 * p['per_source'] * s + 6.0 * (p['per_target'] + p['tied_output']) * t + 6.0 * p['per_example']
    width = c.directions * c.hidden
    if c.rnn_attention == 'bahdanau':
        flops += 3.0 * (2 * c.hidden + 2 * width) * t * s
    elif c.rnn_attention == 'luong':
        flops += 3.0 * (2 * width + 2 * width) * t * s
    return flops


def decoder(cell: str, m: Mapping[str, Any], spec: TaskSpec) -> StepFns:
    """Decoding with carried state: `init` encodes (seq2seq) or zeroes the carries (lm),
    `step` feeds one token. Every state array has a leading batch axis."""
    if m['arch'] not in ('decoder_only', 'encoder_decoder'):
        raise ValueError(f"decoding needs an lm or seq2seq task, not {m['arch']}")
    model = build(cell, m, spec, dropout=0.0)
    start = RecurrentSeq2Seq.encode if m['arch'] == 'encoder_decoder' else RecurrentLM.initial_state

    def init(params, batch):
        return model.apply({'params': params}, batch, method=start)

    def step(params, state, tokens_B):
        return model.apply({'params': params}, state, tokens_B, method=type(model).step)

    return StepFns(init=init, step=step)


def _family(cell: str) -> ModelFamily:
    return ModelFamily(name=cell, resolve=functools.partial(resolve, cell), build=functools.partial(build, cell),
                       count_params=functools.partial(count_params, cell),
                       flops_per_example=functools.partial(flops_per_example, cell),
                       decoder=functools.partial(decoder, cell))


RNN, GRU, LSTM = (_family(cell) for cell in ('rnn', 'gru', 'lstm'))
