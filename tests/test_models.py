"""models.py: the standard architectures (parameter for parameter, function for function),
KArAt inside them (gradients, masks, sharing, scale), and clear errors."""
import pytest
import torch
import torchvision
from einops import einsum, rearrange
from torchvision.models.swin_transformer import SwinTransformer as TorchvisionSwin

import detection
import karat
import models

IMG = 32
# Each name at a small size that keeps its number of heads (ConViT's locality init depends on
# it): ViT 2 blocks, ConViT 1 GPSA + 2 MHSA, Swin 3 stages on 8, 4, 2 maps (windows 4, 4, 2).
SMALL = {
    'vit_tiny': dict(patch_size=4, depth=2, embed_dim=24),
    'vit_small': dict(patch_size=4, depth=2, embed_dim=24),
    'vit_base': dict(patch_size=4, depth=2, embed_dim=48),
    'convit_tiny': dict(patch_size=4, depth=3, embed_dim=32),
    'convit_small': dict(patch_size=4, depth=3, embed_dim=36),
    'convit_base': dict(patch_size=4, depth=3, embed_dim=64),
    'swin_t': dict(patch_size=4, depth=(2, 2, 2), num_heads=(3, 6, 12), embed_dim=24,
                   window_size=4),
    'swin_s': dict(patch_size=4, depth=(2, 4, 2), num_heads=(3, 6, 12), embed_dim=24,
                   window_size=4),
    'swin_b': dict(patch_size=4, depth=(2, 2, 2), num_heads=(4, 8, 16), embed_dim=32,
                   window_size=4),
}


def small(name, attn='softmax', seed=0, **options):
    torch.manual_seed(seed)
    return models.create_model(name, attn=attn, num_classes=10, img_size=IMG,
                               **{**SMALL[name], **options})


def images(batch=2, seed=0):
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def blocks(model):
    return [m for m in model.modules() if isinstance(m, models.Block)]


# --- the standard architectures ---------------------------------------------------------------

@pytest.mark.parametrize('name, num_classes, count', [
    ('vit_tiny', 10, 5_526_346),        # the paper's 5.53M; timm deit_tiny_patch16_224
    ('vit_small', 1000, 22_050_664),    # timm deit_small_patch16_224
    ('vit_base', 10, 85_806_346),       # timm deit_base_patch16_224
    ('convit_tiny', 1000, 5_710_512),   # timm convit_tiny / small / base
    ('convit_small', 1000, 27_777_322),
    ('convit_base', 1000, 86_540_040),
])
def test_softmax_vit_and_convit_have_timms_parameter_counts(name, num_classes, count):
    with torch.device('meta'):  # counting needs no memory or init
        assert n_params(models.create_model(name, num_classes=num_classes)) == count


@pytest.mark.parametrize('name', ['swin_t', 'swin_s', 'swin_b'])
def test_softmax_swin_has_torchvisions_parameter_count(name):
    with torch.device('meta'):
        assert n_params(models.create_model(name, num_classes=10)) == n_params(
            getattr(torchvision.models, name)(num_classes=10))


# (name, options, num_classes, Table 1 of the paper). Ours per operator: r·N·2G Fourier
# coefficients + N·r for W, for every head of every block (blockwise) or once (universal).
TABLE_1 = [
    ('vit_tiny', dict(grid=3), 10, 6.29e6),
    ('vit_tiny', dict(grid=3, mode='universal'), 10, 5.59e6),
    ('vit_small', dict(grid=3), 1000, 23.58e6),
    ('vit_base', dict(grid=1), 10, 87.51e6),
    ('vit_base', dict(grid=1, mode='universal'), 10, 85.95e6),
]


@pytest.mark.parametrize('name, options, num_classes, paper', TABLE_1)
def test_karat_parameter_counts_follow_our_accounting_and_are_within_3_percent_of_the_paper(
        name, options, num_classes, paper):
    with torch.device('meta'):
        softmax = n_params(models.create_model(name, num_classes=num_classes))
        ours = n_params(models.create_model(name, attn='fourier', num_classes=num_classes, rank=12,
                                            **options))
    heads, N, r, G = models.MODELS[name][1]['num_heads'], 197, 12, options['grid']
    operators = 1 if options.get('mode') == 'universal' else 12
    assert ours == softmax + operators * heads * (r * N * 2 * G + N * r)
    assert abs(ours / paper - 1) < 0.03


def copy_parameters(source, target):
    """Copy in registration order (ours follows torchvision's), checking every shape."""
    pairs = list(zip(source.parameters(), target.parameters(), strict=True))
    with torch.no_grad():
        for s, t in pairs:
            assert s.shape == t.shape
            # larger than the init, so that attention is far from uniform
            t.copy_(s.normal_(0, 0.2))


def test_softmax_swin_computes_torchvisions_function():
    ours = models.create_model('swin_t', num_classes=10, img_size=IMG, patch_size=4, embed_dim=24,
                               depth=(2, 2), num_heads=(2, 4), window_size=4).eval()
    theirs = TorchvisionSwin(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4],
                             window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=10).eval()
    copy_parameters(theirs, ours)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_swin_windows_divide_the_feature_maps_and_a_single_window_does_not_shift():
    with torch.device('meta'):
        standard = models.create_model('swin_t')
    assert standard.windows == [7, 7, 7, 7]
    model = models.create_model('swin_t', img_size=IMG, patch_size=4)  # maps 8, 4, 2, 1
    assert model.windows == [4, 4, 2, 1]
    shifts = [[b.attn.shift for b in blocks(stage)] for stage in model.stages]
    assert shifts == [[0, 2], [0, 0], [0, 0, 0, 0, 0, 0], [0, 0]]


# --- KArAt inside every model -----------------------------------------------------------------

# ConViT's positional softmax is invariant to a per-head constant: its bias never gets a gradient.
ZERO_GRADIENT = ('pos_proj.bias',)


@pytest.mark.parametrize('mode', karat.MODES)
@pytest.mark.parametrize('attn', ['softmax', 'fourier'])
# detectors: test_detection.py
@pytest.mark.parametrize('name', models.list_models())
def test_every_model_runs_forward_and_backward_with_gradients_reaching_every_parameter(
        name, attn, mode):
    model = small(name, attn, mode=mode)
    loss = torch.nn.functional.cross_entropy(model(images()), torch.tensor([1, 7]))
    loss.backward()
    assert torch.isfinite(loss)
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert pname.endswith(ZERO_GRADIENT) or p.grad.abs().sum() > 0, pname


def torchvision_shift_mask(size, window, shift):
    """Which keys a query of each window may attend to, built as torchvision's swin does."""
    region = torch.zeros(size, size)
    cuts = ((0, -window), (-window, -shift), (-shift, None))
    for n, (h, w) in enumerate((h, w) for h in cuts for w in cuts):
        region[h[0]:h[1], w[0]:w[1]] = n
    region = rearrange(region, '(nh i) (nw j) -> (nh nw) (i j)', i=window, j=window)
    return rearrange(region, 'n i -> n i 1') == rearrange(region, 'n j -> n 1 j')


@pytest.mark.parametrize('attn', karat.ATTENTIONS)
def test_swin_shifted_windows_give_masked_keys_exactly_zero_weight(attn):
    model = models.create_model('swin_t', attn=attn, num_classes=10, img_size=IMG, patch_size=4,
                                embed_dim=16, depth=(2,), num_heads=(2,), window_size=4, rank=8)
    shifted = model.stages[0][1].attn
    assert (shifted.window, shifted.shift) == (4, 2)
    allowed = torchvision_shift_mask(8, 4, 2).repeat(2, 1, 1)  # 4 windows of 16 tokens, 2 images
    assert not allowed.all()
    with models.capture_attention(model) as maps:
        model(images())
    weights = rearrange(maps['stages.0.1.attn.attend'], 'bw h i j -> h bw i j')
    assert (weights[:, ~allowed] == 0).all()
    assert (weights[:, allowed] != 0).float().mean() > 0.99


def test_swin_universal_mode_shares_one_operator_set_per_stage():
    universal, blockwise = small('swin_t', 'fourier', mode='universal'), small('swin_t', 'fourier')
    operators = lambda m: [[b.attn.attend.operator for b in blocks(stage)] for stage in m.stages]
    stages = operators(universal)
    assert all(op is ops[0] for ops in stages for op in ops)
    # heads, and so operators, differ per stage
    assert len({id(ops[0]) for ops in stages}) == len(stages)
    assert (len({id(op) for ops in operators(blockwise) for op in ops})
            == sum(SMALL['swin_t']['depth']))


def test_vit_and_convit_universal_mode_shares_parameters_across_blocks_and_blockwise_does_not():
    for name in ('vit_tiny', 'convit_tiny'):
        universal, blockwise = small(name, 'fourier', mode='universal'), small(name, 'fourier')
        shared = [b.attn.attend.operator.W for b in universal.blocks]
        own = [b.attn.attend.operator.W for b in blockwise.blocks]
        # ConViT's GPSA blocks see N patches and its MHSA blocks N + 1 tokens: two sets.
        assert len({id(W) for W in shared}) == (1 if name.startswith('vit') else 2)
        assert len({id(W) for W in own}) == len(own)


def test_karat_rank_is_capped_at_the_window_size():
    model = small('swin_t', 'fourier', rank=12)
    ranks = [blocks(stage)[0].attn.attend.operator.rank for stage in model.stages]
    assert ranks == [12, 12, 4]  # windows of 16, 16 and 4 tokens


# --- ConViT -----------------------------------------------------------------------------------

@pytest.mark.parametrize('attn', ['softmax', 'fourier', 'rational'])
def test_gpsa_mixes_content_and_position_with_gate_sigmoid_one_and_no_row_normalisation(attn):
    model = small('convit_small', attn)
    gpsa = model.blocks[0].attn
    assert torch.equal(gpsa.gating, torch.ones(9))
    x = torch.randn(2, 64, 36)
    q, k, v = gpsa.split_heads(x)
    gate = torch.sigmoid(torch.tensor(1.0))
    mixed = (1 - gate) * gpsa.attend.activate(q, k) + gate * gpsa.positional_attention()
    expected = gpsa.merge_heads(einsum(mixed, v, 'b h i j, b h j d -> b h i d'))
    torch.testing.assert_close(gpsa(x), expected, atol=1e-5, rtol=1e-4)
    rows = mixed.sum(-1)
    assert torch.allclose(rows, torch.ones_like(rows)) == (attn == 'softmax')


@pytest.mark.parametrize('name, heads',
                         [('convit_tiny', 4), ('convit_small', 9), ('convit_base', 16)])
def test_gpsa_positional_attention_starts_local(name, heads):
    gpsa = small(name).blocks[0].attn
    grid, k = IMG // 4, int(heads ** 0.5)
    y, x = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing='ij')
    pos = torch.stack([x.flatten(), y.flatten()], -1).float()
    delta = pos[None, :] - pos[:, None]                        # key minus query, (i j 2)
    b, a = torch.meshgrid(torch.arange(k), torch.arange(k), indexing='ij')
    centre = torch.stack([b.flatten(), a.flatten()], -1) - (k - 1) / 2  # head h = a + k b, (h 2)
    expected = (-((delta[None] - centre[:, None, None]) ** 2).sum(-1)).softmax(-1)
    torch.testing.assert_close(gpsa.positional_attention(), expected)
    dim = gpsa.proj.in_features
    assert torch.equal(gpsa.qkv.weight[2 * dim:], torch.eye(dim))  # V starts as the identity
    if k % 2:  # the middle head attends most to the query's own patch
        assert torch.equal(gpsa.positional_attention()[heads // 2].argmax(-1),
                           torch.arange(grid ** 2))


# --- scale of an untrained model --------------------------------------------------------------

def block_output_stds(model, x):
    stds = []
    hooks = [b.register_forward_hook(lambda m, args, out: stds.append(out.std()))
             for b in blocks(model)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return torch.stack(stds)


def unit_gain(model):
    """Linear weights N(0, 1/fan_in): logits of order one and an attention branch as large as
    the residual stream, where a badly scaled operator could not hide."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, m.in_features ** -0.5)


@pytest.mark.parametrize('init', ['standard', 'unit_gain'])
@pytest.mark.parametrize('name', ['vit_tiny', 'convit_tiny', 'swin_t'])
def test_untrained_karat_keeps_block_activations_on_the_softmax_scale(name, init):
    # With the paper's N(0, 1) coefficients the ratio below is 14-30 (standard) and 80-430
    # (unit gain).
    softmax = small(name)
    if init == 'unit_gain':
        unit_gain(softmax)
    reference = block_output_stds(softmax, images(8))
    for attn in ('fourier', 'bspline', 'rational', 'morlet'):
        model = small(name, attn)
        model.load_state_dict(softmax.state_dict(), strict=False)  # everything but the operators
        ratio = block_output_stds(model, images(8)) / reference
        assert ((0.5 < ratio) & (ratio < 2)).all(), (attn, ratio)


# --- interface and errors ---------------------------------------------------------------------

@pytest.mark.parametrize('name', ['vit_tiny', 'convit_tiny', 'swin_t'])
def test_an_image_of_another_size_raises_naming_the_expected_size(name):
    model = small(name, 'fourier')
    with pytest.raises(ValueError, match=r'expected images of shape \(batch, 3, 32, 32\), '
                                         r'got \(2, 3, 48, 48\)'):
        model(torch.randn(2, 3, 48, 48))


def test_unknown_names_and_options_raise_listing_the_valid_ones():
    with pytest.raises(ValueError, match="unknown model 'vit_huge'; "
                                         "allowed: convit_base, .*, vit_tiny"):
        models.create_model('vit_huge')
    with pytest.raises(ValueError, match="unknown attention 'fourrier'; "
                                         "allowed: softmax, fourier, bspline"):
        models.create_model('swin_t', attn='fourrier')
    with pytest.raises(ValueError, match="unknown option.* window_size for vit_tiny; "
                                         "allowed: mode, .*drop_path_rate"):
        models.create_model('vit_tiny', window_size=7)
    with pytest.raises(ValueError, match='per-stage sequences'):
        models.create_model('swin_t', depth=12)
    with pytest.raises(ValueError, match='img_size 30 is not a multiple of patch_size 4'):
        models.create_model('vit_tiny', img_size=30, patch_size=4)


@pytest.mark.parametrize('num_classes', [0, -3, 2.5, True])
@pytest.mark.parametrize('name', ['vit_tiny', 'convit_tiny', 'swin_t', 'vitdet_tiny'])
def test_a_number_of_classes_below_one_is_refused_naming_the_allowed_values(name, num_classes):
    create = detection.create_detector if name in detection.DETECTORS else models.create_model
    with torch.device('meta'), pytest.raises(ValueError,
                                             match=f'num_classes must be an integer >= 1.*'
                                                   f'got {num_classes!r}'):
        create(name, num_classes=num_classes)


@pytest.mark.parametrize('name', ['vit_tiny', 'convit_tiny', 'swin_t'])
def test_config_rebuilds_the_same_model(name):
    model = small(name, 'fourier', mode='universal', grid=2).eval()
    config = dict(model.config)
    rebuilt = models.create_model(config.pop('name'), **config).eval()
    rebuilt.load_state_dict(model.state_dict())
    x = images()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_every_attention_block_has_a_hookable_attend_module():
    for name in ('vit_tiny', 'convit_tiny', 'swin_t'):
        model = small(name, 'fourier')
        with models.capture_attention(model) as maps:
            model(images())
        assert sorted(maps) == sorted(f'{n}.attn.attend' for n, m in model.named_modules()
                                      if isinstance(m, models.Block))
