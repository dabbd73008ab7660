"""The package's shape: dependencies point one way, and it installs with pip."""

import ast
import os
import subprocess
import sys

import pytest

from conftest import ROOT

PACKAGE = os.path.join(ROOT, 'flaxformer_lite')
# What each subpackage may import of flaxformer_lite besides itself.
ALLOWED = {
    'models': {'flaxformer_lite.spec', 'flaxformer_lite.errors'},
    'tasks': {'flaxformer_lite.spec', 'flaxformer_lite.errors'},
    'analysis': {'flaxformer_lite.errors', 'flaxformer_lite.tracking'},
}


def _imports(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == 'flaxformer_lite':  # from flaxformer_lite import x
                yield from (f'flaxformer_lite.{a.name}' for a in node.names)
            else:
                yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


@pytest.mark.parametrize('sub', sorted(ALLOWED))
def test_dependencies_point_one_way(sub):
    own = f'flaxformer_lite.{sub}'
    bad = []
    for name in sorted(os.listdir(os.path.join(PACKAGE, sub))):
        if name.endswith('.py'):
            for module in _imports(os.path.join(PACKAGE, sub, name)):
                inside = module == own or module.startswith(own + '.')
                if module.startswith('flaxformer_lite') and not inside and module not in ALLOWED[sub]:
                    bad.append(f'{sub}/{name} imports {module}')
    assert not bad, bad


@pytest.mark.slow
def test_pip_install_editable_in_a_fresh_virtual_environment(tmp_path):
    """A new venv takes `pip install -e .`; the package then imports from anywhere, without
    path tricks. The venv sees the packages of the interpreter running the tests (a .pth
    file naming its site-packages, so nothing large is fetched), wherever those were
    installed: the system's, a user's or a virtual environment's."""
    import site
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True, timeout=120)
    python = str(venv / 'bin' / 'python')
    inner = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                           capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    ours = [p for p in [*site.getsitepackages(), site.getusersitepackages()] if os.path.isdir(p)]
    with open(os.path.join(inner, 'runner_site_packages.pth'), 'w') as f:
        f.write('\n'.join(ours) + '\n')
    install = subprocess.run([python, '-m', 'pip', 'install', '-q', '--no-deps', '-e', ROOT], capture_output=True,
                             text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    probe = subprocess.run([python, '-c', 'import flaxformer_lite.cli, flaxformer_lite.analysis, flaxformer_lite; '
                            'print(flaxformer_lite.__file__)'], cwd=tmp_path, capture_output=True, text=True,
                           timeout=120, env={k: v for k, v in os.environ.items() if k != 'PYTHONPATH'})
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip() == os.path.join(PACKAGE, '__init__.py')
    listed = subprocess.run([python, '-m', 'pip', 'show', 'flaxformer_lite'], capture_output=True, text=True,
                            timeout=60)
    assert 'Name: flaxformer_lite' in listed.stdout and 'Requires: ' in listed.stdout
    assert 'jax' in listed.stdout.split('Requires: ')[1].splitlines()[0]
