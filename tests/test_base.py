"""base: the modules that share its names import without a circle, and its atomic writes."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from protomask_jax import base

REPO = Path(__file__).resolve().parents[1]
SHARERS = ("protomask_jax.checkpoint", "protomask_jax.cli", "protomask_jax.data.records")


def _loaded_after_each(modules: tuple[str, ...]) -> list[list[str]]:
    """Imports ``modules`` in order in a fresh interpreter; after each, which of SHARERS and
    ``base`` are in sys.modules."""
    watched = (*SHARERS, "protomask_jax.base", "jax")
    code = (
        "import importlib, json, sys\n"
        "seen = []\n"
        f"for name in {list(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        f"    seen.append(sorted(m for m in {list(watched)!r} if m in sys.modules))\n"
        "print(json.dumps(seen))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_base_imports_none_of_its_users_nor_jax():
    (loaded,) = _loaded_after_each(("protomask_jax.base",))
    assert loaded == ["protomask_jax.base"]


@pytest.mark.parametrize("order", list(itertools.permutations(SHARERS)))
def test_sharers_import_in_any_order_without_pulling_each_other_in(order):
    seen = _loaded_after_each(order)
    first, final = seen[0], seen[-1]
    # The first module alone brings base and none of the other two (records and checkpoint
    # used to import cli, which imported records and checkpoint back).
    others = [m for m in first if m in SHARERS]
    assert others == [order[0]]
    assert "protomask_jax.base" in first
    # The last import leaves all three loaded: none failed on a half-initialised module.
    assert set(SHARERS) <= set(final)


def test_write_json_atomic_tolerates_concurrent_writers(tmp_path: Path):
    # Several export processes may finish together and all write dataset_info.json.
    target = tmp_path / "dataset_info.json"
    errors: list[BaseException] = []

    def writer(value: int) -> None:
        try:
            for step in range(50):
                base.write_json_atomic(target, {"writer": value, "step": step})
        except BaseException as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(v,)) for v in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert json.loads(target.read_text())["step"] == 49
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset_info.json"]


def test_commands_start_quietly_on_a_machine_without_a_tpu():
    """libtpu (dev extra) is installed here and no TPU is: importing the package first must
    keep jax from probing for one (a page of metadata-server errors on every command)."""
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (it ships for Linux x86-64 only)")
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
    done = subprocess.run(
        [sys.executable, "-c", "import protomask_jax, jax; print(jax.devices()[0].platform)"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "cpu"
    assert "TPU_WORKER_HOSTNAMES" not in done.stderr and "libtpu" not in done.stderr, done.stderr
