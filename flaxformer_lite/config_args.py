"""The strings a user writes into a config: the ARG string of a config file
(`model=lstm,size=small,quick`) and `--config.a.b=value` overrides.

Both set fields through `set_field`, which reads a string as the type of the field it
sets, the way ml_collections' `config_flags` reads a `--config.a.b=value` flag: a
command line means the same whether its fields come in the ARG string or as flags.
"""

from __future__ import annotations

import ast
import collections.abc
import difflib
from typing import Any, Mapping

import ml_collections

from flaxformer_lite.errors import ConfigError
from flaxformer_lite.util import flatten

_UNSET = ('none', 'null')  # unsets a bool, int or float field; a string or tuple keeps the word
_TRUE, _FALSE = ('true', 't', '1', 'yes', 'on'), ('false', 'f', '0', 'no', 'off')
_EXPECTED = {bool: 'true or false', int: 'an integer', float: 'a number', tuple: 'a tuple such as (16,32)',
             list: 'a list such as [16,32]'}


def parse_arg(arg: str | None) -> dict[str, Any]:
    """'model=lstm,size=small,quick' -> {'model': 'lstm', 'size': 'small', 'quick': True}.

    Commas inside brackets stay with their value: 'eval.dependency_lengths=(16,32)'.
    """
    out: dict[str, Any] = {}
    if not arg:
        return out
    parts, depth, cur = [], 0, ''
    for ch in arg:
        depth += ch in '([{'
        depth -= ch in ')]}'
        if ch == ',' and depth == 0:
            parts.append(cur)
            cur = ''
        else:
            cur += ch
    parts.append(cur)
    for part in parts:
        part = part.strip()
        if not part:
            continue
        key, eq, value = part.partition('=')
        out[key.strip()] = value.strip() if eq else True
    return out


def experiment_options(arg: str | None, **options: tuple[Any, Any]) -> tuple[str, bool, dict[str, Any]]:
    """An experiment file's ARG: `quick` (default) or `full`, `tune`, and named options
    (`name=(default, allowed values or None for any)`) -> (mode, tune, values). An unknown
    option or a value not allowed raises ValueError naming it and the choices.

    Every experiment also takes `first_seed=N` (its seeds start at N instead of 0: a rerun
    with other seeds) and `seeds=K` (K seeds instead of its form's number): values
    'first_seed' (an int) and 'seeds' (an int, or None for the form's number)."""
    options = {'first_seed': (0, None), 'seeds': (None, None), **options}
    args = parse_arg(arg)
    mode = 'full' if args.pop('full', False) else 'quick'
    args.pop('quick', None)
    tune = bool(args.pop('tune', False))
    values = {}
    for name, (default, allowed) in options.items():
        value = args.pop(name, default)
        if allowed is not None and value not in allowed:
            raise ValueError(f"{name}={value}: choose one of {', '.join(map(str, allowed))}")
        values[name] = value
    if args:
        known = ', '.join(['quick|full', 'tune', *(f'{n}=' for n in options)])
        raise ValueError(f"unknown argument(s) {', '.join(args)}; use {known}")
    values['first_seed'] = _whole(values['first_seed'], 'first_seed', 0, 'a whole number, the first seed')
    if values['seeds'] is not None:
        values['seeds'] = _whole(values['seeds'], 'seeds', 1, 'a positive whole number of seeds')
    return mode, tune, values


def _whole(value: Any, name: str, least: int, what: str) -> int:
    if isinstance(value, bool) or not str(value).isdigit() or int(value) < least:
        raise ValueError(f'{name}={value}: give {what}')
    return int(value)


def _sequence(text: str) -> tuple:
    """A tuple field's string, as config_flags' TupleParser reads it: a Python literal
    (a sequence becomes its items, anything else a 1-tuple), or a bare word, path or
    glob without commas or spaces as a 1-tuple of that string."""
    try:
        value = ast.literal_eval(text)
    except ValueError:  # a bare word: 'head', 'none'
        value = text
    except SyntaxError:  # a path or glob: '/data/*.tsv', 'encoder:decoder'
        if ',' in text or ' ' in text:
            raise
        value = text
    if isinstance(value, tuple):
        return value
    if isinstance(value, collections.abc.Iterable) and not isinstance(value, str):
        return tuple(value)
    return (value,)


def _coerce(dotted: str, raw: Any, kind: type | None) -> Any:
    """Turn a command-line string into the field's type, or say what was expected."""
    if not isinstance(raw, str):
        return raw
    if kind is str:
        return raw
    text = raw.strip()
    if kind in (bool, int, float) and text.lower() in _UNSET:
        return None
    try:
        if kind is bool:
            if text.lower() in _TRUE + _FALSE:
                return text.lower() in _TRUE
            raise ValueError
        if kind is int:  # decimal, or 0x.. / 0o..; not 1e3 or 2.0
            return int(raw, {'0x': 16, '0o': 8}.get(raw[:2], 10) if len(raw) > 2 else 10)
        if kind is float:
            return float(raw)
        if kind in (tuple, list):
            return kind(_sequence(raw))
    except (ValueError, SyntaxError):
        hint = "; quote elements that hold spaces or commas, e.g. ('a b',)" if kind in (tuple, list) else ''
        raise ConfigError(f'config field {dotted}={raw!r}: expected {_EXPECTED.get(kind, kind)}{hint}') from None
    if text.lower() in _UNSET:
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def set_field(cfg: ml_collections.ConfigDict, dotted: str, raw: Any, *, parse: bool = True) -> None:
    """Set one field from a string or a value; unknown names get a did-you-mean.
    `parse=False` stores strings as they are (values read back from JSON: 'none' is a
    string there, not None)."""
    node = cfg
    parts = dotted.split('.')
    for i, part in enumerate(parts):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            valid = sorted(flatten(cfg.to_dict()))
            close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else "see --describe for every field"
            raise ConfigError(f"unknown config field '{dotted}'; {hint}")
        if i < len(parts) - 1:
            node = node[part]
    leaf = parts[-1]
    if isinstance(node[leaf], ml_collections.ConfigDict):
        example = next(iter(node[leaf].keys()), 'x')
        raise ConfigError(f"config field '{dotted}' is a group; set one of its fields, e.g. "
                          f"{dotted}.{example}=...")
    value = _coerce(dotted, raw, node.get_type(leaf)) if parse else raw
    try:
        node[leaf] = value
    except TypeError as e:
        raise ConfigError(f'config field {dotted}={raw!r}: {e}') from None
