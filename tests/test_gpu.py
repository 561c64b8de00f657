"""On a CUDA GPU (skipped elsewhere): the fused kernels, compiled for the device, equal karat.py's
definition at the models' shapes, in float32 and under bf16 autocast, and torch.compile and CUDA
graphs keep each fused op whole. `python bench.py --gpu` runs this file and every benchmark row."""
import pytest
import torch

import fast
import karat
import models
from test_kernels import NAIVE, inputs

TRITON = fast.Computation(kernel='triton')

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 would round the naive formula's matmuls, not the kernels' alone."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def run(attend, data, dtype=torch.float32, amp=False):
    q, k, v, bias, mask = [t if t is None else t.detach().cuda() for t in data]
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    bias = bias if bias is None else bias.float().requires_grad_()
    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=amp):
        out = attend(*leaves, bias, mask)
    grad = torch.randn(out.shape, device='cuda', generator=torch.Generator('cuda').manual_seed(2))
    params = [t for t in [bias] if t is not None] + list(attend.parameters())
    return [out, *torch.autograd.grad(out, leaves + params, grad.to(out.dtype))]


@pytest.mark.parametrize('attn', karat.BASES)
@pytest.mark.parametrize('rank', [12, None])
@pytest.mark.parametrize('N, masking', [(197, 'none'), (197, 'padding'), (49, 'shift')])
def test_triton_on_the_gpu_equals_the_definition(attn, rank, N, masking):
    torch.manual_seed(0)
    op = karat.Operator(attn, 3, N, rank=rank).cuda().float()
    data = inputs(N, masking, b=4, h=3, d=64)
    fused = run(karat.KArAt(op, TRITON), data)
    naive = run(karat.KArAt(op.double(), NAIVE), [t if t is None or t.dtype == torch.bool
                                                  else t.double() for t in data],
                dtype=torch.float64)
    for ours, exact in zip(fused, naive):
        assert (ours.double() - exact).norm() <= 1e-4 * exact.norm() + 1e-6


@pytest.mark.parametrize('attn', ['fourier', 'bspline', 'rational', 'morlet'])
def test_triton_under_bf16_autocast(attn):
    torch.manual_seed(0)
    op = karat.Operator(attn, 3, 197, rank=12).cuda()
    data = inputs(197, 'padding', b=4, h=3, d=64)
    fused = run(karat.KArAt(op, TRITON), data, torch.bfloat16, amp=True)
    exact = run(karat.KArAt(op.double(), NAIVE), [t if t is None or t.dtype == torch.bool
                                                  else t.double() for t in data],
                dtype=torch.float64)
    for ours, reference in zip(fused, exact):
        assert (ours.double() - reference).norm() <= 0.03 * reference.norm()


@pytest.mark.parametrize('mode', [None, 'reduce-overhead'])
def test_torch_compile_and_cuda_graphs_keep_the_fused_op(mode):
    """fullgraph: no graph break around the op; 'reduce-overhead' replays it in a CUDA graph."""
    torch.manual_seed(0)
    model = models.create_model('vit_tiny', attn='fourier', img_size=32, patch_size=4,
                                num_classes=10, kernel='triton').cuda()
    x = torch.randn(8, 3, 32, 32, device='cuda')
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, mode=mode)
    for _ in range(3):
        out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
