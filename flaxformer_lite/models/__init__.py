"""Model registry: `config.model.name` -> ModelFamily. Pure Flax modules live beside it.

A family picks the shape a task needs (language model, sequence-to-sequence,
classifier) from the task's `TaskSpec`, so switching `model.name` is all it takes to
run the same task with another family.
"""

from __future__ import annotations

import difflib

from flaxformer_lite.errors import ConfigError
from flaxformer_lite.models.family import ModelFamily, StepFns
from flaxformer_lite.models.linear_attention import LINEAR_ATTENTION
from flaxformer_lite.models.mamba import MAMBA
from flaxformer_lite.models.mingru import MINGRU
from flaxformer_lite.models.recurrent_family import GRU, LSTM, RNN
from flaxformer_lite.models.transformer_family import TRANSFORMER

REGISTRY: dict[str, ModelFamily] = {
    family.name: family for family in (
        TRANSFORMER, RNN, LSTM, GRU,
        LINEAR_ATTENTION, MAMBA, MINGRU,
    )
}

__all__ = ['REGISTRY', 'ModelFamily', 'StepFns', 'get']


def get(name: str) -> ModelFamily:
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, list(REGISTRY), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"choose one of {', '.join(sorted(REGISTRY))}"
        raise ConfigError(f"model.name='{name}' is not a known model; {hint}")
    return REGISTRY[name]
