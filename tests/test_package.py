"""The package's shape: the research core never imports the run-management shell, the
leaf subpackages import only the shared leaves, no import cycle anywhere, small files,
short positional signatures in the training loop and the sweep machinery, and it
installs with pip."""

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
    'analysis': {'flaxformer_lite.errors', 'flaxformer_lite.tracking', 'flaxformer_lite.util'},
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


# The run-management shell: the command line, the sweep runner and its back-ends, and
# process control. Everything else in the package is the core, which never imports these.
SHELL = ('flaxformer_lite.cli', 'flaxformer_lite.sweep', 'flaxformer_lite.runtime', 'flaxformer_lite.__main__')
MAX_LINES = 400
MAX_POSITIONAL = 5


def _modules() -> dict[str, str]:
    """Every module of the package: dotted name -> file."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith('.py'):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
                out[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = path
    return out


def _edges(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """The package modules `name` imports (at module level or inside functions alike):
    `from a import b` is a.b where that is a module, else a. A module's own enclosing
    packages are left out (Python imports them first whatever the module imports)."""
    is_package = path.endswith('__init__.py')
    here = name if is_package else name.rsplit('.', 1)[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                parts = here.split('.')
                base = '.'.join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f'{base}.{a.name}' if f'{base}.{a.name}' in modules else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in modules and not name.startswith(t + '.') and t != name)
    return out


def _shell(name: str) -> bool:
    return any(name == s or name.startswith(s + '.') for s in SHELL)


def test_the_core_never_imports_the_shell():
    modules = _modules()
    bad = [f'{name} imports {target}' for name, path in sorted(modules.items()) if not _shell(name)
           for target in sorted(_edges(name, path, modules)) if _shell(target)]
    assert not bad, bad


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _edges(name, path, modules) for name, path in modules.items()}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = 'open'
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 'open':
                cycles.append(' -> '.join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 'done'

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, cycles


def test_the_cycle_check_finds_a_cycle(tmp_path):
    """The check above can fail: two modules that import each other are reported."""
    (tmp_path / 'a.py').write_text('from flaxformer_lite import b\n')
    (tmp_path / 'b.py').write_text('def f():\n    from flaxformer_lite import a\n')
    modules = {'flaxformer_lite.a': str(tmp_path / 'a.py'), 'flaxformer_lite.b': str(tmp_path / 'b.py')}
    assert _edges('flaxformer_lite.a', modules['flaxformer_lite.a'], modules) == {'flaxformer_lite.b'}
    assert _edges('flaxformer_lite.b', modules['flaxformer_lite.b'], modules) == {'flaxformer_lite.a'}


def test_every_file_of_the_package_is_under_400_lines():
    long = {os.path.relpath(p, ROOT): n for p in _modules().values() if (n := len(open(p).readlines())) > MAX_LINES}
    assert not long, long


@pytest.mark.parametrize('sub', ['train', 'sweep'])
def test_functions_of_the_loop_and_the_sweep_take_at_most_5_positional_arguments(sub):
    """Beyond five, a call site no longer says what it passes: keyword-only arguments or a
    small dataclass do. (`self` and `cls` are not counted.)"""
    bad = []
    for name in sorted(os.listdir(os.path.join(PACKAGE, sub))):
        if not name.endswith('.py'):
            continue
        path = os.path.join(PACKAGE, sub, name)
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ('self', 'cls')]
                if len(names) > MAX_POSITIONAL:
                    bad.append(f'{sub}/{name}:{node.lineno} {node.name}({", ".join(names)})')
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
