"""Kolmogorov-Arnold Attention (KArAt), after Maity et al., arXiv 2503.10632.

Softmax turns a row of attention logits A_k = q_k K^T / sqrt(d) (plus any bias) into
weights over the N keys. KArAt replaces it with a learnable Kolmogorov-Arnold operator:

    full       σ(A_k) = Φ(A_k),     Φ: R^N -> R^N,  Φ(a)_p = Σ_q φ_pq(a_q)   (N x N units)
    low-rank   σ̂(A_k) = W Φ̂(A_k),  Φ̂: R^N -> R^r,  W ∈ R^{N x r}          (r x N units)

and the output row is O_k = Σ_n σ̂(A_k)_n V_n. Because σ̂ = W Φ̂ is linear in W, the output
re-associates exactly to O = Z (W^T V) with Z_kp = Φ̂(A_k)_p: the N x N activated matrix is
never built unless somebody asks for it.

Each unit is φ_pq(x) = w^b_pq b(x) + Σ_m c_pqm B_m(x): a base activation b (none by default,
as in the paper's best models) plus a basis expansion with G functions ("grid size").

The file reads top to bottom: §1 basis families, §2 one Kolmogorov-Arnold layer over a row,
§3 the attention operators (full, low-rank, the paper's ablations), §4 the options and the
modules that hold the parameters and share them blockwise or universally. It imports nothing
else of its project and runs when copied alone: a KArAt module computes `definition`, the
formula differentiated by autograd, unless given another `compute`; fast.py's (which
models.create_model uses) computes the same keeping nothing N x N for backward.

    attend = attention_maker('fourier', grid=3, rank=12)(heads=3, seq_len=197)
    out = attend(q, k, v)            # q, k, v: (batch, heads, tokens, dim)
"""
import math
from dataclasses import dataclass, field, fields, replace
from typing import Callable

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import nn

# §1  Basis families -------------------------------------------------------------------
# Expansion families map x to K feature maps B_m(x), each shaped like x; a unit is then one
# contraction with its coefficients. A list rather than one stacked (..., K) tensor: each map
# feeds its own matmul without a copy, twice as fast on a CPU. Logits are unbounded, so every
# family is defined on all of R: grids clamp, Chebyshev squashes with tanh, Fourier is periodic.

SPLINE_RANGE = (-4.0, 4.0)  # grid of `bspline` and centres of `gaussian`: logits of a
# trained ViT mostly lie within ±4; beyond it a spline extrapolates as a constant.


def fourier(x, G, out=None):
    """[cos(m x)]_{m=1..G} ++ [sin(m x)]_{m=1..G}: 2G maps from one cos x and one sin x, the
    rest by one fused multiply-add each (cheaper than a sin or a cos): cos((m+1)x) = cos((m-1)x)
    - 2 sin x sin(mx), sin((m+1)x) = sin((m-1)x) + 2 sin x cos(mx), from cos 0 = 1 and sin 0 = 0
    as tensors on x's device (addcmul's operands). `out`, a (2G, *x.shape) tensor, receives the
    maps in that order (no autograd through it): a fast path's one operand for all of them."""
    at = lambda m: None if out is None else out[m]
    cos = [x.new_ones(()), torch.cos(x, out=at(0))]
    sin = [x.new_zeros(()), torch.sin(x, out=at(G))]
    for m in range(1, G):
        cos.append(torch.addcmul(cos[m - 1], sin[1], sin[m], value=-2, out=at(m)))
        sin.append(torch.addcmul(sin[m - 1], sin[1], cos[m], value=2, out=at(G + m)))
    return cos[1:] + sin[1:]


def fourier_vjp(x, G, grad, out=None):
    """fourier(x, G, out) and Σ_m g_m B_m'(x), g_m = grad(m), by d cos(mx) = -m sin(mx), d sin(mx)
    = m cos(mx): the maps are reused (autograd would evaluate sin and cos again), and each g_m is
    made when it is used, so one lives at a time."""
    maps = fourier(x, G, out)
    cos, sin = maps[:G], maps[G:]
    dx = (cos[0] * grad(G)).addcmul_(sin[0], grad(0), value=-1)  # m = 1
    for m in range(2, G + 1):
        dx.addcmul_(cos[m - 1], grad(G + m - 1), value=m)
        dx.addcmul_(sin[m - 1], grad(m - 1), value=-m)
    return maps, dx


def bspline(x, G, k=3, lo=SPLINE_RANGE[0], hi=SPLINE_RANGE[1]):
    """B-splines of order k on G intervals of [lo, hi] (efficient-kan's knots): G+k maps.

    Knots t_i = lo + (i - k) h, h = (hi - lo)/G, i = 0..G+2k; Cox–de Boor recursion
    B_{i,0} = [t_i <= x < t_{i+1}], B_{i,j} = (x - t_i)/(t_{i+j} - t_i) B_{i,j-1}
    + (t_{i+j+1} - x)/(t_{i+j+1} - t_{i+1}) B_{i+1,j-1}.
    x is clamped into [lo, hi) so that no logit ever meets an all-zero basis."""
    h = (hi - lo) / G
    t = lo + h * torch.arange(-k, G + k + 1, dtype=x.dtype, device=x.device)
    x = x.clamp(lo, hi - 1e-4 * h)[..., None]
    B = ((x >= t[:-1]) & (x < t[1:])).to(x.dtype)
    for j in range(1, k + 1):
        B = (x - t[:-(j + 1)]) / (j * h) * B[..., :-1] + (t[j + 1:] - x) / (j * h) * B[..., 1:]
    return list(B.unbind(-1))


def chebyshev(x, G):
    """T_m(tanh x) for m = 0..G (G+1 maps), by T_{m+1} = 2u T_m - T_{m-1} (ChebyKAN)."""
    u = torch.tanh(x)
    T = [torch.ones_like(u), u]
    for _ in range(G - 1):
        T.append(2 * u * T[-1] - T[-2])
    return T[:G + 1]


def gaussian(x, G, lo=SPLINE_RANGE[0], hi=SPLINE_RANGE[1]):
    """Radial basis exp(-((x - μ_m)/h)^2) (FastKAN), G centres μ_m evenly on [lo, hi],
    h = (hi - lo)/(G - 1)."""
    h = (hi - lo) / max(G - 1, 1)
    return [torch.exp(-((x - mu) / h) ** 2) for mu in torch.linspace(lo, hi, G).tolist()]


# Unit families have per-unit nonlinear parameters and are evaluated unit by unit.

def rational(x, a, b):
    """P(x) / (1 + |Q(x)|), P = Σ_{i=0..5} a_i x^i, Q = Σ_{j=1..4} b_j x^j (KArAt's (5, 4) form).

    The denominator is the "safe" Padé activation unit of Molina et al. (ICLR 2020),
    1 + |Σ_j b_j x^j|; KAT's GPU kernels (Yang & Wang, 2024) use 1 + Σ_j |b_j| |x|^j instead.
    a: (..., 6) and b: (..., 4) broadcast against x."""
    P = a[..., 5]
    for i in range(4, -1, -1):
        P = P * x + a[..., i]
    Q = b[..., 3]
    for j in range(2, -1, -1):
        Q = Q * x + b[..., j]
    return P / (1 + (Q * x).abs())


# Wavelets ψ, each unit w ψ((x - τ)/s): where a sign differs between sources, w absorbs it.

def mexican_hat(x):
    """Ricker wavelet 2/(√3 π^{1/4}) (1 - x²) e^{-x²/2}, the negative of Wav-KAN's
    (Bozorgasl & Chen, 2024)."""
    return 2 / (math.sqrt(3) * math.pi ** 0.25) * (1 - x ** 2) * torch.exp(-x ** 2 / 2)


def morlet(x, omega0=5.0):
    """Real Morlet wavelet cos(ω₀ x) e^{-x²/2}, ω₀ = 5, as in Wav-KAN."""
    return torch.cos(omega0 * x) * torch.exp(-x ** 2 / 2)


def dog(x):
    """Derivative of Gaussian, -d/dx e^{-x²/2} = x e^{-x²/2}, the negative of Wav-KAN's."""
    return x * torch.exp(-x ** 2 / 2)


def meyer(x):
    """Meyer-type wavelet sin(π|x|) m(|x|): m = 1 on [0, ½], 0 on [1, ∞),
    cos(π/2 ν(2|x| - 1)) between, with ν(t) = t⁴(35 - 84t + 70t² - 20t³) (Wav-KAN's)."""
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
    """A family of univariate units φ, described by what a layer needs of it.

    Expansion families, φ(x) = Σ_m c_m B_m(x), linear in the coefficients:
        maps(x, G) -> the size(G) maps B_m(x); gain(G) scales N(0, 1) coefficients so that
        φ has unit variance; vjp(x, G, grad, out=None) -> (maps, Σ_m grad(m) B_m'(x)), a
        closed-form derivative where one beats autograd, the maps written into `out` (one
        (size, *x.shape) tensor) when given (optional).
    Unit families, with per-unit parameters:
        unit(x, params) -> φ(x), the parameters broadcast against x; init(shape, std) -> the
        parameters of `shape` units, each with output standard deviation ~std."""
    name: str
    maps: Callable = None
    size: Callable = None
    gain: Callable = None
    vjp: Callable = None
    unit: Callable = None
    init: Callable = None

    @property
    def expansion(self):
        return self.maps is not None


def rational_init(shape, std):
    """P starts as a random affine map; Q starts small but non-zero, since |Q| has no gradient
    at Q = 0 and the denominator would never learn."""
    a = torch.cat([torch.randn(*shape, 2) * std, torch.zeros(*shape, 4)], -1)
    return {'a': a, 'b': torch.randn(*shape, 4) * 0.1}


def wavelet(name, psi):
    """The unit family w ψ((x - τ)/s): weight w, translation τ (init 0), scale s (init 1)."""
    init = lambda shape, std: {'w': torch.randn(shape) * std, 'tau': torch.zeros(shape),
                               's': torch.ones(shape)}
    return Basis(name, unit=lambda x, p: p['w'] * psi((x - p['tau']) / p['s']), init=init)


BASES = {
    'fourier': Basis('fourier', maps=fourier, size=lambda G: 2 * G, gain=lambda G: G ** -0.5,
                     vjp=fourier_vjp),                     # Σ_m cos² + sin² = G
    'bspline': Basis('bspline', maps=bspline, size=lambda G: G + 3,
                     gain=lambda G: 1.0),                  # Σ_m B_m = 1
    'chebyshev': Basis('chebyshev', maps=chebyshev, size=lambda G: G + 1,
                       gain=lambda G: (G + 1) ** -0.5),
    'gaussian': Basis('gaussian', maps=gaussian, size=lambda G: G, gain=lambda G: 1.0),
    'rational': Basis('rational', unit=lambda x, p: rational(x, p['a'], p['b']),
                      init=rational_init),
    **{psi.__name__: wavelet(psi.__name__, psi)
       for psi in (mexican_hat, morlet, dog, meyer, shannon)},
}
ATTENTIONS = ('softmax', *BASES)
BASE_ACTIVATIONS = {'zero': None, 'silu': F.silu, 'identity': lambda x: x, 'gelu': F.gelu}
ORDERS = ('W_phi', 'phi_W', 'phi_phi')  # σ̂ = W Φ(A) (paper's best), Φ(W A), Φ₂(Φ₁(A))
MODES = ('blockwise', 'universal')


def init_kan(basis, heads, n_out, n_in, G, base, std):
    """Parameters of `heads` Kolmogorov-Arnold layers R^n_in -> R^n_out, each unit's output of
    standard deviation `std` on logits of order one. The paper draws Fourier coefficients from
    N(0, 1): over N = 197 keys, 2G such terms sum to a std of ~sqrt(2GN) ≈ 34 and an untrained
    ViT diverges. We scale like FourierKAN (1/sqrt(n_in G)); std = 1/sqrt(n_in) gives
    Σ_q φ_pq(a_q) unit variance."""
    shape = (heads, n_out, n_in)
    p = ({'coef': torch.randn(*shape, basis.size(G)) * std * basis.gain(G)} if basis.expansion
         else basis.init(shape, std))
    if BASE_ACTIVATIONS[base] is not None:
        p['w_base'] = torch.randn(shape) * std
    return p


# §2  One Kolmogorov-Arnold layer over a row -------------------------------------------

def expansion_maps(x, basis, G, base):
    """The maps B_m(x) of an expansion family, and b(x) when there is a base activation."""
    b = BASE_ACTIVATIONS[base]
    return basis.maps(x, G) + ([] if b is None else [b(x)])


def expansion_coefs(params):
    """The coefficients C_m (h p q) that go with `expansion_maps`."""
    return params['coef'].unbind(-1) + ((params['w_base'],) if 'w_base' in params else ())


def contract(maps, values, mask):
    """Σ_m (mask ⊙ B_m) X_m per head: matmul broadcasts (b h i j) @ (b|1 h j e), no copies."""
    return sum((B if mask is None else B * mask) @ X for B, X in zip(maps, values))


def kan(x, basis, params, G, base='zero', mask=None):
    """Φ(x)_p = Σ_q m_q φ_pq(x_q) for every row x of a batch, per head.

    x: (b h i q); params indexed (h p q ...); mask: 0/1 broadcastable to x (1 = keep),
    so that a masked input contributes exactly zero. Returns (b h i p)."""
    if basis.expansion:
        coefs = [C.mT for C in expansion_coefs(params)]
        return contract(expansion_maps(x, basis, G, base), coefs, mask)
    units = {k: rearrange(v, 'h p q ... -> h 1 p q ...') for k, v in params.items()}
    x = rearrange(x, 'b h i q -> b h i 1 q')
    phi = basis.unit(x, units)
    if 'w_base' in units:
        phi = phi + units['w_base'] * BASE_ACTIVATIONS[base](x)
    if mask is not None:
        phi = phi * rearrange(mask, '... i q -> ... i 1 q')
    return phi.sum(-1)


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


def key_masked(V, mask):
    """M ⊙ V for a mask (b|1, h|1, 1, j) that is the same for every query."""
    return V if mask is None else V * rearrange(mask, 'b h 1 j -> b h j 1')


def karat_attention(A, V, params, config, mask=None, return_attention=False):
    """O = σ̂(A) V for logits A (b h i j) and values V (b h j d).

    params: the operator's tensors, {'phi': Φ̂'s (or Φ's), 'W': W, 'phi2': Φ₂'s} as `layout`
    states them; config: its `AttentionConfig`. mask: 0/1 (b|1, h|1, i|1, j), 1 = attend:
    a masked key enters no unit and gets weight 0. Where the re-association applies (W Φ̂
    order, keys masked alike for every query, no projection) the output is O = Z (W^T V),
    without the N x N matrix σ̂. Returns O (b h i d), or σ̂ (b h i j) when return_attention."""
    Phi = lambda x, p, mask: kan(x, BASES[config.attn], p, config.grid, config.base, mask)
    if config.rank is None:
        S = Phi(A, params['phi'], mask)
    elif config.order == 'W_phi':
        Z = Phi(A, params['phi'], mask)
        query_free_mask = mask is None or mask.shape[2] == 1
        if query_free_mask and not (config.simplex or return_attention):
            WtV = einsum(params['W'], key_masked(V, mask), 'h j r, b h j d -> b h r d')
            return einsum(Z, WtV, 'b h i r, b h r d -> b h i d')
        S = einsum(Z, params['W'], 'b h i r, h j r -> b h i j')
    elif config.order == 'phi_W':
        WtA = einsum(A if mask is None else A * mask, params['W'], 'b h i j, h j r -> b h i r')
        S = Phi(WtA, params['phi'], None)
    else:
        S = Phi(Phi(A, params['phi'], mask), params['phi2'], None)
    if mask is not None:
        S = S * mask
    if config.simplex:
        S = project_simplex(S, mask)
    return S if return_attention else einsum(S, V, 'b h i j, b h j d -> b h i d')


def logits(q, k, bias=None, scale=None):
    """A = q k^T / sqrt(d) (+ bias): (b h i d), (b h j d) -> (b h i j); another scale if given."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    A = einsum(q * scale, k, 'b h i d, b h j d -> b h i j')  # q is d wide, A is N wide
    return A if bias is None else A + bias


# §4  Options and modules: parameters, sharing, one interface for softmax and KArAt -------

def choice(default, what, allowed, help):
    """A field naming one of `allowed`, checked by `check_choices` as "unknown {what}"."""
    return field(default=default, metadata=dict(what=what, choices=tuple(allowed), help=help))


def refuse(what, allowed):
    raise ValueError(f"{what}; allowed: {allowed}")


def check_choices(config):
    """Refuse any `choice` field of a dataclass whose value is not among its choices."""
    for f in fields(config):
        value, allowed = getattr(config, f.name), f.metadata.get('choices')
        if allowed and value not in allowed:
            refuse(f"unknown {f.metadata['what']} {value!r}", ', '.join(allowed))


def is_count(n):
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1


@dataclass(frozen=True)
class AttentionConfig:
    """What a model's attention is, checked once, when made; every field but attn is KArAt's.
    How it is computed is a KArAt module's `compute`, not an option here. The rank is capped
    at each operator's N, r = min(r, N): σ̂ = W Φ̂ has rank <= N whatever r, and Swin's last
    windows hold fewer than 12 tokens at small inputs."""
    attn: str = choice('softmax', 'attention', ATTENTIONS, "'softmax' or a KArAt basis")
    mode: str = choice('blockwise', 'mode', MODES, "blockwise: operators per block (GnB); "
                       "universal: one set per (heads, N) shared by all blocks (GnU)")
    grid: int = field(default=3, metadata=dict(help='G, basis functions per unit'))
    rank: int | None = field(default=12, metadata=dict(
        help="r of the low-rank operator σ̂ = W Φ̂, capped at N; None ('full'): N x N units"))
    base: str = choice('zero', 'base activation', BASE_ACTIVATIONS,
                       "the base activation b of every unit (zero: none)")
    order: str = choice('W_phi', 'operator order', ORDERS,
                        "σ̂ = W Φ̂(A) | Φ(W^T A) | Φ₂(Φ₁(A)) (the paper's ablations)")
    simplex: bool = field(default=False, metadata=dict(
        help='project activated rows onto the probability simplex (ablation)'))

    def __post_init__(self):
        check_choices(self)
        if not is_count(self.grid):
            refuse(f"grid size G must be an integer >= 1, got {self.grid!r}", 'G >= 1')
        if self.rank is None and self.order != 'W_phi':
            refuse(f"order {self.order!r} needs a low-rank operator, got rank=None", 'rank 1..N')
        if not (self.rank is None or is_count(self.rank)):
            refuse(f"rank r must be an integer >= 1, got {self.rank!r}",
                   "r >= 1 (capped at N), or None (on the command line: --rank full) for the "
                   "full N x N operator")


def attention_config(attn='softmax', **options):
    """An AttentionConfig from keywords, or `attn` (one) with `options` replaced."""
    unknown = set(options) - {f.name for f in fields(AttentionConfig)}
    if unknown:
        raise ValueError(f"unknown attention option(s) {', '.join(sorted(unknown))}; allowed: "
                         f"{', '.join(f.name for f in fields(AttentionConfig))}")
    if isinstance(attn, AttentionConfig):
        return replace(attn, **options) if options else attn
    return AttentionConfig(attn, **options)


def layout(N, r, order):
    """An operator's parameters over N keys at rank r (None: full), stated once:
    {name: (shape after the heads axis, std at init, axes indexed by key position)}.

    Kolmogorov-Arnold layers 'phi' (Φ̂, or Φ) and 'phi2' (Φ₂) are (h, n_out, n_in, ...), W is
    (h, N, r). Init: every σ̂ entry has variance ~1/N, like the entries of a unit-norm row, so
    the output Σ_n σ̂_n V_n is on the scale of V, as with softmax."""
    if r is None:
        return {'phi': ((N, N), 1 / N, (1, 2))}
    if order == 'W_phi':  # Z_p = Φ̂(A)_p has unit variance
        return {'phi': ((r, N), N ** -0.5, (2,)), 'W': ((N, r), (r * N) ** -0.5, (1,))}
    if order == 'phi_W':  # W^T A on the scale of A
        return {'W': ((N, r), N ** -0.5, (1,)), 'phi': ((N, r), (r * N) ** -0.5, (1,))}
    return {'phi': ((r, N), N ** -0.5, (2,)), 'phi2': ((N, r), (r * N) ** -0.5, (1,))}


class Operator(nn.Module):
    """The learnable activation of `heads` heads over rows of N = seq_len logits: Φ (full) or
    σ̂ = W Φ̂ with r x N units and W ∈ R^{N x r} (low rank), as the config says:
    Operator('fourier', 3, 197, rank=12) or Operator(config, 3, 197). Parameters as `layout`
    states them; `tensors()` gives them to karat_attention."""

    def __init__(self, config, heads, seq_len, **options):
        super().__init__()
        config = attention_config(config, **options)
        if config.attn == 'softmax':
            raise ValueError(f"Operator needs a basis, got 'softmax'; allowed: {', '.join(BASES)}")
        self.config, self.heads, self.seq_len = config, heads, seq_len
        self.basis = BASES[config.attn]
        self.rank = None if config.rank is None else min(config.rank, seq_len)
        self.layout = layout(seq_len, self.rank, config.order)
        for name, (shape, std, _) in self.layout.items():
            if name == 'W':
                self.W = nn.Parameter(torch.randn(heads, *shape) * std)
            else:
                units = init_kan(self.basis, heads, *shape, config.grid, config.base, std)
                setattr(self, name, nn.ParameterDict(units))

    def tensors(self, dtype=None):
        """The parameters as karat_attention takes them, {'phi': {name: tensor}, 'W': tensor},
        in `dtype` if given."""
        cast = lambda t: t if dtype is None else t.to(dtype)
        return {n: cast(self.W) if n == 'W' else {u: cast(p) for u, p in getattr(self, n).items()}
                for n in self.layout}

    def key_axes(self, name):
        """The axes of parameter `name` ('phi.coef', 'W', ...) indexed by key position."""
        return self.layout[name.split('.')[0]][2]

    def forward(self, A, V, mask=None, return_attention=False):
        return karat_attention(A, V, self.tensors(), self.config, mask, return_attention)

    def extra_repr(self):
        c = self.config
        return (f"{c.attn}, heads={self.heads}, N={self.seq_len}, G={c.grid}, r={self.rank}, "
                f"base={c.base}, order={c.order}")


def check_inputs(q, k, v, bias=None, mask=None, heads=None, seq_len=None):
    """A ValueError naming what does not fit: q (b h i d), k (b h j d), v (b h j e), bias and
    mask broadcastable to (b h i j), and an operator's heads and N when given. Returns bias and
    mask four-dimensional, their missing leading axes of size 1."""
    shapes = lambda: ', '.join(str(tuple(t.shape)) for t in (q, k, v))  # for a message only
    if not (q.dim() == k.dim() == v.dim() == 4 and q.shape[:2] == k.shape[:2]
            and k.shape[:3] == v.shape[:3] and q.shape[-1] == k.shape[-1]):
        raise ValueError(f"q, k, v must be (batch, heads, tokens, dim) and agree, got shapes "
                         f"{shapes()}; allowed: q (b h i d), k (b h j d), v (b h j e)")
    if heads is not None and (q.shape[1], k.shape[2]) != (heads, seq_len):
        raise ValueError(f"this KArAt operator has {heads} heads and N = {seq_len} keys, got "
                         f"shapes {shapes()}; a KArAt model accepts only the heads and sequence "
                         "length (image size) it was built for")
    four_d = lambda t: t if t is None else t.reshape((1,) * (4 - t.dim()) + t.shape)
    full = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    for name, t in (('bias', bias), ('mask', mask)):
        if t is not None and (t.dim() > 4 or any(
                n not in (1, m) for n, m in zip(four_d(t).shape, full))):
            raise ValueError(f"{name} of shape {tuple(t.shape)} does not broadcast to (b, h, i, "
                             f"j) = {full}; allowed: each axis of that size or 1")
    return four_d(bias), four_d(mask)


class Softmax(nn.Module):
    """softmax(q k^T / sqrt(d) + bias) V through scaled_dot_product_attention (flash kernels)."""

    def forward(self, q, k, v, bias=None, mask=None):
        check_inputs(q, k, v, bias, mask)
        if mask is not None:  # SDPA's boolean masks cannot carry a bias: one additive mask
            bias = torch.where(mask.bool(), q.new_zeros(()) if bias is None else bias, -math.inf)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    def activate(self, q, k, bias=None, mask=None):
        """The N x N attention matrix (b h i j)."""
        A = logits(q, k, bias)
        return (A if mask is None else A.masked_fill(~mask.bool(), -math.inf)).softmax(-1)


def definition(q, k, v, bias, mask, params, config):
    """O = σ̂(A) V by karat_attention, differentiated by autograd: it keeps the logits A and
    the maps B_m(A) for backward, each (b h i j)."""
    return karat_attention(logits(q, k, bias), v, params, config, mask)


class KArAt(nn.Module):
    """Kolmogorov-Arnold attention with the interface of `Softmax`: forward(q, k, v, bias, mask).

    Holds a reference to an `Operator`, its own (blockwise) or shared by every block
    (universal), so that each block keeps a hookable `attend` submodule of its own. `compute`
    is called as `definition` is, which it defaults to. Inputs of another floating dtype than
    the operator's meet it in theirs, as under autocast."""

    def __init__(self, operator, compute=definition):
        super().__init__()
        self.operator, self.compute = operator, compute

    def inputs(self, q, k, v, bias, mask):
        op = self.operator
        bias, mask = check_inputs(q, k, v, bias, mask, op.heads, op.seq_len)
        if mask is not None:  # 0/1 in q's dtype: nonzero attends, as softmax reads it
            mask = mask.bool().to(q.dtype)
        autocast = torch.is_autocast_enabled(q.device.type)  # which casts for itself
        return bias, mask, op.tensors(None if autocast else q.dtype)

    def forward(self, q, k, v, bias=None, mask=None):
        bias, mask, params = self.inputs(q, k, v, bias, mask)
        return self.compute(q, k, v, bias, mask, params, self.operator.config)

    def activate(self, q, k, bias=None, mask=None):
        """The activated N x N matrix σ̂ (b h i j): built only when asked for."""
        bias, mask, params = self.inputs(q, k, k, bias, mask)
        return karat_attention(logits(q, k, bias), None, params, self.operator.config, mask,
                               return_attention=True)


def attention_maker(attn='softmax', compute=definition, **options):
    """make(heads, seq_len) -> attention module, for models to call once per block: its own
    operator ('blockwise', "GnB") or the one shared per (heads, N) ('universal', "GnU").
    attn: 'softmax' or a basis, with AttentionConfig's fields as keywords, or an AttentionConfig;
    compute: how KArAt modules compute (see `KArAt`)."""
    config, shared = attention_config(attn, **options), {}

    def make(heads, seq_len):
        if config.attn == 'softmax':
            return Softmax()
        if config.mode == 'blockwise' or (heads, seq_len) not in shared:
            shared[heads, seq_len] = Operator(config, heads, seq_len)
        return KArAt(shared[heads, seq_len], compute)
    return make
