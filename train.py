"""Train, fine-tune, evaluate and benchmark the models of models.py, on one process or many.

    python train.py                                        # KArAt ViT-Tiny on digits: offline, minutes on a CPU
    python train.py --dataset cifar10 --download           # the paper's recipe: 224 px, patch 16, 100 epochs
    torchrun --nproc_per_node=8 train.py --model swin_t --attn fourier --dataset imagenet --data-path /data/imagenet
    python train.py --dataset svhn --finetune runs/vit_tiny_fourier_imagenet/best.pt
    python train.py --eval-only --resume runs/vit_tiny_fourier_digits/best.pt
    python train.py --benchmark --compare --img-size 224 --patch-size 16 --batch-size 32 --amp  # vs softmax, naive
    python train.py --dataset shapes --model vitdet_tiny --attn fourier  # detection: ViTDet on synthetic shapes
    python train.py --dataset coco --data-path /data/coco --model vitdet_base --finetune runs/vit_base_fourier_imagenet/best.pt

Every dataset has a default recipe (`DATASETS`): the paper's for the paper's datasets, a light
one for `digits` and `fake`; any flag given on the command line overrides its entry.
The vitdet_* models train in a separate detection mode (`coco`, `shapes`): lists of images
and targets, Mask R-CNN's loss dict, COCO box and mask AP from pycocotools; one process.
Under `torchrun` (the RANK variable is set) it runs DDP, gloo on CPU and nccl on GPU; rank 0
alone prints, logs and saves. Checkpoints hold only tensors, numbers, strings and containers
and are read with torch.load(weights_only=True), so loading one never runs code.
"""
import argparse
import contextlib
import copy
import ctypes
import io
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision import datasets as tvd
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm import tqdm

import karat
import models

# Recipes -------------------------------------------------------------------------------------
# The paper (DESIGN.md §5): 224 px, 100 epochs, AdamW (wd 0.05, eps 1e-6), lr = 5e-4·batch/512,
# cosine from 5 warmup epochs at 1e-6 down to 1e-5, clip 1.0, label smoothing 0.1, EMA 0.99992,
# RandAugment m15 n2, RandomResizedCrop (0.08, 1), flip, colour jitter 0.4, Mixup or CutMix.
PAPER = dict(img_size=224, patch_size=None, epochs=100, batch_size=32, lr=None, base_lr=5e-4,
             min_lr=1e-5, warmup_epochs=5, warmup_lr=1e-6, weight_decay=0.05, opt_eps=1e-6,
             clip_grad=1.0, smoothing=0.1, augment='paper', mixup=0.8, cutmix=1.0, ema=0.99992,
             workers=8)
# Small in-memory data: pad-and-crop at most, no Mixup, no EMA.
LIGHT = dict(PAPER, augment='light', mixup=0.0, cutmix=0.0, ema=0.0, workers=0)
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class Data:
    """A dataset's facts (classes: None = read from the folder tree) and its default recipe."""
    recipe: dict
    classes: int = None
    stats: tuple = IMAGENET_STATS
    hflip: bool = True         # a flipped digit or house number is another symbol
    center_crop: bool = False  # photos are cropped at test time; small images are resized whole
    sizes: dict = field(default_factory=dict)


DATASETS = {
    'cifar10': Data(PAPER, 10),
    'cifar100': Data(PAPER, 100),
    'svhn': Data(PAPER, 10, hflip=False),
    'stl10': Data(PAPER, 10),
    'flowers102': Data(PAPER, 102, center_crop=True),
    'imagenet': Data(dict(PAPER, batch_size=128), center_crop=True),
    'folder': Data(PAPER, center_crop=True),
    'fake': Data(dict(LIGHT, img_size=32, patch_size=4, epochs=5, warmup_epochs=1), 10, sizes={'train': 1024, 'test': 256}),
    # no augmentation: a one-pixel shift of an 8x8 digit moves every 2x2 patch, and the
    # softmax ViT, which has to learn where its patches are, then trains ~3x slower
    'digits': Data(dict(LIGHT, img_size=8, patch_size=2, epochs=30, batch_size=32, lr=5e-4,
                        warmup_epochs=2, augment='none'), 10,
                   stats=((0.305,) * 3, (0.376,) * 3), hflip=False),
}
# Detection (ViTDet's recipe: AdamW, lr 1e-4, wd 0.1, 1024 px; no augmentation here). `classes`
# counts the background: COCO's category ids 1..90 are the labels, so 91.
DETECTION = dict(PAPER, img_size=1024, epochs=12, batch_size=4, lr=1e-4, min_lr=0.0, warmup_epochs=0.25,
                 warmup_lr=1e-7, weight_decay=0.1, opt_eps=1e-8, smoothing=0.0, augment='none', mixup=0.0,
                 cutmix=0.0, ema=0.0, workers=4)
DATASETS |= {
    'coco': Data(DETECTION),
    'shapes': Data(dict(DETECTION, img_size=128, epochs=1, lr=1e-3, warmup_epochs=0.1, weight_decay=0.05, workers=0),
                   4, sizes={'train': 1000, 'test': 100}),
}
ARCH_FLAGS = ('patch_size', 'embed_dim', 'depth', 'num_heads', 'window_size', 'drop_path_rate')


class Fatal(Exception):
    """An error the user can fix; main() prints its one line and exits with `code`."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


# Command line ---------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the whole usage block
        raise Fatal(f"{message} (see --help)", code=2)


def ints(text):
    """'12' -> 12; '2,2,6,2' -> (2, 2, 6, 2), for Swin's per-stage depths and heads."""
    try:
        values = tuple(int(t) for t in text.split(','))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: an integer or a comma-separated list") from None
    return values[0] if len(values) == 1 else values


def rank_value(text):
    if text == 'full':
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"invalid rank {text!r}: a positive integer r or 'full'")
    return int(text)


def parse_args(argv=None):
    p = Parser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group('model')
    g.add_argument('--model', default='vit_tiny', choices=models.list_models())
    g.add_argument('--attn', default='fourier', choices=karat.ATTENTIONS, help="'softmax' or a KArAt basis")
    g.add_argument('--mode', default='blockwise', choices=karat.MODES)
    g.add_argument('--grid', type=int, default=3, help='G, basis functions per unit')
    g.add_argument('--rank', type=rank_value, default=12, help="r of the low-rank operator, or 'full' (N x N units)")
    g.add_argument('--base', default='zero', choices=list(karat.BASE_ACTIVATIONS))
    g.add_argument('--order', default='W_phi', choices=karat.ORDERS)
    g.add_argument('--simplex', action='store_true', help='project activated rows onto the simplex (ablation)')
    g.add_argument('--naive', action='store_true', help='the materialised paper-style formula (efficient=False)')
    g.add_argument('--img-size', type=int)
    for flag in ('--patch-size', '--embed-dim', '--window-size'):
        g.add_argument(flag, type=int, help="the model's own default if omitted")
    for flag in ('--depth', '--num-heads'):
        g.add_argument(flag, type=ints, help="the model's own default if omitted; Swin: one per stage, 2,2,6,2")
    g.add_argument('--drop-path', dest='drop_path_rate', type=float)
    g = p.add_argument_group('data')
    g.add_argument('--dataset', default='digits', choices=list(DATASETS))
    g.add_argument('--data-path', default='data', help="torchvision's root, or a folder with train/ and val/")
    g.add_argument('--download', action='store_true')
    g.add_argument('--limit', type=int, help='train and test on at most this many images of each split')
    g.add_argument('--workers', type=int)
    g = p.add_argument_group('recipe (defaults: the dataset\'s recipe)')
    for flag, kind, what in (
            ('--epochs', int, ''), ('--batch-size', int, 'per process'),
            ('--lr', float, 'peak learning rate; default base-lr x total batch / 512'), ('--base-lr', float, ''),
            ('--min-lr', float, 'end of the cosine'), ('--warmup-epochs', float, ''),
            ('--warmup-lr', float, 'start of the linear warmup'), ('--weight-decay', float, 'AdamW'),
            ('--opt-eps', float, 'AdamW'), ('--clip-grad', float, 'gradient norm; 0 = off'),
            ('--smoothing', float, 'label smoothing'), ('--mixup', float, 'Mixup alpha; 0 = off'),
            ('--cutmix', float, 'CutMix alpha; 0 = off'), ('--ema', float, 'EMA decay per step; 0 = off')):
        g.add_argument(flag, type=kind, help=what or None)
    g.add_argument('--augment', choices=('paper', 'light', 'none'),
                   help='paper: RandomResizedCrop, flip, RandAugment, jitter; light: pad-and-crop, flip')
    g = p.add_argument_group('run')
    g.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    g.add_argument('--amp', action='store_true', help='bfloat16 autocast')
    g.add_argument('--compile', action='store_true', help='torch.compile the model')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--output-dir', help='default: runs/<model>_<attn>_<dataset>, or the --resume checkpoint\'s folder')
    g.add_argument('--resume', metavar='PATH', help='continue exactly from a checkpoint')
    g.add_argument('--finetune', metavar='PATH',
                   help="start from a train.py, timm or torchvision checkpoint's weights, new head")
    g.add_argument('--keep-head', action='store_true',
                   help="with --finetune: keep the checkpoint's classifier head (same classes)")
    g.add_argument('--eval-only', action='store_true', help='evaluate the --resume checkpoint and exit')
    g.add_argument('--benchmark', action='store_true', help='time train steps on synthetic batches, print one JSON line')
    g.add_argument('--bench-steps', type=int, default=20)
    g.add_argument('--compare', action='store_true',
                   help='with --benchmark: also softmax and the naive formula, steps interleaved, one line each')
    args = p.parse_args(argv)
    for key, value in DATASETS[args.dataset].recipe.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if is_detection(args) != args.model.startswith('vitdet'):
        p.error(f"the vitdet_* models train on the detection datasets {', '.join(DETECTION_DATASETS)} and only there; "
                f"got --model {args.model} with --dataset {args.dataset}")
    if args.eval_only and not args.resume:
        p.error('--eval-only evaluates the checkpoint given by --resume PATH')
    if args.keep_head and (not args.finetune or args.model.startswith('vitdet')):
        p.error("--keep-head keeps a classifier's head from the --finetune PATH checkpoint")
    if args.resume and args.finetune:
        p.error('--resume continues a run, --finetune starts a new one: give one of them')
    if args.lr is None:  # the paper's linear scaling with the total batch over all processes
        args.lr = args.base_lr * args.batch_size * int(os.environ.get('WORLD_SIZE', 1)) / 512
    return args


# Data -----------------------------------------------------------------------------------------

def transform(data, args, img_size, train):
    """uint8 image (PIL or tensor) -> normalised float tensor (3, img_size, img_size)."""
    recipe = args.augment if train else 'none'
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
    return v2.Compose([v2.ToImage(), *steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(*data.stats)])


class InMemory(Dataset):
    """uint8 images (n, 3, h, w) and labels held as tensors."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(tv_tensors.Image(self.images[i])), int(self.labels[i])


def digits(train, transform):
    """scikit-learn's 1,797 8x8 digits (values 0..16), gray replicated to 3 channels so that
    every checkpoint has the same patch embedding; a fixed stratified split, 1437 / 360."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    split = train_test_split(range(len(d.target)), test_size=360, stratify=d.target, random_state=0)
    idx = split[0 if train else 1]
    images = (torch.tensor(d.images[idx]) * (255 / 16)).round().to(torch.uint8)
    return InMemory(images[:, None].expand(-1, 3, -1, -1), torch.tensor(d.target[idx]), transform)


def torchvision_split(name, root, train, download, transform):
    if name in ('cifar10', 'cifar100'):
        cls = tvd.CIFAR10 if name == 'cifar10' else tvd.CIFAR100
        return cls(root, train=train, download=download, transform=transform)
    cls = {'svhn': tvd.SVHN, 'stl10': tvd.STL10, 'flowers102': tvd.Flowers102}[name]
    return cls(root, split='train' if train else 'test', download=download, transform=transform)


def image_folder(root, train, transform):
    path = Path(root) / ('train' if train else 'val')
    if not path.is_dir():
        raise Fatal(f"no folder {path}: --data-path must hold train/ and val/ trees of class folders")
    return tvd.ImageFolder(path, transform=transform)


def build_datasets(args, img_size):
    """(train, test, number of classes); a missing dataset is one clear line."""
    name, data = args.dataset, DATASETS[args.dataset]
    def split(train):
        t = transform(data, args, img_size, train)
        if name == 'digits':
            return digits(train, t)
        if name == 'fake':
            n = data.sizes['train' if train else 'test']
            return tvd.FakeData(n, (3, img_size, img_size), data.classes, t, random_offset=0 if train else 10 ** 6)
        if name in ('imagenet', 'folder'):
            return image_folder(args.data_path, train, t)
        try:
            return torchvision_split(name, args.data_path, train, args.download, t)
        except (RuntimeError, OSError) as e:
            hint = "download failed" if args.download else "pass --download to fetch it"
            raise Fatal(f"{name} not found under {args.data_path!r} ({hint}): {e}") from None
    train_set, test_set = split(True), split(False)
    classes = data.classes or len(train_set.classes)
    if data.classes is None and train_set.classes != test_set.classes:
        raise Fatal(f"train/ and val/ under {args.data_path} hold different class folders")
    if args.limit:
        pick = lambda ds: Subset(ds, torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:args.limit].tolist())
        train_set, test_set = pick(train_set), pick(test_set)
    return train_set, test_set, classes


def loaders(train_set, test_set, args, rank, world):
    """Shuffling is a function of (seed, epoch) through the sampler; test images are split
    between ranks without padding, so that the reduced counts are exact."""
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    kw = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=args.device.startswith('cuda'))
    return (DataLoader(train_set, sampler=sampler, **kw),
            DataLoader(test_set, sampler=range(rank, len(test_set), world), **kw))


# Models and checkpoints -------------------------------------------------------------------------

def model_config(args, num_classes):
    """create_model's arguments; KArAt options only for KArAt, architecture overrides only if set."""
    cfg = dict(name=args.model, attn=args.attn, num_classes=num_classes, img_size=args.img_size)
    if args.attn != 'softmax':
        cfg.update(mode=args.mode, grid=args.grid, rank=args.rank, base=args.base, order=args.order,
                   simplex=args.simplex, efficient=not args.naive)
    cfg.update({k: getattr(args, k) for k in ARCH_FLAGS if getattr(args, k) is not None})
    return cfg


def build_model(config):
    cfg = dict(config)
    try:
        return models.create_model(cfg.pop('name'), **cfg)
    except (ValueError, TypeError) as e:
        raise Fatal(f"cannot build the model: {e}", code=2) from None


def restore_or_build(args, ckpt, classes, mismatch):
    """The checkpoint's model with its weights, or a new one from the flags (seeded); a
    checkpoint with another number of classes is refused with mismatch(its classes)."""
    torch.manual_seed(args.seed)
    config = ckpt['config'] if ckpt else model_config(args, classes)
    if config['num_classes'] != classes:
        raise Fatal(mismatch(config['num_classes']))
    model = build_model(config)
    if ckpt:
        load_weights(model, ckpt['model'], args.resume, config)
    return model


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
        lines = [l for l in str(e).splitlines() if l.strip() and not l.startswith(('Weights only', 'Please file', 'Check the'))]
        raise Fatal(f"cannot load checkpoint {path}: {(lines or [type(e).__name__])[0]}") from None


def load_checkpoint(path):
    """A train.py checkpoint: the model's weights and config, and the run's state."""
    ckpt = read_checkpoint(path)
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get('model'), dict) and isinstance(ckpt.get('config'), dict)):
        raise Fatal(f"{path} is not a train.py checkpoint (no model weights and config)")
    return ckpt


def describe(config):
    return '/'.join(str(config.get(k)) for k in ('name', 'attn', 'img_size'))


def load_weights(model, state, path, config):
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise Fatal(f"{path} holds another architecture than its config {describe(config)}: {detail}") from None


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


# Optimisation -----------------------------------------------------------------------------------

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
    groups = [dict(params=decay, weight_decay=args.weight_decay), dict(params=rest, weight_decay=0.0)]
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


# Train and evaluate -----------------------------------------------------------------------------

@dataclass
class Run:
    """What the loops share: the model three ways, the optimiser and the distributed setting."""
    args: argparse.Namespace
    raw: torch.nn.Module      # what is saved: no DDP `module.`, no compile `_orig_mod.`
    fast: torch.nn.Module     # raw, compiled or not: evaluation
    train: torch.nn.Module    # fast, wrapped in DDP when distributed
    optimizer: torch.optim.Optimizer
    ema: EMA
    mix: v2.Transform
    rank: int = 0
    world: int = 1
    step: int = 0

    def autocast(self):
        return torch.autocast(self.args.device.split(':')[0], dtype=torch.bfloat16, enabled=self.args.amp)

    def all_sum(self, t):
        if self.world > 1:
            dist.all_reduce(t)
        return t


class NonFinite(Exception):
    """A NaN or infinite loss or gradient, caught before the optimiser step."""


def train_one_epoch(run, loader, epoch):
    args, device = run.args, torch.device(run.args.device)
    run.train.train()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, images
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=run.rank != 0 or None)
    for images, labels in bar:
        lr = learning_rate(run.step, args, len(loader))
        for group in run.optimizer.param_groups:
            group['lr'] = lr
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if run.mix is not None:
            images, labels = run.mix(images, labels)
        with run.autocast():
            loss = F.cross_entropy(run.train(images).float(), labels, label_smoothing=args.smoothing)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # the norm is taken over all-reduced gradients, so every rank stops at the same step
        norm = torch.nn.utils.clip_grad_norm_(run.raw.parameters(), args.clip_grad or math.inf)
        if not torch.isfinite(norm):
            raise NonFinite(f"non-finite loss or gradient at step {run.step + 1} (epoch {epoch + 1}, loss {loss.item():.4g})")
        run.optimizer.step()
        if run.ema:
            run.ema.update(run.raw)
        run.step += 1
        total += torch.stack([loss.detach().double() * len(images), total.new_tensor(len(images))])
        if run.step % 10 == 0 and not bar.disable:
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
    loss_sum, n = run.all_sum(total).tolist()
    return dict(train_loss=loss_sum / n, lr=lr)


@torch.no_grad()
def evaluate(run, model, loader, prefix='test'):
    """Loss, top-1 and top-5 accuracy (percent) over the whole test set, summed over ranks."""
    device = torch.device(run.args.device)
    model.eval()
    total = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, images
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with run.autocast():
            logits = model(images).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        counts = (F.cross_entropy(logits, labels, reduction='sum'), top[:, 0].sum(), top.any(1).sum(), len(labels))
        total += torch.stack([total.new_tensor(c) if isinstance(c, int) else c.double() for c in counts])
    loss, top1, top5, n = run.all_sum(total).tolist()
    return {f'{prefix}_loss': loss / n, f'{prefix}_acc1': 100 * top1 / n, f'{prefix}_acc5': 100 * top5 / n}


def checkpoint(run, epoch, best, history):
    return dict(model=run.raw.state_dict(), config=run.raw.config, optimizer=run.optimizer.state_dict(),
                ema=run.ema.model.state_dict() if run.ema else None, epoch=epoch, step=run.step,
                best_acc1=best, history=history, args=vars(run.args))


def fit(run, train_loader, test_loader, out, start_epoch, best, history):
    args, main = run.args, run.rank == 0
    for epoch in range(start_epoch, args.epochs):
        seed_epoch(args.seed, epoch, run.rank)
        train_loader.sampler.set_epoch(epoch)
        tic = time.time()
        try:
            stats = train_one_epoch(run, train_loader, epoch)
        except NonFinite as e:
            kept = f"{out / 'last.pt'} (epoch {epoch}) is intact" if epoch else "no checkpoint was written"
            raise Fatal(f"{e}; stopping, {kept}") from None
        stats |= evaluate(run, run.fast, test_loader)
        if run.ema:
            stats |= evaluate(run, run.ema.model, test_loader, prefix='ema_test')
        row = dict(epoch=epoch + 1, **stats, epoch_time=time.time() - tic)
        history.append(row)
        if not main:
            continue
        improved = row['test_acc1'] > best
        best = max(best, row['test_acc1'])
        state = checkpoint(run, epoch + 1, best, history)
        save_atomic(state, out / 'last.pt')
        if improved:
            save_atomic(state, out / 'best.pt')
        with open(out / 'log.jsonl', 'a') as f:
            f.write(json.dumps(row) + '\n')
        print(f"epoch {epoch + 1}/{args.epochs}  train_loss {row['train_loss']:.4f}  test_loss {row['test_loss']:.4f}  "
              f"acc1 {row['test_acc1']:.2f}%  acc5 {row['test_acc5']:.2f}%  lr {row['lr']:.2e}  "
              f"{row['epoch_time']:.1f}s" + (f"  ema acc1 {row['ema_test_acc1']:.2f}%" if run.ema else ''), flush=True)
    if main:
        print(f"best test top-1 {best:.2f}%; checkpoints and log.jsonl in {out}")


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


def train(args):
    rank, world = setup_distributed(args)
    ckpt = load_checkpoint(args.resume) if args.resume else None
    img_size = ckpt['config']['img_size'] if ckpt else args.img_size
    if rank == 0:  # rank 0 downloads while the others wait, then they read what it fetched
        train_set, test_set, classes = build_datasets(args, img_size)
    if world > 1:
        dist.barrier()
        if rank > 0:
            train_set, test_set, classes = build_datasets(args, img_size)
    raw = restore_or_build(args, ckpt, classes,
                           lambda n: f"{args.resume} has {n} classes, {args.dataset} has {classes}: use --finetune")
    if args.finetune and not ckpt:
        finetune_from(raw, args.finetune, args.keep_head)
    raw.to(args.device)
    fast = torch.compile(raw) if args.compile else raw
    wrapped = DistributedDataParallel(fast) if world > 1 else fast
    run = Run(args, raw, fast, wrapped, optimizer_for(raw, args), EMA(raw, args.ema) if args.ema else None,
              mixer(args, classes), rank, world)
    train_loader, test_loader = loaders(train_set, test_set, args, rank, world)

    if args.eval_only:
        stats = evaluate(run, run.fast, test_loader)
        if ckpt.get('ema') is not None:
            ema = EMA(raw, 0.0)
            load_weights(ema.model, ckpt['ema'], args.resume, raw.config)
            stats |= evaluate(run, ema.model, test_loader, prefix='ema_test')
        if rank == 0:
            print(json.dumps(dict(checkpoint=args.resume, dataset=args.dataset, **stats)))
        return

    out = Path(args.output_dir or (Path(args.resume).parent if args.resume else
                                   Path('runs') / f"{args.model}_{args.attn}_{args.dataset}"))
    start_epoch, best, history = 0, -1.0, []
    if ckpt:
        try:
            run.optimizer.load_state_dict(ckpt['optimizer'])
            if run.ema:
                run.ema.model.load_state_dict(ckpt['ema'])
        except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
            raise Fatal(f"{args.resume} cannot be resumed with these options ({str(e).splitlines()[0]})") from None
        start_epoch, run.step, best, history = ckpt['epoch'], ckpt['step'], ckpt['best_acc1'], list(ckpt['history'])
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / 'args.json').write_text(json.dumps(dict(vars(args), world_size=world), indent=2) + '\n')
        # the log is rewritten from the checkpoint, so a kill between checkpoint and log loses nothing
        (out / 'log.jsonl').write_text(''.join(json.dumps(row) + '\n' for row in history))
        n_params = sum(p.numel() for p in raw.parameters())
        print(f"{describe(raw.config)}: {n_params:,} parameters; {args.dataset}: {len(train_set)} train / "
              f"{len(test_set)} test images, {classes} classes; {world} process(es) on {args.device}", flush=True)
    fit(run, train_loader, test_loader, out, start_epoch, best, history)


# Detection (ViTDet + Mask R-CNN) ------------------------------------------------------------
# A separate mode for the vitdet_* models: its own data (COCO-format folders, synthetic shapes),
# batches of (images, targets) lists, a loss dict instead of a cross-entropy, and COCO box and
# mask AP instead of top-1.

class Shapes(Dataset):
    """Offline synthetic instance segmentation: 1..max_shapes rectangles, ellipses and triangles
    of random colours and sizes on a noise background, not overlapping (so every mask is the
    whole shape). Item i is always the same image (seeded by seed and i): (image (3, S, S) in
    [0, 1], target {boxes (k, 4) xyxy, labels (k,) in 1..3, masks (k, S, S) uint8, image_id}),
    each box the bounding box of its mask, pixel edges included (x2 = last column + 1)."""
    CLASSES = ('background', 'rectangle', 'ellipse', 'triangle')

    def __init__(self, size, img_size=128, max_shapes=3, seed=0):
        self.size, self.img_size, self.max_shapes, self.seed = size, img_size, max_shapes, seed

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        if not 0 <= i < self.size:
            raise IndexError(f"item {i} of a dataset of {self.size}")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        rand = lambda *shape: torch.rand(*shape, generator=g)
        S = self.img_size
        image = 0.5 * rand(3, 1, 1) + 0.25 * rand(3, S, S)
        y, x = torch.meshgrid(torch.arange(S) + 0.5, torch.arange(S) + 0.5, indexing='ij')
        masks, labels = [], []
        for _ in range(int(rand(1) * self.max_shapes) + 1):
            for _ in range(20):  # a few tries to place the shape apart from the others
                label, mask = shape_mask(x, y, S, rand)
                if not any((mask & m).any() for m in dilate(masks)):
                    break
            else:
                continue
            image = torch.where(mask, 0.35 + 0.65 * rand(3, 1, 1), image)
            masks.append(mask)
            labels.append(label)
        masks = torch.stack(masks).to(torch.uint8)
        return image, dict(boxes=mask_boxes(masks), labels=torch.tensor(labels), masks=masks, image_id=i)


def shape_mask(x, y, S, rand):
    """A random shape on the pixel centres (x, y) of an S x S image: (label, bool mask)."""
    label = int(rand(1) * 3) + 1
    w, h = (S * (0.12 + 0.22 * rand(2))).tolist()
    cx, cy = (w / 2 + (S - w) * rand(1)).item(), (h / 2 + (S - h) * rand(1)).item()
    u, v = (x - cx) / (w / 2), (y - cy) / (h / 2)  # the shape's box is [-1, 1]²
    if label == 1:
        return label, (u.abs() <= 1) & (v.abs() <= 1)
    if label == 2:
        return label, u ** 2 + v ** 2 <= 1
    v = v if rand(1) < 0.5 else -v  # apex up or down
    return label, (v.abs() <= 1) & (u.abs() <= (v + 1) / 2)


def dilate(masks, pixels=2):
    return [torch.nn.functional.max_pool2d(m[None].float(), 2 * pixels + 1, 1, pixels)[0].bool() for m in masks]


def mask_boxes(masks):
    """Bounding boxes (k, 4) xyxy of masks (k, H, W), pixel edges included."""
    boxes = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes.append(torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]))
    return torch.stack(boxes).float() if boxes else torch.zeros(0, 4)


class CocoInstances(Dataset):
    """torchvision's CocoDetection as Mask R-CNN wants it: (image (3, H, W) in [0, 1], target
    {boxes xyxy, labels = category ids, masks (k, H, W) uint8, image_id}). Crowd regions and
    boxes under a pixel wide are dropped from the targets, as torchvision's references do; the
    evaluation scores against the full annotation file (`.coco`), crowds included."""

    def __init__(self, images, annotations):
        self.data = tvd.CocoDetection(str(images), str(annotations))
        self.coco = self.data.coco

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        image, anns = self.data[i]
        anns = [a for a in anns if not a.get('iscrowd', 0) and a['bbox'][2] >= 1 and a['bbox'][3] >= 1]
        w, h = image.size
        boxes = torch.tensor([a['bbox'] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        masks = [torch.from_numpy(self.coco.annToMask(a)) for a in anns]
        return v2.functional.to_dtype(v2.functional.to_image(image), torch.float32, scale=True), dict(
            boxes=boxes.clamp(min=0).minimum(torch.tensor([w, h, w, h])), labels=torch.tensor([a['category_id'] for a in anns]),
            masks=torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.uint8), image_id=self.data.ids[i])


DETECTION_DATASETS = ('coco', 'shapes')


def is_detection(args):
    return args.dataset in DETECTION_DATASETS


def coco_split(root, split):
    """COCO's layout: <root>/{train,val}2017/ images, <root>/annotations/instances_{split}2017.json."""
    images, annotations = Path(root) / f'{split}2017', Path(root) / 'annotations' / f'instances_{split}2017.json'
    if not (images.is_dir() and annotations.is_file()):
        raise Fatal(f"no COCO {split} split under {root!r}: --data-path must hold {split}2017/ and "
                    f"annotations/instances_{split}2017.json")
    return CocoInstances(images, annotations)


def detection_datasets(args):
    """(train, test, classes with the background, category names by label)."""
    if args.dataset == 'shapes':
        sizes = DATASETS['shapes'].sizes
        train_set, test_set = (Shapes(sizes[k], args.img_size, seed=seed) for k, seed in (('train', 0), ('test', 1)))
        names = list(Shapes.CLASSES)
    else:
        train_set, test_set = coco_split(args.data_path, 'train'), coco_split(args.data_path, 'val')
        categories = test_set.coco.loadCats(test_set.coco.getCatIds())
        names = ['background'] + [''] * max(c['id'] for c in categories)
        for c in categories:
            names[c['id']] = c['name']
    if args.limit:
        train_set, test_set = Subset(train_set, range(min(args.limit, len(train_set)))), \
            Subset(test_set, range(min(args.limit, len(test_set))))
    return train_set, test_set, len(names), names


def collate_detection(batch):
    return tuple(zip(*batch))


def detection_step(model, optimizer, images, targets, clip_grad=1.0, device='cpu'):
    """One training step on lists of images and targets: the loss dict as floats, with 'loss'."""
    model.train()
    to = lambda v: v.to(device) if torch.is_tensor(v) else v
    losses = model([im.to(device) for im in images], [{k: to(v) for k, v in t.items()} for t in targets])
    loss = sum(losses.values())
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite detection loss: {({k: v.item() for k, v in losses.items()})}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad or math.inf)
    optimizer.step()
    return dict({k: v.item() for k, v in losses.items()}, loss=loss.item())


# COCO evaluation: pycocotools is the reference implementation every detection paper reports.

def coco_ground_truth(dataset, categories):
    """A pycocotools COCO index of a dataset's targets (for data without a COCO file)."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    images, annotations = [], []
    for i in range(len(dataset)):
        target = dataset[i][1]
        h, w = target['masks'].shape[-2:]
        images.append(dict(id=target['image_id'], height=h, width=w))
        for box, label, rle in zip(target['boxes'].tolist(), target['labels'].tolist(), encode_masks(target['masks'])):
            annotations.append(dict(id=len(annotations) + 1, image_id=target['image_id'], category_id=label,
                                    bbox=[box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                    area=float(mask_utils.area(rle)), iscrowd=0, segmentation=rle))
    coco = COCO()
    coco.dataset = dict(images=images, annotations=annotations,
                        categories=[dict(id=i, name=n) for i, n in enumerate(categories) if i])
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def encode_masks(masks):
    """Run-length encodings of binary masks (k, H, W), as COCO stores them."""
    from pycocotools import mask as mask_utils
    return mask_utils.encode(np.asfortranarray(masks.to(torch.uint8).permute(1, 2, 0).numpy()))


@torch.no_grad()
def evaluate_detection(model, loader, coco_gt, device='cpu'):
    """COCO box and mask AP (IoU 0.5:0.95, and at 0.5) in percent, from pycocotools."""
    from pycocotools.cocoeval import COCOeval
    model.eval()
    results, image_ids = {'bbox': [], 'segm': []}, []
    for images, targets in loader:
        outputs = model([im.to(device) for im in images])
        for target, out in zip(targets, outputs):
            image_ids.append(int(target['image_id']))
            boxes = out['boxes'].cpu()
            rles = encode_masks(out['masks'][:, 0].cpu() > 0.5) if len(boxes) else []
            for box, label, score, rle in zip(boxes.tolist(), out['labels'].tolist(), out['scores'].tolist(), rles):
                found = dict(image_id=image_ids[-1], category_id=label, score=score)
                results['bbox'].append(dict(found, bbox=[box[0], box[1], box[2] - box[0], box[3] - box[1]]))
                results['segm'].append(dict(found, segmentation=rle))
    metrics = {}
    for kind, iou_type in (('box', 'bbox'), ('mask', 'segm')):
        stats = [0.0, 0.0]
        if results[iou_type]:
            with contextlib.redirect_stdout(io.StringIO()):
                ev = COCOeval(coco_gt, coco_gt.loadRes(results[iou_type]), iou_type)
                ev.params.imgIds = image_ids
                ev.evaluate()
                ev.accumulate()
                ev.summarize()
            stats = [max(s, 0.0) for s in ev.stats[:2]]  # -1: no ground truth to score
        metrics.update({f'{kind}_ap': 100 * float(stats[0]), f'{kind}_ap50': 100 * float(stats[1])})
    return metrics



def ground_truth(dataset, names):
    """The COCO index to score against: the annotation file if there is one, else the targets."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    return base.coco if hasattr(base, 'coco') else coco_ground_truth(dataset, names)


def train_detection(args):
    """The detection mode of train.py: train a vitdet_* model (its backbone optionally from a
    classifier checkpoint, --finetune), evaluate box and mask AP after every epoch, keep
    last.pt and best.pt (by box AP) and log.jsonl; --eval-only --resume PATH evaluates."""
    if 'RANK' in os.environ:
        raise Fatal("the detection mode runs in one process: start it with python, not torchrun")
    device = torch.device(args.device)
    ckpt = load_checkpoint(args.resume) if args.resume else None
    if ckpt:
        args.img_size = ckpt['config']['img_size']
    train_set, test_set, classes, names = detection_datasets(args)
    model = restore_or_build(args, ckpt, classes,
                             lambda n: f"{args.resume} detects {n - 1} classes, {args.dataset} has {classes - 1}")
    if args.finetune and not ckpt:
        try:
            report = models.load_backbone(model, read_checkpoint(args.finetune))
        except ValueError as e:
            raise Fatal(f"cannot initialise the backbone from {args.finetune}: {e}") from None
        print(f"backbone from {args.finetune}; left at init: {', '.join(report['missing']) or 'nothing'}", flush=True)
    model.to(device)
    sampler = DistributedSampler(train_set, num_replicas=1, rank=0, shuffle=True, seed=args.seed)
    kw = dict(batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_detection)
    train_loader, test_loader = DataLoader(train_set, sampler=sampler, **kw), DataLoader(test_set, **kw)
    gt = ground_truth(test_set, names)
    if args.eval_only:
        print(json.dumps(dict(checkpoint=args.resume, dataset=args.dataset, **evaluate_detection(model, test_loader, gt, device))))
        return
    optimizer = optimizer_for(model, args)
    out = Path(args.output_dir or (Path(args.resume).parent if args.resume else
                                   Path('runs') / f"{args.model}_{args.attn}_{args.dataset}"))
    start_epoch, step, best, history = 0, 0, -1.0, []
    if ckpt:
        optimizer.load_state_dict(ckpt['optimizer'])
        start_epoch, step, best, history = ckpt['epoch'], ckpt['step'], ckpt['best_box_ap'], list(ckpt['history'])
    out.mkdir(parents=True, exist_ok=True)
    (out / 'args.json').write_text(json.dumps(vars(args), indent=2) + '\n')
    (out / 'log.jsonl').write_text(''.join(json.dumps(row) + '\n' for row in history))
    print(f"{describe(model.config)}: {sum(p.numel() for p in model.parameters()):,} parameters; {args.dataset}: "
          f"{len(train_set)} train / {len(test_set)} test images, {classes - 1} classes + background", flush=True)
    for epoch in range(start_epoch, args.epochs):
        seed_epoch(args.seed, epoch, 0)
        sampler.set_epoch(epoch)
        tic, losses = time.time(), []
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, disable=None)  # None: terminals only
        for images, targets in bar:
            lr = learning_rate(step, args, len(train_loader))
            for group in optimizer.param_groups:
                group['lr'] = lr
            try:
                losses.append(detection_step(model, optimizer, images, targets, args.clip_grad, device))
            except FloatingPointError as e:
                kept = f"{out / 'last.pt'} (epoch {epoch}) is intact" if epoch else "no checkpoint was written"
                raise Fatal(f"{e} at step {step + 1}; stopping, {kept}") from None
            step += 1
            bar.set_postfix(loss=f"{losses[-1]['loss']:.3f}")
        row = dict(epoch=epoch + 1, **{('train_' + k if k == 'loss' else k): sum(l[k] for l in losses) / len(losses)
                                       for k in losses[0]},
                   **evaluate_detection(model, test_loader, gt, device), lr=lr, epoch_time=time.time() - tic)
        history.append(row)
        improved, best = row['box_ap'] > best, max(best, row['box_ap'])
        state = dict(model=model.state_dict(), config=model.config, optimizer=optimizer.state_dict(), epoch=epoch + 1,
                     step=step, best_box_ap=best, history=history, args=vars(args))
        save_atomic(state, out / 'last.pt')
        if improved:
            save_atomic(state, out / 'best.pt')
        with open(out / 'log.jsonl', 'a') as f:
            f.write(json.dumps(row) + '\n')
        print(f"epoch {epoch + 1}/{args.epochs}  train_loss {row['train_loss']:.4f}  box AP {row['box_ap']:.2f}  "
              f"(AP50 {row['box_ap50']:.2f})  mask AP {row['mask_ap']:.2f} (AP50 {row['mask_ap50']:.2f})  "
              f"lr {lr:.2e}  {row['epoch_time']:.1f}s", flush=True)
    print(f"best box AP {best:.2f}; checkpoints and log.jsonl in {out}")

# Benchmark --------------------------------------------------------------------------------------

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


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


def train_step(model, optimizer, images, labels, amp, cuda):
    """One train step on a fixed batch, as a closure for the benchmark to call."""
    def step():
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(images).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
    return step


def benchmark(args):
    """Peak memory and median time of a train step (forward, backward, AdamW) on random images.

    With --compare, softmax and the naive formula run beside the model in the same process:
    each is built and its memory measured in turn, then their timed steps are interleaved, so
    that a machine whose speed drifts slows all of them alike. Peak memory counts weights,
    gradients, optimiser state and activations: the growth from just before the model was
    built to the peak of two steps (GPU: torch.cuda.max_memory_allocated; CPU: the resident
    set's high-water mark, VmHWM, reset through /proc/self/clear_refs). On a CPU glibc first
    serves every block of 64 KiB or more with a mapping of its own, so that a freed tensor
    leaves the resident set at once (by default freed blocks stay in the heap, and the peak
    would measure fragmentation); for the timed steps the threshold goes to 32 MiB, glibc's own
    steady state."""
    if args.compare and args.attn == 'softmax':
        raise Fatal("--compare sets KArAt (--attn, a basis) beside softmax; got --attn softmax")
    device, cuda = torch.device(args.device), args.device.startswith('cuda')
    measured = cuda or Path('/proc/self/clear_refs').exists()  # CPU memory is read from Linux's /proc
    libc = None if cuda or not measured else ctypes.CDLL('libc.so.6')
    if libc:
        libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    variants = [('softmax', False), (args.attn, False), (args.attn, True)] if args.compare else [(args.attn, args.naive)]
    classes = DATASETS[args.dataset].classes or 1000
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, classes, (args.batch_size,), device=device)

    def build_and_measure(attn, naive):
        before = memory_now(cuda, device) if measured else None
        torch.manual_seed(args.seed)
        model = build_model(model_config(argparse.Namespace(**vars(args) | dict(attn=attn, naive=naive)), classes))
        model = model.to(device)
        step = train_step(torch.compile(model) if args.compile else model, optimizer_for(model, args),
                          images, labels, args.amp, cuda)
        for _ in range(3):
            step()
        if measured:
            reset_peak_memory(cuda, device)
        for _ in range(2):
            step()
        return dict(attn=attn, naive=naive, step=step, patch_size=model.config.get('patch_size'),
                    peak=peak_memory(cuda, device) - before if measured else None, times=[])

    build_and_measure(*variants[0])  # discarded: it pays the one-time costs (thread pools, workspaces)
    runs = [build_and_measure(*v) for v in variants]
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
        print(json.dumps(dict(model=args.model, attn=run['attn'], naive=run['naive'], device=name,
                              batch=args.batch_size, img_size=args.img_size, patch_size=run['patch_size'],
                              amp=args.amp, compile=args.compile,
                              img_per_s=round(args.batch_size * len(run['times']) / sum(run['times']), 2),
                              step_ms=round(1000 * statistics.median(run['times']), 2),
                              peak_mem_mb=None if run['peak'] is None else round(run['peak'], 1), steps=len(run['times']))))


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.benchmark:
            benchmark(args)
        elif is_detection(args):
            train_detection(args)
        else:
            train(args)
    except Fatal as e:
        prefix = f"[rank {os.environ['RANK']}] " if 'RANK' in os.environ else ''
        print(f"{prefix}train.py: error: {e}", file=sys.stderr)
        sys.exit(e.code)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    main()
