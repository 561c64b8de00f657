"""Flash-KArAt: fused Triton kernels for Kolmogorov-Arnold attention.

karat.py is the definition; this file computes the same functions without ever writing an
N x N tile to memory. With logits S = scale · q k^T + bias (b h i j) and a 0/1 mask M, every
fused form of KArAt is one primitive, attention without softmax statistics:

    expansion families   Y = Σ_m F_m X_m,        F_m = M ⊙ B_m(S)
    unit families        Y_ip = Σ_j M_ij φ_pj(S_ij)

    low rank   X_m = C_m^T  (N x r per head, shared by the batch): Y = Z, then O = Z (W^T V)
    full rank  X_m = U_m = C_m^T (M ⊙ V)  (N x d per batch and head): Y = O
    per-query mask, second pass   q = Z, k = W, B(x) = x, X = V: O_i = Σ_j M_ij (Z_i · W_j) V_j

Each kernel is FlashAttention-2's loop (Triton's fused-attention tutorial): a program owns a
block of query rows, streams over key blocks, builds the S tile in registers and accumulates
tl.dot(F_m, X_m) (no running max or row sum). Backward builds each S tile twice, as the
tutorial does: once in a pass over query blocks for a block of keys (dk, and every map's dX or
every unit's parameters, all in one pass), once in a pass over key blocks for a block of
queries (dq and the bias), with dS = M ⊙ Σ_m (dY X_m^T) ⊙ B_m'(S). A bias shared by the batch
(Swin's relative position bias, shared by every window) has its dS summed over `WINDOWS` batch
items in registers before one atomic add. The ops are registered with torch.library, so that
autograd, torch.compile and CUDA graphs treat each as one call.
"""
import math
import os

import torch
import triton
import triton.language as tl
from einops import rearrange
from torch.library import triton_op, wrap_triton

import karat

INTERPRET = os.environ.get('TRITON_INTERPRET') == '1'
INTERPRETED = tl.constexpr(INTERPRET)

# The kernels' names for the families and base activations (karat.BASES, BASE_ACTIVATIONS);
# LINEAR is B(x) = x of the second pass, NO_MAPS the base activation alone beside a unit family.
FOURIER, BSPLINE, CHEBYSHEV, GAUSSIAN, LINEAR, NO_MAPS = [tl.constexpr(i) for i in range(6)]
RATIONAL, MEXICAN_HAT, MORLET, DOG, MEYER, SHANNON = [tl.constexpr(i) for i in range(6)]
ZERO, SILU, IDENTITY, GELU = [tl.constexpr(i) for i in range(4)]
EXPANSIONS = {'fourier': FOURIER.value, 'bspline': BSPLINE.value, 'chebyshev': CHEBYSHEV.value,
              'gaussian': GAUSSIAN.value, 'linear': LINEAR.value, 'none': NO_MAPS.value}
UNITS = {'rational': RATIONAL.value, 'mexican_hat': MEXICAN_HAT.value, 'morlet': MORLET.value,
         'dog': DOG.value, 'meyer': MEYER.value, 'shannon': SHANNON.value}
ACTIVATIONS = {'zero': ZERO.value, 'silu': SILU.value, 'identity': IDENTITY.value,
               'gelu': GELU.value}

# Autotune candidates. Each tile holds the logits, their maps and accumulators, so registers,
# not shared memory, are the limit: tests/compile_kernels.py compiles every candidate a launch
# may try for sm_80 and sm_90, float32 and bf16, and fails on a spilled byte. Hopper's
# warpgroup MMA (wgmma) needs tiles of 64 rows (the rows of a tl.dot); those are offered to
# 16-bit inputs (`--amp`) alone, whose tiles take half the registers, and where they compile
# without spills (`candidates`). maxnreg: left to itself ptxas capped some kernels at 168
# registers, and spilled.

def config(m, n, warps, stages=1, **extra):
    return triton.Config({'BLOCK_M': m, 'BLOCK_N': n, **extra}, num_warps=warps,
                         num_stages=stages, maxnreg=255)


# A block of query rows: forward, and the dq/dbias pass of backward.
FORWARD = [config(32, 32, 8), config(32, 16, 4), config(64, 32, 8, 2), config(64, 16, 4, 2)]
QUERY_PASS = [config(32, 32, 8), config(32, 16, 4), config(64, 16, 4, 2)]
# A block of keys, the rows of the dX and dk products (so wgmma wants BLOCK_N = 64): every
# map's dX accumulator at once (MAPS_PER_PASS = 0, each S tile built once), or one map per
# pass over the query blocks (S built once per map), which alone fits float32 and full rank.
KEY_PASS = [config(16, 32, 4, MAPS_PER_PASS=0), config(32, 64, 8, 2, MAPS_PER_PASS=0),
            config(32, 32, 8, MAPS_PER_PASS=1)]
UNIT_KEY_PASS = [config(32, 32, 8), config(16, 32, 4)]
WINDOWS = 16  # batch items (Swin's windows) whose dS tiles one program sums into the bias


def wide(config):
    return max(config.kwargs['BLOCK_M'], config.kwargs['BLOCK_N']) == 64


def candidates(configs, named_args, arch=None, **constexprs):
    """The configs autotune tries for a launch (on GPU `arch`, by default Q's), those ptxas
    compiles without spills: 64-row tiles only on Hopper (wgmma; on sm_80 the 64-key pass
    spilled 1,068 bytes) and for 16-bit inputs, all maps at once only for 16-bit inputs, and
    neither where they spilled (bytes, the best candidate): all maps in float32 (380, sm_90)
    and with e = 64 (full rank, bf16, 32); in the dq pass that sums a shared bias over
    windows, 8 warps of 32 x 32 alone (64 rows: 672 on sm_90; 4 warps: 8 on sm_80).
    Autotune's keys name what these depend on (the dtypes are in every key)."""
    q = named_args['Q']
    if arch is None:
        major, minor = torch.cuda.get_device_capability(q.device) if q.is_cuda else (9, 0)
        arch = 10 * major + minor
    half = q.element_size() == 2
    all_maps = half and constexprs.get('BE', 16) <= 16
    windows = constexprs.get('WINDOWS', 1) > 1
    rows = half and arch >= 90 and not windows
    return [c for c in configs if (rows or not wide(c))
            and (all_maps or c.kwargs.get('MAPS_PER_PASS', 1) != 0)
            and not (windows and c.num_warps < 8)] or configs


def interpreted(configs):
    """The interpreter (CPU tests) runs one config (autotune would time them all): the one of
    largest tiles, so fewest programs, which it runs fastest. tests/test_kernels.py forces each
    in turn."""
    if not INTERPRET:
        return configs
    return [max(configs, key=lambda c: c.kwargs['BLOCK_M'] * c.kwargs['BLOCK_N'])]


def autotune(configs, key, **options):
    """triton.autotune over `configs` (kept as the tuner's `candidates`)."""
    def wrap(fn):
        tuner = triton.autotune(configs=interpreted(configs), key=key,
                                prune_configs_by={'early_config_prune': candidates}, **options)(fn)
        tuner.candidates = configs
        return tuner
    return wrap


KEY = ['I', 'J', 'D', 'E', 'BASIS', 'G']
UNIT_KEY = ['I', 'J', 'D', 'R', 'UNIT']
QUERY_KEY, UNIT_QUERY_KEY = KEY + ['WINDOWS'], UNIT_KEY + ['WINDOWS']


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    """tl.dot, accumulating in float32 (float64 for float64 tiles)."""
    if INTERPRETED:  # its bfloat16 products are wrong (Triton 3.8); in float32 they are exact
        if a.dtype.primitive_bitwidth == 16:
            a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


# Tensors: one (batch, head) slice at a time -----------------------------------------------

@triton.jit
def head(T, b, h, stride_b, stride_h, stride_r, stride_c):
    """The (b, h) slice of a (batch, heads, rows, columns) tensor: (origin, row and column
    strides), the view every loader takes."""
    return T + b * stride_b + h * stride_h, stride_r, stride_c


@triton.jit
def rows_of(view, offs, R, C: tl.constexpr, BC: tl.constexpr):
    """Pointers and bounds of rows `offs` (< R) of a view, columns padded to BC (< C)."""
    cols = tl.arange(0, BC)
    ptrs = view[0] + offs[:, None] * view[1] + cols[None, :] * view[2]
    return ptrs, (offs[:, None] < R) & (cols[None, :] < C)


@triton.jit
def load_rows(view, offs, R, C: tl.constexpr, BC: tl.constexpr):
    """Rows `offs` of a view, zero beyond R rows and C columns."""
    ptrs, inside = rows_of(view, offs, R, C, BC)
    return tl.load(ptrs, mask=inside, other=0.0)


@triton.jit
def store_rows(view, offs, R, value, C: tl.constexpr, BC: tl.constexpr):
    ptrs, inside = rows_of(view, offs, R, C, BC)
    tl.store(ptrs, value.to(view[0].dtype.element_ty), mask=inside)


@triton.jit
def tile_of(view, offs_m, offs_n):
    """Pointers of the (offs_m, offs_n) tile of an (i, j) view: the bias, the mask."""
    return view[0] + offs_m[:, None] * view[1] + offs_n[None, :] * view[2]


# The S tile -------------------------------------------------------------------------------

@triton.jit
def logit_tile(q, keys, bias, mask, offs_m, offs_n, I, J, scale, D: tl.constexpr,
               BD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
               PRECISION: tl.constexpr, ACC: tl.constexpr):
    """S = scale · q k^T + bias for one (query block, key block) tile, the key tile k, and
    keep: in bounds and not masked. Nothing outside `keep` may reach an output."""
    k = load_rows(keys, offs_n, J, D, BD)
    S = dot(q, tl.trans(k), PRECISION).to(ACC) * scale
    keep = (offs_m[:, None] < I) & (offs_n[None, :] < J)
    if HAS_BIAS:
        S += tl.load(tile_of(bias, offs_m, offs_n), mask=keep, other=0.0).to(ACC)
    if HAS_MASK:
        keep = keep & (tl.load(tile_of(mask, offs_m, offs_n), mask=keep, other=0) != 0)
    return S, k, keep


# Trigonometry -----------------------------------------------------------------------------
# On the GPU, sin and cos are the special-function unit's sin.approx.f32 / cos.approx.f32 (one
# instruction each, as FlashAttention takes exp through ex2.approx), not libdevice's __nv_sinf
# (a software range reduction and polynomial, with a slow path for large arguments). The CUDA
# C++ Programming Guide bounds their absolute error (as __sinf and __cosf) at 2^-21.41 and
# 2^-21.19 (~4e-7) for x in [-π, π], "larger otherwise", so the argument is first reduced to
# r in [-π, π], r = x - 2π·n with n = round(x/2π) and 2π split in two float32 constants
# (Cody-Waite): 6.28125 has 8 significant bits, so n·6.28125 and its difference from x are
# exact for |n| < 2^16, and r's own error is below 1.2e-7 + 2.3e-10·|n|, under 4e-7 for
# |x| < 2π·1000 ≈ 6,000, far beyond any logit. sin and cos are then within ~1e-6 of the exact
# values: bf16's resolution (2^-8) is 4,000 times coarser. The interpreter has no PTX and
# takes tl.sin and tl.cos of the reduced argument; float64 tiles keep them unreduced.

@triton.jit
def _approx(x, INSTRUCTION: tl.constexpr):
    return tl.inline_asm_elementwise(INSTRUCTION, '=r,r', [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def sin_cos(x):
    """sin x and cos x; on the GPU, sin.approx/cos.approx of x reduced to [-π, π]."""
    if x.dtype == tl.float32:
        n = tl.floor(x * 0.15915494309189535 + 0.5)
        r = (x - n * 6.28125) - n * 0.0019353071795864769
        if INTERPRETED:  # no PTX: the reduction is what the CPU tests check
            s, c = tl.sin(r), tl.cos(r)
        else:
            s, c = _approx(r, 'sin.approx.f32 $0, $1;'), _approx(r, 'cos.approx.f32 $0, $1;')
    else:
        s, c = tl.sin(x), tl.cos(x)
    return s, c


# Feature maps -----------------------------------------------------------------------------

@triton.jit
def _sigmoid(x):
    return 1 / (1 + tl.exp(-x))


@triton.jit
def trig(S, BASIS: tl.constexpr):
    """cos S and sin S, the only transcendentals Fourier needs: one pair per logit, the
    frequencies f = 2..G by recurrence."""
    if BASIS == FOURIER:
        s1, c1 = sin_cos(S)
    else:
        c1, s1 = S, S
    return c1, s1


@triton.jit
def expansion_map(S, c1, s1, m: tl.constexpr, BASIS: tl.constexpr, G: tl.constexpr,
                  OWN: tl.constexpr, BASE: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr):
    """B_m(S) and B_m'(S), as karat.py's families define them: maps m < OWN are the family's
    (OWN = its karat.Basis.size(G)), map OWN the base activation b(S). c1, s1 = cos S, sin S."""
    if m == OWN:
        if BASE == SILU:
            sig = _sigmoid(S)
            B, dB = S * sig, sig * (1 + S * (1 - sig))
        elif BASE == IDENTITY:
            B, dB = S, S * 0 + 1
        else:  # GELU, the exact (erf) form
            cdf = 0.5 * (1 + tl.math.erf(S * 0.7071067811865476))
            B, dB = S * cdf, cdf + S * tl.exp(-0.5 * S * S) * 0.3989422804014327
    elif BASIS == FOURIER:  # f = 1..G: cos(f S) = T_f(cos S), sin(f S) = sin S U_{f-1}(cos S)
        f: tl.constexpr = m + 1 if m < G else m - G + 1
        T0, T1, U0, U1 = c1 * 0 + 1, c1, c1 * 0 + 1, 2 * c1
        for _ in tl.static_range(f - 1):
            T0, T1, U0, U1 = T1, 2 * c1 * T1 - T0, U1, 2 * c1 * U1 - U0
        cos_f, sin_f = T1, s1 * U0
        if m < G:
            B, dB = cos_f, -f * sin_f
        else:
            B, dB = sin_f, f * cos_f
    elif BASIS == BSPLINE:  # cubic, uniform knots t_m = LO + (m - 3) h, S clamped
        h = tl.full([], HI - LO, S.dtype) / G  # in S's precision: a float constexpr is float32
        top = HI - 1e-4 * h
        u = (tl.minimum(tl.maximum(S, LO), top) - LO) / h - (m - 3)
        v = 4 - u
        B = tl.where(u < 1, u * u * u, tl.where(u < 2, ((-3 * u + 12) * u - 12) * u + 4,
                     tl.where(u < 3, ((3 * u - 24) * u + 60) * u - 44, v * v * v))) / 6
        dB = tl.where(u < 1, u * u, tl.where(u < 2, (-3 * u + 8) * u - 4,
                      tl.where(u < 3, (3 * u - 16) * u + 20, -v * v))) / (2 * h)
        inside = (u >= 0) & (u < 4)
        B = tl.where(inside, B, 0.0)
        dB = tl.where(inside & (S >= LO) & (S <= top), dB, 0.0)
    elif BASIS == CHEBYSHEV:  # T_m(tanh S), T_m' = m U_{m-1}
        u = 2 * _sigmoid(2 * S) - 1
        T0, T1, U0, U1 = u * 0 + 1, u, u * 0 + 1, 2 * u
        for _ in tl.static_range(m - 1):
            T0, T1, U0, U1 = T1, 2 * u * T1 - T0, U1, 2 * u * U1 - U0
        if m == 0:
            B, dB = T0, u * 0
        else:
            B, dB = T1, m * U0 * (1 - u * u)
    elif BASIS == GAUSSIAN:  # exp(-((S - μ_m)/h)^2), μ_m = LO + m h, h = (HI - LO)/(G - 1)
        h = tl.full([], HI - LO, S.dtype) / (G - 1 if G > 1 else 1)
        z = (S - LO - m * h) / h
        B = tl.exp(-z * z)
        dB = -2 * z / h * B
    else:  # LINEAR, the second pass of a per-query mask
        B, dB = S, S * 0 + 1
    return B, dB


@triton.jit
def unit_value(x, P, p_off, p_mask, UNIT: tl.constexpr, PS: tl.constexpr):
    """One unit per key of the tile, as karat.py defines them: φ(x), φ'(x) and two values the
    parameter gradients need (rational: 1 + |Q|, sign Q; wavelets: f(x̃), x̃). Parameter c of
    the units sits at P + p_off + c·PS (rational a_0..a_5, b_1..b_4; wavelets w, τ, s)."""
    if UNIT == RATIONAL:
        a0 = tl.load(P + p_off, mask=p_mask, other=0.0)
        a1 = tl.load(P + p_off + PS, mask=p_mask, other=0.0)
        a2 = tl.load(P + p_off + 2 * PS, mask=p_mask, other=0.0)
        a3 = tl.load(P + p_off + 3 * PS, mask=p_mask, other=0.0)
        a4 = tl.load(P + p_off + 4 * PS, mask=p_mask, other=0.0)
        a5 = tl.load(P + p_off + 5 * PS, mask=p_mask, other=0.0)
        b1 = tl.load(P + p_off + 6 * PS, mask=p_mask, other=0.0)
        b2 = tl.load(P + p_off + 7 * PS, mask=p_mask, other=0.0)
        b3 = tl.load(P + p_off + 8 * PS, mask=p_mask, other=0.0)
        b4 = tl.load(P + p_off + 9 * PS, mask=p_mask, other=0.0)
        num = ((((a5 * x + a4) * x + a3) * x + a2) * x + a1) * x + a0
        dnum = ((((5 * a5 * x + 4 * a4) * x + 3 * a3) * x + 2 * a2) * x) + a1
        Q = (((b4 * x + b3) * x + b2) * x + b1) * x
        dQ = ((4 * b4 * x + 3 * b3) * x + 2 * b2) * x + b1
        sgn = tl.where(Q > 0, 1.0, tl.where(Q < 0, -1.0, 0.0))
        den = 1 + tl.abs(Q)
        phi = num / den
        dphi = dnum / den - phi / den * sgn * dQ
        u1, u2 = den, sgn
    else:
        w = tl.load(P + p_off, mask=p_mask, other=0.0)
        tau = tl.load(P + p_off + PS, mask=p_mask, other=0.0)
        s = tl.load(P + p_off + 2 * PS, mask=p_mask, other=1.0)
        t = (x - tau) / s
        g = tl.exp(-0.5 * t * t)
        if UNIT == MEXICAN_HAT:
            c: tl.constexpr = 2 / (math.sqrt(3) * math.pi ** 0.25)
            f, df = c * (1 - t * t) * g, c * t * (t * t - 3) * g
        elif UNIT == MORLET:  # ω₀ = 5
            sin5, cos5 = sin_cos(5.0 * t)
            f, df = cos5 * g, (-5.0 * sin5 - t * cos5) * g
        elif UNIT == DOG:
            f, df = t * g, (1 - t * t) * g
        elif UNIT == MEYER:
            v = tl.abs(t)
            r = tl.minimum(tl.maximum(2 * v - 1, 0.0), 1.0)
            nu = r * r * r * r * (35 - 84 * r + 70 * r * r - 20 * r * r * r)
            dnu = tl.where((r > 0) & (r < 1), 280 * r * r * r * (1 - r) * (1 - r) * (1 - r), 0.0)
            sv, cv = sin_cos(math.pi * v)
            sn, cn = sin_cos(math.pi / 2 * nu)
            dm = -sn * math.pi / 2 * dnu  # of m(v) = cos(π/2 ν)
            dv = math.pi * cv * cn + sv * dm
            f, df = sv * cn, dv * tl.where(t > 0, 1.0, tl.where(t < 0, -1.0, 0.0))
        else:  # SHANNON sin(x̃)/x̃ (the caller applies the key's Hamming window); libdevice's
            # sin, whose error is relative: divided by a small x̃, sin.approx's absolute one
            # would not be
            small = tl.abs(t) < 1e-4
            st = tl.where(small, 1.0, t)
            f = tl.where(small, 1 - t * t / 6, tl.sin(st) / st)
            df = tl.where(small, -t / 3, (tl.cos(st) - tl.sin(st) / st) / st)
        phi, dphi, u1, u2 = w * f, w * df / s, f, t
    return phi, dphi, u1, u2


@triton.jit
def unit_param_grads(x, g, phi, dphi, u1, u2, UNIT: tl.constexpr, NPP: tl.constexpr):
    """Σ_i g_ij ∂φ_j(x_ij)/∂θ_c for every parameter c: (NPP, keys). g = M ⊙ dY_:p."""
    row = tl.arange(0, NPP)[:, None]
    grads = tl.zeros((NPP, x.shape[1]), dtype=x.dtype)
    if UNIT == RATIONAL:
        # ∂φ/∂a_c = x^c/(1 + |Q|), ∂φ/∂b_c = -φ sgn(Q) x^c/(1 + |Q|)
        da, db = g / u1, -g * phi * u2 / u1
        power = x * 0 + 1
        for c in tl.static_range(6):
            grads = tl.where(row == c, grads + tl.sum(da * power, axis=0)[None, :], grads)
            if c > 0:
                if c < 5:
                    grads = tl.where(row == c + 5, grads + tl.sum(db * power, axis=0)[None, :],
                                     grads)
            power = power * x
    else:  # ∂/∂w = f, ∂/∂τ = -φ', ∂/∂s = -φ' x̃
        grads = tl.where(row == 0, grads + tl.sum(g * u1, axis=0)[None, :], grads)
        grads = tl.where(row == 1, grads - tl.sum(g * dphi, axis=0)[None, :], grads)
        grads = tl.where(row == 2, grads - tl.sum(g * dphi * u2, axis=0)[None, :], grads)
    return grads


@triton.jit
def hamming(offs_n, J, ACC: tl.constexpr):
    """Shannon's symmetric Hamming window over the key index (torch.hamming_window)."""
    n = tl.maximum(J - 1, 1).to(ACC)
    _, cos = sin_cos(2 * math.pi * offs_n.to(ACC) / n)
    return tl.where(J > 1, 0.54 - 0.46 * cos, 1.0)


# Expansion families -----------------------------------------------------------------------

@autotune(FORWARD, KEY)
@triton.jit
def expansion_fwd_kernel(
        Q, K, BIAS, MASK, X, Y, H, I, J, scale,
        stride_qb, stride_qh, stride_qi, stride_qd,
        stride_kb, stride_kh, stride_kj, stride_kd,
        stride_bb, stride_bh, stride_bi, stride_bj,
        stride_mb, stride_mh, stride_mi, stride_mj,
        stride_xb, stride_xh, stride_xm, stride_xj, stride_xe,
        stride_yb, stride_yh, stride_yi, stride_ye,
        D: tl.constexpr, E: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
        BASIS: tl.constexpr, G: tl.constexpr, OWN: tl.constexpr, BASE: tl.constexpr,
        NMAPS: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Y_i = Σ_j Σ_m F_m,ij X_m,j for one block of query rows i."""
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    keys = head(K, b, h, stride_kb, stride_kh, stride_kj, stride_kd)
    bias = head(BIAS, b, h, stride_bb, stride_bh, stride_bi, stride_bj)
    mask = head(MASK, b, h, stride_mb, stride_mh, stride_mi, stride_mj)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q = load_rows(head(Q, b, h, stride_qb, stride_qh, stride_qi, stride_qd), offs_m, I, D, BD)
    acc = tl.zeros((BLOCK_M, BE), dtype=ACC)
    for start in range(0, J, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        S, k, keep = logit_tile(q, keys, bias, mask, offs_m, offs_n, I, J, scale,
                                D, BD, HAS_BIAS, HAS_MASK, PRECISION, ACC)
        c1, s1 = trig(S, BASIS)
        for m in tl.static_range(NMAPS):
            B, _ = expansion_map(S, c1, s1, m, BASIS, G, OWN, BASE, LO, HI)
            x = load_rows(head(X + m * stride_xm, b, h, stride_xb, stride_xh, stride_xj,
                               stride_xe), offs_n, J, E, BE)
            acc += dot(tl.where(keep, B, 0.0).to(x.dtype), x, PRECISION)
    store_rows(head(Y, b, h, stride_yb, stride_yh, stride_yi, stride_ye), offs_m, I, acc, E, BE)


@autotune(KEY_PASS, KEY)
@triton.jit
def expansion_bwd_kx_kernel(
        Q, K, BIAS, MASK, X, DY, DK, DX, H, I, J, scale,
        stride_qb, stride_qh, stride_qi, stride_qd,
        stride_kb, stride_kh, stride_kj, stride_kd,
        stride_bb, stride_bh, stride_bi, stride_bj,
        stride_mb, stride_mh, stride_mi, stride_mj,
        stride_xb, stride_xh, stride_xm, stride_xj, stride_xe,
        stride_yb, stride_yh, stride_yi, stride_ye,
        D: tl.constexpr, E: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
        BASIS: tl.constexpr, G: tl.constexpr, OWN: tl.constexpr, BASE: tl.constexpr,
        NMAPS: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MAPS_PER_PASS: tl.constexpr):
    """For one block of keys j: dX_m,j = Σ_i F_m,ij^T dY_i for every map m and
    dk_j = scale Σ_i dS_ij^T q_i, in passes over the query blocks of MAPS_PER_PASS maps each
    (0: all maps in one pass, each S tile built once)."""
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    queries = head(Q, b, h, stride_qb, stride_qh, stride_qi, stride_qd)
    keys = head(K, b, h, stride_kb, stride_kh, stride_kj, stride_kd)
    bias = head(BIAS, b, h, stride_bb, stride_bh, stride_bi, stride_bj)
    mask = head(MASK, b, h, stride_mb, stride_mh, stride_mi, stride_mj)
    grads = head(DY, b, h, stride_yb, stride_yh, stride_yi, stride_ye)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    if MAPS_PER_PASS == 0:
        PER_PASS: tl.constexpr = NMAPS
    else:
        PER_PASS: tl.constexpr = MAPS_PER_PASS
    dk = tl.zeros((BLOCK_N, BD), dtype=ACC)
    for first in tl.static_range(0, NMAPS, PER_PASS):
        xs = ()  # this pass's maps first..first + PER_PASS - 1 (< NMAPS): X_m, dX_m
        dxs = ()
        for m in tl.static_range(PER_PASS):
            x = tl.zeros((BLOCK_N, BE), dtype=X.dtype.element_ty)
            if first + m < NMAPS:
                x = load_rows(head(X + (first + m) * stride_xm, b, h, stride_xb, stride_xh,
                                   stride_xj, stride_xe), offs_n, J, E, BE)
            xs = xs + (x,)
            dxs = dxs + (tl.zeros((BLOCK_N, BE), dtype=ACC),)
        for start in range(0, I, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            q = load_rows(queries, offs_m, I, D, BD)
            dy = load_rows(grads, offs_m, I, E, BE)
            S, k, keep = logit_tile(q, keys, bias, mask, offs_m, offs_n, I, J, scale,
                                    D, BD, HAS_BIAS, HAS_MASK, PRECISION, ACC)
            c1, s1 = trig(S, BASIS)
            dS = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
            updated = ()
            for m in tl.static_range(PER_PASS):
                if first + m < NMAPS:
                    B, dB = expansion_map(S, c1, s1, first + m, BASIS, G, OWN, BASE, LO, HI)
                    F = tl.where(keep, B, 0.0).to(dy.dtype)
                    updated = updated + (dxs[m] + dot(tl.trans(F), dy, PRECISION).to(ACC),)
                    dS += dot(dy, tl.trans(xs[m]), PRECISION).to(ACC) * dB
                else:
                    updated = updated + (dxs[m],)
            dxs = updated
            dk += dot(tl.trans(tl.where(keep, dS, 0.0).to(q.dtype)), q, PRECISION)
        for m in tl.static_range(PER_PASS):
            if first + m < NMAPS:
                dx = head(DX + (first + m) * J * E, b, h, H * NMAPS * J * E, NMAPS * J * E, E, 1)
                store_rows(dx, offs_n, J, dxs[m], E, BE)
    store_rows(head(DK, b, h, H * J * D, J * D, D, 1), offs_n, J, dk * scale, D, BD)


@triton.jit
def expansion_dS(S, c1, s1, keep, dy, values, offs_n, J, stride_xm,
                 E: tl.constexpr, BE: tl.constexpr, BASIS: tl.constexpr, G: tl.constexpr,
                 OWN: tl.constexpr, BASE: tl.constexpr, NMAPS: tl.constexpr,
                 LO: tl.constexpr, HI: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """dS = M ⊙ Σ_m (dY X_m^T) ⊙ B_m'(S) for one tile; `values` is the view of X_0."""
    dS = tl.zeros(S.shape, dtype=ACC)
    for m in tl.static_range(NMAPS):
        _, dB = expansion_map(S, c1, s1, m, BASIS, G, OWN, BASE, LO, HI)
        x = load_rows((values[0] + m * stride_xm, values[1], values[2]), offs_n, J, E, BE)
        dS += dot(dy, tl.trans(x), PRECISION).to(ACC) * dB
    return tl.where(keep, dS, 0.0)


@autotune(QUERY_PASS, QUERY_KEY, reset_to_zero=['DQ', 'DBIAS'])
@triton.jit
def expansion_bwd_q_kernel(
        Q, K, BIAS, MASK, X, DY, DQ, DBIAS, B, H, I, J, scale,
        stride_qb, stride_qh, stride_qi, stride_qd,
        stride_kb, stride_kh, stride_kj, stride_kd,
        stride_bb, stride_bh, stride_bi, stride_bj,
        stride_mb, stride_mh, stride_mi, stride_mj,
        stride_xb, stride_xh, stride_xm, stride_xj, stride_xe,
        stride_yb, stride_yh, stride_yi, stride_ye,
        stride_db, stride_dh, stride_di, stride_dj,
        D: tl.constexpr, E: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
        BASIS: tl.constexpr, G: tl.constexpr, OWN: tl.constexpr, BASE: tl.constexpr,
        NMAPS: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, BIAS_GRAD: tl.constexpr,
        WINDOWS: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For one block of queries i of WINDOWS batch items: dq_i = scale Σ_j dS_ij k_j, and dS
    added into dbias. WINDOWS = 1: one batch item, dq accumulated over the key blocks (the
    bias, if any, is the item's own or unneeded). WINDOWS > 1: a bias shared by the batch,
    the items' dS tiles summed before one atomic add per key block; dq is then added per key
    block (DQ zeroed, float32), uncontended where one key block holds every key (Swin's N = 49)."""
    h, first = tl.program_id(1) % H, tl.program_id(1) // H * WINDOWS
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dbias = head(DBIAS, first, h, stride_db, stride_dh, stride_di, stride_dj)
    if WINDOWS == 1:
        b = first
        q = load_rows(head(Q, b, h, stride_qb, stride_qh, stride_qi, stride_qd), offs_m, I, D, BD)
        dy = load_rows(head(DY, b, h, stride_yb, stride_yh, stride_yi, stride_ye), offs_m, I,
                       E, BE)
        keys = head(K, b, h, stride_kb, stride_kh, stride_kj, stride_kd)
        bias = head(BIAS, b, h, stride_bb, stride_bh, stride_bi, stride_bj)
        mask = head(MASK, b, h, stride_mb, stride_mh, stride_mi, stride_mj)
        values = head(X, b, h, stride_xb, stride_xh, stride_xj, stride_xe)
        dq = tl.zeros((BLOCK_M, BD), dtype=ACC)
        for start in range(0, J, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            S, k, keep = logit_tile(q, keys, bias, mask, offs_m, offs_n, I, J, scale,
                                    D, BD, HAS_BIAS, HAS_MASK, PRECISION, ACC)
            c1, s1 = trig(S, BASIS)
            dS = expansion_dS(S, c1, s1, keep, dy, values, offs_n, J, stride_xm, E, BE, BASIS,
                              G, OWN, BASE, NMAPS, LO, HI, PRECISION, ACC)
            if BIAS_GRAD:
                tl.atomic_add(tile_of(dbias, offs_m, offs_n), dS, mask=keep)
            dq += dot(dS.to(k.dtype), k, PRECISION)
        store_rows(head(DQ, b, h, H * I * D, I * D, D, 1), offs_m, I, dq * scale, D, BD)
    else:
        for start in range(0, J, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            summed = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
            for b in range(first, tl.minimum(first + WINDOWS, B)):
                q = load_rows(head(Q, b, h, stride_qb, stride_qh, stride_qi, stride_qd), offs_m,
                              I, D, BD)
                dy = load_rows(head(DY, b, h, stride_yb, stride_yh, stride_yi, stride_ye),
                               offs_m, I, E, BE)
                S, k, keep = logit_tile(
                    q, head(K, b, h, stride_kb, stride_kh, stride_kj, stride_kd),
                    head(BIAS, b, h, stride_bb, stride_bh, stride_bi, stride_bj),
                    head(MASK, b, h, stride_mb, stride_mh, stride_mi, stride_mj),
                    offs_m, offs_n, I, J, scale, D, BD, HAS_BIAS, HAS_MASK, PRECISION, ACC)
                c1, s1 = trig(S, BASIS)
                dS = expansion_dS(S, c1, s1, keep, dy,
                                  head(X, b, h, stride_xb, stride_xh, stride_xj, stride_xe),
                                  offs_n, J, stride_xm, E, BE, BASIS, G, OWN, BASE, NMAPS, LO,
                                  HI, PRECISION, ACC)
                summed += dS
                dq_ptrs, dq_in = rows_of(head(DQ, b, h, H * I * D, I * D, D, 1), offs_m, I, D,
                                         BD)
                tl.atomic_add(dq_ptrs, dot(dS.to(k.dtype), k, PRECISION) * scale, mask=dq_in)
            tl.atomic_add(tile_of(dbias, offs_m, offs_n), summed,
                          mask=(offs_m[:, None] < I) & (offs_n[None, :] < J))


# Unit families ----------------------------------------------------------------------------

@autotune(FORWARD, UNIT_KEY)
@triton.jit
def unit_fwd_kernel(
        Q, K, BIAS, MASK, P, Y, H, I, J, R, scale,
        stride_qb, stride_qh, stride_qi, stride_qd,
        stride_kb, stride_kh, stride_kj, stride_kd,
        stride_bb, stride_bh, stride_bi, stride_bj,
        stride_mb, stride_mh, stride_mi, stride_mj,
        D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, NP: tl.constexpr,
        UNIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
        PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Y_ip = Σ_j M_ij φ_pj(S_ij) for one block of query rows, one reduction per unit p."""
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    keys = head(K, b, h, stride_kb, stride_kh, stride_kj, stride_kd)
    bias = head(BIAS, b, h, stride_bb, stride_bh, stride_bi, stride_bj)
    mask = head(MASK, b, h, stride_mb, stride_mh, stride_mi, stride_mj)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q = load_rows(head(Q, b, h, stride_qb, stride_qh, stride_qi, stride_qd), offs_m, I, D, BD)
    cols = tl.arange(0, BR)[None, :]
    acc = tl.zeros((BLOCK_M, BR), dtype=ACC)
    for start in range(0, J, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        S, k, keep = logit_tile(q, keys, bias, mask, offs_m, offs_n, I, J, scale,
                                D, BD, HAS_BIAS, HAS_MASK, PRECISION, ACC)
        window = hamming(offs_n, J, ACC)[None, :]
        for p in range(R):
            phi, _, _, _ = unit_value(S, P, h * NP * R * J + p * J + offs_n[None, :],
                                      (offs_n < J)[None, :], UNIT, R * J)
            if UNIT == SHANNON:
                phi = phi * window
            acc = tl.where(cols == p, acc + tl.sum(tl.where(keep, phi, 0.0), axis=1)[:, None], acc)
    store_rows(head(Y, b, h, H * I * R, I * R, R, 1), offs_m, I, acc, R, BR)


@autotune(UNIT_KEY_PASS, UNIT_KEY, reset_to_zero=['DP'])
@triton.jit
def unit_bwd_kp_kernel(
        Q, K, BIAS, MASK, P, DY, DK, DP, H, I, J, R, scale,
        stride_qb, stride_qh, stride_qi, stride_qd,
        stride_kb, stride_kh, stride_kj, stride_kd,
        stride_bb, stride_bh, stride_bi, stride_bj,
        stride_mb, stride_mh, stride_mi, stride_mj,
        D: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, NPP: tl.constexpr,
        UNIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
        PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For one block of keys j, in one pass over the query blocks (each S tile built once):
    dk_j = scale Σ_i dS_ij^T q_i and, for every unit p, the gradient of its parameters summed
    over this batch element's query rows: each query block's sum added into DP (zeroed), so
    an entry takes one add per query block, I / BLOCK_M of them."""
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    queries = head(Q, b, h, stride_qb, stride_qh, stride_qi, stride_qd)
    keys = head(K, b, h, stride_kb, stride_kh, stride_kj, stride_kd)
    bias = head(BIAS, b, h, stride_bb, stride_bh, stride_bi, stride_bj)
    mask = head(MASK, b, h, stride_mb, stride_mh, stride_mi, stride_mj)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    window = hamming(offs_n, J, ACC)[None, :]
    rows = tl.arange(0, NPP)[:, None]
    dk = tl.zeros((BLOCK_N, BD), dtype=ACC)
    for start in range(0, I, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        q = load_rows(queries, offs_m, I, D, BD)
        S, k, keep = logit_tile(q, keys, bias, mask, offs_m, offs_n, I, J, scale,
                                D, BD, HAS_BIAS, HAS_MASK, PRECISION, ACC)
        dS = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for p in range(R):
            dy = tl.load(DY + ((b * H + h) * I + offs_m) * R + p, mask=offs_m < I, other=0.0)
            g = tl.where(keep, dy.to(ACC)[:, None], 0.0)
            phi, dphi, u1, u2 = unit_value(S, P, h * NP * R * J + p * J + offs_n[None, :],
                                           (offs_n < J)[None, :], UNIT, R * J)
            if UNIT == SHANNON:
                phi, dphi, u1 = phi * window, dphi * window, u1 * window
            dS += g * dphi
            tl.atomic_add(DP + (((b * H + h) * NP + rows) * R + p) * J + offs_n[None, :],
                          unit_param_grads(S, g, phi, dphi, u1, u2, UNIT, NPP),
                          mask=(rows < NP) & (offs_n[None, :] < J))
        dk += dot(tl.trans(dS.to(q.dtype)), q, PRECISION)
    store_rows(head(DK, b, h, H * J * D, J * D, D, 1), offs_n, J, dk * scale, D, BD)


@triton.jit
def unit_dS(S, keep, dy, P, h, offs_n, J, R, window, NP: tl.constexpr, BR: tl.constexpr,
            UNIT: tl.constexpr, ACC: tl.constexpr):
    """dS_ij = M_ij Σ_p dY_ip φ_pj'(S_ij) for one tile."""
    cols = tl.arange(0, BR)[None, :]
    dS = tl.zeros(S.shape, dtype=ACC)
    for p in range(R):
        _, dphi, _, _ = unit_value(S, P, h * NP * R * J + p * J + offs_n[None, :],
                                   (offs_n < J)[None, :], UNIT, R * J)
        if UNIT == SHANNON:
            dphi = dphi * window
        dS += tl.sum(tl.where(cols == p, dy, 0.0), axis=1)[:, None] * dphi
    return tl.where(keep, dS, 0.0)


@autotune(QUERY_PASS, UNIT_QUERY_KEY, reset_to_zero=['DQ', 'DBIAS'])
@triton.jit
def unit_bwd_q_kernel(
        Q, K, BIAS, MASK, P, DY, DQ, DBIAS, B, H, I, J, R, scale,
        stride_qb, stride_qh, stride_qi, stride_qd,
        stride_kb, stride_kh, stride_kj, stride_kd,
        stride_bb, stride_bh, stride_bi, stride_bj,
        stride_mb, stride_mh, stride_mi, stride_mj,
        stride_db, stride_dh, stride_di, stride_dj,
        D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, NP: tl.constexpr,
        UNIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
        BIAS_GRAD: tl.constexpr, WINDOWS: tl.constexpr, PRECISION: tl.constexpr,
        ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For one block of queries i of WINDOWS batch items: dS_ij = M_ij Σ_p dY_ip φ_pj'(S_ij),
    dq_i = scale Σ_j dS_ij k_j, and dS added into dbias, as expansion_bwd_q_kernel does."""
    h, first = tl.program_id(1) % H, tl.program_id(1) // H * WINDOWS
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dbias = head(DBIAS, first, h, stride_db, stride_dh, stride_di, stride_dj)
    if WINDOWS == 1:
        b = first
        q = load_rows(head(Q, b, h, stride_qb, stride_qh, stride_qi, stride_qd), offs_m, I, D, BD)
        dy = load_rows(head(DY, b, h, H * I * R, I * R, R, 1), offs_m, I, R, BR).to(ACC)
        keys = head(K, b, h, stride_kb, stride_kh, stride_kj, stride_kd)
        bias = head(BIAS, b, h, stride_bb, stride_bh, stride_bi, stride_bj)
        mask = head(MASK, b, h, stride_mb, stride_mh, stride_mi, stride_mj)
        dq = tl.zeros((BLOCK_M, BD), dtype=ACC)
        for start in range(0, J, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            S, k, keep = logit_tile(q, keys, bias, mask, offs_m, offs_n, I, J, scale,
                                    D, BD, HAS_BIAS, HAS_MASK, PRECISION, ACC)
            dS = unit_dS(S, keep, dy, P, h, offs_n, J, R, hamming(offs_n, J, ACC)[None, :],
                         NP, BR, UNIT, ACC)
            if BIAS_GRAD:
                tl.atomic_add(tile_of(dbias, offs_m, offs_n), dS, mask=keep)
            dq += dot(dS.to(k.dtype), k, PRECISION)
        store_rows(head(DQ, b, h, H * I * D, I * D, D, 1), offs_m, I, dq * scale, D, BD)
    else:
        for start in range(0, J, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            window = hamming(offs_n, J, ACC)[None, :]
            summed = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
            for b in range(first, tl.minimum(first + WINDOWS, B)):
                q = load_rows(head(Q, b, h, stride_qb, stride_qh, stride_qi, stride_qd), offs_m,
                              I, D, BD)
                dy = load_rows(head(DY, b, h, H * I * R, I * R, R, 1), offs_m, I, R, BR).to(ACC)
                S, k, keep = logit_tile(
                    q, head(K, b, h, stride_kb, stride_kh, stride_kj, stride_kd),
                    head(BIAS, b, h, stride_bb, stride_bh, stride_bi, stride_bj),
                    head(MASK, b, h, stride_mb, stride_mh, stride_mi, stride_mj),
                    offs_m, offs_n, I, J, scale, D, BD, HAS_BIAS, HAS_MASK, PRECISION, ACC)
                dS = unit_dS(S, keep, dy, P, h, offs_n, J, R, window, NP, BR, UNIT, ACC)
                summed += dS
                dq_ptrs, dq_in = rows_of(head(DQ, b, h, H * I * D, I * D, D, 1), offs_m, I, D,
                                         BD)
                tl.atomic_add(dq_ptrs, dot(dS.to(k.dtype), k, PRECISION) * scale, mask=dq_in)
            tl.atomic_add(tile_of(dbias, offs_m, offs_n), summed,
                          mask=(offs_m[:, None] < I) & (offs_n[None, :] < J))


# Ops ------------------------------------------------------------------------------------

def _pow2(n):
    return max(16, triton.next_power_of_2(n))


def _strides(t, shape):
    """t's strides viewed as `shape`, 0 along the axes it broadcasts (zeros when t is None)."""
    if t is None:
        return [0] * len(shape)
    return [0] * (len(shape) - t.dim()) + [0 if n == 1 else s for n, s in zip(t.shape, t.stride())]


def _logit_args(q, k, bias, mask):
    """What every kernel takes for its S tiles: tensors, sizes (H, I, J), strides, constexprs;
    q is (b h i d), the others broadcast to it."""
    B, H, I, D = q.shape
    J = k.shape[2]
    tensors = [q, k, q if bias is None else bias, q if mask is None else mask]
    strides = [*_strides(q, q.shape), *_strides(k, (B, H, J, D)), *_strides(bias, (B, H, I, J)),
               *_strides(mask, (B, H, I, J))]
    tf32 = q.dtype == torch.float32 and q.is_cuda and torch.backends.cuda.matmul.allow_tf32
    meta = dict(D=D, BD=_pow2(D), HAS_BIAS=bias is not None, HAS_MASK=mask is not None,
                PRECISION='tf32' if tf32 else 'ieee', ACC=_acc(q)[1])
    return tensors, [H, I, J], strides, meta


def _acc(q):
    """Accumulator dtype, torch's and Triton's: float64 for float64 inputs, else float32."""
    return (torch.float64, tl.float64) if q.dtype == torch.float64 else (torch.float32, tl.float32)


def _grid(rows, B, H, block):
    return lambda meta: (triton.cdiv(rows, meta[block]), B * H)


def _family(basis, G, base, X, lo, hi):
    """Static settings of an expansion family, constexprs of `expansion_map`: its maps are X's,
    the coefficients karat.py made (karat.Basis.size(G) of the family's, then the base
    activation's, if any)."""
    maps = X.shape[2]
    return dict(BASIS=basis, G=G, OWN=maps - (base != ZERO), BASE=base, NMAPS=maps, LO=lo, HI=hi)


def _query_pass(B, H, I, bias, bias_grad, q):
    """WINDOWS, the grid and dq's buffer of a dq/dbias pass: a bias shared by the batch sums
    the dS of WINDOWS batch items in a program, and adds its dq (zeroed, float32)."""
    windows = WINDOWS if bias_grad and B > 1 and _strides(bias, (B, H, I, 1))[0] == 0 else 1
    grid = lambda meta: (triton.cdiv(I, meta['BLOCK_M']), triton.cdiv(B, windows) * H)
    dq = (torch.empty_like(q, memory_format=torch.contiguous_format) if windows == 1 else
          torch.zeros(q.shape, dtype=_acc(q)[0], device=q.device))
    return windows, grid, dq


def _sum_to(t, shape):
    """t summed over the leading axes that `shape` broadcasts (size 1)."""
    dims = [i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1]
    return t.sum(dims, keepdim=True) if dims else t


@triton_op('karat::expansion', mutates_args=())
def expansion(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None,
              mask: torch.Tensor | None, X: torch.Tensor, scale: float, basis: int, G: int,
              base: int, lo: float, hi: float) -> torch.Tensor:
    """Y = Σ_m (M ⊙ B_m(scale · q k^T + bias)) X_m.

    q (b h i d); k (b|1, h, j, d); bias, mask broadcastable to (b h i j); X (b|1, h, m, j, e)
    stacks the maps' value tiles, m = the family's maps then the base activation's.
    Returns (b h i e) in q's dtype."""
    B, H, I, _ = q.shape
    E = X.shape[-1]
    Y = q.new_empty(B, H, I, E)
    tensors, sizes, strides, meta = _logit_args(q, k, bias, mask)
    wrap_triton(expansion_fwd_kernel)[_grid(I, B, H, 'BLOCK_M')](
        *tensors, X, Y, *sizes, scale, *strides, *_strides(X, (B, H, *X.shape[2:])), *Y.stride(),
        E=E, BE=_pow2(E), **meta, **_family(basis, G, base, X, lo, hi))
    return Y


@triton_op('karat::expansion_backward', mutates_args=())
def expansion_backward(dY: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                       bias: torch.Tensor | None, mask: torch.Tensor | None, X: torch.Tensor,
                       scale: float, basis: int, G: int, base: int, lo: float, hi: float,
                       bias_grad: bool) -> list[torch.Tensor]:
    """dq, dk, dbias (empty unless bias_grad) and dX of `expansion`."""
    B, H, I, D = q.shape
    J, E = k.shape[2], X.shape[-1]
    maps = _family(basis, G, base, X, lo, hi)
    tensors, sizes, strides, meta = _logit_args(q, k, bias, mask)
    x_args = [scale, *strides, *_strides(X, (B, H, *X.shape[2:])), *dY.stride()]
    dk = q.new_empty(B, H, J, D)
    dX = torch.empty(B, H, maps['NMAPS'], J, E, dtype=_acc(q)[0], device=q.device)
    dbias = torch.zeros(bias.shape if bias_grad else 0, dtype=_acc(q)[0], device=q.device)
    wrap_triton(expansion_bwd_kx_kernel)[_grid(J, B, H, 'BLOCK_N')](
        *tensors, X, dY, dk, dX, *sizes, *x_args, E=E, BE=_pow2(E), **meta, **maps)
    windows, grid, dq = _query_pass(B, H, I, bias, bias_grad, q)
    wrap_triton(expansion_bwd_q_kernel)[grid](
        *tensors, X, dY, dq, dbias, B, *sizes, *x_args,
        *_strides(dbias if bias_grad else None, (B, H, I, J)), E=E, BE=_pow2(E),
        BIAS_GRAD=bias_grad, WINDOWS=windows, **meta, **maps)
    return [dq.to(q.dtype), _sum_to(dk, k.shape), dbias.to(q.dtype if bias is None else bias.dtype),
            _sum_to(dX, X.shape).to(X.dtype)]


def register_backward(op, backward):
    """Autograd for a fused op (q, k, bias, mask, values, *static): its backward op gives the
    gradients of q, k, the bias (when it needs one) and the values."""
    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:5])
        ctx.static = inputs[5:]

    def grad(ctx, dY):
        q, k, bias, mask, X = ctx.saved_tensors
        bias_grad = bias is not None and ctx.needs_input_grad[2]
        dq, dk, dbias, dX = backward(dY.contiguous(), q, k, bias, mask, X, *ctx.static, bias_grad)
        return dq, dk, dbias if bias_grad else None, None, dX, *[None] * len(ctx.static)
    torch.library.register_autograd(op, grad, setup_context=setup)


register_backward('karat::expansion', expansion_backward)


@triton_op('karat::units', mutates_args=())
def units(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None,
          mask: torch.Tensor | None, P: torch.Tensor, unit: int, scale: float) -> torch.Tensor:
    """Y_ip = Σ_j M_ij φ_pj(scale · q_i · k_j + bias_ij) for units with parameters
    P (h, c, p, j): c indexes the family's parameters (rational a_0..a_5, b_1..b_4; w, τ, s).
    Returns (b h i p) in q's dtype."""
    B, H, I, _ = q.shape
    NP, R = P.shape[1], P.shape[2]
    P, Y = P.contiguous(), q.new_empty(B, H, I, R)
    tensors, sizes, strides, meta = _logit_args(q, k, bias, mask)
    wrap_triton(unit_fwd_kernel)[_grid(I, B, H, 'BLOCK_M')](
        *tensors, P, Y, *sizes, R, scale, *strides,
        BR=_pow2(R), NP=NP, UNIT=unit, **meta)
    return Y


@triton_op('karat::units_backward', mutates_args=())
def units_backward(dY: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                   bias: torch.Tensor | None, mask: torch.Tensor | None, P: torch.Tensor,
                   unit: int, scale: float, bias_grad: bool) -> list[torch.Tensor]:
    """dq, dk, dbias (empty unless bias_grad) and dP of `units`."""
    B, H, I, D = q.shape
    J, NP, R = k.shape[2], P.shape[1], P.shape[2]
    P = P.contiguous()
    tensors, sizes, strides, meta = _logit_args(q, k, bias, mask)
    args = [*sizes, R, scale, *strides]
    dk = q.new_empty(B, H, J, D)
    dP = torch.zeros(B, H, NP, R, J, dtype=_acc(q)[0], device=q.device)
    dbias = torch.zeros(bias.shape if bias_grad else 0, dtype=_acc(q)[0], device=q.device)
    wrap_triton(unit_bwd_kp_kernel)[_grid(J, B, H, 'BLOCK_N')](
        *tensors, P, dY, dk, dP, *args, NP=NP, NPP=_pow2(NP), UNIT=unit, **meta)
    windows, grid, dq = _query_pass(B, H, I, bias, bias_grad, q)
    wrap_triton(unit_bwd_q_kernel)[grid](
        *tensors, P, dY, dq, dbias, B, *args, *_strides(dbias if bias_grad else None, (B, H, I, J)),
        BR=_pow2(R), NP=NP, UNIT=unit, BIAS_GRAD=bias_grad, WINDOWS=windows, **meta)
    return [dq.to(q.dtype), _sum_to(dk, k.shape), dbias.to(q.dtype if bias is None else bias.dtype),
            dP.sum(0).to(P.dtype)]


register_backward('karat::units', units_backward)


# fast.py's interface --------------------------------------------------------------------

def like(t, q):
    """t in q's dtype: under autocast q, k and v are bf16 and the parameters float32."""
    return t if t.dtype == q.dtype else t.to(q.dtype)


def karat_expansion(q, k, bias, mask, X, scale, basis, G, base, elements=None):
    """fast.rows_expansion by the fused kernels (`elements`, a PyTorch chunk size, unused)."""
    return expansion(q, like(k, q), bias, mask, like(X, q), scale,
                     EXPANSIONS[basis.name], G, ACTIVATIONS[base], *karat.SPLINE_RANGE)


def karat_units(q, k, bias, mask, params, basis, G, base, scale, elements=None):
    """fast.rows_units by the fused kernels: the unit parameters stacked as (h, c, p, j) in
    the kernels' order, rational a_0..a_5, b_1..b_4 and wavelets w, τ, s."""
    names = ('a', 'b') if 'a' in params else ('w', 'tau', 's')
    P = torch.cat([params[n].reshape(*params[n].shape[:3], -1) for n in names], -1)
    Z = units(q, like(k, q), bias, mask, rearrange(P, 'h p q c -> h c p q'), UNITS[basis.name],
              scale)
    if 'w_base' in params:
        X = like(rearrange(params['w_base'], 'h p q -> 1 h 1 q p'), q)
        Z = Z + expansion(q, like(k, q), bias, mask, X, scale, EXPANSIONS['none'], G,
                          ACTIVATIONS[base], *karat.SPLINE_RANGE)
    return Z
