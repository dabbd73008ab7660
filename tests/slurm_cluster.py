"""A real single-node SLURM for tests: munge + slurmctld + slurmd in a temporary folder.

Usage in a test file (the fixture is session-scoped: one cluster per test module that imports it):

    from slurm_cluster import slurm, wait_for_job  # noqa: F401  (pytest finds the fixture by name)

    def test_something(slurm, tmp_path):
        out = subprocess.run(['sbatch', '--parsable', '--wrap=true'], env=slurm['env'], ...)
        wait_for_job(slurm, out.stdout.split(';')[0])

or, without pytest, `with start_cluster(folder) as cluster: ...`. The yielded dict holds:
`env` (os.environ without inherited SLURM_* variables, plus SLURM_CONF), `conf` (the slurm.conf path),
`dir` (the folder with state, spool, pid and log files), `node`, `partition`, `cpus`, `ports`.

Each cluster gets its own free ports and its own folder, so two test runs (or a daemon left behind by a
crashed run) cannot clash; daemons left behind by a run whose pytest process is gone are stopped at the
next start. The binaries come from `.ci/run` (`apt-get install -y slurmctld slurmd slurm-client munge`);
when they are missing the fixture fails (it never skips).
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Iterator

import pytest

INSTALL_HINT = ('SLURM is not installed: .ci/run installs it with '
                '`apt-get install -y slurmctld slurmd slurm-client munge` (as root)')
MARKER = '# flaxformer_lite test cluster'  # first line of every slurm.conf written here
BINARIES = ('slurmctld', 'slurmd', 'sbatch', 'squeue', 'sinfo', 'scancel', 'munge', 'munged')
MUNGE_KEY = '/etc/munge/munge.key'
DAEMONS = ('slurmctld', 'slurmd')
LEFTOVERS = ('slurmctld', 'slurmd', 'slurmstepd')  # processes that carry our SLURM_CONF


class ClusterError(RuntimeError):
    """The test cluster could not be started; the message says why and what to do."""


def _run(cmd: list[str], env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports that are free now (bound together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(('', 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


def _stop(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM `pid`, wait for it to exit, SIGKILL if it takes longer than `timeout`."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:  # reap it if it is our child
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                pass
            if not _pid_alive(pid):
                return
            time.sleep(0.05)


def _processes() -> dict[int, tuple[int, str]]:
    """{pid: (parent pid, command name)} of every process we can see."""
    out = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f'/proc/{entry}/stat') as f:
                    head, tail = f.read().rsplit(')', 1)
                out[int(entry)] = (int(tail.split()[1]), head.split('(', 1)[1])
    return out


def _stop_leftovers() -> None:
    """Stop the daemons (and their jobs) started here for a pytest process that no longer runs."""
    procs = _processes()
    leftovers: dict[str, list[tuple[str, int]]] = {}  # SLURM_CONF -> [(command, pid)]
    for pid, (_, comm) in procs.items():
        if comm not in LEFTOVERS:
            continue
        try:
            with open(f'/proc/{pid}/environ', 'rb') as f:
                env = dict(kv.split(b'=', 1) for kv in f.read().split(b'\0') if b'=' in kv)
        except OSError:
            continue
        owner = env.get(b'FLAXFORMER_LITE_SLURM_OWNER', b'')
        conf = env.get(b'SLURM_CONF', b'').decode()
        if owner.isdigit() and (not os.path.exists(conf) or not _pid_alive(int(owner))):
            leftovers.setdefault(conf, []).append((comm, pid))  # else: not ours, or still in use
    for conf, found in leftovers.items():
        if os.path.exists(conf) and any(comm == 'slurmctld' for comm, _ in found):
            _cancel_all({**_clean_env(), 'SLURM_CONF': conf})
        now = _processes()
        for comm, pid in found:  # job steps the controller could not cancel: kill their trees
            if comm == 'slurmstepd' and now.get(pid, (0, ''))[1] == 'slurmstepd':
                children = [p for p, (ppid, _) in now.items() if ppid == pid]
                while children:
                    child = children.pop()
                    children += [p for p, (ppid, _) in now.items() if ppid == child]
                    with contextlib.suppress(OSError):
                        os.kill(child, signal.SIGKILL)
                _stop(pid, timeout=0)
        for daemon in ('slurmd', 'slurmctld'):
            for comm, pid in found:
                if comm == daemon:
                    _stop(pid)


def _clean_env() -> dict[str, str]:
    """os.environ without inherited SLURM_* variables (a test may itself run inside a SLURM job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
    env['PATH'] = env.get('PATH', '') + ':/usr/sbin'
    return env


def _ensure_munge() -> None:
    """Start munged (as the munge user) if no munged answers; create the key if it is missing."""
    if _run(['munge', '-n']).returncode == 0:
        return
    if os.geteuid() != 0:
        raise ClusterError('munged is not running and only root can start it: run '
                           '`mkdir -p /run/munge && chown munge:munge /run/munge && '
                           'su -s /bin/sh munge -c munged` as root')
    if not os.path.exists(MUNGE_KEY):
        os.makedirs(os.path.dirname(MUNGE_KEY), exist_ok=True)
        if shutil.which('mungekey'):
            subprocess.run(['mungekey', '--create', f'--keyfile={MUNGE_KEY}'], check=True)
        elif shutil.which('create-munge-key'):
            subprocess.run(['create-munge-key', '-f'], check=True)
        else:
            with open(MUNGE_KEY, 'wb') as f:
                f.write(os.urandom(1024))
        shutil.chown(MUNGE_KEY, 'munge', 'munge')
        os.chmod(MUNGE_KEY, 0o400)
    os.makedirs('/run/munge', exist_ok=True)
    shutil.chown('/run/munge', 'munge', 'munge')
    result = _run(['su', '-s', '/bin/sh', 'munge', '-c', 'munged'])
    deadline = time.monotonic() + 10
    while _run(['munge', '-n']).returncode != 0:
        if time.monotonic() > deadline:
            raise ClusterError(f'munged did not start: {result.stderr.strip() or result.stdout.strip()}')
        time.sleep(0.1)


def write_conf(folder: str, node: str, cpus: int, ports: list[int], spool: str) -> str:
    """Write slurm.conf for one node in `folder`, every state/pid/log file inside it."""
    user = getpass.getuser()
    lines = [
        MARKER,
        'ClusterName=local',
        f'SlurmctldHost={node}(127.0.0.1)',  # loopback: no need for the host name to resolve
        f'SlurmUser={user}',
        f'SlurmdUser={user}',
        'AuthType=auth/munge',
        f'SlurmctldPort={ports[0]}',
        f'SlurmdPort={ports[1]}',
        f'StateSaveLocation={folder}/state',
        f'SlurmdSpoolDir={spool}',
        f'SlurmctldPidFile={folder}/slurmctld.pid',
        f'SlurmdPidFile={folder}/slurmd.pid',
        f'SlurmctldLogFile={folder}/slurmctld.log',
        f'SlurmdLogFile={folder}/slurmd.log',
        'ProctrackType=proctrack/linuxproc',
        'TaskPlugin=task/none',
        'JobAcctGatherType=jobacct_gather/none',
        'SelectType=select/cons_tres',
        'SelectTypeParameters=CR_Core',
        'ReturnToService=2',
        'MpiDefault=none',
        'KillWait=2',
        'MailProg=/bin/true',
        # Schedule at once on submit and on completion (default: batch jobs wait up to 3 s).
        'SchedulerParameters=batch_sched_delay=0,sched_min_interval=0',
        f'NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN',
        f'PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP',
    ]
    os.makedirs(os.path.join(folder, 'state'), exist_ok=True)
    os.makedirs(spool, exist_ok=True)
    path = os.path.join(folder, 'slurm.conf')
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return path


def _log_tail(folder: str) -> str:
    parts = []
    for daemon in DAEMONS:
        try:
            with open(os.path.join(folder, f'{daemon}.log')) as f:
                parts.append(f'--- {daemon}.log\n' + ''.join(f.readlines()[-15:]))
        except OSError:
            pass
    return '\n'.join(parts)


@contextlib.contextmanager
def start_cluster(folder: str | None = None, timeout: float = 60.0) -> Iterator[dict]:
    """Start munge (if needed), slurmctld and slurmd; yield the cluster dict; stop both daemons."""
    missing = [b for b in BINARIES if not shutil.which(b, path=os.environ.get('PATH', '') + ':/usr/sbin')]
    if missing:
        raise ClusterError(f'{INSTALL_HINT}; missing: {", ".join(missing)}')
    _stop_leftovers()
    _ensure_munge()
    own_folder = folder is None
    folder = tempfile.mkdtemp(prefix='slurm-') if own_folder else os.path.abspath(folder)
    os.makedirs(folder, exist_ok=True)
    node = _run(['hostname', '-s']).stdout.strip() or socket.gethostname().split('.')[0]
    cpus = os.cpu_count() or 1
    ports = _free_ports(2)
    # slurmstepd puts Unix sockets (at most 108 bytes of path) in the spool folder: keep its path short.
    spool = os.path.join(folder, 'spool')
    short_spool = len(spool) > 60
    if short_spool:
        spool = tempfile.mkdtemp(prefix='slurmd-', dir='/tmp')
    conf = write_conf(folder, node, cpus, ports, spool)
    env = {**_clean_env(), 'SLURM_CONF': conf}
    daemon_env = {**env, 'FLAXFORMER_LITE_SLURM_OWNER': str(os.getpid())}
    procs: list[subprocess.Popen] = []
    try:
        for daemon in DAEMONS:  # -D: foreground, so we hold the process and can reap it
            with open(os.path.join(folder, f'{daemon}.out'), 'w') as out:
                procs.append(subprocess.Popen([daemon, '-D'], env=daemon_env, stdout=out,
                                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              start_new_session=True))
        deadline = time.monotonic() + timeout
        state = ''
        while state != 'idle':
            for daemon, proc in zip(DAEMONS, procs):
                if proc.poll() is not None:
                    raise ClusterError(f'{daemon} exited with status {proc.returncode}\n{_log_tail(folder)}')
            if time.monotonic() > deadline:
                raise ClusterError(f'node {node} not idle after {timeout:.0f} s (state {state!r})\n'
                                   f'{_log_tail(folder)}')
            time.sleep(0.2)
            state = _run(['sinfo', '-h', '-N', '-o', '%T'], env=env).stdout.strip().rstrip('*')
        yield {'env': env, 'conf': conf, 'dir': folder, 'node': node, 'partition': 'debug',
               'cpus': cpus, 'ports': ports}
    finally:
        if procs and procs[0].poll() is None:  # jobs outlive slurmd: cancel what a failed test left
            _cancel_all(env)
        for daemon, proc in reversed(list(zip(DAEMONS, procs))):  # slurmd first, then slurmctld
            pids = {proc.pid}
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(folder, f'{daemon}.pid')) as f:
                    pids.add(int(f.read().strip()))
            for pid in pids:
                _stop(pid)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        if short_spool:
            shutil.rmtree(spool, ignore_errors=True)
        if own_folder:
            shutil.rmtree(folder, ignore_errors=True)


def _cancel_all(env: dict, timeout: float = 10.0) -> None:
    """Cancel every job of this cluster and wait (up to `timeout`) until the queue is empty."""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(subprocess.TimeoutExpired):
        while _run(['squeue', '-h', '-o', '%i'], env=env, timeout=5).stdout.strip():
            if time.monotonic() > deadline:
                return
            _run(['scancel', f'--user={getpass.getuser()}'], env=env, timeout=5)
            time.sleep(0.2)


def wait_for_job(cluster: dict, job_id: str, timeout: float = 30.0) -> None:
    """Poll squeue until job `job_id` (all its array tasks) has left the queue: seen gone
    twice, a second apart (on a loaded machine one poll came back empty while a task of
    the array had yet to write its trial)."""
    deadline = time.monotonic() + timeout
    gone = 0
    while True:
        out = _run(['squeue', '-h', '-j', str(job_id), '-o', '%i %T'], env=cluster['env'])
        empty = out.returncode == 0 and not out.stdout.strip()
        purged = out.returncode != 0 and 'Invalid job id' in out.stderr  # already left the controller
        gone = gone + 1 if empty or purged else 0
        if gone == 2:
            return
        if gone:
            time.sleep(1.0)
            continue
        if time.monotonic() > deadline:
            raise TimeoutError(f'job {job_id} still queued after {timeout:.0f} s: {out.stdout.strip()}'
                               f'{out.stderr.strip()}\n{_log_tail(cluster["dir"])}')
        time.sleep(0.2)


@pytest.fixture(scope='session')
def slurm(tmp_path_factory) -> Iterator[dict]:
    """A running single-node SLURM for the tests of one module (see `start_cluster`)."""
    cm = start_cluster(str(tmp_path_factory.mktemp('slurm')))
    error = None
    try:
        cluster = cm.__enter__()
    except ClusterError as e:
        error = str(e)
    if error is not None:
        pytest.fail(error, pytrace=False)
    try:
        yield cluster
    finally:
        cm.__exit__(None, None, None)
