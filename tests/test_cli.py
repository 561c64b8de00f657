"""A newcomer at the command line: every flag of train.py and bench.py says what it does and its
default, every refusal is one line decided before anything is written, and every hint names a
command that works from where the user stands."""
import argparse
import subprocess
import sys

import pytest
import torch

import bench
import train
from test_train import (ENV, FAST_RECIPE, QUICK, ROOT, TINY, fingerprint, log, png_tree,
                        python)

NO_INTERPRETER = {k: v for k, v in ENV.items() if k != 'TRITON_INTERPRET'}


@pytest.mark.parametrize('script', [train, bench], ids=['train.py', 'bench.py'])
def test_every_flag_says_what_it_does_and_each_value_flag_its_default(script):
    actions = [a for a in script.parser()._actions if not isinstance(a, argparse._HelpAction)]
    silent = [a.option_strings[0] for a in actions if not (a.help or '').strip()]
    undefaulted = [a.option_strings[0] for a in actions
                   if a.nargs != 0 and 'default' not in a.help]
    assert not silent and not undefaulted, (silent, undefaulted)


def refused(*argv, env=ENV, script='train.py'):
    """Run a script as a user would; return its one stderr line after checking it failed."""
    done = subprocess.run([sys.executable, script, *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode not in (0, None)
    assert done.stderr.count('\n') == 1 and 'Traceback' not in done.stderr, done.stderr
    return done.stderr


DEVICES = {'gpu': "unknown device 'gpu'; allowed here: cpu",
           'cuda': 'this machine has no CUDA GPU; allowed here: cpu',
           'mps': 'this machine has no mps device; allowed here: cpu'}


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(),
                    reason='refusals of a CPU-only machine')
@pytest.mark.parametrize('script', ['train.py', 'bench.py'])
@pytest.mark.parametrize('argv, expect', [
    *[(['--device', name], message) for name, message in DEVICES.items()],
    (['--kernel', 'triton'], '--kernel triton runs the fused kernels on a CUDA GPU, got --device '
                             'cpu; allowed here: --kernel torch or auto'),
    (['--rank', '0'], "invalid rank '0': an integer r >= 1, or 'full'"),
], ids=['device gpu', 'device cuda', 'device mps', 'kernel triton', 'rank zero'])
def test_a_refused_flag_is_one_line_naming_what_is_allowed_and_writes_nothing(script, argv, expect,
                                                                            tmp_path):
    out = tmp_path / 'run'
    extra = ['--output-dir', str(out)] if script == 'train.py' else []
    assert expect in refused(*TINY, *argv, *extra, env=NO_INTERPRETER, script=script)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_dataset_writes_nothing(tmp_path):
    assert '--download' in refused(*TINY, '--dataset', 'cifar10', '--data-path', str(tmp_path),
                                   '--output-dir', str(tmp_path / 'run'))
    assert list(tmp_path.iterdir()) == []


STOP_IN_FIRST_EPOCH = """
import sys, train
def stop(*args):
    raise KeyboardInterrupt
train.train_one_epoch = stop
train.main(sys.argv[1:])
"""


def test_ctrl_c_before_the_first_checkpoint_says_the_same_command_starts_again(tmp_path):
    command = [*QUICK, '--output-dir', str(tmp_path)]
    done = python('-c', STOP_IN_FIRST_EPOCH, *command)
    assert done.returncode == 130 and done.stderr.count('\n') == 1, done.stderr
    assert 'interrupted; the same command starts it again (nothing was saved yet)' in done.stderr
    assert python('train.py', *command).returncode == 0  # it does, no --overwrite needed
    assert [row['epoch'] for row in log(tmp_path)] == [1]


def test_an_unreadable_image_names_the_file_and_the_command_that_goes_on(tmp_path):
    tree = png_tree(tmp_path / 'tree', n=6)
    broken = tree / 'train' / 'class0' / 'broken.jpg'
    broken.write_bytes(b'not a jpeg at all')
    command = [*TINY, *FAST_RECIPE, '--dataset', 'folder', '--data-path', str(tree),
               '--output-dir', str(tmp_path / 'run')]
    err = refused(*command)
    assert str(broken) in err and 'remove or replace it, then the same command starts it again' \
        in err
    broken.unlink()
    assert python('train.py', *command).returncode == 0


def test_resuming_a_finished_run_says_so_and_how_to_extend_it(tmp_path):
    train.main(QUICK + ['--output-dir', str(tmp_path)])
    before = fingerprint(tmp_path)
    done = python('train.py', '--resume', str(tmp_path / 'last.pt'), '--device', 'cpu')
    assert done.returncode == 0 and done.stderr == ''
    assert done.stdout == (f"{tmp_path / 'last.pt'} has finished its 1 epochs: nothing left to "
                           f"run; --resume {tmp_path / 'last.pt'} --epochs N, N > 1, extends it\n")
    assert fingerprint(tmp_path) == before
    # killed after its last checkpoint, before the log's line: the log is made whole again
    (tmp_path / 'log.jsonl').write_text('')
    again = python('train.py', '--resume', str(tmp_path / 'last.pt'), '--device', 'cpu')
    assert again.returncode == 0 and again.stdout == done.stdout
    assert [row['epoch'] for row in log(tmp_path)] == [1]
    extended = python('train.py', '--resume', str(tmp_path / 'last.pt'), '--epochs', '2',
                      '--device', 'cpu')
    assert extended.returncode == 0 and [row['epoch'] for row in log(tmp_path)] == [1, 2]
