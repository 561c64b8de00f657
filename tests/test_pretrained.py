"""Starting from the weights people have: timm's DeiT and ConViT and torchvision's ViT and Swin
state_dicts (built here with random weights at 32 px, saved, read back) load into our models,
a softmax model then computes its source's function, and a KArAt model takes every weight but
the activation. Other architectures are refused with one line."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torchvision
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer as TorchvisionSwin

import detection
import models
import weights

ROOT = Path(__file__).resolve().parent.parent
IMG = 32

# Each source at a small size (its own layers and key layout, our IMG, patch 4, a few blocks),
# and the same architecture in models.py.
SOURCES = {
    'timm deit': (
        lambda: timm.create_model('deit_tiny_patch16_224', img_size=IMG, patch_size=4, depth=2,
                                  embed_dim=48, num_classes=10),
        'vit_tiny', dict(patch_size=4, depth=2, embed_dim=48)),
    'timm convit': (  # timm's embed_dim is per head: 8 x 4 heads
        lambda: timm.create_model('convit_tiny', img_size=IMG, patch_size=4, depth=3,
                                  local_up_to_layer=1, embed_dim=8, num_classes=10),
        'convit_tiny', dict(patch_size=4, depth=3, embed_dim=32)),
    'torchvision vit': (
        lambda: torchvision.models.VisionTransformer(image_size=IMG, patch_size=4, num_layers=2,
                                                     num_heads=3, hidden_dim=48, mlp_dim=192,
                                                     num_classes=10),
        'vit_base', dict(patch_size=4, depth=2, embed_dim=48, num_heads=3)),
    'torchvision swin': (  # windows of 4 divide the 8 x 8 and 4 x 4 maps: the window rules agree
        lambda: TorchvisionSwin(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4],
                                window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=10),
        'swin_t', dict(patch_size=4, embed_dim=24, depth=(2, 2), num_heads=(2, 4), window_size=4)),
}


def source(kind, seed=0, perturb=False):
    torch.manual_seed(seed)
    model = SOURCES[kind][0]().eval()
    if perturb:  # far from the init: attention far from uniform, every norm and bias non-trivial
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.2)
    return model


def ours(kind, attn='softmax', seed=1, **options):
    torch.manual_seed(seed)
    _, name, arch = SOURCES[kind]
    return models.create_model(name, attn=attn,
                               **{'num_classes': 10, 'img_size': IMG, **arch, **options})


def saved(model, path):
    torch.save(model.state_dict(), path)
    return path


def images(batch=2):
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))


def refusal(model, checkpoint, **kw):
    with pytest.raises(ValueError) as e:
        weights.load_pretrained(model, checkpoint, **kw)
    message = str(e.value)
    assert '\n' not in message
    return message


@pytest.mark.parametrize('kind', SOURCES)
def test_a_loaded_softmax_model_computes_its_sources_function(kind, tmp_path):
    """At the source's own init (where LayerNorm's eps shows) and with random weights."""
    for perturb in (False, True):
        theirs = source(kind, perturb=perturb)
        model = ours(kind).eval()
        path = saved(theirs, tmp_path / 'source.pth')
        assert weights.load_pretrained(model, path, head=True) == []
        with torch.no_grad():
            torch.testing.assert_close(model(images()), theirs(images()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('kind', SOURCES)
def test_every_layer_norm_has_its_sources_eps(kind):
    eps = lambda m: [n.eps for n in m.modules() if isinstance(n, nn.LayerNorm)]
    assert eps(ours(kind)) == eps(source(kind))


@pytest.mark.parametrize('kind', SOURCES)
def test_a_fourier_karat_model_takes_every_weight_but_the_activation_and_trains(kind, tmp_path):
    path = saved(source(kind, perturb=True), tmp_path / 'source.pth')
    softmax, model, fresh = ours(kind), ours(kind, 'fourier'), ours(kind, 'fourier')
    weights.load_pretrained(softmax, path)
    at_init = weights.load_pretrained(model, path)
    assert at_init and all(weights.is_operator(k) or k.startswith('head.') for k in at_init)
    loaded, own, init = softmax.state_dict(), model.state_dict(), fresh.state_dict()
    for key, value in own.items():
        assert torch.equal(value, init[key] if key in at_init else loaded[key]), key
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):  # a step, then the loss and gradients after it
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images()), torch.tensor([1, 7]))
        loss.backward()
        assert torch.isfinite(loss)
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        optimizer.step()


def test_the_head_is_new_unless_kept_and_a_kept_head_needs_the_same_classes(tmp_path):
    theirs = source('timm deit', perturb=True)
    path = saved(theirs, tmp_path / 'deit.pth')
    model = ours('timm deit')
    head = model.head.weight.clone()
    assert weights.load_pretrained(model, path) == ['head.bias', 'head.weight']
    assert torch.equal(model.head.weight, head)
    five = ours('timm deit', num_classes=5)
    assert "head.bias is (10,) where (5,) is expected" in refusal(five, path, head=True)


def test_position_embeddings_of_another_image_size_are_resampled_keeping_the_cls_entry(tmp_path):
    theirs = source('timm deit', perturb=True)
    model = ours('timm deit', img_size=64)  # 16 x 16 patches where the source has 8 x 8
    weights.load_pretrained(model, saved(theirs, tmp_path / 'deit.pth'))
    assert torch.equal(model.pos_embed[:, 0], theirs.pos_embed[:, 0])
    resampled = weights.resample_grid(theirs.pos_embed[:, 1:], 1, 256)
    assert torch.equal(model.pos_embed[:, 1:], resampled)


@pytest.mark.parametrize('img, same', [(32, True), (64, True), (48, False)])
def test_swin_is_torchvisions_function_exactly_where_the_window_divides_every_stages_map(
        img, same, tmp_path):
    """Patch 4, window 4, two stages: maps img/4 and img/8 are multiples of 4 at 32 and 64 px.
    At 48 (maps 12 and 6) torchvision pads the 6 x 6 map to 8 x 8 and attends to the padding;
    ours shrinks that stage's window to 3 (its bias table resampled from 7 x 7 offsets to 5 x 5)."""
    torch.manual_seed(0)
    theirs = TorchvisionSwin(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4],
                             window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=10).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.2)
    model = ours('torchvision swin', img_size=img).eval()
    weights.load_pretrained(model, saved(theirs, tmp_path / 'swin.pth'), head=True)
    x = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (model(x) - theirs(x)).abs().max()
    assert (difference < 1e-5) == same, difference


def test_a_train_checkpoint_of_the_same_karat_model_gives_its_operators_too(tmp_path):
    trained = ours('timm deit', 'fourier', seed=2)
    torch.save(dict(model=trained.state_dict(), config=trained.config), tmp_path / 'best.pt')
    model = ours('timm deit', 'fourier')
    assert weights.load_pretrained(model, tmp_path / 'best.pt', head=True) == []
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in model.state_dict().items())
    naive = ours('timm deit', 'fourier', efficient=False)  # the same operators, computed naively
    assert weights.load_pretrained(naive, tmp_path / 'best.pt', head=True) == []
    other = ours('timm deit', 'fourier', grid=1)  # another G: its operators start at init
    at_init = weights.load_pretrained(other, tmp_path / 'best.pt')
    assert any(map(weights.is_operator, at_init))


@pytest.mark.parametrize('kind, name, arch, named', [
    ('timm deit', 'convit_tiny', dict(depth=2, embed_dim=48), 'it lacks blocks.0.attn.gating,'),
    ('timm deit', 'vit_tiny', dict(depth=3, embed_dim=48), 'it lacks blocks.2.attn.proj.bias,'),
    ('timm deit', 'vit_tiny', dict(depth=2, embed_dim=96),
     'blocks.0.attn.proj.bias is (48,) where (96,) is expected'),
    ('torchvision swin', 'vit_tiny', dict(depth=2, embed_dim=24),
     'the model has no patch_norm.bias,'),
])
def test_another_architecture_is_refused_in_one_line_naming_what_differs(kind, name, arch, named,
                                                                         tmp_path):
    path = saved(source(kind), tmp_path / 'source.pth')
    message = refusal(models.create_model(name, num_classes=10, img_size=IMG, patch_size=4, **arch),
                      path)
    assert named in message
    assert message.count(name) == 1  # the model is named once, the checkpoint by its layout


@pytest.mark.parametrize('wrap', [lambda sd, cfg: {'model': sd}, lambda sd, cfg: {'state_dict': sd},
                                  lambda sd, cfg: {'model': sd, 'config': cfg}],
                         ids=["DeiT's own {'model'}", "{'state_dict'}", 'train.py layout'])
def test_a_wrapped_state_dict_loads_as_the_bare_one(wrap):
    theirs = source('timm deit', perturb=True)
    model = ours('timm deit').eval()
    assert weights.load_pretrained(model, wrap(theirs.state_dict(), model.config), head=True) == []
    with torch.no_grad():
        torch.testing.assert_close(model(images()), theirs(images()), atol=1e-5, rtol=1e-5)


def test_a_safetensors_file_as_timm_downloads_it_loads_like_a_state_dict(tmp_path):
    theirs = source('timm deit', perturb=True)
    safetensors.torch.save_file(theirs.state_dict(), tmp_path / 'model.safetensors')
    model = ours('timm deit').eval()
    assert weights.load_pretrained(model, tmp_path / 'model.safetensors', head=True) == []
    with torch.no_grad():
        torch.testing.assert_close(model(images()), theirs(images()), atol=1e-5, rtol=1e-5)


def test_an_unknown_layout_is_refused_naming_the_known_ones():
    message = refusal(ours('timm deit'), {'weight': torch.zeros(1)})
    assert 'timm (patch_embed.proj.weight)' in message and 'torchvision Swin' in message


# ViTDet's backbone --------------------------------------------------------------------------

@pytest.mark.parametrize('make', [
    lambda: timm.create_model('deit_tiny_patch16_224', img_size=128, embed_dim=96, depth=4,
                              num_heads=3),
    lambda: torchvision.models.VisionTransformer(image_size=128, patch_size=16, num_layers=4,
                                                 num_heads=3, hidden_dim=96, mlp_dim=384),
], ids=['timm deit', 'torchvision vit'])
def test_load_backbone_takes_a_timm_or_torchvision_vit(make, tmp_path):
    """vitdet_tiny's 8 x 8 grid is the classifier's: the backbone is the classifier's ViT."""
    torch.manual_seed(0)
    path = saved(make(), tmp_path / 'vit.pth')
    detector = detection.create_detector('vitdet_tiny', attn='fourier')
    report = weights.load_backbone(detector, path)
    assert report['missing'] and all(map(weights.is_operator, report['missing']))  # at init
    assert report['unused'] == ['cls_token', 'head.bias', 'head.weight', 'norm.bias', 'norm.weight']
    _, state, _ = weights.read_weights(path)
    backbone = detector.backbone.state_dict()
    assert torch.equal(backbone['pos_embed'], state['pos_embed'][:, 1:])
    for key in ('patch_embed.weight', 'blocks.3.attn.qkv.weight', 'blocks.3.mlp.2.bias',
                'blocks.0.norm1.weight'):
        assert torch.equal(backbone[key], state[key]), key


def test_load_backbone_refuses_a_convit_whose_position_embedding_has_no_cls_entry(tmp_path):
    path = saved(source('timm convit'), tmp_path / 'convit.pth')
    with pytest.raises(ValueError, match="not a ViT classifier"):
        weights.load_backbone(detection.create_detector('vitdet_tiny'), path)


# The command line ---------------------------------------------------------------------------

def train_py(*args):
    return subprocess.run([sys.executable, 'train.py', *args], cwd=ROOT, capture_output=True,
                          env=dict(os.environ, OMP_NUM_THREADS='1'), text=True, timeout=300)


def test_finetune_starts_a_karat_run_from_a_timm_file_and_refuses_another_depth_in_one_line(
        tmp_path):
    torch.manual_seed(0)
    deit = timm.create_model('deit_tiny_patch16_224', img_size=8, patch_size=2, depth=1,
                             embed_dim=48, num_classes=10)  # digits: 8 x 8 px, 10 classes
    path = saved(deit, tmp_path / 'deit.pth')
    run = ['--model', 'vit_tiny', '--img-size', '8', '--patch-size', '2', '--embed-dim', '48',
           '--device', 'cpu', '--limit', '32', '--epochs', '1', '--workers', '0',
           '--finetune', str(path), '--keep-head']
    done = train_py(*run, '--depth', '1', '--output-dir', str(tmp_path / 'run'))
    assert done.returncode == 0, done.stderr
    assert 'left at init: blocks.0.attn.attend.operator.' in done.stdout
    refused = train_py(*run, '--depth', '2', '--output-dir', str(tmp_path / 'refused'))
    assert refused.returncode != 0 and 'Traceback' not in refused.stderr
    assert refused.stderr.count('\n') == 1 and 'it lacks blocks.1.' in refused.stderr
