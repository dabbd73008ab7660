"""One writer per workdir: `lock.json` names the process that writes a run (or runs a sweep).

A second training, sweep runner or job-array task on a workdir in use is refused at once,
with the holder named (host, pid, since when). A lock that a killed process left behind
never blocks: on the holder's host a lock is stale when its pid is gone (or is a zombie,
or is another process that reused the pid: the start time differs, or the machine
rebooted); on another host when its heartbeat (rewritten every HEARTBEAT_S by a
background thread) is older than STALE_S. A stale lock is taken over with a one-line
warning. Readers (`--eval_only`, `--report`) never take the lock.

Creation is atomic on local and network filesystems: the record is written to a private
file and hard-linked to `lock.json` (link fails if the name exists). Takeover renames the
stale file away first (only one contender can rename it) and checks that what it renamed
is the stale record it judged. A holder whose lock was taken over while it was alive
(suspended past STALE_S, say) notices at its next heartbeat: `lost` becomes True and the
training loop stops before it would write a checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from flaxformer_lite.errors import UserError

LOCK_FILE = 'lock.json'
HEARTBEAT_S = float(os.environ.get('FLAXFORMER_LOCK_HEARTBEAT_S', 30))
STALE_S = float(os.environ.get('FLAXFORMER_LOCK_STALE_S', 300))

_HELD: dict[str, 'WorkdirLock'] = {}  # realpath of the workdir -> the lock this process holds


def _boot_id() -> str | None:
    try:
        with open('/proc/sys/kernel/random/boot_id') as f:
            return f.read().strip()
    except OSError:
        return None


def _proc_start(pid: int) -> tuple[str | None, str | None]:
    """(state, start time in clock ticks since boot) of `pid` from /proc; (None, None) if gone."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            fields = f.read().rsplit(')', 1)[1].split()
    except (OSError, IndexError):
        return None, None
    return fields[0], fields[19]


def _record(kind: str) -> dict[str, Any]:
    now = time.time()
    return {'host': socket.gethostname(), 'pid': os.getpid(), 'pid_start': _proc_start(os.getpid())[1],
            'boot_id': _boot_id(), 'since': time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(now)),
            'heartbeat': now, 'kind': kind, 'token': uuid.uuid4().hex,
            'command': ' '.join(sys.argv)[:500]}


def read(workdir: str) -> dict[str, Any] | None:
    """The lock record in `workdir` ({} when the file is unreadable), None when there is none."""
    try:
        with open(os.path.join(workdir, LOCK_FILE)) as f:
            record = json.load(f)
        return record if isinstance(record, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def stale_reason(record: dict[str, Any]) -> str | None:
    """Why the holder of `record` is gone (None: it is alive, so the lock holds)."""
    if not record or not isinstance(record.get('pid'), int):
        return 'the lock file is unreadable'
    if record.get('host') == socket.gethostname():
        if record.get('boot_id') and _boot_id() and record['boot_id'] != _boot_id():
            return 'the machine has rebooted since'
        state, start = _proc_start(record['pid'])
        if state is None:
            if os.path.isdir('/proc/self'):
                return 'that process is gone'
            try:  # no /proc (not Linux): ask the kernel
                os.kill(record['pid'], 0)
            except ProcessLookupError:
                return 'that process is gone'
            except PermissionError:
                pass
            return None
        if state in ('Z', 'X'):
            return 'that process has exited'
        if record.get('pid_start') and start != record['pid_start']:
            return 'that process is gone (its pid now belongs to another one)'
        return None
    age = time.time() - float(record.get('heartbeat') or 0)
    if age > STALE_S:
        return f'its last heartbeat is {age:.0f} s old (stale after {STALE_S:.0f} s)'
    return None


def describe(record: dict[str, Any]) -> str:
    return (f"pid {record.get('pid')} on host {record.get('host')} since {record.get('since')} "
            f"({record.get('kind', 'run')})")


def holder(workdir: str) -> dict[str, Any] | None:
    """The live process holding `workdir` (its record), or None if it is free or stale."""
    record = read(workdir)
    if record is None or stale_reason(record) is not None:
        return None
    return record


def _refuse(workdir: str, flag: str, record: dict[str, Any]) -> UserError:
    return UserError(f'{flag}={workdir} is in use by {describe(record)}; wait for it to finish or stop it, or '
                     f'choose another {flag} (a lock left by a killed process is taken over automatically)')


def check_free(workdir: str, flag: str = '--workdir') -> None:
    """Raise UserError naming the holder if a live process holds `workdir` (reads only)."""
    record = holder(workdir)
    if record is not None and not _mine(workdir, record):
        raise _refuse(workdir, flag, record)


def _mine(workdir: str, record: dict[str, Any]) -> bool:
    held = _HELD.get(os.path.realpath(workdir))
    return held is not None and held.record.get('token') == record.get('token')


class WorkdirLock:
    """A held lock; `release()` removes it. Nested acquisitions in one process share it."""

    def __init__(self, workdir: str, record: dict[str, Any], created_dir: bool):
        self.workdir, self.record, self.created_dir = workdir, record, created_dir
        self.path = os.path.join(workdir, LOCK_FILE)
        self.lost: dict[str, Any] | None = None  # the record of whoever took it over
        self._depth = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name='workdir-lock-heartbeat', daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            record = read(self.workdir)
            if not record or record.get('token') != self.record['token']:
                self.lost = record or {'pid': '?', 'host': '?', 'since': '?'}
                return
            try:
                _write_atomic(self.path, dict(self.record, heartbeat=time.time()))
            except OSError:
                pass  # a full or read-only disk: the training loop reports it where it writes

    def release(self, *, undo: bool = False) -> None:
        """Drop the lock. `undo`: the run wrote nothing, so leave the workdir as it was
        (also remove the workdir if acquiring created it)."""
        self._depth -= 1
        if self._depth > 0:
            return
        self._stop.set()
        _HELD.pop(os.path.realpath(self.workdir), None)
        try:
            record = read(self.workdir)
            if record is not None and record.get('token') == self.record['token']:
                os.remove(self.path)
            if undo and self.created_dir:
                os.rmdir(self.workdir)  # only if empty
        except OSError:
            pass  # read-only or gone: a lock of a dead pid is stale for the next run anyway


def _write_atomic(path: str, record: dict[str, Any]) -> None:
    tmp = f'{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp'
    try:
        with open(tmp, 'w') as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _link_new(path: str, record: dict[str, Any]) -> bool:
    """Create `path` holding `record` if it does not exist (atomic); False if it exists."""
    tmp = f'{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.new'
    with open(tmp, 'w') as f:
        json.dump(record, f, indent=1)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.remove(tmp)


def acquire(workdir: str, *, kind: str = 'training', flag: str = '--workdir', quiet: bool = False) -> WorkdirLock:
    """Take the lock of `workdir` (created if missing) or raise UserError naming the holder."""
    key = os.path.realpath(workdir)
    if key in _HELD:
        _HELD[key]._depth += 1
        return _HELD[key]
    created = not os.path.isdir(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise UserError(f'{flag}={workdir} cannot be created ({e.strerror}); choose a writable {flag}') from None
    path = os.path.join(workdir, LOCK_FILE)
    record = _record(kind)
    try:
        for _ in range(5):
            if _link_new(path, record):
                break
            old = read(workdir)
            if old is None:
                continue  # released in between: try again
            reason = stale_reason(old)
            if reason is None:
                raise _refuse(workdir, flag, old)
            aside = f'{path}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}'
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue  # another contender moved it first
            try:
                with open(aside) as f:
                    moved = json.load(f)
            except (OSError, ValueError):
                moved = {}
            if old and moved.get('token') != old.get('token'):  # not the stale one: a fresh lock; put it back
                try:
                    os.link(aside, path)
                except FileExistsError:
                    pass
                os.remove(aside)
                continue
            os.remove(aside)
            if not quiet:
                print(f'warning: {flag}={workdir}: took over the lock of {describe(old)}: {reason}',
                      file=sys.stderr, flush=True)
        else:
            current = read(workdir) or {}
            raise _refuse(workdir, flag, current)
    except OSError as e:
        if created:
            try:
                os.rmdir(workdir)
            except OSError:
                pass
        raise UserError(f'{flag}={workdir} cannot be written ({e.strerror}); choose a writable {flag} or free '
                        f'space on its disk') from None
    lock = WorkdirLock(workdir, record, created)
    _HELD[key] = lock
    return lock
