"""Detection and instance segmentation: the ViTDet detector, its data and COCO evaluation.

    detector = create_detector('vitdet_tiny', attn='fourier')   # 4 classes, background included

ViTDet (Li et al. 2022, "Exploring plain vision transformer backbones for object detection")
is a plain ViT without CLS token, built from models.py's pieces, whose blocks attend within
windows, a few of them globally; a simple feature pyramid built from its single stride-16 map;
and torchvision's Mask R-CNN on top. As in torchvision, num_classes counts the background as
class 0 (COCO: 91, category ids used as labels).

A batch is a pair of lists, images (3, H, W) in [0, 1] and targets {boxes (k, 4) xyxy, labels
(k,), masks (k, H, W) uint8, image_id}, as torchvision's Mask R-CNN takes them. Two datasets:
`Shapes`, offline synthetic rectangles, ellipses and triangles, and COCO's own layout through
torchvision's CocoDetection. Box and mask AP come from pycocotools, the reference evaluator
every detection paper reports; under torchrun each rank detects its share of the test images
and rank 0 scores them all, so the AP is the one a single process would compute.
"""
import contextlib
import io
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.data import Dataset, Subset
from torchvision import datasets as tvd
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.transforms import v2

import models


# The detector ---------------------------------------------------------------------------------

def create_detector(name, *, attn='softmax', num_classes=None, img_size=None, **options):
    """A detector of `DETECTORS` by name, with the keywords of models.create_model: attention
    options, and architecture overrides (ViTDet's arguments); num_classes and img_size default
    to the detector's own."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; allowed: {', '.join(sorted(DETECTORS))}")
    return models.build(name, *DETECTORS[name], attn, num_classes, img_size, options)


class ViTDetAttention(models.Attention):
    """Attention within non-overlapping window x window windows of a size x size map of tokens
    (b, H, W, c); window = size is global attention. N = window² keys per window.

    A map that the window does not divide is zero-padded at the bottom and right, as ViTDet
    does (64 tokens, windows of 14 at 1024 px). ViTDet lets the padding tokens be attended to;
    here they are masked, since a learnable φ would give them arbitrary (not ~0) weight."""

    def __init__(self, dim, heads, size, window, make_attend):
        super().__init__(dim, heads, window ** 2, make_attend)
        self.size, self.window, self.pad = size, window, -size % window
        self.register_buffer('mask', padding_mask(size, window) if self.pad else None,
                             persistent=False)

    def forward(self, x):
        x = F.pad(x, (0, 0, 0, self.pad, 0, self.pad))
        x = models.shifted_window_attention(x, super().forward, self.window, mask=self.mask)
        return x[:, :self.size, :self.size]


def padding_mask(size, window):
    """Which keys of each window are real tokens of the size x size map padded to a multiple of
    the window: (nW, 1, N) bool, the same for every query."""
    real = torch.arange(size + (-size % window)) < size
    real = rearrange(real, 'h -> h 1') & rearrange(real, 'w -> 1 w')
    real = models.window_partition(rearrange(real, 'h w -> 1 h w 1'), window)
    return rearrange(real, 'n j 1 -> n 1 j')


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (b, c, h, w) map, the norm of ViTDet's pyramid."""

    def forward(self, x):
        return rearrange(super().forward(rearrange(x, 'b c h w -> b h w c')), 'b h w c -> b c h w')


PYRAMID_SCALES = (4, 2, 1, 0.5)  # from the stride-16 map: strides 4, 8, 16, 32 ("0".."3")


def pyramid_level(dim, out_channels, scale):
    """One level of the simple feature pyramid: resample the backbone's map by `scale` (two
    stride-2 deconvolutions with norm and GELU between them for x4, one for x2, max pooling for
    1/2), then a 1x1 and a 3x3 convolution to out_channels, each followed by a norm."""
    resample, channels = {
        4: ([nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2), nn.GELU(),
             nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)], dim // 4),
        2: ([nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2),
        1: ([], dim),
        0.5: ([nn.MaxPool2d(2)], dim),
    }[scale]
    return nn.Sequential(*resample,
                         nn.Conv2d(channels, out_channels, 1, bias=False),
                         LayerNorm2d(out_channels),
                         nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                         LayerNorm2d(out_channels))


class ViTDetBackbone(nn.Module):
    """The plain ViT of ViTDet and its simple feature pyramid: (b, 3, img, img) images ->
    OrderedDict of maps "0".."3" (strides p/4, p/2, p, 2p for patch size p) and "pool" (4p),
    each with `out_channels` channels, as torchvision's Mask R-CNN expects.

    No CLS token; a learned absolute position embedding at the detector's grid of
    (img/p)² tokens; blocks in `global_blocks` attend over the whole map (N = grid²), the
    others within window x window windows (N = window²). No final norm: the pyramid norms."""

    def __init__(self, make_attend, img_size, patch_size, embed_dim, depth, num_heads, window_size,
                 global_blocks, drop_path_rate, out_channels):
        super().__init__()
        models.check_arch(img_size, patch_size, embed_dim, num_heads)
        self.img_size, self.grid = img_size, img_size // patch_size
        if not 1 <= window_size <= self.grid:
            raise ValueError(f"window_size must be in 1..{self.grid} (the token grid of img_size "
                             f"{img_size} with patch_size {patch_size}), got {window_size}")
        if not all(0 <= i < depth for i in global_blocks):
            raise ValueError(f"global_blocks must be block indices in 0..{depth - 1}, "
                             f"got {tuple(global_blocks)}")
        self.patch_embed = models.patch_embedding(3, embed_dim, patch_size)
        self.pos_embed = models.position_embedding(self.grid ** 2, embed_dim)
        window = lambda i: self.grid if i in global_blocks else window_size
        rates = models.drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            models.Block(embed_dim, ViTDetAttention(embed_dim, num_heads, self.grid, window(i),
                                                    make_attend), p)
            for i, p in enumerate(rates))
        self.pyramid = nn.ModuleList(pyramid_level(embed_dim, out_channels, s)
                                     for s in PYRAMID_SCALES)
        self.out_channels = out_channels
        self.apply(models.init_weights)

    def forward(self, x):
        models.check_size(x, self.img_size, 3)
        x = rearrange(models.patch_tokens(self.patch_embed, x) + self.pos_embed,
                      'b (h w) d -> b h w d', h=self.grid)
        for block in self.blocks:
            x = block(x)
        x = rearrange(x, 'b h w d -> b d h w')
        features = OrderedDict((str(i), level(x)) for i, level in enumerate(self.pyramid))
        # torchvision's LastLevelMaxPool
        features['pool'] = F.max_pool2d(features['3'], 1, stride=2)
        return features


class ViTDet(MaskRCNN):
    """ViTDet: `ViTDetBackbone` under torchvision's Mask R-CNN. Train mode: model(images,
    targets) -> dict of losses; eval mode: model(images) -> [{boxes, labels, scores, masks}].
    images: list of (3, H, W) floats in [0, 1]; targets: [{boxes (k, 4) xyxy, labels (k,)
    in 1..num_classes-1, masks (k, H, W)}].

    KArAt needs a fixed N, so every image is resized to fit img_size x img_size (longest side
    = img_size, min_size = max_size = img_size) and zero-padded to exactly that square
    (size_divisible = img_size); boxes and masks come back in the input image's coordinates.

    Heads: torchvision's defaults at out_channels = 256 (RPN, two-FC box head of
    `representation_size`, four-conv mask head), with out_channels channels throughout so that
    small variants stay small. Anchors: one size per level, `anchor_size` at the finest level,
    doubling per level (torchvision's 32..512 by default), aspect ratios 0.5, 1, 2.
    The RPN keeps proposals = (train, test) boxes per level before NMS and per image after it,
    and `rois_per_image` of them train the box head (torchvision: 2000, 1000 and 512)."""

    def __init__(self, make_attend, img_size=1024, num_classes=91, patch_size=16, embed_dim=768,
                 depth=12, num_heads=12, window_size=14, global_blocks=(2, 5, 8, 11),
                 drop_path_rate=0.1, out_channels=256, representation_size=1024, anchor_size=32,
                 rois_per_image=512, proposals=(2000, 1000)):
        if num_classes < 2:
            raise ValueError("num_classes counts the background too and must be >= 2, "
                             f"got {num_classes}")
        backbone = ViTDetBackbone(make_attend, img_size, patch_size, embed_dim, depth, num_heads,
                                  window_size, tuple(global_blocks), drop_path_rate, out_channels)
        levels = len(PYRAMID_SCALES) + 1
        super().__init__(
            backbone, min_size=img_size, max_size=img_size, size_divisible=img_size,
            rpn_anchor_generator=AnchorGenerator(
                tuple((anchor_size * 2 ** i,) for i in range(levels)),
                ((0.5, 1.0, 2.0),) * levels),
            box_head=TwoMLPHead(out_channels * 7 ** 2, representation_size),
            box_predictor=FastRCNNPredictor(representation_size, num_classes),
            rpn_pre_nms_top_n_train=proposals[0], rpn_post_nms_top_n_train=proposals[0],
            rpn_pre_nms_top_n_test=proposals[1], rpn_post_nms_top_n_test=proposals[1],
            box_batch_size_per_image=rois_per_image,
            mask_head=MaskRCNNHeads(out_channels, (out_channels,) * 4, 1),
            mask_predictor=MaskRCNNPredictor(out_channels, out_channels, num_classes))


DETECTORS = {
    # ViT-B at 1024 px, windows of 14 (the pretraining grid of 224 px), global blocks 2, 5, 8, 11.
    'vitdet_base': (ViTDet, dict(embed_dim=768, depth=12, num_heads=12, window_size=14,
                                 global_blocks=(2, 5, 8, 11), drop_path_rate=0.1, img_size=1024,
                                 num_classes=91)),
    # For tests and CPU demos: 8 x 8 tokens at 128 px, windows of 4 (N = 16), every second
    # block global (N = 64), as ViT-B's every third; 64 channels, anchors from 16 px.
    'vitdet_tiny': (ViTDet, dict(embed_dim=96, depth=4, num_heads=3, window_size=4,
                                 global_blocks=(1, 3), drop_path_rate=0.0, img_size=128,
                                 num_classes=4, out_channels=64, representation_size=256,
                                 anchor_size=16, rois_per_image=64, proposals=(300, 100))),
}


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
