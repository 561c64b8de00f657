"""Compile every fused kernel for the GPUs users have, on a machine without one.

Triton's compiler emits PTX for a target named by hand (GPUTarget('cuda', 90, 32)); the ptxas
bundled with Triton assembles it and reports registers and spills. The launches are the real
ones: the ops of kernels.py are called on CPU tensors with `wrap_triton` replaced by a
recorder, so the signature, constexprs and block configs are exactly what a GPU run compiles.

    python tests/compile_kernels.py [--arch 90 80] [--quick]   # a table, one row a kernel

Columns: registers, spilled bytes and shared memory (bytes) from ptxas and Triton, then counts
of PTX instructions: wgmma.mma_async, mma.sync, sin/cos.approx, libdevice's __nv_sinf/__nv_cosf
(inlined or called), and atomic adds (atom/red).

Must run without TRITON_INTERPRET (the interpreter replaces the kernels it compiles).
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import karat  # noqa: E402
import kernels  # noqa: E402

PTXAS = Path(kernels.triton.backends.nvidia.__file__).parent / 'bin' / 'ptxas'
TYPES = {torch.bfloat16: 'bf16', torch.float16: 'fp16', torch.float32: 'fp32'}


def record(call):
    """The (kernel, args, constexprs) launches that `call` makes, without running them."""
    launches = []

    def recorder(kernel):
        return type('Grid', (), {'__getitem__': lambda self, grid: lambda *a, **kw: launches.append(
            (kernel, a, kw))})()
    saved, kernels.wrap_triton = kernels.wrap_triton, recorder
    try:
        call()
    finally:
        kernels.wrap_triton = saved
    return launches


def specializations(quick=False):
    """(name, launches) for what the models run at ViT-Tiny's shape (N = 197, d = 64, r = 12):
    every basis low-rank in bf16, Fourier also with Swin's bias and mask, in float32, at full
    rank (e = d = 64) and as the per-query mask's second pass."""
    B, H, N, d, r = 2, 3, 197, 64, 12
    t = lambda *shape, dtype=torch.bfloat16: torch.zeros(*shape, dtype=dtype)
    bias, key_mask, query_mask = t(1, H, N, N, dtype=torch.float32), t(B, 1, 1, N), t(B, 1, N, N)

    def expansion(basis, dtype=torch.bfloat16, e=r, bias=None, mask=None, base='zero', k=None):
        q = t(B, H, N, d if basis != 'linear' else r, dtype=dtype)
        k = q[:1] if k is None else k
        maps = (1 if basis == 'linear' else karat.BASES[basis].size(3)) + (base != 'zero')
        X = t(1 if e == r else B, H, maps, N, e, dtype=dtype)
        args = (q, k, bias, mask, X, 0.125, kernels.EXPANSIONS[basis], 3, kernels.ACTIVATIONS[base],
                -4.0, 4.0)
        return record(lambda: (kernels.expansion(*args), kernels.expansion_backward(
            t(B, H, N, e, dtype=dtype), *args, bias is not None)))

    def units(unit, bias=None, mask=key_mask, backward=True):
        q, P = t(B, H, N, d), t(H, 10 if unit == 'rational' else 3, r, N, dtype=torch.float32)
        args = (q, q[:1], bias, mask, P, kernels.UNITS[unit], 0.125)
        return record(lambda: (kernels.units(*args), backward and kernels.units_backward(
            t(B, H, N, r), *args, bias is not None)))
    specs = {'fourier bf16': expansion('fourier'),
             'fourier bf16 bias+mask': expansion('fourier', bias=bias, mask=query_mask),
             'fourier fp32': expansion('fourier', dtype=torch.float32),
             'rational bf16 bias+mask': units('rational', bias=bias, mask=query_mask)}
    if quick:  # and Shannon's forward, whose sin(x)/x keeps libdevice's sin: the count sees it
        return {**specs, 'shannon bf16 forward': units('shannon', backward=False)}
    specs.update({
        'fourier bf16 full rank, key mask': expansion('fourier', e=d, mask=key_mask),
        'bspline bf16': expansion('bspline'),
        'chebyshev bf16 silu': expansion('chebyshev', base='silu'),
        'gaussian bf16': expansion('gaussian'),
        'second pass bf16': expansion('linear', e=d, mask=query_mask, k=t(1, H, N, r)),
        **{f'{u} bf16': units(u) for u in kernels.UNITS}})
    return specs


def signature(kernel, args, constexprs):
    sig = {}
    for name, value in zip(kernel.fn.arg_names, args):
        if isinstance(value, torch.Tensor):
            sig[name] = '*' + TYPES[value.dtype]
        else:
            sig[name] = 'fp32' if isinstance(value, float) else 'i32'
    return {**sig, **{name: 'constexpr' for name in constexprs}}


def compile_one(job):
    """What ptxas and the PTX say of one kernel, config and arch: registers, spilled bytes,
    shared memory, and counts of instructions: wgmma (Hopper's warpgroup MMA), mma.sync,
    sin.approx + cos.approx, libdevice's __nv_sinf/__nv_cosf (Triton inlines them: each
    leaves a `__nv_sinf.exit` label, or a call where not inlined), atom (atomic adds)."""
    name, args, kw, config, arch = job
    kernel = getattr(kernels, name)
    constexprs = {**kw, **config.kwargs}
    src = ASTSource(fn=kernel.fn, signature=signature(kernel, args, constexprs),
                    constexprs=constexprs)
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    if config.maxnreg:
        options['maxnreg'] = config.maxnreg
    compiled = triton.compile(src, target=GPUTarget('cuda', arch, 32), options=options)
    ptx = compiled.asm['ptx']
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / 'kernel.ptx'
        path.write_text(ptx)
        gpu = f'sm_{arch}a' if arch >= 90 else f'sm_{arch}'
        out = subprocess.run([str(PTXAS), '-v', f'--gpu-name={gpu}', str(path), '-o', os.devnull],
                             capture_output=True, text=True, check=True).stderr
    return dict(registers=int(re.search(r'Used (\d+) registers', out).group(1)),
                spilled=sum(int(n) for n in re.findall(r'(\d+) bytes spill', out)),
                shared=compiled.metadata.shared,
                wgmma=len(re.findall(r'^\s*wgmma\.mma_async', ptx, re.M)),
                mma=len(re.findall(r'^\s*mma\.sync', ptx, re.M)),
                approx=len(re.findall(r'^\s*(?:sin|cos)\.approx', ptx, re.M)),
                libdevice=len(re.findall(r'__nv_(?:sin|cos)f\b', ptx)),
                atom=len(re.findall(r'^\s*(?:@%p\d+ )?(?:atom|red)\.', ptx, re.M)))


def configs_of(kernel, args, constexprs, arch):
    """The configs autotune would try for this launch on sm_`arch`: kernels.candidates."""
    return kernels.candidates(kernel.configs, dict(zip(kernel.fn.arg_names, args)), arch,
                              **constexprs)


def jobs(archs, quick=False):
    for spec, launches in specializations(quick).items():
        for kernel, args, kw in launches:
            for arch in archs:
                for config in configs_of(kernel, args, kw, arch):
                    yield spec, (kernel.fn.__name__, args, kw, config, arch)


def report(archs=(90, 80), quick=False, workers=2):
    """One row a compiled kernel: spec, kernel, config, arch and compile_one's figures."""
    todo = list(jobs(archs, quick))
    with ProcessPoolExecutor(workers) as pool:
        results = pool.map(compile_one, [job for _, job in todo])
        return [dict(spec=spec, kernel=job[0], config=describe(job[3]), sm=job[4], **result)
                for (spec, job), result in zip(todo, results)]


def describe(config):
    """BLOCK_M x BLOCK_N, warps, stages (and maps per pass, where the kernel has the choice)."""
    c = config.kwargs
    maps = f", maps/pass {c['MAPS_PER_PASS'] or 'all'}" if 'MAPS_PER_PASS' in c else ''
    return f"{c['BLOCK_M']}x{c['BLOCK_N']}, w{config.num_warps}, s{config.num_stages}{maps}"


COLUMNS = ('spec', 'kernel', 'config', 'sm', 'registers', 'spilled', 'shared', 'wgmma', 'mma',
           'approx', 'libdevice', 'atom')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--arch', type=int, nargs='+', default=[90, 80])
    parser.add_argument('--quick', action='store_true',
                        help='Fourier (bf16, fp32, Swin) and rational with Swin only')
    args = parser.parse_args()
    print(' | '.join(COLUMNS))
    for row in report(args.arch, args.quick):
        print(' | '.join(str(row[c]) for c in COLUMNS), flush=True)


if __name__ == '__main__':
    main()
