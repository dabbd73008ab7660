"""A fork server: one process imports jax, flax, orbax, grain and this package once, then
forks a child per request, so a child does not spend seconds importing them (4 s under
load on a 2-core CPU, measured; a quick sweep runs dozens of trials). The local sweep
runner starts each trial this way (sweep/trial.py's `main`), and the tests start their
kill-and-resume runs the same way.

The server never initialises a JAX backend, so every child starts as a fresh process
would: it sets its CPU affinity before XLA sizes its thread pool, then calls the
function the request names (`"module:function"`, given the request's arguments) and
exits with the status it returns, its output appended to the request's log.

Signals and death, as with plain subprocesses: the starter signals a child by its pid;
the server ignores SIGINT and SIGTERM, exits when its starter closes its stdin and dies
with it (PR_SET_PDEATHSIG); each child gets SIGTERM when the server dies, so a killed
runner's trials still save a checkpoint and stop.

Protocol (JSON lines): the server prints `"ready"`; a request
`{"call": "module:function", "argv": [...], "log": PATH, "cpus": [...]}` is answered
`{"started": PID}`; a child's end is reported `{"exited": PID, "code": C}` (C as
`subprocess` gives it: -N for a signal). The server is started with the modules to
import before it says ready (`python -m flaxformer_lite.runtime.forkserver MODULE ...`).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from typing import Any

from flaxformer_lite.runtime.supervisor import die_with_parent  # stdlib-only at import time, so the server stays light

# Set to 0 to start each trial as a plain subprocess instead.
ENV_SWITCH = 'FLAXFORMER_FORK_SERVER'


def _send(message: Any) -> None:
    data = (json.dumps(message) + '\n').encode()
    while data:
        data = data[os.write(1, data):]


def _run_child(request: dict, server: int) -> int:
    """In the forked child: become the trial process, run it, return its exit status."""
    import atexit
    import traceback
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    die_with_parent(signal.SIGTERM)()
    if os.getppid() != server:  # the server died before the line above
        os.kill(os.getpid(), signal.SIGTERM)
    if request.get('cpus'):
        os.sched_setaffinity(0, request['cpus'])
    log = os.open(request['log'], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    os.close(null)
    argv = [str(a) for a in request['argv']]
    module, _, function = request['call'].partition(':')
    sys.argv = [module, *argv]
    code = 1
    try:
        import importlib
        code = getattr(importlib.import_module(module), function)(argv)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:  # die by SIGINT, as Python does
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # noqa: BLE001 -- a bug: its traceback, status 1
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
    return int(code or 0)


def serve(preload: list[str]) -> None:
    """The server's main loop (`python -m flaxformer_lite.runtime.forkserver MODULE ...`),
    after importing the modules every child needs."""
    import importlib
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(signal.SIGKILL)()
    for module in preload:
        importlib.import_module(module)
    if _backends_started():
        _send('unsafe: a JAX backend started during the imports')
        return
    _send('ready')
    me, pending, open_ = os.getpid(), b'', True
    while open_:
        ready, _, _ = select.select([0], [], [], 0.1)
        if ready:
            data = os.read(0, 1 << 16)
            open_ = bool(data)
            pending += data
            *lines, pending = pending.split(b'\n')
            for line in lines:
                if not line.strip():
                    continue
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    os._exit(_run_child(request, me))
                _send({'started': pid})
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            _send({'exited': pid, 'code': os.waitstatus_to_exitcode(status)})


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge
        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return False


class Forked:
    """A child of the fork server, with the part of `subprocess.Popen` the runner uses."""

    def __init__(self, server: 'ForkServer', pid: int):
        self.server, self.pid = server, pid

    def poll(self) -> int | None:
        return self.server.exit_code(self.pid)

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


class ForkServer:
    """The runner's end: `start()` (None where no server can run), `spawn()`, `close()`."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.codes: dict[int, int] = {}
        self.buffer = b''
        self.alive = True

    @classmethod
    def start(cls, env: dict[str, str], *, preload: tuple[str, ...] = (), cwd: str | None = None
              ) -> 'ForkServer | None':
        """A server whose children see `env` and start in `cwd`, with the modules in
        `preload` imported once; None where no server can run (start children another way)."""
        if os.environ.get(ENV_SWITCH, '1') == '0' or not hasattr(os, 'fork') or sys.platform != 'linux':
            return None
        proc = subprocess.Popen([sys.executable, '-m', 'flaxformer_lite.runtime.forkserver', *preload],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, cwd=cwd,
                                preexec_fn=die_with_parent(signal.SIGKILL))
        server = cls(proc)
        if server._line() != 'ready':
            server.close()
            return None
        return server

    def _line(self, timeout: float | None = None) -> Any:
        """The next message (None on timeout, or at EOF: the server is gone)."""
        fd = self.proc.stdout.fileno()
        while b'\n' not in self.buffer:
            if not self.alive:
                return None
            ready, _, _ = select.select([fd], [], [], timeout)
            if not ready:
                return None
            data = os.read(fd, 1 << 16)
            if not data:
                self.alive = False
                return None
            self.buffer += data
        line, self.buffer = self.buffer.split(b'\n', 1)
        return json.loads(line)

    def _record(self, message: Any) -> None:
        if isinstance(message, dict) and 'exited' in message:
            self.codes[message['exited']] = message['code']

    def spawn(self, call: str, argv: list[str], log: str, cpus: set[int]) -> Forked | None:
        """A child running `call(argv)` (`call` is "module:function"); None if the server
        is gone (start it another way)."""
        if not self.alive:
            return None
        request = {'call': call, 'argv': [str(a) for a in argv], 'log': str(log), 'cpus': sorted(cpus)}
        try:
            self.proc.stdin.write((json.dumps(request) + '\n').encode())
            self.proc.stdin.flush()
        except OSError:
            self.alive = False
            return None
        while True:
            message = self._line()
            if message is None:
                return None
            if isinstance(message, dict) and 'started' in message:
                return Forked(self, message['started'])
            self._record(message)

    def exit_code(self, pid: int) -> int | None:
        while pid not in self.codes:
            message = self._line(timeout=0)
            if message is None:
                break
            self._record(message)
        if pid in self.codes:
            return self.codes[pid]
        if not self.alive and not _running(pid):
            return self.codes.setdefault(pid, 1)  # the server died before telling: unknown, so not done
        return None

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _running(pid: int) -> bool:
    """Alive and not a zombie (Linux: from /proc, as the workdir lock judges its holders)."""
    from flaxformer_lite.runtime import lock
    return lock._proc_start(pid)[0] not in (None, 'Z')


if __name__ == '__main__':
    serve(sys.argv[1:])
