"""The Transformer as a registry entry: config resolution, building, counting, decoding."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from flaxformer_lite.models.attention import IMPLEMENTATIONS
from flaxformer_lite.models.embeddings import POSITION_KINDS
from flaxformer_lite.models import family, knobs
from flaxformer_lite.models.family import ModelFamily, StepFns
from flaxformer_lite.models.transformer import (DecoderOnly, EncoderClassifier, EncoderDecoder, EncoderMLM,
                                                 TransformerConfig)
from flaxformer_lite.spec import TaskSpec

# What unset (None) fields become; the family's own knobs are declared in models/knobs.py.
DEFAULTS = dict(knobs.defaults('transformer'), dropout=0.0, pos_encoding='sinusoidal', ffn='relu',
                norm_position='pre')
# model.scan_layers unset: the layer scan from this depth on, on accelerators, where an
# unrolled stack's compile time grows with every layer (not measured here: no GPU). Never
# on CPU: there a scanned train step measured 2.2x an unrolled one at 2 layers and 1.2x at
# 24 (benchmark.py's depth rows, width 256, T=128, batch 4: 85.8 / 38.7 ms, 585 / 484 ms),
# while the scan saves 15.6 s of compile at 24 layers (5.0 against 20.6 s): repaid only by
# runs under about 150 steps (experiments/README.md, Performance).
SCAN_MIN_LAYERS = 16


def scan_pays(num_layers: int, backend: str | None = None) -> bool:
    """Whether `model.scan_layers` left unset becomes True for a stack this deep."""
    return num_layers >= SCAN_MIN_LAYERS and (backend or jax.default_backend()) != 'cpu'


CHOICES = dict(pos_encoding=POSITION_KINDS, attention_impl=IMPLEMENTATIONS, ffn=('relu', 'gelu', 'swiglu'),
               norm=('layernorm', 'rmsnorm'), norm_position=('pre', 'post'), pooling=('mean', 'first', 'last'),
               arch=('auto', 'decoder_only', 'encoder_decoder', 'encoder_classifier', 'decoder_classifier',
                     'encoder_mlm'))


def resolve(model: dict[str, Any], size: Mapping[str, Any], spec: TaskSpec) -> dict[str, Any]:
    m = family.fill(model, DEFAULTS, size, CHOICES, spec)
    for key in ('num_layers', 'd_model', 'num_heads', 'd_ff'):
        if m[key] is None or m[key] < 1:
            family.fail(key, 'must be a positive integer')
    m['num_kv_heads'] = m['num_kv_heads'] or m['num_heads']
    m['encoder_layers'] = m['encoder_layers'] or m['num_layers']
    if m['scan_layers'] is None:
        m['scan_layers'] = scan_pays(max(m['num_layers'], m['encoder_layers']))
    if m['max_len'] is None:
        m['max_len'] = max(spec.input_len, spec.target_len)
    if m['d_model'] % m['num_heads']:
        family.fail('d_model', f"{m['d_model']} is not divisible by model.num_heads={m['num_heads']}; "
                         f"pick a width that is a multiple of the head count")
    if m['num_heads'] % m['num_kv_heads']:
        family.fail('num_kv_heads', f"{m['num_kv_heads']} does not divide model.num_heads={m['num_heads']}")
    if m['pos_encoding'] == 'rotary' and (m['d_model'] // m['num_heads']) % 2:
        family.fail('pos_encoding', 'rotary needs an even head dimension (d_model / num_heads)')
    if m['pos_encoding'] == 'sinusoidal' and m['d_model'] % 2:
        family.fail('d_model', 'sinusoidal positions need an even d_model')
    longest = max(spec.input_len, spec.target_len)
    if m['pos_encoding'] in ('learned', 'sinusoidal') and m['max_len'] < longest:
        family.fail('max_len', f"{m['max_len']} is shorter than the task's sequences ({longest}); "
                         f"raise model.max_len or leave it unset")
    if m['attention_impl'] != 'einsum' and m['attention_dropout'] > 0:
        family.fail('attention_dropout', f"attention_impl={m['attention_impl']} has no attention dropout; "
                                   f"use model.attention_impl=einsum or model.attention_dropout=0")
    if m['attention_block_size'] < 1:
        family.fail('attention_block_size', 'must be a positive integer')
    if m['share_embeddings'] and spec.kind in ('lm', 'seq2seq', 'mlm') and spec.vocab_size != spec.num_outputs:
        family.fail('share_embeddings', f'the task has {spec.vocab_size} input and {spec.num_outputs} output '
                                  f'tokens; one shared table needs one vocabulary (set it to false)')
    return m


def hparams(m: Mapping[str, Any], spec: TaskSpec, **changes) -> TransformerConfig:
    cfg = TransformerConfig.from_mapping({**m, 'vocab_size': spec.vocab_size, 'num_outputs': spec.num_outputs,
                                          'pad_id': spec.pad_id, 'bos_id': spec.bos_id})
    return dataclasses.replace(cfg, **changes)


def build(m: Mapping[str, Any], spec: TaskSpec, **changes):
    cfg = hparams(m, spec, **changes)
    if m['arch'] == 'decoder_only':
        return DecoderOnly(cfg)
    if m['arch'] == 'encoder_decoder':
        return EncoderDecoder(cfg)
    if m['arch'] == 'encoder_mlm':
        return EncoderMLM(cfg)
    return EncoderClassifier(cfg, regression=spec.kind == 'regress', causal=m['arch'] == 'decoder_classifier')


def _layer_params(c: TransformerConfig, cross: bool) -> int:
    d, hk, gk = c.d_model, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    attn = (d * hk + hk) + 2 * (d * gk + gk) + (hk * d + d)
    if c.ffn == 'swiglu':
        mlp = 3 * d * c.d_ff
    else:
        mlp = 2 * d * c.d_ff + c.d_ff + d
    norm = 2 * d if c.norm == 'layernorm' else d
    return attn * (2 if cross else 1) + mlp + norm * (3 if cross else 2)


def count_params(m: Mapping[str, Any], spec: TaskSpec) -> dict[str, int]:
    """Analytic counts; tests hold them equal to the real parameter trees."""
    c = hparams(m, spec)
    d = c.d_model
    norm = (2 * d if c.norm == 'layernorm' else d) if c.norm_position == 'pre' else 0
    embedding = c.vocab_size * d + (c.max_len * d if c.pos_encoding == 'learned' else 0)
    head = 0
    if m['arch'] in ('decoder_only', 'encoder_mlm'):
        body = c.num_layers * _layer_params(c, cross=False) + norm
        head = 0 if c.share_embeddings else d * c.num_outputs + c.num_outputs
    elif m['arch'] == 'encoder_decoder':
        body = (c.encoder_layers * _layer_params(c, cross=False) + c.num_layers * _layer_params(c, cross=True)
                + 2 * norm)
        if c.pos_encoding == 'learned':
            embedding += c.max_len * d  # one table per stack
        if not c.share_embeddings:
            embedding += c.num_outputs * d
            head = d * c.num_outputs + c.num_outputs
    else:
        body = c.num_layers * _layer_params(c, cross=False) + norm
        head = d * c.num_outputs + c.num_outputs
    # The output projection is compute like any layer: it counts as non-embedding.
    return dict(total=embedding + body + head, embedding=embedding, non_embedding=body + head)


def _kernels(c: TransformerConfig) -> dict[str, int]:
    """Matrix weights of one layer, by what they read (biases and norms are elementwise):
    `self` (self-attention Q, K, V, O and the feed-forward, per token of the stack),
    `cross_q_o` (per target token) and `cross_k_v` (per source token)."""
    d, hk, gk = c.d_model, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    mlp = (3 if c.ffn == 'swiglu' else 2) * d * c.d_ff
    return dict(self=2 * d * hk + 2 * d * gk + mlp, cross_q_o=2 * d * hk, cross_k_v=2 * d * gk)


def flops_per_example(m: Mapping[str, Any], spec: TaskSpec) -> float:
    """Training FLOPs of one example under `accounting`'s convention (3x the forward
    matmuls): every kernel once per token of the sequence it reads, cross-attention's K
    and V per source token, the output projection (tied or not) per predicted token,
    the classifier head once per example; attention 4 * d_attn per (query, key) pair,
    causal self-attention on its lower triangle, diagonal included."""
    c = hparams(m, spec)
    k = _kernels(c)
    d, d_attn = c.d_model, c.num_heads * c.head_dim
    s, t = spec.input_len, spec.target_len

    def pairs(queries: int, keys: int, causal: bool) -> float:  # causal: self-attention, keys = queries
        return queries * (queries + 1) / 2 if causal else queries * keys

    if m['arch'] in ('decoder_only', 'encoder_mlm'):
        macs = s * (c.num_layers * k['self'] + d * c.num_outputs)
        macs += c.num_layers * 2 * d_attn * pairs(s, s, m['arch'] == 'decoder_only')
    elif m['arch'] == 'encoder_decoder':
        macs = s * c.encoder_layers * k['self'] + s * c.num_layers * k['cross_k_v']
        macs += t * (c.num_layers * (k['self'] + k['cross_q_o']) + d * c.num_outputs)
        macs += 2 * d_attn * (c.encoder_layers * pairs(s, s, False)
                              + c.num_layers * (pairs(t, t, True) + pairs(t, s, False)))
    else:
        macs = s * c.num_layers * k['self'] + d * c.num_outputs
        macs += c.num_layers * 2 * d_attn * pairs(s, s, m['arch'] == 'decoder_classifier')
    return 3.0 * 2.0 * macs  # 2 FLOPs per multiply-accumulate; backward = 2x forward


def decoder(m: Mapping[str, Any], spec: TaskSpec) -> StepFns:
    """Cached decoding: the prefix lives in the KV cache, each step feeds one token.
    The cache holds the longest sequence of `spec` (which may be an evaluation task's,
    longer than the model's `max_len`: the cache size is not a parameter)."""
    cache_len = max(m['max_len'], spec.input_len, spec.target_len)
    dec = build(m, spec, decode=True, dropout=0.0, attention_dropout=0.0, max_len=cache_len)
    full = build(m, spec)
    encdec = m['arch'] == 'encoder_decoder'

    def call(variables, tokens_B1, encoded, mutable=()):
        if encdec:
            return dec.apply(variables, {'decoder_inputs': tokens_B1}, mode='decode', encoded=encoded,
                             mutable=mutable)
        return dec.apply(variables, {'inputs': tokens_B1}, mutable=mutable)

    def init(params, batch):
        b = batch['inputs'].shape[0]
        encoded = full.apply({'params': params}, batch, mode='encode') if encdec else None
        token = jnp.zeros((b, 1), jnp.int32)
        shapes = jax.eval_shape(lambda: (dec.init(jax.random.key(0), {'decoder_inputs': token}, mode='decode',
                                                  encoded=encoded) if encdec else
                                         dec.init(jax.random.key(0), {'inputs': token})))
        cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['cache'])
        return {'cache': cache, 'encoded': encoded}

    def step(params, state, tokens_B):
        logits, new = call({'params': params, 'cache': state['cache']}, tokens_B[:, None], state['encoded'],
                           mutable=['cache'])
        return logits[:, 0], {'cache': new['cache'], 'encoded': state['encoded']}

    def batch_axis_of(path, leaf, n):
        # nn.scan stacks each layer's cache on a leading 'layers' axis.
        axis = 1 if any(getattr(p, 'key', None) == 'layers' for p in path) else 0
        return axis if leaf.ndim > axis and leaf.shape[axis] == n else None

    return StepFns(init=init, step=step, batch_axis_of=batch_axis_of)


def state_size(m: Mapping[str, Any], spec: TaskSpec) -> dict[str, int]:
    """Floats a sequence keeps: the keys and values of every layer's self-attention, per
    token (the KV cache; nothing is fixed); a seq2seq decoder's cross-attention reads the
    keys and values of every source token as well (`per_source_token`)."""
    c = hparams(m, spec)
    kv = 2 * c.num_kv_heads * c.head_dim
    out = dict(fixed=0, per_token=c.num_layers * kv)
    if m['arch'] == 'encoder_decoder':
        out['per_source_token'] = c.num_layers * kv
    return out


TRANSFORMER = ModelFamily(name='transformer', resolve=resolve, build=build, count_params=count_params,
                          flops_per_example=flops_per_example, decoder=decoder, state_size=state_size,
                          width_field='d_model')
