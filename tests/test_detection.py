"""ViTDet with KArAt on torchvision's Mask R-CNN: the detector, its backbone's init from a
classifier, the synthetic shapes, the COCO evaluation (detection.py) and detection in train.py:
one process, torchrun, exact resume."""
import json
import pytest
import torch
from einops import rearrange
from PIL import Image
from torch.utils.data import DataLoader

import detection
import karat
import models
import train
import weights
from test_train import DIE_AFTER_SAVE, assert_same_run, log, python

LOSSES = {'loss_classifier', 'loss_box_reg', 'loss_mask', 'loss_objectness', 'loss_rpn_box_reg'}


def detector(attn='softmax', **options):
    torch.manual_seed(0)
    return detection.create_detector('vitdet_tiny', attn=attn, **options)


def classifier(attn='softmax', **options):
    """A ViT classifier with vitdet_tiny's backbone dimensions, at 128 px: N = 8² + 1 = 65."""
    torch.manual_seed(1)
    return models.create_model('vit_tiny', attn=attn, img_size=128, embed_dim=96, depth=4,
                               num_heads=3, num_classes=10, **options)


def batch(n=2, seed=0, img_size=128):
    data = detection.Shapes(n, img_size=img_size, seed=seed)
    return detection.collate_detection([data[i] for i in range(n)])


# The detector ------------------------------------------------------------------------------

@pytest.mark.parametrize('attn', ['softmax', 'fourier'])
def test_train_mode_gives_finite_losses_whose_gradients_reach_every_backbone_weight(attn):
    model = detector(attn)
    images, targets = batch()
    losses = model(list(images), list(targets))
    assert set(losses) == LOSSES
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for name, p in model.backbone.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize('attn', ['softmax', 'fourier'])
def test_eval_mode_gives_detections_in_the_input_images_coordinates(attn):
    model = detector(attn).eval()
    images = [torch.rand(3, 100, 128), torch.rand(3, 128, 60)]
    with torch.no_grad():
        outputs = model(images)
    for image, out in zip(images, outputs):
        k = len(out['boxes'])
        assert set(out) == {'boxes', 'labels', 'scores', 'masks'} and k > 0
        assert out['masks'].shape == (k, 1, *image.shape[-2:])
        assert 0 <= out['masks'].min() and out['masks'].max() <= 1
        assert (out['boxes'][:, :2] >= 0).all() and (out['boxes'][:, 2] <= image.shape[2]).all() \
            and (out['boxes'][:, 3] <= image.shape[1]).all()
        assert set(out['labels'].tolist()) <= {1, 2, 3}
        assert (out['scores'][:-1] >= out['scores'][1:]).all()


def test_every_image_reaches_the_backbone_as_exactly_the_models_square():
    """KArAt fixes N: whatever the input's shape, the backbone sees img_size x img_size."""
    model, seen = detector('fourier').eval(), []
    model.backbone.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        model([torch.rand(3, 100, 128), torch.rand(3, 300, 40)])
        model([torch.rand(3, 64, 64)])
    assert seen == [(2, 3, 128, 128), (1, 3, 128, 128)]


def test_the_feature_pyramid_has_torchvisions_levels_at_strides_4_to_64():
    features = detector().backbone(torch.rand(1, 3, 128, 128))
    assert list(features) == ['0', '1', '2', '3', 'pool']
    assert [f.shape[-1] for f in features.values()] == [32, 16, 8, 4, 2]
    assert all(f.shape[1] == 64 for f in features.values())


def test_vitdet_base_windows_14_and_global_blocks_2_5_8_11_at_1024():
    with torch.device('meta'):  # the structure only: no memory, no init
        model = detection.create_detector('vitdet_base', attn='fourier', mode='universal')
    assert model.config['img_size'] == 1024 and model.config['num_classes'] == 91
    blocks = model.backbone.blocks
    assert [b.attn.attend.operator.seq_len for b in blocks] == [196, 196, 4096] * 4
    assert [b.attn.pad for b in blocks] == [6, 6, 0] * 4  # 64 tokens padded to 70 = 5 windows of 14
    operators = {id(b.attn.attend.operator) for b in blocks}
    assert len(operators) == 2  # universal: one for the window blocks, one for the global ones
    assert model.transform.min_size == (1024,) and model.transform.max_size == 1024


def test_window_blocks_are_local_and_global_blocks_are_not():
    model = detector('fourier')
    window, glob = model.backbone.blocks[0].attn, model.backbone.blocks[1].attn
    x = torch.randn(1, 8, 8, 96)
    y = x.clone()
    y[0, 0, 0] += 1  # a token of the top-left 4 x 4 window
    with torch.no_grad():
        changed = lambda attn: (attn(x) - attn(y)).abs().sum(-1)[0] > 1e-6
        assert (changed(window)[:4, :4].all() and not changed(window)[4:].any()
                and not changed(window)[:, 4:].any())
        assert changed(glob).all()


@pytest.mark.parametrize('attn', ['softmax', 'fourier', 'morlet'])
def test_padding_tokens_of_a_window_get_exactly_zero_weight(attn):
    """An 8 x 8 map in windows of 3 is padded to 9 x 9: padded keys must not be attended."""
    torch.manual_seed(0)
    attention = detection.ViTDetAttention(96, 3, 8, 3, karat.attention_maker(attn))
    with models.capture_attention(attention) as maps, torch.no_grad():
        attention(torch.randn(2, 8, 8, 96))
    weights = rearrange(maps['attend'], '(b n) h i j -> b n h i j', b=2)  # n = 9 windows of N = 9
    padded = rearrange(~detection.padding_mask(8, 3), 'n 1 j -> 1 n 1 1 j').expand_as(weights)
    assert (padded.any() and (weights[padded] == 0).all()
            and (weights[~padded] != 0).mean(dtype=torch.float) > 0.9)


# Initialising the backbone from a classifier ------------------------------------------------

@pytest.mark.parametrize('options', [dict(attn='softmax'), dict(attn='fourier'),
                                     dict(attn='fourier', mode='universal'),
                                     dict(attn='rational'), dict(attn='fourier', rank=None)])
def test_load_backbone_copies_the_vit_and_is_the_identity_on_the_same_grid(options):
    """The classifier's 8 x 8 grid is the detector's: the global blocks' operators (N = 64) and
    the position embedding are the classifier's without the CLS entries, the rest is copied."""
    source, model = classifier(**options), detector(**options)
    report = weights.load_backbone(model, source.state_dict())
    assert report == dict(missing=[], unused=['cls_token', 'head.bias', 'head.weight',
                                              'norm.bias', 'norm.weight'])
    src, own = source.state_dict(), model.backbone.state_dict()
    assert torch.equal(own['pos_embed'], src['pos_embed'][:, 1:])
    for key, value in own.items():
        if key.startswith('pyramid.') or key == 'pos_embed':
            continue
        theirs = src[key]
        if '.operator.' in key and key.startswith(('blocks.1.', 'blocks.3.')):  # global blocks
            op = model.backbone.blocks[int(key.split('.')[1])].attn.attend.operator
            for axis in op.key_axes(key.split('.operator.')[1]):
                theirs = theirs.narrow(axis, 1, 64)
        elif '.operator.' in key:
            continue
        assert torch.equal(value, theirs), key


def test_resampling_keeps_every_sum_over_keys():
    """Window blocks (N = 16) get the classifier's 8 x 8 key grid shrunk to 4 x 4: a W and
    Fourier coefficients constant over keys keep their sums over keys (Σ_j σ̂_j V_j,
    Σ_q φ_pq)."""
    source, model = classifier('fourier'), detector('fourier')
    state = source.state_dict()
    state['blocks.0.attn.attend.operator.W'] = torch.ones(3, 65, 12)
    state['blocks.0.attn.attend.operator.phi.coef'] = torch.ones(3, 12, 65, 6)
    weights.load_backbone(model, state)
    op = model.backbone.blocks[0].attn.attend.operator
    assert op.seq_len == 16
    assert torch.allclose(op.W.sum(1), torch.full((3, 12), 64.0))
    assert torch.allclose(op.phi['coef'].sum(2), torch.full((3, 12, 6), 64.0))


def test_resample_grid_to_the_same_grid_is_the_identity_and_a_linear_ramp_stays_linear():
    t = torch.randn(2, 49, 3)
    for mode in ('bilinear', 'bicubic'):
        assert torch.equal(weights.resample_grid(t, 1, 49, mode=mode), t)
    ramp = torch.arange(8.0).repeat(8)  # the column index of an 8 x 8 grid, row by row
    coarse = weights.resample_grid(ramp, 0, 16, mode='bilinear')
    assert torch.allclose(coarse, (torch.arange(4.0) * 2 + 0.5).repeat(4))


def test_load_backbone_reads_a_train_checkpoint_file_and_rejects_other_architectures(tmp_path):
    source = classifier('fourier')
    torch.save(dict(model=source.state_dict(), config=source.config), tmp_path / 'best.pt')
    model = detector('fourier')
    weights.load_backbone(model, str(tmp_path / 'best.pt'))
    assert torch.equal(model.backbone.blocks[2].mlp[0].weight, source.blocks[2].mlp[0].weight)
    wider = models.create_model('vit_tiny', img_size=128, embed_dim=192, depth=4, num_heads=3)
    with pytest.raises(ValueError, match='another architecture'):
        weights.load_backbone(detector(), wider.state_dict())
    with pytest.raises(ValueError, match='not a checkpoint of a known layout'):
        weights.load_backbone(detector(), {'weight': torch.zeros(1)})


def test_a_classifier_whose_rank_was_capped_at_its_few_tokens_is_refused_saying_so():
    """At 32 px a classifier has N = 2² + 1 = 5 tokens, so its r = 12 is capped at 5; the
    detector's operators have r = 12: the message names both ranks and the flag that fits."""
    small = models.create_model('vit_tiny', attn='fourier', img_size=32, patch_size=16,
                                embed_dim=96, depth=4, num_heads=3)
    with pytest.raises(ValueError, match=r"the train.py classifier is another architecture \(its "
                                         r"operators have rank 5, capped at its N = 5 tokens .*, "
                                         r"the detector's 12: give the detector --rank 5"):
        weights.load_backbone(detector('fourier'), dict(model=small.state_dict(),
                                                        config=small.config))


# Data and evaluation -------------------------------------------------------------------------

def test_shapes_boxes_are_exactly_their_masks_bounding_boxes():
    data = detection.Shapes(40, img_size=96, seed=3)
    for i in range(len(data)):
        image, target = data[i]
        masks, boxes = target['masks'], target['boxes']
        assert image.shape == (3, 96, 96) and 0 <= image.min() and image.max() <= 1
        assert len(masks) == len(boxes) == len(target['labels']) >= 1
        assert set(target['labels'].tolist()) <= {1, 2, 3}
        assert masks.sum(0).max() == 1  # shapes do not overlap
        for m, (x1, y1, x2, y2) in zip(masks, boxes.long().tolist()):
            assert m[y1:y2, x1:x2].sum() == m.sum()  # the box holds the whole mask
            # and no more
            assert m[y1].any() and m[y2 - 1].any() and m[:, x1].any() and m[:, x2 - 1].any()
    assert torch.equal(data[5][0], data[5][0]) and not torch.equal(
        data[5][0], detection.Shapes(40, 96, seed=4)[5][0])


class Oracle(torch.nn.Module):
    """Detects exactly the ground truth of a dataset read in order, boxes shifted by `shift`."""

    def __init__(self, data, shift=0.0):
        super().__init__()
        self.targets, self.shift = iter([data[i][1] for i in range(len(data))]), shift

    def forward(self, images):
        targets = [next(self.targets) for _ in images]
        return [dict(boxes=t['boxes'] + self.shift, labels=t['labels'],
                     scores=torch.ones(len(t['labels'])), masks=t['masks'][:, None].float())
                for t in targets]


def test_coco_evaluation_gives_100_ap_for_the_ground_truth_and_less_for_shifted_boxes():
    data = detection.Shapes(6, img_size=64, seed=2)
    gt = detection.coco_ground_truth(data, detection.Shapes.CLASSES)
    loader = DataLoader(data, batch_size=4, collate_fn=detection.collate_detection)
    perfect = detection.evaluate_detection(Oracle(data), loader, gt)
    assert perfect == dict(box_ap=100.0, box_ap50=100.0, mask_ap=100.0, mask_ap50=100.0)
    shifted = detection.evaluate_detection(Oracle(data, shift=4.0), loader, gt)
    assert shifted['box_ap'] < 90 and shifted['mask_ap'] == 100.0


# Learning ------------------------------------------------------------------------------------

def test_a_few_dozen_steps_on_shapes_lower_the_loss_markedly():
    torch.manual_seed(0)
    model = detection.create_detector('vitdet_tiny', attn='fourier', img_size=64, window_size=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, targets = batch(8, img_size=64)
    losses = []
    for step in range(30):  # two batches of 4, in turn
        half = slice(4 * (step % 2), 4 * (step % 2) + 4)
        loss, _ = detection.detection_loss(model, (images[half], targets[half]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4, losses


# Detection in train.py -------------------------------------------------------------------

TINY = ['--model', 'vitdet_tiny', '--img-size', '64', '--batch-size', '4', '--device', 'cpu']


def test_the_detection_mode_logs_ap_and_eval_only_reproduces_it(tmp_path, capsys):
    train.main(TINY + ['--dataset', 'shapes', '--attn', 'fourier', '--limit', '8', '--epochs', '2',
                       '--output-dir', str(tmp_path)])
    rows = [json.loads(line) for line in (tmp_path / 'log.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [1, 2] and rows[1]['train_loss'] < rows[0]['train_loss']
    assert LOSSES | {'box_ap', 'box_ap50', 'mask_ap', 'mask_ap50'} <= set(rows[0])
    capsys.readouterr()
    train.main(['--dataset', 'shapes', '--model', 'vitdet_tiny', '--limit', '8', '--eval-only',
                '--resume', str(tmp_path / 'last.pt')])
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ({k: evaluated[k] for k in ('box_ap', 'mask_ap')}
            == {k: rows[-1][k] for k in ('box_ap', 'mask_ap')})


# Augmentation-free, but Mask R-CNN samples proposals at random and the EMA averages every step:
# resume has to replay both.
RESUMABLE = TINY + ['--dataset', 'shapes', '--attn', 'fourier', '--limit', '8', '--epochs', '3',
                    '--ema', '0.9']


def test_detection_resume_after_sigkill_ends_exactly_like_an_uninterrupted_run(tmp_path):
    done = python('train.py', *RESUMABLE, '--output-dir', str(tmp_path / 'whole'))
    assert done.returncode == 0, done.stderr
    killed = python('-c', DIE_AFTER_SAVE, *RESUMABLE, '--output-dir', str(tmp_path / 'killed'))
    assert killed.returncode == -9
    resumed = python('train.py', *RESUMABLE, '--resume', str(tmp_path / 'killed' / 'last.pt'))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path / 'killed', tmp_path / 'whole')


def test_torchrun_two_processes_give_the_box_ap_of_one_process_on_the_same_checkpoint(tmp_path):
    """Each rank detects half of the held-out shapes; rank 0 scores them all with pycocotools."""
    run = python('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
                 '--dataset', 'shapes', '--model', 'vitdet_tiny', '--device', 'cpu',
                 '--img-size', '64', '--limit', '96', '--epochs', '2',
                 '--output-dir', str(tmp_path))
    assert run.returncode == 0, run.stderr
    rows = log(tmp_path)
    assert [r['epoch'] for r in rows] == [1, 2] and json.loads(
        (tmp_path / 'args.json').read_text())['world_size'] == 2
    assert rows[1]['box_ap'] > 0  # 24 steps of 2 x 4 images: something is found
    alone = python('train.py', '--dataset', 'shapes', '--model', 'vitdet_tiny', '--device', 'cpu',
                   '--limit', '96', '--eval-only', '--resume', str(tmp_path / 'last.pt'))
    assert alone.returncode == 0, alone.stderr
    evaluated = json.loads(alone.stdout.strip().splitlines()[-1])
    assert ({k: evaluated[k] for k in ('box_ap', 'mask_ap')}
            == {k: rows[-1][k] for k in ('box_ap', 'mask_ap')})


def coco_folder(root, images=3):
    """A COCO-layout folder: {train,val}2017/*.png and annotations/instances_*2017.json with
    polygon rectangles of categories 3 and 7 and one crowd region."""
    (root / 'annotations').mkdir(parents=True)
    for split in ('train', 'val'):
        (root / f'{split}2017').mkdir()
        files, anns = [], []
        for i in range(images):
            pixels = torch.full((48, 64, 3), 40, dtype=torch.uint8)
            pixels[8:24, 10:30] = 220  # category 3
            pixels[30:44, 40:60] = 120  # category 7
            Image.fromarray(pixels.numpy()).save(root / f'{split}2017' / f'{i:04d}.png')
            files.append(dict(id=100 + i, file_name=f'{i:04d}.png', height=48, width=64))
            for cat, (x1, y1, x2, y2), crowd in ((3, (10, 8, 30, 24), 0), (7, (40, 30, 60, 44), 0),
                                                 (7, (0, 40, 8, 48), 1)):
                anns.append(dict(id=len(anns) + 1, image_id=100 + i, category_id=cat, iscrowd=crowd,
                                 area=(x2 - x1) * (y2 - y1), bbox=[x1, y1, x2 - x1, y2 - y1],
                                 segmentation=[[x1, y1, x2, y1, x2, y2, x1, y2]]))
        categories = [dict(id=3, name='bright'), dict(id=7, name='grey')]
        (root / 'annotations' / f'instances_{split}2017.json').write_text(
            json.dumps(dict(images=files, annotations=anns, categories=categories)))


def test_coco_format_targets_are_boxes_labels_and_masks_without_crowds(tmp_path):
    coco_folder(tmp_path)
    image, target = detection.coco_split(tmp_path, 'val')[0]
    assert image.shape == (3, 48, 64) and image.dtype == torch.float32 and image.max() <= 1
    assert target['labels'].tolist() == [3, 7] and target['image_id'] == 100
    assert target['boxes'].tolist() == [[10, 8, 30, 24], [40, 30, 60, 44]]
    # the polygons rasterise to the boxes
    assert torch.equal(detection.mask_boxes(target['masks']), target['boxes'])


def test_the_detection_mode_trains_on_a_coco_folder_with_labels_up_to_the_largest_category(
        tmp_path):
    coco_folder(tmp_path / 'coco')
    train.main(TINY + ['--dataset', 'coco', '--data-path', str(tmp_path / 'coco'),
                       '--attn', 'softmax', '--epochs', '1',
                       '--workers', '0', '--output-dir', str(tmp_path / 'run')])
    ckpt = torch.load(tmp_path / 'run' / 'last.pt', weights_only=True)
    # category ids 3 and 7 are the labels; 0 is the background
    assert ckpt['config']['num_classes'] == 8
    assert 'box_ap' in json.loads((tmp_path / 'run' / 'log.jsonl').read_text())


@pytest.mark.parametrize('argv, message', [
    (['--dataset', 'digits', '--model', 'vitdet_tiny'], 'vitdet_'),
    (['--dataset', 'shapes', '--model', 'vit_tiny'], 'vitdet_'),
    (['--dataset', 'coco', '--model', 'vitdet_tiny', '--data-path', '/nonexistent'],
     'no COCO train split'),
    (['--dataset', 'shapes', '--model', 'vitdet_tiny', '--mixup', '0.8', '--smoothing', '0.1'],
     '--smoothing, --mixup'),
    (['--dataset', 'shapes', '--model', 'vitdet_tiny', '--download'], '--download'),
])
def test_bad_detection_input_is_one_line_and_a_non_zero_exit(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code not in (0, None) and message in err
    assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err


def test_a_non_finite_detection_loss_stops_at_a_named_step(tmp_path, capsys):
    """The classifier's rule: the first step's update at lr 1e12 makes the second loss NaN."""
    with pytest.raises(SystemExit):
        train.main(TINY + ['--dataset', 'shapes', '--limit', '8', '--epochs', '1', '--lr', '1e12',
                           '--warmup-epochs', '0', '--output-dir', str(tmp_path)])
    assert 'non-finite loss or gradient at step 2' in capsys.readouterr().err
    assert not (tmp_path / 'last.pt').exists()


def test_finetune_initialises_the_backbone_from_a_classifier_checkpoint(tmp_path, capsys):
    source = classifier('fourier')
    torch.save(dict(model=source.state_dict(), config=source.config), tmp_path / 'vit.pt')
    # lr 0: the weights after one epoch are the weights the backbone started from
    train.main(['--model', 'vitdet_tiny', '--img-size', '128', '--device', 'cpu',
                '--dataset', 'shapes', '--attn', 'fourier', '--limit', '4', '--epochs', '1',
                '--lr', '0', '--warmup-epochs', '0', '--finetune', str(tmp_path / 'vit.pt'),
                '--output-dir', str(tmp_path / 'run')])
    assert 'left at init: nothing' in capsys.readouterr().out
    state = torch.load(tmp_path / 'run' / 'last.pt', weights_only=True)['model']
    assert torch.equal(state['backbone.blocks.0.mlp.0.weight'], source.blocks[0].mlp[0].weight)
