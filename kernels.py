"""Flash-KArAt: fused Triton kernels for Kolmogorov-Arnold attention.

karat.py is the definition; this file computes the same functions without ever writing an
N x N tile to memory. With logits S = scale · q k^T + bias (b h i j) and a 0/1 mask M, every
fused form of KArAt is one primitive, attention without softmax statistics:

    expansion families   Y = Σ_m F_m X_m,        F_m = M ⊙ B_m(S)
    unit families        Y_ip = Σ_j M_ij φ_pj(S_ij)

    low rank   X_m = C_m^T  (N x r per head, shared by the batch): Y = Z, then O = Z (W^T V)
    full rank  X_m = U_m = C_m^T (M ⊙ V)  (N x d per batch and head): Y = O
    per-query mask, second pass   q = Z, k = W, B(x) = x, X = V: O_i = Σ_j M_ij (Z_i · W_j) V_j

Each kernel is FlashAttention-2's loop: a program owns a block of query rows, streams over key
blocks, builds the S tile in registers and accumulates tl.dot(F_m, X_m) (no running max or row
sum). Backward recomputes the S tile, as FlashAttention-2 does, in a pass over key blocks for
dk and dX (one map at a time) or the units' parameters, and a pass over query blocks for dq and
dbias, with dS = M ⊙ Σ_m (dY X_m^T) ⊙ B_m'(S). The ops are registered with torch.library, so
that autograd, torch.compile and CUDA graphs treat each as one call.
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
EXPANSIONS = {'fourier': 0, 'bspline': 1, 'chebyshev': 2, 'gaussian': 3, 'linear': 4, 'none': 5}
UNITS = {'rational': 0, 'mexican_hat': 1, 'morlet': 2, 'dog': 3, 'meyer': 4, 'shannon': 5}
ACTIVATIONS = {'zero': 0, 'silu': 1, 'identity': 2, 'gelu': 3}  # karat.BASE_ACTIVATIONS

# Block sizes come from autotune over configs that tests/compile_kernels.py proves spill-free on
# sm_80 and sm_90 (each tile holds the logits, their maps and an accumulator, so register
# pressure, not shared memory, is the limit); the interpreter (CPU tests) runs the 32 x 32 one
# alone: N = 17 is one ragged tile, N = 49 and 65 several (16 x 16 tiles took 4x as long).
def configs(*blocks):
    if INTERPRET:
        return [triton.Config({'BLOCK_M': 32, 'BLOCK_N': 32}, num_warps=1)]
    # maxnreg: left to itself ptxas capped some kernels at 168 registers, and spilled
    return [triton.Config({'BLOCK_M': m, 'BLOCK_N': n}, num_warps=w, num_stages=1, maxnreg=255)
            for m, n, w in blocks]


CONFIGS = configs((32, 32, 8), (32, 16, 4))
KEY = ['I', 'J', 'D', 'E', 'BASIS', 'G']
UNIT_KEY = ['I', 'J', 'D', 'R', 'UNIT']


INTERPRETED = tl.constexpr(INTERPRET)


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    """tl.dot, accumulating in float32 (float64 for float64 tiles)."""
    if INTERPRETED:  # its bfloat16 products are wrong (Triton 3.8); in float32 they are exact
        if a.dtype.primitive_bitwidth == 16:
            a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


# Feature maps -----------------------------------------------------------------------------

@triton.jit
def _sigmoid(x):
    return 1 / (1 + tl.exp(-x))


@triton.jit
def expansion_map(S, c1, s1, m: tl.constexpr, BASIS: tl.constexpr, G: tl.constexpr,
                  BASE: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr):
    """B_m(S) and B_m'(S), as karat.py's families define them; the map after the family's
    own (m = number of maps) is the base activation b(S). c1, s1 = cos S, sin S (Fourier)."""
    if BASIS == 0:
        NB: tl.constexpr = 2 * G
    elif BASIS == 1:
        NB: tl.constexpr = G + 3
    elif BASIS == 2:
        NB: tl.constexpr = G + 1
    elif BASIS == 3:
        NB: tl.constexpr = G
    elif BASIS == 4:
        NB: tl.constexpr = 1
    else:  # none: only the base activation, beside a unit family
        NB: tl.constexpr = 0
    if m == NB:
        if BASE == 1:  # silu
            sig = _sigmoid(S)
            B, dB = S * sig, sig * (1 + S * (1 - sig))
        elif BASE == 2:  # identity
            B, dB = S, S * 0 + 1
        else:  # gelu, exact (erf) form
            cdf = 0.5 * (1 + tl.math.erf(S * 0.7071067811865476))
            B, dB = S * cdf, cdf + S * tl.exp(-0.5 * S * S) * 0.3989422804014327
    elif BASIS == 0:  # fourier, f = 1..G: cos(f S) = T_f(cos S), sin(f S) = sin S U_{f-1}(cos S)
        f: tl.constexpr = m + 1 if m < G else m - G + 1
        T0, T1, U0, U1 = c1 * 0 + 1, c1, c1 * 0 + 1, 2 * c1
        for _ in tl.static_range(f - 1):
            T0, T1, U0, U1 = T1, 2 * c1 * T1 - T0, U1, 2 * c1 * U1 - U0
        cos_f, sin_f = T1, s1 * U0
        if m < G:
            B, dB = cos_f, -f * sin_f
        else:
            B, dB = sin_f, f * cos_f
    elif BASIS == 1:  # cubic B-spline on uniform knots t_m = LO + (m - 3) h, S clamped
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
    elif BASIS == 2:  # chebyshev T_m(tanh S), T_m' = m U_{m-1}
        u = 2 * _sigmoid(2 * S) - 1
        T0, T1, U0, U1 = u * 0 + 1, u, u * 0 + 1, 2 * u
        for _ in tl.static_range(m - 1):
            T0, T1, U0, U1 = T1, 2 * u * T1 - T0, U1, 2 * u * U1 - U0
        if m == 0:
            B, dB = T0, u * 0
        else:
            B, dB = T1, m * U0 * (1 - u * u)
    elif BASIS == 3:  # gaussian exp(-((S - μ_m)/h)^2), μ_m = LO + m h, h = (HI - LO)/(G - 1)
        h = tl.full([], HI - LO, S.dtype) / (G - 1 if G > 1 else 1)
        z = (S - LO - m * h) / h
        B = tl.exp(-z * z)
        dB = -2 * z / h * B
    else:  # linear: the second pass of a per-query mask
        B, dB = S, S * 0 + 1
    return B, dB


@triton.jit
def trig(S, BASIS: tl.constexpr):
    """cos S and sin S, the only transcendentals Fourier needs: one each per logit."""
    if BASIS == 0:
        c1, s1 = tl.cos(S), tl.sin(S)
    else:
        c1, s1 = S, S
    return c1, s1


@triton.jit
def unit_value(x, P, p_off, p_mask, UNIT: tl.constexpr, PS: tl.constexpr):
    """One unit per key of the tile, as karat.py defines them: φ(x), φ'(x) and two values the
    parameter gradients need (rational: 1 + |Q|, sign Q; wavelets: f(x̃), x̃). Parameter c of
    the units sits at P + p_off + c·PS (rational a_0..a_5, b_1..b_4; wavelets w, τ, s)."""
    if UNIT == 0:
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
        if UNIT == 1:  # mexican hat
            c: tl.constexpr = 2 / (math.sqrt(3) * math.pi ** 0.25)
            f, df = c * (1 - t * t) * g, c * t * (t * t - 3) * g
        elif UNIT == 2:  # morlet, ω₀ = 5
            f, df = tl.cos(5.0 * t) * g, (-5.0 * tl.sin(5.0 * t) - t * tl.cos(5.0 * t)) * g
        elif UNIT == 3:  # dog
            f, df = t * g, (1 - t * t) * g
        elif UNIT == 4:  # meyer
            v = tl.abs(t)
            r = tl.minimum(tl.maximum(2 * v - 1, 0.0), 1.0)
            nu = r * r * r * r * (35 - 84 * r + 70 * r * r - 20 * r * r * r)
            dnu = tl.where((r > 0) & (r < 1), 280 * r * r * r * (1 - r) * (1 - r) * (1 - r), 0.0)
            sv, cn = tl.sin(math.pi * v), tl.cos(math.pi / 2 * nu)
            dm = -tl.sin(math.pi / 2 * nu) * math.pi / 2 * dnu  # of m(v) = cos(π/2 ν)
            dv = math.pi * tl.cos(math.pi * v) * cn + sv * dm
            f, df = sv * cn, dv * tl.where(t > 0, 1.0, tl.where(t < 0, -1.0, 0.0))
        else:  # shannon sin(x̃)/x̃; the caller applies the key's Hamming window
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
    grads = tl.zeros((NPP, x.shape[1]), dtype=tl.float32)
    if UNIT == 0:
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
    return tl.where(J > 1, 0.54 - 0.46 * tl.cos(2 * math.pi * offs_n.to(ACC) / n), 1.0)


# The S tile -----------------------------------------------------------------------------

@triton.jit
def logit_tile(q, K, BIAS, MASK, b, h, offs_m, offs_n, I, J, scale,
               skb, skh, skj, skd, sbb, sbh, sbi, sbj, smb, smh, smi, smj,
               D: tl.constexpr, BD: tl.constexpr, HAS_BIAS: tl.constexpr,
               HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """S = scale · q k^T + bias for one (query block, key block) tile, the key tile k, and
    keep: in bounds and not masked. Nothing outside `keep` may reach an output."""
    offs_d = tl.arange(0, BD)
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skj + offs_d[None, :] * skd,
                mask=(offs_n[:, None] < J) & (offs_d[None, :] < D), other=0.0)
    S = dot(q, tl.trans(k), PRECISION).to(ACC) * scale
    keep = (offs_m[:, None] < I) & (offs_n[None, :] < J)
    if HAS_BIAS:
        S += tl.load(BIAS + b * sbb + h * sbh + offs_m[:, None] * sbi + offs_n[None, :] * sbj,
                     mask=keep, other=0.0).to(ACC)
    if HAS_MASK:
        m = tl.load(MASK + b * smb + h * smh + offs_m[:, None] * smi + offs_n[None, :] * smj,
                    mask=keep, other=0)
        keep = keep & (m != 0)
    return S, k, keep


@triton.jit
def _rows(T, b, h, offs, R, sb, sh, sr, sc, C: tl.constexpr, BC: tl.constexpr):
    """Pointers and bounds of rows `offs` (< R) of a (b, h, R, C) tensor, columns padded to BC."""
    offs_c = tl.arange(0, BC)
    ptrs = T + b * sb + h * sh + offs[:, None] * sr + offs_c[None, :] * sc
    return ptrs, (offs[:, None] < R) & (offs_c[None, :] < C)


@triton.jit
def load_rows(T, b, h, offs, R, sb, sh, sr, sc, C: tl.constexpr, BC: tl.constexpr):
    """Rows `offs` of a (b, h, R, C) tensor, zero beyond R rows and C columns."""
    ptrs, inside = _rows(T, b, h, offs, R, sb, sh, sr, sc, C, BC)
    return tl.load(ptrs, mask=inside, other=0.0)


# Expansion families ---------------------------------------------------------------------

@triton.autotune(configs=CONFIGS, key=KEY)
@triton.jit
def expansion_fwd_kernel(
        Q, K, BIAS, MASK, X, Y, H, I, J, scale,
        sqb, sqh, sqi, sqd, skb, skh, skj, skd, sbb, sbh, sbi, sbj, smb, smh, smi, smj,
        sxb, sxh, sxm, sxj, sxe, syb, syh, syi, sye,
        D: tl.constexpr, E: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
        BASIS: tl.constexpr, G: tl.constexpr, BASE: tl.constexpr, NMAPS: tl.constexpr,
        LO: tl.constexpr, HI: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Y_i = Σ_j Σ_m F_m,ij X_m,j for one block of query rows i."""
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q = load_rows(Q, b, h, offs_m, I, sqb, sqh, sqi, sqd, D, BD)
    acc = tl.zeros((BLOCK_M, BE), dtype=ACC)
    for start in range(0, J, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        S, k, keep = logit_tile(q, K, BIAS, MASK, b, h, offs_m, offs_n, I, J, scale,
                                skb, skh, skj, skd, sbb, sbh, sbi, sbj, smb, smh, smi, smj,
                                D, BD, HAS_BIAS, HAS_MASK, PRECISION, ACC)
        c1, s1 = trig(S, BASIS)
        for m in tl.static_range(NMAPS):
            B, _ = expansion_map(S, c1, s1, m, BASIS, G, BASE, LO, HI)
            x = load_rows(X + m * sxm, b, h, offs_n, J, sxb, sxh, sxj, sxe, E, BE)
            acc += dot(tl.where(keep, B, 0.0).to(x.dtype), x, PRECISION)
    y_ptrs, y_in = _rows(Y, b, h, offs_m, I, syb, syh, syi, sye, E, BE)
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=y_in)


@triton.jit
def expansion_dS(S, c1, s1, keep, dy, X, b, h, offs_n, J, sxb, sxh, sxm, sxj, sxe,
                 E: tl.constexpr, BE: tl.constexpr, BASIS: tl.constexpr, G: tl.constexpr,
                 BASE: tl.constexpr, NMAPS: tl.constexpr, LO: tl.constexpr, HI: tl.constexpr,
                 PRECISION: tl.constexpr, ACC: tl.constexpr):
    """dS = M ⊙ Σ_m (dY X_m^T) ⊙ B_m'(S) for one tile."""
    dS = tl.zeros(S.shape, dtype=ACC)
    for m in tl.static_range(NMAPS):
        _, dB = expansion_map(S, c1, s1, m, BASIS, G, BASE, LO, HI)
        x = load_rows(X + m * sxm, b, h, offs_n, J, sxb, sxh, sxj, sxe, E, BE)
        dS += dot(dy, tl.trans(x), PRECISION).to(ACC) * dB
    return tl.where(keep, dS, 0.0)


@triton.autotune(configs=CONFIGS, key=KEY)
@triton.jit
def expansion_bwd_kx_kernel(
        Q, K, BIAS, MASK, X, DY, DK, DX, H, I, J, scale,
        sqb, sqh, sqi, sqd, skb, skh, skj, skd, sbb, sbh, sbi, sbj, smb, smh, smi, smj,
        sxb, sxh, sxm, sxj, sxe, syb, syh, syi, sye,
        D: tl.constexpr, E: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
        BASIS: tl.constexpr, G: tl.constexpr, BASE: tl.constexpr, NMAPS: tl.constexpr,
        LO: tl.constexpr, HI: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For one block of keys j: dX_m,j = Σ_i F_m,ij^T dY_i and dk_j = scale Σ_i dS_ij^T q_i.
    One map at a time, each a pass over the query blocks: a tile then holds one map's
    accumulator, not all of them, at the price of recomputing S once per map."""
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dk = tl.zeros((BLOCK_N, BD), dtype=ACC)
    for m in tl.static_range(NMAPS):
        x = load_rows(X + m * sxm, b, h, offs_n, J, sxb, sxh, sxj, sxe, E, BE)
        dx = tl.zeros((BLOCK_N, BE), dtype=ACC)
        for start in range(0, I, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            q = load_rows(Q, b, h, offs_m, I, sqb, sqh, sqi, sqd, D, BD)
            dy = load_rows(DY, b, h, offs_m, I, syb, syh, syi, sye, E, BE)
            S, k, keep = logit_tile(q, K, BIAS, MASK, b, h, offs_m, offs_n, I, J, scale,
                                    skb, skh, skj, skd, sbb, sbh, sbi, sbj, smb, smh, smi, smj,
                                    D, BD, HAS_BIAS, HAS_MASK, PRECISION, ACC)
            c1, s1 = trig(S, BASIS)
            B, dB = expansion_map(S, c1, s1, m, BASIS, G, BASE, LO, HI)
            dx += dot(tl.trans(tl.where(keep, B, 0.0).to(dy.dtype)), dy, PRECISION)
            dS = dot(dy, tl.trans(x), PRECISION).to(ACC) * dB
            dk += dot(tl.trans(tl.where(keep, dS, 0.0).to(q.dtype)), q, PRECISION)
        d_ptrs, d_in = _rows(DX + m * J * E, b, h, offs_n, J, H * NMAPS * J * E, NMAPS * J * E,
                             E, 1, E, BE)
        tl.store(d_ptrs, dx.to(DX.dtype.element_ty), mask=d_in)
    k_ptrs, k_in = _rows(DK, b, h, offs_n, J, H * J * D, J * D, D, 1, D, BD)
    tl.store(k_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=k_in)


@triton.autotune(configs=CONFIGS, key=KEY, reset_to_zero=['DBIAS'])
@triton.jit
def expansion_bwd_q_kernel(
        Q, K, BIAS, MASK, X, DY, DQ, DBIAS, H, I, J, scale,
        sqb, sqh, sqi, sqd, skb, skh, skj, skd, sbb, sbh, sbi, sbj, smb, smh, smi, smj,
        sxb, sxh, sxm, sxj, sxe, syb, syh, syi, sye, sdb, sdh, sdi, sdj,
        D: tl.constexpr, E: tl.constexpr, BD: tl.constexpr, BE: tl.constexpr,
        BASIS: tl.constexpr, G: tl.constexpr, BASE: tl.constexpr, NMAPS: tl.constexpr,
        LO: tl.constexpr, HI: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, BIAS_GRAD: tl.constexpr,
        PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For one block of queries i: dq_i = scale Σ_j dS_ij k_j, and dS added into dbias, which
    the batch (and Swin's windows) share, so the add is atomic."""
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q = load_rows(Q, b, h, offs_m, I, sqb, sqh, sqi, sqd, D, BD)
    dy = load_rows(DY, b, h, offs_m, I, syb, syh, syi, sye, E, BE)
    dq = tl.zeros((BLOCK_M, BD), dtype=ACC)
    for start in range(0, J, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        S, k, keep = logit_tile(q, K, BIAS, MASK, b, h, offs_m, offs_n, I, J, scale,
                                skb, skh, skj, skd, sbb, sbh, sbi, sbj, smb, smh, smi, smj,
                                D, BD, HAS_BIAS, HAS_MASK, PRECISION, ACC)
        c1, s1 = trig(S, BASIS)
        dS = expansion_dS(S, c1, s1, keep, dy, X, b, h, offs_n, J, sxb, sxh, sxm, sxj, sxe,
                          E, BE, BASIS, G, BASE, NMAPS, LO, HI, PRECISION, ACC)
        if BIAS_GRAD:
            tl.atomic_add(DBIAS + b * sdb + h * sdh + offs_m[:, None] * sdi
                          + offs_n[None, :] * sdj, dS, mask=keep)
        dq += dot(dS.to(k.dtype), k, PRECISION)
    dq_ptrs, dq_in = _rows(DQ, b, h, offs_m, I, H * I * D, I * D, D, 1, D, BD)
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=dq_in)


# Unit families ----------------------------------------------------------------------------

@triton.autotune(configs=CONFIGS, key=UNIT_KEY)
@triton.jit
def unit_fwd_kernel(
        Q, K, BIAS, MASK, P, Y, H, I, J, R, scale,
        sqb, sqh, sqi, sqd, skb, skh, skj, skd, sbb, sbh, sbi, sbj, smb, smh, smi, smj,
        D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, NP: tl.constexpr,
        UNIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
        PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Y_ip = Σ_j M_ij φ_pj(S_ij) for one block of query rows, one reduction per unit p."""
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q = load_rows(Q, b, h, offs_m, I, sqb, sqh, sqi, sqd, D, BD)
    cols = tl.arange(0, BR)[None, :]
    acc = tl.zeros((BLOCK_M, BR), dtype=ACC)
    for start in range(0, J, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        S, k, keep = logit_tile(q, K, BIAS, MASK, b, h, offs_m, offs_n, I, J, scale,
                                skb, skh, skj, skd, sbb, sbh, sbi, sbj, smb, smh, smi, smj,
                                D, BD, HAS_BIAS, HAS_MASK, PRECISION, ACC)
        window = hamming(offs_n, J, ACC)[None, :]
        for p in range(R):
            phi, _, _, _ = unit_value(S, P, h * NP * R * J + p * J + offs_n[None, :],
                                      (offs_n < J)[None, :], UNIT, R * J)
            if UNIT == 5:
                phi = phi * window
            acc = tl.where(cols == p, acc + tl.sum(tl.where(keep, phi, 0.0), axis=1)[:, None], acc)
    y_ptrs, y_in = _rows(Y, b, h, offs_m, I, H * I * R, I * R, R, 1, R, BR)
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=y_in)


@triton.autotune(configs=CONFIGS, key=UNIT_KEY)
@triton.jit
def unit_bwd_kp_kernel(
        Q, K, BIAS, MASK, P, DY, DK, DP, H, I, J, R, scale,
        sqb, sqh, sqi, sqd, skb, skh, skj, skd, sbb, sbh, sbi, sbj, smb, smh, smi, smj,
        D: tl.constexpr, BD: tl.constexpr, NP: tl.constexpr, NPP: tl.constexpr,
        UNIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
        PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For one block of keys j: dk_j = scale Σ_i dS_ij^T q_i and, per unit p, the gradient of
    its parameters summed over this batch element's query rows."""
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    window = hamming(offs_n, J, ACC)[None, :]
    dk = tl.zeros((BLOCK_N, BD), dtype=ACC)
    for p in range(R):
        grads = tl.zeros((NPP, BLOCK_N), dtype=ACC)
        for start in range(0, I, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            q = load_rows(Q, b, h, offs_m, I, sqb, sqh, sqi, sqd, D, BD)
            S, k, keep = logit_tile(q, K, BIAS, MASK, b, h, offs_m, offs_n, I, J, scale,
                                    skb, skh, skj, skd, sbb, sbh, sbi, sbj, smb, smh, smi, smj,
                                    D, BD, HAS_BIAS, HAS_MASK, PRECISION, ACC)
            dy = tl.load(DY + ((b * H + h) * I + offs_m) * R + p, mask=offs_m < I, other=0.0)
            g = tl.where(keep, dy.to(ACC)[:, None], 0.0)
            phi, dphi, u1, u2 = unit_value(S, P, h * NP * R * J + p * J + offs_n[None, :],
                                           (offs_n < J)[None, :], UNIT, R * J)
            if UNIT == 5:
                phi, dphi, u1 = phi * window, dphi * window, u1 * window
            dk += dot(tl.trans((g * dphi).to(q.dtype)), q, PRECISION)
            grads += unit_param_grads(S, g, phi, dphi, u1, u2, UNIT, NPP)
        rows = tl.arange(0, NPP)[:, None]
        tl.store(DP + (((b * H + h) * NP + rows) * R + p) * J + offs_n[None, :], grads,
                 mask=(rows < NP) & (offs_n[None, :] < J))
    k_ptrs, k_in = _rows(DK, b, h, offs_n, J, H * J * D, J * D, D, 1, D, BD)
    tl.store(k_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=k_in)


@triton.autotune(configs=CONFIGS, key=UNIT_KEY, reset_to_zero=['DBIAS'])
@triton.jit
def unit_bwd_q_kernel(
        Q, K, BIAS, MASK, P, DY, DQ, DBIAS, H, I, J, R, scale,
        sqb, sqh, sqi, sqd, skb, skh, skj, skd, sbb, sbh, sbi, sbj, smb, smh, smi, smj,
        sdb, sdh, sdi, sdj,
        D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, NP: tl.constexpr,
        UNIT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
        BIAS_GRAD: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For one block of queries i: dS_ij = M_ij Σ_p dY_ip φ_pj'(S_ij),
    dq_i = scale Σ_j dS_ij k_j,
    and dS added into dbias."""
    b, h = tl.program_id(1) // H, tl.program_id(1) % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q = load_rows(Q, b, h, offs_m, I, sqb, sqh, sqi, sqd, D, BD)
    dy = load_rows(DY, b, h, offs_m, I, H * I * R, I * R, R, 1, R, BR).to(ACC)
    cols = tl.arange(0, BR)[None, :]
    dq = tl.zeros((BLOCK_M, BD), dtype=ACC)
    for start in range(0, J, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        S, k, keep = logit_tile(q, K, BIAS, MASK, b, h, offs_m, offs_n, I, J, scale,
                                skb, skh, skj, skd, sbb, sbh, sbi, sbj, smb, smh, smi, smj,
                                D, BD, HAS_BIAS, HAS_MASK, PRECISION, ACC)
        window = hamming(offs_n, J, ACC)[None, :]
        dS = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
        for p in range(R):
            _, dphi, _, _ = unit_value(S, P, h * NP * R * J + p * J + offs_n[None, :],
                                       (offs_n < J)[None, :], UNIT, R * J)
            if UNIT == 5:
                dphi = dphi * window
            dS += tl.sum(tl.where(cols == p, dy, 0.0), axis=1)[:, None] * dphi
        dS = tl.where(keep, dS, 0.0)
        if BIAS_GRAD:
            tl.atomic_add(DBIAS + b * sdb + h * sdh + offs_m[:, None] * sdi
                          + offs_n[None, :] * sdj, dS, mask=keep)
        dq += dot(dS.to(k.dtype), k, PRECISION)
    dq_ptrs, dq_in = _rows(DQ, b, h, offs_m, I, H * I * D, I * D, D, 1, D, BD)
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=dq_in)


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


def _maps(basis, G, base, lo, hi):
    """Static settings of an expansion family: constexprs of `expansion_map`."""
    n = {0: 2 * G, 1: G + 3, 2: G + 1, 3: G, 4: 1, 5: 0}[basis] + (base != 0)
    return dict(BASIS=basis, G=G, BASE=base, NMAPS=n, LO=lo, HI=hi)


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
        E=E, BE=_pow2(E), **meta, **_maps(basis, G, base, lo, hi))
    return Y


@triton_op('karat::expansion_backward', mutates_args=())
def expansion_backward(dY: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                       bias: torch.Tensor | None, mask: torch.Tensor | None, X: torch.Tensor,
                       scale: float, basis: int, G: int, base: int, lo: float, hi: float,
                       bias_grad: bool) -> list[torch.Tensor]:
    """dq, dk, dbias (empty unless bias_grad) and dX of `expansion`."""
    B, H, I, D = q.shape
    J, E = k.shape[2], X.shape[-1]
    maps = _maps(basis, G, base, lo, hi)
    tensors, sizes, strides, meta = _logit_args(q, k, bias, mask)
    x_args = [*sizes, scale, *strides, *_strides(X, (B, H, *X.shape[2:])), *dY.stride()]
    dq, dk = torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(B, H, J, D)
    dX = torch.empty(B, H, maps['NMAPS'], J, E, dtype=_acc(q)[0], device=q.device)
    dbias = torch.zeros(bias.shape if bias_grad else 0, dtype=_acc(q)[0], device=q.device)
    wrap_triton(expansion_bwd_kx_kernel)[_grid(J, B, H, 'BLOCK_N')](
        *tensors, X, dY, dk, dX, *x_args, E=E, BE=_pow2(E), **meta, **maps)
    wrap_triton(expansion_bwd_q_kernel)[_grid(I, B, H, 'BLOCK_M')](
        *tensors, X, dY, dq, dbias, *x_args,
        *_strides(dbias if bias_grad else None, (B, H, I, J)), E=E, BE=_pow2(E),
        BIAS_GRAD=bias_grad, **meta, **maps)
    return [dq, _sum_to(dk, k.shape), dbias.to(q.dtype if bias is None else bias.dtype),
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
    sizes = [*sizes, R, scale, *strides]
    dq, dk = torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(B, H, J, D)
    dP = torch.empty(B, H, NP, R, J, dtype=_acc(q)[0], device=q.device)
    dbias = torch.zeros(bias.shape if bias_grad else 0, dtype=_acc(q)[0], device=q.device)
    wrap_triton(unit_bwd_kp_kernel)[_grid(J, B, H, 'BLOCK_N')](
        *tensors, P, dY, dk, dP, *sizes, NP=NP, NPP=_pow2(NP), UNIT=unit, **meta)
    wrap_triton(unit_bwd_q_kernel)[_grid(I, B, H, 'BLOCK_M')](
        *tensors, P, dY, dq, dbias, *sizes, *_strides(dbias if bias_grad else None, (B, H, I, J)),
        BR=_pow2(R), NP=NP, UNIT=unit, BIAS_GRAD=bias_grad, **meta)
    return [dq, _sum_to(dk, k.shape), dbias.to(q.dtype if bias is None else bias.dtype),
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
