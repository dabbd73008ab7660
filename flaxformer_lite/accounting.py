"""Parameter counts, FLOPs per token and model FLOPs utilisation (MFU).

Analytic counts come from each model family (so sizes can be planned without building
anything) and are checked against real parameter trees in the tests; scaling fits,
parameter matching and MFU all use these numbers.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from flaxformer_lite import config as config_lib
from flaxformer_lite.models import recurrent_family
from flaxformer_lite.experiment import Experiment

# Dense bf16 peak FLOP/s per chip, by `device_kind` prefix (vendor datasheets).
PEAK_FLOPS = {
    'NVIDIA H200': 989e12, 'NVIDIA H100': 989e12, 'NVIDIA A100': 312e12, 'NVIDIA L4': 121e12,
    'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12, 'TPU v6 lite': 918e12,
}
EMBEDDING_LEAVES = ('embedding', 'pos_embedding')  # parameter names that are lookup tables


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Peak FLOP/s of one device, or None where unknown (CPUs): then no MFU is reported."""
    kind = (device or jax.devices()[0]).device_kind
    return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


def tree_counts(params: Any) -> dict[str, int]:
    """Counts from a real parameter tree: total, embedding (lookup tables), non-embedding."""
    total = embedding = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0]:
        total += leaf.size
        if getattr(path[-1], 'key', None) in EMBEDDING_LEAVES:
            embedding += leaf.size
    return dict(total=total, embedding=embedding, non_embedding=total - embedding)


def summary(exp: Experiment) -> dict[str, float]:
    counts = exp.family.count_params(exp.model_cfg, exp.spec)
    flops = exp.family.flops_per_example(exp.model_cfg, exp.spec)
    tokens = exp.tokens_per_example()
    return dict(params_total=counts['total'], params_embedding=counts['embedding'],
                params_non_embedding=counts['non_embedding'], flops_per_example=flops,
                flops_per_token=flops / tokens, tokens_per_example=tokens)


def matched_transformer(exp: Experiment) -> int | None:
    """For a recurrent model: non-embedding parameters of the Transformer of the same size
    row and task shape, the count its width was matched to."""
    if exp.family.name == 'transformer':
        return None
    return recurrent_family.matched_transformer_params(exp.config.model.to_dict(),
                                                       config_lib.SIZES[exp.config.model.size], exp.spec)


def mfu(flops_per_example: float, examples_per_sec: float, num_devices: int) -> float | None:
    peak = peak_flops()
    return None if peak is None else flops_per_example * examples_per_sec / (peak * num_devices)


def describe(exp: Experiment) -> str:
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
        ratio = s['params_non_embedding'] / max(matched, 1)
        lines.append(f'matched Transformer ({exp.config.model.size}): non-embedding {matched:,} '
                     f'(this model: {ratio:.3f}x, width model.hidden={exp.model_cfg["hidden"]})')
    lines.append('chance: ' + ', '.join(f'{k} {v:.4g}' for k, v in exp.task.chance().items()))
    return '\n'.join(lines)
