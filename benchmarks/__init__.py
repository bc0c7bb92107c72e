"""Throughput harnesses and their committed results (``benchmarks/README.md``).

Importing the package sets one environment default, before any benchmark imports jax:
``XLA_PYTHON_CLIENT_PREALLOCATE=false``, so JAX takes GPU memory as it needs it instead of 75 %
up front and the PyTorch side of a comparison can run on the same GPU in the same process.
"""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
