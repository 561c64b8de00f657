"""Train, fine-tune, evaluate and benchmark the models of models.py (see issue 4)."""
import contextlib
import io
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

import models


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


def collate_detection(batch):
    return tuple(zip(*batch))


def detection_step(model, optimizer, images, targets, clip_grad=1.0):
    """One training step on lists of images and targets: the loss dict as floats, with 'loss'."""
    model.train()
    losses = model(list(images), list(targets))
    loss = sum(losses.values())
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite detection loss: {({k: v.item() for k, v in losses.items()})}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
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
        metrics.update({f'{kind}_ap': 100 * stats[0], f'{kind}_ap50': 100 * stats[1]})
    return metrics
