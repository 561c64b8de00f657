"""Learning curves of train.py runs in one figure: the losses and the score that picks best.pt
(test top-1, or box AP for detection), per epoch, read from each run's log.jsonl.

    python curves.py runs/vit_tiny_softmax_digits runs/vit_tiny_fourier_digits \\
        -o softmax_vs_karat.png

train.py redraws <output-dir>/curves.png with `plot` after every epoch.
"""
import argparse
import json
import sys
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no window, no global state, any backend
from matplotlib.ticker import MaxNLocator


def read_log(folder):
    path = Path(folder) / 'log.jsonl'
    if not path.is_file():
        raise FileNotFoundError(f"no log.jsonl in {folder}: not a train.py output folder")
    return [json.loads(line) for line in path.read_text().splitlines()]


def plot(folders, path):
    """Draw the runs of `folders` into one PNG at `path`, a colour per run: train and test loss
    on the left, the score and its EMA twin (or box and mask AP) on the right."""
    fig = Figure(figsize=(11, 3.8), layout='constrained')
    losses, scores = fig.subplots(1, 2)
    for n, folder in enumerate(folders):
        rows, colour, name = read_log(folder), f'C{n}', Path(folder).name
        epochs = [r['epoch'] for r in rows]
        score, twin = (('test_acc1', 'ema_test_acc1') if rows and 'test_acc1' in rows[0]
                       else ('box_ap', 'mask_ap'))
        for ax, keys in ((losses, ('train_loss', 'test_loss')), (scores, (score, twin))):
            for key, style in zip(keys, ('-', '--')):
                if rows and key in rows[0]:
                    ax.plot(epochs, [r[key] for r in rows], style, color=colour, marker='o', ms=3,
                            label=f'{name} {key}')
    losses.set(xlabel='epoch', ylabel='loss', yscale='log', title='loss')
    scores.set(xlabel='epoch', ylabel='percent', title='test score')
    for ax in (losses, scores):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('folders', nargs='+', help="train.py output folders (each with a log.jsonl)")
    p.add_argument('-o', '--output', default='curves.png', help='the PNG to write')
    args = p.parse_args(argv)
    try:
        plot(args.folders, args.output)
    except (FileNotFoundError, json.JSONDecodeError, OSError) as e:
        print(f"curves.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"{len(args.folders)} run(s) in {args.output}")


if __name__ == '__main__':
    main()
