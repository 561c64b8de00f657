"""The teaching notebooks run top to bottom, and the facts they assert along the way hold.

Each notebook checks its own claims with `assert` before its "What we saw" cell, so running it
is the test. KARAT_SMOKE=1 shrinks the training and measurement work to CI size.
"""
import pathlib

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
def test_notebook_runs_and_its_assertions_hold(path, monkeypatch, tmp_path):
    monkeypatch.setenv('KARAT_SMOKE', '1')
    # training runs write here, not into the checkout
    monkeypatch.setenv('KARAT_RUNS', str(tmp_path))
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name='python3',
                   resources={'metadata': {'path': str(path.parent)}}).execute()
