"""The house: karat.py runs when copied alone, the project's imports form a tree, and the
README's Usage block runs as written."""
import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem: p for p in ROOT.glob('*.py')}

# karat.py's own docstring example, then every basis, low rank and full, forward and backward
ALONE = """
import sys
import torch, karat
attend = karat.attention_maker('fourier', grid=3, rank=12)(heads=3, seq_len=197)
q, k, v = (t.requires_grad_() for t in torch.randn(3, 2, 3, 197, 64))
out = attend(q, k, v)
out.sum().backward()
assert out.shape == (2, 3, 197, 64) and q.grad.abs().sum() > 0
for attn in karat.BASES:
    for rank in (3, None):
        attend = karat.attention_maker(attn, rank=rank)(heads=2, seq_len=9)
        q, k, v = (t.requires_grad_() for t in torch.randn(3, 2, 2, 9, 8))
        attend(q, k, v).sum().backward()
        grads = [q.grad, k.grad, v.grad] + [p.grad for p in attend.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), (attn, rank)
        assert attend.compute is karat.definition
assert not {'fast', 'kernels', 'models'} & set(sys.modules), sys.modules.keys()
print('runs alone')
"""


def alone(tmp_path, script):
    """Run `script` in a folder holding karat.py and nothing else of the project."""
    shutil.copy(ROOT / 'karat.py', tmp_path)
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    return subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_karat_py_copied_alone_runs_every_basis_low_rank_and_full(tmp_path):
    done = alone(tmp_path, ALONE)
    assert done.returncode == 0 and done.stdout.strip() == 'runs alone', done.stderr[-2000:]


def test_the_readme_usage_block_runs_with_karat_py_alone(tmp_path):
    readme = (ROOT / 'README.md').read_text()
    usage = readme[readme.index('\n## Usage'):]
    block = re.search(r'```python\n(.*?)```', usage, re.S).group(1)
    done = alone(tmp_path, block + "\nprint('ran')")
    assert done.returncode == 0 and done.stdout.strip().endswith('ran'), done.stderr[-2000:]


def imports(path):
    """The project's modules that `path` imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split('.')[0])
    return found & set(MODULES) - {path.stem}


def circle(graph):
    """A circle of imports as a list of modules, or None."""
    done, path = set(), []

    def visit(name):
        if name in path:
            return path[path.index(name):] + [name]
        if name in done:
            return None
        path.append(name)
        found = next(filter(None, map(visit, sorted(graph[name]))), None)
        path.pop()
        done.add(name)
        return found
    return next(filter(None, map(visit, sorted(graph))), None)


def test_the_projects_imports_form_a_tree_with_karat_py_at_its_root():
    graph = {name: imports(path) for name, path in MODULES.items()}
    assert circle(graph) is None, ' -> '.join(circle(graph))
    assert graph['karat'] == set()
    assert circle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']  # it can fail


def test_train_py_is_a_leaf_and_models_py_needs_no_detector():
    graph = {name: imports(path) for name, path in MODULES.items()}
    assert not [name for name, deps in graph.items() if 'train' in deps]
    done = subprocess.run([sys.executable, '-c', 'import sys, models; '
                           'print(any("torchvision.models.detection" in m for m in sys.modules))'],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == 'False', done.stderr[-2000:]
