"""One device mesh from the config, the shardings built on it, and multi-host helpers.

Axes: ``data`` splits batches (and, with ``mesh.fsdp``, the large parameters and their
optimizer state); ``model`` (when > 1, for very large prototype sets) splits the prototype
axis; all else is replicated. jit with explicit shardings does the rest (no
pmap): XLA inserts the gradient all-reduce over ``data``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from protomask_jax.config_checks import ConfigError

log = logging.getLogger(__name__)

DATA = "data"
MODEL = "model"
_LAUNCHER_MARKERS = (
    "JAX_COORDINATOR_ADDRESS",
    "SLURM_JOB_ID",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
)


def maybe_initialize_distributed() -> None:
    """Joins the other processes when a launcher says so, before anything touches a backend
    (else each trains alone). jax detects TPU pods, SLURM and Open MPI; others set
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``."""
    if any(os.environ.get(m) for m in _LAUNCHER_MARKERS) and not jax.distributed.is_initialized():
        names = {"num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
        kwargs = {key: _env_int(name) for key, name in names.items() if name in os.environ}
        if len(kwargs) == 1:
            raise ConfigError(
                "Set both JAX_NUM_PROCESSES and JAX_PROCESS_ID (or neither, to let jax "
                f"detect the cluster); got only {sorted(kwargs)}."
            )
        if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**kwargs)
    log.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except ValueError:
        raise ConfigError(
            f"{name}={os.environ[name]!r} must be an integer (the number of processes, or "
            "this process's index from 0)."
        ) from None


def make_mesh(config, devices: list | None = None) -> Mesh:
    """The ``(data, model)`` mesh of ``config.mesh``; ``data = -1`` takes every device the
    model axis leaves, an explicit ``data`` the first ``data * model`` devices."""
    devices = list(jax.devices() if devices is None else devices)
    model = int(config.mesh.model)
    data = int(config.mesh.data)
    if model < 1 or len(devices) % model:
        raise ConfigError(
            f"config.mesh.model={model} must be >= 1 and divide the {len(devices)} devices."
        )
    if data == -1:
        data = len(devices) // model
    if data < 1 or data * model > len(devices):
        raise ConfigError(
            f"config.mesh.data={config.mesh.data} x config.mesh.model={model} needs more "
            f"than the {len(devices)} available devices; use data=-1 to take them all."
        )
    grid = np.asarray(devices[: data * model], dtype=object).reshape(data, model)
    return Mesh(grid, (DATA, MODEL))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``; other axes replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def fsdp_min_size(config) -> int:
    """The ``fsdp`` argument of :func:`tree_shardings` for ``config``: 0 (off) unless
    ``mesh.fsdp``; then ``mesh.fsdp_min_size`` (smaller leaves are not worth a gather)."""
    return int(config.mesh.fsdp_min_size) if config.mesh.fsdp else 0


def param_sharding(mesh: Mesh, path: tuple, leaf: Any, fsdp: int = 0) -> NamedSharding:
    """Prototypes, last layer and class identity split over their P axis when ``model > 1``
    divides P (pruning can leave any count). With ``fsdp`` > 0 every other leaf of at least
    ``fsdp`` elements is split over ``data`` along its largest axis that ``data`` divides:
    parameters and optimizer state then take 1/data of the memory, and XLA gathers each
    parameter where the step uses it. Everything else is replicated."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    shape = tuple(getattr(leaf, "shape", ()))
    split = ("prototypes" in names or "last_layer" in names) and len(shape) == 2
    split = split or ("prototype_class" in names and len(shape) == 1)
    if mesh.shape[MODEL] > 1 and split and shape[0] % mesh.shape[MODEL] == 0:
        return NamedSharding(mesh, PartitionSpec(MODEL, *[None] * (len(shape) - 1)))
    data = mesh.shape[DATA]
    if fsdp > 0 and data > 1 and int(np.prod(shape)) >= fsdp:
        divisible = [axis for axis, n in enumerate(shape) if n % data == 0]
        if divisible:
            axis = max(divisible, key=lambda a: shape[a])
            spec = [None] * len(shape)
            spec[axis] = DATA
            return NamedSharding(mesh, PartitionSpec(*spec))
    return replicated(mesh)


def tree_shardings(mesh: Mesh, tree: Any, fsdp: int = 0) -> Any:
    """A pytree of shardings matching ``tree`` (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: param_sharding(mesh, p, x, fsdp), tree)


def global_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles process-local numpy batches into global arrays sharded over ``data``."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def check_batch_divisible(
    global_batch_size: int, mesh: Mesh, what: str, micro_batches: int = 1
) -> None:
    data = mesh.shape[DATA]
    if global_batch_size % data:
        raise ConfigError(
            f"config.{what}={global_batch_size} must be divisible by the data-parallel mesh size "
            f"({data}); change the batch size or config.mesh.data."
        )
    if (global_batch_size // data) % micro_batches:
        raise ConfigError(
            f"config.{what}={global_batch_size} gives {global_batch_size // data} images per "
            f"device, which config.train.micro_batches={micro_batches} does not divide; change "
            "either."
        )
