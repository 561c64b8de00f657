"""Vision transformers whose attention is chosen by a string: 'softmax' or a KArAt basis.

    model = create_model('vit_tiny', attn='fourier', num_classes=10, img_size=224)
"""
import torch
from einops import rearrange
from torch import nn

import karat


class Attention(nn.Module):
    """Multi-head self-attention; `attend` is the softmax or the learnable KArAt operator."""

    def __init__(self, dim, heads, seq_len, make_attend):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attend = make_attend(heads, seq_len)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, bias=None, mask=None):
        q, k, v = rearrange(self.qkv(x), 'b n (three h d) -> three b h n d', three=3, h=self.heads)
        return self.proj(rearrange(self.attend(q, k, v, bias, mask), 'b h n d -> b n (h d)'))


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


def mlp(dim, hidden):
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class Block(nn.Module):
    """Pre-norm transformer block: x = x + attn(norm(x)); x = x + mlp(norm(x))."""

    def __init__(self, dim, heads, seq_len, make_attend, drop_path=0.0, mlp_ratio=4):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, seq_len, make_attend)
        self.norm2, self.mlp = nn.LayerNorm(dim), mlp(dim, mlp_ratio * dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def check_size(x, img_size, in_chans):
    if x.dim() != 4 or x.shape[1] != in_chans or tuple(x.shape[-2:]) != (img_size, img_size):
        raise ValueError(f"expected images of shape (batch, {in_chans}, {img_size}, {img_size}), got {tuple(x.shape)}; "
                         "the model was built for this size (KArAt fixes the number of tokens N)")


class VisionTransformer(nn.Module):
    """ViT as in DeiT: 16x16 patches, a CLS token, learned position embeddings, pre-norm blocks."""

    def __init__(self, make_attend, img_size=224, patch_size=16, in_chans=3, num_classes=1000,
                 embed_dim=192, depth=12, num_heads=3, drop_path_rate=0.0):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size, self.in_chans = img_size, in_chans
        n = (img_size // patch_size) ** 2 + 1
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n, embed_dim) * 0.02)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, n, make_attend, p) for p in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward_features(self, x):
        check_size(x, self.img_size, self.in_chans)
        x = rearrange(self.patch_embed(x), 'b d h w -> b (h w) d')
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, x):
        return self.head(self.forward_features(x)[:, 0])


VIT_SIZES = {'vit_tiny': (192, 3), 'vit_small': (384, 6), 'vit_base': (768, 12)}
ATTENTION_OPTIONS = ('mode', 'grid', 'rank', 'base', 'order', 'simplex', 'efficient')


def list_models():
    return sorted(VIT_SIZES)


def create_model(name, *, attn='softmax', num_classes=1000, img_size=224, **options):
    """Build a model by name. KArAt options: mode, grid (G), rank (r; None = full N x N),
    base, order, simplex; architecture overrides: patch_size, embed_dim, depth, num_heads,
    in_chans, drop_path_rate. The call's arguments are kept in `model.config`."""
    if name not in list_models():
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(list_models())}")
    att = {k: options.pop(k) for k in ATTENTION_OPTIONS if k in options}
    make_attend = karat.attention_maker(attn, **att)
    embed_dim, heads = VIT_SIZES[name]
    arch = dict(embed_dim=embed_dim, num_heads=heads, **options)
    allowed = ('patch_size', 'embed_dim', 'depth', 'num_heads', 'in_chans', 'drop_path_rate')
    unknown = set(options) - set(allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(sorted(unknown))}; allowed: {', '.join(ATTENTION_OPTIONS + allowed)}")
    model = VisionTransformer(make_attend, img_size=img_size, num_classes=num_classes, **arch)
    model.config = dict(name=name, attn=attn, num_classes=num_classes, img_size=img_size, **att, **options)
    return model
