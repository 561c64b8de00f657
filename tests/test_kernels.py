"""The fast paths equal karat.py's definition: the PyTorch path (kernel='torch') and the fused
Triton kernels (kernel='triton', run by Triton's interpreter on CPU tensors; see conftest.py),
forward and every gradient, for every basis, low rank and full, with Swin's bias and shift
mask and with a padding mask, at sequence lengths that are not multiples of a block. Neither
keeps anything N x N for backward, and every kernel compiles for sm_80 and sm_90."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fast
import karat
import models

ROOT = Path(__file__).resolve().parents[1]
PATHS = ['torch', 'triton']
NAIVE = fast.Computation(efficient=False)


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def inputs(N, masking, b=2, h=2, d=4, seed=1):
    """q, k, v, bias and mask as the models give them: none; ViTDet's padding (a key mask);
    Swin's relative position bias and shift mask (per query, several windows per image)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = [torch.randn(b, h, N, d, generator=g, requires_grad=True) for _ in range(3)]
    bias = mask = None
    if masking == 'padding':
        mask = torch.arange(N) < N - N // 3
        mask = mask.expand(b, 1, 1, N)
    elif masking == 'shift':
        bias = torch.randn(h, N, N, generator=g).requires_grad_()
        region = torch.randint(0, 3, (b, N), generator=g)
        mask = (region[:, None, :, None] == region[:, None, None, :])
    return q, k, v, bias, mask


def outputs_and_grads(attend, q, k, v, bias, mask):
    out = attend(q, k, v, bias, mask)
    leaves = [t for t in (q, k, v, bias) if t is not None] + list(attend.parameters())
    g = torch.Generator().manual_seed(2)
    return [out, *torch.autograd.grad(out, leaves, torch.randn(out.shape, generator=g))]


def fast_and_naive(attn, kernel, N, masking, chunk=64, **options):
    """The PyTorch path in chunks of `chunk` values (one row or a few), to test the chunking;
    the kernels take whole rows. Against the naive formula, σ̂(A) V with σ̂ built."""
    torch.manual_seed(0)
    op, data = karat.Operator(attn, 2, N, **options), inputs(N, masking)
    fast_path = fast.Computation(kernel=kernel, chunk_elements=chunk if kernel == 'torch' else None)
    return [outputs_and_grads(karat.KArAt(op, compute), *data)
            for compute in (fast_path, NAIVE)]


@pytest.mark.parametrize('kernel', PATHS)
@pytest.mark.parametrize('attn', karat.BASES)
@pytest.mark.parametrize('rank', [3, None])
@pytest.mark.parametrize('masking', ['none', 'padding', 'shift'])
def test_fast_path_equals_the_definition(kernel, attn, rank, masking):
    """Output and the gradients of q, k, v, the bias and every parameter, float64, N = 17."""
    fast, naive = fast_and_naive(attn, kernel, 17, masking, rank=rank)
    for ours, reference in zip(fast, naive):
        torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('kernel', PATHS)
@pytest.mark.parametrize('attn, N, masking', [
    ('fourier', 49, 'shift'), ('rational', 49, 'shift'), ('bspline', 65, 'padding'),
    ('morlet', 65, 'padding')])
def test_fast_path_at_model_lengths(kernel, attn, N, masking):
    """Swin's windows (N = 49) and ViT-Tiny at 32 px (N = 65): several ragged blocks."""
    fast, naive = fast_and_naive(attn, kernel, N, masking, chunk=2 ** 12, rank=12)
    for ours, reference in zip(fast, naive):
        torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('kernel', PATHS)
@pytest.mark.parametrize('attn', ['fourier', 'chebyshev', 'mexican_hat'])
@pytest.mark.parametrize('base', ['silu', 'identity', 'gelu'])
def test_fast_path_with_a_base_activation(kernel, attn, base):
    fast, naive = fast_and_naive(attn, kernel, 17, 'padding', rank=3, base=base)
    for ours, reference in zip(fast, naive):
        torch.testing.assert_close(ours, reference, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('kernel', PATHS)
@pytest.mark.parametrize('attn', ['fourier', 'bspline', 'rational'])
@pytest.mark.parametrize('rank', [12, None])
def test_fast_path_under_bf16_autocast(kernel, attn, rank):
    """`--amp`: with bf16 inputs under autocast, the output and every gradient are as close to the
    float64 definition as the definition itself computed under bf16 autocast, or within 3%. Low
    rank in a Swin window (N = 49), full rank at N = 17: the interpreter's time grows as N³
    there."""
    torch.manual_seed(0)
    N = 49 if rank else 17
    op = karat.Operator(attn, 2, N, rank=rank)
    data = inputs(N, 'shift' if rank else 'padding')
    exact = outputs_and_grads(karat.KArAt(op, NAIVE), *data)
    q, k, v, bias, mask = [t if t is None else t.detach() for t in data]
    low = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    low += [bias if bias is None else bias.float().requires_grad_(), mask]
    errors = {}
    op.float()
    for name, compute in (('fast', fast.Computation(kernel=kernel)), ('naive', NAIVE)):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            results = outputs_and_grads(karat.KArAt(op, compute), *low)
        errors[name] = [(r.double() - e).norm() / e.norm() for r, e in zip(results, exact)]
    for ours, definition in zip(errors['fast'], errors['naive']):
        assert ours <= max(0.03, 2 * definition)


@pytest.mark.parametrize('kernel', PATHS)
@pytest.mark.parametrize('mode', karat.MODES)
def test_a_vit_with_the_fast_path_equals_the_naive_vit(kernel, mode):
    """Blockwise and universal operators inside a model: the loss and every gradient."""
    grads = []
    for options in (dict(kernel=kernel), dict(efficient=False)):
        torch.manual_seed(0)
        model = models.create_model('vit_tiny', attn='fourier', img_size=16, patch_size=4,
                                    num_classes=3, depth=2, embed_dim=16, num_heads=2, mode=mode,
                                    **options)
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        loss = model(x).logsumexp(-1).sum()
        grads.append([loss, *torch.autograd.grad(loss, list(model.parameters()))])
    for ours, naive in zip(*grads):
        torch.testing.assert_close(ours, naive, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('kernel', PATHS)
def test_a_swin_with_the_fast_path_equals_the_naive_swin(kernel):
    """Shifted windows: the relative position bias gets its gradient through the fused path."""
    grads = []
    for options in (dict(kernel=kernel), dict(efficient=False)):
        torch.manual_seed(0)
        model = models.create_model('swin_t', attn='fourier', img_size=56, num_classes=3,
                                    embed_dim=8, depth=(2,), num_heads=(2,), **options)
        x = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(1))
        loss = model(x).logsumexp(-1).sum()
        grads.append([loss, *torch.autograd.grad(loss, list(model.parameters()))])
    bias_table = [n for n, _ in model.named_parameters()].index(
        'stages.0.0.attn.relative_position_bias_table')
    assert grads[0][1 + bias_table].abs().sum() > 0
    for ours, naive in zip(*grads):
        torch.testing.assert_close(ours, naive, rtol=1e-9, atol=1e-9)


def saved_sizes(fn):
    """The element count of every tensor autograd saves while fn runs."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


@pytest.mark.parametrize('kernel', PATHS + ['naive'])
@pytest.mark.parametrize('attn, rank, masking', [
    ('fourier', 12, 'padding'), ('fourier', None, 'padding'), ('fourier', 12, 'shift'),
    ('rational', 12, 'none')])
def test_nothing_n_by_n_is_saved_for_backward(kernel, attn, rank, masking):
    """No saved tensor holds N x N elements per (batch, head); the naive formula does (the logits
    A), which shows the check can fail."""
    N, b, h = 49, 8, 2
    op = karat.Operator(attn, h, N, rank=rank)
    compute = NAIVE if kernel == 'naive' else fast.Computation(kernel=kernel)
    q, k, v, bias, mask = inputs(N, masking, b=b, h=h)
    largest = max(saved_sizes(lambda: karat.KArAt(op, compute)(q, k, v, bias, mask)))
    if kernel == 'naive':
        assert largest >= b * h * N * N
    else:
        assert largest < b * h * N * N


def test_triton_kernel_is_refused_where_it_cannot_run(monkeypatch):
    import kernels
    monkeypatch.setattr(kernels, 'INTERPRET', False)
    triton = fast.Computation(kernel='triton')
    attend = karat.attention_maker('fourier', rank=3, compute=triton)(2, 7)
    q, k, v, _, _ = inputs(7, 'none')
    with pytest.raises(ValueError, match=r"kernel='triton' runs on a CUDA GPU .*on cpu"):
        attend(q, k, v)


def test_the_fused_ops_pass_torch_librarys_checks():
    """Schema and autograd registration of the ops that torch.compile keeps whole. (Tracing them
    with fake tensors runs Triton, not its interpreter: tests/test_gpu.py compiles a model.)"""
    import kernels
    q, k, v, bias, mask = inputs(17, 'shift', d=16)
    bias, mask = bias[None], mask.double()
    X = torch.randn(1, 2, 2, 17, 5, requires_grad=True)
    torch.library.opcheck(kernels.expansion, (q, k, bias, mask, X, 0.25, 0, 1, 0, -4.0, 4.0),
                          test_utils=('test_schema', 'test_autograd_registration'))
    P = torch.stack([torch.randn(2, 5, 17), torch.zeros(2, 5, 17), torch.ones(2, 5, 17)], 1)
    torch.library.opcheck(kernels.units, (q, k, bias, mask, P.requires_grad_(), 1, 0.25),
                          test_utils=('test_schema', 'test_autograd_registration'))


def tuners():
    import kernels
    return {name: getattr(kernels, name) for name in dir(kernels) if name.endswith('_kernel')}


def interpreted_forms(tuner):
    """The candidates that differ where the interpreter runs them: block sizes and maps per
    pass (warps and stages change nothing there)."""
    forms = {}
    for config in tuner.candidates:
        forms.setdefault(tuple(sorted(config.kwargs.items())), config)
    return list(forms.values())


@pytest.mark.parametrize('form', range(4))  # the longest list has four
@pytest.mark.parametrize('attn', ['fourier', 'rational'])
def test_every_autotune_candidate_equals_the_definition(monkeypatch, attn, form):
    """Autotune picks one config on the GPU, so each candidate of every kernel is forced in
    turn (the form-th of each list): Swin's bias and shift mask over 3 windows, N = 33 in
    ragged blocks. A program sums the bias gradient of kernels.WINDOWS windows, 2 here, so that
    one program sums two and another the one left: the same code as with 16 and 17 windows, at
    a sixth of the interpreter's work (the Swin model test runs WINDOWS = 16, over 4 windows)."""
    import kernels
    monkeypatch.setattr(kernels, 'WINDOWS', 2)
    for tuner in tuners().values():
        forms = interpreted_forms(tuner)
        monkeypatch.setattr(tuner, 'configs', [forms[form % len(forms)]])
    torch.manual_seed(0)
    op, data = karat.Operator(attn, 1, 33, rank=3), inputs(33, 'shift', b=3, h=1)
    ours, naive = [outputs_and_grads(karat.KArAt(op, compute), *data)
                   for compute in (fast.Computation(kernel='triton'), NAIVE)]
    for a, b in zip(ours, naive):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def compiled_rows(*options):
    env = {k: v for k, v in os.environ.items() if k != 'TRITON_INTERPRET'}
    run = subprocess.run([sys.executable, str(ROOT / 'tests' / 'compile_kernels.py'), *options],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    header, *lines = run.stdout.splitlines()
    names = header.split(' | ')
    return [dict(zip(names, line.split(' | '))) for line in lines]


def test_every_kernel_compiles_for_sm80_and_sm90_without_spills():
    """Triton's compiler and ptxas, no GPU: `compile_kernels.py --quick` (Fourier in bf16, with
    Swin's bias and in float32, rational with Swin's bias: every kernel and path), each autotune
    candidate, for Ampere and Hopper; the full table, every family, is run by hand. The
    interpreter alone cannot catch what only the GPU compiler refuses (tile shapes, dtypes of
    tl.dot, registers). On sm_90 the Fourier bf16 kernels each have a candidate on Hopper's
    wgmma; no kernel takes libdevice's sinf/cosf (the hardware's sin.approx/cos.approx instead)
    but Shannon's sin(x)/x, compiled to show that the count finds it; and the key pass of
    backward, with all maps at once, holds at most twice the forward's trig instructions per
    logit (it built S once per map before: 3x)."""
    rows = compiled_rows('--quick')
    spilled = [row for row in rows if int(row['spilled']) > 0]
    assert not spilled, spilled
    assert {(row['kernel'], row['sm']) for row in rows} == {
        (name, sm) for name in tuners() for sm in ('90', '80')}
    hopper = [row for row in rows if row['sm'] == '90']
    fourier = [row for row in hopper if row['spec'].startswith('fourier bf16')]
    assert {row['kernel'] for row in fourier if int(row['wgmma']) > 0} == {
        'expansion_fwd_kernel', 'expansion_bwd_kx_kernel', 'expansion_bwd_q_kernel'}
    libdevice = {row['spec'] for row in hopper if int(row['libdevice']) > 0}
    assert libdevice == {'shannon bf16 forward'}  # its sin(x)/x alone keeps libdevice's sin
    per_logit = {kernel: [trig_per_logit(row) for row in fourier if row['kernel'] == kernel
                          and 'maps/pass 1' not in row['config']]
                 for kernel in ('expansion_fwd_kernel', 'expansion_bwd_kx_kernel')}
    assert 0 < max(per_logit['expansion_bwd_kx_kernel']) <= 2 * min(
        per_logit['expansion_fwd_kernel'])


def trig_per_logit(row):
    """sin/cos.approx instructions in the PTX per logit a thread holds ('32x64, w8, ...')."""
    block_m, block_n = map(int, row['config'].split(',')[0].split('x'))
    warps = int(row['config'].split(', w')[1].split(',')[0])
    return int(row['approx']) / (block_m * block_n / (32 * warps))
