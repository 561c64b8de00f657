"""Set before the test modules are collected, so before anything imports torch or Triton:

- Triton's interpreter runs the fused kernels on CPU tensors;
- under pytest-xdist (the README's `-n auto --dist worksteal`), each worker, and every process
  it starts, takes its share of the cores as torch threads: two workers of two threads on two
  cores slow each other many times over, while one thread each runs the suite's small tensors
  about as fast."""
import os

os.environ.setdefault('TRITON_INTERPRET', '1')
workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', 1))
if workers > 1:
    os.environ['OMP_NUM_THREADS'] = str(max(1, (os.cpu_count() or 1) // workers))


# The tests that run for tens of seconds (training runs, subprocesses, the compiler) go first, so
# that the many short tests fill in at the end (--dist worksteal hands a worker that runs out the
# other's tests not yet started), instead of one worker running a notebook alone.
LONG = ('test_notebooks.py::test_notebook_runs', 'test_kernels.py::test_every_kernel_compiles',
        'test_detection.py', 'test_paper.py', 'test_train.py', 'test_cli.py')


def pytest_collection_modifyitems(items):
    def rank(item):
        return next((i for i, prefix in enumerate(LONG) if prefix in item.nodeid), len(LONG))
    items.sort(key=rank)
