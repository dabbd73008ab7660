"""Starting a run from another run's weights (`train.init_from`), and parameter patterns
(`train.init_exclude`, `train.init_require`, `train.freeze`): pretrain, then fine-tune.

A new run whose config names `train.init_from=DIR` initialises as usual, then takes from
DIR's latest checkpoint (or `train.init_step`) every parameter whose path and shape are
the same here: a new classifier head, or an embedding table of another vocabulary, stays
freshly initialised. The shapes were made for this: `decoder_classifier` keeps a causal
language model's stack where `decoder_only` has it ('decoder' for the Transformer,
'stack' for recurrent cells) and `encoder_classifier` keeps an `encoder_mlm`'s
'encoder', so the layers load as they are. Loading a causal stack into a bidirectional
one (or back) changes what the weights mean, so it happens only when asked with
`train.init_map=('decoder:encoder',)` (source prefix : prefix here). The optimizer
state starts fresh; `results.json` records where the weights came from.

Everything that can be wrong (no run in DIR, another model family, a pattern that
matches nothing, a required parameter that cannot load) is found by `plan`, from the
checkpoint's metadata alone, before the new run writes a byte.

A pattern is a glob over '/'-joined parameter paths (`decoder/layer_0/mlp/*`,
`*/final_norm/*`), and a pattern also matches everything below the path it names
(`head` is `head/kernel` and `head/bias`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from typing import Any, Iterable, Mapping

import jax
import orbax.checkpoint as ocp

from flaxformer_lite.errors import UserError
from flaxformer_lite.train import checkpoint

# Top-level parts that only embed tokens: loading these alone is no transfer of layers.
EMBEDDING_PARTS = ('embed', 'embedder', 'target_embed', 'encoder_embedder', 'decoder_embedder')


def path_name(path: tuple) -> str:
    """A jax key path as 'a/b/kernel'."""
    return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def flat_paths(tree: Any) -> dict[str, Any]:
    """{'a/b/kernel': leaf} of a nested parameter tree (dicts of arrays or shapes)."""
    return {path_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def matches(path: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, pattern.rstrip('/') + '/*')


def select(paths: Iterable[str], patterns: Iterable[str], field: str) -> set[str]:
    """The paths any pattern matches; a pattern that matches none is a UserError naming
    `field`, since a typo there would otherwise silently do nothing."""
    paths, chosen = list(paths), set()
    for pattern in patterns:
        hit = {p for p in paths if matches(p, pattern)}
        if not hit:
            parts = sorted({p.split('/')[0] for p in paths})
            raise UserError(f"{field}: {pattern!r} matches no parameter of this model (its parts: "
                            f"{', '.join(parts)}; e.g. {paths[0]!r}); fix the pattern (see --describe)")
        chosen |= hit
    return chosen


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `train.init_from` loads: (path here, path in the source) pairs, and the
    parameters left fresh with the reason for each."""
    source: str
    step: int
    source_model: str  # 'transformer (decoder_only)'
    loaded: tuple[tuple[str, str], ...]
    fresh: tuple[tuple[str, str], ...]
    shapes: Mapping[str, tuple[tuple[int, ...], str]]  # source path -> (shape, dtype) of what loads

    def summary(self) -> dict[str, Any]:
        """What results.json records."""
        return {'from': os.path.abspath(self.source), 'step': self.step, 'source_model': self.source_model,
                'loaded': len(self.loaded), 'fresh': [p for p, _ in self.fresh]}

    def lines(self) -> list[str]:
        """For the start-up log and --describe: what loads and what does not, grouped."""
        out = [f'train.init_from: step {self.step} of {self.source} ({self.source_model}): '
               f'{len(self.loaded)} parameter arrays loaded, {len(self.fresh)} fresh']
        for part, names in _by_part(here for here, _ in self.loaded).items():
            out.append(f'  loaded  {part}: {len(names)} arrays')
        renamed = [(h, s) for h, s in self.loaded if h != s]
        for here, src in renamed[:3]:
            out.append(f'  mapped  {src} -> {here}' + (f' (and {len(renamed) - 3} more)' if here == renamed[2][0]
                                                        and len(renamed) > 3 else ''))
        for here, why in self.fresh:
            out.append(f'  fresh   {here}: {why}')
        return out


def _by_part(paths: Iterable[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in paths:
        out.setdefault(p.split('/')[0], []).append(p)
    return out


def _renamer(init_map: Iterable[str], source_paths: Iterable[str]):
    """'src:dst' prefixes -> a function from a source path to its path here."""
    pairs = []
    source_paths = list(source_paths)
    for entry in init_map:
        src, sep, dst = str(entry).partition(':')
        if not sep or not src or not dst:
            raise UserError(f"train.init_map: {entry!r} is not 'SOURCE_PREFIX:PREFIX_HERE', e.g. 'decoder:encoder'")
        if not any(p == src or p.startswith(src + '/') for p in source_paths):
            parts = sorted({p.split('/')[0] for p in source_paths})
            raise UserError(f"train.init_map: {src!r} names no parameter of the train.init_from run (its parts: "
                            f"{', '.join(parts)})")
        pairs.append((src, dst))

    def rename(path: str) -> str:
        for src, dst in pairs:
            if path == src or path.startswith(src + '/'):
                return dst + path[len(src):]
        return path
    return rename


def _source_step(source: str, want: int | None) -> int:
    steps = checkpoint.steps_saved(source)
    if not steps:
        raise UserError(f'train.init_from={source} holds no checkpoint; train that run first (or point at another)')
    if want is not None and want not in steps:
        raise UserError(f"train.init_step={want}: {source} has checkpoints at steps {', '.join(map(str, steps))}")
    ckpt = checkpoint.Checkpointer(source, max_to_keep=len(steps), async_save=False, read_only=True)
    try:
        for step in ([want] if want is not None else steps):
            reason = ckpt.verify(step)
            if reason is None:
                return step
            if want is not None:
                raise UserError(f'train.init_step={want}: that checkpoint of {source} is damaged ({reason})')
    finally:
        ckpt.close()
    raise UserError(f'train.init_from={source}: every checkpoint is damaged; restore it from a backup')


def _state_dir(source: str, step: int) -> str:
    return os.path.abspath(os.path.join(source, checkpoint.CHECKPOINT_DIR, str(step), 'state'))


def _source_params(source: str, step: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """{path: (shape, dtype)} of the source's parameters, from the checkpoint's metadata."""
    try:
        tree = ocp.StandardCheckpointer().metadata(_state_dir(source, step)).item_metadata.tree
        params = tree['params']
    except Exception as e:  # noqa: BLE001 -- an unreadable checkpoint, whatever Orbax raises
        raise UserError(f'train.init_from={source}: step {step} cannot be read ({type(e).__name__}: '
                        f'{" ".join(str(e).split())[:160]})') from None
    return {p: (tuple(m.shape), str(m.dtype)) for p, m in flat_paths(params).items()}


def plan(cfg, abstract_params: Any, model_cfg: Mapping[str, Any]) -> Plan | None:
    """The plan of `train.init_from` for a model with `abstract_params` (shapes), or None
    when the run starts from random weights. Reads only; UserError for what cannot work."""
    t = cfg.train
    if not t.init_from:
        for name in ('init_step', 'init_exclude', 'init_require', 'init_map'):
            if t[name]:
                raise UserError(f'train.{name} needs train.init_from=DIR (the run whose weights to start from)')
        return None
    source = t.init_from
    if not os.path.isfile(os.path.join(source, checkpoint.CONFIG_FILE)):
        raise UserError(f'train.init_from={source} holds no flaxformer_lite run ({checkpoint.CONFIG_FILE} missing); '
                        f'give the --workdir of a trained run')
    try:
        with open(os.path.join(source, checkpoint.CONFIG_FILE)) as f:
            saved = json.load(f)
        src_model = saved['model']['name']
        src_arch = saved['model'].get('arch')
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f'train.init_from={source}: its {checkpoint.CONFIG_FILE} cannot be read ({e})') from None
    if src_model != cfg.model.name:
        raise UserError(f'train.init_from={source} is a {src_model} run and this one is model.name={cfg.model.name}; '
                        f'weights load within one family: set model.name={src_model}, or start from a '
                        f'{cfg.model.name} run')
    step = _source_step(source, t.init_step)
    source_params = _source_params(source, step)
    here = {p: (tuple(a.shape), str(a.dtype)) for p, a in flat_paths(abstract_params).items()}
    rename = _renamer(t.init_map or (), source_params)
    by_target: dict[str, str] = {}
    for src in source_params:
        by_target.setdefault(rename(src), src)
    excluded = select(here, t.init_exclude or (), 'train.init_exclude')
    required = select(here, t.init_require or (), 'train.init_require')
    loaded, fresh = [], []
    for path, (shape, _) in here.items():
        src = by_target.get(path)
        if path in excluded:
            fresh.append((path, 'train.init_exclude'))
        elif src is None:
            fresh.append((path, 'not in the source run'))
        elif source_params[src][0] != shape:
            fresh.append((path, f'shape {source_params[src][0]} in the source run, {shape} here'))
        else:
            loaded.append((path, src))
    for path, why in fresh:
        if path in required:
            raise UserError(f'train.init_require: {path} cannot load from {source} ({why}); drop it from '
                            f'train.init_require or fix the model config')
    src_desc = f'{src_model} ({src_arch})'
    if not any(p.split('/')[0] not in EMBEDDING_PARTS for p, _ in loaded):
        src_parts = sorted({p.split('/')[0] for p in source_params})
        parts = sorted({p.split('/')[0] for p in here})
        hint = ''
        if 'decoder' in src_parts and 'encoder' in parts:
            hint = (" its causal stack ('decoder') does not load into this bidirectional 'encoder' unless asked: "
                    "fine-tune with model.arch=decoder_classifier, or set train.init_map=decoder:encoder;")
        elif 'encoder' in src_parts and 'decoder' in parts:
            hint = (" its bidirectional 'encoder' does not load into this causal 'decoder' unless asked: fine-tune "
                    "with model.arch=encoder_classifier, or set train.init_map=encoder:decoder;")
        raise UserError(f"train.init_from={source} ({src_desc}, parts {', '.join(src_parts)}) has no layer that "
                        f"matches this model ({model_cfg.get('arch')}, parts {', '.join(parts)}) by path and shape;"
                        f"{hint or ' map parts with train.init_map=SOURCE:HERE or start from another run;'} "
                        f"see --describe")
    return Plan(source=source, step=step, source_model=src_desc, loaded=tuple(loaded), fresh=tuple(fresh),
                shapes={src: source_params[src] for _, src in loaded})


def load(p: Plan, params: Any) -> Any:
    """`params` (initialised, laid out on the mesh) with the planned ones replaced by the
    source's, each restored straight into the sharding of the parameter it replaces."""
    here = flat_paths(params)
    item: dict[str, Any] = {}
    for path, src in p.loaded:
        node = item
        *parents, leaf = src.split('/')
        for key in parents:
            node = node.setdefault(key, {})
        shape, dtype = p.shapes[src]
        node[leaf] = jax.ShapeDtypeStruct(shape, dtype, sharding=here[path].sharding)
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, dtype=s.dtype), item)
    restored = ocp.PyTreeCheckpointer().restore(
        _state_dir(p.source, p.step), args=ocp.args.PyTreeRestore(
            item={'params': item}, restore_args={'params': restore_args}, partial_restore=True))
    source_arrays = flat_paths(restored['params'])
    target_of = dict(p.loaded)

    def take(path, leaf):
        key = path_name(path)
        return source_arrays[target_of[key]].astype(leaf.dtype) if key in target_of else leaf
    return jax.tree_util.tree_map_with_path(take, params)


def frozen_mask(patterns: Iterable[str], params: Any) -> Any:
    """A tree of bools: True where `train.freeze` keeps the parameter fixed."""
    chosen = select(flat_paths(params), patterns, 'train.freeze')
    return jax.tree_util.tree_map_with_path(lambda path, _: path_name(path) in chosen, params)
