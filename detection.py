"""Detection data and COCO evaluation for train.py's vitdet_* models (ViTDet + Mask R-CNN).

A batch is a pair of lists, images (3, H, W) in [0, 1] and targets {boxes (k, 4) xyxy, labels
(k,), masks (k, H, W) uint8, image_id}, as torchvision's Mask R-CNN takes them. Two datasets:
`Shapes`, offline synthetic rectangles, ellipses and triangles, and COCO's own layout through
torchvision's CocoDetection. Box and mask AP come from pycocotools, the reference evaluator
every detection paper reports; under torchrun each rank detects its share of the test images
and rank 0 scores them all, so the AP is the one a single process would compute.
"""
import contextlib
import io
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset
from torchvision import datasets as tvd
from torchvision.transforms import v2


# Data -----------------------------------------------------------------------------------------

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
    return [F.max_pool2d(m[None].float(), 2 * pixels + 1, 1, pixels)[0].bool() for m in masks]


def mask_boxes(masks):
    """Bounding boxes (k, 4) xyxy of masks (k, H, W), pixel edges included."""
    boxes = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes.append(torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]))
    return torch.stack(boxes).float() if boxes else torch.zeros(0, 4)


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
        return image, dict(boxes=mask_boxes(masks), labels=torch.tensor(labels), masks=masks,
                           image_id=i)


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
        anns = [a for a in anns
                if not a.get('iscrowd', 0) and a['bbox'][2] >= 1 and a['bbox'][3] >= 1]
        w, h = image.size
        boxes = torch.tensor([a['bbox'] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        masks = [torch.from_numpy(self.coco.annToMask(a)) for a in anns]
        return (v2.functional.to_dtype(v2.functional.to_image(image), torch.float32, scale=True),
                dict(boxes=boxes.clamp(min=0).minimum(torch.tensor([w, h, w, h])),
                     labels=torch.tensor([a['category_id'] for a in anns]),
                     masks=torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.uint8),
                     image_id=self.data.ids[i]))


def coco_split(root, split):
    """COCO's layout: <root>/{train,val}2017/ images and
    <root>/annotations/instances_{split}2017.json."""
    images, annotations = (Path(root) / f'{split}2017',
                           Path(root) / 'annotations' / f'instances_{split}2017.json')
    if not (images.is_dir() and annotations.is_file()):
        raise FileNotFoundError(f"no COCO {split} split under {root!r}: --data-path must hold "
                                f"{split}2017/ and annotations/instances_{split}2017.json")
    return CocoInstances(images, annotations)


def build_datasets(name, root, img_size, sizes, limit=None):
    """(train, test, category names by label, 'background' first) of `shapes` or `coco`."""
    if name == 'shapes':
        train_set, test_set = (Shapes(sizes[k], img_size, seed=seed)
                               for k, seed in (('train', 0), ('test', 1)))
        names = list(Shapes.CLASSES)
    else:
        train_set, test_set = coco_split(root, 'train'), coco_split(root, 'val')
        categories = test_set.coco.loadCats(test_set.coco.getCatIds())
        names = ['background'] + [''] * max(c['id'] for c in categories)
        for c in categories:
            names[c['id']] = c['name']
    if limit:
        train_set, test_set = (Subset(ds, range(min(limit, len(ds))))
                               for ds in (train_set, test_set))
    return train_set, test_set, names


def collate_detection(batch):
    """[(image, target), ...] -> (images, targets): lists, since images may differ in size."""
    return tuple(zip(*batch))


# COCO ground truth ----------------------------------------------------------------------------

def encode_masks(masks):
    """Run-length encodings of binary masks (k, H, W), as COCO stores them."""
    from pycocotools import mask as mask_utils
    return mask_utils.encode(np.asfortranarray(masks.to(torch.uint8).permute(1, 2, 0).numpy()))


def coco_ground_truth(dataset, categories):
    """A pycocotools COCO index of a dataset's targets (for data without a COCO file)."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    images, annotations = [], []
    for i in range(len(dataset)):
        target = dataset[i][1]
        h, w = target['masks'].shape[-2:]
        images.append(dict(id=target['image_id'], height=h, width=w))
        for box, label, rle in zip(target['boxes'].tolist(), target['labels'].tolist(),
                                   encode_masks(target['masks'])):
            annotations.append(dict(id=len(annotations) + 1, image_id=target['image_id'],
                                    category_id=label,
                                    bbox=[box[0], box[1], box[2] - box[0], box[3] - box[1]],
                                    area=float(mask_utils.area(rle)), iscrowd=0, segmentation=rle))
    coco = COCO()
    coco.dataset = dict(images=images, annotations=annotations,
                        categories=[dict(id=i, name=n) for i, n in enumerate(categories) if i])
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def ground_truth(dataset, names):
    """The COCO index to score against: the annotation file if there is one, else the targets."""
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    return base.coco if hasattr(base, 'coco') else coco_ground_truth(dataset, names)


# Loss and evaluation --------------------------------------------------------------------------

def detection_loss(model, batch, device='cpu'):
    """Mask R-CNN's training loss on a batch: (the sum, the five losses it sums)."""
    images, targets = batch
    to = lambda v: v.to(device) if torch.is_tensor(v) else v
    losses = model([im.to(device) for im in images],
                   [{k: to(v) for k, v in t.items()} for t in targets])
    return sum(losses.values()), losses


def detect(model, loader, device):
    """The model's detections in COCO's result format, per IoU type, and the image ids seen."""
    results, image_ids = {'bbox': [], 'segm': []}, []
    for images, targets in loader:
        outputs = model([im.to(device) for im in images])
        for target, out in zip(targets, outputs):
            image_ids.append(int(target['image_id']))
            boxes = out['boxes'].float().cpu()
            rles = encode_masks(out['masks'][:, 0].cpu() > 0.5) if len(boxes) else []
            for box, label, score, rle in zip(boxes.tolist(), out['labels'].tolist(),
                                              out['scores'].tolist(), rles):
                found = dict(image_id=image_ids[-1], category_id=label, score=score)
                results['bbox'].append(
                    dict(found, bbox=[box[0], box[1], box[2] - box[0], box[3] - box[1]]))
                results['segm'].append(dict(found, segmentation=rle))
    return results, image_ids


def coco_ap(coco_gt, results, image_ids):
    """COCO box and mask AP (IoU 0.5:0.95, and at 0.5) in percent, from pycocotools."""
    from pycocotools.cocoeval import COCOeval
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


@torch.no_grad()
def evaluate_detection(model, loader, coco_gt, device='cpu'):
    """Box and mask AP of the model on the loader's images. Under torchrun every rank detects
    its own images; rank 0 scores all of them at once and every rank returns its figures.
    In float32 even under --amp: a bf16 box coordinate at 1024 px is off by up to 4 pixels."""
    model.eval()
    with torch.autocast(torch.device(device).type, enabled=False):
        results, image_ids = detect(model, loader, device)
    if not dist.is_initialized():
        return coco_ap(coco_gt, results, image_ids)
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, (results, image_ids))
    metrics = [None]
    if dist.get_rank() == 0:
        metrics[0] = coco_ap(coco_gt,
                             {k: [r for share, _ in shares for r in share[k]] for k in results},
                             [i for _, ids in shares for i in ids])
    dist.broadcast_object_list(metrics, src=0)
    return metrics[0]
