"""The teaching notebooks run top to bottom, and the facts they assert along the way hold.

Each notebook checks its own claims with `assert` before its "What we saw" cell, so running it
is the test. CI runs each one as a student does, top to bottom with nothing set: a notebook has
one mode, so no claim is checked only in a run that CI never makes.
"""
import pathlib
import re

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / 'notebooks').glob('*.ipynb'))


def test_there_is_a_notebook_per_lesson():
    assert len(NOTEBOOKS) >= 6, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    code = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == 'code']
    assert all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_one_mode_what_a_student_runs(path):
    """No switch read from the environment shrinks the work or skips an assertion, except
    KARAT_RUNS, which only says where train.py's runs are written."""
    source = '\n'.join(c.source for c in nbformat.read(path, as_version=4).cells)
    read = re.findall(r"(?:environ\.get\(|environ\[|getenv\()['\"](\w+)", source)
    assert set(read) <= {'KARAT_RUNS'}, read


@pytest.mark.parametrize('path', NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_its_assertions_hold(path, monkeypatch, tmp_path):
    # training runs write here, not into the checkout
    monkeypatch.setenv('KARAT_RUNS', str(tmp_path))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name='python3',
                   resources={'metadata': {'path': str(path.parent)}}).execute()
