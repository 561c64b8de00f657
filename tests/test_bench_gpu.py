"""bench.py --gpu, checked on the CPU for what a CPU can check: the plan of rows (what --quick
runs, what every row measures, the tests each test row selects), the time guard (rows stopped at
the budget, the rest recorded as skipped, a failing row leaving the others), the files written
as they come, and the forms a row adds to --call: a bias, the forward alone, the configs that
autotune chose."""
import json
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from triton.runtime.autotuner import Autotuner

import bench
import karat
import kernels
from test_cli import NO_INTERPRETER, refused
from test_train import ENV, ROOT, python


# The command line -----------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason='the refusal of a machine without CUDA')
@pytest.mark.parametrize('form', [[], ['--quick']], ids=['full', 'quick'])
def test_gpu_without_cuda_is_one_line_and_makes_no_folder(form, tmp_path):
    out = tmp_path / 'gpu'
    err = refused('--gpu', str(out), *form, env=NO_INTERPRETER, script='bench.py')
    assert err == ("bench.py: error: --gpu needs a CUDA GPU; this machine has none "
                   "(torch.cuda.is_available() is False)\n")
    assert not out.exists()


@pytest.mark.parametrize('argv, message', [
    (['--quick'], '--quick and --budget shape a --gpu DIR run; got no --gpu'),
    (['--budget', '60'], '--quick and --budget shape a --gpu DIR run; got no --gpu'),
    (['--gpu', 'out', '--amp', '--call', '1,1,1,1'], 'beside it only --quick and --budget, got '
                                                     '--amp --call'),
    (['--forward-only'], '--bias and --forward-only shape a --call B,H,N,D; got no --call'),
])
def test_suite_and_call_flags_out_of_place_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and len(err.splitlines()) == 1


def test_with_cuda_the_suite_wants_a_new_folder_and_takes_its_form_s_budget(tmp_path,
                                                                             monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    (tmp_path / 'old.jsonl').write_text('{}\n')
    with pytest.raises(bench.Fatal, match='exists and is not an empty folder'):
        bench.parse_args(['--gpu', str(tmp_path)])
    new = tmp_path / 'new'
    assert bench.parse_args(['--gpu', str(new)]).budget == bench.BUDGET_S['full']
    assert bench.parse_args(['--gpu', str(new), '--quick']).budget == bench.BUDGET_S['quick']
    assert bench.parse_args(['--gpu', str(new), '--budget', '60']).budget == 60
    assert not new.exists()


# The plan -------------------------------------------------------------------------------------

def bench_flags(row):
    """A row's flags as bench.py parses them (here: no triton path, a CPU)."""
    return bench.parse_args(shlex.split(row.command)[1:])


BENCH_ROWS = [row for row in bench.GPU_PLAN if row.command.startswith('bench.py')]
TEST_ROWS = [row for row in bench.GPU_PLAN if row.command.startswith('-m pytest')]


@pytest.mark.parametrize('row', BENCH_ROWS, ids=[row.what for row in BENCH_ROWS])
def test_every_benchmark_row_parses_and_compares_softmax_with_karat(row):
    args = bench_flags(row)
    assert args.paths[0] == 'softmax' and {'torch', 'naive'} <= set(args.paths)


def test_the_quick_rows_lead_and_hold_the_headline_figures():
    """The rows that --quick runs come first; among them the ViT-Tiny bf16 train step and one
    ViT-Tiny-shaped call, forward alone and forward + backward; the full plan adds Swin-T's
    first-stage windows with their bias."""
    quick = [row.quick for row in bench.GPU_PLAN]
    assert quick == sorted(quick, reverse=True) and 0 < sum(quick) < len(quick)
    def measured(rows):
        shape = lambda a: a.call or (a.model, a.img_size, a.batch_size, a.rank)
        return {(shape(a), a.amp, a.bias, a.forward_only) for a in map(bench_flags, rows)}
    vit, swin = (32, 3, 197, 64), (2048, 3, 49, 32)
    assert {(('vit_tiny', 224, 32, 12), True, False, False), (vit, True, False, False),
            (vit, True, False, True)} <= measured([row for row in BENCH_ROWS if row.quick])
    assert {(swin, True, True, False), (swin, True, True, True)} <= measured(BENCH_ROWS)
    assert [row.quick for row in TEST_ROWS] == [True, False]


def collected(command):
    """The node ids that a test row's pytest command selects."""
    words = [w for w in shlex.split(command) if w not in ('-q', '-v')]  # -q alone lists ids
    done = subprocess.run([sys.executable, *words, '--collect-only', '-q'],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return {line for line in done.stdout.splitlines() if '::' in line}


def test_the_quick_tests_are_one_per_family_and_the_full_plan_runs_every_gpu_test():
    quick, rest = (collected(row.command) for row in TEST_ROWS)
    families = Counter(family for test in quick for family in karat.BASES
                       if family in test.split('[')[-1].rstrip(']').split('-'))
    assert families == Counter(list(karat.BASES)) and len(quick) == len(karat.BASES)
    assert not quick & rest and quick | rest == collected('-m pytest tests/test_gpu.py')


# The time guard and the files -----------------------------------------------------------------

def row(what, code):
    return bench.Row(True, what, '-c ' + shlex.quote(code))


PRINTS = row('prints a result', "print('{\"path\": \"softmax\", \"step_ms\": 2.0}')")
# reads what the suite has written before it, then fails
READS = row('reads the files so far, then fails', """
import json, sys
out = sys.argv[1] if len(sys.argv) > 1 else '.'
lines = lambda name: open(f'{out}/{name}').read().splitlines()
print(json.dumps({'bench': lines('bench.jsonl'), 'rows': len(lines('rows.jsonl')),
                  'summary': '| 1 | prints a result | ok |' in open(f'{out}/summary.md').read()}))
sys.exit('ValueError: the last line of a failing row')
""")
# a row that outlives the budget, with a child of its own, as a compile worker would be
SLEEPS = row('outlives the budget', """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])
print('{"child": %d}' % child.pid)
time.sleep(600)
""")
AFTER = row('comes after the budget', "print('{\"never\": 1}')")


def alive(pid):
    try:
        return Path(f'/proc/{pid}/stat').read_text().split(')')[-1].split()[0] not in 'ZX'
    except FileNotFoundError:
        return False


def test_the_budget_stops_a_row_skips_the_rest_and_a_failing_row_leaves_the_others(tmp_path):
    out = tmp_path / 'gpu'
    reads = READS._replace(command=f"{READS.command} {out}")
    tic = time.monotonic()
    records = bench.gpu_suite(out, [PRINTS, reads, SLEEPS, AFTER], budget_s=4, min_row_s=0.5)
    assert time.monotonic() - tic < 30  # the sleeping row was stopped, not waited for
    assert [r['status'] for r in records] == ['ok', 'failed', 'timeout', 'skipped']
    assert records[1]['last_line'] == 'ValueError: the last line of a failing row'
    assert json.loads((out / 'rows.jsonl').read_text().splitlines()[1]) == {
        k: v for k, v in records[1].items() if k != 'results'}
    results = [json.loads(line) for line in (out / 'bench.jsonl').read_text().splitlines()]
    first, seen, child = results
    # each row's results and status were on disk before the next row started
    assert first == dict(row=1, path='softmax', step_ms=2.0)
    assert seen == dict(row=2, bench=[json.dumps(first)], rows=1, summary=True)
    # a stopped row keeps what it printed; its children stop with it
    assert child['row'] == 3
    for _ in range(50):
        if not alive(child['child']):
            break
        time.sleep(0.1)
    assert not alive(child['child'])
    logs = sorted((out / 'logs').iterdir())
    assert [log.name for log in logs] == ['01-prints-a-result.log',
                                          '02-reads-the-files-so-far-then-fails.log',
                                          '03-outlives-the-budget.log']
    assert logs[1].read_text().startswith(f"$ python {reads.command}\n")
    assert logs[1].read_text().endswith('ValueError: the last line of a failing row\n')
    assert 'stopped after 4 s' in logs[2].read_text()
    assert '| 4 | comes after the budget | skipped | 0 |' in (out / 'summary.md').read_text()


def test_quick_runs_the_quick_rows_of_the_plan_alone(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(bench, 'GPU_PLAN', [PRINTS, AFTER._replace(quick=False)])
    bench.main(['--gpu', str(tmp_path / 'gpu'), '--quick', '--budget', '60'])
    rows = (tmp_path / 'gpu' / 'rows.jsonl').read_text().splitlines()
    assert [json.loads(line)['what'] for line in rows] == [PRINTS.what]
    assert capsys.readouterr().out.endswith(f"{tmp_path / 'gpu' / 'summary.md'}: 1 of 1 rows ok\n")


def record(number, what, status, results, command='bench.py --compare'):
    return dict(row=number, what=what, command=command, status=status, seconds=12.0,
                exit_code=0, last_line='', results=results)


def test_the_summary_is_the_readme_s_gpu_table_with_each_path_over_softmax():
    figures = lambda path, ms, mb: dict(path=path, step_ms=ms, peak_mem_mb=mb,
                                        device='cuda (NVIDIA H200)')
    records = [
        record(1, 'GPU tests', 'ok', [], command='-m pytest tests/test_gpu.py'),
        record(2, 'ViT-Tiny', 'ok', [figures('softmax', 10.0, 100.0), figures('torch', 12.0, 103.0),
                                     dict(figures('triton', 11.0, 101.0),
                                          configs={'fwd_kernel': 'BLOCK_M: 64, BLOCK_N: 32'}),
                                     figures('naive', 2345.6, 300.0)]),
        record(3, 'ViTDet', 'skipped', []),
    ]
    lines = bench.summary(records, budget_s=470).splitlines()
    assert lines[0] == '# bench.py --gpu: cuda (NVIDIA H200)'
    table = lines[lines.index('| row | softmax (SDPA) | naive | `torch` | `triton` | '
                              '`torch` ÷ softmax | `triton` ÷ softmax |'):]
    assert table[2:4] == [
        '| ViT-Tiny | 10 ms / 100 MB | 2346 ms / 300 MB | 12 ms / 103 MB | 11 ms / 101 MB | '
        '1.20× / 1.03× | 1.10× / 1.01× |',
        '| ViTDet | – | – | – | – | – | – |']
    assert '| 1 | GPU tests | ok | 12 |  |' in lines
    assert '- row 2, `fwd_kernel`: BLOCK_M: 64, BLOCK_N: 32' in lines


# What the rows add to a --call ----------------------------------------------------------------

def test_a_call_row_with_a_bias_and_the_forward_alone_prints_what_it_timed():
    done = python('bench.py', '--paths', 'softmax,torch', '--call', '4,3,49,32', '--bias',
                  '--forward-only', '--bench-steps', '1', '--device', 'cpu')
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [{k: r[k] for k in ('path', 'batch', 'heads', 'N', 'd', 'bias', 'backward')}
            for r in lines] == [dict(path=p, batch=4, heads=3, N=49, d=32, bias=True,
                                     backward=False) for p in ('softmax', 'torch')]


def leaves(output):
    """The shapes of the tensors a backward from `output` accumulates gradients into."""
    seen, stack, found = set(), [output.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, 'variable'):
            found.append(tuple(node.variable.shape))
        stack.extend(next_ for next_, _ in node.next_functions)
    return Counter(found)


@pytest.mark.parametrize('path', ['softmax', 'torch'])
def test_the_bias_gets_a_gradient_and_the_forward_alone_runs_no_backward(path, monkeypatch):
    """Swin's case: backward reaches q, k, v and the (h, N, N) bias; --forward-only builds no
    graph and calls no backward."""
    backwards = []
    original = torch.Tensor.backward
    monkeypatch.setattr(torch.Tensor, 'backward', lambda out, *a, **k: (
        backwards.append(leaves(out) if out.grad_fn else Counter()), original(out, *a, **k)))
    for forward_only in (False, True):
        args = bench.parse_args(['--call', '2,3,49,32', '--bias', '--device', 'cpu']
                                + ['--forward-only'] * forward_only)
        step, info = bench.attention_step(args, path, torch.device('cpu'), cuda=False)
        step()
        assert info['backward'] == (not forward_only)
    assert len(backwards) == 1
    assert backwards[0][(2, 3, 49, 32)] == 3 and backwards[0][(3, 49, 49)] == 1


def test_the_triton_path_names_the_config_autotune_chose_for_each_kernel():
    """Triton's interpreter runs one config a kernel, that of its largest tiles; on a GPU each
    kernel's own choice."""
    done = python('bench.py', '--paths', 'torch,triton', '--call', '1,1,17,4', '--bench-steps',
                  '1', '--device', 'cpu')
    assert done.returncode == 0, done.stderr
    ours, fused = (json.loads(line) for line in done.stdout.splitlines())
    assert 'configs' not in ours
    offered = {name: [str(c) for c in tuner.configs] for name, tuner in vars(kernels).items()
               if isinstance(tuner, Autotuner)}
    assert all(offered[name] == [chosen] for name, chosen in fused['configs'].items())
    names = set(fused['configs'])
    assert len(names) >= 2 and any('fwd' in n for n in names) and any('bwd' in n for n in names)
