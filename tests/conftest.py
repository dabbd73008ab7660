"""Shared helpers: tiny configs that train in seconds, and reading runs back.

The whole session (every xdist worker, and every subprocess a test starts: they inherit
the environment) shares one persistent JAX compilation cache, so a program one test
compiled is read, not compiled, by the next: the tests build the same tiny shapes many
times. It is set here, before jax is imported anywhere. FLAXFORMER_TEST_JAX_CACHE names
a folder to keep it across sessions.
"""

from __future__ import annotations

import os
import tempfile

if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    os.environ['JAX_COMPILATION_CACHE_DIR'] = (os.environ.get('FLAXFORMER_TEST_JAX_CACHE')
                                               or tempfile.mkdtemp(prefix='flaxformer_tests_jax_cache_'))
    os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
    os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'

import pytest  # noqa: E402


def pytest_configure(config):
    """The fast tier (`-m "not slow"`) checks plumbing and numerics, not speed: it compiles
    without most of XLA's optimisations (jax_disable_most_optimizations, here and in every
    subprocess), which measured 4 min 2 s against 4 min 55 s for it on 2 cores. The full
    suite compiles as a user's run does.

    Under pytest-xdist (`-n 2`), the tests of an `xdist_group` run on one worker
    (`--dist loadgroup`; the others are spread as `load` does): a module whose fixture
    trains runs, starts processes or a SLURM cluster would otherwise do so on each worker."""
    if not any(arg.startswith('--dist') for arg in config.invocation_params.args):
        if hasattr(config, 'workerinput'):  # a worker: name each test's group in its node id
            config.option.loadgroup = True
        elif getattr(config.option, 'dist', None) == 'load':  # the controller: schedule by group
            config.option.dist = 'loadgroup'
    if 'not slow' in (config.option.markexpr or ''):
        os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
        import sys
        if 'jax' in sys.modules:  # imported already (by a plugin): the environment is read too late
            sys.modules['jax'].config.update('jax_disable_most_optimizations', True)

from flaxformer_lite import config as config_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where launch.py and configs/ are

# A recall task small enough to learn in ~100 steps (chance accuracy 1/4).
TINY_RECALL = {
    'task.seq_len': 16, 'task.dependency_length': 3, 'task.num_pairs': 2, 'task.num_queries': 2,
    'task.num_keys': 4, 'task.num_values': 4, 'task.num_noise': 2,
}
TINY_MODEL = {'model.num_layers': 2, 'model.d_model': 32, 'model.num_heads': 2, 'model.d_ff': 64}
TINY_TRAIN = {'train.batch_size': 16, 'train.steps': 20, 'train.log_every': 5, 'eval.every_steps': 10,
              'eval.num_examples': 32, 'checkpoint.every_steps': 10, 'optim.warmup_steps': 5,
              'optim.learning_rate': 3e-3, 'checkpoint.async_save': False}


def tiny_config(task: str = 'recall', model: str = 'transformer', **overrides):
    """A locked config: tiny model and run; `overrides` use dotted keys with '__' for '.'."""
    cfg = config_lib.base_config(task)
    cfg.model.name = model
    fields = {**(TINY_RECALL if task == 'recall' else {}), **TINY_MODEL, **TINY_TRAIN}
    fields.update({k.replace('__', '.'): v for k, v in overrides.items()})
    for key, value in fields.items():
        config_lib.set_field(cfg, key, value)
    cfg.lock()
    return cfg


def read_scalars(workdir: str) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} from every event file in `workdir` (TensorBoard's own reader)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util
    acc = EventAccumulator(workdir, size_guidance={'tensors': 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()['tensors']:
        try:
            out[tag] = {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}
        except (TypeError, ValueError):
            continue  # text / image summaries
    return out


@pytest.fixture
def workdir(tmp_path):
    return str(tmp_path / 'run')


def tree_snapshot(path) -> dict[str, tuple[int, str]]:
    """{relative path: (size, sha256)} of every file under `path` ({} if it does not exist):
    a workdir compared byte for byte before and after something that must not touch it."""
    import hashlib
    out = {}
    for root, dirs, files in os.walk(str(path)):
        for name in dirs:
            out[os.path.relpath(os.path.join(root, name), str(path)) + '/'] = (0, '')
        for name in files:
            full = os.path.join(root, name)
            with open(full, 'rb') as f:
                out[os.path.relpath(full, str(path))] = (os.path.getsize(full), hashlib.sha256(f.read()).hexdigest())
    return out


def event_history(workdir: str) -> dict[str, list[tuple[int, object]]]:
    """{tag: [(step, value), ...]} as TensorBoard shows a run: every event file, in order,
    with orphaned events purged at SessionLog restarts (EventAccumulator's default) and
    nothing sampled away; a step logged twice appears twice."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util
    acc = EventAccumulator(workdir, size_guidance={'tensors': 0}, purge_orphaned_data=True)
    acc.Reload()
    out = {}
    for tag in acc.Tags()['tensors']:
        events = acc.Tensors(tag)
        try:
            out[tag] = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events]
        except (TypeError, ValueError):
            out[tag] = [(e.step, None) for e in events]  # text, images, hparams
    return out


def restore_state(workdir: str, cfg, step: int | None = None):
    """The train state of `workdir`'s checkpoint `step` (default: the newest), as numpy."""
    import jax
    import flax.linen as nn
    from flaxformer_lite import resolve
    from flaxformer_lite.train import checkpoint, setup as setup_lib
    exp = resolve.from_config(cfg)
    setup = setup_lib.build(exp)
    ckpt = checkpoint.Checkpointer(workdir, max_to_keep=10, async_save=False, read_only=True)
    try:
        step = ckpt.latest_step() if step is None else step
        with jax.set_mesh(setup.mesh), nn.logical_axis_rules(setup.rules):
            state, _ = ckpt.restore(step, setup.abstract_state)
        return jax.device_get(state)
    finally:
        ckpt.close()


def assert_same_tree(a, b) -> None:
    """Bit for bit: same structure, every leaf equal (NaNs included)."""
    import jax
    import numpy as np
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], lb):
        assert np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True), jax.tree_util.keystr(path)


class Zygote:
    """The package's fork server (runtime/forkserver.py), as the tests use it: it imports
    jax and flaxformer_lite once, then forks one child per command (`cli.main(argv)`
    through tests/fault_injection.py), so a test can start, kill -9 and restart real runs
    without paying the imports each time (seconds on a 2-core machine). A child may be
    told where to kill itself (`plan`: see fault_injection.py). All children share the
    session's persistent compilation cache (the environment conftest.py set)."""

    def __init__(self, env: dict | None = None):
        from flaxformer_lite.runtime import forkserver
        full_env = dict(os.environ, **(env or {}))
        full_env['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, os.path.join(ROOT, 'tests'),
                                                              full_env.get('PYTHONPATH')) if p)
        self.server = forkserver.ForkServer.start(full_env, preload=('fault_injection',), cwd=ROOT)
        assert self.server is not None, 'the fork server did not start'
        self.children: dict[int, object] = {}

    def start(self, argv: list[str], log: str, plan: dict | None = None) -> int:
        import json
        plan = plan or {}
        child = self.server.spawn('fault_injection:run', [json.dumps(plan), *argv], str(log), set(plan.get('cpus', ())))
        assert child is not None, 'the fork server is gone'
        self.children[child.pid] = child
        return child.pid

    def wait(self, pid: int) -> int:
        """The child's exit status (-9 when killed by SIGKILL)."""
        import time
        child = self.children.pop(pid)
        while (code := child.poll()) is None:
            time.sleep(0.05)
        return code

    def run(self, argv: list[str], log: str, plan: dict | None = None) -> int:
        return self.wait(self.start(argv, log, plan))

    def close(self) -> None:
        import signal
        for child in self.children.values():
            child.send_signal(signal.SIGKILL)
        self.server.close()


@pytest.fixture(scope='session')
def shared_jax_cache():
    """The session's persistent compilation cache folder (in-process runs, the Zygote's and
    every subprocess's)."""
    return os.environ['JAX_COMPILATION_CACHE_DIR']


@pytest.fixture(scope='module')
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.fixture(scope='module')
def compilation_cache(shared_jax_cache):
    """The session's persistent compilation cache, in force for this module's in-process
    runs (each run jits its steps afresh; from the cache that costs a read, not a compile).
    A test that changed jax's cache settings gets them back here."""
    import jax
    from jax._src import compilation_cache as cc
    names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
             'jax_persistent_cache_min_entry_size_bytes')
    if tuple(getattr(jax.config, n) for n in names) != (shared_jax_cache, 0.0, 0):
        for name, value in zip(names, (shared_jax_cache, 0.0, 0)):
            jax.config.update(name, value)
        cc.reset_cache()
    yield


@pytest.fixture
def private_compilation_cache(tmp_path):
    """An empty persistent compilation cache of this test's own (for a test about what is
    compiled and what is read), the session's restored after it."""
    import jax
    from jax._src import compilation_cache as cc
    old = jax.config.jax_compilation_cache_dir
    jax.config.update('jax_compilation_cache_dir', str(tmp_path / 'jax_cache'))
    cc.reset_cache()
    yield str(tmp_path / 'jax_cache')
    jax.config.update('jax_compilation_cache_dir', old)
    cc.reset_cache()
