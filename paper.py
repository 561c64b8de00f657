"""Run the paper's tables with train.py, and collect the runs beside the paper's numbers.

    python paper.py run table1 --out runs/paper --data-path /data     # every Table 1 row
    python paper.py run table1 --nproc 8 --only ViT-Base              # torchrun, one model
    python paper.py run transfer --out runs/paper                     # from table1's ImageNet runs
    python paper.py table table1 --out runs/paper                     # markdown + table1.png
    python paper.py run mini && python paper.py table mini            # digits, on a laptop CPU
    python paper.py run table1 --on digits -- --limit 64 --epochs 1   # a rehearsal, offline

A table is a list of rows (model, attention, dataset: paper.csv holds the paper's and its top-1),
and each row is one `python train.py` run in its own folder, <out>/<table>/<run>. `run` skips a
run whose log.jsonl holds all its epochs, resumes one whose folder holds last.pt (--resume) and
starts the others, one at a time; it prints one line as each run starts and one as it ends, and
the run's own output goes to train.log in its folder. Flags after `--` go to every train.py.
`table` reads each row's log.jsonl into a markdown table (ours, the paper's, their difference,
each attention's gain over softmax) and draws the same comparison into <out>/<table>.png.

The file reads top-down: the command line, the tables' rows, the runs, the collector.
"""
import argparse
import csv
import json
import math
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no window, no global state

import curves

ROOT = Path(__file__).resolve().parent

# The paper's names, and the train.py flags they stand for
MODELS = {'ViT-Tiny': 'vit_tiny', 'ViT-Small': 'vit_small', 'ViT-Base': 'vit_base',
          'ConViT-Tiny': 'convit_tiny', 'Swin-T': 'swin_t'}
ATTENTIONS = {  # Fourier KArAt GnB / GnU: grid G = n, rank r = 12, blockwise or universal
    'softmax': ['--attn', 'softmax'],
    **{f'G{g}{m[0].upper()}': ['--attn', 'fourier', '--grid', str(g), '--rank', '12', '--mode', m]
       for g in (1, 3) for m in ('blockwise', 'universal')}}
DATASETS = {'CIFAR-10': 'cifar10', 'CIFAR-100': 'cifar100', 'ImageNet-1K': 'imagenet',
            'SVHN': 'svhn', 'Flowers-102': 'flowers102', 'STL-10': 'stl10', 'digits': 'digits',
            'fake': 'fake'}
OFFLINE = ('digits', 'fake')  # what --on may train every row on instead
DOWNLOADABLE = ('cifar10', 'cifar100', 'svhn', 'flowers102', 'stl10')  # train.py --download
PAPERS_BATCH = {'imagenet': 128}  # the paper's total batch: 128 on ImageNet, 32 elsewhere
# flags that are paper.py's to set, refused after `--`
OWN_FLAGS = ('--output-dir', '--resume', '--finetune', '--dataset', '--model', '--attn',
             '--seed', '--data-path', '--download', '--overwrite')

# The miniature: ViT-Tiny's digits recipe (train.py's default run), shortened to 10 epochs,
# three seeds of each attention: ~20 minutes on 2 CPU cores
MINI_ATTENTIONS, MINI_SEEDS, MINI_FLAGS = ('softmax', 'G3B', 'G3U'), (0, 1, 2), ['--epochs', '10']


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    own, extra = (argv[:argv.index('--')], argv[argv.index('--') + 1:]) if '--' in argv \
        else (argv, [])
    try:
        args = parse_args(own, extra)
        if args.command == 'run':
            run_table(args)
        else:
            print(collect(args))
    except Fatal as e:
        say(f"paper.py: error: {e}")
        sys.exit(e.code)
    except KeyboardInterrupt:
        say("paper.py: interrupted; the same command resumes where the runs stopped")
        sys.exit(130)


class Fatal(Exception):
    """An error the user can fix: one line on stderr and exit with `code`."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


def say(line):
    sys.stderr.write(line + '\n')
    sys.stderr.flush()


# Command line ---------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        raise Fatal(f"{message} (see --help)", code=2)


def parse_args(own, extra):
    """The flags, every refusal decided here, before any file is written."""
    p = Parser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split(
                   '\n\n', 1)[1])
    commands = p.add_subparsers(dest='command', required=True, parser_class=Parser)
    for name, what in (('run', 'run the table: start, resume or skip each of its runs'),
                       ('table', "collect the table's finished runs beside the paper's numbers")):
        c = commands.add_parser(name, help=what, description=what, allow_abbrev=False)
        c.add_argument('table', choices=('table1', 'transfer', 'mini'),
                       help="table1: top-1 on CIFAR-10/100 and ImageNet-1K; transfer: SVHN, "
                            "Flowers-102, STL-10 from table1's ImageNet runs; mini: digits, "
                            "3 seeds")
        c.add_argument('--out', type=Path, default=Path('runs/paper'),
                       help="the tables' folder: a run goes to OUT/TABLE/RUN (default runs/paper)")
        c.add_argument('--only', action='append', default=[], metavar='NAME',
                       help="only the rows named NAME (a model, attention or dataset, the paper's "
                            "or train.py's spelling); repeat to narrow (default every row)")
        if name == 'table':
            c.add_argument('--figure', type=Path,
                           help='the PNG of the comparison (default OUT/TABLE.png)')
            continue
        c.add_argument('--data-path', default='data',
                       help="torchvision's datasets' root (default data)")
        c.add_argument('--imagenet',
                       help='ImageNet-1K: train/ and val/ (default DATA_PATH/imagenet)')
        c.add_argument('--download', action='store_true',
                       help='let torchvision fetch CIFAR, SVHN, Flowers-102, STL-10 into DATA_PATH')
        c.add_argument('--nproc', type=int, default=1,
                       help="processes per run, under torchrun; the paper's total batch is split "
                            "between them (default 1: python train.py)")
        c.add_argument('--on', choices=OFFLINE,
                       help="train every row on this offline dataset instead, at its recipe: a "
                            "rehearsal of the commands, whose table is of that data")
        c.add_argument('--dry-run', action='store_true',
                       help='print each run\'s command and state; run and write nothing')
    args = p.parse_args(own)
    args.extra = extra
    if args.command == 'run':
        given = [f for f in extra if f.split('=')[0] in OWN_FLAGS]
        if given:
            raise Fatal(f"{given[0].split('=')[0]} is set by paper.py for each run; after `--` "
                        "give only flags common to every run (e.g. --epochs, --limit, --amp)", 2)
        if args.nproc < 1:
            raise Fatal(f"--nproc {args.nproc}: give 1 or more processes per run", 2)
        # the paper's total batch split between the processes, unless --batch-size is given
        for batch in {PAPERS_BATCH.get(dataset(r, args), 32) for r in rows(args)}:
            if '--batch-size' not in extra and batch % args.nproc:
                raise Fatal(f"--nproc {args.nproc} does not divide the paper's batch of {batch}: "
                            "give a divisor, or `-- --batch-size B` per process", 2)
    return args


# The tables' rows -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One run: a model, an attention and a dataset as the paper names them, and its top-1."""
    table: str
    model: str
    attention: str
    dataset: str
    paper: float = None  # the paper's top-1 (%), None where this file holds none
    seed: int = 0

    @property
    def names(self):
        return {self.model, self.attention, self.dataset, MODELS[self.model],
                DATASETS[self.dataset]}

    @property
    def folder(self):
        """The run's folder under --out: train.py's names, the seed where a table has several."""
        seed = f'_seed{self.seed}' if self.table == 'mini' else ''
        return Path(self.table) / (f'{MODELS[self.model]}_{self.attention}_'
                                   f'{DATASETS[self.dataset]}{seed}')


def paper_rows():
    """paper.csv: every row of the paper's tables, with its top-1 where the file holds one."""
    with open(ROOT / 'paper.csv', newline='') as f:
        return [Row(r['table'], r['model'], r['attention'], r['dataset'],
                    float(r['top1']) if r['top1'] else None) for r in csv.DictReader(f)]


def rows(args):
    """The table's rows, those named by every --only."""
    if args.table == 'mini':
        chosen = [Row('mini', 'ViT-Tiny', a, 'digits', seed=s)
                  for a in MINI_ATTENTIONS for s in MINI_SEEDS]
    else:
        chosen = [r for r in paper_rows() if r.table == args.table]
    for name in args.only:
        if not any(name in r.names for r in chosen):
            known = sorted({n for r in chosen for n in (r.model, r.attention, r.dataset)})
            raise Fatal(f"--only {name}: no row of {args.table} is named so; its rows' names: "
                        f"{', '.join(known)}", 2)
        chosen = [r for r in chosen if name in r.names]
    return chosen


def dataset(row, args):
    """The train.py dataset a row trains on: the paper's, or --on's."""
    return getattr(args, 'on', None) or DATASETS[row.dataset]


def name(row):
    seed = f" seed {row.seed}" if row.table == 'mini' else ''
    return f"{row.model} {row.attention} {row.dataset}{seed}"


def source(row):
    """A transfer row's starting point: table1's ImageNet-1K run of its model and attention."""
    return Row('table1', row.model, row.attention, 'ImageNet-1K')


# Runs -----------------------------------------------------------------------------------------

def run_table(args):
    """Each row's run: skipped when finished, resumed when stopped, started otherwise."""
    todo, started = rows(args), time.time()
    counts = {}
    for i, row in enumerate(todo, 1):
        folder, what = args.out / row.folder, state(args.out / row.folder, args.extra)
        head = f"[{i}/{len(todo)}] {name(row)}"
        waits = row.table == 'transfer' and state(args.out / source(row).folder, []) != 'finished'
        command = train_command(row, args, resume=what == 'stopped')
        if args.dry_run:
            note = {'finished': 'finished: skipped', 'stopped': 'stopped: resumed by',
                    'new': 'started by'}[what]
            if waits and what != 'finished':
                note = f"waits for {args.out / source(row).folder}, then {note}"
            print(f"# {head}: {note}\n{shlex.join(command)}" if what != 'finished' else
                  f"# {head}: {note}")
        elif what == 'finished':
            print(f"{head}: finished ({progress(folder)}): skipped", flush=True)
        elif waits:
            print(f"{head}: waits for {args.out / source(row).folder} to finish", flush=True)
            what = 'waiting'
        else:
            verb = f"resuming ({progress(folder)})" if what == 'stopped' else 'starting'
            print(f"{head}: {verb}; its output in {folder / 'train.log'}", flush=True)
            seconds = train(command, folder)
            if state(folder, args.extra) != 'finished':  # a log behind its checkpoint
                raise Fatal(f"{name(row)}: train.py ended, but {folder / 'log.jsonl'} holds "
                            f"{progress(folder)}; its output: {folder / 'train.log'}")
            print(f"{head}: done in {duration(seconds)} ({progress(folder)})", flush=True)
        counts[what] = counts.get(what, 0) + 1
    if not args.dry_run:
        print(f"{args.table}: {len(todo)} runs, "
              + ', '.join(f"{n} {w}" for w, n in counts.items())
              + f", in {duration(time.time() - started)}; `python paper.py table {args.table} "
              f"--out {args.out}` collects them", flush=True)


def state(folder, extra):
    """'finished' (log.jsonl holds every epoch), 'stopped' (last.pt: --resume continues it) or
    'new' (nothing saved yet: the same command starts it, in the same folder). Its epochs are
    those of `--epochs` after `--`, or else the run's own (args.json)."""
    if not (folder / 'last.pt').is_file():
        return 'new'
    given = argparse.ArgumentParser(add_help=False)
    given.add_argument('--epochs', type=int)
    wanted = given.parse_known_args(extra)[0].epochs or run_epochs(folder)
    return 'finished' if len(read_log(folder)) >= wanted else 'stopped'


def run_epochs(folder):
    """The epochs a run was started for, from its args.json."""
    try:
        return json.loads((folder / 'args.json').read_text())['epochs']
    except (OSError, ValueError, KeyError) as e:
        raise Fatal(f"cannot read the run's epochs from {folder / 'args.json'} ({e}): "
                    "remove the folder to start that run again") from None


def read_log(folder):
    """A run's log.jsonl, [] where there is none yet; a torn file is named."""
    try:
        return curves.read_log(folder) if (folder / 'log.jsonl').is_file() else []
    except (OSError, ValueError) as e:
        raise Fatal(f"cannot read {folder / 'log.jsonl'}: {e}") from None


def progress(folder):
    log = read_log(folder)
    best = max((r['test_acc1'] for r in log), default=None)
    return f"{len(log)}/{run_epochs(folder)} epochs" + (f", best {best:.2f}%" if log else '')


def train_command(row, args, resume=False):
    """The command line of a row's run: train.py (torchrun with --nproc > 1) with the row's
    flags, or --resume of its last.pt, and the flags after `--`."""
    launcher = (['torchrun', f'--nproc_per_node={args.nproc}'] if args.nproc > 1
                else ['python'])
    folder = args.out / row.folder
    if resume:
        return [*launcher, 'train.py', '--resume', str(folder / 'last.pt'), *args.extra]
    data = dataset(row, args)
    flags = ['--model', MODELS[row.model], *ATTENTIONS[row.attention], '--dataset', data]
    if data == 'imagenet':
        flags += ['--data-path', args.imagenet or str(Path(args.data_path) / 'imagenet')]
    elif data not in OFFLINE:
        flags += ['--data-path', args.data_path] + (['--download'] if args.download else [])
    if args.nproc > 1 and '--batch-size' not in args.extra:
        flags += ['--batch-size', str(PAPERS_BATCH.get(data, 32) // args.nproc)]
    if row.table == 'transfer':
        flags += ['--finetune', str(args.out / source(row).folder / 'best.pt')]
    if row.table == 'mini':
        flags += MINI_FLAGS
    return [*launcher, 'train.py', *flags, '--seed', str(row.seed), *args.extra,
            '--output-dir', str(folder)]


def train(command, folder):
    """Run one train.py to its end, its output appended to train.log in its folder; the
    seconds it took. A run that fails stops the table with its own last line."""
    folder.mkdir(parents=True, exist_ok=True)
    executable = [sys.executable] if command[0] == 'python' else \
        [sys.executable, '-m', 'torch.distributed.run']
    tic = time.time()
    with open(folder / 'train.log', 'a') as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen([*executable, *command[1:]], cwd=ROOT, stdout=log,
                                   stderr=subprocess.STDOUT)
        try:
            code = process.wait()
        except KeyboardInterrupt:  # the terminal sent SIGINT to train.py too: let it finish
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            process.wait()
            raise
    if code:
        lines = [line for line in (folder / 'train.log').read_text().splitlines() if line.strip()]
        raise Fatal(f"{folder.name} failed (exit {code}): {lines[-1] if lines else ''}; its "
                    f"output: {folder / 'train.log'}; the same command resumes the table")
    return time.time() - tic


def duration(seconds):
    return f"{seconds:.0f} s" if seconds < 120 else (
        f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h")


# The collector --------------------------------------------------------------------------------

@dataclass
class Result:
    """A row's runs (one per seed) as their logs tell: best test top-1 of each finished run,
    and the runs not finished yet."""
    row: Row
    best: list      # the best epoch's test top-1 of each finished run, %
    seconds: list   # each finished run's training time (the sum of its epochs' epoch_time)
    epochs: int     # the epochs of a finished run
    unfinished: list  # 'e/E epochs' of each run started but not finished
    trained_on: set   # the datasets the runs trained on (--on: another than the row's)

    @property
    def mean(self):
        return statistics.fmean(self.best) if self.best else None


def collect(args):
    """The table's rows, seeds grouped, as markdown; the figure beside it."""
    results = [result(group, args.out) for group in grouped(rows(args))]
    softmax = {(r.row.model, r.row.dataset): r.mean for r in results
               if r.row.attention == 'softmax'}
    papers = {(r.row.model, r.row.dataset): r.row.paper for r in results
              if r.row.attention == 'softmax'}
    figure = args.figure or args.out / f'{args.table}.png'
    figure.parent.mkdir(parents=True, exist_ok=True)
    draw(results, figure)
    columns = {'model': lambda r: r.row.model, 'attention': lambda r: r.row.attention,
               'dataset': lambda r: r.row.dataset, 'paper top-1': lambda r: number(r.row.paper),
               'ours top-1': ours, 'ours − paper': lambda r: signed(r.mean, r.row.paper),
               'vs softmax: paper': lambda r: gain(r, r.row.paper, papers),
               'vs softmax: ours': lambda r: gain(r, r.mean, softmax), 'runs': runs}
    if not any(r.row.paper is not None for r in results):  # the miniature: no paper columns
        columns = {k: v for k, v in columns.items() if 'paper' not in k}
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + ' --- |' * len(columns)]
    lines += ['| ' + ' | '.join(cell(r) for cell in columns.values()) + ' |' for r in results]
    return '\n'.join(lines) + f"\n\n![{args.table}]({figure})"


def gain(r, value, softmax):
    """A KArAt row's top-1 over softmax's on the same model and dataset."""
    return '' if r.row.attention == 'softmax' else signed(value, softmax.get(
        (r.row.model, r.row.dataset)))


def grouped(chosen):
    """Rows that differ only in their seed, together, in the table's order."""
    groups = {}
    for r in chosen:
        groups.setdefault((r.model, r.attention, r.dataset), []).append(r)
    return list(groups.values())


def result(group, out):
    """A row's runs, one per seed, as their folders under `out` hold them."""
    best, seconds, epochs, unfinished, trained_on = [], [], None, [], set()
    for row in group:
        folder = out / row.folder
        log = read_log(folder)
        if not log:
            continue
        trained_on.add(json.loads((folder / 'args.json').read_text())['dataset']
                       if (folder / 'args.json').is_file() else DATASETS[row.dataset])
        if len(log) < run_epochs(folder):
            unfinished.append(f"{len(log)}/{run_epochs(folder)} epochs")
            continue
        best.append(max(r['test_acc1'] for r in log))
        seconds.append(sum(r['epoch_time'] for r in log))
        epochs = len(log)
    return Result(group[0], best, seconds, epochs, unfinished, trained_on)


def number(value):
    return '–' if value is None else f"{value:.2f}"


def signed(a, b):
    return '–' if a is None or b is None else f"{a - b:+.2f}"


def ours(r):
    """The best epoch's top-1; several seeds: mean ± standard deviation [min, max]."""
    if not r.best:
        return 'not run' if not r.unfinished else 'running'
    if len(r.best) == 1:
        return number(r.best[0])
    return (f"{r.mean:.2f} ± {statistics.stdev(r.best):.2f} "
            f"[{min(r.best):.2f}, {max(r.best):.2f}]")


def runs(r):
    """How many runs finished, of how many epochs, how long each took; the others' progress;
    the data they trained on where it is not the row's."""
    parts = []
    if r.best:
        seeds = f"{len(r.best)} seeds × " if len(r.best) > 1 else ''
        parts.append(f"{seeds}{r.epochs} epochs, {duration(statistics.fmean(r.seconds))} each"
                     if seeds else f"{r.epochs} epochs, {duration(r.seconds[0])}")
    parts += [f"running: {u}" for u in r.unfinished]
    other = r.trained_on - {DATASETS[r.row.dataset]}
    if other:
        parts.append(f"trained on {', '.join(sorted(other))}")
    return '; '.join(parts)


def draw(results, path):
    """One horizontal bar per row: the paper's top-1 (grey) and ours (its mean written beside it,
    each seed a point, ± one standard deviation); a row not run has no bar of ours. The axis
    starts 10 points below the lowest value, so that differences of a point show."""
    fig = Figure(figsize=(8, 1.4 + 0.32 * len(results)), layout='constrained')
    ax = fig.subplots()
    y = list(range(len(results)))[::-1]
    papers = [r.row.paper if r.row.paper is not None else math.nan for r in results]
    means = [r.mean if r.mean is not None else math.nan for r in results]
    spread = [statistics.stdev(r.best) if len(r.best) > 1 else 0 for r in results]
    values = [v for r in results for v in (*r.best, r.row.paper) if v is not None] or [0]
    low = max(0, 10 * math.floor((min(values) - 10) / 10))
    shift = 0.2 if any(not math.isnan(p) for p in papers) else 0  # paper's bar above, ours below
    if shift:
        ax.barh([v + shift for v in y], papers, height=0.4, color='0.75', label='paper')
    ax.barh([v - shift for v in y], means, height=0.4, xerr=spread, color='C0', label='ours',
            capsize=3)
    for v, r, sd in zip(y, results, spread):
        ax.plot(r.best, [v - shift] * len(r.best), 'k.', ms=4)
        label = 'not run' if r.mean is None else f"{r.mean:.1f}" + (f" ± {sd:.1f}" if sd else '')
        ax.text((r.mean or low) + sd + 0.5, v - shift, label, va='center', fontsize=7,
                color='C3' if r.mean is None else 'k')
    ax.set_yticks(y, [f"{r.row.model} {r.row.attention} {r.row.dataset}" for r in results],
                  fontsize=7)
    ax.set(xlabel='test top-1 (%)', xlim=(low, 100), ylim=(-0.7, len(results) - 0.3))
    ax.grid(axis='x', alpha=0.3)
    ax.legend(fontsize=7, loc='lower left')
    fig.savefig(path, dpi=120)


if __name__ == '__main__':
    main()
