"""Orbax checkpoints of the train state, the data iterator and the config, and the
workdir rules that keep a user's runs safe.

Layout of a workdir: `config.json` (the resolved config of the run), `checkpoints/<step>/`
(state, data iterator, config), TensorBoard event files. An interrupted save leaves a
`*.orbax-checkpoint-tmp*` folder that restore ignores, so the latest complete checkpoint
always wins.
"""

from __future__ import annotations

import json
import os
from typing import Any, Collection, Mapping

import grain
import orbax.checkpoint as ocp

from flaxformer_lite import config as config_lib
from flaxformer_lite.errors import UserError

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'


def check_workdir(workdir: str, cfg_dict: Mapping[str, Any], derived: Collection[str] = ()) -> bool:
    """Raise UserError if `workdir` cannot hold this run; True if it holds one to resume.
    `derived`: the config fields that resolution filled in (named after the others).

    Reads only: a workdir that is refused is left exactly as it was.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f'--workdir={workdir} is a file, not a directory; choose another --workdir')
    if not os.path.isdir(workdir) or not os.listdir(workdir):
        return False
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise UserError(f'--workdir={workdir} is not empty and holds no flaxformer_lite run ({CONFIG_FILE} '
                        f'missing); choose a new or empty --workdir')
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'--workdir={workdir}: cannot read {CONFIG_FILE} ({e}); choose another --workdir') from None
    conflicts = config_lib.resume_conflicts(saved, cfg_dict)
    # Fields the user set come first; fields derived from them (a size row's width, a
    # matched recurrent width) would only repeat the cause.
    conflicts.sort(key=lambda name: name in derived)
    if conflicts:
        flat_saved, flat_now = config_lib.flatten(saved), config_lib.flatten(json.loads(config_lib.to_json(cfg_dict)))
        name = conflicts[0]
        more = f' (and {len(conflicts) - 1} more: {", ".join(conflicts[1:4])})' if len(conflicts) > 1 else ''
        raise UserError(f'--workdir={workdir} holds a run with {name}={flat_saved.get(name)!r}, not '
                        f'{flat_now.get(name)!r}{more}; continue it with its own config or choose a new --workdir')
    return True


def write_config(workdir: str, cfg_dict: Mapping[str, Any]) -> None:
    """Atomically (write + rename) store the resolved config."""
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, CONFIG_FILE + '.tmp')
    with open(tmp, 'w') as f:
        f.write(config_lib.to_json(cfg_dict))
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


class Checkpointer:
    """Periodic (asynchronous) saves of state + data iterator + config + run metadata
    (best metrics, time spent: what `results.json` sums over restarts); restore of the latest."""

    def __init__(self, workdir: str, *, max_to_keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True)
        self._manager = ocp.CheckpointManager(
            os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)), options=options,
            item_handlers={'state': ocp.StandardCheckpointHandler(), 'data': grain.checkpoint.CheckpointHandler(),
                           'config': ocp.JsonCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, data_iterator: Any, cfg_dict: Mapping[str, Any],
             meta: Mapping[str, Any]) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(data_iterator),
                                  config=ocp.args.JsonSave(json.loads(config_lib.to_json(cfg_dict))),
                                  meta=ocp.args.JsonSave(json.loads(json.dumps(meta))))
        self._manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> tuple[Any, dict]:
        """(state, meta) at `step`, the state laid out by the shardings in `abstract_state`
        (so a checkpoint written under one mesh restores under another); the data
        iterator, when given, is moved to where it was."""
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        if os.path.isdir(os.path.join(self._manager.directory, str(step), 'meta')):  # absent before results.json
            items['meta'] = ocp.args.JsonRestore()
        if data_iterator is not None:
            items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored['state'], dict(restored.get('meta') or {})

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
