"""One process of a multi-host run, watched by a supervisor (`launch.py` with --coordinator
or under a cluster launcher runs itself again as a child and watches it).

jax.distributed ends a process whose peer never joined, died or hangs with an abort
(SIGABRT) and pages of C++ traces; the supervisor turns that into one line and exit
status 5. Before the abort, the dead peer often makes a Python call in the survivor
fail too (an Orbax barrier in a checkpoint's background thread, a collective): that
traceback is part of the same failure, so a traceback is held back briefly and folded
into it when the abort follows. Stdlib only at import time: the sweep's fork server
imports `die_with_parent` from here and stays light.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

SUPERVISED = 'FLAXFORMER_SUPERVISED'  # set in the child a supervisor runs
# The end of a process jax.distributed stopped (glog lines, a check failure, its status).
_DISTRIBUTED_FATAL = re.compile(r'coordination_service|Terminating process because the JAX distributed service|'
                                r'\bclient\.h:\d+\]')
# A Python traceback (main thread, or a thread's: "Exception in thread ...").
_TRACEBACK_START = re.compile(r'^(Traceback \(most recent call last\):|Exception in thread )')
# How long a traceback is held back waiting for jax.distributed's end to follow it. The
# abort comes within a second of the error it explains (both follow one heartbeat check).
TRACEBACK_GRACE_S = 10.0


def die_with_parent(sig: int = signal.SIGTERM):
    """A preexec_fn: the child gets `sig` when the process that started it dies (Linux),
    so killing a runner or supervisor (even with kill -9) never leaves its work running."""
    def preexec() -> None:
        try:
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(1, int(sig))  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    return preexec


def cluster_launch() -> bool:
    """Several processes started by a cluster launcher (as sharding.initialize_distributed detects)."""
    return (int(os.environ.get('SLURM_NTASKS', '1')) > 1 or int(os.environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1
            or 'TPU_WORKER_HOSTNAMES' in os.environ)


def distributed_failure(lines: list[str], args: argparse.Namespace) -> str:
    """One line saying why jax.distributed ended this process, from what it printed."""
    text = '\n'.join(lines)
    who = f'process {args.process_id} of {args.num_processes}' if args.num_processes else 'this process'
    rerun = 'run the same command on every process again to resume from the last checkpoint'
    if 'stopped sending heartbeats' in text:
        after = text.split('stopped sending heartbeats', 1)[1]
        ids = list(dict.fromkeys(re.findall(r'^\s*(\d+)\s*$', after, flags=re.M)))[:8]  # jax repeats them
        dead = f"process {', '.join(ids)}" if ids else 'another process'
        return (f'jax.distributed: {dead} stopped responding (no heartbeat for --distributed_timeout='
                f'{args.distributed_timeout} s: it died or hangs), so {who} stops too; {rerun}')
    if 'RegisterTask' in text or 'DEADLINE_EXCEEDED' in text or 'Barrier timed out' in text:
        return (f'jax.distributed: not every process joined within --distributed_timeout={args.distributed_timeout} '
                f's (coordinator {args.coordinator or "from the cluster"}); start all of them with the same '
                f'--coordinator and --num_processes and each its own --process_id, or raise --distributed_timeout')
    if 'Failed to send RPC' in text or 'leader task' in text or 'UNAVAILABLE' in text or 'Socket closed' in text:
        return (f'jax.distributed: lost the coordinator (process 0 at {args.coordinator or "the cluster address"} '
                f'died or is unreachable), so {who} stops too; {rerun}')
    first = next((x for x in lines if 'absl::Status' in x or 'Error' in x), lines[0] if lines else '')
    return f'jax.distributed stopped {who}: {" ".join(first.split())[:300]}; {rerun}'


class StderrFilter:
    """What the supervisor passes on of the child's stderr, line by line. Lines pass
    through as they come, except: from jax.distributed's first fatal line on, everything
    is kept back (`held`: the failure to explain in one line); and from a Python
    traceback on, lines wait up to `grace` seconds (`pending`) for such a fatal line. If
    it comes, the traceback joins the failure; if not, they pass on in their order."""

    def __init__(self, grace: float = TRACEBACK_GRACE_S):
        self.grace = grace
        self.held: list[str] = []
        self.pending: list[str] = []
        self._since = 0.0

    def feed(self, line: str, now: float) -> list[str]:
        """The lines to write now, given the child's next line at time `now`."""
        line = line.rstrip('\n')
        if self.held or _DISTRIBUTED_FATAL.search(line):
            self.held += self.pending + [line]
            self.pending = []
            return []
        out = self.tick(now)
        if self.pending or _TRACEBACK_START.match(line):
            if not self.pending:
                self._since = now
            self.pending.append(line)
            return out
        return out + [line]

    def tick(self, now: float) -> list[str]:
        """The lines whose wait is over at time `now` (no fatal line followed in time)."""
        if self.pending and now - self._since >= self.grace:
            out, self.pending = self.pending, []
            return out
        return []

    def end(self, code: int) -> tuple[list[str], list[str] | None]:
        """At the child's exit with `code`: (lines still to write, the failure's lines or
        None when jax.distributed did not end it)."""
        if self.held and code != 0:
            return [], self.held
        return self.pending + self.held, None


def supervise(argv: list[str], args: argparse.Namespace) -> int:
    """Run this command again as a child and watch it: its stderr through `StderrFilter`,
    a jax.distributed end as one line and exit status 5. Signals (Ctrl-C, a scheduler's
    SIGTERM) are passed on; the child dies with the supervisor."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, **{SUPERVISED: '1'})
    env['PYTHONPATH'] = os.pathsep.join(p for p in (root, env.get('PYTHONPATH')) if p)
    proc = subprocess.Popen([sys.executable, '-u', '-m', 'flaxformer_lite', *argv], stderr=subprocess.PIPE,
                            env=env, start_new_session=True, preexec_fn=die_with_parent(signal.SIGKILL),
                            text=True, errors='replace', bufsize=1)
    forward = lambda signum, frame: proc.send_signal(signum)  # noqa: E731
    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    lines: queue.Queue = queue.Queue()  # a reader thread, so held lines can time out

    def pump() -> None:
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    filt = StderrFilter()

    def write(out: list[str]) -> None:
        for line in out:
            sys.stderr.write(line + '\n')
        sys.stderr.flush()

    try:
        while True:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                write(filt.tick(time.monotonic()))
                continue
            if line is None:
                break
            write(filt.feed(line, time.monotonic()))
        code = proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    rest, failure = filt.end(code)
    write(rest)
    if failure is not None:
        print(f'error: {distributed_failure(failure, args)}', file=sys.stderr, flush=True)
        return 5
    return 128 - code if code < 0 else code
