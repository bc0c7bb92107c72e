"""Multi-process training with real processes: two `protomask_jax.train` processes joined by
``jax.distributed`` (gloo collectives on CPU), each reading its own rows of every batch.

This is the multi-host code path (``maybe_initialize_distributed``, per-process record
slices, global arrays built from process-local data, cross-process all-reduce, process 0
writing the outputs, every process writing its shards of the checkpoint) on one machine.
"""

import json
import socket
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from test_bucket_workdir import _walk
from test_faults import REPO, _command, _env
from test_train import final_state_leaves

pytestmark = pytest.mark.slow


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(records_dir, workdir, processes, devices_per_process, *args):
    """Runs the training CLI (plus ``args``) as ``processes`` processes of
    ``devices_per_process`` CPU devices each; returns their (returncode, stdout, stderr)."""
    command = [*_command(records_dir, workdir, **{"mesh.data": -1}), *args]
    base = dict(_env(), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    port = _free_port()
    # Output goes to files, not pipes: reading one process's pipes to its end while the other
    # fills its own 64 KiB pipe buffer blocks the writer, and its peer then waits for it in a
    # collective forever (the bucket runs log enough to hit this).
    running = []
    for rank in range(processes):
        env = dict(base)
        if processes > 1:
            env.update(
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES=str(processes),
                JAX_PROCESS_ID=str(rank),
            )
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=err, text=True)
        running.append((process, out, err))
    results = []
    try:
        for process, out, err in running:
            process.wait(timeout=900)
            out.seek(0)
            err.seek(0)
            results.append((process.returncode, out.read(), err.read()))
    finally:
        for process, out, err in running:
            if process.poll() is None:
                process.kill()
            out.close()
            err.close()
    for code, _, err in results:
        assert code == 0, err[-3000:]
    return results


def _assert_same_training(workdir_a, workdir_b):
    # Same parameters up to the order of floating-point sums in the all-reduce (gloo across
    # processes vs XLA's in-process reduction), amplified by Adam: the tolerance of the
    # 8-vs-1 device test (rtol 1e-3, atol 5e-5; values ~0.1).
    step_a, leaves_a = final_state_leaves(workdir_a)
    step_b, leaves_b = final_state_leaves(workdir_b)
    assert step_a == step_b
    for a, b in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=5e-5)
    push_a, push_b = (json.loads((w / "push.json").read_text()) for w in (workdir_a, workdir_b))
    for key in ("image_id", "view_index", "mask_index", "box"):
        assert push_a[key] == push_b[key], key
    np.testing.assert_allclose(push_b["distance"], push_a["distance"], rtol=1e-4, atol=1e-6)
    result_a, result_b = (
        json.loads((w / "results.json").read_text()) for w in (workdir_a, workdir_b)
    )
    for key in ("final", "best", "best_val_accuracy", "test_accuracy", "num_prototypes"):
        assert result_a[key] == result_b[key], key


@pytest.fixture(scope="module")
def one_process_run(tiny_records, tmp_path_factory):
    """The reference: one process driving 4 CPU devices."""
    workdir = tmp_path_factory.mktemp("one_process") / "run"
    _launch(tiny_records, workdir, 1, 4)
    return workdir


def test_two_processes_train_like_one_process_with_the_same_devices(
    tiny_records, one_process_run, tmp_path
):
    one = one_process_run
    two = tmp_path / "two_processes"
    results = _launch(tiny_records, two, 2, 2)
    # Both processes joined one 4-device run (not two independent 2-device runs) ...
    for rank, (_, _, err) in enumerate(results):
        assert f"process {rank} of 2, 2 local / 4 global devices" in err
    # ... and trained the same model as one process driving 4 devices.
    _assert_same_training(one, two)
    # Only process 0 writes the metrics log: one row per logged step, not two.
    steps = [
        json.loads(line)["step"]
        for line in (two / "metrics.jsonl").read_text().splitlines()
        if "train/loss" in line
    ]
    assert len(steps) == len(set(steps))


def test_a_two_process_run_resumes_on_one_process(tiny_records, one_process_run, tmp_path):
    """Stopped on two hosts, finished on one: checkpoints do not depend on the topology."""
    full = one_process_run
    moved = tmp_path / "moved"
    results = _launch(tiny_records, moved, 2, 2, "--max_steps=3")
    assert all("stopped at step 3" in out for _, out, _ in results)
    assert not (moved / "results.json").exists()
    _launch(tiny_records, moved, 1, 4)
    _assert_same_training(full, moved)


def _download(url, local):
    """Copies the bucket folder ``url`` into ``local`` (a new folder) and returns it."""
    from etils import epath

    root = epath.Path(url)
    for path in _walk(root):
        target = local / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    return local


def test_two_processes_checkpoint_into_one_bucket_and_resume(
    tiny_records, one_process_run, gcs_bucket, tmp_path
):
    """Two hosts writing their shards of one checkpoint into a ``gs://`` workdir, stopped and
    resumed there, train what one process on local disk trains."""
    url = f"{gcs_bucket}/runs/two_processes"
    results = _launch(tiny_records, url, 2, 2, "--max_steps=3")
    assert all("stopped at step 3" in out for _, out, _ in results)
    resumed = _launch(tiny_records, url, 2, 2)
    assert all("resuming from step 3" in err for _, _, err in resumed)
    downloaded = _download(url, tmp_path / "downloaded")
    # Each process wrote its own shards of every checkpoint into the bucket.
    for step in ("3", "6"):
        state = downloaded / "checkpoints" / step / "state"
        assert (state / "ocdbt.process_0").is_dir() and (state / "ocdbt.process_1").is_dir()
    _assert_same_training(one_process_run, downloaded)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
