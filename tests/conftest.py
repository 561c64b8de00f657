"""Set before the test modules are collected, so before anything imports torch or Triton:

- Triton's interpreter runs the fused kernels on CPU tensors;
- under pytest-xdist (`-n auto`, the README's command), each worker, and every process it starts,
  takes its share of the cores as torch threads: two workers of two threads on two cores slow
  each other many times over, while one thread each runs the suite's small tensors about as
  fast."""
import os

os.environ.setdefault('TRITON_INTERPRET', '1')
workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', 1))
if workers > 1:
    os.environ['OMP_NUM_THREADS'] = str(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(items):
    """The notebooks first: each runs a minute or more, so the workers start on them and share
    the many short tests after, instead of one worker running notebooks alone at the end."""
    items.sort(key=lambda item: 'test_notebook_runs' not in item.nodeid)
