"""Train, fine-tune and evaluate the models of models.py, on one process or many.

    # KArAt ViT-Tiny on digits: offline, minutes on a CPU
    python train.py
    # Swin on digits at 64 px (vitdet_*: on shapes)
    python train.py --model swin_t
    # the paper's recipe: 224 px, patch 16, 100 epochs
    python train.py --dataset cifar10 --download
    torchrun --nproc_per_node=8 train.py --model swin_t --attn fourier --dataset imagenet \\
        --data-path /data/imagenet
    python train.py --dataset svhn --finetune runs/vit_tiny_fourier_imagenet/best.pt
    python train.py --eval-only --resume runs/vit_tiny_fourier_digits/best.pt
    # detection: ViTDet on synthetic shapes
    python train.py --dataset shapes --model vitdet_tiny --attn fourier
    torchrun --nproc_per_node=8 train.py --dataset coco --data-path /data/coco \\
        --model vitdet_base --finetune runs/vit_base_fourier_imagenet/best.pt

Every dataset has a default recipe (`DATASETS`): the paper's for the paper's datasets, a light
one for `digits` and `fake`, ViTDet's for `coco` and `shapes`; any flag given on the command
line overrides its entry. Classification and detection run through one loop (`fit`); a `Task`
says what a batch's loss is, how a model is scored and which score picks best.pt (test top-1,
box AP). Under `torchrun` (the RANK variable is set) it runs DDP, gloo on CPU and nccl on GPU;
rank 0 alone prints, logs and saves. Checkpoints hold only tensors, numbers, strings and
containers and are read with torch.load(weights_only=True), so loading one never runs code.
bench.py times train steps of the same models; curves.py draws the learning curves of runs.
"""
import os
import signal
import sys


def on_interrupt(signum, frame):
    """SIGINT's handler from the first line on (the imports take seconds). Ctrl-C reaches every
    process of the terminal's group and torchrun then forwards it to its workers again: only
    the first one counts, so that a second cannot break into the one line or the exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if 'main' not in globals():  # still importing: nothing written yet, no main() to report it
        print(f"{process_name()}: interrupted while starting; nothing was written", file=sys.stderr)
        raise SystemExit(130)
    raise KeyboardInterrupt


def process_name():
    return f"[rank {os.environ['RANK']}] train.py" if 'RANK' in os.environ else 'train.py'


def catch_interrupts():
    """on_interrupt as SIGINT's handler, unless SIGINT is ignored (a shell's background job);
    returns the handler it replaces."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:
        signal.signal(signal.SIGINT, on_interrupt)
    return previous


if __name__ == '__main__':
    catch_interrupts()

import argparse
import copy
import ctypes
import json
import math
import time
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import datasets as tvd
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm import tqdm

import curves
import detection
import karat
import models

# Recipes ---------------------------------------------------------------------------------------
# The paper's: 224 px (CIFAR upsampled), patch 16, 100 epochs, batch 32 (ImageNet 128), AdamW
# (wd 0.05, eps 1e-6, none on biases, norms and position tables), lr = 5e-4 x total batch / 512,
# 5 warmup epochs from 1e-6 then cosine to 1e-5, clip 1.0, label smoothing 0.1, EMA 0.99992 per
# step, RandomResizedCrop (0.08, 1), flip, RandAugment (2 ops, magnitude 15), colour jitter 0.4,
# then Mixup (alpha 0.8) or CutMix (alpha 1.0).
PAPER = dict(img_size=224, patch_size=None, epochs=100, batch_size=32, lr=None, base_lr=5e-4,
             min_lr=1e-5, warmup_epochs=5, warmup_lr=1e-6, weight_decay=0.05, opt_eps=1e-6,
             clip_grad=1.0, smoothing=0.1, augment='paper', mixup=0.8, cutmix=1.0, ema=0.99992,
             workers=8)
# Small in-memory data: pad-and-crop at most, no Mixup, no EMA.
LIGHT = dict(PAPER, augment='light', mixup=0.0, cutmix=0.0, ema=0.0, workers=0)
# ViTDet's: AdamW, lr 1e-4, wd 0.1, 1024 px; no augmentation here.
DETECTION = dict(PAPER, img_size=1024, epochs=12, batch_size=4, lr=1e-4, min_lr=0.0,
                 warmup_epochs=0.25, warmup_lr=1e-7, weight_decay=0.1, opt_eps=1e-8,
                 smoothing=None, augment=None, mixup=None, cutmix=None, ema=0.0, workers=4)
# None in DETECTION: refused there
CLASSIFICATION_ONLY = ('smoothing', 'augment', 'mixup', 'cutmix')
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class Data:
    """A dataset's facts (classes: None = read from the data; detection counts the background)
    and its default recipe."""
    recipe: dict
    classes: int = None
    stats: tuple = IMAGENET_STATS
    hflip: bool = True         # a flipped digit or house number is another symbol
    center_crop: bool = False  # photos are cropped at test time; small images are resized whole
    sizes: dict = field(default_factory=dict)
    download: bool = False     # torchvision fetches it with --download
    detection: bool = False
    for_model: Callable = None  # (args, recipe) -> the recipe's entries for args.model


def widest(args):
    """The model's widest embedding (Swin doubles it per stage), --embed-dim and --depth given
    or not."""
    arch = models.MODELS[args.model][1]
    stages = args.depth or arch.get('depth')
    doublings = len(stages) - 1 if isinstance(stages, tuple) else 0
    return (args.embed_dim or arch['embed_dim']) * 2 ** doublings


def scaled_lr(lr, width, args):
    """A recipe's lr, tuned on a model `width` wide, for args.model: Adam moves every weight by
    about lr a step, so a logit q.k moves by about lr times the width, and KArAt's φ, unlike
    softmax, never saturates to stop it. Swin-T on digits at ViT-Tiny's 5e-4 fell from 93.6% to
    82.8% at the peak lr, its 768-wide logits at ~40; at 1e-4, 98.9% (README, Training)."""
    return lr * (width / widest(args))


def digits_for(args, recipe):
    """Swin halves its map of patches three times: 8x8 digits at patch 2 end in 1x1 maps,
    whose windows of one token leave KArAt φ(q.k) v, a gate on a logit that nothing bounds
    (softmax there is v itself, nothing to learn). At 64 px with Swin's own patch 4 the maps
    of 16, 8, 4, 2 tokens hold windows of 4, 4, 4, 2 (N = 16, 16, 16, 4)."""
    sizes = dict(img_size=64, patch_size=4) if args.model.startswith('swin') else {}
    return dict(sizes, lr=scaled_lr(recipe['lr'], 192, args))  # tuned on ViT-Tiny


def shapes_for(args, recipe):
    """A model's windows larger than its token grid (ViT-B's 14 on the 8x8 tokens of 128 px)
    become vitdet_tiny's 4 (N = 16); the lr, tuned on vitdet_tiny (96 wide), scales with the
    width."""
    grid = (args.img_size or 128) // (args.patch_size or 16)
    too_wide = grid < models.MODELS[args.model][1]['window_size']
    return dict(dict(window_size=4) if too_wide else {}, lr=scaled_lr(recipe['lr'], 96, args))


DATASETS = {
    'cifar10': Data(PAPER, 10, download=True),
    'cifar100': Data(PAPER, 100, download=True),
    'svhn': Data(PAPER, 10, hflip=False, download=True),
    'stl10': Data(PAPER, 10, download=True),
    'flowers102': Data(PAPER, 102, center_crop=True, download=True),
    'imagenet': Data(dict(PAPER, batch_size=128), center_crop=True),
    'folder': Data(PAPER, center_crop=True),
    'fake': Data(dict(LIGHT, img_size=32, patch_size=4, epochs=5, warmup_epochs=1), 10,
                 sizes={'train': 1024, 'test': 256}),
    # no augmentation: a one-pixel shift of an 8x8 digit moves every 2x2 patch, and the
    # softmax ViT, which has to learn where its patches are, then trains ~3x slower
    'digits': Data(dict(LIGHT, img_size=8, patch_size=2, epochs=30, batch_size=32, lr=5e-4,
                        warmup_epochs=2, augment='none'), 10,
                   stats=((0.305,) * 3, (0.376,) * 3), hflip=False, for_model=digits_for),
    'coco': Data(DETECTION, detection=True),
    'shapes': Data(dict(DETECTION, img_size=128, epochs=1, lr=1e-3, warmup_epochs=0.1,
                        weight_decay=0.05, workers=0),
                   4, sizes={'train': 1000, 'test': 100}, detection=True, for_model=shapes_for),
}
ARCH_FLAGS = ('patch_size', 'embed_dim', 'depth', 'num_heads', 'window_size', 'drop_path_rate')


class Fatal(Exception):
    """An error the user can fix; main() prints its one line and exits with `code`."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


# Command line ----------------------------------------------------------------------------------

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
    if text == 'full':
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid rank {text!r}: an integer r or 'full'") from None


# The KArAt flags are karat.AttentionConfig's fields, parsed here and checked there, once.
ATTENTION_FIELDS = [f.name for f in fields(karat.AttentionConfig)]
# how the operators compute, not what: this run's choice, even on --resume
HOW = ('kernel', 'chunk_elements')
PARSE = {'grid': int, 'rank': rank_value, 'chunk_elements': int}


def attention_arguments(g):
    """--attn (default fourier), --mode, --grid, --rank, --base, --order, --simplex, --naive
    (efficient=False), --kernel, --chunk-elements."""
    for f in fields(karat.AttentionConfig):
        help, allowed = f.metadata['help'], f.metadata.get('choices')
        if f.name == 'efficient':
            g.add_argument('--naive', dest='efficient', action='store_false',
                           help='the naive materialised formula, not the fast paths')
        elif isinstance(f.default, bool):
            g.add_argument(f"--{f.name}", action='store_true', help=help)
        else:
            g.add_argument(f"--{f.name.replace('_', '-')}", type=PARSE.get(f.name, str),
                           default='fourier' if f.name == 'attn' else f.default, help=help,
                           metavar='{' + ','.join(allowed) + '}' if allowed else None)


def attention_options(args):
    """The KArAt keywords of create_model from the flags."""
    return {k: getattr(args, k) for k in models.ATTENTION_OPTIONS}


def model_arguments(p):
    """The model's flags, shared with bench.py."""
    g = p.add_argument_group('model')
    g.add_argument('--model', default='vit_tiny', choices=models.list_models())
    attention_arguments(g)
    g.add_argument('--img-size', type=positive)
    for flag in ('--patch-size', '--embed-dim', '--window-size'):
        g.add_argument(flag, type=positive, help="the model's own default if omitted")
    for flag in ('--depth', '--num-heads'):
        g.add_argument(flag, type=ints,
                       help="the model's own default if omitted; Swin: one per stage, 2,2,6,2")
    g.add_argument('--drop-path', dest='drop_path_rate', type=number(float, 0.0, 1.0))


MODEL_FLAGS = ('model', *(k for k in ATTENTION_FIELDS if k not in HOW), 'img_size', *ARCH_FLAGS)
# what --resume never takes from the run it continues: this invocation's own choices
INVOCATION = ('resume', 'finetune', 'keep_head', 'eval_only', 'output_dir', 'overwrite',
              'download', 'device', 'workers', 'compile', 'given', *HOW)


def apply_recipe(args):
    """Fill every flag not given from the dataset's recipe, with its entries for the model;
    lr from base-lr unless given."""
    data = DATASETS[args.dataset]
    for_model = data.for_model(args, data.recipe) if data.for_model else {}
    for key, value in {**data.recipe, **for_model}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.lr is None:  # the paper's linear scaling with the total batch over all processes
        args.lr = args.base_lr * args.batch_size * int(os.environ.get('WORLD_SIZE', 1)) / 512
    return args


def parse_args(argv=None):
    p = Parser(description=__doc__.split('\n\n')[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(p)
    g = p.add_argument_group('data')
    g.add_argument('--dataset', choices=list(DATASETS),
                   help='default: digits; shapes for the vitdet_* models')
    g.add_argument('--data-path', default='data',
                   help="torchvision's root, or a folder with train/ and val/")
    g.add_argument('--download', action='store_true')
    g.add_argument('--limit', type=positive,
                   help='train and test on at most this many images of each split')
    g.add_argument('--workers', type=natural)
    g = p.add_argument_group('recipe (defaults: the dataset\'s recipe)')
    for flag, kind, what in (
            ('--epochs', positive, ''), ('--batch-size', positive, 'per process'),
            ('--lr', non_negative, 'peak learning rate; default base-lr x total batch / 512'),
            ('--base-lr', non_negative, ''), ('--min-lr', non_negative, 'end of the cosine'),
            ('--warmup-epochs', non_negative, ''),
            ('--warmup-lr', non_negative, 'start of the linear warmup'),
            ('--weight-decay', non_negative, 'AdamW'),
            ('--opt-eps', number(float, 0.0, low_open=True), 'AdamW'),
            ('--clip-grad', non_negative, 'gradient norm; 0 = off'),
            ('--smoothing', number(float, 0.0, 1.0), 'label smoothing'),
            ('--mixup', non_negative, 'Mixup alpha; 0 = off'),
            ('--cutmix', non_negative, 'CutMix alpha; 0 = off'),
            ('--ema', number(float, 0.0, 1.0), 'EMA decay per step; 0 = off')):
        g.add_argument(flag, type=kind, help=what or None)
    g.add_argument('--augment', choices=('paper', 'light', 'none'),
                   help='paper: RandomResizedCrop, flip, RandAugment, jitter; '
                        'light: pad-and-crop, flip')
    g = p.add_argument_group('run')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    g.add_argument('--amp', action='store_true', help='bfloat16 autocast')
    g.add_argument('--compile', action='store_true', help='torch.compile the model')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--output-dir',
                   help='default: runs/<model>_<attn>_<dataset>, '
                        'or the --resume checkpoint\'s folder')
    g.add_argument('--overwrite', action='store_true',
                   help='replace the run already in --output-dir')
    g.add_argument('--resume', metavar='PATH',
                   help="continue exactly from a checkpoint, with its run's flags but those given")
    g.add_argument('--finetune', metavar='PATH',
                   help="start from a train.py, timm or torchvision checkpoint's weights, new head")
    g.add_argument('--keep-head', action='store_true',
                   help="with --finetune: keep the checkpoint's classifier head (same classes)")
    g.add_argument('--eval-only', action='store_true',
                   help='evaluate the --resume checkpoint and exit')
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    args.given = {a.dest: a.option_strings[0] for a in p._actions
                  if any(w.split('=')[0] in a.option_strings for w in argv)}  # dest -> its flag
    if args.resume:  # the run's own flags (recipe, data, seed), but for those given now
        for key, value in run_arguments(args.resume).items():
            if key not in args.given and key not in INVOCATION and hasattr(args, key):
                setattr(args, key, value)
    if args.dataset is None:  # the offline data of the model's task
        args.dataset = 'shapes' if args.model.startswith('vitdet') else 'digits'
    data = DATASETS[args.dataset]
    if data.detection != args.model.startswith('vitdet'):
        p.error(f"the vitdet_* models train on the detection datasets "
                f"{', '.join(k for k, d in DATASETS.items() if d.detection)} and only there; "
                f"got --model {args.model} with --dataset {args.dataset}")
    unused = [f"--{k.replace('_', '-')}" for k in CLASSIFICATION_ONLY if k in args.given]
    if data.detection and unused:
        p.error(f"{', '.join(unused)}: classification only, not for detection on {args.dataset}")
    if args.download and not data.download:
        p.error(f"--download fetches {', '.join(k for k, d in DATASETS.items() if d.download)}; "
                f"{args.dataset} is not downloaded")
    if args.eval_only and not args.resume:
        p.error('--eval-only evaluates the checkpoint given by --resume PATH')
    if args.keep_head and (not args.finetune or args.model.startswith('vitdet')):
        p.error("--keep-head keeps a classifier's head from the --finetune PATH checkpoint")
    if args.resume and args.finetune:
        p.error('--resume continues a run, --finetune starts a new one: give one of them')
    return apply_recipe(args)


# Classification data ---------------------------------------------------------------------------

def image_transform(data, args, img_size, training):
    """uint8 image (PIL or tensor) -> normalised float tensor (3, img_size, img_size)."""
    recipe = args.augment if training else 'none'
    flip = [v2.RandomHorizontalFlip()] if data.hflip else []
    if recipe == 'paper':
        steps = [v2.RandomResizedCrop(img_size, scale=(0.08, 1.0), antialias=True), *flip,
                 v2.RandAugment(num_ops=2, magnitude=15), v2.ColorJitter(0.4, 0.4, 0.4)]
    elif recipe == 'light':
        steps = [v2.Resize((img_size, img_size), antialias=True),
                 v2.RandomCrop(img_size, padding=max(1, img_size // 8)), *flip]
    elif data.center_crop:
        steps = [v2.Resize(int(img_size / 0.875), antialias=True), v2.CenterCrop(img_size)]
    else:
        steps = [v2.Resize((img_size, img_size), antialias=True)]
    return v2.Compose([v2.ToImage(), *steps, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(*data.stats)])


class InMemory(Dataset):
    """uint8 images (n, 3, h, w) and labels held as tensors."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(tv_tensors.Image(self.images[i])), int(self.labels[i])


def digits(training, transform):
    """scikit-learn's 1,797 8x8 digits (values 0..16), gray replicated to 3 channels so that
    every checkpoint has the same patch embedding; a fixed stratified split, 1437 / 360."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    split = train_test_split(range(len(d.target)), test_size=360, stratify=d.target, random_state=0)
    idx = split[0 if training else 1]
    images = (torch.tensor(d.images[idx]) * (255 / 16)).round().to(torch.uint8)
    return InMemory(images[:, None].expand(-1, 3, -1, -1), torch.tensor(d.target[idx]), transform)


def torchvision_split(name, root, training, download, transform):
    if name in ('cifar10', 'cifar100'):
        cls = tvd.CIFAR10 if name == 'cifar10' else tvd.CIFAR100
        return cls(root, train=training, download=download, transform=transform)
    cls = {'svhn': tvd.SVHN, 'stl10': tvd.STL10, 'flowers102': tvd.Flowers102}[name]
    return cls(root, split='train' if training else 'test', download=download, transform=transform)


def read_image(path):
    """ImageFolder's loader, except that an unreadable file (truncated, or no image at all) stops
    the run with its name, rather than being skipped, which would change the data unseen."""
    try:
        with Image.open(path) as image:
            return image.convert('RGB')
    except OSError as e:  # PIL's UnidentifiedImageError is an OSError
        raise Fatal(f"cannot read image {path} ({e}); remove or replace it, "
                    "then --resume") from None


def image_folder(root, training, transform):
    path = Path(root) / ('train' if training else 'val')
    if not path.is_dir():
        raise Fatal(f"no folder {path}: --data-path must hold train/ and val/ trees "
                    "of class folders")
    return tvd.ImageFolder(path, transform=transform, loader=read_image)


def classification_datasets(args, img_size):
    """(train, test, number of classes); a missing dataset is one clear line."""
    name, data = args.dataset, DATASETS[args.dataset]

    def split(training):
        t = image_transform(data, args, img_size, training)
        if name == 'digits':
            return digits(training, t)
        if name == 'fake':
            n = data.sizes['train' if training else 'test']
            return tvd.FakeData(n, (3, img_size, img_size), data.classes, t,
                                random_offset=0 if training else 10 ** 6)
        if name in ('imagenet', 'folder'):
            return image_folder(args.data_path, training, t)
        try:
            return torchvision_split(name, args.data_path, training, args.download, t)
        except (RuntimeError, OSError) as e:
            hint = "download failed" if args.download else "pass --download to fetch it"
            raise Fatal(f"{name} not found under {args.data_path!r} ({hint}): {e}") from None
    train_set, test_set = split(True), split(False)
    classes = data.classes or len(train_set.classes)
    if data.classes is None and train_set.classes != test_set.classes:
        raise Fatal(f"train/ and val/ under {args.data_path} hold different class folders")
    if args.limit:
        pick = lambda ds: Subset(ds, torch.randperm(
            len(ds), generator=torch.Generator().manual_seed(0))[:args.limit].tolist())
        train_set, test_set = pick(train_set), pick(test_set)
    return train_set, test_set, classes


# Models and checkpoints ------------------------------------------------------------------------

def model_config(args, num_classes):
    """create_model's arguments; KArAt options only for KArAt, architecture overrides only if
    set."""
    cfg = dict(name=args.model, attn=args.attn, num_classes=num_classes, img_size=args.img_size)
    if args.attn != 'softmax':
        cfg.update(attention_options(args))
    cfg.update({k: getattr(args, k) for k in ARCH_FLAGS if getattr(args, k) is not None})
    return cfg


def build_model(config):
    cfg = dict(config)
    try:
        return models.create_model(cfg.pop('name'), **cfg)
    except (ValueError, TypeError) as e:
        raise Fatal(f"cannot build the model: {e}", code=2) from None


def save_atomic(obj, path):
    """Write to a temporary file in the same folder, then rename over `path`: a kill at any
    moment leaves either the old file or the new one, never a torn one."""
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_checkpoint(path):
    """Whatever `path` holds (models.read_file): plain data only, never code."""
    try:
        return models.read_file(path)
    except FileNotFoundError:
        raise Fatal(f"no checkpoint at {path}") from None
    except Exception as e:  # torn, foreign, or carrying objects whose unpickling could run code
        lines = [l for l in str(e).splitlines()
                 if l.strip() and not l.startswith(('Weights only', 'Please file', 'Check the'))]
        raise Fatal(f"cannot load checkpoint {path}: {(lines or [type(e).__name__])[0]}") from None


def load_checkpoint(path):
    """A train.py checkpoint: the model's weights and config, and the run's state."""
    ckpt = read_checkpoint(path)
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get('model'), dict)
            and isinstance(ckpt.get('config'), dict)):
        raise Fatal(f"{path} is not a train.py checkpoint (no model weights and config)")
    return ckpt


def run_arguments(path):
    """The flags of the run that wrote checkpoint `path`, as it stored them ({} if none). The
    file is memory-mapped, so its tensors are not read here (train() loads it once, whole: a
    600 MB checkpoint took 0.04 s here instead of 0.7)."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:  # the one-line reason comes from load_checkpoint
        ckpt = load_checkpoint(path)
    saved = ckpt.get('args') if isinstance(ckpt, dict) else None
    return saved if isinstance(saved, dict) else {}


def describe(config):
    return '/'.join(str(config.get(k)) for k in ('name', 'attn', 'img_size'))


def load_weights(model, state, path, config):
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise Fatal(f"{path} holds another architecture than its config {describe(config)}: "
                    f"{detail}") from None


def restore_or_build(args, ckpt, classes):
    """The checkpoint's model with its weights, or a new one from the flags (seeded)."""
    torch.manual_seed(args.seed)
    config = ckpt['config'] if ckpt else model_config(args, classes)
    if ckpt and config['attn'] != 'softmax':  # how the operators are computed is this run's choice
        config = {**config, **{k: getattr(args, k) for k in HOW}}
    if config['num_classes'] != classes:
        raise Fatal(f"{args.resume} has {config['num_classes']} classes, {args.dataset} has "
                    f"{classes}: --finetune starts a new run from a classifier's weights")
    model = build_model(config)
    if ckpt:
        load_weights(model, ckpt['model'], args.resume, config)
    return model


def finetune_from(model, path, keep_head=False):
    """Start `model` from the weights in `path` (models.load_pretrained: this project's, timm's
    or torchvision's layout), its head new unless keep_head; say what starts at init."""
    try:
        at_init = models.load_pretrained(model, read_checkpoint(path), head=keep_head)
    except ValueError as e:
        raise Fatal(f"cannot start from {path}: {e}") from None
    if int(os.environ.get('RANK', 0)) == 0:
        left = models.summarise(at_init) or 'nothing'
        print(f"weights from {path}; left at init: {left}", flush=True)


def backbone_from(model, path):
    """A detector's backbone from a classifier checkpoint (models.load_backbone)."""
    try:
        report = models.load_backbone(model, read_checkpoint(path))
    except ValueError as e:
        raise Fatal(f"cannot initialise the backbone from {path}: {e}") from None
    if int(os.environ.get('RANK', 0)) == 0:
        print(f"backbone from {path}; left at init: {', '.join(report['missing']) or 'nothing'}",
              flush=True)


# Optimisation ----------------------------------------------------------------------------------

def learning_rate(step, args, steps_per_epoch):
    """Linear warmup from warmup_lr, then cosine down to min_lr: a pure function of the step."""
    warmup, total = round(args.warmup_epochs * steps_per_epoch), args.epochs * steps_per_epoch
    if step < warmup:
        return args.warmup_lr + (args.lr - args.warmup_lr) * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


NO_DECAY = ('pos_embed', 'cls_token', 'relative_position')


def optimizer_for(model, args):
    """AdamW; no weight decay on biases, norms, tokens and position tables (as DeiT)."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and not any(s in name for s in NO_DECAY) else rest).append(p)
    groups = [dict(params=decay, weight_decay=args.weight_decay),
              dict(params=rest, weight_decay=0.0)]
    return torch.optim.AdamW(groups, lr=args.lr, eps=args.opt_eps)


class EMA:
    """θ̄ <- d θ̄ + (1 - d) θ after every step (the paper: d = 0.99992). parameters() and
    buffers() list a universal operator once, so shared weights are averaged once."""

    def __init__(self, model, decay):
        self.decay, self.model = decay, copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        for mine, theirs in zip(self.model.parameters(), model.parameters()):
            mine.lerp_(theirs, 1 - self.decay)
        for mine, theirs in zip(self.model.buffers(), model.buffers()):
            mine.copy_(theirs)


def mixer(args, classes):
    """Mixup or CutMix on each batch, one of them with p 0.5 each (DeiT's alphas 0.8 and 1.0)."""
    mixes = ([v2.MixUp(alpha=args.mixup, num_classes=classes)] if args.mixup > 0 else []) + \
            ([v2.CutMix(alpha=args.cutmix, num_classes=classes)] if args.cutmix > 0 else [])
    return v2.RandomChoice(mixes) if mixes else None


def seed_epoch(seed, epoch, rank):
    """An epoch's randomness (augmentation, Mixup, drop-path, loader worker seeds) is a pure
    function of (seed, epoch, rank), so a resumed run replays it exactly, like the LR."""
    torch.manual_seed(hash((seed, epoch, rank)))


def autocast(args):
    return torch.autocast(args.device.split(':')[0], dtype=torch.bfloat16, enabled=args.amp)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def reuse_freed_memory():
    """On glibc, a freed block of up to 32 MiB stays in the heap for the next step's tensors,
    and up to 64 MiB of free heap is kept, instead of each freed tensor being unmapped and its
    pages faulted in again when the next step allocates: a ViT-Tiny train step on a CPU (224 px,
    batch 8) took 11% less time with softmax and 6% less with KArAt. True where it applied."""
    try:
        libc = ctypes.CDLL('libc.so.6')
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 * 2 ** 20)
                    and libc.mallopt(M_TRIM_THRESHOLD, 64 * 2 ** 20))
    except (OSError, AttributeError):  # not glibc
        return False


def all_sum(t):
    """Sum a tensor over all ranks (in place); one process: the tensor itself."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


# Tasks -----------------------------------------------------------------------------------------

@dataclass
class Task:
    """What the loop needs to know of a task; everything else (the loop, the LR, checkpoints,
    resume, logs, DDP, --amp, --compile, --ema) is shared."""
    train_set: Dataset
    test_set: Dataset
    classes: int          # the model's num_classes
    loss: Callable        # (model, batch) -> (loss, {name: tensor}): the mean over the
                          # batch's images
    evaluate: Callable    # (model, loader) -> {name: float}: over the test images of every rank
    metric: str           # the score that picks best.pt
    finetune: Callable    # (model, path): a new run's weights from a checkpoint
    collate: Callable = None


def classification_loss(model, batch, device, mix, smoothing):
    images, labels = (t.to(device, non_blocking=True) for t in batch)
    if mix is not None:
        images, labels = mix(images, labels)
    return F.cross_entropy(model(images).float(), labels, label_smoothing=smoothing), {}


@torch.no_grad()
def evaluate_classifier(model, loader, device):
    """Loss, top-1 and top-5 accuracy (percent) over the whole test set, summed over ranks."""
    model.eval()
    total = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, images
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        counts = (F.cross_entropy(logits, labels, reduction='sum'), top[:, 0].sum(),
                  top.any(1).sum(), len(labels))
        total += torch.stack([total.new_tensor(c) if isinstance(c, int) else c.double()
                              for c in counts])
    loss, top1, top5, n = all_sum(total).tolist()
    return {'test_loss': loss / n, 'test_acc1': 100 * top1 / n, 'test_acc5': 100 * top5 / n}


def classification_task(args, img_size):
    train_set, test_set, classes = classification_datasets(args, img_size)
    device = torch.device(args.device)
    return Task(train_set, test_set, classes,
                loss=partial(classification_loss, device=device, mix=mixer(args, classes),
                             smoothing=args.smoothing),
                evaluate=partial(evaluate_classifier, device=device), metric='test_acc1',
                finetune=partial(finetune_from, keep_head=args.keep_head))


def detection_task(args, img_size):
    """ViTDet + Mask R-CNN (detection.py): lists of images and targets, Mask R-CNN's losses,
    COCO box and mask AP; `classes` counts the background."""
    try:
        train_set, test_set, names = detection.build_datasets(
            args.dataset, args.data_path, img_size, DATASETS[args.dataset].sizes, args.limit)
    except FileNotFoundError as e:
        raise Fatal(str(e)) from None
    device = torch.device(args.device)
    return Task(train_set, test_set, len(names),
                loss=partial(detection.detection_loss, device=device),
                evaluate=partial(detection.evaluate_detection,
                                 coco_gt=detection.ground_truth(test_set, names), device=device),
                metric='box_ap', finetune=backbone_from, collate=detection.collate_detection)


def loaders(task, args, rank, world):
    """Shuffling is a function of (seed, epoch) through the sampler; test images are split
    between ranks without padding, so that each is scored once."""
    sampler = DistributedSampler(task.train_set, num_replicas=world, rank=rank, shuffle=True,
                                 seed=args.seed)
    kw = dict(batch_size=args.batch_size, num_workers=args.workers,
              pin_memory=args.device.startswith('cuda'), collate_fn=task.collate)
    return (DataLoader(task.train_set, sampler=sampler, **kw),
            DataLoader(task.test_set, sampler=range(rank, len(task.test_set), world), **kw))


# Train and evaluate ----------------------------------------------------------------------------

@dataclass
class Run:
    """What the loop shares: the task, the model three ways, the optimiser, the EMA and the rank."""
    args: argparse.Namespace
    task: Task
    raw: torch.nn.Module      # what is saved: no DDP `module.`, no compile `_orig_mod.`
    fast: torch.nn.Module     # raw, compiled or not: evaluation
    ddp: torch.nn.Module      # fast, wrapped in DDP when distributed: training
    optimizer: torch.optim.Optimizer
    ema: EMA
    rank: int = 0
    step: int = 0


PROGRESS_SECONDS = 60  # a progress line this often when output goes to a file, not a terminal


class NonFinite(Exception):
    """A NaN or infinite loss or gradient, caught before the optimiser step."""


def train_one_epoch(run, loader, epoch):
    """One pass over the training set; the loss and the task's other terms, each averaged
    over every image of every rank."""
    args = run.args
    run.ddp.train()
    sums, images = 0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False,
               disable=run.rank != 0 or None)
    # no terminal (None): lines instead of a bar
    lines, shown = run.rank == 0 and bar.disable, time.time()
    for i, batch in enumerate(bar):
        lr = learning_rate(run.step, args, len(loader))
        for group in run.optimizer.param_groups:
            group['lr'] = lr
        run.optimizer.zero_grad(set_to_none=True)  # before the forward: none held at its peak
        with autocast(args):
            loss, terms = run.task.loss(run.ddp, batch)
        loss.backward()
        # the norm is taken over all-reduced gradients, so every rank stops at the same step
        norm = torch.nn.utils.clip_grad_norm_(run.raw.parameters(), args.clip_grad or math.inf)
        if not torch.isfinite(norm):
            raise NonFinite(f"non-finite loss or gradient at step {run.step + 1} "
                            f"(epoch {epoch + 1}, loss {loss.item():.4g})")
        run.optimizer.step()
        if run.ema:
            run.ema.update(run.raw)
        run.step += 1
        n = len(batch[0])
        sums = sums + torch.stack([v.detach().float()
                                   for v in (loss, *terms.values())]).double() * n
        images += n
        if run.step % 10 == 0 and not bar.disable:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
        if lines and time.time() - shown >= PROGRESS_SECONDS:
            shown = time.time()
            print(f"  epoch {epoch + 1}/{args.epochs}  step {i + 1}/{len(loader)}  "
                  f"loss {loss.item():.4g}  lr {lr:.2e}", flush=True)
    *sums, images = all_sum(torch.cat([sums, sums.new_tensor([images])])).tolist()
    return dict(zip(['train_loss', *terms], (s / images for s in sums)), lr=lr)


def evaluate(run, loader):
    """The task's scores of the model, and of its EMA (prefixed ema_) if there is one."""
    with autocast(run.args):
        stats = run.task.evaluate(run.fast, loader)
        if run.ema:
            stats |= {f'ema_{k}': v for k, v in run.task.evaluate(run.ema.model, loader).items()}
    return stats


def checkpoint(run, epoch, best, history):
    return dict(model=run.raw.state_dict(), config=run.raw.config,
                optimizer=run.optimizer.state_dict(),
                ema=run.ema.model.state_dict() if run.ema else None, epoch=epoch, step=run.step,
                metric=run.task.metric, best=best, history=history, args=vars(run.args))


def fit(run, train_loader, test_loader, out, start_epoch, best, history):
    args, metric, leader = run.args, run.task.metric, run.rank == 0
    for epoch in range(start_epoch, args.epochs):
        seed_epoch(args.seed, epoch, run.rank)
        train_loader.sampler.set_epoch(epoch)
        tic = time.time()
        try:
            stats = train_one_epoch(run, train_loader, epoch)
        except NonFinite as e:
            kept = (f"{out / 'last.pt'} (epoch {epoch}) is intact" if epoch
                    else "no checkpoint was written")
            raise Fatal(f"{e}; stopping, {kept}") from None
        row = dict(epoch=epoch + 1, **stats, **evaluate(run, test_loader),
                   epoch_time=time.time() - tic)
        history.append(row)
        if not leader:
            continue
        improved, best = row[metric] > best, max(best, row[metric])
        state = checkpoint(run, epoch + 1, best, history)
        save_atomic(state, out / 'last.pt')
        if improved:
            save_atomic(state, out / 'best.pt')
        with open(out / 'log.jsonl', 'a') as f:
            f.write(json.dumps(row) + '\n')
        curves.plot([out], out / 'curves.png')
        scores = '  '.join(f"{k} {v:.4g}" for k, v in row.items()
                           if k not in ('epoch', 'lr', 'epoch_time'))
        print(f"epoch {epoch + 1}/{args.epochs}  {scores}  lr {row['lr']:.2e}  "
              f"{row['epoch_time']:.1f}s", flush=True)
    if leader:
        print(f"best {metric} {best:.2f}; checkpoints and log.jsonl in {out}")


def setup_distributed(args):
    """(rank, world size): torchrun sets RANK, WORLD_SIZE and LOCAL_RANK."""
    if 'RANK' not in os.environ:
        return 0, 1
    rank, world = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
    if args.device.startswith('cuda'):
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        torch.cuda.set_device(args.device)
    dist.init_process_group('nccl' if args.device.startswith('cuda') else 'gloo')
    return rank, world


RUN_FILES = ('args.json', 'log.jsonl', 'last.pt', 'best.pt', 'curves.png')


def output_dir(args):
    return Path(args.output_dir or (Path(args.resume).parent if args.resume else
                                    Path('runs') / f"{args.model}_{args.attn}_{args.dataset}"))


def claim(out, args):
    """Make the output folder; one holding another run is refused unless --resume continues
    that run or --overwrite replaces it (its run files are then deleted first)."""
    held = [name for name in RUN_FILES if (out / name).exists()]
    continued = args.resume and Path(args.resume).resolve().parent == out.resolve()
    if held and not continued and not args.overwrite:
        raise Fatal(f"{out} holds a run ({', '.join(held)}): --resume {out / 'last.pt'} "
                    f"continues it, --overwrite replaces it, or give another --output-dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in held if args.overwrite and not continued else ():
            (out / name).unlink()
    except OSError as e:
        raise Fatal(f"cannot write to --output-dir {out}: {e.strerror}") from None
    if not os.access(out, os.W_OK):
        raise Fatal(f"cannot write to --output-dir {out}: permission denied")


def check_model_flags(args, ckpt, classes):
    """Before any data is read: a new model must be buildable; a resumed one is the checkpoint's,
    so a model flag given with another value than the checkpoint's is refused."""
    if not ckpt:
        try:  # KArAt's flags are checked for softmax too, which does not use them
            karat.AttentionConfig(**attention_options(args))
        except ValueError as e:
            raise Fatal(f"cannot build the model: {e}", code=2) from None
        with torch.device('meta'):  # the structure only: no memory, no init
            build_model(model_config(args, classes or 2))
        return
    mine, theirs = model_config(args, ckpt['config']['num_classes']), ckpt['config']
    for dest in (d for d in args.given if d in MODEL_FLAGS):
        key, value = 'name' if dest == 'model' else dest, getattr(args, dest)
        if mine.get(key) != theirs.get(key):
            flag = args.given[dest] + ('' if isinstance(value, bool) else f" {value}")
            raise Fatal(f"{flag} differs from {args.resume}'s {key} {theirs.get(key)}: --resume "
                        "rebuilds the checkpoint's model (drop the flag, or --finetune to start a "
                        "new run from its weights)", code=2)


def chosen(args, config=None):
    """The data, the sizes (Swin's windows per stage), epochs and lr of a run of the model of
    `config` (default: the flags')."""
    with torch.device('meta'):
        model = build_model(config or model_config(args, DATASETS[args.dataset].classes or 2))
    size, patch = model.config['img_size'], getattr(model, 'backbone', model).patch_embed.stride[0]
    windows = f", windows {'/'.join(map(str, model.windows))}" if hasattr(model, 'windows') else ''
    return (f"{args.dataset}, {size}x{size} px, patch {patch}{windows}, {args.epochs} epochs, "
            f"lr {args.lr:.3g}")


def train(args):
    """Set up the task, the model and the run (new, resumed or fine-tuned), then fit, or only
    evaluate with --eval-only."""
    rank, world = setup_distributed(args)
    ckpt = load_checkpoint(args.resume) if args.resume else None
    check_model_flags(args, ckpt, DATASETS[args.dataset].classes)
    out = output_dir(args)
    if rank == 0 and not args.eval_only:
        claim(out, args)
        if ckpt:
            print(f"resuming {args.resume}: {chosen(args, ckpt['config'])}", flush=True)
        elif 'dataset' not in args.given:
            print(f"no --dataset given: {chosen(args)} (--dataset chooses another; --help lists "
                  "them)", flush=True)
    img_size = ckpt['config']['img_size'] if ckpt else args.img_size
    make_task = detection_task if DATASETS[args.dataset].detection else classification_task
    if rank == 0:  # rank 0 downloads while the others wait, then they read what it fetched
        task = make_task(args, img_size)
    if world > 1:
        dist.barrier()
        if rank > 0:
            task = make_task(args, img_size)
    raw = restore_or_build(args, ckpt, task.classes)
    if args.finetune and not ckpt:
        task.finetune(raw, args.finetune)
    raw.to(args.device)
    if torch.device(args.device).type == 'cpu':
        reuse_freed_memory()
    fast = torch.compile(raw) if args.compile else raw
    averaged = ckpt.get('ema') is not None if args.eval_only else args.ema > 0
    run = Run(args, task, raw, fast, DistributedDataParallel(fast) if world > 1 else fast,
              optimizer_for(raw, args), EMA(raw, args.ema) if averaged else None, rank)
    train_loader, test_loader = loaders(task, args, rank, world)

    if args.eval_only:
        if run.ema:
            load_weights(run.ema.model, ckpt['ema'], args.resume, raw.config)
        stats = evaluate(run, test_loader)
        if rank == 0:
            print(json.dumps(dict(checkpoint=args.resume, dataset=args.dataset, **stats)))
        return

    start_epoch, best, history = 0, -math.inf, []
    if ckpt:
        try:
            run.optimizer.load_state_dict(ckpt['optimizer'])
            if run.ema:
                run.ema.model.load_state_dict(ckpt['ema'])
            start_epoch, run.step, best, history = (ckpt['epoch'], ckpt['step'], ckpt['best'],
                                                    list(ckpt['history']))
        except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
            raise Fatal(f"{args.resume} cannot be resumed with these options "
                        f"({str(e).splitlines()[0]})") from None
    if rank == 0:
        (out / 'args.json').write_text(
            json.dumps(dict(vars(args), world_size=world), indent=2) + '\n')
        # the log is rewritten from the checkpoint, so a kill between checkpoint and log
        # loses nothing
        (out / 'log.jsonl').write_text(''.join(json.dumps(row) + '\n' for row in history))
        n_params = sum(p.numel() for p in raw.parameters())
        print(f"{describe(raw.config)}: {n_params:,} parameters; "
              f"{args.dataset}: {len(task.train_set)} train / {len(task.test_set)} test images, "
              f"{task.classes} classes; {world} process(es) on {args.device}", flush=True)
    fit(run, train_loader, test_loader, out, start_epoch, best, history)


def main(argv=None):
    prefix, previous = process_name(), catch_interrupts()
    try:
        train(parse_args(argv))
    except Fatal as e:
        # from a loader worker: the worker's traceback, ours on its last line
        lines = str(e).splitlines()
        print(f"{prefix}: error: {lines[-1].split('Fatal: ', 1)[-1] if len(lines) > 1 else e}",
              file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt:
        print(f"{prefix}: interrupted; the checkpoints written so far are intact", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        signal.signal(signal.SIGINT, previous)


if __name__ == '__main__':
    main()
