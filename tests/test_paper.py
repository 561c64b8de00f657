"""paper.py: the paper's tables run through train.py as a user runs them, and collected.

The rows train offline here (`--on digits`, a few images, one epoch), through the same commands
that run them on GPUs; the collector is checked against hand-written logs in train.py's format.
"""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import paper
import train
from test_train import DIE_AFTER_SAVE

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))
# three rows of Table 1 (ViT-Tiny on CIFAR-10: softmax, G3B, G3U), trained on the digits
REHEARSAL = ['--on', 'digits', '--only', 'ViT-Tiny', '--only', 'CIFAR-10']
TINY = ['--', '--limit', '64', '--epochs', '1', '--depth', '2', '--device', 'cpu']
FOLDERS = ['vit_tiny_softmax_cifar10', 'vit_tiny_G3B_cifar10', 'vit_tiny_G3U_cifar10']


def paper_py(*args):
    return subprocess.run([sys.executable, 'paper.py', *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def log(folder):
    return [json.loads(line) for line in (folder / 'log.jsonl').read_text().splitlines()]


def table_rows(markdown):
    """{(model, attention, dataset): the row's cells} of a markdown table."""
    rows = [[c.strip() for c in line.strip('|').split('|')] for line in markdown.splitlines()
            if line.startswith('| ') and not line.startswith(('| model', '| ---'))]
    return {tuple(r[:3]): r for r in rows}


@pytest.fixture(scope='module')
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp('paper')
    done = paper_py('run', 'table1', '--out', str(out), *REHEARSAL, *TINY)
    assert done.returncode == 0, done.stderr
    return out, done.stdout


# Running a table ------------------------------------------------------------------------------

def test_run_trains_every_chosen_row_to_a_finished_run(rehearsal):
    out, stdout = rehearsal
    assert stdout.count(': starting;') == 3 and stdout.count(': done in') == 3, stdout
    for name in FOLDERS:
        folder = out / 'table1' / name
        assert [r['epoch'] for r in log(folder)] == [1]
        assert (folder / 'last.pt').is_file() and (folder / 'best.pt').is_file()
        assert json.loads((folder / 'args.json').read_text())['dataset'] == 'digits'
    assert sorted(p.name for p in (out / 'table1').iterdir()) == sorted(FOLDERS)


def test_run_again_skips_the_finished_runs_and_trains_nothing(rehearsal):
    out, _ = rehearsal
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / 'table1').rglob('*')
             if p.is_file()}
    again = paper_py('run', 'table1', '--out', str(out), *REHEARSAL, *TINY)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count('skipped') == 3 and 'starting' not in again.stdout, again.stdout
    assert files == {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in files}


def test_table_reports_each_runs_best_epoch_and_marks_the_rows_not_run(rehearsal):
    out, _ = rehearsal
    done = paper_py('table', 'table1', '--out', str(out))
    assert done.returncode == 0, done.stderr
    rows = table_rows(done.stdout)
    assert len(rows) == 25  # every row of the paper's Table 1
    for attention, name in zip(('softmax', 'G3B', 'G3U'), FOLDERS):
        cells = rows[('ViT-Tiny', attention, 'CIFAR-10')]
        best = max(r['test_acc1'] for r in log(out / 'table1' / name))
        assert cells[4] == f"{best:.2f}" and 'trained on digits' in cells[8]
    assert sum(cells[4] == 'not run' for cells in rows.values()) == 22
    assert rows[('Swin-T', 'G3B', 'CIFAR-10')][3] == '79.34'  # the paper's, from paper.csv
    assert (out / 'table1.png').stat().st_size > 0


def test_a_run_killed_after_its_first_epoch_is_resumed(tmp_path):
    chosen = ['run', 'table1', '--out', str(tmp_path), *REHEARSAL, '--only', 'softmax']
    two_epochs = ['--', '--limit', '64', '--epochs', '2', '--depth', '2', '--device', 'cpu']
    dry = paper_py(*chosen, '--dry-run', *two_epochs)
    assert dry.returncode == 0 and not any(tmp_path.iterdir()), dry.stderr
    command = shlex.split(dry.stdout.splitlines()[-1])  # python train.py FLAGS: the run's
    assert command[:2] == ['python', 'train.py']
    killed = subprocess.run([sys.executable, '-c', DIE_AFTER_SAVE, *command[2:]],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9
    folder = tmp_path / 'table1' / FOLDERS[0]
    resumed = paper_py(*chosen, *two_epochs)
    assert resumed.returncode == 0, resumed.stderr
    assert ': resuming (' in resumed.stdout, resumed.stdout
    assert [r['epoch'] for r in log(folder)] == [1, 2]
    assert f"--resume {folder / 'last.pt'}" in (folder / 'train.log').read_text()


def test_transfer_waits_for_its_imagenet_run_then_finetunes_its_best_checkpoint(tmp_path):
    rows = ['--on', 'digits', '--only', 'ViT-Tiny', '--only', 'softmax']
    waiting = paper_py('run', 'transfer', '--out', str(tmp_path), *rows, '--only', 'SVHN', *TINY)
    assert waiting.returncode == 0 and 'waits for' in waiting.stdout, waiting.stderr
    assert not any(tmp_path.iterdir())
    source = paper_py('run', 'table1', '--out', str(tmp_path), *rows, '--only', 'ImageNet-1K',
                      *TINY)
    assert source.returncode == 0, source.stderr
    done = paper_py('run', 'transfer', '--out', str(tmp_path), *rows, '--only', 'SVHN', *TINY)
    assert done.returncode == 0, done.stderr
    best = tmp_path / 'table1' / 'vit_tiny_softmax_imagenet' / 'best.pt'
    trained = (tmp_path / 'transfer' / 'vit_tiny_softmax_svhn' / 'train.log').read_text()
    assert f"weights from {best}; left at init: head" in trained


# The commands ---------------------------------------------------------------------------------

@pytest.mark.parametrize('nproc', [1, 4])
def test_every_table1_command_is_the_papers_recipe_for_its_row(nproc, capsys, monkeypatch):
    paper.main(['run', 'table1', '--dry-run', '--nproc', str(nproc), '--data-path', '/data'])
    commands = [line.split() for line in capsys.readouterr().out.splitlines()
                if not line.startswith('#')]
    assert len(commands) == 25
    monkeypatch.setenv('WORLD_SIZE', str(nproc))  # what torchrun gives each process
    for command in commands:
        args = train.parse_args(command[command.index('train.py') + 1:])
        batch = 128 if args.dataset == 'imagenet' else 32
        assert (args.img_size, args.epochs, args.batch_size * nproc) == (224, 100, batch)
        assert args.lr == pytest.approx(5e-4 * batch / 512)
        assert args.data_path == ('/data/imagenet' if args.dataset == 'imagenet' else '/data')


def test_errors_are_one_line_and_nothing_is_written(tmp_path, capsys):
    for argv in (['run', 'table1', '--nproc', '3'], ['run', 'table1', '--only', 'ViT-Huge'],
                 ['run', 'table1', '--', '--output-dir', 'x'], ['run', 'table5']):
        with pytest.raises(SystemExit) as exit_:
            paper.main([*argv, '--out', str(tmp_path / 'out')])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith('paper.py: error: ')
    assert not (tmp_path / 'out').exists()


# The collector --------------------------------------------------------------------------------

def write_run(folder, accuracies, epochs=None, dataset='digits'):
    """A train.py output folder: args.json and log.jsonl in train.py's format, one row per epoch
    (only those given: fewer than `epochs` is a run not finished)."""
    folder.mkdir(parents=True)
    (folder / 'args.json').write_text(json.dumps(
        dict(dataset=dataset, epochs=epochs or len(accuracies), seed=0), indent=2) + '\n')
    rows = [dict(epoch=e, train_loss=1.0 / e, lr=1e-4, test_loss=0.5, test_acc1=acc,
                 test_acc5=100.0, epoch_time=10.0) for e, acc in enumerate(accuracies, 1)]
    (folder / 'log.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))


def collected(argv, capsys):
    paper.main(argv)
    return table_rows(capsys.readouterr().out)


def test_the_mini_table_states_each_attentions_mean_and_spread_over_its_seeds(tmp_path, capsys):
    runs = tmp_path / 'mini'
    for seed, accs in enumerate(([80.0, 90.0], [92.0, 91.0], [85.0, 94.0])):
        write_run(runs / f'vit_tiny_softmax_digits_seed{seed}', accs)
    for seed, accs in enumerate(([96.0, 95.0], [90.0, 97.0], [98.0, 98.0])):
        write_run(runs / f'vit_tiny_G3B_digits_seed{seed}', accs)
    write_run(runs / 'vit_tiny_G3U_digits_seed0', [95.5, 90.0])
    write_run(runs / 'vit_tiny_G3U_digits_seed1', [93.0], epochs=2)  # stopped after epoch 1
    rows = collected(['table', 'mini', '--out', str(tmp_path)], capsys)
    softmax, g3b, g3u = (rows[('ViT-Tiny', a, 'digits')] for a in ('softmax', 'G3B', 'G3U'))
    # best epochs 90, 92, 94: mean 92, sample standard deviation 2
    # no paper columns (the paper has no digits): model, attention, dataset, ours, gain, runs
    assert softmax[3:] == ['92.00 ± 2.00 [90.00, 94.00]', '', '3 seeds × 2 epochs, 20 s each']
    assert g3b[3:5] == ['97.00 ± 1.00 [96.00, 98.00]', '+5.00']
    assert g3u[3:] == ['95.50', '+3.50', '2 epochs, 20 s; running: 1/2 epochs']  # seed 0 alone


def test_table1_sets_each_row_beside_the_papers_number(tmp_path, capsys):
    write_run(tmp_path / 'table1' / 'vit_tiny_softmax_cifar10', [60.0, 70.0, 69.0],
              dataset='cifar10')
    write_run(tmp_path / 'table1' / 'vit_tiny_G3B_cifar10', [75.0, 74.0], dataset='cifar10')
    write_run(tmp_path / 'table1' / 'vit_base_G1B_imagenet', [40.0], epochs=100,
              dataset='imagenet')
    rows = collected(['table', 'table1', '--out', str(tmp_path)], capsys)
    softmax, g3b = rows[('ViT-Tiny', 'softmax', 'CIFAR-10')], rows[('ViT-Tiny', 'G3B', 'CIFAR-10')]
    assert softmax[3:6] == ['72.76', '70.00', '-2.76'] and softmax[8] == '3 epochs, 30 s'
    # the paper's G3B gain over softmax (76.69 - 72.76) beside ours (75 - 70)
    assert g3b[3:8] == ['76.69', '75.00', '-1.69', '+3.93', '+5.00']
    base = rows[('ViT-Base', 'G1B', 'ImageNet-1K')]
    assert base[4] == 'running' and base[8] == 'running: 1/100 epochs'
    assert rows[('Swin-T', 'softmax', 'CIFAR-10')][4] == 'not run'
    assert (tmp_path / 'table1.png').is_file()
