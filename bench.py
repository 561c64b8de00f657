"""Time train steps (forward, backward, AdamW) of the models of models.py on random images
(detectors: synthetic shapes): the median step time and the peak memory, one JSON line per path.

    python bench.py --attn fourier --img-size 224 --patch-size 16 --batch-size 8 --device cpu
    python bench.py --compare --attn fourier --img-size 224 --patch-size 16 --batch-size 32 \\
        --amp --device cuda
    python bench.py --paths torch,naive --attn bspline --img-size 32 --patch-size 4 --batch-size 64
    python bench.py --compare --call 32,3,197,64 --amp    # one attention call, forward + backward
    python bench.py --compare --model vitdet_base --grid 1 --mode universal --img-size 1024 \\
        --batch-size 2 --amp                               # ViTDet + Mask R-CNN on shapes
    TRITON_INTERPRET=1 python bench.py --ops --paths softmax,torch,triton --img-size 32
    python bench.py --gpu DIR    # on a GPU: tests/test_gpu.py and the README's GPU rows, into DIR

A path is one way of computing a model: softmax attention, KArAt by its PyTorch path or its fused
Triton kernels, or KArAt by the naive materialised formula. The paths of one run are built and
measured in one process, side by side: each model is built and its memory measured in turn (after
a discarded copy of itself), then their timed steps are interleaved, so that a machine whose
speed drifts slows all of them alike.
Peak memory counts weights, gradients, optimiser state and activations: the growth from just before
the model was built to the peak of two steps (GPU: torch.cuda.max_memory_allocated; CPU: the
resident set's high-water mark, VmHWM, reset through /proc/self/clear_refs). The model's flags are
train.py's; no dataset is read.
"""
import argparse
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import detection
import karat
import models
from cli import (M_MMAP_THRESHOLD, Fatal, Parser, attention_options, autocast, build_model,
                 default_device, device_name, ints, kernel_refusal, model_arguments, model_config,
                 optimizer_for, positive, reuse_freed_memory, say)
from data import DATASETS, apply_recipe

# A path: its name and the model flags it sets. --compare runs COMPARED (on a GPU also
# 'triton'); a new way of computing the same model is one more entry here.
PATHS = {
    'softmax': dict(attn='softmax', efficient=True),  # scaled_dot_product_attention
    'torch': dict(efficient=True, kernel='torch'),     # KArAt, logits recomputed by chunks of rows
    'triton': dict(efficient=True, kernel='triton'),   # KArAt, fused Triton kernels (kernels.py)
    'naive': dict(efficient=False),                    # KArAt as the paper computes it
}
COMPARED = ('softmax', 'torch', 'naive')


def path_names(text):
    names = text.split(',')
    unknown = [n for n in names if n not in PATHS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown path {unknown[0]!r}: one of {', '.join(PATHS)}")
    return names


def parse_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.call and len(args.call) != 4:
        p.error(f"--call takes B,H,N,D (batch, heads, tokens, head dim), got {args.call}")
    detector = args.model.startswith('vitdet')
    if detector and (args.dataset or args.call or args.ops or args.compile):
        p.error(f"--model {args.model} times a detector's train step on synthetic shapes, "
                "eager: no --dataset, --call, --ops or --compile with it")
    args.dataset = args.dataset or ('shapes' if detector else 'digits')
    cuda = args.device.startswith('cuda')
    compared = [*COMPARED[:2], 'triton', COMPARED[2]] if cuda else list(COMPARED)
    args.paths = args.paths or (compared if args.compare else
                                ['softmax' if args.attn == 'softmax' else
                                 'naive' if not args.efficient else
                                 'triton' if args.kernel == 'triton' else 'torch'])
    if args.attn == 'softmax' and args.paths != ['softmax']:
        p.error("--compare and --paths set KArAt (--attn, a basis) beside softmax; "
                "got --attn softmax")
    if 'triton' in args.paths and kernel_refusal('triton', args.device):
        p.error(kernel_refusal('triton', args.device))
    return apply_recipe(args)


def parser():
    p = Parser(description=__doc__.split('\n\n')[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(p)
    g = p.add_argument_group('benchmark')
    g.add_argument('--dataset', choices=[k for k, d in DATASETS.items() if not d.detection],
                   help="only its number of classes and default sizes: the images are random "
                        "(default digits; a vitdet_* model times a batch of synthetic shapes)")
    g.add_argument('--batch-size', type=positive,
                   help="images per step (default: the dataset's recipe)")
    g.add_argument('--device', type=device_name, default=default_device(),
                   help='cpu, cuda or cuda:N (default cuda where there is one, else cpu)')
    g.add_argument('--amp', action='store_true', help='bfloat16 autocast')
    g.add_argument('--compile', action='store_true', help='torch.compile the model')
    g.add_argument('--seed', type=int, default=0, help='of the weights and the batch (default 0)')
    g.add_argument('--bench-steps', type=positive, default=20,
                   help='timed steps per path, after warm-up (default 20)')
    g.add_argument('--paths', type=path_names,
                   help=f"comma-separated, of {', '.join(PATHS)} (default: the one the flags "
                        "choose)")
    g.add_argument('--compare', action='store_true',
                   help=f"--paths {','.join(COMPARED)} (and triton on a GPU)")
    g.add_argument('--call', type=ints, metavar='B,H,N,D',
                   help='time one attention call (forward + backward), not a model (default: a '
                        'model)')
    g.add_argument('--ops', action='store_true',
                   help='count the leaf ATen ops of one forward + backward instead of timing')
    return p


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

def train_step(optimizer, loss_of_batch, args, cuda):
    """One train step on a fixed batch, loss_of_batch() under autocast, as a closure for the
    benchmark to call."""
    def step():
        optimizer.zero_grad(set_to_none=True)  # before the forward: none held at its peak
        with autocast(args):
            loss = loss_of_batch()
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
    return step


def model_step(args, path, device, cuda):
    """A train step of the model by `path` on a fixed random batch, and what identifies it."""
    flags = argparse.Namespace(**vars(args) | PATHS[path])
    classes = DATASETS[args.dataset].classes or 1000
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, classes, (args.batch_size,), device=device)
    torch.manual_seed(args.seed)
    model = build_model(model_config(flags, classes)).to(device)
    forward = torch.compile(model) if args.compile else model
    step = train_step(optimizer_for(model, args),
                      lambda: F.cross_entropy(forward(images).float(), labels), args, cuda)
    return step, dict(model=args.model, attn=flags.attn, naive=not flags.efficient,
                      batch=args.batch_size, img_size=args.img_size,
                      patch_size=model.config.get('patch_size'))


def detector_step(args, path, device, cuda):
    """A train step of ViTDet + Mask R-CNN by `path` on a fixed batch of synthetic shapes, its
    loss Mask R-CNN's five summed."""
    flags = argparse.Namespace(**vars(args) | PATHS[path])
    shapes = detection.Shapes(args.batch_size, args.img_size)
    batch = detection.collate_detection([shapes[i] for i in range(args.batch_size)])
    torch.manual_seed(args.seed)
    model = build_model(model_config(flags, DATASETS['shapes'].classes)).to(device)
    on_device = ([im.to(device) for im in batch[0]],  # moved once, not in every step
                 [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()}
                  for t in batch[1]])
    step = train_step(optimizer_for(model, args),
                      lambda: detection.detection_loss(model, on_device, device)[0], args, cuda)
    return step, dict(model=args.model, attn=flags.attn, naive=not flags.efficient,
                      batch=args.batch_size, img_size=args.img_size)


def attention_step(args, path, device, cuda):
    """Forward and backward of one attention call on random q, k, v (b h N d) by `path`."""
    b, h, N, d = args.call
    flags = argparse.Namespace(**vars(args) | PATHS[path])
    torch.manual_seed(args.seed)
    attention, compute = models.attention_configs(flags.attn, attention_options(flags))
    attend = karat.attention_maker(attention, compute=compute)(h, N).to(device)
    dtype = torch.bfloat16 if args.amp else torch.float32
    q, k, v = (torch.randn(b, h, N, d, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    grad = torch.randn(b, h, N, d, device=device, dtype=dtype)

    def step():
        with autocast(args):
            out = attend(q, k, v)
        out.backward(grad)
        if cuda:
            torch.cuda.synchronize()
    return step, dict(model='attention', attn=flags.attn, naive=not flags.efficient, batch=b,
                      heads=h, N=N, d=d)


def benchmark(args):
    """One JSON line per path: median step time over --bench-steps interleaved steps, and peak
    memory. On a CPU glibc first serves every block of 64 KiB or more with a mapping of its own,
    so that a freed tensor leaves the resident set at once (by default freed blocks stay in the
    heap, and the peak would measure fragmentation); the timed steps run with train.py's
    settings (`reuse_freed_memory`)."""
    device, cuda = torch.device(args.device), args.device.startswith('cuda')
    # CPU memory is read from Linux's /proc
    measured = cuda or Path('/proc/self/clear_refs').exists()
    libc = None if cuda or not measured else ctypes.CDLL('libc.so.6')
    if libc:
        libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    make = (attention_step if args.call else detector_step if args.model.startswith('vitdet')
            else model_step)

    def build_and_measure(path):
        before = memory_now(cuda, device) if measured else None
        step, info = make(args, path, device, cuda)
        for _ in range(3):
            step()
        if measured:
            reset_peak_memory(cuda, device)
        for _ in range(2):
            step()
        return dict(path=path, step=step, info=info, times=[],
                    peak=peak_memory(cuda, device) - before if measured else None)

    def warmed(path):
        # a discarded copy first pays the path's one-time costs (thread pools, workspaces, lazy
        # imports); measured straight after another path, the second model looked up to 6%
        # larger, whichever path it was
        build_and_measure(path)
        return build_and_measure(path)

    runs = [warmed(path) for path in args.paths]
    if libc:
        reuse_freed_memory()
    for run in runs:
        run['step']()
    for _ in range(args.bench_steps):
        for run in runs:
            tic = time.perf_counter()
            run['step']()
            run['times'].append(time.perf_counter() - tic)
    name = (f"cuda ({torch.cuda.get_device_name(device)})" if cuda
            else f"cpu ({torch.get_num_threads()} threads)")
    for run in runs:
        batch = run['info']['batch']
        print(json.dumps(dict(**run['info'], path=run['path'], device=name, amp=args.amp,
                              compile=args.compile,
                              img_per_s=round(batch / statistics.median(run['times']), 2),
                              step_ms=round(1000 * statistics.median(run['times']), 2),
                              peak_mem_mb=None if run['peak'] is None else round(run['peak'], 1),
                              steps=len(run['times']))), flush=True)


def count_ops(args):
    """One JSON line per path: the leaf ATen ops of one forward and backward of the model, which
    set the number of kernel launches on a GPU. A fused op counts once, whatever runs inside it
    (on a CPU that is Triton's interpreter, whose tensor copies launch nothing on a GPU)."""
    classes = DATASETS[args.dataset].classes or 1000
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=args.device)
    for path in args.paths:
        flags = argparse.Namespace(**vars(args) | PATHS[path])
        torch.manual_seed(args.seed)
        model = build_model(model_config(flags, classes)).to(args.device)
        step = lambda: model(images).logsumexp(-1).sum().backward()
        step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        events = prof.events()
        fused = lambda e: e.name.startswith('karat::')
        parent = lambda e: e.cpu_parent
        within = lambda e: parent(e) is not None and (fused(parent(e)) or within(parent(e)))
        leaf = lambda e: e.name.startswith('aten::') and not any(
            c.name.startswith('aten::') for c in e.cpu_children)
        ops = [e for e in events if not within(e) and (fused(e) or leaf(e))]
        print(json.dumps(dict(model=args.model, path=path, attn=flags.attn, batch=args.batch_size,
                              img_size=args.img_size, aten_ops=len(ops),
                              fused_ops=sum(map(fused, ops)))), flush=True)


# The README's GPU table: one bench.py call a row, all run by `python bench.py --gpu`.
GPU_ROWS = [
    '--compare --img-size 224 --patch-size 16 --batch-size 32 --amp',
    '--compare --img-size 224 --patch-size 16 --batch-size 32',
    '--compare --img-size 32 --patch-size 4 --batch-size 64 --amp',
    '--compare --rank full --img-size 224 --patch-size 16 --batch-size 32 --amp',
    '--compare --call 32,3,197,64 --amp',
    '--compare --grid 1 --mode universal --call 1,12,4096,64 --amp',
    '--compare --model vitdet_base --grid 1 --mode universal --img-size 1024 --batch-size 2 --amp',
]


def gpu_suite(out):
    """tests/test_gpu.py, then every row of GPU_ROWS (Fourier, G = 3, r = 12 unless a row says
    otherwise), each in a fresh process: results in out/bench.jsonl, logs beside it."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, 'TRITON_INTERPRET': '0'}
    root = Path(__file__).resolve().parent
    tests = subprocess.run([sys.executable, '-m', 'pytest', 'tests/test_gpu.py', '-q'], cwd=root,
                           env=env, capture_output=True, text=True)
    (out / 'test_gpu.txt').write_text(tests.stdout + tests.stderr)
    lines = tests.stdout.strip().splitlines()
    summary = lines[-1] if lines else tests.stderr[-2000:]
    print(summary, flush=True)
    with open(out / 'bench.jsonl', 'w') as results, open(out / 'bench.log', 'w') as log:
        for row in GPU_ROWS:
            done = subprocess.run([sys.executable, str(root / 'bench.py'), *row.split(),
                                   '--device', 'cuda'], cwd=root, env=env, capture_output=True,
                                  text=True)
            results.write(done.stdout)
            log.write(f"$ bench.py {row}\n{done.stderr}\n")
            failed = f"{row}: failed ({done.stderr.strip()[-300:]})\n"
            print(done.stdout if done.returncode == 0 else failed, end='', flush=True)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ['--gpu']:
        return gpu_suite(Path(argv[1] if len(argv) > 1 else os.environ.get('OUT', 'runs/gpu')))
    try:
        args = parse_args(argv)
        count_ops(args) if args.ops else benchmark(args)
    except Fatal as e:
        say(f"bench.py: error: {e}")
        sys.exit(e.code)


if __name__ == '__main__':
    main()
