"""The datasets train.py knows: each one's facts and default recipe, and the classification
images themselves (detection.py holds detection's).

    train_set = digits(training=True, transform=lambda image: image.float())

Every dataset has a default recipe (`DATASETS`): the paper's for the paper's datasets, a light
one for `digits` and `fake`, ViTDet's for `coco` and `shapes`; any flag given on the command
line overrides its entry (`apply_recipe`). Classification data: torchvision's datasets, a
folder of class folders (ImageNet's layout), torchvision's FakeData, and scikit-learn's 8x8
digits, offline. A file that cannot be read stops the run with its path (`Fatal`).
"""
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import datasets as tvd
from torchvision import tv_tensors
from torchvision.transforms import v2

from cli import Fatal, architecture

# Datasets and their recipes -----------------------------------------------------------------------
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
    arch = architecture(args.model)[1]
    stages = args.depth or arch.get('depth')
    doublings = len(stages) - 1 if isinstance(stages, tuple) else 0
    return (args.embed_dim or arch['embed_dim']) * 2 ** doublings


def scaled_lr(lr, width, args):
    """A recipe's lr, tuned on a model `width` wide, for args.model: Adam moves every weight by
    about lr a step, so a logit q.k moves by about lr times the width, and KArAt's φ, unlike
    softmax, never saturates to stop it. Swin-T on digits at ViT-Tiny's 5e-4 fell from 93.6% to
    82.8% at the peak lr, its 768-wide logits at ~40; at 1e-4, 98.9% (docs/training.md)."""
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
    too_wide = grid < architecture(args.model)[1]['window_size']
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
    """A split of one of torchvision's datasets; any file it cannot read stops the run in one
    line naming where it looked."""
    try:
        if name in ('cifar10', 'cifar100'):
            cls = tvd.CIFAR10 if name == 'cifar10' else tvd.CIFAR100
            split = cls(root, train=training, download=download, transform=transform)
        else:
            cls = {'svhn': tvd.SVHN, 'stl10': tvd.STL10, 'flowers102': tvd.Flowers102}[name]
            split = cls(root, split='train' if training else 'test', download=download,
                        transform=transform)
    except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
        hint = "download failed" if download else "pass --download to fetch it"
        raise Fatal(f"{name} not found under {root!r} ({hint}): {e}") from None
    except Exception as e:  # a torn or foreign file: whatever its reader raised
        raise Fatal(f"cannot read {name} under {root!r}: {first_line(e)}") from None
    return ReadOrStop(split, f"{name} under {root!r}")


class ReadOrStop(Dataset):
    """A dataset whose item that cannot be read stops the run in one line, not a traceback."""

    def __init__(self, dataset, where):
        self.dataset, self.where = dataset, where

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return self.dataset[i]
        except Exception as e:
            raise Fatal(f"cannot read item {i} of {self.where}: {first_line(e)}") from None


def first_line(error):
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(': ')


def read_image(path):
    """ImageFolder's loader, except that an unreadable file (truncated, or no image at all) stops
    the run with its name, rather than being skipped, which would change the data unseen."""
    try:
        with Image.open(path) as image:
            return image.convert('RGB')
    except OSError as e:  # PIL's UnidentifiedImageError is an OSError
        raise Fatal(f"cannot read image {path} ({e}); remove or replace it") from None


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
        return torchvision_split(name, args.data_path, training, args.download, t)
    train_set, test_set = split(True), split(False)
    classes = data.classes or len(train_set.classes)
    if data.classes is None and train_set.classes != test_set.classes:
        raise Fatal(f"train/ and val/ under {args.data_path} hold different class folders")
    if args.limit:
        pick = lambda ds: Subset(ds, torch.randperm(
            len(ds), generator=torch.Generator().manual_seed(0))[:args.limit].tolist())
        train_set, test_set = pick(train_set), pick(test_set)
    return train_set, test_set, classes
