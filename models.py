"""Vision transformers whose attention is chosen by a string: 'softmax' or a KArAt basis.

    model = create_model('vit_tiny', attn='fourier', num_classes=10, img_size=224)

Three families of classifiers, each the standard architecture with its softmax replaced by an
`attend` module from karat.py (every attention block has one, so a forward hook can record it):
    ViT (DeiT)  CLS token, learned position embedding, pre-norm blocks
    ConViT      gated positional self-attention (GPSA) blocks, then MHSA blocks with the CLS token
    Swin        shifted-window attention with relative position bias, patch merging
The softmax models have exactly the parameters of timm's DeiT/ConViT and torchvision's Swin.
KArAt computes by fast.py's paths (`fast.Computation`'s options as keywords). The detectors
(ViTDet) are built from these pieces in detection.py; checkpoints are read in weights.py.
"""
import inspect
import math
import warnings
from contextlib import contextmanager
from dataclasses import asdict, fields

import torch
from einops import einsum, rearrange, repeat
from torch import nn
from torch.nn import functional as F

import fast
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


def patch_embedding(in_chans, dim, patch_size):
    """Non-overlapping p x p patches to dim channels: (b, c, H, W) -> (b, dim, H/p, W/p)."""
    return nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)


def position_embedding(tokens, dim):
    """A learned absolute position embedding (1, tokens, dim), from a truncated N(0, 0.02²)."""
    return nn.Parameter(nn.init.trunc_normal_(torch.empty(1, tokens, dim), std=0.02))


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
        self.patch_embed = patch_embedding(in_chans, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = position_embedding(n, embed_dim)
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
        self.patch_embed = patch_embedding(in_chans, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = position_embedding(grid ** 2, embed_dim)
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
        self.patch_embed = patch_embedding(in_chans, embed_dim, patch_size)
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
WHAT = tuple(f.name for f in fields(karat.AttentionConfig) if f.name != 'attn')
ATTENTION_OPTIONS = WHAT + fast.HOW  # what KArAt is, and how it is computed


def list_models():
    return sorted(MODELS)


def create_model(name, *, attn='softmax', num_classes=None, img_size=None, **options):
    """Build a classifier by name with the attention `attn`: 'softmax' or a basis of
    karat.BASES, with karat.AttentionConfig's fields as keywords (mode, grid, rank, base, order,
    simplex), or an AttentionConfig; and how KArAt is computed, fast.Computation's fields
    (efficient, kernel, chunk_elements).

    Architecture overrides: patch_size, embed_dim, depth, num_heads, in_chans, drop_path_rate;
    window_size for Swin (whose depth and num_heads are per-stage tuples); locality_strength
    for ConViT. num_classes and img_size default to 1000 and 224. The call's arguments are kept
    in `model.config`: create_model(config.pop('name'), **config)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(list_models())} "
                         "(detection.DETECTORS: the vitdet_* detectors)")
    return build(name, *MODELS[name], attn, num_classes, img_size, options)


def build(name, cls, defaults, attn, num_classes, img_size, options):
    """create_model's work for any registry of (class, default arguments): detection.py's too."""
    # an int only: 2.0 classes would reach nn.Linear and fail there, far from the cause
    whole = isinstance(num_classes, int) and not isinstance(num_classes, bool)
    if num_classes is not None and not (whole and num_classes >= 1):
        raise ValueError("num_classes must be an integer >= 1 (the detectors count the "
                         f"background: >= 2), got {num_classes!r}")
    arch_options = [p for p in inspect.signature(cls).parameters
                    if p not in ('make_attend', 'img_size', 'num_classes')]
    unknown = set(options) - set(ATTENTION_OPTIONS) - set(arch_options)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))} for {name}; "
                         f"allowed: {', '.join(ATTENTION_OPTIONS + tuple(arch_options))}")
    attention, compute = attention_configs(attn, options)
    given = {k: v for k, v in options.items() if k in WHAT}
    how = {k: v for k, v in options.items() if k in fast.HOW}
    sizes = {k: v for k, v in dict(num_classes=num_classes, img_size=img_size).items()
             if v is not None}
    arch = {'num_classes': 1000, 'img_size': 224, **defaults, **sizes,
            **{k: v for k, v in options.items() if k in arch_options}}
    model = cls(karat.attention_maker(attention, compute=compute), **arch)
    if attention.attn != 'softmax' and 1 in getattr(model, 'windows', ()):
        warnings.warn(f"{name} at {arch['img_size']} px, patch {model.patch_embed.stride[0]}: "
                      f"windows {'/'.join(map(str, model.windows))} per stage. A window of one "
                      "token leaves KArAt φ(q·k) v, a gate on a logit nothing bounds (softmax "
                      "there is v itself); choose a size whose every stage has windows of 2 or "
                      "more (swin_t at 64 px, patch 4: 4/4/4/2)", stacklevel=3)
    if isinstance(attn, karat.AttentionConfig):  # a config records every field, as keywords
        attn, given = attention.attn, {k: v for k, v in asdict(attention).items() if k != 'attn'}
    model.config = dict(name=name, attn=attn, num_classes=arch['num_classes'],
                        img_size=arch['img_size'], **given, **how,
                        **{k: v for k, v in options.items() if k in arch_options})
    return model


def attention_configs(attn, options):
    """(what KArAt is, how it is computed) from create_model's `attn` and keywords: a
    karat.AttentionConfig and a fast.Computation, each checked."""
    pick = lambda names: {k: v for k, v in options.items() if k in names}
    return karat.attention_config(attn, **pick(WHAT)), fast.Computation(**pick(fast.HOW))


NO_DECAY = ('pos_embed', 'cls_token', 'relative_position')


def parameter_groups(model, weight_decay):
    """AdamW's groups as DeiT's: no weight decay on biases, norms, tokens and position tables."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and not any(s in name for s in NO_DECAY) else rest).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=rest, weight_decay=0.0)]


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
