"""Time train steps (forward, backward, AdamW) of the models of models.py on random images:
the median step time and the peak memory, one JSON line per path.

    python bench.py --attn fourier --img-size 224 --patch-size 16 --batch-size 8 --device cpu
    python bench.py --compare --attn fourier --img-size 224 --patch-size 16 --batch-size 32 --amp --device cuda
    python bench.py --paths ours,naive --attn bspline --img-size 32 --patch-size 4 --batch-size 64

A path is one way of computing a model: softmax attention, our KArAt, or the naive materialised
formula. The paths of one run are built and measured in one process, side by side: each model is
built and its memory measured in turn, then their timed steps are interleaved, so that a machine
whose speed drifts slows all of them alike. Peak memory counts weights, gradients, optimiser state
and activations: the growth from just before the model was built to the peak of two steps (GPU:
torch.cuda.max_memory_allocated; CPU: the resident set's high-water mark, VmHWM, reset through
/proc/self/clear_refs). The model's flags are train.py's; no dataset is read.
"""
import argparse
import ctypes
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from train import (DATASETS, Fatal, Parser, apply_recipe, autocast, build_model, model_arguments, model_config,
                   optimizer_for, positive)

# A path: its name and the model flags it sets. --compare runs COMPARED; a new way of computing
# the same model (another kernel, say) is one more entry here.
PATHS = {
    'softmax': dict(attn='softmax', naive=False),         # scaled_dot_product_attention
    'ours': dict(naive=False),                             # KArAt: O = Z (Wᵀ V), features recomputed in backward
    'naive': dict(naive=True),                             # KArAt as the paper computes it (efficient=False)
}
COMPARED = ('softmax', 'ours', 'naive')
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def path_names(text):
    names = text.split(',')
    unknown = [n for n in names if n not in PATHS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown path {unknown[0]!r}: one of {', '.join(PATHS)}")
    return names


def parse_args(argv=None):
    p = Parser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(p)
    g = p.add_argument_group('benchmark')
    g.add_argument('--dataset', default='digits', choices=[k for k, d in DATASETS.items() if not d.detection],
                   help="only its number of classes and default sizes: the images are random")
    g.add_argument('--batch-size', type=positive)
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    g.add_argument('--amp', action='store_true', help='bfloat16 autocast')
    g.add_argument('--compile', action='store_true', help='torch.compile the model')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--bench-steps', type=positive, default=20, help='timed steps per path, after warm-up')
    g.add_argument('--paths', type=path_names, help=f"comma-separated, of {', '.join(PATHS)}")
    g.add_argument('--compare', action='store_true', help=f"--paths {','.join(COMPARED)}")
    args = p.parse_args(argv)
    if args.model.startswith('vitdet'):
        p.error(f"bench.py times classifiers; a detector's step needs boxes and masks: time --model {args.model} "
                f"with train.py --dataset shapes")
    args.paths = args.paths or (list(COMPARED) if args.compare else
                                ['softmax' if args.attn == 'softmax' else 'naive' if args.naive else 'ours'])
    if args.attn == 'softmax' and args.paths != ['softmax']:
        p.error("--compare and --paths set KArAt (--attn, a basis) beside softmax; got --attn softmax")
    return apply_recipe(args)


# Memory ---------------------------------------------------------------------------------------

def rss_kib(field):
    return int(re.search(rf'{field}:\s+(\d+)', Path('/proc/self/status').read_text()).group(1))


def memory_now(cuda, device):
    """MiB in use: allocated on the GPU, the resident set on a CPU."""
    return torch.cuda.memory_allocated(device) / 2 ** 20 if cuda else rss_kib('VmRSS') / 1024


def peak_memory(cuda, device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else rss_kib('VmHWM') / 1024


def reset_peak_memory(cuda, device):
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path('/proc/self/clear_refs').write_text('5')


# Timing ---------------------------------------------------------------------------------------

def train_step(model, optimizer, images, labels, args, cuda):
    """One train step on a fixed batch, as a closure for the benchmark to call."""
    def step():
        with autocast(args):
            loss = F.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
    return step


def benchmark(args):
    """One JSON line per path: median step time over --bench-steps interleaved steps, and peak
    memory. On a CPU glibc first serves every block of 64 KiB or more with a mapping of its own,
    so that a freed tensor leaves the resident set at once (by default freed blocks stay in the
    heap, and the peak would measure fragmentation); for the timed steps the threshold goes to
    32 MiB, glibc's own steady state."""
    device, cuda = torch.device(args.device), args.device.startswith('cuda')
    measured = cuda or Path('/proc/self/clear_refs').exists()  # CPU memory is read from Linux's /proc
    libc = None if cuda or not measured else ctypes.CDLL('libc.so.6')
    if libc:
        libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    classes = DATASETS[args.dataset].classes or 1000
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, classes, (args.batch_size,), device=device)

    def build_and_measure(path):
        flags = argparse.Namespace(**vars(args) | PATHS[path])
        before = memory_now(cuda, device) if measured else None
        torch.manual_seed(args.seed)
        model = build_model(model_config(flags, classes)).to(device)
        step = train_step(torch.compile(model) if args.compile else model, optimizer_for(model, args),
                          images, labels, args, cuda)
        for _ in range(3):
            step()
        if measured:
            reset_peak_memory(cuda, device)
        for _ in range(2):
            step()
        return dict(path=path, attn=flags.attn, naive=flags.naive, step=step, patch_size=model.config.get('patch_size'),
                    peak=peak_memory(cuda, device) - before if measured else None, times=[])

    build_and_measure(args.paths[0])  # discarded: it pays the one-time costs (thread pools, workspaces)
    runs = [build_and_measure(path) for path in args.paths]
    if libc:
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 2 ** 20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 * 2 ** 20)
    for run in runs:
        run['step']()
    for _ in range(args.bench_steps):
        for run in runs:
            tic = time.perf_counter()
            run['step']()
            run['times'].append(time.perf_counter() - tic)
    name = f"cuda ({torch.cuda.get_device_name(device)})" if cuda else f"cpu ({torch.get_num_threads()} threads)"
    for run in runs:
        print(json.dumps(dict(model=args.model, path=run['path'], attn=run['attn'], naive=run['naive'], device=name,
                              batch=args.batch_size, img_size=args.img_size, patch_size=run['patch_size'],
                              amp=args.amp, compile=args.compile,
                              img_per_s=round(args.batch_size * len(run['times']) / sum(run['times']), 2),
                              step_ms=round(1000 * statistics.median(run['times']), 2),
                              peak_mem_mb=None if run['peak'] is None else round(run['peak'], 1), steps=len(run['times']))))


def main(argv=None):
    try:
        benchmark(parse_args(argv))
    except Fatal as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        sys.exit(e.code)


if __name__ == '__main__':
    main()
