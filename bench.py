"""Time train steps (forward, backward, AdamW) of the models of models.py on random images
(detectors: synthetic shapes): the median step time and the peak memory, one JSON line per path.

    python bench.py --attn fourier --img-size 224 --patch-size 16 --batch-size 8 --device cpu
    python bench.py --compare --attn fourier --img-size 224 --patch-size 16 --batch-size 32 \\
        --amp --device cuda
    python bench.py --paths torch,naive --attn bspline --img-size 32 --patch-size 4 --batch-size 64
    python bench.py --compare --call 32,3,197,64 --amp    # one attention call, forward + backward
    python bench.py --compare --call 2048,3,49,32 --bias --forward-only --amp
                                                # Swin-T's first-stage windows, forward alone
    python bench.py --compare --model vitdet_base --grid 1 --mode universal --img-size 1024 \\
        --batch-size 2 --amp                               # ViTDet + Mask R-CNN on shapes
    TRITON_INTERPRET=1 python bench.py --ops --paths softmax,torch,triton --img-size 32
    python bench.py --gpu DIR            # on a GPU: the suite of GPU_PLAN, ~8 minutes, into DIR
    python bench.py --gpu DIR --quick    # its headline rows, ~3 minutes

A path is one way of computing a model: softmax attention, KArAt by its PyTorch path or its fused
Triton kernels, or KArAt by the naive materialised formula. The paths of one run are built and
measured in one process, side by side: each model is built and its memory measured in turn (after
a discarded copy of itself), then their timed steps are interleaved, so that a machine whose
speed drifts slows all of them alike.
Peak memory counts weights, gradients, optimiser state and activations: the growth from just before
the model was built to the peak of two steps (GPU: torch.cuda.max_memory_allocated; CPU: the
resident set's high-water mark, VmHWM, reset through /proc/self/clear_refs). The model's flags are
train.py's; no dataset is read.

The GPU suite (`--gpu DIR`) runs the rows of GPU_PLAN in turn, most important first, each in a
fresh process, within a time budget that counts compiling and autotuning: a row still running
when the budget is spent is stopped, and the rows after it are recorded as skipped. Each result
is written into DIR as it comes: rows.jsonl (a row's status, seconds and last line of output),
bench.jsonl (the rows' JSON lines; the triton path's with the config autotune chose for each
kernel), logs/ (a row's command and output) and summary.md (the README's GPU table).
"""
import argparse
import ctypes
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import torch
import torch.nn.functional as F

import detection
import karat
import models
from cli import (M_MMAP_THRESHOLD, Fatal, Parser, attention_options, autocast, build_model,
                 default_device, device_name, ints, kernel_refusal, model_arguments, model_config,
                 number, optimizer_for, positive, reuse_freed_memory, say)
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
    if args.gpu is not None or args.quick or args.budget is not None:
        return suite_args(p, args)
    if args.call and len(args.call) != 4:
        p.error(f"--call takes B,H,N,D (batch, heads, tokens, head dim), got {args.call}")
    if (args.bias or args.forward_only) and not args.call:
        p.error("--bias and --forward-only shape a --call B,H,N,D; got no --call")
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


def suite_args(p, args):
    """--gpu DIR with --quick and --budget alone, on a machine with CUDA, into a new or empty
    folder; the budget defaults to the form's."""
    if args.gpu is None:
        p.error("--quick and --budget shape a --gpu DIR run; got no --gpu")
    defaults = vars(p.parse_args([]))
    others = [a.option_strings[0] for a in p._actions if a.dest not in ('gpu', 'quick', 'budget')
              and a.dest in defaults and getattr(args, a.dest) != defaults[a.dest]]
    if others:
        p.error(f"--gpu runs the rows of GPU_PLAN, each with its own flags: beside it only "
                f"--quick and --budget, got {' '.join(others)}")
    if not torch.cuda.is_available():
        raise Fatal("--gpu needs a CUDA GPU; this machine has none (torch.cuda.is_available() "
                    "is False)", code=2)
    if args.gpu.exists() and (not args.gpu.is_dir() or any(args.gpu.iterdir())):
        raise Fatal(f"--gpu {args.gpu}: it exists and is not an empty folder; give a new one "
                    "(the suite appends its results)", code=2)
    args.budget = args.budget or BUDGET_S['quick' if args.quick else 'full']
    return args


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
    g.add_argument('--bias', action='store_true',
                   help="with --call: add a learnable (H, N, N) bias to the logits, as Swin's "
                        "relative position bias, and time its gradient (default: no bias)")
    g.add_argument('--forward-only', action='store_true',
                   help='with --call: time the forward alone, without autograd (default: '
                        'forward + backward)')
    g.add_argument('--ops', action='store_true',
                   help='count the leaf ATen ops of one forward + backward instead of timing')
    s = p.add_argument_group('GPU suite')
    s.add_argument('--gpu', type=Path, metavar='DIR',
                   help="on a CUDA GPU: run the rows of GPU_PLAN (tests/test_gpu.py and the "
                        "README's GPU table), each in a fresh process, writing results into DIR, "
                        "a new folder, as they come; about 8 minutes (default: no suite)")
    s.add_argument('--quick', action='store_true',
                   help='with --gpu: one correctness test per family and the headline rows '
                        'alone, about 3 minutes (default: every row)')
    s.add_argument('--budget', type=number(float, 0.0, low_open=True), metavar='SECONDS',
                   help='with --gpu: seconds the suite may take, compiling and autotuning '
                        'included; a row still running then is stopped, and the rows after it '
                        f"are recorded as skipped (default {BUDGET_S['full']}, "
                        f"{BUDGET_S['quick']} with --quick)")
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
    """One attention call on random q, k, v (b h N d) by `path`: forward and backward, or under
    --forward-only the forward alone with autograd off (what inference runs). Under --bias the
    logits get a learnable float32 (h, N, N) bias, as Swin's windows do, and backward its
    gradient, summed over the b windows."""
    b, h, N, d = args.call
    flags = argparse.Namespace(**vars(args) | PATHS[path])
    torch.manual_seed(args.seed)
    attention, compute = models.attention_configs(flags.attn, attention_options(flags))
    attend = karat.attention_maker(attention, compute=compute)(h, N).to(device)
    dtype = torch.bfloat16 if args.amp else torch.float32
    q, k, v = (torch.randn(b, h, N, d, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))
    bias = (0.02 * torch.randn(h, N, N, device=device)).requires_grad_() if args.bias else None
    grad = torch.randn(b, h, N, d, device=device, dtype=dtype)

    def step():
        with autocast(args), torch.set_grad_enabled(not args.forward_only):
            out = attend(q, k, v, bias)
        if not args.forward_only:
            out.backward(grad)
        if cuda:
            torch.cuda.synchronize()
    return step, dict(model='attention', attn=flags.attn, naive=not flags.efficient, batch=b,
                      heads=h, N=N, d=d, bias=args.bias, backward=not args.forward_only)


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
    chosen = {'configs': autotuned()} if 'triton' in args.paths else {}
    for run in runs:
        batch = run['info']['batch']
        print(json.dumps(dict(**run['info'], path=run['path'], device=name, amp=args.amp,
                              compile=args.compile,
                              img_per_s=round(batch / statistics.median(run['times']), 2),
                              step_ms=round(1000 * statistics.median(run['times']), 2),
                              peak_mem_mb=None if run['peak'] is None else round(run['peak'], 1),
                              steps=len(run['times']),
                              **(chosen if run['path'] == 'triton' else {}))), flush=True)


def autotuned():
    """The config Triton's autotune chose for each kernel of kernels.py that ran, by kernel name
    ('; '-joined where it ran at several shapes and chose differently): read from every
    Autotuner the module holds, whatever the kernels are called."""
    from triton.runtime.autotuner import Autotuner
    kernels = sys.modules.get('kernels')
    chosen = {}
    for name, tuner in vars(kernels).items() if kernels else ():
        while tuner is not None and not isinstance(tuner, Autotuner):  # under triton.heuristics
            tuner = getattr(tuner, 'fn', None)
        if tuner is None:
            continue
        # a kernel of one config keeps no cache, only the config it ran
        configs = list(tuner.cache.values()) or [getattr(tuner, 'best_config', None)]
        if configs[0] is not None:
            chosen[name] = '; '.join(dict.fromkeys(map(str, configs)))
    return chosen


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


# The GPU suite ------------------------------------------------------------------------------
# `bench.py --gpu DIR` runs these rows in this order, most important first, each `python` + its
# words in the repository, on the GPU; `--quick` runs the rows marked quick. Models and calls are
# Fourier, G = 3, r = 12, blockwise unless a row says otherwise; --compare on a GPU runs softmax
# (SDPA), the torch path, the triton path and the naive formula side by side. `what` names the
# tests a row runs, or the row of the README's GPU table it fills.
Row = namedtuple('Row', 'quick what command')
ONE_TEST_PER_FAMILY = 'equals_the_definition and 49-shift-12'  # Swin's bias and mask, r = 12
VIT_TINY = '--img-size 224 --patch-size 16 --batch-size 32'
GPU_PLAN = [
    Row(True, 'GPU tests: one correctness test per family',
        f'-m pytest tests/test_gpu.py -v -k "{ONE_TEST_PER_FAMILY}"'),
    Row(True, 'ViT-Tiny, 224 px, batch 32, train step', f'bench.py --compare {VIT_TINY} --amp'),
    Row(True, 'one call, b 32, h 3, N 197, d 64, forward + backward',
        'bench.py --compare --call 32,3,197,64 --amp'),
    Row(True, 'the same call, forward alone',
        'bench.py --compare --call 32,3,197,64 --forward-only --amp'),
    Row(False, "one call of Swin-T's first stage: 2,048 windows, h 3, N 49, d 32, (h, N, N) "
               "bias, forward + backward", 'bench.py --compare --call 2048,3,49,32 --bias --amp'),
    Row(False, 'the same call, forward alone',
        'bench.py --compare --call 2048,3,49,32 --bias --forward-only --amp'),
    Row(False, 'GPU tests: the rest of tests/test_gpu.py',
        f'-m pytest tests/test_gpu.py -v -k "not ({ONE_TEST_PER_FAMILY})"'),
    Row(False, 'full rank (r = N = 197), batch 32', f'bench.py --compare --rank full {VIT_TINY} '
                                                    '--amp'),
    Row(False, 'ViT-Tiny, 224 px, batch 32, train step, float32',
        f'bench.py --compare {VIT_TINY}'),
    Row(False, 'ViT-Tiny, 32 px (N = 65), batch 64',
        'bench.py --compare --img-size 32 --patch-size 4 --batch-size 64 --amp'),
    Row(False, 'one ViTDet global-attention call, h 12, N 4096, d 64, G 1',
        'bench.py --compare --grid 1 --mode universal --call 1,12,4096,64 --amp'),
    Row(False, 'ViTDet-Base + Mask R-CNN, 1024 px, Fourier G1U, batch 2',
        'bench.py --compare --model vitdet_base --grid 1 --mode universal --img-size 1024 '
        '--batch-size 2 --amp'),
]
# Seconds for the whole suite, so that it ends within 8 and 3 minutes from a cold start: about
# 10 s go to starting Python and CUDA before the first row.
BUDGET_S = {'full': 470, 'quick': 170}
MIN_ROW_S = 15  # starting a row's Python, torch and CUDA takes about this; less left: skipped
ROOT = Path(__file__).resolve().parent
# Rows print as they go; compiled kernels and autotune choices are cached on disk for later rows.
ROW_ENV = {**os.environ, 'TRITON_INTERPRET': '0', 'PYTHONUNBUFFERED': '1',
           'TRITON_CACHE_AUTOTUNING': '1'}


def gpu_suite(out, plan, budget_s, min_row_s=MIN_ROW_S):
    """Run the rows of `plan` in turn within budget_s seconds, each in a fresh process stopped
    when the budget runs out; a row with less than min_row_s left is recorded as skipped. After
    each row out/ holds its status (rows.jsonl), its JSON lines (bench.jsonl, each with its row
    number), its command and output (logs/) and summary.md rewritten. The rows' records."""
    logs = out / 'logs'
    logs.mkdir(parents=True, exist_ok=True)
    deadline, records = time.monotonic() + budget_s, []
    for number, row in enumerate(plan, 1):
        left = deadline - time.monotonic()
        log = logs / f"{number:02d}-{slug(row.what)}.log"
        status, results = (run_row(row, log, left) if left >= min_row_s else
                           (dict(status='skipped', seconds=0.0, exit_code=None,
                                 last_line=f"{max(left, 0):.0f} s of the budget left"), []))
        record = dict(row=number, what=row.what, command=row.command, **status)
        records.append(dict(record, results=results))
        append_lines(out / 'bench.jsonl', [dict(row=number, **r) for r in results])
        append_lines(out / 'rows.jsonl', [record])
        (out / 'summary.md').write_text(summary(records, budget_s))
        print(f"{number:2d} {status['status']:7s} {status['seconds']:5.0f} s  {row.what}: "
              f"{outcome(records[-1])}", flush=True)
    return records


def run_row(row, log, timeout_s):
    """One row in a fresh process (and session, so that its children stop with it), its output
    into `log` as it comes: its status (ok, failed, or timeout when stopped at timeout_s),
    seconds, exit code and last line of output (an error's own line, or pytest's summary), and
    the JSON lines it printed, a stopped row's included."""
    tic, header = time.monotonic(), f"$ python {row.command}\n"
    with open(log, 'w') as file:
        file.write(header)
        file.flush()
        process = subprocess.Popen([sys.executable, *shlex.split(row.command)], cwd=ROOT,
                                   env=ROW_ENV, stdout=file, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        stop = lambda: (os.killpg(process.pid, signal.SIGKILL), process.wait())[1]
        try:
            code, stopped = process.wait(timeout=timeout_s), False
        except subprocess.TimeoutExpired:
            code, stopped = stop(), True
        except KeyboardInterrupt:  # its own session does not hear Ctrl-C: stop it too
            stop()
            raise
    output = log.read_text()[len(header):].splitlines()
    if stopped:
        with open(log, 'a') as file:
            file.write(f"\nstopped after {timeout_s:.0f} s, when the suite's budget ran out\n")
    status = 'timeout' if stopped else 'ok' if code == 0 else 'failed'
    return (dict(status=status, seconds=round(time.monotonic() - tic, 1),
                 exit_code=None if stopped else code,
                 last_line=next((line for line in reversed(output) if line.strip()), '')),
            [r for r in map(json_object, output) if r is not None])


def outcome(record):
    """What a row said last, or how many results it printed where that was a result."""
    results, last = record['results'], record['last_line']
    return f"{len(results)} lines in bench.jsonl" if results and json_object(last) else last


def json_object(line):
    """A line of output as the dict it prints, or None (a log line, a warning, a test)."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def append_lines(path, records):
    """Append one JSON line per record and flush: a reader sees each row once it is done."""
    with open(path, 'a') as file:
        file.writelines(json.dumps(r) + '\n' for r in records)


def slug(text):
    return re.sub(r'[^a-z0-9]+', '-', text.lower()).strip('-')[:60]


# summary.md: a cell of a path is "time / peak memory", the columns the README's GPU table's
SUMMARY_PATHS = ('softmax', 'naive', 'torch', 'triton')


def summary(records, budget_s):
    """The suite so far, in markdown: the benchmark rows as the README's GPU table (a path's
    median step or call and its peak memory, and each KArAt path over softmax), every row's
    status, and the configs autotune chose."""
    results = [r for record in records for r in record['results']]
    devices = sorted({r['device'] for r in results if 'device' in r}) or ['no result yet']
    spent = sum(record['seconds'] for record in records)
    lines = [f"# bench.py --gpu: {', '.join(devices)}", '',
             f"torch {torch.__version__}; {spent:.0f} s of a {budget_s:.0f} s budget; bf16 "
             "autocast unless a row says float32; a cell is median time / peak memory.", '',
             '| row | softmax (SDPA) | naive | `torch` | `triton` | `torch` ÷ softmax '
             '| `triton` ÷ softmax |', '|---|---|---|---|---|---|---|']
    for record in records:
        if record['command'].startswith('bench.py'):
            by_path = {r['path']: r for r in record['results'] if 'step_ms' in r}
            cells = [cell(by_path.get(path)) for path in SUMMARY_PATHS]
            ratios = [ratio(by_path.get(path), by_path.get('softmax')) for path in
                      ('torch', 'triton')]
            lines.append(f"| {record['what']} | {' | '.join(cells + ratios)} |")
    lines += ['', '| # | row | status | seconds | last line |', '|---|---|---|---|---|']
    lines += [f"| {r['row']} | {r['what']} | {r['status']} | {r['seconds']:.0f} | "
              f"{outcome(r).replace('|', '/')} |" for r in records]
    chosen = [(record, r['configs']) for record in records for r in record['results']
              if r.get('configs')]
    lines += ['', 'Configs chosen by autotune (triton path):'] if chosen else []
    lines += [f"- row {record['row']}, `{kernel}`: {config}"
              for record, configs in chosen for kernel, config in configs.items()]
    return '\n'.join(lines) + '\n'


def cell(result):
    if result is None:
        return '–'
    ms = result['step_ms']
    memory = '' if result['peak_mem_mb'] is None else f" / {result['peak_mem_mb']:.0f} MB"
    return f"{ms:.3g} ms{memory}" if ms < 1000 else f"{ms:.0f} ms{memory}"


def ratio(result, softmax):
    if result is None or softmax is None:
        return '–'
    time_ratio = f"{result['step_ms'] / softmax['step_ms']:.2f}×"
    memory = (result['peak_mem_mb'], softmax['peak_mem_mb'])
    return time_ratio + ('' if None in memory else f" / {memory[0] / memory[1]:.2f}×")


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.gpu is not None:
            plan = [row for row in GPU_PLAN if row.quick or not args.quick]
            records = gpu_suite(args.gpu, plan, args.budget)
            print(f"{args.gpu / 'summary.md'}: {sum(r['status'] == 'ok' for r in records)} of "
                  f"{len(records)} rows ok")
        else:
            count_ops(args) if args.ops else benchmark(args)
    except Fatal as e:
        say(f"bench.py: error: {e}")
        sys.exit(e.code)
    except KeyboardInterrupt:  # a --gpu suite stops its row; the rows done stay in DIR
        say("bench.py: interrupted")
        sys.exit(130)


if __name__ == '__main__':
    main()
