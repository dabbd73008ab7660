"""Model registry: `config.model.name` -> ModelFamily. Pure Flax modules live beside it.

A family picks the shape a task needs (language model, sequence-to-sequence,
classifier) from the task's `TaskSpec`, so switching `model.name` is all it takes to
run the same task with another family.

`REGISTRY` and `get` import the families (and with them jax and flax) on first use;
`models.knobs`, the config fields the families declare, imports neither, so reading a
config (`config.base_config`) stays quick: a sweep refuses a bad trial before jax loads.
"""

from __future__ import annotations

import difflib

from flaxformer_lite.errors import ConfigError
from flaxformer_lite.models.family import ModelFamily, StepFns

__all__ = ['REGISTRY', 'ModelFamily', 'StepFns', 'get']


def _registry() -> dict[str, ModelFamily]:
    from flaxformer_lite.models.linear_attention import LINEAR_ATTENTION
    from flaxformer_lite.models.mamba import MAMBA
    from flaxformer_lite.models.mingru import MINGRU
    from flaxformer_lite.models.recurrent_family import GRU, LSTM, RNN
    from flaxformer_lite.models.transformer_family import TRANSFORMER
    return {family.name: family for family in (
        TRANSFORMER, RNN, LSTM, GRU,
        LINEAR_ATTENTION, MAMBA, MINGRU,
    )}


def _families() -> dict[str, ModelFamily]:
    if 'REGISTRY' not in globals():  # built once, then an ordinary module attribute
        globals()['REGISTRY'] = _registry()
    return globals()['REGISTRY']


def __getattr__(name: str):
    if name == 'REGISTRY':
        return _families()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def get(name: str) -> ModelFamily:
    families = _families()
    if name not in families:
        close = difflib.get_close_matches(name, list(families), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"choose one of {', '.join(sorted(families))}"
        raise ConfigError(f"model.name='{name}' is not a known model; {hint}")
    return families[name]
