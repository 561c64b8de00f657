"""bench.py: one JSON line per path, the paths side by side in one process, and bad input is
one line on stderr."""
import json

import pytest

import bench
from test_train import TINY, python


# Timing and memory -----------------------------------------------------------------------------

def test_benchmark_prints_one_json_line():
    done = python('bench.py', *TINY, '--depth', '1', '--batch-size', '8', '--bench-steps', '3',
                  '--naive')
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert {k: result[k] for k in ('model', 'attn', 'naive', 'batch')} == dict(
        model='vit_tiny', attn='fourier', naive=True, batch=8)
    assert result['step_ms'] > 0 and result['img_per_s'] > 0 and result['peak_mem_mb'] > 0
    # both figures from the median step: images per second is the batch over it
    assert result['img_per_s'] == pytest.approx(8 * 1000 / result['step_ms'], rel=1e-3)
    assert result['device'].startswith('cpu')


def test_benchmark_compare_shows_the_naive_formula_keeping_the_feature_tensor():
    """--compare on a CPU: softmax, the PyTorch path and the naive formula in one process, one
    line each. At N = 65, batch 32 the naive formula keeps the (b h N N) x 2G Fourier features,
    ~10 MB per block, where the PyTorch path keeps q and k."""
    done = python('bench.py', '--compare', '--model', 'vit_tiny', '--img-size', '32',
                  '--patch-size', '4', '--depth', '1', '--batch-size', '32', '--bench-steps', '2',
                  '--device', 'cpu')
    assert done.returncode == 0, done.stderr
    softmax, ours, naive = (json.loads(line) for line in done.stdout.splitlines())
    assert [(r['path'], r['attn'], r['naive']) for r in (softmax, ours, naive)] == \
        [('softmax', 'softmax', False), ('torch', 'fourier', False), ('naive', 'fourier', True)]
    assert naive['peak_mem_mb'] > ours['peak_mem_mb'] + 6
    assert ours['peak_mem_mb'] < 1.3 * softmax['peak_mem_mb']


def test_a_detector_step_is_timed_on_synthetic_shapes_by_every_path():
    """ViTDet + Mask R-CNN, its five losses summed, softmax and both KArAt paths in one process.
    At this size (N = 16) attention is a sliver of Mask R-CNN's memory: no bound on the peak."""
    done = python('bench.py', '--compare', '--model', 'vitdet_tiny', '--img-size', '64',
                  '--batch-size', '2', '--bench-steps', '1', '--device', 'cpu')
    assert done.returncode == 0, done.stderr
    softmax, ours, naive = (json.loads(line) for line in done.stdout.splitlines())
    assert [(r['model'], r['path'], r['img_size']) for r in (softmax, ours, naive)] == \
        [('vitdet_tiny', p, 64) for p in ('softmax', 'torch', 'naive')]
    assert all(r['step_ms'] > 0 and r['peak_mem_mb'] > 0 for r in (softmax, ours, naive))


@pytest.mark.parametrize('argv, message', [
    (['--compare', '--attn', 'softmax'], '--compare'),
    (['--paths', 'torch,fast'], "'fast'"),
    (['--model', 'vitdet_tiny', '--dataset', 'fake'], 'no --dataset, --call, --ops or --compile'),
    (['--model', 'vitdet_tiny', '--compile'], 'no --dataset, --call, --ops or --compile'),
])
def test_bad_input_is_one_line_and_a_non_zero_exit(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code not in (0, None) and message in err
    assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err
