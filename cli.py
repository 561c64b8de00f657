"""What train.py and bench.py share on the command line: the flags of a model and its attention,
one-line errors, the model those flags build, and the device it runs on.

Every refusal is a `Fatal`: train.py and bench.py print its one line on stderr and exit with
its code, before anything is written.
"""
import argparse
import ctypes
import importlib.util
import math
import os
import sys
from dataclasses import fields

import torch

import detection
import fast
import karat
import models


class Fatal(Exception):
    """An error the user can fix; the scripts print its one line and exit with `code`."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


def say(line):
    """One line on stderr in one write, so that lines of several processes never interleave."""
    sys.stderr.write(line + '\n')
    sys.stderr.flush()


def last_line(error):
    """An error's own line: a data loader worker's error carries the worker's traceback first."""
    lines = str(error).strip().splitlines()
    return lines[-1].split('Fatal: ', 1)[-1] if len(lines) > 1 else str(error)


# Parsing --------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and no abbreviated flags (so that the flags given are
    known)."""

    def __init__(self, **kw):
        super().__init__(allow_abbrev=False, **kw)

    def error(self, message):  # one line, not the whole usage block
        raise Fatal(f"{message} (see --help)", code=2)


def number(kind, low, high=math.inf, low_open=False):
    """An argparse type: a `kind` in [low, high), or (low, high) with low_open."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value {text!r}") from None
        if not (low < value if low_open else low <= value) or not value < high:
            bounds = (f"{'>' if low_open else '>='} {low}" if high == math.inf
                      else f"in [{low}, {high})")
            raise argparse.ArgumentTypeError(f"{text}: must be {bounds}")
        return value
    return parse


positive, natural, non_negative = number(int, 1), number(int, 0), number(float, 0.0)


def ints(text):
    """'12' -> 12; '2,2,6,2' -> (2, 2, 6, 2), for Swin's per-stage depths and heads."""
    try:
        values = tuple(int(t) for t in text.split(','))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: a positive integer or "
                                         "a comma-separated list")
    return values[0] if len(values) == 1 else values


def rank_value(text):
    """'full' -> None, the full N x N operator; else an integer r >= 1."""
    if text == 'full':
        return None
    try:
        return positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"invalid rank {text!r}: an integer r >= 1, or 'full' "
                                         "for the full N x N operator") from None


# The model's flags ----------------------------------------------------------------------------
# KArAt's flags are the fields of karat.AttentionConfig (what it is) and fast.Computation (how it
# is computed), parsed here and checked there, once.

PARSE = {'grid': positive, 'rank': rank_value, 'chunk_elements': positive}
ARCH_FLAGS = ('patch_size', 'embed_dim', 'depth', 'num_heads', 'window_size', 'drop_path_rate')
MODEL_NAMES = models.list_models() + sorted(detection.DETECTORS)


def model_arguments(p):
    """The flags of a model and its attention."""
    g = p.add_argument_group('model')
    g.add_argument('--model', default='vit_tiny', choices=MODEL_NAMES,
                   help='the architecture (default vit_tiny; vitdet_* are detectors)')
    for f in fields(karat.AttentionConfig) + fields(fast.Computation):
        help, allowed = f.metadata['help'], f.metadata.get('choices')
        if f.name == 'efficient':
            g.add_argument('--naive', dest='efficient', action='store_false',
                           help='the naive materialised formula, not the fast paths')
        elif isinstance(f.default, bool):
            g.add_argument(f"--{f.name}", action='store_true', help=help)
        else:
            default = 'fourier' if f.name == 'attn' else f.default
            help += '' if default is None else f" (default {default})"
            g.add_argument(f"--{f.name.replace('_', '-')}", type=PARSE.get(f.name, str),
                           default=default, help=help,
                           metavar='{' + ','.join(allowed) + '}' if allowed else None)
    g.add_argument('--img-size', type=positive,
                   help="input images are resized to this square (default: the dataset's)")
    for flag, what in (('--patch-size', 'side of a patch, in pixels'),
                       ('--embed-dim', 'width of the tokens (Swin: of the first stage)'),
                       ('--window-size', "Swin's and ViTDet's attention windows, in tokens")):
        g.add_argument(flag, type=positive, help=f"{what} (default: the model's own)")
    g.add_argument('--depth', type=ints,
                   help="blocks (Swin: per stage, e.g. 2,2,6,2) (default: the model's own)")
    g.add_argument('--num-heads', type=ints,
                   help="attention heads (Swin: per stage, e.g. 3,6,12,24) (default: the "
                        "model's own)")
    g.add_argument('--drop-path', dest='drop_path_rate', type=number(float, 0.0, 1.0),
                   help="stochastic depth of the last block, rising linearly from 0 in the first "
                        "(default: the model's own)")


def attention_options(args):
    """The KArAt keywords of create_model from the flags."""
    return {k: getattr(args, k) for k in models.ATTENTION_OPTIONS}


def model_config(args, num_classes):
    """create_model's arguments; KArAt options only for KArAt, architecture overrides only if
    set."""
    cfg = dict(name=args.model, attn=args.attn, num_classes=num_classes, img_size=args.img_size)
    if args.attn != 'softmax':
        cfg.update(attention_options(args))
    cfg.update({k: getattr(args, k) for k in ARCH_FLAGS if getattr(args, k) is not None})
    return cfg


def architecture(name):
    """The registry entry (class, default arguments) of a classifier or detector."""
    return detection.DETECTORS[name] if name in detection.DETECTORS else models.MODELS[name]


def build_model(config):
    """The classifier or detector of a model config (`model_config`, or a checkpoint's)."""
    cfg = dict(config)
    name = cfg.pop('name')
    create = detection.create_detector if name in detection.DETECTORS else models.create_model
    try:
        return create(name, **cfg)
    except (ValueError, TypeError) as e:
        raise Fatal(f"cannot build the model: {e}", code=2) from None


def optimizer_for(model, args):
    """AdamW with the model's groups (no weight decay on biases, norms and position tables)."""
    return torch.optim.AdamW(models.parameter_groups(model, args.weight_decay), lr=args.lr,
                             eps=args.opt_eps)


# The device -----------------------------------------------------------------------------------

def devices_here():
    """The device types this machine can run a model on."""
    return (['cpu'] + ['cuda'] * torch.cuda.is_available()
            + ['mps'] * torch.backends.mps.is_available())


def default_device():
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def device_name(text):
    """An argparse type: a device of this machine, as torch names it ('cpu', 'cuda', 'cuda:1')."""
    here = devices_here()
    allowed = ', '.join(here + ([f'cuda:0..{torch.cuda.device_count() - 1}'] if 'cuda' in here
                                else []))
    try:
        kind = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; allowed here: {allowed}") \
            from None
    if kind.type not in here:
        none = 'no CUDA GPU' if kind.type == 'cuda' else f"no {kind.type} device"
        raise argparse.ArgumentTypeError(f"{text}: this machine has {none}; allowed here: "
                                         f"{allowed}")
    if kind.type == 'cuda' and kind.index is not None and kind.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} "
                                         f"CUDA GPU(s); allowed here: {allowed}")
    return text


def kernel_refusal(kernel, device):
    """Why `--kernel triton` cannot run on this device, or None: the fused kernels need Triton
    and a CUDA GPU (or Triton's interpreter, TRITON_INTERPRET=1)."""
    if kernel != 'triton':
        return None
    if importlib.util.find_spec('triton') is None:
        return "--kernel triton needs Triton (pip install triton); allowed here: torch, auto"
    if not device.startswith('cuda') and os.environ.get('TRITON_INTERPRET') != '1':
        return (f"--kernel triton runs the fused kernels on a CUDA GPU, got --device {device}; "
                "allowed here: --kernel torch or auto")
    return None


def autocast(args):
    return torch.autocast(args.device.split(':')[0], dtype=torch.bfloat16, enabled=args.amp)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def reuse_freed_memory():
    """On glibc, a freed block of up to 32 MiB stays in the heap for the next step's tensors,
    and up to 64 MiB of free heap is kept, instead of each freed tensor being unmapped and its
    pages faulted in again when the next step allocates (docs/performance.md). True where it
    applied."""
    try:
        libc = ctypes.CDLL('libc.so.6')
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 * 2 ** 20)
                    and libc.mallopt(M_TRIM_THRESHOLD, 64 * 2 ** 20))
    except (OSError, AttributeError):  # not glibc
        return False
