"""The maths of karat.py: bases against their formulas, the operators against each other,
gradients, masking and sharing."""
import math
import re
from dataclasses import fields

import pytest
import torch
from einops import einsum

import fast
import karat
import models
import weights

x = torch.linspace(-3, 3, 13, dtype=torch.float64)


@pytest.fixture(autouse=True)
def float64():
    """The maths is checked in float64; models run in float32 where a test says so."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def operator(attn='fourier', heads=2, N=7, **kw):
    torch.manual_seed(0)
    return karat.Operator(attn, heads, N, **kw)


def qkv(b=2, h=2, n=7, d=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g) for _ in range(3)]


# --- basis families against their formulas ---------------------------------------------

def test_fourier_recurrence_equals_cos_and_sin_of_every_multiple():
    m = torch.arange(1, 6)
    expected = torch.cat([torch.cos(m * x[:, None]), torch.sin(m * x[:, None])], -1)
    torch.testing.assert_close(torch.stack(karat.fourier(x, 5), -1), expected)
    out = torch.empty(10, len(x))  # the fast path's form: every map written into one tensor
    karat.fourier(x, 5, out)
    torch.testing.assert_close(out.T, expected)


def test_cubic_bspline_takes_its_knot_values():
    # On uniform knots a cubic B-spline is 1/6, 2/3, 1/6 at the three knots inside its support.
    lo, hi, G = karat.SPLINE_RANGE[0], karat.SPLINE_RANGE[1], 4
    knot = lo + 2 * (hi - lo) / G
    B = torch.stack(karat.bspline(torch.tensor([knot]), G), -1)[0]
    assert B.shape == (G + 3,)
    nonzero = B[B.abs() > 1e-12]
    torch.testing.assert_close(nonzero, torch.tensor([1 / 6, 2 / 3, 1 / 6]))


def test_bspline_is_a_partition_of_unity_everywhere_even_beyond_the_grid():
    wide = torch.linspace(-50, 50, 1001)
    torch.testing.assert_close(sum(karat.bspline(wide, 5)), torch.ones_like(wide))
    torch.testing.assert_close(karat.bspline(torch.tensor([100.0]), 5),
                               karat.bspline(torch.tensor([karat.SPLINE_RANGE[1] - 1e-9]), 5))


def test_chebyshev_is_cos_m_arccos_of_tanh():
    m = torch.arange(0, 5)
    torch.testing.assert_close(torch.stack(karat.chebyshev(x, 4), -1),
                               torch.cos(m * torch.arccos(torch.tanh(x))[:, None]))


def test_gaussian_rbf_is_one_at_its_centres_and_follows_its_formula():
    G = 5
    mu = torch.linspace(*karat.SPLINE_RANGE, G)
    torch.testing.assert_close(torch.stack(karat.gaussian(mu, G), -1).diagonal(), torch.ones(G))
    h = (karat.SPLINE_RANGE[1] - karat.SPLINE_RANGE[0]) / (G - 1)
    torch.testing.assert_close(torch.stack(karat.gaussian(x, G), -1),
                               torch.exp(-((x[:, None] - mu) / h) ** 2))


def test_rational_is_p_over_one_plus_abs_q():
    a, b = torch.randn(6), torch.randn(4)
    P = sum(a[i] * x ** i for i in range(6))
    Q = sum(b[j - 1] * x ** j for j in range(1, 5))
    torch.testing.assert_close(karat.rational(x, a, b), P / (1 + Q.abs()))


def test_wavelets_at_chosen_points():
    c = 2 / (math.sqrt(3) * math.pi ** 0.25)
    torch.testing.assert_close(karat.mexican_hat(torch.tensor([0.0, 1.0, 2.0])),
                               torch.tensor([c, 0.0, -3 * c * math.exp(-2)]))
    torch.testing.assert_close(karat.morlet(x), torch.cos(5 * x) * torch.exp(-x ** 2 / 2))
    torch.testing.assert_close(karat.dog(torch.tensor([1.0, -2.0])),
                               torch.tensor([math.exp(-0.5), -2 * math.exp(-2)]))
    # Meyer: sin(π|x|) on [0, ½]; ν(½) = ½ gives cos(π/4) at |x| = ¾; zero from |x| = 1.
    torch.testing.assert_close(karat.meyer(torch.tensor([0.3, -0.75, 1.0, 2.5])),
                               torch.tensor([math.sin(0.3 * math.pi),
                                             math.sin(0.75 * math.pi) * math.cos(math.pi / 4),
                                             0.0, 0.0]))
    window = 0.54 - 0.46 * torch.cos(2 * math.pi * torch.arange(13) / 12)
    torch.testing.assert_close(karat.shannon(x),
                               torch.where(x == 0, 1.0, torch.sin(x) / x) * window)


def test_every_named_family_is_registered():
    assert set(karat.BASES) == {'fourier', 'bspline', 'rational', 'mexican_hat', 'morlet', 'dog',
                                'meyer', 'shannon', 'chebyshev', 'gaussian'}
    assert karat.ATTENTIONS[0] == 'softmax'


# --- one Kolmogorov-Arnold layer --------------------------------------------------------

@pytest.mark.parametrize('base', ['zero', 'silu', 'gelu', 'identity'])
def test_kan_layer_sums_its_univariate_units(base):
    """Φ(x)_p = Σ_q φ_pq(x_q), φ_pq = w^b_pq b(x) + Σ_m c_pqm B_m(x), unit by unit."""
    basis, G = karat.BASES['fourier'], 2
    params = karat.init_kan(basis, 1, 3, 4, G, base, 1.0)
    row = torch.randn(4)
    out = karat.kan(row[None, None, None], basis, params, G, base)[0, 0, 0]
    b = karat.BASE_ACTIVATIONS[base]
    for p in range(3):
        units = [params['coef'][0, p, q] @ torch.stack(karat.fourier(row[q], G))
                 + (0 if b is None else params['w_base'][0, p, q] * b(row[q]))
                 for q in range(4)]
        torch.testing.assert_close(out[p], sum(units))


def test_zero_base_has_no_base_weight():
    assert 'w_base' not in karat.init_kan(karat.BASES['fourier'], 1, 2, 3, 3, 'zero', 1.0)


def test_fourier_init_gives_unit_variance_whatever_the_logit_scale():
    """Σ_m cos² + sin² = G, so with coefficients N(0, 1/(N G)) Z = Φ̂(a) has variance
    exactly 1."""
    torch.manual_seed(0)
    N, G = 64, 3
    params = karat.init_kan(karat.BASES['fourier'], 8, 64, N, G, 'zero', N ** -0.5)
    for scale in (0.01, 1.0, 30.0):
        Z = karat.kan(scale * torch.randn(4, 8, 16, N), karat.BASES['fourier'], params, G)
        assert 0.85 < Z.var().item() < 1.15


# --- attention operators ----------------------------------------------------------------

@pytest.mark.parametrize('attn', karat.BASES)
def test_full_operator_equals_low_rank_with_r_equal_n_and_identity_W(attn):
    N = 6
    full, low = operator(attn, N=N, rank=None), operator(attn, N=N, rank=N)
    with torch.no_grad():
        for k in full.phi:
            low.phi[k].copy_(full.phi[k])
        low.W.copy_(torch.eye(N).expand(2, N, N))
    A, V = torch.randn(2, 2, N, N), torch.randn(2, 2, N, 5)
    torch.testing.assert_close(full(A, V), low(A, V))


@pytest.mark.parametrize('attn', karat.BASES)
@pytest.mark.parametrize('rank', [3, None])
def test_reassociated_output_equals_the_materialised_formula(attn, rank):
    """O = Z (W^T V) (efficient) against σ̂(A) V (naive): values and gradients. The fast paths
    that also recompute the logits are tested against the same definition in test_kernels.py."""
    op = operator(attn, N=7, rank=rank)
    A, V = torch.randn(2, 2, 7, 7, requires_grad=True), torch.randn(2, 2, 7, 3, requires_grad=True)
    results = []
    for out in (op(A, V),
                einsum(op(A, V, return_attention=True), V, 'b h i j, b h j d -> b h i d')):
        grads = torch.autograd.grad(out.pow(2).sum(), [A, V, *op.parameters()])
        results.append((out, grads))
    torch.testing.assert_close(results[0], results[1])


def test_low_rank_output_is_W_phi_hat_A_times_V():
    op = operator(N=5, rank=2)
    A, V = torch.randn(1, 2, 5, 5), torch.randn(1, 2, 5, 3)
    Z = karat.kan(A, op.basis, dict(op.phi), op.config.grid)
    S = einsum(op.W, Z, 'h n r, b h k r -> b h k n')
    torch.testing.assert_close(op(A, V), einsum(S, V, 'b h k n, b h n d -> b h k d'))


def test_ablation_orders_compose_as_documented():
    A, V = torch.randn(1, 2, 5, 5), torch.randn(1, 2, 5, 3)
    op = operator(N=5, rank=2, order='phi_W')
    S = karat.kan(einsum(A, op.W, 'b h i j, h j r -> b h i r'), op.basis, dict(op.phi),
                  op.config.grid)
    torch.testing.assert_close(op(A, V, return_attention=True), S)
    op = operator(N=5, rank=2, order='phi_phi')
    S = karat.kan(karat.kan(A, op.basis, dict(op.phi), op.config.grid), op.basis, dict(op.phi2),
                  op.config.grid)
    torch.testing.assert_close(op(A, V, return_attention=True), S)


def test_fourier_operator_is_2pi_periodic_in_the_logits():
    op = operator('fourier', N=7, rank=3)
    A, V = torch.randn(2, 2, 7, 7), torch.randn(2, 2, 7, 3)
    shift = 2 * math.pi * torch.randint(-3, 4, A.shape)
    torch.testing.assert_close(op(A, V), op(A + shift, V))


def test_simplex_projection_is_the_euclidean_projection():
    s = 3 * torch.randn(50, 9)
    p = karat.project_simplex(s)
    torch.testing.assert_close(p.sum(-1), torch.ones(50))
    assert (p >= 0).all()
    # p = relu(s - θ) with one θ per row ...
    theta = torch.where(p > 0, s - p, torch.nan).nanmean(-1, keepdim=True)
    torch.testing.assert_close(p, torch.relu(s - theta))
    # ... and no other point of the simplex is closer to s.
    other = torch.distributions.Dirichlet(torch.ones(9)).sample((50,))
    assert ((s - p).norm(dim=-1) <= (s - other).norm(dim=-1)).all()


def test_simplex_ablation_gives_probability_rows_that_ignore_masked_keys():
    op = operator(N=6, rank=3, simplex=True)
    A = torch.randn(1, 2, 6, 6)
    mask = torch.ones(1, 1, 1, 6)
    mask[..., 4:] = 0
    S = op(A, None, mask, return_attention=True)
    assert (S[..., 4:] == 0).all()
    torch.testing.assert_close(S.sum(-1), torch.ones(1, 2, 6))


# --- masking ------------------------------------------------------------------------------

@pytest.mark.parametrize('attn', karat.BASES)
@pytest.mark.parametrize('rank', [3, None])
@pytest.mark.parametrize('per_query', [False, True])
def test_masked_keys_contribute_exactly_zero(attn, rank, per_query):
    """Whatever a masked key's logit and value, the output does not change, and its weight is 0."""
    torch.manual_seed(0)
    attend = karat.attention_maker(attn, rank=rank)(2, 7)
    q, k, v = qkv()
    mask = torch.rand(2, 1, 7 if per_query else 1, 7) > 0.4
    mask[..., 0] = True
    out = attend(q, k, v, mask=mask)
    k2, v2 = k + 50 * torch.randn_like(k), v + 50 * torch.randn_like(v)
    # Only keys masked for every query may change; with a per-query mask, change the bias instead.
    hidden = ~mask.any(2, keepdim=True).transpose(-1, -2)
    bias = torch.where(mask, 0.0, 1e3 * torch.randn(2, 2, 7, 7))
    torch.testing.assert_close(out, attend(q, torch.where(hidden, k2, k),
                                           torch.where(hidden, v2, v), bias, mask))
    S = attend.activate(q, k, bias, mask)
    assert (S.masked_select(~mask.expand_as(S)) == 0).all()


def test_softmax_behind_the_same_interface():
    q, k, v = qkv()
    bias = torch.randn(2, 7, 7)
    mask = torch.rand(7, 7) > 0.3
    mask.fill_diagonal_(True)
    attend = karat.attention_maker('softmax')(2, 7)
    P = attend.activate(q, k, bias, mask)
    torch.testing.assert_close(attend(q, k, v, bias, mask), P @ v)
    A = q @ k.transpose(-1, -2) / 2 + bias
    torch.testing.assert_close(P, A.masked_fill(~mask, -torch.inf).softmax(-1))


# --- gradients ---------------------------------------------------------------------------

@pytest.mark.parametrize('attn', karat.BASES)
@pytest.mark.parametrize('base', ['zero', 'silu'])
def test_gradcheck_every_basis(attn, base):
    """float64 gradcheck of the PyTorch fast path (chunked, the logits recomputed in backward)
    through q, k, v and every parameter."""
    op = operator(attn, heads=1, N=4, rank=2, base=base)
    compute = fast.Computation(kernel='torch', chunk_elements=32)
    names = list(dict(op.named_parameters()))
    g = torch.Generator().manual_seed(3)
    q, k, V = (torch.randn(1, 1, 4, 2, generator=g, requires_grad=True) for _ in range(3))
    if attn == 'bspline':  # kinks at knots: logits q k^T / sqrt(2) away from them
        q = torch.tensor([[-2.7, 0.1], [-0.6, 0.3], [0.4, -0.2], [1.3, 0.2]])[None, None]
        k = torch.tensor([[1.4, 0.05], [1.0, -0.1], [1.2, 0.1], [1.1, 0.0]])[None, None]
        q, k = q.requires_grad_(), k.requires_grad_()

    def f(q, k, V, *params):
        return torch.func.functional_call(karat.KArAt(op, compute),
                                          {f'operator.{n}': p for n, p in zip(names, params)},
                                          (q, k, V))
    assert torch.autograd.gradcheck(f, (q, k, V,
                                        *[p.detach().requires_grad_() for p in op.parameters()]))


# --- sharing, models, errors ----------------------------------------------------------------

def vit(attn, mode, rank):
    torch.manual_seed(0)
    return models.create_model('vit_tiny', attn=attn, img_size=32, patch_size=4, num_classes=10,
                               depth=2, mode=mode, rank=rank)


def test_universal_mode_shares_one_operator_across_blocks():
    uni, blk = vit('fourier', 'universal', 12), vit('fourier', 'blockwise', 12)
    ops = [b.attn.attend.operator for b in uni.blocks]
    assert ops[0] is ops[1] and uni.blocks[0].attn.attend is not uni.blocks[1].attn.attend
    assert blk.blocks[0].attn.attend.operator is not blk.blocks[1].attn.attend.operator
    n_op = sum(p.numel() for p in ops[0].parameters())
    assert (sum(p.numel() for p in blk.parameters()) - sum(p.numel() for p in uni.parameters())
            == n_op)


@pytest.mark.parametrize('attn', karat.BASES)
@pytest.mark.parametrize('mode', karat.MODES)
@pytest.mark.parametrize('rank', [12, None])
def test_every_basis_trains_inside_a_vit(attn, mode, rank):
    torch.set_default_dtype(torch.float32)
    model = vit(attn, mode, rank)
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        if 'attend' in name:
            assert (p.grad is not None and torch.isfinite(p.grad).all()
                    and p.grad.abs().sum() > 0), name


@pytest.mark.parametrize('kwargs, message', [
    (dict(attn='fourrier'), "unknown attention 'fourrier'; allowed: softmax, fourier"),
    (dict(attn='fourier', grid=0), 'grid size G must be an integer >= 1'),
    (dict(attn='fourier', rank=0), 'rank r must be an integer >= 1'),
    (dict(attn='fourier', rank=None, order='phi_W'), "order 'phi_W' needs a low-rank operator"),
    (dict(attn='fourier', rnak=3), 'unknown attention option(s) rnak; allowed: attn, mode'),
    (dict(attn='fourier', mode='global'), "unknown mode 'global'; allowed: blockwise, universal"),
    (dict(attn='fourier', base='relu'), "unknown base activation 'relu'; allowed: zero, silu"),
    (dict(attn='fourier', order='WW'), "unknown operator order 'WW'"),
])
def test_bad_options_raise_value_errors_naming_the_allowed_values(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        karat.attention_maker(**kwargs)


@pytest.mark.parametrize('kwargs, message', [
    (dict(kernel='cuda'), "unknown kernel 'cuda'; allowed: auto, torch, triton"),
    (dict(chunk_elements=0), 'chunk_elements must be an integer >= 1'),
])
def test_bad_ways_of_computing_raise_value_errors_naming_the_allowed_values(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fast.Computation(**kwargs)
    with pytest.raises(ValueError, match=re.escape(message)):
        models.create_model('vit_tiny', attn='fourier', **kwargs)


def test_what_and_how_are_stated_once_and_apart():
    """Every option of a model's attention is either what it is (karat.AttentionConfig) or how
    it is computed (fast.Computation), never both; resume and pretrained loading compare the
    first alone."""
    what = {f.name for f in fields(karat.AttentionConfig)}
    assert what.isdisjoint(fast.HOW) and set(models.ATTENTION_OPTIONS) == (what - {'attn'}) | set(
        fast.HOW)
    assert set(weights.attention_of({})) == what


def test_rank_is_capped_at_n_wherever_the_operator_is_built():
    """One rule, r = min(r, N), for karat's operators and for models built from them."""
    op = karat.attention_maker('fourier')(heads=3, seq_len=10).operator  # default r = 12
    assert op.rank == 10 and op.W.shape == (3, 10, 10)
    assert karat.Operator('fourier', 3, 10, rank=4).rank == 4
    with pytest.warns(UserWarning, match='windows 4/4/2/1 per stage. A window of one token'):
        swin = models.create_model('swin_t', attn='fourier', img_size=32, num_classes=10)
    last = swin.stages[-1][-1].attn.attend.operator  # a 1 x 1 window at 32 px
    assert (last.seq_len, last.rank) == (1, 1)


def test_an_option_is_checked_once_from_the_cli_to_every_operator(monkeypatch):
    import cli
    import train
    checks = []
    post_init = karat.AttentionConfig.__post_init__
    monkeypatch.setattr(karat.AttentionConfig, '__post_init__',
                        lambda self: checks.append(self) or post_init(self))
    args = train.parse_args(['--attn', 'bspline', '--depth', '3', '--epochs', '1'])
    cli.build_model(cli.model_config(args, 10))
    assert len(checks) == 1 and checks[0].attn == 'bspline'


def test_inputs_that_do_not_fit_the_operator_are_refused():
    attend = karat.attention_maker('fourier', rank=3)(3, 7)
    q, k, v = qkv(h=3)
    for heads in (1, 4):
        with pytest.raises(ValueError, match=rf'operator has 3 heads and N = 7 keys, got shapes '
                                             rf'\(2, {heads}, 7, 4\)'):
            attend(*(t[:, :1].expand(-1, heads, -1, -1) for t in (q, k, v)))
    for shape in ((2, 2, 7, 7), (7, 6), (2, 1, 1, 1, 7)):
        with pytest.raises(ValueError, match=r'mask of shape .* does not broadcast to '
                                             r'\(b, h, i, j\)'):
            attend(q, k, v, mask=torch.ones(shape, dtype=torch.bool))
    with pytest.raises(ValueError, match=r'bias of shape \(3, 7, 6\) does not broadcast'):
        attend(q, k, v, bias=torch.zeros(3, 7, 6))


@pytest.mark.parametrize('attn', ['softmax', 'fourier'])
def test_a_numeric_mask_attends_where_it_is_nonzero_as_softmax_reads_it(attn):
    attend = karat.attention_maker(attn, rank=3)(2, 7)
    q, k, v = qkv()
    mask = torch.rand(2, 1, 1, 7) > 0.4
    mask[..., 0] = True
    torch.testing.assert_close(attend(q, k, v, mask=2 * mask.long()), attend(q, k, v, mask=mask))


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('compute', [karat.definition, fast.Computation(),
                                     fast.Computation(efficient=False)],
                         ids=['definition', 'fast', 'naive'])
def test_half_precision_inputs_work_outside_autocast_as_with_softmax(dtype, compute):
    """The operator meets 16-bit q, k, v in their dtype; the result is the float32 one rounded."""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    attend = karat.attention_maker('fourier', rank=3, compute=compute)(2, 7)
    q, k, v = (t.float() for t in qkv())
    out = attend(*(t.to(dtype) for t in (q, k, v)))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), attend(q, k, v), rtol=0.05, atol=0.05)


def test_mismatched_shapes_are_refused():
    attend = karat.attention_maker('fourier', rank=3)(2, 7)
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r'has 2 heads and N = 7 keys, got shapes \(2, 2, 5, 4\)'):
        attend(q[:, :, :5], k[:, :, :5], v[:, :, :5])
    with pytest.raises(ValueError, match=r'and agree, got shapes .*\(2, 1, 7, 4\)'):
        attend(q, k, v[:, :1])
    with pytest.raises(ValueError, match=r'\(batch, heads, tokens, dim\) and agree, '
                                         r'got shapes \(2,'):
        attend(q[0], k[0], v[0])


def test_capture_attention_records_the_matrix_each_block_applies():
    torch.set_default_dtype(torch.float32)
    model = vit('fourier', 'universal', 12)
    seen = {}
    hooks = [b.attn.attend.register_forward_hook(
                 lambda m, args, out, i=i: seen.__setitem__(i, (args[2], out)))
             for i, b in enumerate(model.blocks)]
    with models.capture_attention(model) as maps:
        model(torch.randn(2, 3, 32, 32))
    assert list(maps) == ['blocks.0.attn.attend', 'blocks.1.attn.attend']
    for i, (v, out) in seen.items():
        torch.testing.assert_close(maps[f'blocks.{i}.attn.attend'] @ v, out, atol=1e-5, rtol=1e-4)
