"""RNN, LSTM and GRU as registry entries: config resolution (with parameter matching to
the Transformer of the same `model.size`), building, analytic counts, FLOPs, decoding."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

from flaxformer_lite.models import transformer_family
from flaxformer_lite.models import family, knobs
from flaxformer_lite.models.family import ModelFamily, StepFns
from flaxformer_lite.models.recurrent import (RecurrentClassifier, RecurrentConfig, RecurrentDecoderClassifier,
                                              RecurrentLM, RecurrentSeq2Seq)
from flaxformer_lite.models.recurrent_cells import cell_kind, cell_param_count
from flaxformer_lite.spec import TaskSpec

# What unset (None) fields become; the family's own knobs are declared in models/knobs.py.
DEFAULTS = dict(dropout=0.0, pooling='mean', share_embeddings=True, scale_embeddings=True, dtype='float32',
                arch='auto', encoder_layers=None, hidden=None, width_multiple=None, **knobs.defaults('rnn'))
CHOICES = dict(pooling=('mean', 'first', 'last'), rnn_attention=('none', 'bahdanau', 'luong'),
               dtype=('float32', 'bfloat16'), arch=('auto', 'decoder_only', 'encoder_decoder', 'encoder_classifier', 'decoder_classifier'))
# How far a matched width's non-embedding count may land from the Transformer's: 6%, so
# that minGRU's matched width is a multiple of 8 from `tiny` up (one step of 8 moves its
# count by 10-11% there; 72 at tiny is 1.053x).
MATCH_TOLERANCE = 0.06
# With model.width_multiple unset, a matched width is a multiple of 8 (it shards over 2, 4
# and 8 devices) wherever one lands within MATCH_TOLERANCE; below that, of 4, then 2, then 1.
AUTO_MULTIPLES = (8, 4, 2, 1)


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
             attention_block_size=128, pooling='mean', scan_layers=False)
    resolved = transformer_family.resolve(t, size, spec)
    return transformer_family.count_params(resolved, spec)['non_embedding']


def match_hidden(count: Callable[[int], int], target: int, multiple: int = 1) -> int:
    """The multiple of `multiple` whose count is closest to `target` (`count` increases
    with the width). Why multiples: a width of 79 cannot be split over 2, 4 or 8 devices
    (FSDP, tensor parallelism); with multiples of 8 it always can."""
    lo = hi = 1  # in units of `multiple`
    while count(hi * multiple) < target:
        hi *= 2
    while lo < hi:  # the smallest k with count(k * multiple) >= target
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if count(mid * multiple) < target else (lo, mid)
    return min((k * multiple for k in (lo - 1, lo) if k >= 1), key=lambda w: abs(count(w) - target))


def check_width_multiple(multiple: Any) -> None:
    if isinstance(multiple, bool) or not (multiple is None or isinstance(multiple, int) and multiple >= 1):
        family.fail('width_multiple', f'must be a positive integer, or unset (got {multiple!r}); 1 allows any '
                                      f'width, 8 shards over 8 devices')


def matched_width(count: Callable[[int], int], target: int, multiple: int | None, quantum: int = 1) -> int:
    """The width (a multiple of `quantum`, e.g. the head count) whose non-embedding count
    lands closest to `target`. `multiple` set (model.width_multiple): a multiple of it, or
    a ConfigError naming the widths on either side when none lands within MATCH_TOLERANCE.
    Unset: the first of AUTO_MULTIPLES that lands within it, so that at small widths the
    comparison stays fair (an LSTM of width 80 gains 20% parameters from one step of 8)."""
    def within(width: int) -> bool:
        return abs(count(width) - target) <= MATCH_TOLERANCE * target

    for step in (multiple,) if multiple is not None else AUTO_MULTIPLES:
        width = match_hidden(count, target, math.lcm(step, quantum))
        if within(width):
            return width
    step = math.lcm(multiple or 1, quantum)
    pair = (width, width + step) if count(width) < target or width == step else (width - step, width)
    options = ', '.join(f'{w} gives {count(w) / target:.3f}x' for w in pair)
    family.fail('width_multiple' if multiple is not None else 'hidden',
                f"no multiple of {step} lands within {MATCH_TOLERANCE:.0%} of the {target:,} non-embedding "
                f"parameters of the matched Transformer ({options}); set model.hidden to accept the gap"
                + (', or leave model.width_multiple unset' if multiple is not None else ''))


def resolve(cell: str, model: dict[str, Any], size: Mapping[str, Any], spec: TaskSpec) -> dict[str, Any]:
    """Fill unset fields (defaults, then the size row's), pick the shape from the task,
    and, when `model.hidden` is unset, the width matched to the Transformer of the same
    size (`matched_transformer_params`, `matched_width`); depth is the row's `num_layers`.
    Adds no keys: the cell is the family's (bound by `_family`). Raises ConfigError naming
    the field."""
    m = family.fill(model, DEFAULTS, size, CHOICES, spec)
    if m['num_layers'] is None or m['num_layers'] < 1:
        family.fail('num_layers', 'must be a positive integer')
    m['encoder_layers'] = m['encoder_layers'] or m['num_layers']
    if m['encoder_layers'] < 1:
        family.fail('encoder_layers', 'must be a positive integer (or unset: model.num_layers)')
    if m['arch'] == 'encoder_mlm':
        family.fail('arch', "masked-language modelling (task.objective=mlm) needs model.name=transformer (its "
                            "encoder_mlm shape); recurrent models pretrain as language models (objective=lm)")
    if m['bidirectional'] and m['arch'] == 'decoder_classifier':
        family.fail('bidirectional', 'decoder_classifier reads in one direction (the language model shape); set it '
                                     'to false, or use model.arch=encoder_classifier')
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
    check_width_multiple(m['width_multiple'])
    if m['hidden'] is None:
        target = matched_transformer_params(model, size, spec)

        def count(h: int) -> int:
            return count_params(cell, {**m, 'hidden': h}, spec)['non_embedding']

        m['hidden'] = matched_width(count, target, m['width_multiple'])
    elif isinstance(m['hidden'], bool) or not isinstance(m['hidden'], int) or m['hidden'] < 1:
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
    if m['arch'] == 'decoder_classifier':
        return RecurrentDecoderClassifier(cfg, regression=spec.kind == 'regress')
    return RecurrentClassifier(cfg, regression=spec.kind == 'regress')


def _stack(c: RecurrentConfig, layers: int, in_features: int, directions: int,
           size: Callable[[str, int, int], int]) -> int:
    """`size(cell, in, hidden)` summed over a stack's layers and directions."""
    if layers == 0:
        return 0
    widths = [in_features] + [directions * c.hidden] * (layers - 1)
    return directions * sum(size(c.cell, w, c.hidden) for w in widths)


def _cell_kernels(cell: str, in_features: int, hidden: int) -> int:
    """Matrix weights of one cell (W_ih and W_hh; the biases are elementwise)."""
    return cell_kind(cell).num_gates * (in_features + hidden) * hidden


def count_params(cell: str, m: Mapping[str, Any], spec: TaskSpec) -> dict[str, int]:
    """Analytic counts; tests hold them equal to the real parameter trees. As for the
    Transformer, the output projection / head is non-embedding."""
    c = hparams(cell, m, spec)
    h, o, width = c.hidden, c.num_outputs, c.directions * c.hidden  # width: the encoder's output
    embedding = c.vocab_size * h
    head = 0 if c.share_embeddings else h * o + o
    if m['arch'] == 'decoder_only':
        body = _stack(c, c.num_layers, h, 1, cell_param_count) + head
    elif m['arch'] in ('encoder_classifier', 'decoder_classifier'):
        body = _stack(c, c.num_layers, h, c.directions, cell_param_count) + width * o + o
    else:
        embedding += 0 if c.share_embeddings else o * h
        body = _stack(c, c.encoder_layers, h, c.directions, cell_param_count) + head
        body += c.num_layers * cell_kind(c.cell).carry_size * (2 * h * h + h) if c.bidirectional else 0  # bridges
        if c.rnn_attention == 'bahdanau':  # layer 0 reads [embedding; context]; W_q, W_k, v
            body += cell_param_count(c.cell, h + width, h) + h * h + width * h + h
            body += _stack(c, c.num_layers - 1, h, 1, cell_param_count)
        else:
            body += _stack(c, c.num_layers, h, 1, cell_param_count)
        if c.rnn_attention == 'luong':
            body += h * width + (width + h) * h  # W_a, W_c
    return dict(total=embedding + body, embedding=embedding, non_embedding=body)


def forward_macs(cell: str, m: Mapping[str, Any], spec: TaskSpec) -> dict[str, int]:
    """Forward multiply-accumulates of the matrix products, by how often each runs:
    per source token (`per_source`: cells of the encoder or LM stack, Bahdanau's W_k),
    per target token (`per_target`: decoder cells, W_q, Luong's W_a and W_c, the output
    projection, tied or not), per (target, source) pair (`per_pair`: attention scores and
    context sums) and per example (`per_example`: heads and bridges). An LM's positions
    are its source tokens: its output projection is counted under `per_source`."""
    c = hparams(cell, m, spec)
    h, o, width = c.hidden, c.num_outputs, c.directions * c.hidden
    out = dict(per_source=0, per_target=0, per_pair=0, per_example=0)
    if m['arch'] == 'decoder_only':
        out['per_source'] = _stack(c, c.num_layers, h, 1, _cell_kernels) + h * o
    elif m['arch'] in ('encoder_classifier', 'decoder_classifier'):
        out['per_source'] = _stack(c, c.num_layers, h, c.directions, _cell_kernels)
        out['per_example'] = width * o
    else:
        out['per_source'] = _stack(c, c.encoder_layers, h, c.directions, _cell_kernels)
        out['per_example'] = c.num_layers * cell_kind(c.cell).carry_size * 2 * h * h if c.bidirectional else 0
        out['per_target'] = h * o
        if c.rnn_attention == 'bahdanau':
            out['per_source'] += width * h  # W_k
            out['per_target'] += _cell_kernels(c.cell, h + width, h) + h * h  # layer 0 (+ context), W_q
            out['per_target'] += _stack(c, c.num_layers - 1, h, 1, _cell_kernels)
            out['per_pair'] = h + width  # v . tanh(.), the context sum
        else:
            out['per_target'] += _stack(c, c.num_layers, h, 1, _cell_kernels)
        if c.rnn_attention == 'luong':
            out['per_target'] += h * width + (width + h) * h  # W_a, W_c
            out['per_pair'] = 2 * width  # dot scores, the context sum
    return out


def flops_per_example(cell: str, m: Mapping[str, Any], spec: TaskSpec) -> float:
    """Training FLOPs of one example under `accounting`'s convention: 3x the forward
    matmuls of `forward_macs`, 2 FLOPs per multiply-accumulate. A model's FLOPs, not its
    implementation's: when the vocabulary is smaller than the batch's token count the
    first layer projects the embedding table instead of every token
    (`recurrent.embed_inputs`), which does less work than is counted here."""
    p = forward_macs(cell, m, spec)
    s, t = spec.input_len, spec.target_len
    if m['arch'] != 'encoder_decoder':
        t = 0  # an LM predicts at its input positions (counted per source token)
    macs = p['per_source'] * s + p['per_target'] * t + p['per_pair'] * s * t + p['per_example']
    return 3.0 * 2.0 * macs


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


def state_size(cell: str, m: Mapping[str, Any], spec: TaskSpec) -> dict[str, int]:
    """Floats a sequence keeps: the carries of every layer (h, and the LSTM's c; both
    directions of a bidirectional encoder), fixed; a seq2seq decoder carries its own
    layers' and, with attention, reads the encoder memory per source token (plus
    Bahdanau's precomputed keys)."""
    c = hparams(cell, m, spec)
    carry = cell_kind(cell).carry_size * c.hidden
    if m['arch'] != 'encoder_decoder':
        return dict(fixed=c.directions * c.num_layers * carry, per_token=0)
    out = dict(fixed=c.num_layers * carry, per_token=0)
    if c.rnn_attention != 'none':
        out['per_source_token'] = c.directions * c.hidden + (c.hidden if c.rnn_attention == 'bahdanau' else 0)
    return out


def _family(cell: str) -> ModelFamily:
    return ModelFamily(name=cell, resolve=functools.partial(resolve, cell), build=functools.partial(build, cell),
                       count_params=functools.partial(count_params, cell),
                       flops_per_example=functools.partial(flops_per_example, cell),
                       decoder=functools.partial(decoder, cell), state_size=functools.partial(state_size, cell))


RNN, GRU, LSTM = (_family(cell) for cell in ('rnn', 'gru', 'lstm'))
