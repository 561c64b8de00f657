"""How KArAt is computed: karat.py's attention with nothing N x N kept for backward.

karat.py says what the attention is; a KArAt module's `compute` says how. karat.definition
lets autograd keep the logits A (b h i j) for backward. The fast paths of this file take q, k
and the bias instead and recompute the logits in backward: one head and chunk of query rows at
a time in PyTorch (kernel='torch', this file), tile by tile in fused Triton kernels
(kernel='triton', kernels.py). Every form they fuse is one primitive, Y = Σ_m (M ⊙ B_m(S)) X_m
with S = scale q k^T + bias:
    low rank   X_m = C_m^T, Y = Z, then O = Z (W^T (M ⊙ V))
    full rank  X_m = U_m = C_m^T (M ⊙ V), Y = O
A mask that depends on the query masks σ̂ = M ⊙ (Z W^T) too, so O = Z (W^T V) no longer
factors: O is a second pass of the primitive with q = Z, k = W, scale 1 and B(x) = x. Unit
families give Z_ip = Σ_j M_ij φ_pj(S_ij) the same way. Full rank with units or a per-query
mask is O = (M ⊙ Z) V with N outputs Z_ip, chunk by chunk; the ablations (orders, simplex)
run the definition on chunks of rows. Chunks are recomputed in backward.

    attend = karat.attention_maker('fourier', compute=Computation(kernel='torch'))(3, 197)

The file reads top-down: §1 the options and the entry point, §2 the primitive in PyTorch,
§3 chunks of rows and the re-associated product.
"""
from dataclasses import dataclass, field, fields

import torch
from einops import einsum, rearrange
from torch.utils.checkpoint import checkpoint

from karat import (BASES, Basis, check_choices, choice, contract, expansion_coefs,
                   expansion_maps, is_count, kan, karat_attention, key_masked, logits, refuse)

# §1  How the attention is computed -----------------------------------------------------------

KERNELS = ('auto', 'torch', 'triton')


@dataclass(frozen=True)
class Computation:
    """How KArAt is computed, as karat.AttentionConfig says what it is: the options that change
    no result, only time and memory. Called as karat.definition is, it is a KArAt module's
    `compute`. efficient=False is the naive formula, σ̂(A) V with σ̂ built (tests, benchmarks)."""
    efficient: bool = field(default=True, metadata=dict(
        help='the fast paths, keeping only q, k and the bias for backward'))
    kernel: str = choice('auto', 'kernel', KERNELS, "the fast path: torch (chunks of rows), "
                         "triton (fused kernels, CUDA), auto (torch until measured on a GPU)")
    chunk_elements: int | None = field(default=None, metadata=dict(
        help="values a chunk of the PyTorch path holds (default 2^22 on a CPU, 2^28 on a GPU)"))

    def __post_init__(self):
        check_choices(self)
        if not (self.chunk_elements is None or is_count(self.chunk_elements)):
            refuse(f"chunk_elements must be an integer >= 1, got {self.chunk_elements!r}",
                   'an integer >= 1, or None for the device default')

    def __call__(self, q, k, v, bias, mask, params, config):
        if not self.efficient:
            S = karat_attention(logits(q, k, bias), None, params, config, mask,
                                return_attention=True)
            return einsum(S, v, 'b h i j, b h j d -> b h i d')
        return fast_attention(q, k, v, bias, mask, params, config, self.kernel,
                              self.chunk_elements or default_chunk_elements(q.device))


HOW = tuple(f.name for f in fields(Computation))  # every other option says what it is


def fast_attention(q, k, v, bias, mask, params, config, kernel, elements):
    """karat_attention(logits(q, k, bias), v, params, config, mask), nothing N x N kept for
    backward. q, k (b h i d), (b h j d); v (b h j e); bias, mask broadcastable to (b h i j);
    chunks of at most `elements` values."""
    expansion, units = primitives(kernel, q.device)
    basis, G, base = BASES[config.attn], config.grid, config.base
    scale, per_key = q.shape[-1] ** -0.5, q.shape[0] * q.shape[1] * k.shape[2]
    query_mask = mask is not None and mask.shape[2] > 1

    if config.order != 'W_phi' or config.simplex:  # the ablations: the definition, by chunks
        layer = lambda q, bias, mask: karat_attention(logits(q, k, bias), v, params, config, mask)
        maps = basis.size(G) if basis.expansion else 1
        return over_rows(recomputed(layer), q, bias, mask, elements, per_key * maps * k.shape[2])
    X = coefficient_values(params['phi']) if basis.expansion else None  # once, not per chunk

    def Phi(q, bias, mask):  # Z_ip = Σ_j M_ij φ_pj(S_ij)
        if basis.expansion:
            return expansion(q, k, bias, mask, X, scale, basis, G, base, elements)
        return units(q, k, bias, mask, params['phi'], basis, G, base, scale, elements)

    if config.rank is None and basis.expansion and not query_mask:  # O = Σ_m (M ⊙ B_m(S)) U_m
        U = torch.stack([einsum(C, key_masked(v, mask), 'h p q, b h p d -> b h q d')
                         for C in expansion_coefs(params['phi'])], 2)
        return expansion(q, k, bias, mask, U, scale, basis, G, base, elements)
    if config.rank is None:  # O = (M ⊙ Z) V, Z with N outputs: one chunk of rows at a time
        layer = lambda q, bias, mask: (Phi(q, bias, mask) * (1 if mask is None else mask)) @ v
        return over_rows(recomputed(layer), q, bias, mask, elements, per_key * k.shape[2])
    Z = Phi(q, bias, mask)
    if not query_mask:  # O = Z (W^T (M ⊙ V))
        return Reassociated.apply(Z, params['W'], key_masked(v, mask))
    # the second pass, O_i = Σ_j M_ij (Z_i · W_j) V_j
    return expansion(Z, params['W'][None], None, mask, v[:, :, None], 1.0, IDENTITY, 1, 'zero',
                     elements)


def primitives(kernel, device):
    """The (expansion, units) primitives of kernel 'auto' | 'torch' | 'triton'. 'auto' is
    PyTorch everywhere until a GPU measurement shows the Triton path faster."""
    if kernel != 'triton':
        return rows_expansion, rows_units
    try:
        import kernels
    except ImportError as e:
        raise ValueError(f"kernel='triton' needs Triton ({e}); allowed here: 'torch', 'auto'")
    if device.type != 'cuda' and not kernels.INTERPRET:
        raise ValueError(f"kernel='triton' runs on a CUDA GPU (or under TRITON_INTERPRET=1), "
                         f"got tensors on {device.type}; allowed here: 'torch', 'auto'")
    return kernels.karat_expansion, kernels.karat_units


def default_chunk_elements(device):
    """16 MB of float32 on a CPU, where chunks bound the transient of backward, which sets the
    peak of a ViT's train step; 1 GB on a GPU, which wants few large launches."""
    return 2 ** 22 if device.type == 'cpu' else 2 ** 28


def coefficient_values(phi):
    """The low-rank primitive's X_m = C_m^T, stacked (1 h m q p): a view of the coefficients."""
    C = phi['coef']
    if 'w_base' in phi:
        C = torch.cat([C, phi['w_base'][..., None]], -1)
    return rearrange(C, 'h p q m -> 1 h m q p')


# B(x) = x, the one map of the per-query mask's second pass
IDENTITY = Basis('linear', maps=lambda x, G: [x], size=lambda G: 1, gain=lambda G: 1.0,
                 vjp=lambda x, G, grad, out: ([out[0].copy_(x)], grad(0)))


# §2  The primitive in PyTorch, tile by tile --------------------------------------------------

def rows_expansion(q, k, bias, mask, X, scale, basis, G, base, elements):
    """Y = Σ_m (M ⊙ B_m(S)) X_m in PyTorch, tile by tile: a head and a chunk of its query rows.
    X: (b|1, h, m, j, e). A tile's backward holds its m maps, S, dS and one dY X_m^T: m + 3
    values per logit (2m + 3 where the maps are stacked), at most `elements`."""
    maps = X.shape[2] * (1 if closed_form(basis, base) else 2)
    per_row = q.shape[0] * k.shape[2] * (maps + 3)
    rows = row_chunks(q.shape[2], elements, per_row)
    return RecomputedExpansion.apply(q, k, bias, mask, X, scale, basis, G, base, rows)


class RecomputedExpansion(torch.autograd.Function):
    """Y = Σ_m (M ⊙ B_m(S)) X_m one tile (a head, a chunk of query rows) at a time, keeping only
    q, k and the bias; backward recomputes each tile's S and maps: dX_m = F_m^T dY,
    dS = M ⊙ Σ_m (dY X_m^T) ⊙ B_m'(S), dq = scale dS k, dk = scale dS^T q. A tile holds one
    head, so that where X_m is shared by the batch (low rank: X_m = C_m^T) each product with
    it is one matrix product over all b·i rows of the tile, not b small ones; in backward its
    maps are one tensor F (m b 1 i j), so that the m products F_m^T dY are one batched matmul."""

    @staticmethod
    def forward(ctx, q, k, bias, mask, X, scale, basis, G, base, rows):
        ctx.save_for_backward(q, k, bias, mask, X)
        ctx.static, ctx.autocast = (scale, basis, G, base, rows), autocast_state(q.device.type)
        k, Xp = k.contiguous(), padded(X)  # copies for BLAS, not saved

        # the maps as separate tensors: one buffer for all of them is fresh memory, faulted in
        # while the activations grow (docs/performance.md)
        def tile(h, r):
            S = logits(q[:, h, r], k[:, h], tile_of(bias, h, r), scale)
            maps = expansion_maps(S, basis, G, base)
            return contract(maps, head_values(Xp, h), tile_of(mask, h, r))[..., :X.shape[-1]]
        return torch.cat([torch.cat([tile(h, r) for r in rows], 2) for h in head_slices(q)], 1)

    @staticmethod
    def backward(ctx, dY):
        q, k, bias, mask, X = ctx.saved_tensors
        scale, basis, G, base, rows = ctx.static
        dq, dk, dX = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(X)
        dbias = None if bias is None else torch.zeros_like(bias)
        with torch.autocast(**ctx.autocast):
            k, X = k.contiguous(), X.contiguous()
            for h in head_slices(q):
                kh, dkh, Xh, dXh = k[:, h], dk[:, h], head_values(X, h), head_values(dX, h)
                for r in rows:
                    S, qr = logits(q[:, h, r], kh, tile_of(bias, h, r), scale), q[:, h, r]
                    dYr = dY[:, h, r].contiguous()  # once, not once per product
                    dS, dXr = expansion_grads(S, dYr, Xh, tile_of(mask, h, r), basis, G, base)
                    dXh += dXr
                    dq[:, h, r] = dS @ kh * scale
                    dkh += (dS.mT @ qr * scale).sum_to_size(dkh.shape)
                    if bias is not None:
                        tile_of(dbias, h, r).add_(dS.sum_to_size(tile_of(bias, h, r).shape))
        return dq, dk, dbias, None, dX, *[None] * 5


def autocast_state(device):
    """The autocast state of a forward, for its backward to re-enter (which runs outside it)."""
    return dict(device_type=device, enabled=torch.is_autocast_enabled(device),
                dtype=torch.get_autocast_dtype(device))


def head_slices(q):
    """One slice per head of q (b h i d), each keeping its head axis."""
    return [slice(h, h + 1) for h in range(q.shape[1])]


def head_values(X, h):
    """The X_m of head h, X (b|1, h, m, j, e): (m j e) where X has no batch axis, so that a
    product folds a tile's b·i rows into one, else (m b 1 j e); views of X."""
    return X[0, h.start] if X.shape[0] == 1 else X[:, h].movedim(2, 0)


def padded(X):
    """X contiguous, its e axis padded with zeros to a multiple of 16 where X has no batch axis:
    MKL multiplies the maps by 16 columns faster than by r = 12."""
    if X.shape[0] == 1:
        X = torch.nn.functional.pad(X, (0, -X.shape[-1] % 16))
    return X.contiguous()


def expansion_grads(S, dY, X, mask, basis, G, base):
    """dS and the dX_m (laid out as `head_values`) of one tile of Y = Σ_m (M ⊙ B_m(S)) X_m, from
    S and dY."""
    F, dS = maps_and_grad(S, basis, G, base, lambda m: dY @ X[m].mT)  # M ⊙ comes once, on dS
    return masked(dS, mask), transposed_product(dY, masked(F, mask), X.dim() == 3)


def closed_form(basis, base):
    """Whether the maps' derivative comes in closed form (`Basis.vjp`, no base activation),
    the maps written straight into one tensor rather than stacked."""
    return basis.vjp is not None and base == 'zero'


def maps_and_grad(S, basis, G, base, grad):
    """The maps B_m(S) of a tile as one tensor F (m, *S.shape), and dS = Σ_m grad(m) B_m'(S):
    written straight into F where the derivative is in closed form, else stacked (a copy)."""
    if closed_form(basis, base):
        F = S.new_empty(basis.size(G), *S.shape)
        return F, basis.vjp(S, G, grad, out=F)[1]
    with torch.enable_grad():
        S = S.detach().requires_grad_()
        maps = expansion_maps(S, basis, G, base)
    outs, gs = zip(*[(B, grad(m)) for m, B in enumerate(maps) if B.requires_grad])  # not T_0
    return torch.stack(maps).detach(), torch.autograd.grad(outs, S, gs)[0]


def masked(T, mask):
    """M ⊙ T in place (T, a tile's own maps or dS)."""
    return T if mask is None else T.mul_(mask)


def transposed_product(dY, F, flat):
    """Every F_m^T dY in one batched matmul, as (dY^T F_m)^T: faster than F_m^T dY on a CPU;
    over all b·i rows if `flat`."""
    if flat:
        dY, F = dY.flatten(0, -2), F.flatten(1, -2)
    return (dY.mT @ F).mT


def rows_units(q, k, bias, mask, params, basis, G, base, scale, elements):
    """Z_ip = Σ_j M_ij φ_pj(S_ij) of a unit family in PyTorch, chunk by chunk."""
    layer = lambda q, bias, mask: kan(logits(q, k, bias, scale), basis, params, G, base, mask)
    n_out = next(iter(params.values())).shape[1]  # every tensor is (h p q ...)
    per_row = q.shape[0] * q.shape[1] * k.shape[2] * n_out
    return over_rows(recomputed(layer), q, bias, mask, elements, per_row)


# §3  Chunks of rows, and the re-associated product -------------------------------------------

def over_rows(fn, q, bias, mask, elements, per_row):
    """fn(q, bias, mask) on chunks of query rows, each at most `elements` // `per_row` rows,
    concatenated; bias and mask are cut with q where they have rows."""
    rows = row_chunks(q.shape[2], elements, per_row)
    if len(rows) == 1:
        return fn(q, bias, mask)
    return torch.cat([fn(q[:, :, r], tile_of(bias, rows=r), tile_of(mask, rows=r))
                      for r in rows], dim=2)


def row_chunks(n, elements, per_row):
    """Slices cutting n query rows into equal chunks of at most `elements` // `per_row` rows."""
    count = -(-n // max(1, elements // per_row))
    step = -(-n // count)
    return [slice(i, i + step) for i in range(0, n, step)]


def tile_of(t, h=slice(None), rows=slice(None)):
    """Head h and query rows of a bias or mask (b|1, h|1, i|1, j), where it has them."""
    return t if t is None else t[:, h if t.shape[1] > 1 else slice(None),
                                 rows if t.shape[2] > 1 else slice(None)]


def recomputed(fn):
    """fn, checkpointed when a gradient is needed: it keeps its inputs, not its intermediates."""
    return lambda *x: checkpoint(fn, *x, use_reentrant=False) if torch.is_grad_enabled() else fn(*x)


class Reassociated(torch.autograd.Function):
    """O = Z (W^T V) keeping Z, W, the small W^T V (b h r d) and V itself, a view of the qkv
    projection that autograd holds anyway: a matmul would keep V and W copied into its batched
    layout, one N x d copy per block."""

    @staticmethod
    def forward(ctx, Z, W, V):
        WtV = W.mT @ V  # (h r j) @ (b h j d)
        ctx.save_for_backward(Z, W, V, WtV)
        ctx.autocast = autocast_state(Z.device.type)
        return Z @ WtV

    @staticmethod
    def backward(ctx, dO):
        Z, W, V, WtV = ctx.saved_tensors
        with torch.autocast(**ctx.autocast):
            dWtV = Z.mT @ dO
            return dO @ WtV.mT, (V @ dWtV.mT).sum(0), W @ dWtV
