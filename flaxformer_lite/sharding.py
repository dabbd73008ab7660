"""Device mesh, logical-axis rules, shardings, and multi-host start-up.

Models name their axes (`embed`, `heads`, `mlp`, `vocab`, `act_batch`, ...); this file
maps those names onto the mesh axes ('data', 'fsdp', 'tensor') with rules chosen in the
config, so a run moves from one CPU to a pod slice by changing `mesh.*` only.
Data parallelism (the modern form of pmap) is the `dp` preset: one jit over a mesh.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from flaxformer_lite.errors import ConfigError

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')  # the global batch is split over both

# Activations: the batch over data+fsdp; per-head and hidden activations over tensor.
_ACTIVATIONS = [('act_batch', BATCH_AXES), ('act_length', None), ('act_embed', None)]
_TP_ACTIVATIONS = [('act_heads', 'tensor'), ('act_mlp', 'tensor'), ('act_vocab', 'tensor')]
# Weights: FSDP shards the model width, tensor parallelism the heads / hidden / vocabulary.
_FSDP = [('embed', 'fsdp')]
_TP = [('heads', 'tensor'), ('kv_heads', 'tensor'), ('mlp', 'tensor'), ('vocab', 'tensor')]
_REPLICATED = [('act_heads', None), ('act_mlp', None), ('act_vocab', None), ('heads', None),
               ('kv_heads', None), ('mlp', None), ('vocab', None), ('embed', None)]
_ALWAYS = [('kv', None), ('layers', None)]

RULE_PRESETS: dict[str, list[tuple[str, Any]]] = {
    'dp': _ACTIVATIONS + _REPLICATED + _ALWAYS,
    'fsdp': _ACTIVATIONS + _FSDP + _REPLICATED + _ALWAYS,
    'tp': _ACTIVATIONS + _TP_ACTIVATIONS + _TP + _REPLICATED + _ALWAYS,
    'fsdp_tp': _ACTIVATIONS + _TP_ACTIVATIONS + _FSDP + _TP + _REPLICATED + _ALWAYS,
}


def mesh_shape(mesh_cfg: Mapping[str, Any], num_devices: int) -> tuple[int, int, int]:
    """Sizes of (data, fsdp, tensor); one of them may be -1 (the devices left over)."""
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise ConfigError(f'mesh.data/fsdp/tensor={sizes}: use positive sizes, at most one of them -1')
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f'mesh sizes {sizes} do not divide the {num_devices} devices; '
                              f'choose mesh.* whose product divides {num_devices}')
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(f'mesh data*fsdp*tensor = {"*".join(map(str, sizes))} = {math.prod(sizes)} but '
                          f'there are {num_devices} devices; set mesh.* so the product is {num_devices} '
                          f'(or leave one axis at -1)')
    return tuple(sizes)


def make_mesh(mesh_cfg: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    devices = list(devices if devices is not None else jax.devices())
    wanted = int(mesh_cfg.get('num_devices', -1))
    if wanted != -1:
        if not 1 <= wanted <= len(devices):
            raise ConfigError(f'mesh.num_devices={wanted}: there are {len(devices)} devices; use 1..{len(devices)} '
                              f'or -1 for all')
        if jax.process_count() > 1 and wanted != len(devices):
            raise ConfigError('mesh.num_devices must be -1 (all devices) when running on several processes')
        devices = devices[:wanted]
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def rules_preset(mesh_cfg: Mapping[str, Any], shape: Sequence[int]) -> str:
    name = mesh_cfg['rules']
    if name == 'auto':
        fsdp, tensor = shape[1] > 1, shape[2] > 1
        return 'fsdp_tp' if fsdp and tensor else 'fsdp' if fsdp else 'tp' if tensor else 'dp'
    if name not in RULE_PRESETS:
        raise ConfigError(f"mesh.rules='{name}' is not one of auto, {', '.join(RULE_PRESETS)}")
    return name


def logical_rules(mesh_cfg: Mapping[str, Any], shape: Sequence[int]) -> tuple[tuple[str, Any], ...]:
    """The preset's rules, with `mesh.custom_rules` pairs taking precedence."""
    custom = [tuple(r) for r in (mesh_cfg.get('custom_rules') or ())]
    for rule in custom:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ConfigError(f'mesh.custom_rules: {rule!r} is not a (logical_name, mesh_axis) pair')
        axes = rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)
        for axis in axes:
            if axis is not None and axis not in MESH_AXES:
                raise ConfigError(f"mesh.custom_rules: '{axis}' is not a mesh axis ({', '.join(MESH_AXES)})")
    overridden = {name for name, _ in custom}
    preset = [r for r in RULE_PRESETS[rules_preset(mesh_cfg, shape)] if r[0] not in overridden]
    return tuple(custom + preset)


# Logical axes whose dimension may be replicated instead when it does not split evenly:
# vocabularies of these tasks are small and rarely a multiple of the tensor axis.
REPLICATE_IF_UNEVEN = ('vocab',)


def param_shardings(boxed_tree: Any, mesh: jax.sharding.Mesh, rules) -> tuple[Any, list[str]]:
    """NamedShardings for a tree of (abstract) `nn.Partitioned` parameters, checked to
    split evenly (ConfigError otherwise, before anything compiles). Returns notes on
    dimensions replicated because they do not split (only REPLICATE_IF_UNEVEN axes)."""
    logical = nn.get_partition_spec(boxed_tree)
    shardings = nn.logical_to_mesh_sharding(logical, mesh, rules)
    notes: list[str] = []
    flat_boxed = jax.tree_util.tree_flatten_with_path(boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    flat_sh, treedef = jax.tree.flatten(shardings)
    fixed = []
    for (path, box), sharding in zip(flat_boxed, flat_sh):
        shape = box.value.shape if isinstance(box, nn.Partitioned) else box.shape
        names = box.names if isinstance(box, nn.Partitioned) else (None,) * len(shape)
        spec = list(tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec)))
        for i, (dim, axes) in enumerate(zip(shape, spec)):
            if axes is None:
                continue
            axes_t = axes if isinstance(axes, tuple) else (axes,)
            n = math.prod(mesh.shape[a] for a in axes_t)
            if dim % n == 0:
                continue
            where = jax.tree_util.keystr(path)
            if names[i] in REPLICATE_IF_UNEVEN:
                spec[i] = None
                notes.append(f'{where} dimension {i} ({names[i]}={dim}) does not split over {"*".join(axes_t)}={n}: '
                             f'replicated')
                continue
            raise ConfigError(
                f"mesh.{axes_t[0]}: parameter {where} has a {names[i]} dimension of {dim}, which does not split over "
                f"mesh axes {'*'.join(axes_t)} of size {n}; change mesh.{axes_t[0]}, or make that width a multiple of "
                f"{n} (model.d_model, model.num_heads, model.num_kv_heads, model.d_ff; for the recurrent and "
                f"fixed-state families model.width_multiple={n}, which keeps the parameter match or says which "
                f"model.hidden would leave it)")
        fixed.append(NamedSharding(mesh, P(*spec)))
    return jax.tree.unflatten(treedef, fixed), notes


def _paths_leaves(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [jax.tree_util.keystr(p) for p, _ in flat], [leaf for _, leaf in flat]


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state: Any, param_shardings: Any,
                        mesh: jax.sharding.Mesh) -> Any:
    """Optimizer moments shard like their parameters; counters are replicated. Frozen
    parameters (`train.freeze`) have no moments: optax's MaskedNode stays as it is."""
    replicated = NamedSharding(mesh, P())
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    return optax.tree_map_params(tx, lambda x, s: x if masked(x) else s, abstract_opt_state, param_shardings,
                                 transform_non_params=lambda _: replicated, is_leaf=masked)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def per_device_bytes(tree: Any) -> dict[str, int]:
    """Bytes each device holds of a tree of (sharded) arrays: {device: bytes}."""
    out: dict[str, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            key = str(shard.device)
            out[key] = out.get(key, 0) + shard.data.size * shard.data.dtype.itemsize
    return out


def describe_layout(mesh: jax.sharding.Mesh, rules_name: str, params: Any, opt_state: Any, top: int = 5) -> str:
    """Start-of-run summary: mesh, the largest arrays' shardings, bytes per device; on a
    single device (nothing is sharded) one line with the bytes alone."""
    if mesh.devices.size == 1:
        pbytes, obytes = sum(per_device_bytes(params).values()), sum(per_device_bytes(opt_state).values())
        return (f'1 {mesh.devices.flat[0].platform} device, nothing sharded: parameters {pbytes / 2**20:.2f} MiB, '
                f'optimizer state {obytes / 2**20:.2f} MiB')
    lines = [f'mesh {dict(mesh.shape)} on {mesh.devices.size} devices ({jax.process_count()} processes), '
             f'rules {rules_name}']
    paths, leaves = _paths_leaves(params)
    order = np.argsort([-leaf.size for leaf in leaves])[:top]
    for i in order:
        lines.append(f'  {paths[i]} {tuple(leaves[i].shape)} -> {leaves[i].sharding.spec}')
    pbytes, obytes = per_device_bytes(params), per_device_bytes(opt_state)
    if pbytes:
        worst = max(pbytes, key=lambda d: pbytes[d] + obytes.get(d, 0))
        lines.append(f'  per device: parameters {pbytes[worst] / 2**20:.2f} MiB, optimizer state '
                     f'{obytes.get(worst, 0) / 2**20:.2f} MiB (largest: {worst})')
    return '\n'.join(lines)


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout_s: int = 300) -> bool:
    """Start `jax.distributed` when asked (`--coordinator=...`) or when a cluster launcher
    (SLURM, Open MPI) started several processes; Cloud TPU pods are detected by JAX.

    `timeout_s` (--distributed_timeout) bounds both ways a run can lose a process: one
    that never arrives ends start-up after `timeout_s` (jax's initialization_timeout), one
    that dies or hangs mid-run is declared dead by the coordination service when it has
    sent no heartbeat for `timeout_s` (heartbeat_timeout_seconds; jax's default is 100 s).
    Without it a survivor would wait forever: a CPU (gloo) collective with a dead peer
    never returns. jax ends such processes with a fatal error (an abort; the
    `missed_heartbeat_callback` of its client crashes with std::bad_cast in jaxlib 0.10.2,
    so it cannot be caught in Python); `supervisor.supervise` turns that into one line and exit
    status 5. When process 0 dies, the others lose the coordination service at once and
    end immediately."""
    explicit = coordinator is not None
    if explicit and (num_processes is None or process_id is None):
        raise ConfigError('--coordinator needs --num_processes=N and --process_id=I as well')
    if not explicit and num_processes is not None:
        raise ConfigError('--num_processes/--process_id need --coordinator=HOST:PORT')
    cluster = (int(os.environ.get('SLURM_NTASKS', '1')) > 1 or int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1
               or 'TPU_WORKER_HOSTNAMES' in os.environ)
    if not (explicit or cluster):
        return False
    if explicit and not 0 <= process_id < num_processes:
        raise ConfigError(f'--process_id={process_id} must be in [0, {num_processes})')
    kwargs = dict(initialization_timeout=timeout_s, heartbeat_timeout_seconds=timeout_s)
    if explicit:
        kwargs.update(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kwargs)
    return True
