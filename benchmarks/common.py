"""Shared pieces of the benchmark scripts: config, timing, CPU use, environment facts, output.

Nothing here imports torch, and jax only inside the functions that need it: the host-side
scripts (``cub_records``' worker processes, ``wheelhouse``) start without it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
    before = cpu_sample()
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
    usage = cpu_usage(before, cpu_sample())
    return {
        "per_step": percentiles(per_step),
        "back_to_back_mean": back_to_back,
        "host_steal_fraction": usage["host_steal_fraction"],
        "process_cpu_s_per_step": cpu_per_step,
        "host_load_1min": usage["host_load_1min"],
    }


# --------------------------------------------------------------------------- CPU use

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclasses.dataclass(frozen=True)
class CpuSample:
    """CPU time counters at one instant (Linux /proc; None where there is none).

    Attributes:
      wall_s: ``time.perf_counter()``.
      host_jiffies: all CPUs' ``user nice system idle iowait irq softirq steal`` jiffies.
      main_cpu_s: this process's user + system seconds, all threads.
      children_cpu_s: the same summed over its live descendants (e.g. grain workers).
      children: how many descendants are alive.
    """

    wall_s: float
    host_jiffies: tuple[int, ...] | None
    main_cpu_s: float
    children_cpu_s: float | None
    children: int | None


def cpu_sample() -> CpuSample:
    """Reads the counters of :class:`CpuSample` now."""
    wall = time.perf_counter()
    try:
        with open("/proc/stat") as stat:
            host = tuple(int(v) for v in stat.readline().split()[1:9])
    except (OSError, ValueError):
        host = None
    main = sum(os.times()[:2])
    children = _descendant_cpu_s(os.getpid())
    return CpuSample(
        wall_s=wall,
        host_jiffies=host,
        main_cpu_s=main,
        children_cpu_s=None if children is None else children[0],
        children=None if children is None else children[1],
    )


def _descendant_cpu_s(pid: int) -> tuple[float, int] | None:
    """``(user + system seconds, count)`` of the live descendants of ``pid`` (from /proc)."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    try:
        entries = [e for e in os.listdir("/proc") if e.isdigit()]
    except OSError:
        return None
    for entry in entries:
        try:
            with open(f"/proc/{entry}/stat") as stat:
                # The command name may hold spaces and parentheses: fields start after the
                # last ')'. Then: state ppid ... utime (12th) stime (13th).
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        parents[int(entry)] = int(fields[1])
        ticks[int(entry)] = int(fields[11]) + int(fields[12])
    tree, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - tree
        tree |= frontier
    return sum(ticks[p] for p in tree) / _CLOCK_TICKS, len(tree)


def cpu_usage(before: CpuSample, after: CpuSample) -> dict[str, Any]:
    """What the CPUs did between two samples.

    Returns:
      ``host_utilisation``: busy share of all the host's cores (every process, ours or not);
      ``host_cores_busy``: the same in cores; ``host_steal_fraction``: share taken by the
      hypervisor for other guests; ``main_process_cores`` / ``children_cores``: cores'
      worth of CPU time used by this process and by its descendants (grain workers);
      ``host_load_1min`` and ``cpu_count`` for context.
    """
    wall = max(after.wall_s - before.wall_s, 1e-9)
    usage: dict[str, Any] = {
        "seconds": wall,
        "cpu_count": cpu_count(),
        "os_cpu_count": os.cpu_count(),
        "host_load_1min": (load_average() or (None,))[0],
        "host_utilisation": None,
        "host_cores_busy": None,
        "host_steal_fraction": None,
        "main_process_cores": (after.main_cpu_s - before.main_cpu_s) / wall,
        "children_cores": None,
        "children": after.children,
    }
    if before.host_jiffies and after.host_jiffies:
        delta = [a - b for a, b in zip(after.host_jiffies, before.host_jiffies, strict=True)]
        total = sum(delta)
        if total > 0:
            idle = delta[3] + delta[4]  # idle + iowait
            usage["host_utilisation"] = (total - idle) / total
            usage["host_cores_busy"] = usage["host_utilisation"] * (os.cpu_count() or 1)
            usage["host_steal_fraction"] = delta[7] / total
    if before.children_cpu_s is not None and after.children_cpu_s is not None:
        # Descendants that ended in between drop out of the sum; clamp at 0.
        usage["children_cores"] = max(after.children_cpu_s - before.children_cpu_s, 0) / wall
    return usage


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


def use_deviceless_tpu() -> None:
    """Environment for compiling TPU programs on a CPU host (``aot``, ``aot_micro``): jax runs
    on the CPU and only the TPU compiler is loaded. The TPU_* values answer the questions
    libtpu would otherwise ask the (absent) TPU VM metadata server, printing a warning per
    question. Call it only as a program, before jax starts a backend: imported (tests), the
    process's environment is left alone (TPU_WORKER_HOSTNAMES would make training join a
    TPU pod)."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # parallel processes each load it
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


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
        "host_cpu_count": cpu_count(),
    }


def host_facts(since: CpuSample) -> dict[str, Any]:
    """What every result JSON records about the host: its cores (usable by this process:
    ``cpu_count``; all: ``os_cpu_count``), its load averages now, and its CPU use since
    ``since`` (``cpu_usage``) — on a shared machine, the measure of how loaded it was."""
    return {**cpu_usage(since, cpu_sample()), "load_average": load_average()}


def load_average() -> tuple[float, float, float] | None:
    """The host's 1, 5 and 15 minute load averages (None where the OS has none)."""
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def cpu_count() -> int | None:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def device_slug(name: str) -> str:
    """``'NVIDIA H100 80GB HBM3'`` -> ``'nvidia-h100-80gb-hbm3'`` (for file names)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


# --------------------------------------------------------------------------- command line


def parse_flags(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    *,
    seed: bool = True,
    grain: bool = False,
) -> dict[str, Any]:
    """Adds the flags every benchmark has (``--out_dir``, and ``--seed`` unless ``seed`` is
    False), parses ``argv`` and returns the values by name, for ``run(**flags)``.

    With ``grain``, also marks absl's flags parsed: grain's worker processes read them, and
    these scripts define none.
    """
    parser.add_argument("--out_dir", type=Path, default=RESULTS_DIR)
    if seed:
        parser.add_argument("--seed", type=int, default=0)
    flags = vars(parser.parse_args(argv))
    if grain:
        from absl import flags as absl_flags

        absl_flags.FLAGS.mark_as_parsed()
    return flags


# --------------------------------------------------------------------------- output


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Writes ``payload`` as indented JSON (creating the folder; atomically, so an
    interrupted run leaves the previous results whole) and prints the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
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
