"""Checkpoints: this project's, timm's and torchvision's, read, renamed and loaded into a model.

    weights.load_pretrained(model, 'deit_tiny_patch16_224.pth')   # any attention, same arch
    weights.load_backbone(detector, 'runs/vit_base_fourier_imagenet/best.pt')

All checkpoint surgery lives here: read a file without running code, recognise its key layout,
rename its keys to ours, resample what depends on the token grid, and load into a model of the
same architecture with any attention (`load_pretrained`) or into ViTDet's backbone
(`load_backbone`). train.py's own checkpoints are written here too, atomically. Every problem
is a ValueError of one line naming the file and what does not fit.
"""
import math
import os
import re
from dataclasses import fields

import torch
from einops import rearrange
from torch.nn import functional as F

import karat

# Files ----------------------------------------------------------------------------------------

def read_file(path):
    """What a checkpoint file holds: a .safetensors file's tensors (timm's downloads from the
    Hugging Face hub), else torch.load's object with weights_only=True: loading never runs code."""
    if str(path).endswith('.safetensors'):
        from safetensors.torch import load_file  # timm's dependency, needed for these files only
        return load_file(path)
    return torch.load(path, map_location='cpu', weights_only=True)


def read_checkpoint(path):
    """Whatever `path` holds (`read_file`), or a ValueError of one line saying why not."""
    try:
        return read_file(path)
    except FileNotFoundError:
        raise ValueError(f"no checkpoint at {path}") from None
    except Exception as e:  # torn, foreign, or carrying objects whose unpickling could run code
        lines = [l for l in str(e).splitlines()
                 if l.strip() and not l.startswith(('Weights only', 'Please file', 'Check the'))]
        raise ValueError(f"cannot load checkpoint {path}: {(lines or [type(e).__name__])[0]}") \
            from None


def load_checkpoint(path):
    """A train.py checkpoint: the model's weights and config, and the run's state."""
    ckpt = read_checkpoint(path)
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get('model'), dict)
            and isinstance(ckpt.get('config'), dict)):
        raise ValueError(f"{path} is not a train.py checkpoint (no model weights and config)")
    return ckpt


def run_arguments(path):
    """The flags of the run that wrote checkpoint `path`, as it stored them ({} if none). The
    file is memory-mapped, so its tensors are not read here."""
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:  # the one-line reason comes from load_checkpoint
        ckpt = load_checkpoint(path)
    saved = ckpt.get('args') if isinstance(ckpt, dict) else None
    return saved if isinstance(saved, dict) else {}


def save_atomic(obj, path):
    """Write to a temporary file in the same folder, then rename over `path`: a kill at any
    moment leaves either the old file or the new one, never a torn one."""
    tmp = path.with_name(path.name + '.tmp')
    with open(tmp, 'wb') as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# Layouts: the checkpoints people have ---------------------------------------------------------

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
    'train.py': ('patch_embed.weight', []),  # this project's
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


# Loading into a model of another grid or attention -------------------------------------------

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
    """What a model's KArAt operators mean, from its config: karat.AttentionConfig's fields,
    defaults filled in (how they are computed, fast.Computation's, does not matter here)."""
    return {f.name: config.get(f.name, f.default) for f in fields(karat.AttentionConfig)}


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


def why_not(state, owner, operators):
    """What differs between a classifier's and a detector's architecture, for a message: the
    rank where the classifier's was capped at its N, else the candidates."""
    W = state.get(owner[0] + '.attend.operator.W') if owner[1] else None
    operator = operators.get(owner[0] + '.attend.operator')
    if W is not None and operator.rank is not None and W.shape[-1] != operator.rank:
        r, N = W.shape[-1], W.shape[1]
        capped = f", capped at its N = {N} tokens (r = min(r, N))" if r == N else ''
        return (f"its operators have rank {r}{capped}, the detector's {operator.rank}: give the "
                f"detector --rank {r}, or start from a classifier of the detector's rank")
    return 'embed_dim, heads, rank or attention'


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
                             f"architecture ({why_not(state, owner, operators)})")
        loaded[key] = theirs
    backbone.load_state_dict(loaded, strict=False)
    vit_keys = {k for k in backbone.state_dict() if not k.startswith('pyramid.')}
    return dict(missing=sorted(vit_keys - set(loaded)), unused=sorted(set(state) - set(loaded)))
