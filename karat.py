"""Kolmogorov-Arnold Attention (KArAt), after Maity et al., arXiv 2503.10632.

Softmax turns a row of attention logits A_k = q_k K^T / sqrt(d) (plus any bias) into
weights over the N keys. KArAt replaces it with a learnable Kolmogorov-Arnold operator:

    full        σ(A_k) = Φ(A_k),        Φ: R^N -> R^N,  Φ(a)_p = Σ_q φ_pq(a_q)   (N x N units)
    low-rank    σ̂(A_k) = W Φ̂(A_k),     Φ̂: R^N -> R^r,  W ∈ R^{N x r}            (r x N units)

and the output row is O_k = Σ_n σ̂(A_k)_n V_n. Because σ̂ = W Φ̂ is linear in W, the output
re-associates exactly to O = Z (W^T V) with Z_kp = Φ̂(A_k)_p: the N x N activated matrix is
never built unless somebody asks for it.

Each unit is φ_pq(x) = w^b_pq b(x) + Σ_m c_pqm B_m(x): a base activation b (none by default,
as in the paper's best models) plus a basis expansion with G functions ("grid size").

The file reads top to bottom: §1 basis families, §2 one Kolmogorov-Arnold layer over a row,
§3 the attention operators (full, low-rank, the paper's ablations), §4 the fast paths that keep
nothing N x N for backward, §5 modules that hold the parameters and share them blockwise or
universally.
"""
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

# §1  Basis families -------------------------------------------------------------------
# Linear-in-coefficients families map x to K feature maps B_m(x), each shaped like x; a
# unit is then one contraction with its coefficients. A list rather than one stacked
# (..., K) tensor: each map feeds its own matmul without a copy, twice as fast on a CPU.
# Logits are unbounded, so every family is defined on all of R: grids clamp, Chebyshev
# squashes with tanh, Fourier is periodic.

SPLINE_RANGE = (-4.0, 4.0)  # grid of `bspline` and centres of `gaussian`: logits of a
# trained ViT mostly lie within ±4; beyond it a spline extrapolates as a constant.


def fourier(x, G):
    """[cos(m x)]_{m=1..G} ++ [sin(m x)]_{m=1..G}: 2G maps, by angle addition from one cos x and
    one sin x, cos((m+1)x) = cos(mx) cos x - sin(mx) sin x, sin((m+1)x) = sin(mx) cos x +
    cos(mx) sin x: four multiplies per map are cheaper than a sin and a cos."""
    cos, sin = [torch.cos(x)], [torch.sin(x)]
    for _ in range(G - 1):
        c, s = cos[-1], sin[-1]
        cos, sin = cos + [c * cos[0] - s * sin[0]], sin + [s * cos[0] + c * sin[0]]
    return cos + sin


def fourier_vjp(x, G, grad):
    """fourier(x, G) and Σ_m g_m B_m'(x), g_m = grad(m), by d cos(mx) = -m sin(mx) and
    d sin(mx) = m cos(mx): the derivative reuses the maps, where autograd would evaluate sin and
    cos again, and each g_m is made when it is used, so one lives at a time."""
    maps = fourier(x, G)
    dx = torch.zeros_like(x)
    for m, (c, s) in enumerate(zip(maps[:G], maps[G:]), 1):
        dx.addcmul_(c, grad(G + m - 1), value=m).addcmul_(s, grad(m - 1), value=-m)
    return maps, dx


def bspline(x, G, k=3, lo=SPLINE_RANGE[0], hi=SPLINE_RANGE[1]):
    """B-splines of order k on G intervals of [lo, hi] (efficient-kan's knots): G+k maps.

    Knots t_i = lo + (i - k) h, h = (hi - lo)/G, i = 0..G+2k; Cox–de Boor recursion
    B_{i,0} = [t_i <= x < t_{i+1}],
    B_{i,j} = (x - t_i)/(t_{i+j} - t_i) B_{i,j-1} + (t_{i+j+1} - x)/(t_{i+j+1} - t_{i+1}) B_{i+1,j-1}.
    x is clamped into [lo, hi) so that no logit ever meets an all-zero basis.
    """
    h = (hi - lo) / G
    t = lo + h * torch.arange(-k, G + k + 1, dtype=x.dtype, device=x.device)
    x = x.clamp(lo, hi - 1e-4 * h)[..., None]
    B = ((x >= t[:-1]) & (x < t[1:])).to(x.dtype)
    for j in range(1, k + 1):
        B = (x - t[: -(j + 1)]) / (j * h) * B[..., :-1] + (t[j + 1:] - x) / (j * h) * B[..., 1:]
    return list(B.unbind(-1))


def chebyshev(x, G):
    """T_m(tanh x) for m = 0..G (G+1 maps), by T_{m+1} = 2u T_m - T_{m-1} (ChebyKAN)."""
    u = torch.tanh(x)
    T = [torch.ones_like(u), u]
    for _ in range(G - 1):
        T.append(2 * u * T[-1] - T[-2])
    return T[: G + 1]


def gaussian(x, G, lo=SPLINE_RANGE[0], hi=SPLINE_RANGE[1]):
    """Radial basis exp(-((x - μ_m)/h)^2), G centres μ_m evenly on [lo, hi], h = (hi - lo)/(G - 1)."""
    h = (hi - lo) / max(G - 1, 1)
    return [torch.exp(-((x - mu) / h) ** 2) for mu in torch.linspace(lo, hi, G).tolist()]


# Families with per-unit nonlinear parameters are evaluated unit by unit. Wavelets act on
# x̃ = (x - τ)/s with learnable translation τ (init 0), scale s (init 1) and weight w.

def rational(x, a, b):
    """P(x) / (1 + |Q(x)|), P = Σ_{i=0..5} a_i x^i, Q = Σ_{j=1..4} b_j x^j (KArAt's (5, 4) form).

    a: (..., 6) and b: (..., 4) broadcast against x.
    """
    P = a[..., 5]
    for i in range(4, -1, -1):
        P = P * x + a[..., i]
    Q = b[..., 3]
    for j in range(2, -1, -1):
        Q = Q * x + b[..., j]
    return P / (1 + (Q * x).abs())


def mexican_hat(x):
    """Ricker wavelet 2/(√3 π^{1/4}) (1 - x²) e^{-x²/2}."""
    return 2 / (math.sqrt(3) * math.pi ** 0.25) * (1 - x ** 2) * torch.exp(-x ** 2 / 2)


def morlet(x, omega0=5.0):
    """Real Morlet wavelet cos(ω₀ x) e^{-x²/2}, ω₀ = 5."""
    return torch.cos(omega0 * x) * torch.exp(-x ** 2 / 2)


def dog(x):
    """Derivative of Gaussian, -d/dx e^{-x²/2} = x e^{-x²/2} (the sign is absorbed by w)."""
    return x * torch.exp(-x ** 2 / 2)


def meyer(x):
    """Meyer-type wavelet sin(π|x|) m(|x|): m = 1 on [0, ½], 0 on [1, ∞),
    cos(π/2 ν(2|x| - 1)) between, with ν(t) = t⁴(35 - 84t + 70t² - 20t³)."""
    v = x.abs()
    t = (2 * v - 1).clamp(0, 1)
    nu = t ** 4 * (35 - 84 * t + 70 * t ** 2 - 20 * t ** 3)
    return torch.sin(math.pi * v) * torch.cos(math.pi / 2 * nu)


def shannon(x):
    """Shannon wavelet sinc(x/π) = sin(x)/x times a symmetric Hamming window
    0.54 - 0.46 cos(2π q/(N - 1)) running over the last axis, the key index q = 0..N-1
    (Wav-KAN windows over its input-feature index)."""
    window = torch.hamming_window(x.shape[-1], periodic=False, dtype=x.dtype, device=x.device)
    return torch.sinc(x / math.pi) * window


@dataclass(frozen=True)
class Basis:
    """A family of units. `expansion` families give features(x, G) -> size(G) maps and a unit
    is Σ_m c_m B_m(x); `unit` families evaluate unit(x, **params) with per-unit parameters.
    `gain(G)` rescales N(0, 1) coefficients so that one unit's output has unit variance;
    `vjp(x, G, grad)` -> (maps, Σ_m grad(m) B_m'(x)), where a closed form beats autograd."""
    fn: Callable
    expansion: bool
    size: Callable = None
    gain: Callable = None
    vjp: Callable = None


BASES = {
    'fourier': Basis(fourier, True, lambda G: 2 * G, lambda G: G ** -0.5, fourier_vjp),  # Σ cos² + sin² = G
    'bspline': Basis(bspline, True, lambda G: G + 3, lambda G: 1.0),        # partition of unity
    'chebyshev': Basis(chebyshev, True, lambda G: G + 1, lambda G: (G + 1) ** -0.5),
    'gaussian': Basis(gaussian, True, lambda G: G, lambda G: 1.0),
    'rational': Basis(rational, False),
    'mexican_hat': Basis(mexican_hat, False),
    'morlet': Basis(morlet, False),
    'dog': Basis(dog, False),
    'meyer': Basis(meyer, False),
    'shannon': Basis(shannon, False),
}
ATTENTIONS = ('softmax', *BASES)
BASE_ACTIVATIONS = {'zero': None, 'silu': F.silu, 'identity': lambda x: x, 'gelu': F.gelu}
ORDERS = ('W_phi', 'phi_W', 'phi_phi')  # σ̂ = W Φ(A) (paper's best), Φ(W A), Φ₂(Φ₁(A))
MODES = ('blockwise', 'universal')


def init_kan(basis, heads, n_out, n_in, G, base, std):
    """Parameters of `heads` Kolmogorov-Arnold layers R^n_in -> R^n_out, each unit's output
    having standard deviation `std` on logits of order one.

    The paper draws Fourier coefficients from N(0, 1) unscaled: a sum over N = 197 keys of
    2G such terms has standard deviation ~sqrt(2GN) ≈ 34 and an untrained ViT diverges. We
    scale like a variance-preserving layer (FourierKAN's 1/sqrt(n_in G)): the caller picks
    std = 1/sqrt(n_in) so that Σ_q φ_pq(a_q) has unit variance."""
    shape = (heads, n_out, n_in)
    randn = lambda *s: torch.randn(*shape, *s)
    if basis.expansion:
        p = {'coef': randn(basis.size(G)) * std * basis.gain(G)}
    elif basis.fn is rational:
        # P starts as a random affine map; Q starts small but non-zero, since |Q| has no
        # gradient at Q = 0 and the denominator would never learn.
        p = {'a': torch.cat([randn(2) * std, torch.zeros(*shape, 4)], -1), 'b': randn(4) * 0.1}
    else:
        p = {'w': randn() * std, 'tau': torch.zeros(shape), 's': torch.ones(shape)}
    if BASE_ACTIVATIONS[base] is not None:
        p['w_base'] = randn() * std
    return p


# §2  One Kolmogorov-Arnold layer over a row -------------------------------------------

def expansion_maps(x, basis, G, base):
    """The maps B_m(x) of an expansion family, and b(x) when there is a base activation."""
    b = BASE_ACTIVATIONS[base]
    return basis.fn(x, G) + ([] if b is None else [b(x)])


def expansion_coefs(params):
    """The coefficients C_m (h p q) that go with `expansion_maps`."""
    return params['coef'].unbind(-1) + ((params['w_base'],) if 'w_base' in params else ())


def values(params):
    """The low-rank primitive's X_m = C_m^T, stacked (1 h m q p): a view of the coefficients."""
    C = params['coef']
    if 'w_base' in params:
        C = torch.cat([C, params['w_base'][..., None]], -1)
    return rearrange(C, 'h p q m -> 1 h m q p')


def contract(maps, values, mask):
    """Σ_m (mask ⊙ B_m) X_m per head: matmul broadcasts (b h i j) @ (b|1 h j e), no copies."""
    return sum((B if mask is None else B * mask) @ X for B, X in zip(maps, values))


def kan(x, basis, params, G, base='zero', mask=None):
    """Φ(x)_p = Σ_q m_q φ_pq(x_q) for every row x of a batch, per head.

    x: (b h i q); params indexed (h p q ...); mask: 0/1 broadcastable to x (1 = keep),
    so that a masked input contributes exactly zero. Returns (b h i p).
    """
    if basis.expansion:
        coefs = [C.mT for C in expansion_coefs(params)]
        return contract(expansion_maps(x, basis, G, base), coefs, mask)
    x_ = rearrange(x, 'b h i q -> b h i 1 q')
    p = {k: rearrange(v, 'h p q ... -> h 1 p q ...') for k, v in params.items()}
    if basis.fn is rational:
        phi = rational(x_, p['a'], p['b'])
    else:
        phi = p['w'] * basis.fn((x_ - p['tau']) / p['s'])
    if mask is not None:
        phi = phi * rearrange(mask, '... i q -> ... i 1 q')
    out = phi.sum(-1)
    if 'w_base' in params:
        b = BASE_ACTIVATIONS[base](x)
        b = b if mask is None else b * mask
        out = out + einsum(b, params['w_base'], 'b h i q, h p q -> b h i p')
    return out


# §3  Attention operators ----------------------------------------------------------------

def project_simplex(s, mask=None):
    """Euclidean projection of each row onto the probability simplex (the paper's ℓ1 ablation),
    by sorting (Duchi et al. 2008): relu(s - θ) with θ chosen so the row sums to one."""
    if mask is not None:  # θ >= max(s) - 1, so anything below min(s) - 1 projects to exactly 0
        s = torch.where(mask.bool(), s, s.detach().amin(-1, keepdim=True) - 1)
    u, _ = s.sort(dim=-1, descending=True)
    k = torch.arange(1, s.shape[-1] + 1, dtype=s.dtype, device=s.device)
    css = u.cumsum(-1) - 1
    rho = ((u - css / k) > 0).sum(-1, keepdim=True)
    theta = css.gather(-1, rho - 1) / rho
    return F.relu(s - theta)


def karat_attention(A, V, op, mask=None, return_attention=False):
    """O = σ̂(A) V for logits A (b h i j) and values V (b h j d) with the operator `op`.

    mask: 0/1 (b|1, h|1, i|1, j), 1 = attend. A masked key enters no unit and gets weight 0.
    Where the re-association applies (W Φ̂ order, keys masked alike for every query, no
    projection) the output is computed as O = Z (W^T V) without the N x N matrix σ̂.
    Returns O (b h i d), or σ̂ (b h i j) when return_attention.
    """
    Phi = lambda x, params, mask: kan(x, op.basis, params, op.grid, op.base, mask)
    if op.rank is None:
        S = Phi(A, op.phi, mask)
    elif op.order == 'W_phi':
        Z = Phi(A, op.phi, mask)
        query_free_mask = mask is None or mask.shape[2] == 1
        if op.efficient and query_free_mask and not (op.simplex or return_attention):
            WtV = einsum(op.W, V if mask is None else V * rearrange(mask, 'b h 1 j -> b h j 1'), 'h j r, b h j d -> b h r d')
            return einsum(Z, WtV, 'b h i r, b h r d -> b h i d')
        S = einsum(Z, op.W, 'b h i r, h j r -> b h i j')
    elif op.order == 'phi_W':
        S = Phi(einsum(A if mask is None else A * mask, op.W, 'b h i j, h j r -> b h i r'), op.phi, None)
    else:
        S = Phi(Phi(A, op.phi, mask), op.phi2, None)
    if mask is not None:
        S = S * mask
    if op.simplex:
        S = project_simplex(S, mask)
    return S if return_attention else einsum(S, V, 'b h i j, b h j d -> b h i d')


# §4  Fast paths: nothing N x N kept -----------------------------------------------------
# karat_attention keeps the logits A (b h i j) for backward. The fast paths take q, k and the
# bias instead and recompute the logits in backward: one chunk of query rows at a time in
# PyTorch (kernel='torch'), tile by tile in fused Triton kernels (kernel='triton', kernels.py).
# Every form they fuse is one primitive, Y = Σ_m (M ⊙ B_m(S)) X_m with S = scale q k^T + bias:
#     low rank   X_m = C_m^T, Y = Z, then O = Z (W^T (M ⊙ V))
#     full rank  X_m = U_m = C_m^T (M ⊙ V), Y = O
# A mask that depends on the query masks σ̂ = M ⊙ (Z W^T) too, so O = Z (W^T V) no longer
# factors: O is a second pass of the primitive with q = Z, k = W, scale 1 and B(x) = x. Unit
# families give Z_ip = Σ_j M_ij φ_pj(S_ij) the same way. The remaining forms (ablation orders,
# the simplex, full-rank units, full rank under a per-query mask) run the definition on
# chunks of rows, recomputed in backward.

KERNELS = ('auto', 'torch', 'triton')


def linear(x, G):
    """B(x) = x, the one map of the per-query mask's second pass."""
    return [x]


LINEAR = Basis(linear, True, lambda G: 1, vjp=lambda x, G, grad: ([x], grad(0)))


def chunk_elements(device):
    """Default size of a chunk's feature tensor, in elements: 8 MB of float32 on a CPU, where
    small chunks bound the transient of backward; 1 GB on a GPU, which wants few large launches."""
    return 2 ** 21 if device.type == 'cpu' else 2 ** 28


class RecomputedExpansion(torch.autograd.Function):
    """Y = Σ_m (M ⊙ B_m(S)) X_m keeping only q, k and the bias; backward recomputes S and the
    maps: dX_m = F_m^T dY, dS = M ⊙ Σ_m (dY X_m^T) ⊙ B_m'(S), dq = scale dS k,
    dk = scale dS^T q."""

    @staticmethod
    def forward(ctx, q, k, bias, mask, X, scale, basis, G, base):
        ctx.save_for_backward(q, k, bias, mask, X)
        ctx.static = scale, basis, G, base
        device = q.device.type  # backward runs outside autocast: it re-enters the forward's state
        ctx.autocast = dict(device_type=device, enabled=torch.is_autocast_enabled(device),
                            dtype=torch.get_autocast_dtype(device))
        maps = expansion_maps(logits(q, k, bias, scale), basis, G, base)
        return contract(maps, X.unbind(2), mask)

    @staticmethod
    def backward(ctx, dY):
        q, k, bias, mask, X = ctx.saved_tensors
        scale, basis, G, base = ctx.static
        with torch.autocast(**ctx.autocast):
            S = logits(q, k, bias, scale)
            grad = lambda m: dY @ X[:, :, m].mT if mask is None else (dY @ X[:, :, m].mT) * mask
            if basis.vjp is not None and base == 'zero':
                maps, dS = basis.vjp(S, G, grad)
            else:
                with torch.enable_grad():
                    S = S.detach().requires_grad_()
                    maps = expansion_maps(S, basis, G, base)
                outs, gs = zip(*[(B, grad(m)) for m, B in enumerate(maps)
                                 if B.requires_grad])  # not T_0 = 1
                dS = torch.autograd.grad(outs, S, gs)[0]
            dX = torch.stack([(B if mask is None else B * mask).detach().mT @ dY for B in maps], 2)
            dq, dk = dS @ k * scale, dS.mT @ q * scale
        dbias = None if bias is None else dS.sum_to_size(bias.shape)
        return dq, dk.sum_to_size(k.shape), dbias, None, dX.sum_to_size(X.shape), *[None] * 4


class Reassociated(torch.autograd.Function):
    """O = Z (W^T V) keeping Z, W, the small W^T V (b h r d) and V itself, a view of the qkv
    projection that autograd holds anyway: a matmul would keep V and W copied into its batched
    layout, one N x d copy per block."""

    @staticmethod
    def forward(ctx, Z, W, V):
        WtV = W.mT @ V  # (h r j) @ (b h j d)
        ctx.save_for_backward(Z, W, V, WtV)
        device = Z.device.type
        ctx.autocast = dict(device_type=device, enabled=torch.is_autocast_enabled(device),
                            dtype=torch.get_autocast_dtype(device))
        return Z @ WtV

    @staticmethod
    def backward(ctx, dO):
        Z, W, V, WtV = ctx.saved_tensors
        with torch.autocast(**ctx.autocast):
            dWtV = Z.mT @ dO
            return dO @ WtV.mT, (V @ dWtV.mT).sum(0), W @ dWtV


def over_rows(fn, q, bias, mask, elements, per_row):
    """fn(q, bias, mask) on chunks of query rows, each at most `elements` // `per_row` rows,
    concatenated; bias and mask (b|1, h|1, i|1, j) are cut with q where they have rows."""
    step = max(1, elements // per_row)
    if step >= q.shape[2]:
        return fn(q, bias, mask)
    rows = lambda t, i: t if t is None or t.shape[2] == 1 else t[:, :, i:i + step]
    return torch.cat([fn(rows(q, i), rows(bias, i), rows(mask, i))
                      for i in range(0, q.shape[2], step)], dim=2)


def recomputed(fn):
    """fn, checkpointed when a gradient is needed: it keeps its inputs, not its intermediates."""
    return lambda *x: checkpoint(fn, *x, use_reentrant=False) if torch.is_grad_enabled() else fn(*x)


def rows_expansion(q, k, bias, mask, X, scale, basis, G, base, elements):
    """The primitive in PyTorch, chunk by chunk. X: (b|1, h, m, j, e)."""
    layer = lambda q, bias, mask: RecomputedExpansion.apply(q, k, bias, mask, X, scale, basis, G,
                                                            base)
    per_row = q.shape[0] * q.shape[1] * k.shape[2] * X.shape[2]
    return over_rows(layer, q, bias, mask, elements, per_row)


def rows_units(q, k, bias, mask, params, basis, G, base, scale, elements):
    """Z_ip = Σ_j M_ij φ_pj(S_ij) of a unit family in PyTorch, chunk by chunk."""
    layer = recomputed(lambda q, bias, mask: kan(logits(q, k, bias, scale), basis, params, G, base,
                                                 mask))
    n_out = next(iter(params.values())).shape[1]
    return over_rows(layer, q, bias, mask, elements, q.shape[0] * q.shape[1] * k.shape[2] * n_out)


def fast_path(kernel, device):
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


def fast_attention(q, k, v, bias, mask, op):
    """karat_attention(logits(q, k, bias), v, op, mask) with nothing N x N kept for backward.

    q, k (b h i d), (b h j d); v (b h j e); bias, mask broadcastable to (b h i j)."""
    expansion, units = fast_path(op.kernel, q.device)
    elements, scale = op.chunk_elements or chunk_elements(q.device), q.shape[-1] ** -0.5
    query_mask = mask is not None and mask.shape[2] > 1
    vm = v if mask is None or query_mask else v * rearrange(mask, 'b h 1 j -> b h j 1')
    full_unfused = op.rank is None and (query_mask or not op.basis.expansion)
    if op.order != 'W_phi' or op.simplex or full_unfused:
        layer = recomputed(lambda q, bias, mask: karat_attention(logits(q, k, bias), v, op, mask))
        maps = op.basis.size(op.grid) if op.basis.expansion else 1
        per_row = q.shape[0] * q.shape[1] * k.shape[2] * maps * (op.rank or k.shape[2])
        return over_rows(layer, q, bias, mask, elements, per_row)
    if op.rank is None:
        U = torch.stack([einsum(C, vm, 'h p q, b h p d -> b h q d')
                         for C in expansion_coefs(op.phi)], 2)
        return expansion(q, k, bias, mask, U, scale, op.basis, op.grid, op.base, elements)
    if op.basis.expansion:
        Z = expansion(q, k, bias, mask, values(op.phi), scale, op.basis, op.grid, op.base, elements)
    else:
        Z = units(q, k, bias, mask, dict(op.phi), op.basis, op.grid, op.base, scale, elements)
    if not query_mask:
        return Reassociated.apply(Z, op.W, vm)
    return expansion(Z, op.W[None], None, mask, v[:, :, None], 1.0, LINEAR, 1, 'zero', elements)


# §5  Modules: parameters, sharing, one interface for softmax and KArAt ---------------------

def check_options(attn='softmax', mode='blockwise', grid=3, rank=12, base='zero', order='W_phi', seq_len=None,
                  kernel='auto'):
    """Raise a ValueError naming the bad option and its allowed values."""
    def bad(what, allowed):
        raise ValueError(f"{what}; allowed: {allowed}")
    if attn not in ATTENTIONS: bad(f"unknown attention {attn!r}", ', '.join(ATTENTIONS))
    if kernel not in KERNELS: bad(f"unknown kernel {kernel!r}", ', '.join(KERNELS))
    if mode not in MODES: bad(f"unknown mode {mode!r}", ', '.join(MODES))
    if base not in BASE_ACTIVATIONS: bad(f"unknown base activation {base!r}", ', '.join(BASE_ACTIVATIONS))
    if order not in ORDERS: bad(f"unknown operator order {order!r}", ', '.join(ORDERS))
    if not (isinstance(grid, int) and grid >= 1): bad(f"grid size G must be an integer >= 1, got {grid!r}", 'G >= 1')
    if rank is None:
        if order != 'W_phi': bad(f"order {order!r} needs a low-rank operator, got rank=None", 'rank 1..N')
    elif not (isinstance(rank, int) and rank >= 1 and (seq_len is None or rank <= seq_len)):
        bad(f"rank r must be an integer in 1..N, got {rank!r}", f"1 <= r <= N{'' if seq_len is None else f' = {seq_len}'}, or None for the full N x N operator")


class Operator(nn.Module):
    """The learnable activation of `heads` heads over rows of N = seq_len logits.

    rank r: Φ̂ with r x N units per head and W ∈ R^{N x r}; rank None: the full Φ, N x N units.
    order: 'W_phi' σ̂ = W Φ̂(A) | 'phi_W' σ̂ = Φ(W^T A) | 'phi_phi' σ̂ = Φ₂(Φ₁(A)).
    simplex: project each activated row onto the probability simplex (off, as in the paper).
    efficient: the fast paths (§4), which keep only q, k and the bias for backward; False gives
    the naive materialised formula (kept for tests and benchmarks).
    kernel: the fast path, 'torch' (chunks of query rows), 'triton' (fused kernels, CUDA) or
    'auto' (PyTorch until the Triton path is measured faster on a GPU).
    chunk_elements: features per chunk of the PyTorch path; None: `chunk_elements(device)`.

    Init: every σ̂ entry has variance ~1/N, like the entries of a unit-norm row, so the
    output Σ_n σ̂_n V_n is on the scale of V, as with softmax.
    """

    def __init__(self, attn, heads, seq_len, grid=3, rank=12, base='zero', order='W_phi', simplex=False, efficient=True,
                 kernel='auto', chunk_elements=None):
        super().__init__()
        check_options(attn, 'blockwise', grid, rank, base, order, seq_len, kernel)
        if attn == 'softmax':
            raise ValueError(f"Operator needs a basis, got 'softmax'; allowed: {', '.join(BASES)}")
        self.attn, self.basis, self.heads, self.seq_len = attn, BASES[attn], heads, seq_len
        self.grid, self.rank, self.base, self.order, self.simplex, self.efficient = grid, rank, base, order, simplex, efficient
        self.kernel, self.chunk_elements = kernel, chunk_elements
        N, r = seq_len, rank
        params = lambda n_out, n_in, std: nn.ParameterDict(init_kan(self.basis, heads, n_out, n_in, grid, base, std))
        if rank is None:
            self.phi = params(N, N, 1 / N)
        elif order == 'W_phi':
            self.phi = params(r, N, N ** -0.5)                          # Z_p has unit variance
            self.W = nn.Parameter(torch.randn(heads, N, r) / math.sqrt(r * N))
        elif order == 'phi_W':
            self.W = nn.Parameter(torch.randn(heads, N, r) / math.sqrt(N))  # W^T A on the scale of A
            self.phi = params(N, r, 1 / math.sqrt(r * N))
        else:
            self.phi = params(r, N, N ** -0.5)
            self.phi2 = params(N, r, 1 / math.sqrt(r * N))

    def forward(self, A, V, mask=None, return_attention=False):
        return karat_attention(A, V, self, mask, return_attention)

    def extra_repr(self):
        return f"{self.attn}, heads={self.heads}, N={self.seq_len}, G={self.grid}, r={self.rank}, base={self.base}, order={self.order}"

    def key_axes(self, name):
        """The axes of parameter `name` ('phi.coef', 'W', ...) indexed by key position: both of
        the full Φ (h, N, N, ...); the input q of Φ̂ (h, r, N, ...) and the N of W (h, N, r) in
        the W Φ̂ order; the outputs of Φ (h, N, r, ...) and of Φ₂ and the N of W otherwise."""
        if self.rank is None:
            return (1, 2)
        if name == 'W' or name.startswith('phi2.') or self.order == 'phi_W':
            return (1,)
        return (2,)


def logits(q, k, bias=None, scale=None):
    """A = q k^T / sqrt(d) (+ bias): (b h i d), (b h j d) -> (b h i j); another scale if given."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    A = einsum(q, k, 'b h i d, b h j d -> b h i j') * scale
    return A if bias is None else A + bias


def check_qkv(q, k, v, seq_len=None):
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise ValueError(f"q, k, v must be (batch, heads, tokens, dim), got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q, k, v disagree: shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}; "
                         "allowed: q (b h i d), k (b h j d), v (b h j e)")
    if seq_len is not None and k.shape[2] != seq_len:
        raise ValueError(f"this KArAt operator was built for N = {seq_len} keys, got {k.shape[2]}; "
                         "a KArAt model accepts only the sequence length (image size) it was built for")


def four_d(t):
    """A bias or mask broadcastable to (b h i j), with its missing leading axes as size 1."""
    return t if t is None else t.reshape((1,) * (4 - t.dim()) + t.shape)


def as_mask(mask, dtype):
    """Bool or 0/1 mask broadcastable to (b h i j) -> 4-D 0/1 tensor of `dtype`."""
    return None if mask is None else four_d(mask).to(dtype)


class Softmax(nn.Module):
    """softmax(q k^T / sqrt(d) + bias) V through scaled_dot_product_attention (flash kernels)."""

    def forward(self, q, k, v, bias=None, mask=None):
        check_qkv(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self._additive(bias, mask, q.dtype))

    def activate(self, q, k, bias=None, mask=None):
        """The N x N attention matrix (b h i j)."""
        A = logits(q, k, bias)
        return (A if mask is None else A.masked_fill(~mask.bool(), float('-inf'))).softmax(-1)

    @staticmethod
    def _additive(bias, mask, dtype):
        if mask is None:
            return bias
        m = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask.bool(), float('-inf'))
        return m if bias is None else bias + m


class KArAt(nn.Module):
    """Kolmogorov-Arnold attention with the interface of `Softmax`: forward(q, k, v, bias, mask).

    Holds a reference to an `Operator`, its own (blockwise) or shared by every block
    (universal), so that each block keeps a hookable `attend` submodule of its own."""

    def __init__(self, operator):
        super().__init__()
        self.operator = operator

    def forward(self, q, k, v, bias=None, mask=None):
        check_qkv(q, k, v, self.operator.seq_len)
        mask, op = as_mask(mask, q.dtype), self.operator
        if op.efficient:
            return fast_attention(q, k, v, four_d(bias), mask, op)
        return op(logits(q, k, bias), v, mask)

    def activate(self, q, k, bias=None, mask=None):
        """The activated N x N matrix σ̂ (b h i j): built only when asked for."""
        check_qkv(q, k, k, self.operator.seq_len)
        return self.operator(logits(q, k, bias), None, as_mask(mask, q.dtype), return_attention=True)


def attention_maker(attn='softmax', mode='blockwise', grid=3, rank=12, base='zero', order='W_phi', simplex=False, efficient=True,
                    kernel='auto'):
    """Returns make(heads, seq_len) -> attention module, for models to call once per block.

    mode 'blockwise': every block gets its own operators ("GnB"); 'universal': one set of
    operators per (heads, N) shared by all blocks ("GnU"). Options are checked here, once.
    """
    check_options(attn, mode, grid, rank, base, order, kernel=kernel)
    shared = {}

    def make(heads, seq_len):
        if attn == 'softmax':
            return Softmax()
        if mode == 'blockwise' or (heads, seq_len) not in shared:
            shared[heads, seq_len] = Operator(attn, heads, seq_len, grid, rank, base, order, simplex,
                                              efficient, kernel)
        return KArAt(shared[heads, seq_len])
    return make


@contextmanager
def capture_attention(model):
    """Record the activated attention of every block: {module name: (b h i j)} for each forward.

    with capture_attention(model) as maps:
        model(images)
    """
    maps = {}
    hook = lambda name: lambda m, args, kwargs, out: maps.__setitem__(name, m.activate(
        args[0], args[1], *args[3:], **kwargs).detach())
    handles = [m.register_forward_hook(hook(name), with_kwargs=True)
               for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, (Softmax, KArAt))]
    try:
        yield maps
    finally:
        for h in handles:
            h.remove()
