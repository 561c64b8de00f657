"""train.py: learning happens, resume is exact after a kill, checkpoints are atomic and safe,
DDP reduces exactly, and bad input is one line on stderr. Tiny models (ViT-Tiny cut to one
or two blocks at 8x8 pixels, patch 2: N = 17) keep every run to seconds on a 2-core CPU."""
import json
import os
import pickle
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import cli
import data
import detection
import models
import train
import weights

ROOT = Path(__file__).resolve().parent.parent
TINY = ['--model', 'vit_tiny', '--img-size', '8', '--patch-size', '2', '--device', 'cpu']
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(ROOT))


def python(*args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300, **kw)


def log(out):
    return [json.loads(line) for line in (Path(out) / 'log.jsonl').read_text().splitlines()]


def fails(argv, capsys):
    """Run train.main in-process; return its one stderr line, after checking it exited non-zero."""
    with pytest.raises(SystemExit) as exit_:
        train.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code not in (0, None)
    assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err, err
    return err


# Learning -------------------------------------------------------------------------------------

def test_a_short_run_learns_digits_far_above_chance(tmp_path):
    train.main(TINY + ['--attn', 'fourier', '--depth', '2', '--epochs', '2', '--batch-size', '64',
                       '--lr', '1e-3', '--warmup-epochs', '1', '--output-dir', str(tmp_path)])
    rows = log(tmp_path)
    assert [r['epoch'] for r in rows] == [1, 2]
    assert rows[-1]['test_acc1'] >= 75  # chance is 10%; 90% here
    assert rows[-1]['train_loss'] < rows[0]['train_loss']


def colour_coded(n, size=8):
    """Images whose class is their colour (0 red, 1 green, 2 blue): learnable in a few steps,
    so a perfect score proves that images and labels arrive paired."""
    labels = np.arange(n) % 3
    images = np.zeros((n, size, size, 3), np.uint8)
    images[np.arange(n), :, :, labels] = 200
    return images + np.random.default_rng(0).integers(0, 40, images.shape, dtype=np.uint8), labels


FAST_RECIPE = ['--epochs', '4', '--warmup-epochs', '0', '--lr', '2e-3', '--batch-size', '16',
               '--augment', 'light', '--mixup', '0', '--cutmix', '0', '--ema', '0',
               '--workers', '0', '--depth', '1', '--attn', 'fourier']


def test_cifar10_from_its_own_pickle_format(tmp_path, monkeypatch):
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        images, labels = colour_coded(24, size=32)  # CIFAR's own size; the run resizes to 8
        batch = {'data': images.transpose(0, 3, 1, 2).reshape(24, -1), 'labels': labels.tolist()}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / 'batches.meta').write_bytes(
        pickle.dumps({'label_names': [f'c{i}' for i in range(10)]}, protocol=2))
    # our files are real CIFAR pickles but not the published ones, whose md5 torchvision checks
    monkeypatch.setattr(torchvision.datasets.cifar, 'check_integrity',
                        lambda path, md5=None: Path(path).is_file())
    train.main(TINY + FAST_RECIPE + ['--dataset', 'cifar10', '--data-path', str(tmp_path),
                                     '--output-dir', str(tmp_path / 'run')])
    assert log(tmp_path / 'run')[-1]['test_acc1'] == 100


def png_tree(root, n=18):
    for split in ('train', 'val'):
        images, labels = colour_coded(n)
        for i, (image, label) in enumerate(zip(images, labels)):
            (root / split / f'class{label}').mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(root / split / f'class{label}' / f'{i}.png')
    return root


def test_image_folder_tree_of_pngs(tmp_path):
    tree = png_tree(tmp_path / 'tree')
    train.main(TINY + FAST_RECIPE + ['--dataset', 'folder', '--data-path', str(tree),
                                     '--output-dir', str(tmp_path / 'run')])
    assert log(tmp_path / 'run')[-1]['test_acc1'] == 100
    assert torch.load(tmp_path / 'run' / 'last.pt', weights_only=True)['config']['num_classes'] == 3


# Checkpoints: exact resume, atomic writes, safe loading -------------------------------------------

# Augmentation, Mixup/CutMix, drop-path, EMA and a loader worker all draw random numbers,
# so an exact resume has to restore or replay every one of them.
RESUMABLE = TINY + ['--attn', 'fourier', '--depth', '2', '--limit', '192', '--epochs', '3',
                    '--batch-size', '32', '--augment', 'paper', '--mixup', '0.8', '--cutmix', '1.0',
                    '--ema', '0.9', '--drop-path', '0.1', '--workers', '1']

DIE_AFTER_SAVE = """
import os, signal, sys, train, weights
save = weights.save_atomic
def save_then_die(state, path):
    save(state, path)
    if path.name == 'last.pt' and state['epoch'] == 1:
        os.kill(os.getpid(), signal.SIGKILL)
weights.save_atomic = save_then_die
train.main(sys.argv[1:])
"""

DIE_DURING_SAVE = """
import io, os, signal, sys, torch, train
save = torch.save
def torn_save(state, f):
    if isinstance(state, dict) and state.get('epoch') == 2:
        buffer = io.BytesIO()
        save(state, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    save(state, f)
torch.save = torn_save
train.main(sys.argv[1:])
"""


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp('uninterrupted')
    done = python('train.py', *RESUMABLE, '--output-dir', str(out))
    assert done.returncode == 0, done.stderr
    return out


def assert_same_run(out, reference):
    strip = lambda rows: [{k: v for k, v in r.items() if k != 'epoch_time'} for r in rows]
    assert strip(log(out)) == strip(log(reference))
    mine, theirs = (torch.load(Path(d) / 'last.pt', weights_only=True) for d in (out, reference))
    for part in ('model', 'ema'):
        assert all(torch.equal(mine[part][k], theirs[part][k]) for k in theirs[part]), part


def test_resume_after_sigkill_ends_exactly_like_an_uninterrupted_run(tmp_path, uninterrupted):
    killed = python('-c', DIE_AFTER_SAVE, *RESUMABLE, '--output-dir', str(tmp_path))
    assert killed.returncode == -9
    assert torch.load(tmp_path / 'last.pt', weights_only=True)['epoch'] == 1
    assert log(tmp_path) == []  # killed before the log line: resume rewrites it from the checkpoint
    resumed = python('train.py', *RESUMABLE, '--resume', str(tmp_path / 'last.pt'))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path, uninterrupted)


def test_a_kill_while_saving_leaves_the_previous_checkpoint_loadable(tmp_path, uninterrupted):
    killed = python('-c', DIE_DURING_SAVE, *RESUMABLE, '--output-dir', str(tmp_path))
    assert killed.returncode == -9
    assert (tmp_path / 'last.pt.tmp').exists()  # the torn write
    assert torch.load(tmp_path / 'last.pt', weights_only=True)['epoch'] == 1
    resumed = python('train.py', *RESUMABLE, '--resume', str(tmp_path / 'last.pt'))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path, uninterrupted)


def test_eval_only_reproduces_the_logged_metrics(uninterrupted):
    done = python('train.py', *RESUMABLE, '--eval-only', '--resume', str(uninterrupted / 'last.pt'))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    last = log(uninterrupted)[-1]
    for key in ('test_acc1', 'test_acc5', 'ema_test_acc1'):
        assert result[key] == last[key]
    assert result['test_loss'] == pytest.approx(last['test_loss'], rel=1e-6)


class Payload:
    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_loading_never_runs_code_carried_by_a_checkpoint(tmp_path, capsys):
    Payload.marker = tmp_path / 'pwned'
    torch.save({'model': Payload(), 'config': {}}, tmp_path / 'evil.pt')
    err = fails(TINY + ['--eval-only', '--resume', str(tmp_path / 'evil.pt')], capsys)
    assert 'cannot load checkpoint' in err
    assert not Payload.marker.exists()


@pytest.fixture(scope='module')
def softmax_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp('softmax')
    train.main(TINY + ['--attn', 'softmax', '--depth', '1', '--limit', '64', '--epochs', '1',
                       '--output-dir', str(out)])
    return out / 'last.pt'


def test_finetune_keeps_the_body_and_builds_a_new_head(tmp_path, softmax_checkpoint):
    tree = png_tree(tmp_path / 'tree')
    args = train.parse_args(TINY + ['--attn', 'softmax', '--depth', '1', '--dataset', 'folder',
                                    '--data-path', str(tree)])
    model = cli.build_model(cli.model_config(args, 3))
    fresh_head = model.head.weight.clone()
    train.finetune_from(model, softmax_checkpoint)
    source = torch.load(softmax_checkpoint, weights_only=True)['model']
    for key, value in model.state_dict().items():
        if key.startswith('head.'):
            assert value.shape[0] == 3 and source[key].shape[0] == 10
        else:
            assert torch.equal(value, source[key]), key
    assert torch.equal(model.head.weight, fresh_head)
    train.main(TINY + FAST_RECIPE + ['--attn', 'softmax', '--dataset', 'folder', '--data-path',
                                     str(tree), '--finetune', str(softmax_checkpoint),
                                     '--output-dir', str(tmp_path / 'run')])
    assert log(tmp_path / 'run')[-1]['test_acc1'] == 100


def test_finetune_at_another_size_resizes_softmax_position_embeddings(softmax_checkpoint):
    args = train.parse_args(['--attn', 'softmax', '--depth', '1', '--img-size', '16',
                             '--patch-size', '2'])
    model = cli.build_model(cli.model_config(args, 10))
    train.finetune_from(model, softmax_checkpoint)
    source = torch.load(softmax_checkpoint, weights_only=True)['model']['pos_embed']
    assert model.pos_embed.shape == (1, 65, 192)
    assert torch.equal(model.pos_embed[:, 0], source[:, 0])  # the CLS token's embedding is kept


def test_on_a_cpu_a_freed_tensor_is_reused_without_page_faults():
    """train.py's allocator settings (glibc): once three tensors have settled the heap, the
    16 MiB of a freed tensor serve the next one, whose fill then faults in almost no new pages
    (4,096 if they were mapped afresh, as they are again and again with glibc's defaults)."""
    if not cli.reuse_freed_memory():
        pytest.skip('not glibc')

    def faults():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(4 * 2 ** 20)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    settled = [faults() for _ in range(8)][3:]
    assert sorted(settled)[2] < 256, settled


def test_schedule_warms_up_linearly_then_follows_a_cosine_to_min_lr():
    args = train.parse_args(['--lr', '1e-3', '--warmup-lr', '1e-6', '--min-lr', '1e-5',
                             '--warmup-epochs', '2', '--epochs', '10'])
    lr = lambda step: train.learning_rate(step, args, steps_per_epoch=5)
    assert (lr(0) == 1e-6 and lr(5) == pytest.approx((1e-6 + 1e-3) / 2)
            and lr(10) == pytest.approx(1e-3))
    assert lr(30) == pytest.approx((1e-3 + 1e-5) / 2)  # halfway through the cosine
    assert lr(50) == pytest.approx(1e-5)


# Distributed ----------------------------------------------------------------------------------

def test_torchrun_two_processes_on_gloo_reduce_evaluation_exactly(tmp_path):
    run = python('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
                 *TINY, '--depth', '1', '--limit', '256', '--epochs', '2',
                 '--output-dir', str(tmp_path))
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / 'args.json').read_text())['world_size'] == 2
    assert [r['epoch'] for r in log(tmp_path)] == [1, 2]
    alone = python('train.py', *TINY, '--limit', '256', '--eval-only',
                   '--resume', str(tmp_path / 'last.pt'))
    assert alone.returncode == 0, alone.stderr
    # one process over all 256 test images scores exactly what the two ranks summed
    result = json.loads(alone.stdout.strip().splitlines()[-1])
    assert result['test_acc1'] == log(tmp_path)[-1]['test_acc1']
    assert result['test_loss'] == pytest.approx(log(tmp_path)[-1]['test_loss'], rel=1e-6)


# Failures -------------------------------------------------------------------------------------

def test_a_non_finite_loss_stops_at_a_named_step_and_keeps_the_last_checkpoint(tmp_path, capsys):
    base = TINY + ['--depth', '1', '--limit', '128', '--output-dir', str(tmp_path)]
    train.main(base + ['--epochs', '1'])
    before = (tmp_path / 'last.pt').read_bytes()
    err = fails(base + ['--epochs', '2', '--lr', '1e12', '--warmup-epochs', '0',
                        '--resume', str(tmp_path / 'last.pt')], capsys)
    assert 'non-finite' in err and 'at step' in err
    assert (tmp_path / 'last.pt').read_bytes() == before
    assert torch.load(tmp_path / 'last.pt', weights_only=True)['epoch'] == 1


def write(path, data):
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize('case', ['missing dataset', 'keep head without finetune',
                                  'garbage checkpoint', 'truncated checkpoint',
                                  'another architecture', 'other classes', 'unknown model',
                                  'unknown attention', 'image not a multiple of the patch',
                                  'rank zero', 'no folder tree', 'patch size zero',
                                  'batch size zero', 'negative lr', 'negative workers',
                                  'no epochs', 'no blocks', 'impossible model before the data',
                                  'output under a file', 'softmax with grid zero'])
def test_bad_input_is_one_line_and_a_non_zero_exit(case, tmp_path, capsys, softmax_checkpoint):
    full = softmax_checkpoint.read_bytes()
    argv, expect = {
        'missing dataset': (['--dataset', 'cifar10', '--data-path', str(tmp_path)], '--download'),
        'keep head without finetune': (['--keep-head'], '--keep-head'),
        'garbage checkpoint': (['--resume', write(tmp_path / 'g.pt', b'not a checkpoint' * 9)],
                               'cannot load'),
        'truncated checkpoint': (['--resume', write(tmp_path / 't.pt', full[: len(full) // 2])],
                                 'cannot load'),
        'another architecture': (['--depth', '2', '--finetune', str(softmax_checkpoint)],
                                 'it lacks blocks.1.'),
        'other classes': (['--dataset', 'folder',
                           '--data-path', str(png_tree(tmp_path / 'tree', 6)),
                           '--resume', str(softmax_checkpoint), '--epochs', '2'], '--finetune'),
        'unknown model': (['--model', 'vit_huge'], 'vit_huge'),
        'unknown attention': (['--attn', 'sigmoid'], 'sigmoid'),
        'image not a multiple of the patch': (['--img-size', '30', '--patch-size', '4'],
                                              'multiple'),
        'rank zero': (['--rank', '0'], 'rank'),
        'no folder tree': (['--dataset', 'imagenet', '--data-path', str(tmp_path)], 'train'),
        'patch size zero': (['--patch-size', '0'], '--patch-size'),
        'batch size zero': (['--batch-size', '0'], '--batch-size'),
        'negative lr': (['--lr', '-1'], '--lr'),
        'negative workers': (['--workers', '-1'], '--workers'),
        'no epochs': (['--epochs', '0'], '--epochs'),
        'no blocks': (['--depth', '0'], '--depth'),
        'impossible model before the data': (['--dataset', 'cifar10', '--data-path', str(tmp_path),
                                              '--img-size', '30', '--patch-size', '4'], 'multiple'),
        'output under a file': (['--output-dir', write(tmp_path / 'file', b'') + '/run'],
                                'cannot write'),
        'softmax with grid zero': (['--attn', 'softmax', '--grid', '0'], '--grid'),
    }[case]
    assert expect in fails(TINY + ['--epochs', '1', '--output-dir', str(tmp_path / 'out')] + argv,
                           capsys)


def test_cli_failure_has_no_traceback():
    done = python('train.py', '--dataset', 'svhn', '--data-path', '/nonexistent')
    assert done.returncode != 0
    assert (done.stderr.count('\n') == 1 and 'Traceback' not in done.stderr
            and '--download' in done.stderr)


# Runs are protected --------------------------------------------------------------------------

QUICK = TINY + ['--depth', '1', '--limit', '64', '--epochs', '1']


def fingerprint(out):
    return {p.name: p.read_bytes() for p in Path(out).iterdir()}


def refused(*argv):
    """Run train.py as a user would; return its one stderr line after checking it failed."""
    done = python('train.py', *argv)
    assert done.returncode not in (0, None)
    assert done.stderr.count('\n') == 1 and 'Traceback' not in done.stderr, done.stderr
    return done.stderr


def test_a_folder_holding_a_run_is_never_overwritten_unless_asked(tmp_path):
    train.main(QUICK + ['--output-dir', str(tmp_path)])
    before = fingerprint(tmp_path)
    assert '--overwrite' in refused(*QUICK, '--attn', 'softmax', '--output-dir', str(tmp_path))
    assert fingerprint(tmp_path) == before
    train.main(QUICK + ['--attn', 'softmax', '--output-dir', str(tmp_path), '--overwrite'])
    assert torch.load(tmp_path / 'last.pt', weights_only=True)['config']['attn'] == 'softmax'
    assert json.loads((tmp_path / 'args.json').read_text())['attn'] == 'softmax'


def test_resume_refuses_a_model_flag_that_differs_from_the_checkpoint(tmp_path):
    train.main(QUICK + ['--output-dir', str(tmp_path)])
    before = fingerprint(tmp_path)
    err = refused(*QUICK, '--attn', 'softmax', '--epochs', '2',
                  '--resume', str(tmp_path / 'last.pt'))
    assert '--attn softmax' in err and 'fourier' in err
    assert fingerprint(tmp_path) == before



def test_resume_alone_continues_the_run_with_its_own_recipe_and_data(tmp_path, capsys):
    # flags alone, the resumed run would train vit_tiny's digits recipe (lr 5e-4 on digits)
    first = ['--model', 'vit_tiny', '--embed-dim', '96', '--depth', '1', '--dataset', 'fake',
             '--img-size', '8', '--patch-size', '2', '--limit', '64', '--epochs', '1',
             '--seed', '3', '--device', 'cpu', '--output-dir', str(tmp_path)]
    train.main(first)
    ran = json.loads((tmp_path / 'args.json').read_text())
    assert ran['lr'] != pytest.approx(5e-4) and ran['dataset'] == 'fake'
    capsys.readouterr()
    train.main(['--resume', str(tmp_path / 'last.pt'), '--epochs', '2', '--device', 'cpu'])
    assert capsys.readouterr().out.startswith(f"resuming {tmp_path / 'last.pt'}: fake, 8x8 px")
    resumed = json.loads((tmp_path / 'args.json').read_text())
    assert {k: resumed[k] for k in ('lr', 'dataset', 'seed', 'limit', 'batch_size')} == \
        {k: ran[k] for k in ('lr', 'dataset', 'seed', 'limit', 'batch_size')}
    assert resumed['epochs'] == 2 and [row['epoch'] for row in log(tmp_path)] == [1, 2]

INTERRUPT_AFTER_SAVE = DIE_AFTER_SAVE.replace("os.kill(os.getpid(), signal.SIGKILL)",
                                              "raise KeyboardInterrupt")


def test_ctrl_c_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    done = python('-c', INTERRUPT_AFTER_SAVE, *QUICK, '--epochs', '2',
                  '--output-dir', str(tmp_path))
    assert done.returncode == 130
    assert (done.stderr.count('\n') == 1 and 'interrupted' in done.stderr
            and 'Traceback' not in done.stderr)
    assert torch.load(tmp_path / 'last.pt', weights_only=True)['epoch'] == 1


def children(pid):
    tasks = Path(f'/proc/{pid}/task').iterdir()  # each thread's own children
    return [int(c) for task in tasks for c in (task / 'children').read_text().split()]


def importing_torch(pid):
    return 'libtorch' in Path(f'/proc/{pid}/maps').read_text()


@pytest.mark.skipif(not Path('/proc/self/task').is_dir(), reason='reads processes from /proc')
@pytest.mark.parametrize('when', ['starting', 'training'])
def test_ctrl_c_under_torchrun_is_at_most_one_line_per_process(tmp_path, when):
    """Ctrl-C sends SIGINT to the terminal's whole process group, torchrun forwards it again to
    its workers, and a worker may be importing (seconds) or training. torchrun's launcher then
    prints its own traceback (SignalException, in torch/distributed): that one is not ours."""
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               'train.py', *QUICK, '--epochs', '50', '--output-dir', str(tmp_path)]
    run = subprocess.Popen(command, cwd=ROOT, env=ENV, text=True, start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if when == 'starting':  # both workers are loading torch's library: seconds of imports left
            while len(workers := children(run.pid)) < 2 or not all(map(importing_torch, workers)):
                assert run.poll() is None
                time.sleep(0.01)
        else:
            while not run.stdout.readline().startswith('epoch 1/'):
                assert run.poll() is None
        os.killpg(run.pid, signal.SIGINT)
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode != 0
    assert 'train.py", line' not in err and 'KeyboardInterrupt' not in err, err
    ours = [line for line in err.splitlines() if 'train.py: ' in line]
    assert sorted(line.split(']')[0] for line in ours) == ['[rank 0', '[rank 1'], err
    if when == 'starting':  # the handler set before the imports spoke, and nothing was written
        assert all('interrupted while starting' in line for line in ours), err
        assert not (tmp_path / 'last.pt').exists()
    else:
        assert all('interrupted' in line for line in ours), err
        assert torch.load(tmp_path / 'last.pt', weights_only=True)['epoch'] >= 1


def test_without_a_terminal_progress_comes_as_lines(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, 'PROGRESS_SECONDS', 0)
    train.main(QUICK + ['--batch-size', '32', '--output-dir', str(tmp_path)])
    assert '  epoch 1/1  step 2/2  loss ' in capsys.readouterr().out


def test_each_run_draws_its_curves_and_curves_py_overlays_runs(tmp_path):
    png = b'\x89PNG\r\n\x1a\n'
    for attn in ('softmax', 'fourier'):
        train.main(QUICK + ['--attn', attn, '--output-dir', str(tmp_path / attn)])
        assert (tmp_path / attn / 'curves.png').read_bytes()[:8] == png
    done = python('curves.py', str(tmp_path / 'softmax'), str(tmp_path / 'fourier'),
                  '-o', str(tmp_path / 'both.png'))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / 'both.png').read_bytes()[:8] == png


@pytest.mark.parametrize('workers', ['0', '1'])
def test_an_unreadable_image_stops_the_run_with_its_file_name(tmp_path, workers):
    tree = png_tree(tmp_path / 'tree', n=6)
    (tree / 'train' / 'class0' / 'broken.jpg').write_bytes(b'not a jpeg at all')
    err = refused(*TINY, *FAST_RECIPE, '--dataset', 'folder', '--data-path', str(tree),
                  '--workers', workers, '--output-dir', str(tmp_path / 'run'))
    assert 'broken.jpg' in err


# The offline default ----------------------------------------------------------------------------

def test_without_a_dataset_the_first_line_says_what_data_was_chosen(tmp_path, capsys):
    train.main(['--depth', '1', '--limit', '64', '--epochs', '1', '--device', 'cpu',
                '--output-dir', str(tmp_path)])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith('no --dataset given: digits, 8x8 px, patch 2, 1 epochs, lr 0.0005')
    assert train.chosen(train.parse_args(['--model', 'swin_t'])) == \
        'digits, 64x64 px, patch 4, windows 4/4/4/2, 30 epochs, lr 0.000125'


@pytest.mark.parametrize('name', cli.MODEL_NAMES)
def test_every_model_has_an_offline_default_it_can_learn_on(name):
    """The model train.py builds for `--model NAME` and no other flag: its task's offline data,
    no window of a single token (KArAt's operator would gate V by φ(q.k), unbounded: issue 16)
    and no faster lr than the tiny model's per unit of width (Adam moves a logit by ~lr x width)."""
    args = train.parse_args(['--model', name])
    assert args.dataset == ('shapes' if name.startswith('vitdet') else 'digits')
    with torch.device('meta'):
        model = cli.build_model(cli.model_config(args, data.DATASETS[args.dataset].classes))
    windowed = (models.WindowAttention, detection.ViTDetAttention)
    windows = [m.window for m in model.modules() if isinstance(m, windowed)]
    assert min(windows, default=2) >= 2
    width = max(m.qkv.in_features for m in model.modules() if isinstance(m, models.Attention))
    tiny = {'digits': 5e-4 * 192, 'shapes': 1e-3 * 96}[args.dataset]  # vit_tiny's, vitdet_tiny's
    assert args.lr * width <= tiny * (1 + 1e-12)


# Each family's tiny model on the data and sizes train.py chooses for it, with Fourier KArAt (the
# default), cut to a few blocks so that a run takes seconds; Swin also to 24 channels (lr 5e-4).
FEW_BLOCKS = {'vit_tiny': ['--depth', '2'],
              'convit_tiny': ['--depth', '3'],  # 1 GPSA block, then 2 MHSA blocks
              'swin_t': ['--depth', '1,1,1,1', '--embed-dim', '24']}


@pytest.mark.parametrize('name', FEW_BLOCKS)
def test_each_family_learns_its_offline_default_without_diverging(name, tmp_path):
    train.main(['--model', name, *FEW_BLOCKS[name], '--limit', '320', '--epochs', '2',
                '--device', 'cpu', '--output-dir', str(tmp_path)])
    rows = log(tmp_path)
    assert rows[-1]['test_acc1'] >= 70  # chance: 10%
    assert rows[-1]['test_acc1'] > rows[0]['test_acc1']
    assert rows[-1]['train_loss'] < rows[0]['train_loss']


def test_a_detector_without_a_dataset_trains_on_shapes(tmp_path, capsys):
    train.main(['--model', 'vitdet_tiny', '--limit', '16', '--epochs', '2', '--device', 'cpu',
                '--output-dir', str(tmp_path)])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith('no --dataset given: shapes, 128x128 px, patch 16, 2 epochs')
    rows = log(tmp_path)
    assert rows[-1]['train_loss'] < rows[0]['train_loss'] and 'box_ap' in rows[-1]

