"""Configs: defaults, the size table, config files and their overrides, checks.

Every run is described by one locked `ml_collections.ConfigDict`. Config files in
`configs/` call `make_config(arg, task=...)`; `load` imports a config file, calls its
`get_config(ARG)` and applies each `--config.a.b=value` override with `set_field`, the
same reader as the ARG string's fields (`config_args.py`). Anything that cannot work
raises `ConfigError` with one line naming the field and the fix, before a workdir is
touched.

Where fields are declared: `task.*` by each task (`tasks.default_config`); `model.*` in
`models/knobs.py`, the fields every family reads (its SHARED) and each family's own
knobs (a block per family). A new family's fields go there, in a block listed under its
registry name in BY_FAMILY; `base_config` puts every block into the one flat `model`
namespace. The size table (SIZES) and the other groups (train, optim, eval, checkpoint,
mesh, data) are here.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
from typing import Any, Mapping

import ml_collections
from ml_collections.config_dict import placeholder

from flaxformer_lite import tasks
from flaxformer_lite.config_args import experiment_options, flatten, parse_arg, set_field
from flaxformer_lite.errors import ConfigError, UserError
from flaxformer_lite.models import knobs

__all__ = ['SIZES', 'RESUMABLE_FIELDS', 'base_config', 'make_config', 'experiment_options', 'parse_arg', 'flatten',
           'set_field', 'load', 'call', 'check', 'check_parametrization', 'resume_conflicts', 'to_json', 'from_saved']

# One table of model sizes (big_vision style). A field of `model` left unset (None)
# takes the value of the row named by `model.size`. Recurrent models use the row's
# depth and pick the width whose non-embedding parameter count matches the row's
# Transformer (`models/recurrent_family.py`), so `size=` means "the same N" in every family.
# Encoder-decoder models use `num_layers` for each stack unless the row says otherwise.
SIZES: dict[str, dict[str, Any]] = {
    #          layers, width, heads, mlp  -> non-embedding parameters of a decoder-only stack
    'micro': dict(num_layers=2, d_model=32, num_heads=2, d_ff=128),  # 0.025M (quick CPU experiments)
    'tiny': dict(num_layers=2, d_model=64, num_heads=4, d_ff=256),  # 0.1M
    'mini': dict(num_layers=4, d_model=128, num_heads=4, d_ff=512),  # 0.8M
    'small': dict(num_layers=6, d_model=256, num_heads=8, d_ff=1024),  # 4.7M
    'medium': dict(num_layers=8, d_model=512, num_heads=8, d_ff=2048),  # 25M
    'base': dict(num_layers=12, d_model=768, num_heads=12, d_ff=3072),  # 85M
    'large': dict(num_layers=24, d_model=1024, num_heads=16, d_ff=4096),  # 302M
    'xl': dict(num_layers=24, d_model=1536, num_heads=16, d_ff=6144),  # 680M
    '1b': dict(num_layers=24, d_model=2048, num_heads=16, d_ff=8192),  # 1.2B
    # Vaswani et al. (2017), Table 3: 6+6 layers, post-norm, ReLU, sinusoidal positions,
    # shared embeddings scaled by sqrt(d_model). Use a task vocabulary of ~37k for the 65M.
    'vaswani_base': dict(num_layers=6, d_model=512, num_heads=8, d_ff=2048, dropout=0.1,
                         norm_position='post', ffn='relu', pos_encoding='sinusoidal'),
    'vaswani_big': dict(num_layers=6, d_model=1024, num_heads=16, d_ff=4096, dropout=0.3,
                        norm_position='post', ffn='relu', pos_encoding='sinusoidal'),
}

# Fields that may change when a run in an existing workdir is continued: how long it
# runs and how it is watched, saved or laid out. Anything else changes the experiment.
RESUMABLE_FIELDS = ('train.steps', 'train.tokens', 'train.flops_budget', 'train.log_every', 'eval.',
                    'checkpoint.', 'mesh.', 'data.')


def base_config(task_name: str) -> ml_collections.ConfigDict:
    """All fields with their defaults; `task` holds the named task's own knobs."""
    c = ml_collections.ConfigDict()

    # models/knobs.py: a type there is a field left unset (None) of that type.
    c.model = ml_collections.ConfigDict({k: placeholder(v) if isinstance(v, type) else v
                                         for k, v in knobs.declared().items()})

    c.task = tasks.default_config(task_name)

    c.train = ml_collections.ConfigDict(dict(
        steps=2000,  # or unset it (train.steps=none) and give a budget:
        tokens=placeholder(float),  # training tokens: steps = tokens / (batch_size * tokens per example)
        flops_budget=placeholder(float),  # training FLOPs (accounting.py): steps = budget / (batch * FLOPs per example)
        batch_size=32,  # global batch, split over data-parallel devices and hosts
        seed=0,  # parameter init, dropout and shuffling (the data itself: task.seed)
        log_every=50,  # steps between train/* summaries and progress lines
        label_smoothing=0.0,
        skip_nonfinite=False,  # NaN/Inf loss or gradients: False stops the run (exit 3); True skips the update
        # Start from another run's weights (train/transfer.py): parameters of the same path and shape
        # load, the others (a new head, another vocabulary) start fresh; the optimizer starts fresh.
        init_from=placeholder(str),  # the workdir of that run
        init_step=placeholder(int),  # its checkpoint step (default: the latest good one)
        init_exclude=(),  # path globs left fresh, e.g. ('head', 'embed')
        init_require=(),  # path globs that must load (an error names any that cannot)
        init_map=(),  # 'SOURCE_PREFIX:PREFIX_HERE' renames, e.g. ('decoder:encoder',) (a causal stack into an encoder)
        freeze=(),  # path globs kept fixed during training (linear probes, partial fine-tuning)
    ))
    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=1e-3,  # peak
        schedule='cosine',  # cosine | constant | rsqrt (the paper's inverse square root)
        warmup_steps=100,
        decay_steps=placeholder(int),  # cosine horizon; unset: train.steps
        end_learning_rate_ratio=0.0,  # cosine floor as a fraction of the peak
        weight_decay=0.01,  # decoupled (AdamW); kernels and embeddings only (train/optimizer.py: DECAYED)
        b1=0.9,
        b2=0.98,
        eps=1e-9,
        grad_clip=1.0,  # global norm; 0 disables
        # sp: the standard parametrisation. mup: Tensor Programs V's for Adam (models/mup.py): a
        # learning rate tuned at width optim.base_width holds at the model's width (the Transformer's
        # d_model, the other families' hidden). mup at width == base_width computes sp's numbers.
        parametrization='sp',
        base_width=placeholder(int),  # mup's base width (<= the model's); unused by sp
    ))
    c.eval = ml_collections.ConfigDict(dict(
        every_steps=200,
        num_examples=512,  # held-out examples per evaluation (the same ones every time)
        batch_size=placeholder(int),  # unset: train.batch_size
        dependency_lengths=placeholder(tuple),  # also evaluate at these task.dependency_length values
        decode=True,  # sequence-to-sequence tasks: exact match of autoregressive output
    ))
    c.checkpoint = ml_collections.ConfigDict(dict(
        every_steps=500,
        max_to_keep=3,
        async_save=True,
    ))
    c.mesh = ml_collections.ConfigDict(dict(
        data=-1,  # -1: the devices left over by the other axes
        fsdp=1,
        tensor=1,
        num_devices=-1,  # use the first N devices (-1: all of them)
        rules='auto',  # auto | dp | fsdp | tp | fsdp_tp: logical axis name -> mesh axes
        custom_rules=placeholder(tuple),  # ((logical_name, mesh_axis_or_None), ...) applied on top
    ))
    c.data = ml_collections.ConfigDict(dict(
        threads=1,  # grain read threads generating examples
        prefetch=4,  # batches prepared ahead of the device
    ))
    return c


def make_config(arg: str | None, *, task: str, defaults: Mapping[str, Any] | None = None,
                quick: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The config of one experiment: base defaults, then `defaults`, then the arg string.

    The arg string takes `model=NAME`, `size=NAME`, `task=NAME`, `quick` (apply `quick`: a
    run small enough for a 2-core CPU; a value that is itself a dict holds the fields of
    the task it is named after) and any dotted field, e.g. `train.steps=300`.
    """
    args = parse_arg(arg)
    task = args.pop('task', task)
    cfg = base_config(task)
    for key, value in (defaults or {}).items():
        set_field(cfg, key, value)
    if args.pop('quick', False):
        for key, value in (quick or {}).items():
            if isinstance(value, Mapping):  # {task name: its own quick fields}, for multi-task files
                if key == task:
                    for sub_key, sub_value in value.items():
                        set_field(cfg, sub_key, sub_value)
            else:
                set_field(cfg, key, value)
    for key, value in args.items():
        if key in ('model', 'size'):
            key = f'model.{"name" if key == "model" else "size"}'
        elif '.' not in key:
            raise ConfigError(
                f"config argument '{key}' is not known; use model=, size=, task=, quick "
                f"or a dotted field such as train.steps=300")
        set_field(cfg, key, value)
    cfg.lock()
    return cfg


def _config_error(path: str, error: BaseException, what: str) -> ConfigError:
    """One line naming the config file, the line in it and the exception."""
    if isinstance(error, SyntaxError) and error.filename and os.path.abspath(error.filename) == os.path.abspath(path):
        return ConfigError(f"--config: {path}, line {error.lineno}: SyntaxError: {error.msg}; fix the file")
    line = None
    tb = error.__traceback__
    while tb is not None:  # the innermost frame in the config file itself
        if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
            line = tb.tb_lineno
        tb = tb.tb_next
    where = f', line {line}' if line is not None else ''
    message = ' '.join(str(error).split()) or '(no message)'
    return ConfigError(f'--config: {path}{where}: {what} raised {type(error).__name__}: {message[:300]}; fix the file')


def _module(path: str):
    """Import a config file; a file that does not import (syntax error, an exception at
    import) or defines no get_config is one line naming the file and the line."""
    module_spec = importlib.util.spec_from_file_location(f'_flaxformer_config_{abs(hash(path))}', path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 -- whatever the file raises is the user's to fix
        raise _config_error(path, e, 'importing it') from None
    if not hasattr(module, 'get_config'):
        raise ConfigError(f"--config: '{path}' defines no get_config(arg)")
    return module


def call(module, name: str, arg: str | None, path: str):
    """`module.<name>(arg)` (get_config, get_sweep, get_report of a config file); an
    exception it raises (other than our own one-line errors) names the file and line."""
    try:
        return getattr(module, name)(arg)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _config_error(path, e, f'{name}({arg!r})') from None


def load(spec: str, overrides: Mapping[str, str] = ()) -> ml_collections.ConfigDict:
    """`FILE.py[:ARG]` -> `get_config(ARG)` from FILE, then each `--config.a.b=v` override
    through `set_field` (the reader of the ARG string's fields too: a flag means what the
    same field means in the ARG string). Returns the config locked."""
    path, _, arg = spec.partition(':')
    if not path.endswith('.py'):
        raise ConfigError(f"--config={spec}: expected a Python file, e.g. --config=configs/recall.py:model=lstm")
    if not os.path.isfile(path):
        raise ConfigError(f"--config: config file '{path}' does not exist; see configs/ for the "
                          f"available ones")
    cfg = call(_module(path), 'get_config', arg or None, path)
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f'--config: {path}: get_config({arg or None!r}) returned {type(cfg).__name__}, not a '
                          f'ConfigDict; return make_config(arg, task=...)')
    for dotted, raw in dict(overrides).items():
        set_field(cfg, dotted, raw)
    cfg.lock()
    return cfg


def check(cfg: ml_collections.ConfigDict) -> None:
    """Checks that need no model or task: positive counts, known choices."""
    positive = ('train.batch_size', 'train.log_every', 'eval.every_steps',
                'eval.num_examples', 'checkpoint.every_steps', 'checkpoint.max_to_keep',
                'data.threads')
    flat = flatten(cfg.to_dict())
    for name in positive:
        if not (isinstance(flat[name], int) and flat[name] > 0):
            raise ConfigError(f'config field {name}={flat[name]!r} must be a positive integer')
    if flat['train.steps'] is not None and not (isinstance(flat['train.steps'], int) and flat['train.steps'] > 0):
        raise ConfigError(f"config field train.steps={flat['train.steps']!r} must be a positive integer")
    if flat['eval.batch_size'] is not None and flat['eval.batch_size'] <= 0:
        raise ConfigError('config field eval.batch_size must be a positive integer (or unset)')
    if cfg.model.size not in SIZES:
        close = difflib.get_close_matches(cfg.model.size, list(SIZES), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"choose one of {', '.join(SIZES)}"
        raise ConfigError(f"model.size='{cfg.model.size}' is not in the size table; {hint}")
    choices = {
        'optim.schedule': ('cosine', 'constant', 'rsqrt'),
        'model.dtype': ('float32', 'bfloat16'),
        'model.remat': ('none', 'full', 'dots'),
    }
    for name, allowed in choices.items():
        if flat[name] not in allowed:
            raise ConfigError(f"config field {name}='{flat[name]}' is not one of {', '.join(allowed)}")
    if not 0.0 <= cfg.train.label_smoothing < 1.0:
        raise ConfigError('config field train.label_smoothing must be in [0, 1)')
    budgets = [f'train.{k}={cfg.train[k]:g}' for k in ('tokens', 'flops_budget') if cfg.train[k] is not None]
    if len(budgets) > 1:
        raise ConfigError(f'{budgets[0]} and {budgets[1]} both set the length of the run; keep one of them')
    if budgets and cfg.train.steps is not None:
        raise ConfigError(f'train.steps={cfg.train.steps} and {budgets[0]} both set the length of the run; unset '
                          f'train.steps (train.steps=none in the --config arg, or --config.train.steps=None)')
    if not budgets and cfg.train.steps is None:
        raise ConfigError('train.steps is unset and no budget is given; set train.steps, train.tokens or '
                          'train.flops_budget')
    for key in ('tokens', 'flops_budget'):
        if cfg.train[key] is not None and not cfg.train[key] > 0:
            raise ConfigError(f'config field train.{key}={cfg.train[key]!r} must be positive')
    if cfg.optim.learning_rate <= 0:
        raise ConfigError('config field optim.learning_rate must be positive')
    if cfg.optim.warmup_steps < 0:
        raise ConfigError('config field optim.warmup_steps must be >= 0')
    check_parametrization(cfg.optim)


def check_parametrization(optim: ml_collections.ConfigDict) -> None:
    """optim.parametrization and optim.base_width (the model's own width is checked
    against it in `resolve.from_config`)."""
    if optim.parametrization not in ('sp', 'mup'):
        close = difflib.get_close_matches(str(optim.parametrization), ['sp', 'mup'], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ''
        raise ConfigError(f"config field optim.parametrization='{optim.parametrization}' is not one of sp, mup"
                          f"{hint}")
    base = optim.base_width
    if base is not None and (isinstance(base, bool) or not isinstance(base, int) or base <= 0):
        raise ConfigError(f'config field optim.base_width={base!r} must be a positive integer (the width the '
                          f'learning rate was tuned at)')
    if optim.parametrization == 'mup' and base is None:
        raise ConfigError('optim.parametrization=mup needs optim.base_width: set it to the width the learning '
                          'rate was tuned at (the model\'s own width makes mup equal sp)')


def resume_conflicts(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Fields (flattened) whose values differ between a saved run and this config,
    other than the ones a continued run may change (RESUMABLE_FIELDS) and fields the
    saved config lacks that hold their default (added to the code since)."""
    a, b = flatten(json.loads(to_json(saved))), flatten(json.loads(to_json(current)))
    # A field added to the code after the run was saved is no conflict at its default.
    defaults = flatten(json.loads(to_json(base_config(b.get('task.name') or a.get('task.name')))))
    out = []
    for name in sorted(set(a) | set(b)):
        if any(name == f or (f.endswith('.') and name.startswith(f)) for f in RESUMABLE_FIELDS):
            continue
        if name not in a and name in defaults and b.get(name) == defaults[name]:
            continue
        if a.get(name) != b.get(name):
            out.append(name)
    return out


def to_json(cfg: ml_collections.ConfigDict | Mapping[str, Any]) -> str:
    tree = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg
    return json.dumps(tree, indent=2, sort_keys=True, default=list)


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the config holds."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def from_saved(saved: Mapping[str, Any], source: str) -> ml_collections.ConfigDict:
    """The (resolved) config a run stored in its `config.json`, as a locked ConfigDict of
    the same types as `base_config`, so that `resolve.from_config` accepts it again.
    `source` names the file in errors (a field this code does not know, a bad value)."""
    try:
        task_name = saved['task']['name']
        cfg = base_config(task_name)
        for dotted, value in flatten(saved).items():
            set_field(cfg, dotted, _tuples(value), parse=False)
    except (KeyError, TypeError, ConfigError) as e:
        raise ConfigError(f'{source} does not hold a config this code can read ({e}); it was written by another '
                          f'version of flaxformer_lite, or edited by hand') from None
    cfg.lock()
    return cfg
