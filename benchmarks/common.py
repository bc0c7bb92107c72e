"""Shared pieces of the benchmark scripts: config, timing, environment facts, output files.

Nothing here imports torch; jax is imported by the functions that need it, so that a script
can set ``XLA_PYTHON_CLIENT_PREALLOCATE`` (and friends) before jax initialises.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s, from the vendors' data sheets.
# Matched against the device name in this order (first hit wins).
DEVICE_PEAK_BF16_FLOPS = (
    ("H200", 989.4e12, "NVIDIA H200 data sheet: 1,979 TFLOP/s bf16 with sparsity, 989 dense"),
    ("H100 PCIe", 756.0e12, "NVIDIA H100 PCIe data sheet: 1,513 with sparsity, 756 dense"),
    ("H100 NVL", 835.0e12, "NVIDIA H100 NVL data sheet: 1,671 per GPU with sparsity, 835 dense"),
    ("H100", 989.4e12, "NVIDIA H100 SXM data sheet: 1,979 TFLOP/s bf16 with sparsity, 989 dense"),
    ("A100", 312.0e12, "NVIDIA A100 data sheet: 312 TFLOP/s bf16 dense"),
)


# --------------------------------------------------------------------------- config


class _AttrDict(dict):
    """The part of ``ml_collections.ConfigDict`` that ``configs/common.py`` and the library
    use: attribute access, ``to_dict``, ``lock``/``unlock`` (locking is not enforced)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def to_dict(self) -> dict[str, Any]:
        return {k: v.to_dict() if isinstance(v, _AttrDict) else v for k, v in self.items()}

    def lock(self) -> _AttrDict:
        return self

    def unlock(self) -> _AttrDict:
        return self


_ABSENT = object()


def base_config() -> Any:
    """``configs/common.py``'s base config (unlocked).

    Without ml_collections (the GPU machine lacks it) the same file is executed with a
    minimal stand-in for ``ml_collections.ConfigDict`` that exists only while the file runs,
    so the benchmark reads every default from the one place the project defines them.
    """
    try:
        import ml_collections  # noqa: F401
    except ImportError:
        pass
    else:
        from configs import common

        return common.get_base_config()
    stand_in = types.ModuleType("ml_collections")
    stand_in.ConfigDict = lambda initial=None: _AttrDict(initial or {})
    spec = importlib.util.spec_from_file_location(
        "_benchmark_configs_common", REPO_ROOT / "configs" / "common.py"
    )
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get("ml_collections", _ABSENT)
    sys.modules["ml_collections"] = stand_in
    try:
        spec.loader.exec_module(module)
    finally:
        if previous is _ABSENT:
            del sys.modules["ml_collections"]
        else:
            sys.modules["ml_collections"] = previous
    return module.get_base_config()


def parts_world_config(folder: Path, image_size: int, images_per_class: int) -> Any:
    """The base config set to an 8-class parts world generated under ``folder`` (one test
    image per class): the data of the host-side benchmarks (export, input pipeline)."""
    config = base_config()
    config.dataset.name = "parts_world"
    config.dataset.root = str(folder / "parts_world")
    config.dataset.num_classes = 8
    config.dataset.synthetic.num_classes = 8
    config.dataset.synthetic.image_size = image_size
    config.dataset.synthetic.train_per_class = images_per_class
    config.dataset.synthetic.test_per_class = 1
    return config


# --------------------------------------------------------------------------- timing


def percentiles(seconds: list[float]) -> dict[str, float]:
    """Median, p10, p90, mean, min of a list of durations (seconds)."""
    values = np.asarray(seconds, np.float64)
    return {
        "median": float(np.median(values)),
        "p10": float(np.percentile(values, 10)),
        "p90": float(np.percentile(values, 90)),
        "mean": float(values.mean()),
        "min": float(values.min()),
        "count": int(values.size),
    }


def time_steps(
    run_step: Callable[[int], Any], synchronize: Callable[[Any], None], warmup: int, steps: int
) -> dict[str, Any]:
    """Times a step function two ways after ``warmup`` untimed calls.

    ``per_step``: each call followed by ``synchronize`` (the distribution the README
    reports: median, p10, p90). ``back_to_back``: ``steps`` calls with one synchronisation
    at the end (host dispatch overlapped with device work, as in a real training loop).

    Args:
      run_step: ``run_step(i)`` launches step i and returns something to synchronise on.
      synchronize: waits until the value's device work is done.
      warmup: untimed calls first.
      steps: timed calls per method.

    Returns:
      ``{"per_step": percentiles, "back_to_back_mean": seconds, "host_steal_fraction":
      share of CPU time stolen by the hypervisor while timing (or None),
      "process_cpu_s_per_step": this process's CPU seconds per synchronised step,
      "host_load_1min": the load average after timing}``. On a CPU backend, a load above
      the core count means other processes competed for the cores during the timing.
    """
    for i in range(warmup):
        synchronize(run_step(i))
    stolen_before = _cpu_jiffies()
    cpu_before = time.process_time()
    per_step = []
    for i in range(steps):
        start = time.perf_counter()
        synchronize(run_step(warmup + i))
        per_step.append(time.perf_counter() - start)
    cpu_per_step = (time.process_time() - cpu_before) / steps
    start = time.perf_counter()
    out = None
    for i in range(steps):
        out = run_step(warmup + steps + i)
    synchronize(out)
    back_to_back = (time.perf_counter() - start) / steps
    return {
        "per_step": percentiles(per_step),
        "back_to_back_mean": back_to_back,
        "host_steal_fraction": _steal_fraction(stolen_before, _cpu_jiffies()),
        "process_cpu_s_per_step": cpu_per_step,
        "host_load_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _cpu_jiffies() -> tuple[int, int] | None:
    """``(steal, total)`` jiffies of all CPUs from /proc/stat (None where there is none)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal [guest guest_nice, already in user]
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def _steal_fraction(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """Share of the host's CPU time taken by the hypervisor for other guests in between: on
    a shared virtual machine, a large value means the timings are inflated."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


@contextlib.contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """``with stopwatch() as t: ...`` then ``t["seconds"]``."""
    result: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield result
    finally:
        result["seconds"] = time.perf_counter() - start


# --------------------------------------------------------------------------- environment


def _version(module_name: str) -> str | None:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return getattr(module, "__version__", "unknown")


def versions(with_torch: bool) -> dict[str, Any]:
    """Python and library versions (and the CUDA/cuDNN builds where they apply)."""
    import jax

    found: dict[str, Any] = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy"):
        found[name] = _version(name)
    device = jax.devices()[0]
    found["jax_backend"] = jax.default_backend()
    found["jax_platform_version"] = getattr(device.client, "platform_version", None)
    if with_torch:
        import torch

        found["torch"] = torch.__version__
        found["torchvision"] = _version("torchvision")
        found["torch_cuda"] = torch.version.cuda
        found["cudnn"] = torch.backends.cudnn.version() if torch.cuda.is_available() else None
    return found


def git_revision() -> dict[str, Any] | None:
    """The checkout's commit and whether it has uncommitted changes (None outside git)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())}


def device_facts() -> dict[str, Any]:
    """The JAX device running the benchmark, its peak bf16 FLOP/s (where known), the host."""
    import jax

    device = jax.devices()[0]
    name = device.device_kind
    peak, source = None, None
    for key, flops, note in DEVICE_PEAK_BF16_FLOPS:
        if key.lower() in name.lower():
            peak, source = flops, note
            break
    return {
        "platform": device.platform,
        "name": name,
        "count": jax.device_count(),
        "peak_bf16_flops": peak,
        "peak_source": source,
        "host_cpu": platform.processor() or platform.machine(),
        "host_cpu_count": _cpu_count(),
    }


def _cpu_count() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def device_slug(name: str) -> str:
    """``'NVIDIA H100 80GB HBM3'`` -> ``'nvidia-h100-80gb-hbm3'`` (for file names)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


# --------------------------------------------------------------------------- output


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Writes ``payload`` as indented JSON (creating the folder) and prints the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    print(f"wrote {path}", flush=True)
    return path


def bar_plot(
    path: Path, labels: list[str], values: list[float], *, title: str, xlabel: str
) -> Path | None:
    """Horizontal bar chart as PNG; returns None (and says so) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written", flush=True)
        return None
    height = 0.9 + 0.45 * len(labels)
    fig, ax = plt.subplots(figsize=(8, height))
    positions = np.arange(len(labels))[::-1]
    ax.barh(positions, values, color="#4C72B0")
    ax.set_yticks(positions, labels)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    for y, value in zip(positions, values, strict=True):
        ax.text(value, y, f" {value:,.0f}", va="center", fontsize=8)
    ax.set_xlim(0, max(values) * 1.18 if values else 1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}", flush=True)
    return path
