"""Parameter counts, FLOPs per token and model FLOPs utilisation (MFU).

Analytic counts come from each model family (so sizes can be planned without building
anything) and are checked against real parameter trees in the tests; scaling fits,
parameter matching and MFU all use these numbers.

One FLOP convention for every family (`ModelFamily.flops_per_example`), checked against
XLA's own count of the compiled training step in tests/test_accounting.py:
  * Only matrix products count, 2 * m * n * k FLOPs each for [m, k] @ [k, n]. Biases,
    norms, activations, softmax and the gates' elementwise arithmetic are O(width) per
    token against O(width^2) and are left out; embedding lookups are free.
  * Training = forward + backward = 3x the forward (the backward pass computes the
    input and the weight gradient of every product: 2x the forward).
  * Each weight matrix counts once per position of the sequence it reads: Transformer
    blocks and recurrent cells per token of their stack; cross-attention's Q and output
    projections per target token, its K and V projections per source token (as is
    Bahdanau's key projection); the output projection, tied or not, once per
    predicted token; classifier / regression heads and recurrent bridges once per
    example (they run once per example).
  * Attention: scores and weighted sums, 4 * d_attn FLOPs per (query, key) pair forward
    (d_attn = heads * head_dim; recurrent attention: the score and context products
    of its own widths); causal self-attention counts its lower triangle, diagonal
    included (T (T + 1) / 2 pairs), although masked implementations compute all T^2.
  * These are the model's FLOPs, not the implementation's: rematerialisation and
    shortcuts (a recurrent first layer that projects the embedding table instead of
    every token) change the work done, not the count.
FLOPs per token are FLOPs per example over the positions processed per example (inputs,
plus targets for seq2seq).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from flaxformer_lite import config as config_lib
from flaxformer_lite.models import recurrent_family
from flaxformer_lite.resolve import Run

DTYPES = ('float32', 'bfloat16')
# Dense (no sparsity) peak FLOP/s per chip from the vendors' datasheets, by `device_kind`
# prefix (the longest matching prefix wins), for matmuls in each compute dtype.
# float32 on NVIDIA Ampere / Hopper: XLA's default matmul precision runs float32 dots
# on the TF32 tensor cores, so the TF32 tensor-core peak is the one used (the FP32
# CUDA-core peak is 8-15x lower and would let MFU exceed 1); with
# jax_default_matmul_precision='highest' MFU against it is an underestimate.
# float32 on TPU: at default precision a float32 matmul runs as a bfloat16 pass on the
# MXU, so its peak is the bfloat16 one.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    'NVIDIA H200 NVL': {'bfloat16': 835e12, 'float32': 417.5e12},
    'NVIDIA H200': {'bfloat16': 989e12, 'float32': 494.5e12},
    'NVIDIA GH200': {'bfloat16': 989e12, 'float32': 494.5e12},
    'NVIDIA H100 NVL': {'bfloat16': 835e12, 'float32': 417.5e12},
    'NVIDIA H100 PCIe': {'bfloat16': 756e12, 'float32': 378e12},
    'NVIDIA H100': {'bfloat16': 989e12, 'float32': 494.5e12},  # SXM
    'NVIDIA A100': {'bfloat16': 312e12, 'float32': 156e12},
    'NVIDIA L4': {'bfloat16': 121e12, 'float32': 60e12},
    'TPU v3': {'bfloat16': 123e12, 'float32': 123e12},
    'TPU v4': {'bfloat16': 275e12, 'float32': 275e12},
    'TPU v5 lite': {'bfloat16': 197e12, 'float32': 197e12},  # v5e
    'TPU v5': {'bfloat16': 459e12, 'float32': 459e12},  # v5p
    'TPU v6 lite': {'bfloat16': 918e12, 'float32': 918e12},  # v6e (Trillium)
}
EMBEDDING_LEAVES = ('embedding', 'pos_embedding')  # parameter names that are lookup tables


def peak_flops(dtype: str, device: jax.Device | None = None) -> float | None:
    """Dense peak FLOP/s of one device for matmuls in `dtype`, or None where unknown
    (CPUs, unlisted accelerators): then no MFU is reported rather than a guessed one."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    kind = (device or jax.devices()[0]).device_kind
    matches = [k for k in PEAK_FLOPS if kind.startswith(k)]
    return PEAK_FLOPS[max(matches, key=len)][dtype] if matches else None


def tree_counts(params: Any) -> dict[str, int]:
    """Counts from a real parameter tree: total, embedding (lookup tables), non-embedding."""
    total = embedding = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]:
        total += leaf.size
        if getattr(path[-1], 'key', None) in EMBEDDING_LEAVES:
            embedding += leaf.size
    return dict(total=total, embedding=embedding, non_embedding=total - embedding)


def summary(exp: Run) -> dict[str, float]:
    counts = exp.family.count_params(exp.model_cfg, exp.spec)
    flops = exp.family.flops_per_example(exp.model_cfg, exp.spec)
    tokens = exp.tokens_per_example()
    return dict(params_total=counts['total'], params_embedding=counts['embedding'],
                params_non_embedding=counts['non_embedding'], flops_per_example=flops,
                flops_per_token=flops / tokens, tokens_per_example=tokens)


def matched_transformer(exp: Run) -> int | None:
    """For a recurrent model: non-embedding parameters of the Transformer of the same size
    row and task shape, the count its width was matched to."""
    if exp.family.name == 'transformer':
        return None
    return recurrent_family.matched_transformer_params(exp.config.model.to_dict(),
                                                       config_lib.SIZES[exp.config.model.size], exp.spec)


def mfu(flops_per_example: float, examples_per_sec: float, num_devices: int, dtype: str) -> float | None:
    """Model FLOPs utilisation: the convention's training FLOPs per second over the
    peak of `num_devices` devices in the compute dtype (`model.dtype`); None where no
    peak is known."""
    peak = peak_flops(dtype)
    return None if peak is None else flops_per_example * examples_per_sec / (peak * num_devices)


def describe(exp: Run) -> str:
    s = summary(exp)
    lines = [
        f'model {exp.family.name} ({exp.model_cfg.get("arch", "")}), size {exp.config.model.size}, '
        f'task {exp.task.name} ({exp.spec.kind})',
        f'parameters: total {s["params_total"]:,}  non-embedding {s["params_non_embedding"]:,}  '
        f'embedding {s["params_embedding"]:,}',
        f'training FLOPs: {s["flops_per_token"]:.4g} per token, {s["flops_per_example"]:.4g} per example '
        f'({s["tokens_per_example"]} tokens)',
    ]
    matched = matched_transformer(exp)
    if matched is not None:
        hidden, multiple = exp.model_cfg['hidden'], exp.model_cfg['width_multiple']
        shards = max(d for d in recurrent_family.AUTO_MULTIPLES if hidden % d == 0)
        note = (f', not a multiple of model.width_multiple={multiple}' if multiple and hidden % multiple
                else f', splits over {shards} devices' if shards < 8 else '')
        lines.append(f'parameter matching: non-embedding {s["params_non_embedding"]:,} (this model, '
                     f'model.hidden={hidden}{note}) vs {matched:,} (the {exp.config.model.size} Transformer): '
                     f'{s["params_non_embedding"] / max(matched, 1):.3f}x')
    state = state_line(exp)
    if state:
        lines.append(state)
    lines.append('chance: ' + ', '.join(f'{k} {v:.4g}' for k, v in exp.task.chance().items()))
    return '\n'.join(lines)


def state_line(exp: Run) -> str | None:
    """The state a sequence carries (`ModelFamily.state_size`), e.g. 'state: 12,288
    floats per sequence (fixed)' or 'state: 512 floats per token (KV cache)': what
    Zoology (Arora et al. 2023) relates to recall. None for a family that does not say."""
    if exp.family.state_size is None:
        return None
    size = exp.family.state_size(exp.model_cfg, exp.spec)
    parts = []
    if size['fixed'] or not size['per_token']:
        parts.append(f"{size['fixed']:,} floats per sequence (fixed)")
    if size['per_token']:
        parts.append(f"{size['per_token']:,} floats per token (KV cache)")
    if size.get('per_source_token'):
        parts.append(f"{size['per_source_token']:,} floats per source token (attention memory)")
    return 'state: ' + ' + '.join(parts)
