"""Vision transformers whose attention is chosen by a string: 'softmax' or a KArAt basis.

    model = create_model('vit_tiny', attn='fourier', num_classes=10, img_size=224)

Three families, each the standard architecture with its softmax replaced by an `attend`
module from karat.py (every attention block has one, so a forward hook can record it):
    ViT (DeiT)  CLS token, learned position embedding, pre-norm blocks
    ConViT      gated positional self-attention (GPSA) blocks, then MHSA blocks with the CLS token
    Swin        shifted-window attention with relative position bias, patch merging
The softmax models have exactly the parameters of timm's DeiT/ConViT and torchvision's Swin.
"""
import inspect
import math
import re
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, fields

import torch
from einops import einsum, rearrange, repeat
from torch import nn
from torch.nn import functional as F
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

import karat

# Shared pieces ---------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention; `attend` is the softmax or the learnable KArAt operator."""

    def __init__(self, dim, heads, seq_len, make_attend, qkv_bias=True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attend = make_attend(heads, seq_len)
        self.proj = nn.Linear(dim, dim)

    def split_heads(self, x):
        return rearrange(self.qkv(x), 'b n (three h d) -> three b h n d', three=3, h=self.heads)

    def merge_heads(self, out):
        return self.proj(rearrange(out, 'b h n d -> b n (h d)'))

    def forward(self, x, bias=None, mask=None):
        q, k, v = self.split_heads(x)
        return self.merge_heads(self.attend(q, k, v, bias, mask))


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch with probability p."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= self.p
        return x * keep / (1 - self.p)


def drop_path_rates(rate, depth):
    """Stochastic depth growing linearly from 0 in the first block to `rate` in the last."""
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


def mlp(dim, hidden):
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


# LayerNorm's eps as in the architecture reproduced: DeiT, ConViT and ViTDet's ViT use 1e-6,
# torchvision's Swin uses PyTorch's default, 1e-5. Another eps moves the logits of a loaded model
# (by up to 1e-2 at init), so it would not compute its source's function.
VIT_EPS, SWIN_EPS = 1e-6, 1e-5


class Block(nn.Module):
    """Pre-norm transformer block, x = x + attn(norm(x)); x = x + mlp(norm(x)), over the last
    axis, so tokens may be a sequence (b n d) or a map (b h w d)."""

    def __init__(self, dim, attn, drop_path=0.0, mlp_ratio=4, eps=VIT_EPS):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=eps), attn
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=eps), mlp(dim, mlp_ratio * dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_weights(module):
    """DeiT's and torchvision's init: linear weights from a truncated N(0, 0.02²), zero biases.
    `Module.apply` visits children first, so GPSA's locality init comes after its linears'."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, GPSA):
        module.local_init()


def check_size(x, img_size, in_chans):
    if x.dim() != 4 or x.shape[1] != in_chans or tuple(x.shape[-2:]) != (img_size, img_size):
        raise ValueError(f"expected images of shape (batch, {in_chans}, {img_size}, {img_size}), "
                         f"got {tuple(x.shape)}; "
                         "the model was built for this size (KArAt fixes the number of tokens N)")


def check_arch(img_size, patch_size, embed_dim, num_heads):
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")


def patch_tokens(patch_embed, x):
    return rearrange(patch_embed(x), 'b d h w -> b (h w) d')


# ViT -------------------------------------------------------------------------------------

class VisionTransformer(nn.Module):
    """ViT as in DeiT: patches, a CLS token, learned position embeddings, pre-norm blocks.
    Every block attends over N = (img_size / patch_size)² + 1 tokens."""

    def __init__(self, make_attend, img_size=224, patch_size=16, in_chans=3, num_classes=1000,
                 embed_dim=192, depth=12, num_heads=3, drop_path_rate=0.0):
        super().__init__()
        check_arch(img_size, patch_size, embed_dim, num_heads)
        self.img_size, self.in_chans = img_size, in_chans
        n = (img_size // patch_size) ** 2 + 1
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, n, embed_dim), std=0.02))
        rates = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            Block(embed_dim, Attention(embed_dim, num_heads, n, make_attend), p) for p in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=VIT_EPS)
        self.head = nn.Linear(embed_dim, num_classes)
        self.apply(init_weights)

    def forward_features(self, x):
        check_size(x, self.img_size, self.in_chans)
        x = patch_tokens(self.patch_embed, x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x):
        return self.head(self.forward_features(x)[:, 0])


# ConViT ----------------------------------------------------------------------------------

def relative_offsets(grid):
    """r_ij = (δx, δy, δx² + δy²) with δ = position of patch j - position of patch i, on a
    grid x grid map of patches numbered row by row: (N, N, 3), N = grid²."""
    y, x = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing='ij')
    pos = torch.stack([x.flatten(), y.flatten()], dim=-1).float()
    delta = rearrange(pos, 'j c -> 1 j c') - rearrange(pos, 'i c -> i 1 c')
    return torch.cat([delta, (delta ** 2).sum(-1, keepdim=True)], dim=-1)


class GPSA(Attention):
    """Gated positional self-attention (d'Ascoli et al. 2021) over the N patches (no CLS):

        O_h = (1 - σ(λ_h)) attend(Q_h, K_h, V_h) + σ(λ_h) P_h V_h,
        P_h = softmax_j(r_ij · v_pos_h)

    KArAt replaces only the content attention, and the sum is not divided by its row sum as
    ConViT does: after two softmaxes that is a no-op, after a learnable σ̂ a division by ~0.
    The content term stays re-associated (O = Z (W^T V)) as `attend` computes it.

    Init: λ_h = 1, so σ(λ) = 0.73 and every head starts mostly positional. Locality with
    strength α: the heads h = a + k b (k = ⌊√heads⌋, c = (k - 1)/2) get
    v_pos_h = α (2Δx, 2Δy, -1), Δ = (b - c, a - c), so P_h ∝ exp(-α |δ - Δ|²) is centred
    on the offset Δ (heads beyond k², if any, stay random); V starts as the identity map.
    """

    def __init__(self, dim, heads, grid, make_attend, locality_strength=1.0):
        super().__init__(dim, heads, grid ** 2, make_attend, qkv_bias=False)
        self.locality_strength = locality_strength
        self.pos_proj = nn.Linear(3, heads)
        self.gating = nn.Parameter(torch.ones(heads))
        self.register_buffer('rel', relative_offsets(grid), persistent=False)

    @torch.no_grad()
    def local_init(self):
        dim, k = self.proj.in_features, math.isqrt(self.heads)
        self.qkv.weight[2 * dim:].copy_(torch.eye(dim))
        b, a = torch.meshgrid(torch.arange(k), torch.arange(k), indexing='ij')
        delta = torch.stack([b.flatten(), a.flatten()], dim=-1) - (k - 1) / 2
        self.pos_proj.weight[:k * k] = self.locality_strength * torch.cat(
            [2 * delta, -torch.ones(k * k, 1)], dim=-1)

    def positional_attention(self):
        """P (h i j): softmax over keys of the learned function of the relative offsets."""
        return rearrange(self.pos_proj(self.rel), 'i j h -> h i j').softmax(dim=-1)

    def forward(self, x):
        q, k, v = self.split_heads(x)
        gate = rearrange(self.gating.sigmoid(), 'h -> h 1 1')
        positional = einsum(self.positional_attention(), v, 'h i j, b h j d -> b h i d')
        return self.merge_heads((1 - gate) * self.attend(q, k, v) + gate * positional)


class ConViT(nn.Module):
    """ConViT: max(depth - 2, 1) GPSA blocks over the N patches, then MHSA blocks over N + 1
    tokens, the CLS token joining before the first MHSA block (10 + 2 at depth 12)."""

    def __init__(self, make_attend, img_size=224, patch_size=16, in_chans=3, num_classes=1000,
                 embed_dim=192, depth=12, num_heads=4, drop_path_rate=0.0, locality_strength=1.0):
        super().__init__()
        check_arch(img_size, patch_size, embed_dim, num_heads)
        if depth < 2:
            raise ValueError("a ConViT needs depth >= 2 (GPSA blocks, then MHSA blocks with the "
                             f"CLS token), got {depth}")
        self.img_size, self.in_chans = img_size, in_chans
        grid = img_size // patch_size
        self.num_gpsa = max(depth - 2, 1)
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(
            nn.init.trunc_normal_(torch.empty(1, grid ** 2, embed_dim), std=0.02))
        attention = lambda i: (
            GPSA(embed_dim, num_heads, grid, make_attend, locality_strength) if i < self.num_gpsa
            else Attention(embed_dim, num_heads, grid ** 2 + 1, make_attend, qkv_bias=False))
        rates = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(Block(embed_dim, attention(i), p) for i, p in enumerate(rates))
        self.norm = nn.LayerNorm(embed_dim, eps=VIT_EPS)
        self.head = nn.Linear(embed_dim, num_classes)
        self.apply(init_weights)

    def forward_features(self, x):
        check_size(x, self.img_size, self.in_chans)
        x = patch_tokens(self.patch_embed, x) + self.pos_embed
        for i, block in enumerate(self.blocks):
            if i == self.num_gpsa:
                x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            x = block(x)
        return self.norm(x)

    def forward(self, x):
        return self.head(self.forward_features(x)[:, 0])


# Swin ------------------------------------------------------------------------------------

def window_partition(x, window):
    """(b, H, W, c) -> (b·nW, N, c): non-overlapping window x window patches, N = window²."""
    return rearrange(x, 'b (nh wh) (nw ww) c -> (b nh nw) (wh ww) c', wh=window, ww=window)


def window_reverse(windows, window, size):
    """The inverse of `window_partition` for a size x size map."""
    n = size // window
    return rearrange(windows, '(b nh nw) (wh ww) c -> b (nh wh) (nw ww) c', nh=n, nw=n, wh=window)


def shift_mask(size, window, shift):
    """Which keys each query may attend to after the cyclic shift by -shift: (nW, N, N) bool.

    Rolling the map wraps its last `shift` rows and columns around; within a window, tokens
    from different strips of the unrolled map (edges [0, size - window), [size - window,
    size - shift), [size - shift, size) along each axis) are not neighbours and must not attend."""
    strip = torch.zeros(size, dtype=torch.long)
    strip[size - window:] += 1
    strip[size - shift:] += 1
    region = rearrange(3 * strip, 'h -> h 1') + rearrange(strip, 'w -> 1 w')
    region = window_partition(rearrange(region, 'h w -> 1 h w 1'), window)[..., 0]
    return rearrange(region, 'n i -> n i 1') == rearrange(region, 'n j -> n 1 j')


def relative_position_index(window):
    """Index into the ((2·window - 1)², heads) bias table for every (query, key) pair: (N, N)."""
    y, x = torch.meshgrid(torch.arange(window), torch.arange(window), indexing='ij')
    y, x = y.flatten(), x.flatten()
    dy, dx = (rearrange(t, 'i -> i 1') - rearrange(t, 'j -> 1 j') + window - 1 for t in (y, x))
    return dy * (2 * window - 1) + dx


def shifted_window_attention(x, attention, window, shift=0, bias=None, mask=None):
    """Self-attention within windows of the map cyclically shifted by -shift: (b, H, W, c) ->
    (b, H, W, c). `attention` maps (b·nW, N, c) tokens to (b·nW, N, c) and is given the
    relative position bias (h, N, N) and the shift mask (nW, N, N), expanded to the window batch."""
    b, size = x.shape[0], x.shape[1]
    if shift:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
    if mask is not None:
        mask = repeat(mask, 'nw i j -> (b nw) 1 i j', b=b)
    x = window_reverse(attention(window_partition(x, window), bias=bias, mask=mask), window, size)
    return torch.roll(x, shifts=(shift, shift), dims=(1, 2)) if shift else x


class WindowAttention(Attention):
    """Swin's (shifted) window attention on a size x size map; N = window² tokens per window.
    KArAt activates the logits after the relative position bias and the mask, and a masked
    key gets exactly zero weight (an additive -100 would not do for a learnable φ)."""

    def __init__(self, dim, heads, size, window, shift, make_attend):
        super().__init__(dim, heads, window ** 2, make_attend)
        self.window, self.shift = window, shift
        self.relative_position_bias_table = nn.Parameter(
            nn.init.trunc_normal_(torch.empty((2 * window - 1) ** 2, heads), std=0.02))
        self.register_buffer('relative_position_index', relative_position_index(window),
                             persistent=False)
        self.register_buffer('mask', shift_mask(size, window, shift) if shift else None,
                             persistent=False)

    def forward(self, x):
        bias = rearrange(self.relative_position_bias_table[self.relative_position_index],
                         'i j h -> h i j')
        return shifted_window_attention(x, super().forward, self.window, self.shift, bias,
                                        self.mask)


class PatchMerging(nn.Module):
    """Each 2 x 2 group of tokens becomes one: (b, H, W, c) -> (b, ⌈H/2⌉, ⌈W/2⌉, 2c), odd
    maps zero-padded (torchvision's layout and order of the four tokens)."""

    def __init__(self, dim):
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim, eps=SWIN_EPS)

    def forward(self, x):
        x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
        return self.reduction(self.norm(rearrange(x, 'b (h i) (w j) c -> b h w (j i c)', i=2, j=2)))


def fit_window(size, window):
    """The largest window <= `window` that divides the size x size feature map: 7 on the
    56, 28, 14, 7 maps of a 224 input; 4, 4, 2, 1 on the 8, 4, 2, 1 maps of a 32 input."""
    return max(w for w in range(1, min(window, size) + 1) if size % w == 0)


class SwinTransformer(nn.Module):
    """Swin (Liu et al. 2021) as torchvision's swin_t/s/b: `depth` and `num_heads` per stage,
    each stage after the first starting with a patch merging that halves the map. Blocks
    alternate plain and shifted windows (shift = window // 2), and a stage whose map is a
    single window does not shift. Window sizes follow `fit_window`."""

    def __init__(self, make_attend, img_size=224, patch_size=4, in_chans=3, num_classes=1000,
                 embed_dim=96, depth=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7,
                 drop_path_rate=0.0):
        super().__init__()
        if not (isinstance(depth, (list, tuple)) and isinstance(num_heads, (list, tuple))
                and len(depth) == len(num_heads)):
            raise ValueError("Swin's depth and num_heads are per-stage sequences of one length, "
                             "e.g. (2, 2, 6, 2) and (3, 6, 12, 24); "
                             f"got {depth!r} and {num_heads!r}")
        for i, heads in enumerate(num_heads):
            check_arch(img_size, patch_size, embed_dim * 2 ** i, heads)
        self.img_size, self.in_chans = img_size, in_chans
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.patch_norm = nn.LayerNorm(embed_dim, eps=SWIN_EPS)
        rates = iter(drop_path_rates(drop_path_rate, sum(depth)))
        size, self.windows, self.stages = img_size // patch_size, [], nn.ModuleList()
        for i, (blocks, heads) in enumerate(zip(depth, num_heads)):
            dim = embed_dim * 2 ** i
            size = size if i == 0 else (size + 1) // 2
            window = fit_window(size, window_size)
            shift = lambda j: window // 2 if j % 2 and window < size else 0
            self.windows.append(window)
            self.stages.append(nn.Sequential(
                *([PatchMerging(dim // 2)] if i else []),
                *(Block(dim, WindowAttention(dim, heads, size, window, shift(j), make_attend),
                        next(rates), eps=SWIN_EPS)
                  for j in range(blocks))))
        self.norm = nn.LayerNorm(dim, eps=SWIN_EPS)
        self.head = nn.Linear(dim, num_classes)
        self.apply(init_weights)

    def forward_features(self, x):
        check_size(x, self.img_size, self.in_chans)
        x = self.patch_norm(rearrange(self.patch_embed(x), 'b c h w -> b h w c'))
        for stage in self.stages:
            x = stage(x)
        return self.norm(x)

    def forward(self, x):
        return self.head(self.forward_features(x).mean(dim=(1, 2)))


# Factory ---------------------------------------------------------------------------------

MODELS = {
    'vit_tiny': (VisionTransformer, dict(embed_dim=192, num_heads=3)),
    'vit_small': (VisionTransformer, dict(embed_dim=384, num_heads=6)),
    'vit_base': (VisionTransformer, dict(embed_dim=768, num_heads=12)),
    'convit_tiny': (ConViT, dict(embed_dim=192, num_heads=4)),    # 48 dims per head
    'convit_small': (ConViT, dict(embed_dim=432, num_heads=9)),
    'convit_base': (ConViT, dict(embed_dim=768, num_heads=16)),
    'swin_t': (SwinTransformer, dict(embed_dim=96, depth=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))),
    'swin_s': (SwinTransformer, dict(embed_dim=96, depth=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))),
    'swin_b': (SwinTransformer, dict(embed_dim=128, depth=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))),
}
ATTENTION_OPTIONS = tuple(f.name for f in fields(karat.AttentionConfig) if f.name != 'attn')


def list_models():
    return sorted(MODELS)


def architecture_options(cls):
    return [p for p in inspect.signature(cls).parameters
            if p not in ('make_attend', 'img_size', 'num_classes')]


def create_model(name, *, attn='softmax', num_classes=None, img_size=None, **options):
    """Build a model by name with the attention `attn`: 'softmax' or a basis of karat.BASES,
    with karat.AttentionConfig's fields as keywords (mode, grid, rank, base, order, simplex,
    efficient, kernel, chunk_elements), or an AttentionConfig.

    Architecture overrides: patch_size, embed_dim, depth, num_heads, in_chans, drop_path_rate;
    window_size for Swin (whose depth and num_heads are per-stage tuples); locality_strength
    for ConViT. num_classes and img_size default to the model's own: 1000 and 224 for
    classifiers, see the ViTDet section for detectors. The call's arguments are kept in
    `model.config`: create_model(config.pop('name'), **config)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(list_models())}")
    # an int only: 2.0 classes would reach nn.Linear and fail there, far from the cause
    whole = isinstance(num_classes, int) and not isinstance(num_classes, bool)
    if num_classes is not None and not (whole and num_classes >= 1):
        raise ValueError("num_classes must be an integer >= 1 (the detectors count the "
                         f"background: >= 2), got {num_classes!r}")
    cls, defaults = MODELS[name]
    arch_options = architecture_options(cls)
    unknown = set(options) - set(ATTENTION_OPTIONS) - set(arch_options)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))} for {name}; "
                         f"allowed: {', '.join(ATTENTION_OPTIONS + tuple(arch_options))}")
    given = {k: v for k, v in options.items() if k in ATTENTION_OPTIONS}
    attention = karat.attention_config(attn, **given)
    sizes = {k: v for k, v in dict(num_classes=num_classes, img_size=img_size).items()
             if v is not None}
    arch = {'num_classes': 1000, 'img_size': 224, **defaults, **sizes,
            **{k: v for k, v in options.items() if k in arch_options}}
    model = cls(karat.attention_maker(attention), **arch)
    if attention.attn != 'softmax' and 1 in getattr(model, 'windows', ()):
        warnings.warn(f"{name} at {arch['img_size']} px, patch {model.patch_embed.stride[0]}: "
                      f"windows {'/'.join(map(str, model.windows))} per stage. A window of one "
                      "token leaves KArAt φ(q·k) v, a gate on a logit nothing bounds (softmax "
                      "there is v itself); choose a size whose every stage has windows of 2 or "
                      "more (swin_t at 64 px, patch 4: 4/4/4/2)", stacklevel=2)
    if isinstance(attn, karat.AttentionConfig):  # a config records every field, as keywords
        attn, given = attention.attn, {k: v for k, v in asdict(attention).items() if k != 'attn'}
    model.config = dict(name=name, attn=attn, num_classes=arch['num_classes'],
                        img_size=arch['img_size'], **given,
                        **{k: v for k, v in options.items() if k in arch_options})
    return model


# Inspecting a model ----------------------------------------------------------------------

@contextmanager
def capture_attention(model, what='activated'):
    """Record the activated matrix (what='activated') or the logits A = q k^T / sqrt(d) + bias
    (what='logits') of every attention block of `model`, (b h i j): {module name: tensor}.

    with capture_attention(model) as maps:
        model(images)
    """
    if what not in ('activated', 'logits'):
        raise ValueError(f"unknown capture {what!r}; allowed: activated, logits")

    def hook(name):
        def record(module, args, kwargs, out):
            a = inspect.signature(module.forward).bind(*args, **kwargs).arguments
            q, k, bias, mask = a['q'], a['k'], a.get('bias'), a.get('mask')
            S = karat.logits(q, k, bias) if what == 'logits' else module.activate(q, k, bias, mask)
            maps[name] = S.detach()
        return record
    maps = {}
    handles = [m.register_forward_hook(hook(name), with_kwargs=True)
               for name, m in model.named_modules(remove_duplicate=False)
               if isinstance(m, (karat.Softmax, karat.KArAt))]
    try:
        yield maps
    finally:
        for h in handles:
            h.remove()


# ViTDet ----------------------------------------------------------------------------------
# Detection and instance segmentation (Li et al. 2022, "Exploring plain vision transformer
# backbones for object detection"): a plain ViT without CLS token whose blocks attend within
# windows, a few of them globally, a simple feature pyramid built from its single stride-16
# map, and torchvision's Mask R-CNN on top. As in torchvision, num_classes counts the
# background as class 0 (COCO: 91, category ids used as labels).

class ViTDetAttention(Attention):
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
        x = shifted_window_attention(x, super().forward, self.window, mask=self.mask)
        return x[:, :self.size, :self.size]


def padding_mask(size, window):
    """Which keys of each window are real tokens of the size x size map padded to a multiple of
    the window: (nW, 1, N) bool, the same for every query."""
    real = torch.arange(size + (-size % window)) < size
    real = rearrange(real, 'h -> h 1') & rearrange(real, 'w -> 1 w')
    return rearrange(window_partition(rearrange(real, 'h w -> 1 h w 1'), window), 'n j 1 -> n 1 j')


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
        check_arch(img_size, patch_size, embed_dim, num_heads)
        self.img_size, self.grid = img_size, img_size // patch_size
        if not 1 <= window_size <= self.grid:
            raise ValueError(f"window_size must be in 1..{self.grid} (the token grid of img_size "
                             f"{img_size} with patch_size {patch_size}), got {window_size}")
        if not all(0 <= i < depth for i in global_blocks):
            raise ValueError(f"global_blocks must be block indices in 0..{depth - 1}, "
                             f"got {tuple(global_blocks)}")
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(
            nn.init.trunc_normal_(torch.empty(1, self.grid ** 2, embed_dim), std=0.02))
        window = lambda i: self.grid if i in global_blocks else window_size
        rates = drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(
            Block(embed_dim,
                  ViTDetAttention(embed_dim, num_heads, self.grid, window(i), make_attend), p)
            for i, p in enumerate(rates))
        self.pyramid = nn.ModuleList(pyramid_level(embed_dim, out_channels, s)
                                     for s in PYRAMID_SCALES)
        self.out_channels = out_channels
        self.apply(init_weights)

    def forward(self, x):
        check_size(x, self.img_size, 3)
        x = rearrange(patch_tokens(self.patch_embed, x) + self.pos_embed, 'b (h w) d -> b h w d',
                      h=self.grid)
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



MODELS.update({
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
})


# Checkpoints: this project's, timm's and torchvision's -----------------------------------------
# All checkpoint surgery lives here: recognise a file's key layout, rename its keys to ours,
# resample what depends on the token grid, and load into a model of the same architecture
# with any attention (`load_pretrained`) or into ViTDet's backbone (`load_backbone`).

def swin_block(stage, j):
    """torchvision's features.(2i + 1).j, block j of stage i: ours follows the stage's patch
    merging (torchvision's features.(2i)), the first module of our stage i > 0."""
    return f"stages.{stage}.{j + (stage > 0)}."


# The layouts of the checkpoints people have, each recognised by one of its keys, and the
# renames to this project's keys (regular expressions applied in order; None drops the key).
LAYOUTS = {
    'timm': ('patch_embed.proj.weight', [  # deit_*_patch16_224 and convit_*
        (r'^patch_embed\.proj\.', 'patch_embed.'), (r'\.mlp\.fc1\.', '.mlp.0.'),
        (r'\.mlp\.fc2\.', '.mlp.2.'), (r'\.attn\.gating_param$', '.attn.gating')]),
    'torchvision ViT': ('conv_proj.weight', [  # vit_b_16
        (r'^class_token$', 'cls_token'), (r'^conv_proj\.', 'patch_embed.'),
        (r'^encoder\.pos_embedding$', 'pos_embed'), (r'^encoder\.ln\.', 'norm.'),
        (r'^encoder\.layers\.encoder_layer_(\d+)\.', r'blocks.\1.'),
        (r'\.ln_1\.', '.norm1.'), (r'\.ln_2\.', '.norm2.'), (r'\.mlp\.3\.', '.mlp.2.'),
        (r'\.self_attention\.in_proj_(weight|bias)$', r'.attn.qkv.\1'),
        (r'\.self_attention\.out_proj\.', '.attn.proj.'), (r'^heads\.head\.', 'head.')]),
    'torchvision Swin': ('features.0.0.weight', [  # swin_t, swin_s, swin_b
        (r'^features\.0\.0\.', 'patch_embed.'), (r'^features\.0\.2\.', 'patch_norm.'),
        (r'^features\.(\d+)\.(\d+)\.', lambda m: swin_block(int(m[1]) // 2, int(m[2]))),
        (r'^features\.(\d+)\.(reduction|norm)\.', lambda m: f"stages.{int(m[1]) // 2}.0.{m[2]}."),
        (r'\.mlp\.3\.', '.mlp.2.'), (r'\.relative_position_index$', None)]),  # ours: a fixed buffer
    'this project': ('patch_embed.weight', []),
}


def rename(key, rules):
    """`key` after the renames, or None for a key that has no counterpart here."""
    for pattern, replacement in rules:
        if re.search(pattern, key):
            if replacement is None:
                return None
            key = re.sub(pattern, replacement, key)
    return key


def merge_qk_v(state):
    """timm's GPSA splits the projection into `qk` and `v`; ours is one `qkv`, laid out
    (three h d) with q, k, v in that order, so the two weights stack as they are."""
    split = ('.attn.qk.weight', '.attn.v.weight')
    merged = {k.replace('.qk.', '.qkv.'): torch.cat([v, state[k.replace('.qk.', '.v.')]])
              for k, v in state.items() if k.endswith(split[0])}
    return {k: v for k, v in state.items() if not k.endswith(split)} | merged


def read_file(path):
    """What a checkpoint file holds: a .safetensors file's tensors (timm's downloads from the
    Hugging Face hub), else torch.load's object with weights_only=True: loading never runs code."""
    if str(path).endswith('.safetensors'):
        from safetensors.torch import load_file  # timm's dependency, needed for these files only
        return load_file(path)
    return torch.load(path, map_location='cpu', weights_only=True)


def read_weights(checkpoint):
    """A checkpoint as (layout, state_dict in this project's key names, config or None).

    checkpoint: a path (`read_file`) or what one holds: a train.py checkpoint ({'model',
    'config', ...}), a bare state_dict of any layout in `LAYOUTS`, or one wrapped as
    {'model': ...} or {'state_dict': ...} (DeiT's own downloads)."""
    if not isinstance(checkpoint, dict):
        checkpoint = read_file(checkpoint)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"not a checkpoint: a {type(checkpoint).__name__}, not a dict of tensors")
    config = checkpoint.get('config') if isinstance(checkpoint.get('config'), dict) else None
    wrapped = [checkpoint[k] for k in ('model', 'state_dict')
               if isinstance(checkpoint.get(k), dict)]
    state = (wrapped or [checkpoint])[0]
    layout = next((name for name, (key, _) in LAYOUTS.items() if key in state), None)
    if layout is None:
        known = ', '.join(f"{name} ({key})" for name, (key, _) in LAYOUTS.items())
        raise ValueError(f"not a checkpoint of a known layout: it has none of the keys of {known}")
    rules = LAYOUTS[layout][1]
    renamed = {new: v for k, v in state.items() if (new := rename(k, rules)) is not None}
    return layout, merge_qk_v(renamed), config


def resample_grid(t, axis, n, mode='bicubic'):
    """Resample `axis` of t, indexed row by row by the g x g cells of a square grid, to the
    n = g'² cells of a g' x g' grid by 2-D interpolation. The one resampler of the project:
    position embeddings, Swin's bias tables over (2W - 1)² offsets, KArAt's key axes."""
    t = t.movedim(axis, -1)
    g_old, g = math.isqrt(t.shape[-1]), math.isqrt(n)
    if g_old ** 2 != t.shape[-1] or g ** 2 != n:
        raise ValueError(f"cannot resample {t.shape[-1]} tokens to {n}: "
                         "both must fill square grids")
    grid = rearrange(t, '... (h w) -> (...) 1 h w', h=g_old)
    grid = F.interpolate(grid.float(), size=(g, g), mode=mode, align_corners=False).to(t.dtype)
    return grid.reshape(*t.shape[:-1], n).movedim(-1, axis)


def leading_tokens(n):
    """How many of n tokens precede a square grid of patches: 1 (CLS) for g² + 1, 0 for g²."""
    return n - math.isqrt(n) ** 2


def fit_grid(key, theirs, mine):
    """`theirs` for a model whose token grid gives `mine`'s shape: a position embedding of
    another image or patch size resampled bicubically (a CLS entry kept), a Swin bias table of
    another window likewise; any other tensor as it is."""
    if theirs.shape == mine.shape:
        return theirs
    if key.endswith('pos_embed') and theirs.shape[::2] == mine.shape[::2]:
        e = leading_tokens(theirs.shape[1])
        if e == leading_tokens(mine.shape[1]):
            return torch.cat([theirs[:, :e], resample_grid(theirs[:, e:], 1, mine.shape[1] - e)], 1)
    if key.endswith('relative_position_bias_table') and theirs.shape[1] == mine.shape[1]:
        return resample_grid(theirs, 0, mine.shape[0])
    return theirs


def natural(key):
    """Sort key putting blocks.2 before blocks.10."""
    return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', key)]


def summarise(items, limit=3):
    """The first few of a list for a one-line message, and how many more."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ''
    return ', '.join(items[:limit]) + more


def attention_of(config):
    """What a model's KArAt operators mean: its attention and the options that shape them (not
    efficient, kernel or chunk_elements, which change only how they are computed), defaults
    filled in."""
    defaults = karat.AttentionConfig()
    return {k: config.get(k, getattr(defaults, k))
            for k in ('attn', 'mode', 'grid', 'rank', 'base', 'order', 'simplex')}


def is_operator(key):
    return '.attend.operator.' in key


def load_pretrained(model, checkpoint, head=False):
    """Load a classifier's weights into `model`, a model of the same architecture with any
    attention. Returns the sorted keys left at their init.

    checkpoint: see `read_weights`; timm's deit_*_patch16_224 and convit_* go into vit_* and
    convit_*, torchvision's vit_b_16 into vit_base, swin_t/s/b into swin_t/s/b, and this
    project's checkpoints into their own architecture. Loaded: every weight the model shares
    with the checkpoint's architecture. The classifier head keeps its init unless `head`.
    KArAt operators are taken from a checkpoint that has them (this project's KArAt models,
    and if it carries a config, of the same attention and options); from any other (softmax,
    timm, torchvision) they keep their init, so a KArAt model starts from softmax weights
    with every weight but the activation. Position embeddings of another image or patch size
    and Swin's bias tables of another window are resampled bicubically; a KArAt operator's N
    is fixed and is not. Anything else that differs is a ValueError naming the keys, or the
    shapes and the ones expected."""
    layout, state, config = read_weights(checkpoint)
    own = model.state_dict()
    mine = attention_of(getattr(model, 'config', {}))
    same_attention = config is None or attention_of(config) == mine
    operators = any(map(is_operator, own)) and any(map(is_operator, state)) and same_attention
    skip = lambda k: (k.startswith('head.') and not head) or (is_operator(k) and not operators)
    wanted, offered = {k for k in own if not skip(k)}, {k for k in state if not skip(k)}
    loaded = {k: fit_grid(k, state[k], own[k]) for k in wanted & offered}
    wrong = [k for k, t in loaded.items() if t.shape != own[k].shape]
    if wanted != offered or wrong:
        shapes = {k: (tuple(loaded[k].shape), tuple(own[k].shape)) for k in wrong}
        raise ValueError(mismatch(layout, model, wanted - offered, offered - wanted, shapes))
    model.load_state_dict(loaded, strict=False)
    return sorted(set(own) - wanted, key=natural)


def mismatch(layout, model, missing, unexpected, shapes):
    """One line: what of a `layout` checkpoint does not fit `model`, and what it expects."""
    cfg = getattr(model, 'config', {})
    parts = [f"it lacks {summarise(sorted(missing, key=natural))}"] if missing else []
    if unexpected:
        parts.append(f"the model has no {summarise(sorted(unexpected, key=natural))}")
    if shapes:
        parts.append(summarise([f"{k} is {shapes[k][0]} where {shapes[k][1]} is expected"
                                for k in sorted(shapes, key=natural)]))
    if any(map(is_operator, shapes)):
        parts.append("a KArAt operator's N is fixed: load at the checkpoint's image and patch size")
    name = f"{cfg.get('name', type(model).__name__)} ({cfg.get('attn')}, {cfg.get('img_size')} px)"
    return f"the {layout} checkpoint does not fit {name}: {'; '.join(parts)}"


# ViTDet's backbone from a classifier: the operators' key axes change from a classifier's
# N = g² + 1 keys to a detector's N' = window² or grid².

WEIGHT_LIKE = ('coef', 'w', 'a', 'w_base', 'W')  # operator tensors that scale a unit's output
# (tau, s and the rational denominator's b shape it and are only resampled)


def resample_operator(t, operator, name):
    """A classifier's KArAt tensor for a detector operator over N' keys (see `load_backbone`)."""
    for axis in operator.key_axes(name):
        n_old = t.shape[axis] - 1
        t = resample_grid(t.narrow(axis, 1, n_old), axis, operator.seq_len, mode='bilinear')
        if name.split('.')[-1] in WEIGHT_LIKE:
            t = t * (n_old / operator.seq_len)
    return t


def load_backbone(detector, checkpoint):
    """Initialise a ViTDet's backbone from a ViT classifier's checkpoint (see `read_weights`:
    this project's vit_*, timm's deit_*, torchvision's vit_b_16). Returns {'missing': ViT keys
    of the detector left at their init, 'unused': classifier keys not used}; the feature
    pyramid and the Mask R-CNN heads always keep their init.

    Rule: the patch embedding and every block's norms, qkv, proj and MLP are copied (the
    classifier needs the detector's embed_dim, depth and heads; its CLS token, final norm and
    head are unused). The position embedding drops the CLS token and its g x g grid is
    resized bicubically to the detector's grid (ViTDet's rule).
    KArAt operators: Φ̂ and W are indexed by key position, and the classifier's N = g² + 1 keys
    (CLS first) become the detector's N' = window² (window blocks) or grid² (global blocks):
    along every key-indexed axis (`karat.Operator.key_axes`) the CLS entry is dropped, the
    remaining g x g grid is resized bilinearly to √N' x √N' (bilinear: a convex combination, so
    learned scales stay positive), and the tensors that scale a unit's output (coefficients,
    unit weights, W) are multiplied by g²/N' per such axis, so that every sum over keys
    (Σ_q φ_pq(a_q) and Σ_j σ̂_j V_j) keeps its size, as a Riemann sum of the same integral
    would. The rank axis r is kept as is. Same grid: the identity, the CLS entry aside. A
    universal detector operator is written once per block that shares it: load from a
    classifier of the same mode."""
    layout, state, _ = read_weights(checkpoint)
    pos = state.get('pos_embed')
    if 'cls_token' not in state or pos is None or leading_tokens(pos.shape[1]) != 1:
        raise ValueError(f"not a ViT classifier's weights: the {layout} checkpoint has no CLS "
                         "token and position embedding with a CLS entry")
    backbone = detector.backbone
    operators = {name: m for name, m in backbone.named_modules(remove_duplicate=False)
                 if isinstance(m, karat.Operator)}
    loaded = {}
    for key, mine in backbone.state_dict().items():
        if key not in state:
            continue
        theirs, owner = state[key], key.rpartition('.attend.operator.')
        if key == 'pos_embed':
            theirs = resample_grid(theirs[:, 1:], 1, mine.shape[1])
        elif owner[1]:
            theirs = resample_operator(theirs, operators[owner[0] + '.attend.operator'], owner[2])
        if theirs.shape != mine.shape:
            raise ValueError(f"{key} is {tuple(theirs.shape)} after the rule but the detector's "
                             f"is {tuple(mine.shape)}: the {layout} classifier is another "
                             "architecture (embed_dim, heads, rank or attention)")
        loaded[key] = theirs
    backbone.load_state_dict(loaded, strict=False)
    vit_keys = {k for k in backbone.state_dict() if not k.startswith('pyramid.')}
    return dict(missing=sorted(vit_keys - set(loaded)), unused=sorted(set(state) - set(loaded)))
