"""Small helpers that the core and the shell share. A leaf: it imports nothing of this
package, so the light command-line paths use it without loading the heavy ones."""

from __future__ import annotations

from typing import Any, Mapping

from ml_collections import ConfigDict


def flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
    """{'model': {'name': 'lstm'}} -> {'model.name': 'lstm'} (mappings and ConfigDicts)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f'{prefix}{key}'
        if isinstance(value, (Mapping, ConfigDict)):
            out.update(flatten(value, name + '.'))
        else:
            out[name] = value
    return out


def format_duration(seconds: float) -> str:
    """7 -> '7s', 65 -> '1m05s', 3725 -> '1h02m'."""
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f'{h}h{m:02d}m' if h else f'{m}m{s:02d}s' if m else f'{s}s'
