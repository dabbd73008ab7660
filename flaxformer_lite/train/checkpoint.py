"""Orbax checkpoints of the train state, the data iterator and the config, and the
workdir rules that keep a user's runs safe.

Layout of a workdir: `config.json` (the resolved config of the run), `checkpoints/<step>/`
(state, data iterator, config, run metadata), TensorBoard event files, `lock.json` while a
process writes it (flaxformer_lite/runtime/lock.py). An interrupted save leaves a
`*.orbax-checkpoint-tmp*` folder that restore ignores (and the next training start
removes), so the latest complete checkpoint always wins.

Every complete step gets `flaxformer_manifest.json` (each file's size) once Orbax has
finalised it. Restoring checks it first, so a truncated or deleted file is found even
where Orbax would read on (a zarr chunk that is missing reads as zeros); any restore that
fails counts as damage too. A damaged newest step is reported in one line and the
previous one used (`restore_latest`); a training then moves the damaged one to
`checkpoints_damaged/` (`set_aside`) so it can write that step again. A workdir whose checkpoints are all damaged is an
error, never a fresh start.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import sys
import threading
import time
from typing import Any, Callable, Collection, Mapping

import grain
import jax
import orbax.checkpoint as ocp

from flaxformer_lite import config as config_lib
from flaxformer_lite.errors import UserError

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
DAMAGED_DIR = 'checkpoints_damaged'
MANIFEST = 'flaxformer_manifest.json'
# Not part of a run's contents: what a writer leaves while it works (flaxformer_lite/runtime/lock.py).
BOOKKEEPING = ('lock.json',)
# Fields besides config.RESUMABLE_FIELDS that may differ on resume: added after runs existed,
# or, for model.width_multiple, one that only picks model.hidden (which is compared).
ALSO_RESUMABLE = ('train.skip_nonfinite', 'model.width_multiple')


class StorageError(Exception):
    """The workdir's disk refused a write (full, quota, read-only, I/O error). Exit status 4:
    the checkpoints written before stay valid; free space and run the command again."""
    exit_status = 4


_STORAGE_ERRNOS = {errno.ENOSPC: 'no space left on device', errno.EDQUOT: 'disk quota exceeded',
                   errno.EROFS: 'read-only file system', errno.EIO: 'input/output error'}
_STORAGE_TEXT = {'No space left on device': 'no space left on device', "os_error_code='28'": 'no space left on device',
                 'Disk quota exceeded': 'disk quota exceeded', "os_error_code='122'": 'disk quota exceeded',
                 'Read-only file system': 'read-only file system', "os_error_code='30'": 'read-only file system'}


def storage_failure(error: BaseException) -> str | None:
    """'no space left on device' (etc.) if `error` or one of its causes is a refused write
    (Orbax and TensorStore wrap the OSError in ValueError with the text), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
            return _STORAGE_ERRNOS[error.errno]
        text = str(error)
        for needle, reason in _STORAGE_TEXT.items():
            if needle in text:
                return reason
        error = error.__cause__ or error.__context__
    return None


class _StorageNoise(logging.Filter):
    """Orbax logs every failed write of a save with a traceback before raising it; the
    training loop reports a full or read-only disk in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else '')
        return not any(needle in text for needle in _STORAGE_TEXT)


_NOISE = _StorageNoise()
logging.getLogger('absl').addFilter(_NOISE)
logging.getLogger().addFilter(_NOISE)


class _ReadOnlyNotice(logging.Filter):
    """Orbax warns 'Given directory is read only' whenever a manager is opened read-only,
    which this project does on purpose to restore (resume, --eval_only, --generate)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.WARNING and record.msg == 'Given directory is read only=%s')


_READ_ONLY_NOTICE = _ReadOnlyNotice()

# The fields a user changes between experiments, most telling first: a refused workdir
# names the first of them that differs (the others differ because of it, or beside it).
MAIN_FIELDS = ('task.name', 'model.name', 'model.size', 'task.dependency_length', 'task.seq_len',
               'optim.learning_rate', 'train.batch_size', 'train.seed')


def _contents(workdir: str) -> list[str]:
    return [n for n in os.listdir(workdir) if n not in BOOKKEEPING and not n.endswith(('.tmp', '.new'))]


def read_config(workdir: str) -> dict[str, Any]:
    """The config.json of a run, or UserError saying it is damaged."""
    path = os.path.join(workdir, CONFIG_FILE)
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f'--workdir={workdir}: {CONFIG_FILE} is damaged ({e}); restore it from a backup, or choose '
                        f'another --workdir') from None
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k), dict) for k in ('model', 'task', 'train')):
        raise UserError(f'--workdir={workdir}: {CONFIG_FILE} is not a flaxformer_lite config (edited by hand?); '
                        f'restore it from a backup, or choose another --workdir')
    return saved


def check_workdir(workdir: str, cfg_dict: Mapping[str, Any], derived: Collection[str] = ()) -> bool:
    """Raise UserError if `workdir` cannot hold this run; True if it holds one to resume.
    `derived`: the config fields that resolution filled in (named after the others).

    Reads only: a workdir that is refused is left exactly as it was.
    """
    from flaxformer_lite.train import results as results_lib
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f'--workdir={workdir} is a file, not a directory; choose another --workdir')
    if not os.path.isdir(workdir) or not _contents(workdir):
        return False
    if not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
        raise UserError(f'--workdir={workdir} is not empty and holds no flaxformer_lite run ({CONFIG_FILE} '
                        f'missing); choose a new or empty --workdir')
    saved = read_config(workdir)
    conflicts = [c for c in config_lib.resume_conflicts(saved, cfg_dict) if c not in ALSO_RESUMABLE]
    # Fields the user set come first, the main ones (MAIN_FIELDS) in their order; fields
    # derived from them (a size row's width, a matched recurrent width) would only repeat the cause.
    rank = {f: i for i, f in enumerate(MAIN_FIELDS)}
    conflicts.sort(key=lambda name: (name in derived, rank.get(name, len(rank))))
    if conflicts:
        flat_saved, flat_now = config_lib.flatten(saved), config_lib.flatten(json.loads(config_lib.to_json(cfg_dict)))
        name, others = conflicts[0], conflicts[1:]
        listed = ', '.join(others[:3]) + (f' and {len(others) - 3} other fields' if len(others) > 3 else '')
        more = f' (also different: {listed})' if others else ''
        if name == 'model.hidden' and name in derived:  # the matching rule changed since
            raise UserError(f'--workdir={workdir} holds a run whose matched width model.hidden={flat_saved[name]} '
                            f'was chosen by an earlier version of flaxformer_lite (this one picks '
                            f'{flat_now.get(name)}); add --config.model.hidden={flat_saved[name]} to continue it, '
                            f'or choose a new --workdir')
        raise UserError(f'--workdir={workdir} holds a run with {name}={flat_saved.get(name)!r}, not '
                        f'{flat_now.get(name)!r}{more}; continue it with its own config or choose a new --workdir')
    results_lib.read(workdir)  # a damaged results.json is an error now, not after training
    return True


def write_config(workdir: str, cfg_dict: Mapping[str, Any]) -> None:
    """Atomically (write + rename) store the resolved config."""
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, CONFIG_FILE + '.tmp')
    with open(tmp, 'w') as f:
        f.write(config_lib.to_json(cfg_dict))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(workdir, CONFIG_FILE))


def _steps_on_disk(directory: str) -> list[int]:
    """Complete steps (folders named by an integer), newest first."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted((int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n))), reverse=True)


def steps_saved(workdir: str) -> list[int]:
    """The complete checkpoint steps of the run in `workdir`, newest first ([] for none)."""
    return _steps_on_disk(os.path.join(workdir, CHECKPOINT_DIR))


def _first_line(error: BaseException) -> str:
    text = ' '.join(str(error).split())
    return f'{type(error).__name__}: {text[:160]}{"..." if len(text) > 160 else ""}'


class Checkpointer:
    """Periodic (asynchronous) saves of state + data iterator + config + run metadata
    (best metrics, time spent: what `results.json` sums over restarts); restore of the
    latest good one. `read_only`: for readers of a run another process may be writing
    (`--eval_only`): nothing is created, cleaned up or moved."""

    def __init__(self, workdir: str, *, max_to_keep: int, async_save: bool = True, read_only: bool = False):
        self.workdir = workdir
        self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
        self.read_only = read_only
        self._async = async_save and not read_only
        self._saved: set[int] = set()  # steps this object saved that have no manifest yet
        self._manifest_lock = threading.Lock()
        # Read-only: no saving options at all (Orbax would reset them, with a warning each).
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else max_to_keep, save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=async_save and not read_only, create=not read_only,
            read_only=read_only, cleanup_tmp_directories=not read_only,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._finalized) if self._async else None)
        absl_logger = logging.getLogger('absl')
        if read_only:
            absl_logger.addFilter(_READ_ONLY_NOTICE)
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options,
                item_handlers={'state': ocp.StandardCheckpointHandler(), 'data': grain.checkpoint.CheckpointHandler(),
                               'config': ocp.JsonCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()})
        finally:
            absl_logger.removeFilter(_READ_ONLY_NOTICE)

    def steps(self) -> list[int]:
        """Complete steps on disk, newest first (re-read: another process may write them)."""
        return _steps_on_disk(self.directory)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[0] if steps else None

    # -- saving -------------------------------------------------------------------------
    def save(self, step: int, state: Any, data_iterator: Any, cfg_dict: Mapping[str, Any],
             meta: Mapping[str, Any]) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=grain.checkpoint.CheckpointSave(data_iterator),
                                  config=ocp.args.JsonSave(json.loads(config_lib.to_json(cfg_dict))),
                                  meta=ocp.args.JsonSave(json.loads(json.dumps(meta))))
        with self._manifest_lock:
            self._saved.add(step)
        self._manager.save(step, args=args, force=True)  # waits for the previous save first
        if not self._async:  # finalised on return
            self._finalized()

    def _finalized(self) -> None:
        """After Orbax finalised a save (its folder has its final name): record the sizes
        of its files (process 0). Runs in Orbax's background thread for async saves."""
        with self._manifest_lock:
            for step in sorted(self._saved):
                folder = os.path.join(self.directory, str(step))
                if os.path.isdir(folder):
                    self._saved.discard(step)
                    if jax.process_index() == 0 and not os.path.exists(os.path.join(folder, MANIFEST)):
                        self._write_manifest(step, folder)

    @staticmethod
    def _write_manifest(step: int, folder: str) -> None:
        """Without a manifest (deleted meanwhile by max_to_keep, or a full disk: the next
        write reports that) the step is checked by restoring it instead."""
        tmp = os.path.join(folder, MANIFEST + '.tmp')
        try:
            files = {}
            for root, _, names in os.walk(folder):
                for name in names:
                    path = os.path.join(root, name)
                    files[os.path.relpath(path, folder)] = os.path.getsize(path)
            with open(tmp, 'w') as f:
                json.dump({'step': step, 'files': files}, f, indent=0, sort_keys=True)
            os.replace(tmp, os.path.join(folder, MANIFEST))
        except OSError:
            try:
                os.remove(tmp)
            except OSError:
                pass

    # -- restoring ----------------------------------------------------------------------
    def verify(self, step: int) -> str | None:
        """What is wrong with `step`'s files by its manifest (None: nothing found; a step
        without a manifest, written by an older version or killed just after Orbax
        finalised it, is checked by restoring it)."""
        folder = os.path.join(self.directory, str(step))
        try:
            with open(os.path.join(folder, MANIFEST)) as f:
                files = json.load(f)['files']
        except FileNotFoundError:
            return None if os.path.isdir(folder) else 'the step folder is gone'
        except (OSError, ValueError, KeyError, TypeError):
            return f'its {MANIFEST} is damaged'
        for rel, size in sorted(files.items()):
            path = os.path.join(folder, rel)
            if not os.path.isfile(path):
                return f'{rel} is missing'
            actual = os.path.getsize(path)
            if actual != size:
                return f'{rel} is {"truncated" if actual < size else "changed"} ({actual} of {size} bytes)'
        return None

    def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> tuple[Any, dict]:
        """(state, meta) at `step`, the state laid out by the shardings in `abstract_state`
        (so a checkpoint written under one mesh restores under another); the data
        iterator, when given, is moved to where it was."""
        items = dict(state=ocp.args.StandardRestore(abstract_state))
        if os.path.isdir(os.path.join(self.directory, str(step), 'meta')):  # absent before results.json
            items['meta'] = ocp.args.JsonRestore()
        if data_iterator is not None:
            items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        state = jax.block_until_ready(restored['state'])  # read everything now: damage shows here
        return state, dict(restored.get('meta') or {})

    def restore_latest(self, abstract_state: Any, data_iterator: Any | None = None, *,
                       warn: Callable[[str], None] | None = None) -> tuple[int, Any, dict, list[int]] | None:
        """(step, state, meta, damaged steps) of the newest step that verifies and restores;
        None when there is no complete step at all. Damaged steps are reported through
        `warn` (one line each); nothing is moved or written here (`set_aside` does that).
        UserError when steps exist but none can be read."""
        warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
        damaged: list[tuple[int, str]] = []
        for step in self.steps():
            reason = self.verify(step)
            if reason is None:
                try:
                    state, meta = self.restore(step, abstract_state, data_iterator)
                except Exception as e:  # noqa: BLE001 -- any failure to read a step is damage
                    if not os.path.isdir(os.path.join(self.directory, str(step))):
                        continue  # deleted meanwhile by the training that writes this workdir (max_to_keep)
                    reason = f'it cannot be restored ({_first_line(e)})'
                else:
                    for bad, why in damaged:
                        where = '' if self.read_only else f' (it goes to {os.path.join(self.workdir, DAMAGED_DIR)}/)'
                        warn(f'warning: checkpoint step {bad} in {self.workdir} is damaged ({why}); using step {step} '
                             f'instead{where}')
                    return step, state, meta, [bad for bad, _ in damaged]
            damaged.append((step, reason))
        if damaged:
            listed = '; '.join(f'step {s}: {why}' for s, why in damaged[:3])
            raise UserError(f'--workdir={self.workdir} holds a run but no readable checkpoint ({listed}); restore '
                            f'{CHECKPOINT_DIR}/ from a backup, or delete --workdir to start the run again')
        return None

    def set_aside(self, steps: Collection[int]) -> None:
        """Move damaged steps out of the manager's way, so the run can write them again
        (process 0 moves; all processes wait for it)."""
        if not steps or self.read_only:
            return
        if jax.process_index() == 0:
            stamp = time.strftime('%Y%m%dT%H%M%S')
            for step in steps:
                where = os.path.join(self.workdir, DAMAGED_DIR, f'{step}-{stamp}')
                os.makedirs(os.path.dirname(where), exist_ok=True)
                shutil.move(os.path.join(self.directory, str(step)), where)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices('flaxformer_set_aside')
        self._manager.reload()

    def wait(self) -> None:
        self._manager.wait_until_finished()
        self._finalized()

    def close(self) -> None:
        self._manager.close()
