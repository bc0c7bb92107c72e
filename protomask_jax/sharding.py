"""One device mesh from the config, the shardings built on it, and multi-host helpers.

The mesh has two axes: ``data`` (batches are split along it) and ``model`` (prototypes and
the last layer's prototype axis are split along it when it is larger than 1 — only useful
for very large prototype sets). Everything else is replicated. jit with explicit in/out
shardings does the rest (no pmap, no wrapper objects): XLA inserts the gradient all-reduce
over ``data``.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

DATA = "data"
MODEL = "model"


def maybe_initialize_distributed() -> None:
    """Calls ``jax.distributed.initialize()`` when the launcher says this is multi-process.

    Must run before anything touches a JAX backend (``jax.devices()``, ``process_count()``,
    any array): afterwards ``initialize`` refuses, and each process would silently train
    alone. Launchers:

    - TPU VM pod slices, SLURM and Open MPI: jax reads their environment itself; we only
      call ``initialize`` when one of their variables is present, so a plain
      single-process run never waits for peers.
    - Anything else (several processes on one machine, a hand-written launcher):
      ``JAX_COORDINATOR_ADDRESS=host:port``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
      on every process. On CPU the cross-process collectives use gloo.
    """
    markers = (
        "JAX_COORDINATOR_ADDRESS",
        "SLURM_JOB_ID",
        "OMPI_COMM_WORLD_SIZE",
        "TPU_WORKER_HOSTNAMES",
        "MEGASCALE_COORDINATOR_ADDRESS",
    )
    if any(os.environ.get(m) for m in markers) and not jax.distributed.is_initialized():
        explicit = {"num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
        kwargs = {}
        for key, name in explicit.items():
            if name in os.environ:
                try:
                    kwargs[key] = int(os.environ[name])
                except ValueError:
                    raise ValueError(
                        f"{name}={os.environ[name]!r} must be an integer (the number of "
                        "processes, or this process's index from 0)."
                    ) from None
        if len(kwargs) == 1:
            raise ValueError(
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


def make_mesh(config, devices: list | None = None) -> Mesh:
    """Builds the ``(data, model)`` mesh from ``config.mesh``.

    ``config.mesh.data = -1`` takes every device not used by the model axis; an explicit
    ``data`` uses the first ``data * model`` devices (e.g. ``data=1`` for a one-device run
    on a multi-device host).
    """
    devices = list(jax.devices() if devices is None else devices)
    model = int(config.mesh.model)
    data = int(config.mesh.data)
    if model < 1 or len(devices) % model:
        raise ValueError(
            f"config.mesh.model={model} must be >= 1 and divide the {len(devices)} devices."
        )
    if data == -1:
        data = len(devices) // model
    if data < 1 or data * model > len(devices):
        raise ValueError(
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


def param_sharding(mesh: Mesh, path: tuple, leaf: Any) -> NamedSharding:
    """Sharding of one parameter/state leaf given its path in the state tree.

    With ``model > 1`` the prototypes ``[P, D]`` are split over P, the last layer over its
    prototype axis, and the class identity ``[P]`` over P; all else is replicated. A P that
    ``model`` does not divide (pruning can leave any count) is replicated instead.
    """
    if mesh.shape[MODEL] == 1 or not hasattr(leaf, "shape"):
        return replicated(mesh)
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    shape = leaf.shape
    if not shape or shape[0] % mesh.shape[MODEL]:
        return replicated(mesh)
    if "prototypes" in names and len(shape) == 2:
        return NamedSharding(mesh, PartitionSpec(MODEL, None))
    if "prototype_class" in names and len(shape) == 1:
        return NamedSharding(mesh, PartitionSpec(MODEL))
    if "last_layer" in names and len(shape) == 2:
        # stored [P, C]: split the prototype axis
        return NamedSharding(mesh, PartitionSpec(MODEL, None))
    return replicated(mesh)


def tree_shardings(mesh: Mesh, tree: Any) -> Any:
    """A pytree of shardings matching ``tree`` (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: param_sharding(mesh, p, x), tree)


def global_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Assembles process-local numpy batches into global arrays sharded over ``data``."""
    sharding = batch_sharding(mesh)
    return {
        key: jax.make_array_from_process_local_data(sharding, value)
        for key, value in local_batch.items()
    }


def check_batch_divisible(global_batch_size: int, mesh: Mesh, what: str) -> None:
    data = mesh.shape[DATA]
    if global_batch_size % data:
        raise ValueError(
            f"{what}={global_batch_size} must be divisible by the data-parallel mesh size "
            f"({data}); change the batch size or config.mesh.data."
        )
