"""protomask_jax: ProtoMask (segmentation-guided prototype learning) in JAX/Flax.

Importing the package imports neither jax nor torch; submodules import what they need.
"""

import glob as _glob
import importlib.util as _importlib_util
import os as _os

__version__ = "0.1.0"

_GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")


def _cpu_unless_an_accelerator_is_there() -> None:
    """With libtpu installed (the dev extra's TPU compiler, for ``benchmarks/aot.py``), jax
    probes for a TPU when it starts and, on a machine without one, prints a page of
    metadata-server errors before every command falls back to the CPU. Where no TPU device
    file exists (a TPU VM has /dev/accel* or /dev/vfio/*) and no GPU plugin is installed,
    jax is told CPU up front; an explicit ``JAX_PLATFORMS`` always wins."""
    if "JAX_PLATFORMS" in _os.environ or _importlib_util.find_spec("libtpu") is None:
        return
    if _glob.glob("/dev/accel*") or _glob.glob("/dev/vfio/[0-9]*"):
        return
    if any(_importlib_util.find_spec(name) is not None for name in _GPU_PLUGINS):
        return
    _os.environ["JAX_PLATFORMS"] = "cpu"


_cpu_unless_an_accelerator_is_there()
