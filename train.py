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

Every dataset has a default recipe (data.py); any flag given on the command line overrides its
entry. Classification and detection run through one loop (`fit`); a `Task` says what a batch's
loss is, how a model is scored and which score picks best.pt (test top-1, box AP). Under
`torchrun` (the RANK variable is set) it runs DDP, gloo on CPU and nccl on GPU; rank 0 alone
prints, logs and saves. Checkpoints hold only tensors, numbers, strings and containers and are
read with torch.load(weights_only=True), so loading one never runs code.

The file reads top-down: main and train (set-up), the loop (fit, train_one_epoch, evaluate), the
command line, the tasks, optimisation, and the rules of checkpoints and resume.
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
        sys.stderr.write(f"{process_name()}: interrupted while starting; nothing was written\n")
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

import argparse  # noqa: E402  (after the handler, so that Ctrl-C while importing is one line)
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, fields  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import DataLoader, Dataset, DistributedSampler  # noqa: E402
from torchvision.transforms import v2  # noqa: E402
from tqdm import tqdm  # noqa: E402

import curves  # noqa: E402
import detection  # noqa: E402
import fast  # noqa: E402
import karat  # noqa: E402
import models  # noqa: E402
import weights  # noqa: E402
from cli import (ARCH_FLAGS, Fatal, Parser, attention_options, autocast, build_model,  # noqa: E402
                 default_device, device_name, kernel_refusal, last_line, model_arguments,
                 model_config, natural, non_negative, number, optimizer_for, positive,
                 reuse_freed_memory, say)
from data import (CLASSIFICATION_ONLY, DATASETS, apply_recipe,  # noqa: E402
                  classification_datasets)


def main(argv=None):
    prefix, previous, args = process_name(), catch_interrupts(), None
    try:
        args = parse_args(argv)
        train(args)
    except Fatal as e:
        say(f"{prefix}: error: {last_line(e)}")
        sys.exit(e.code)
    except KeyboardInterrupt:
        where = 'nothing was written' if args is None or args.eval_only else next_step(
            output_dir(args))
        say(f"{prefix}: interrupted; {where}")
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        signal.signal(signal.SIGINT, previous)


def train(args):
    """Set up the task, the model and the run (new, resumed or fine-tuned), then fit, or only
    evaluate with --eval-only."""
    rank, world = setup_distributed(args)
    ckpt = load_checkpoint(args.resume) if args.resume else None
    check_model_flags(args, ckpt, DATASETS[args.dataset].classes)
    out = output_dir(args)
    if ckpt and not args.eval_only and ckpt.get('epoch', 0) >= args.epochs:
        if rank == 0 and continues(out, args):  # a kill after the last checkpoint, before its log
            write_log(out, ckpt['history'])
        if rank == 0:
            print(f"{args.resume} has finished its {ckpt['epoch']} epochs: nothing left to run; "
                  f"--resume {args.resume} --epochs N, N > {ckpt['epoch']}, extends it",
                  flush=True)
        return
    if rank == 0 and not args.eval_only:
        check_output(out, args)
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
    compiled = torch.compile(raw) if args.compile else raw
    averaged = ckpt.get('ema') is not None if args.eval_only else args.ema > 0
    run = Run(args, task, raw, compiled,
              DistributedDataParallel(compiled) if world > 1 else compiled,
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
    if rank == 0:  # the run's first file: nothing is written before this point
        make_output(out, args)
        (out / 'args.json').write_text(
            json.dumps(dict(vars(args), world_size=world), indent=2) + '\n')
        # the log is rewritten from the checkpoint, so a kill between checkpoint and log
        # loses nothing
        write_log(out, history)
        n_params = sum(p.numel() for p in raw.parameters())
        print(f"{describe(raw.config)}: {n_params:,} parameters; "
              f"{args.dataset}: {len(task.train_set)} train / {len(task.test_set)} test images, "
              f"{task.classes} classes; {world} process(es) on {args.device}", flush=True)
    fit(run, train_loader, test_loader, out, start_epoch, best, history)


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


# The loop -------------------------------------------------------------------------------------

@dataclass
class Run:
    """What the loop shares: the task, the model three ways, the optimiser, the EMA and the rank."""
    args: argparse.Namespace
    task: 'Task'
    raw: torch.nn.Module       # what is saved: no DDP `module.`, no compile `_orig_mod.`
    compiled: torch.nn.Module  # raw, compiled or not: evaluation
    ddp: torch.nn.Module       # compiled, wrapped in DDP when distributed: training
    optimizer: torch.optim.Optimizer
    ema: 'EMA'
    rank: int = 0
    step: int = 0


def fit(run, train_loader, test_loader, out, start_epoch, best, history):
    args, metric, leader = run.args, run.task.metric, run.rank == 0
    for epoch in range(start_epoch, args.epochs):
        seed_epoch(args.seed, epoch, run.rank)
        train_loader.sampler.set_epoch(epoch)
        tic = time.time()
        try:
            stats = train_one_epoch(run, train_loader, epoch)
            row = dict(epoch=epoch + 1, **stats, **evaluate(run, test_loader),
                       epoch_time=time.time() - tic)
        except NonFinite as e:
            half = f" --lr {args.lr / 2:.3g}"
            raise Fatal(f"{e}; stopping. With half the peak lr, {next_step(out, half)}") from None
        except Fatal as e:  # a file that cannot be read, in the main process or a loader worker
            raise Fatal(f"{last_line(e)}, then {next_step(out)}", e.code) from None
        history.append(row)
        if not leader:
            continue
        # checkpoint, then log: a kill between the two loses nothing (train rewrites the log)
        improved, best = row[metric] > best, max(best, row[metric])
        state = checkpoint(run, epoch + 1, best, history)
        weights.save_atomic(state, out / 'last.pt')
        if improved:
            weights.save_atomic(state, out / 'best.pt')
        with open(out / 'log.jsonl', 'a') as f:
            f.write(json.dumps(row) + '\n')
        curves.plot([out], out / 'curves.png')
        scores = '  '.join(f"{k} {v:.4g}" for k, v in row.items()
                           if k not in ('epoch', 'lr', 'epoch_time'))
        print(f"epoch {epoch + 1}/{args.epochs}  {scores}  lr {row['lr']:.2e}  "
              f"{row['epoch_time']:.1f}s", flush=True)
    if leader:
        print(f"best {metric} {best:.2f}; checkpoints and log.jsonl in {out}")


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
        # the learning rate of this step, a pure function of it (so resume is exact)
        lr = learning_rate(run.step, args, len(loader))
        for group in run.optimizer.param_groups:
            group['lr'] = lr
        # forward and backward; gradients freed before the forward, so none is held at its peak
        run.optimizer.zero_grad(set_to_none=True)
        with autocast(args):
            loss, terms = run.task.loss(run.ddp, batch)
        loss.backward()
        # clip, over all-reduced gradients, so that every rank stops at the same step
        norm = torch.nn.utils.clip_grad_norm_(run.raw.parameters(), args.clip_grad or math.inf)
        if not torch.isfinite(norm):
            raise NonFinite(f"non-finite loss or gradient at step {run.step + 1} "
                            f"(epoch {epoch + 1}, loss {loss.item():.4g})")
        # step the weights and their average
        run.optimizer.step()
        if run.ema:
            run.ema.update(run.raw)
        run.step += 1
        # running sums of the loss and its terms, and progress
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
        stats = run.task.evaluate(run.compiled, loader)
        if run.ema:
            stats |= {f'ema_{k}': v for k, v in run.task.evaluate(run.ema.model, loader).items()}
    return stats


def all_sum(t):
    """Sum a tensor over all ranks (in place); one process: the tensor itself."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


# Command line ---------------------------------------------------------------------------------

def parse_args(argv=None):
    """The flags, those not given filled from the --resume run and the dataset's recipe, every
    refusal decided here or before anything is written."""
    p = parser()
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
    if kernel_refusal(args.kernel, args.device):
        p.error(kernel_refusal(args.kernel, args.device))
    return apply_recipe(args)


def parser():
    p = Parser(description=__doc__.split('\n\n')[0],
               formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(p)
    g = p.add_argument_group('data')
    g.add_argument('--dataset', choices=list(DATASETS),
                   help='what to train on (default: digits; shapes for the vitdet_* models)')
    g.add_argument('--data-path', default='data',
                   help="torchvision's root, or a folder with train/ and val/ (default data)")
    g.add_argument('--download', action='store_true',
                   help="fetch a torchvision dataset into --data-path if it is not there")
    g.add_argument('--limit', type=positive,
                   help='train and test on at most this many images of each split (default all)')
    g.add_argument('--workers', type=natural,
                   help="data loading processes per training process (default: the recipe's)")
    g = p.add_argument_group("recipe (defaults: the dataset's recipe in data.py)")
    for flag, kind, what in (
            ('--epochs', positive, 'passes over the training set'),
            ('--batch-size', positive, 'images per step, per process'),
            ('--lr', non_negative, 'peak learning rate; recipes: base-lr x total batch / 512'),
            ('--base-lr', non_negative, 'learning rate of a total batch of 512'),
            ('--min-lr', non_negative, 'learning rate at the end of the cosine'),
            ('--warmup-epochs', non_negative, 'epochs of linear warmup'),
            ('--warmup-lr', non_negative, 'learning rate at the start of the warmup'),
            ('--weight-decay', non_negative, "AdamW's, on weights but biases, norms and tables"),
            ('--opt-eps', number(float, 0.0, low_open=True), "AdamW's eps"),
            ('--clip-grad', non_negative, 'largest gradient norm; 0 = off'),
            ('--smoothing', number(float, 0.0, 1.0), 'label smoothing'),
            ('--mixup', non_negative, 'Mixup alpha; 0 = off'),
            ('--cutmix', non_negative, 'CutMix alpha; 0 = off'),
            ('--ema', number(float, 0.0, 1.0), 'EMA decay per step; 0 = off')):
        g.add_argument(flag, type=kind, help=f"{what} (default: the recipe's)")
    g.add_argument('--augment', choices=('paper', 'light', 'none'),
                   help="paper: RandomResizedCrop, flip, RandAugment, jitter; light: pad-and-crop, "
                        "flip (default: the recipe's)")
    g = p.add_argument_group('run')
    g.add_argument('--device', type=device_name, default=default_device(),
                   help='cpu, cuda or cuda:N (default cuda where there is one, else cpu)')
    g.add_argument('--amp', action='store_true', help='bfloat16 autocast')
    g.add_argument('--compile', action='store_true', help='torch.compile the model')
    g.add_argument('--seed', type=int, default=0,
                   help='of the weights, the shuffling and the augmentation (default 0)')
    g.add_argument('--output-dir',
                   help="where the run's files go (default: runs/<model>_<attn>_<dataset>, or "
                        "the --resume checkpoint's folder)")
    g.add_argument('--overwrite', action='store_true',
                   help='replace the run already in --output-dir')
    g.add_argument('--resume', metavar='PATH',
                   help="continue exactly from a checkpoint, with its run's flags but those given "
                        "(default: a new run)")
    g.add_argument('--finetune', metavar='PATH',
                   help="start from a train.py, timm or torchvision checkpoint's weights, new head "
                        "(default: from init)")
    g.add_argument('--keep-head', action='store_true',
                   help="with --finetune: keep the checkpoint's classifier head (same classes)")
    g.add_argument('--eval-only', action='store_true',
                   help='evaluate the --resume checkpoint and exit')
    return p


# Tasks ----------------------------------------------------------------------------------------

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


def classification_task(args, img_size):
    train_set, test_set, classes = classification_datasets(args, img_size)
    device = torch.device(args.device)
    return Task(train_set, test_set, classes,
                loss=partial(classification_loss, device=device, mix=mixer(args, classes),
                             smoothing=args.smoothing),
                evaluate=partial(evaluate_classifier, device=device), metric='test_acc1',
                finetune=partial(finetune_from, keep_head=args.keep_head))


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


# Optimisation ---------------------------------------------------------------------------------

def learning_rate(step, args, steps_per_epoch):
    """Linear warmup from warmup_lr, then cosine down to min_lr: a pure function of the step."""
    warmup, total = round(args.warmup_epochs * steps_per_epoch), args.epochs * steps_per_epoch
    if step < warmup:
        return args.warmup_lr + (args.lr - args.warmup_lr) * step / warmup
    t = (step - warmup) / max(1, total - warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


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


# Checkpoints and resume -----------------------------------------------------------------------
# A model flag (what the model is) given on --resume must equal the checkpoint's; how KArAt is
# computed (fast.HOW) and the invocation's own choices are this run's; everything else (recipe,
# data, seed) is the checkpoint's run's unless given again.

MODEL_FLAGS = ('model', *(f.name for f in fields(karat.AttentionConfig)), 'img_size',
               *ARCH_FLAGS)
INVOCATION = ('resume', 'finetune', 'keep_head', 'eval_only', 'output_dir', 'overwrite',
              'download', 'device', 'workers', 'compile', 'given', *fast.HOW)
RUN_FILES = ('args.json', 'log.jsonl', 'last.pt', 'best.pt', 'curves.png')
CHECKPOINTS = ('last.pt', 'best.pt')  # a folder without them holds no run worth keeping


def checkpoint(run, epoch, best, history):
    return dict(model=run.raw.state_dict(), config=run.raw.config,
                optimizer=run.optimizer.state_dict(),
                ema=run.ema.model.state_dict() if run.ema else None, epoch=epoch, step=run.step,
                metric=run.task.metric, best=best, history=history, args=vars(run.args))


def output_dir(args):
    return Path(args.output_dir or (Path(args.resume).parent if args.resume else
                                    Path('runs') / f"{args.model}_{args.attn}_{args.dataset}"))


def check_output(out, args):
    """Refuse, before anything is written, an output folder that holds another run's checkpoint
    (unless --resume continues it or --overwrite replaces it) or that cannot be written. A run
    that stopped before its first checkpoint left nothing to keep: its folder is reused."""
    held = [name for name in CHECKPOINTS if (out / name).exists()]
    if held and not continues(out, args) and not args.overwrite:
        raise Fatal(f"{out} holds a run ({', '.join(held)}): --resume {out / held[0]} "
                    f"continues it, --overwrite replaces it, or give another --output-dir")
    existing = next(p for p in (out, *out.parents) if p.exists() or p == p.parent)
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        reason = 'not a folder' if not existing.is_dir() else 'permission denied'
        raise Fatal(f"cannot write to --output-dir {out}: {existing} is {reason}")


def make_output(out, args):
    """The output folder, emptied of the run files of the run it replaces."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES if not continues(out, args) else ():
            (out / name).unlink(missing_ok=True)
    except OSError as e:
        raise Fatal(f"cannot write to --output-dir {out}: {e.strerror}") from None


def write_log(out, history):
    """log.jsonl, one line an epoch, as the checkpoint's history has it (untouched if it does)."""
    text = ''.join(json.dumps(row) + '\n' for row in history)
    log = out / 'log.jsonl'
    if not log.exists() or log.read_text() != text:
        log.write_text(text)


def continues(out, args):
    return args.resume and Path(args.resume).resolve().parent == out.resolve()


def next_step(out, flags=''):
    """The command that goes on from where a stopped run left `out`, with `flags` added."""
    last = out / 'last.pt'
    if last.exists():
        return f"--resume {last}{flags} continues it from its last checkpoint"
    return f"the same command{' with' + flags if flags else ''} starts it again (nothing was " \
           "saved yet)"


def check_model_flags(args, ckpt, classes):
    """Before any data is read: a new model must be buildable; a resumed one is the checkpoint's,
    so a model flag given with another value than the checkpoint's is refused."""
    if not ckpt:
        try:  # KArAt's flags are checked for softmax too, which does not use them
            models.attention_configs(args.attn, attention_options(args))
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


def one_line(read, path):
    """read(path) from weights.py, its ValueError as a Fatal."""
    try:
        return read(path)
    except ValueError as e:
        raise Fatal(str(e)) from None


load_checkpoint = partial(one_line, weights.load_checkpoint)
run_arguments = partial(one_line, weights.run_arguments)


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
        config = {**config, **{k: getattr(args, k) for k in fast.HOW}}
    if config['num_classes'] != classes:
        raise Fatal(f"{args.resume} has {config['num_classes']} classes, {args.dataset} has "
                    f"{classes}: --finetune starts a new run from a classifier's weights")
    model = build_model(config)
    if ckpt:
        load_weights(model, ckpt['model'], args.resume, config)
    return model


def finetune_from(model, path, keep_head=False):
    """Start `model` from the weights in `path` (weights.load_pretrained: this project's, timm's
    or torchvision's layout), its head new unless keep_head; say what starts at init."""
    try:
        at_init = weights.load_pretrained(model, weights.read_checkpoint(path), head=keep_head)
    except ValueError as e:
        raise Fatal(f"cannot start from {path}: {e}") from None
    if int(os.environ.get('RANK', 0)) == 0:
        left = weights.summarise(at_init) or 'nothing'
        print(f"weights from {path}; left at init: {left}", flush=True)


def backbone_from(model, path):
    """A detector's backbone from a classifier checkpoint (weights.load_backbone)."""
    try:
        report = weights.load_backbone(model, weights.read_checkpoint(path))
    except ValueError as e:
        raise Fatal(f"cannot initialise the backbone from {path}: {e}") from None
    if int(os.environ.get('RANK', 0)) == 0:
        print(f"backbone from {path}; left at init: {', '.join(report['missing']) or 'nothing'}",
              flush=True)


if __name__ == '__main__':
    main()
