"""A sweep as it is run: its trials (readable names, folders), their configs, and the
`sweep.json` that pins the definition to its workdir.

`get_sweep(arg)` in a config file returns the trials; every trial is checked against the
config (fields exist, values have their field's type, a budget and train.steps are not
both set) before anything runs or is written. The first run of a sweep writes
`sweep.json`; a later run compares: trials only added are appended (the recorded ones
keep their index and folder), a recorded trial missing from the definition is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import time
from typing import Any, Mapping

import ml_collections

from flaxformer_lite import config as config_lib
from flaxformer_lite.errors import ConfigError, UserError
from flaxformer_lite.sweep import tuning

SWEEP_FILE = 'sweep.json'
LOG_DIR = 'logs'
CACHE_DIR = 'jax_cache'
ALIASES = {'train.seed': 'seed'}  # shorter names in trial names
SLURM_SCRIPT = 'sweep.sbatch'
# What a runner holding the workdir leaves there (flaxformer_lite/runtime/lock.py), and what a
# tuning stage writes before the main trials are recorded (sweep/tuning.py; on SLURM the
# main trials' script and log folder too).
BOOKKEEPING = ('lock.json', tuning.TUNE_DIR, tuning.TUNING_FILE, CACHE_DIR, SLURM_SCRIPT, LOG_DIR)


def format_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f'{value:g}'
    if isinstance(value, (tuple, list)):
        return '(' + ','.join(format_value(v) for v in value) + ')'
    return str(value)


def trial_name(overrides: Mapping[str, Any], fields: list[str]) -> str:
    """'model.name=lstm,model.size=mini,seed=1': the trial's values of the swept fields."""
    parts = [f'{ALIASES.get(k, k)}={format_value(overrides[k])}' for k in fields if k in overrides]
    return ','.join(parts) or 'base'


def trial_dir(index: int, name: str) -> str:
    """A folder name safe on any filesystem and in shells: '0003_model.name-lstm_seed-1'."""
    safe = re.sub(r'[^A-Za-z0-9._+-]+', '_', name.replace('=', '-').replace(',', '_')).strip('_')
    if len(safe) > 120:
        safe = safe[:100] + '_' + hashlib.sha1(name.encode()).hexdigest()[:8]
    return f'{index:04d}_{safe}'


def overrides_key(overrides: Mapping[str, Any]) -> str:
    """A trial's identity: its overrides as canonical JSON."""
    return json.dumps(overrides, sort_keys=True, default=list)


@dataclasses.dataclass(frozen=True)
class TrialSpec:
    index: int
    name: str
    dir: str
    overrides: dict[str, Any]


@dataclasses.dataclass
class Sweep:
    """A sweep bound to its workdir. `overrides` are the sweep command's `--config.*`
    (applied to every trial before the trial's own)."""
    config: str
    overrides: dict[str, str]
    workdir: str
    trials: list[TrialSpec]
    swept_fields: list[str]
    base: ml_collections.ConfigDict
    recorded: bool  # sweep.json exists and matches
    stage: str = 'main'  # or 'tune': the tuning stage of a tuned sweep, in ROOT/tune

    @property
    def root(self) -> str:
        """The sweep's workdir as the user named it (the tuning stage lives inside it)."""
        return self.workdir if self.stage == 'main' else os.path.dirname(os.path.normpath(self.workdir))

    @property
    def name(self) -> str:
        name = os.path.basename(os.path.normpath(os.path.abspath(self.root)))
        return name if self.stage == 'main' else f'{name}.{self.stage}'

    def trial_workdir(self, trial: TrialSpec) -> str:
        return os.path.join(self.workdir, trial.dir)

    def trial_config(self, trial: TrialSpec) -> ml_collections.ConfigDict:
        return _apply(base_for(self.config, self.overrides, self.base, trial.overrides), trial.overrides)

    def record(self) -> None:
        """Write sweep.json (atomically): the definition this workdir now holds."""
        os.makedirs(self.workdir, exist_ok=True)
        payload = {'config': self.config, 'overrides': self.overrides, 'stage': self.stage,
                   'swept_fields': self.swept_fields,
                   'written': time.strftime('%Y-%m-%dT%H:%M:%S'),
                   'trials': [dataclasses.asdict(t) for t in self.trials]}
        path = os.path.join(self.workdir, SWEEP_FILE)
        tmp = f'{path}.tmp{os.getpid()}'  # array tasks may record the same definition at once
        with open(tmp, 'w') as f:
            json.dump(payload, f, indent=2, default=list)
        os.replace(tmp, path)
        self.recorded = True


def _definition(config_ref: str) -> list[dict[str, Any]] | tuning.Tuned:
    path, _, arg = config_ref.partition(':')
    module = config_lib._module(path)  # noqa: SLF001 -- the same loader as --config
    if not hasattr(module, 'get_sweep'):
        raise UserError(f"--sweep: '{path}' defines no get_sweep(arg); add one that returns a list of trials "
                        f"(see flaxformer_lite/sweep)")
    trials = config_lib.call(module, 'get_sweep', arg or None, path)  # an exception names the file and line
    if isinstance(trials, tuning.Tuned):
        if not trials.main:
            raise UserError(f'--sweep: get_sweep({arg!r}) of {path} returned a tuned sweep without main trials')
        return trials
    if not isinstance(trials, (list, tuple)) or not all(isinstance(t, Mapping) for t in trials):
        raise UserError(f'--sweep: get_sweep of {path} must return a list of trials (dicts of field -> value)')
    if not trials:
        raise UserError(f'--sweep: get_sweep({arg!r}) of {path} returned no trials')
    return [dict(t) for t in trials]


def base_for(config_ref: str, overrides: Mapping[str, str], base: ml_collections.ConfigDict,
             trial: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The config a trial starts from. A trial that sets `task.name` to another task
    starts from `get_config('ARG,task=NAME')` (each task has its own knobs), so the
    config file's get_config must take `task=` (make_config does)."""
    name = trial.get('task.name')
    if name is None or name == base.task.name:
        return base
    path, _, arg = config_ref.partition(':')
    return config_lib.load(f"{path}:{','.join(a for a in (arg, f'task={name}') if a)}", overrides)


def _apply(base: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    cfg = copy.deepcopy(base)
    for field, value in overrides.items():
        config_lib.set_field(cfg, field, value, parse=False)
    return cfg


def _check(config_ref: str, overrides: Mapping[str, str], base: ml_collections.ConfigDict, index: int,
           trial: Mapping[str, Any]) -> None:
    try:
        config_lib.check(_apply(base_for(config_ref, overrides, base, trial), trial))
    except ConfigError as e:
        raise ConfigError(f'--sweep: trial {index} ({overrides_key(trial)}): {e}') from None


def naming_fields(trials: list[dict[str, Any]], fields: list[str]) -> list[str]:
    """The swept fields a name needs: one that another (earlier) named field determines,
    as a learning rate zipped with the family or a seq_len zipped with the dependency
    length, is left out of names (it stays in sweep.json and the HParams tab)."""
    named: list[str] = []
    for f in fields:
        determined = False
        for g in named:
            seen: dict[str, str] = {}
            value = lambda t, k: overrides_key({k: t.get(k)})  # noqa: E731
            if all(seen.setdefault(value(t, g), value(t, f)) == value(t, f) for t in trials):
                determined = True
                break
        if not determined:
            named.append(f)
    return named


def swept(trials: list[dict[str, Any]]) -> list[str]:
    """Fields whose value differs between trials (in order of first appearance)."""
    fields: list[str] = []
    for t in trials:
        fields += [k for k in t if k not in fields]
    return [f for f in fields if len({overrides_key({f: t.get(f, '<unset>')}) for t in trials}) > 1]


def tuned_definition(config_ref: str, overrides: Mapping[str, str]) -> tuning.Tuned | None:
    """The tuning definition of a tuned sweep (checked), or None for a plain sweep."""
    tuned = _definition(config_ref)
    if not isinstance(tuned, tuning.Tuned):
        return None
    base = config_lib.load(config_ref, overrides)
    tuning.check(tuned, lambda field: _has_field(base, field))
    return tuned


def _has_field(cfg: ml_collections.ConfigDict, field: str) -> bool:
    node: Any = cfg
    for part in field.split('.'):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def load(config_ref: str, overrides: Mapping[str, str], workdir: str, stage: str = 'main',
         provisional: bool = False) -> Sweep:
    """The sweep of `config_ref` bound to `workdir`: validated, with indices and folders
    (the recorded ones where sweep.json exists). Reads only. For a tuned sweep, `stage`
    'tune' is its tuning stage (in WORKDIR/tune) and 'main' its main trials with the values
    chosen in WORKDIR/tuning.json: before the choice, an error, or with `provisional` the
    main trials without them (to list or count them)."""
    base = config_lib.load(config_ref, overrides)
    defined = _definition(config_ref)
    if isinstance(defined, tuning.Tuned):
        tuned = defined
        tuning.check(tuned, lambda field: _has_field(base, field))
        if stage == 'tune':
            defined = tuning.tune_trials(tuned, tuning.extensions_of(workdir))
            workdir = os.path.join(workdir, tuning.TUNE_DIR)
        else:
            record = tuning.read(workdir)
            if record is None or record.get('pending_extensions'):
                if not provisional:
                    raise UserError(f'--workdir={workdir}: the tuning stage has not chosen its values yet; run the '
                                    f'sweep command without --trial first (or wait for the tuning job array)')
                defined = [dict(t) for t in tuned.main]
            else:
                defined = tuning.main_trials(tuned, record)
    elif stage != 'main':
        raise UserError(f'--stage={stage}: {config_ref} defines no tuning stage (get_sweep returns plain trials)')
    seen: dict[str, int] = {}
    for i, overrides_i in enumerate(defined):
        key = overrides_key(overrides_i)
        if key in seen:
            raise UserError(f'--sweep: trials {seen[key]} and {i} are the same ({key}); each trial must differ')
        seen[key] = i
        _check(config_ref, overrides, base, i, overrides_i)
    fields = swept(defined)
    path = os.path.join(workdir, SWEEP_FILE)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f'--workdir={workdir} is a file, not a directory; choose another --workdir')
    names = naming_fields(defined, fields)
    if not os.path.isfile(path):
        if os.path.isdir(workdir) and [n for n in os.listdir(workdir) if n not in BOOKKEEPING]:
            raise UserError(f'--workdir={workdir} is not empty and holds no sweep ({SWEEP_FILE} missing); choose a new '
                            f'or empty --workdir')
        trials = [TrialSpec(i, trial_name(t, names), trial_dir(i, trial_name(t, names)), t)
                  for i, t in enumerate(defined)]
        return Sweep(config_ref, dict(overrides), workdir, trials, fields, base, recorded=False, stage=stage)
    try:
        with open(path) as f:
            old = json.load(f)
        recorded = [TrialSpec(int(t['index']), t['name'], t['dir'], dict(t['overrides'])) for t in old['trials']]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f'--workdir={workdir}: cannot read {SWEEP_FILE} ({e}); it is damaged: restore it or use a new '
                        f'--workdir') from None
    if dict(old.get('overrides', {})) != dict(overrides):
        raise UserError(f"--workdir={workdir} holds this sweep run with --config overrides {old.get('overrides')}, not "
                        f'{dict(overrides)}; give the same overrides or choose a new --workdir')
    keys = {overrides_key(t.overrides) for t in recorded}
    for t in recorded:
        if overrides_key(t.overrides) not in seen:
            raise UserError(f'--workdir={workdir}: the sweep definition changed: trial {t.index} ({t.name}) is no longer '
                            f'in it; restore the definition or choose a new --workdir (trials may only be added)')
    trials = sorted(recorded, key=lambda t: t.index)
    old_fields = list(old.get('swept_fields', fields))
    fields = old_fields + [f for f in fields if f not in old_fields]
    names = naming_fields(defined, fields)
    for t in defined:  # trials added since: new indices after the recorded ones
        if overrides_key(t) not in keys:
            index = len(trials)
            trials.append(TrialSpec(index, trial_name(t, names), trial_dir(index, trial_name(t, names)), t))
    added = len(trials) > len(recorded)
    return Sweep(config_ref, dict(overrides), workdir, trials, fields, base, recorded=not added, stage=stage)
