"""A ``gs://`` workdir, end to end against an in-memory Cloud Storage server (conftest's
``gcs_bucket``): training stopped and resumed in the bucket ends where a local run ends,
bit for bit; every output a local run writes is in the bucket; evaluate, explain and prune
read the run from the bucket and write beside it."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_train import tiny_config

from protomask_jax import base, evaluate, explain, inference, tables, trainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tiny_records, tmp_path_factory, gcs_bucket):
    """(config, the local run's folder, the bucket run's URL): the same run, the bucket's
    stopped at step 3 and resumed."""
    config = tiny_config(tiny_records)
    local = tmp_path_factory.mktemp("bucket_local") / "run"
    trainer.train_and_evaluate(config, local)
    remote = f"{gcs_bucket}/runs/resumed"
    assert trainer.train_and_evaluate(config, remote, max_steps=3) == {"stopped_at_step": 3}
    trainer.train_and_evaluate(config, remote)
    return config, local, remote


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _leaves(tree):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def test_a_run_in_a_bucket_resumes_and_matches_a_local_run(runs):
    from etils import epath

    config, local, remote_dir = runs
    bucket = epath.Path(remote_dir)
    names = {p.name for p in bucket.iterdir()}
    assert {"config.json", "results.json", "push.json", "metrics.jsonl"} <= names
    assert {"checkpoints", "tensorboard"} <= names
    remote_results = json.loads((bucket / "results.json").read_text())
    local_results = json.loads((local / "results.json").read_text())
    for key in ("test_accuracy", "final", "best", "best_val_accuracy", "num_prototypes"):
        assert remote_results[key] == local_results[key], key
    assert remote_results["workdir"] == remote_dir
    assert (bucket / "push.json").read_text() == (local / "push.json").read_text()
    # two runs (stopped, resumed): two event files, the second purging the redone steps
    assert len(list((bucket / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert (
        json.loads((bucket / "config.json").read_text())["config"]
        == json.loads((local / "config.json").read_text())["config"]
    )

    # The resumed run dropped the rows after its checkpoint and logged them again, once. Its
    # step-4 training averages cover step 4 only (steps 3-4 in the unbroken run): compared
    # are the rows' steps, phases and keys, and every evaluation's value.
    remote_rows, local_rows = _rows(bucket / "metrics.jsonl"), _rows(local / "metrics.jsonl")
    assert [(r["step"], r["phase"], sorted(r)) for r in remote_rows] == [
        (r["step"], r["phase"], sorted(r)) for r in local_rows
    ]
    evaluations = lambda rows: [  # noqa: E731
        {k: v for k, v in r.items() if k.startswith(("val/", "test/"))} for r in rows
    ]
    assert evaluations(remote_rows) == evaluations(local_rows)
    assert remote_rows[0] == {**local_rows[0], "time": remote_rows[0]["time"]}

    for which in ("latest", "best"):
        here = inference.restore_trained(config, local, which=which)
        there = inference.restore_trained(config, remote_dir, which=which)
        assert there.checkpoint == here.checkpoint
        for a, b in zip(_leaves(here.state), _leaves(there.state), strict=True):
            np.testing.assert_array_equal(a, b)


def test_evaluate_and_explain_read_the_bucket_and_write_beside_the_run(runs):
    from etils import epath

    config, local, remote_dir = runs
    kwargs = dict(techniques=["classification", "topk"], resolution=32, progress=False)
    here = evaluate.evaluate(config, local, **kwargs)
    there = evaluate.evaluate(config, remote_dir, **kwargs)
    assert there == here
    bucket = epath.Path(remote_dir)
    assert json.loads((bucket / evaluate.EVAL_FILE).read_text()) == here
    assert json.loads((bucket / evaluate.TOPK_FILE).read_text()) == json.loads(
        (local / evaluate.TOPK_FILE).read_text()
    )
    # the runs table (python -m protomask_jax.tables) reads a bucket run as a local one
    here, there = tables.load_run(local), tables.load_run(remote_dir)
    for run in (here, there):
        assert run["metrics"].pop("results.train_time_s") > 0  # the one clock reading
    assert there == here | {"workdir": remote_dir}

    local_index = explain.explain(config, local, num_images=2, progress=False)
    remote_index = explain.explain(config, remote_dir, num_images=2, progress=False)
    assert str(remote_index) == f"{remote_dir}/{explain.REPORT_DIR}/index.html"
    local_files = sorted(
        str(p.relative_to(local_index.parent)) for p in local_index.parent.rglob("*") if p.is_file()
    )
    remote_files = sorted(
        str(p.relative_to(remote_index.parent)) for p in _walk(remote_index.parent)
    )
    assert remote_files == local_files and "index.html" in remote_files
    page = remote_index.read_text()
    accuracy = 100 * json.loads((bucket / "results.json").read_text())["test_accuracy"]
    assert f'<div class="value">{accuracy:.1f}%' in page
    assert "<caption>Top-" in page  # topk.json, read from the bucket


def test_a_bucket_run_is_pruned_into_the_bucket_as_a_local_one_is_pruned_locally(runs):
    from protomask_jax import prune

    config, local, remote_dir = runs
    here, _ = prune.prune(config, local, k=2, threshold=1, progress=False)
    there, _ = prune.prune(config, remote_dir, k=2, threshold=1, progress=False)
    assert str(there) == f"{remote_dir}/pruned_k2_t1"
    pruned = prune.pruned_config(config, 2, 1)
    a = inference.restore_trained(pruned, here, which="latest")
    b = inference.restore_trained(pruned, str(there), which="latest")
    assert a.meta["kept_prototypes"] == b.meta["kept_prototypes"]
    for x, y in zip(_leaves(a.state), _leaves(b.state), strict=True):
        np.testing.assert_array_equal(x, y)
    evaluated = [json.loads((run / evaluate.EVAL_FILE).read_text()) for run in (here, there)]
    assert evaluated[1].pop("config") == f"{there}/config.json"  # the config file evaluated
    assert evaluated[0].pop("config") == f"{here}/config.json"
    assert evaluated[1] == evaluated[0]
    source = json.loads((there / "config.json").read_text())["source"]
    assert source["pruned_from"] == remote_dir


def _walk(folder):
    for path in folder.iterdir():
        if path.is_dir():
            yield from _walk(path)
        else:
            yield path


def test_records_uploaded_to_a_bucket_read_as_the_local_ones(tiny_records, gcs_bucket):
    """Through gcsfs itself (not a mock): shard, index and dataset_info reads of a bucket."""
    from protomask_jax.data import pipeline
    from protomask_jax.data import records as records_lib

    remote_dir = f"{gcs_bucket}/records/tiny"
    base.upload_tree(tiny_records, remote_dir)
    for split in ("train", "test"):
        here, there = pipeline.RecordSet(tiny_records, split), pipeline.RecordSet(remote_dir, split)
        assert [there.reader[i] for i in range(len(there.reader))] == [
            here.reader[i] for i in range(len(here.reader))
        ]
        np.testing.assert_array_equal(there.labels, here.labels)
        here.reader.close()
        there.reader.close()
    assert records_lib.load_dataset_info(remote_dir) == records_lib.load_dataset_info(tiny_records)


def test_bucket_logs_are_uploaded_whole_at_most_every_period_and_on_close(gcs_bucket):
    from etils import epath

    from protomask_jax.logs import MetricsWriter, read_metrics

    workdir = f"{gcs_bucket}/runs/logs"
    writer = MetricsWriter(workdir, upload_every_s=3600)
    writer.write(1, {"train/loss": 2.0}, "joint")
    writer.write(2, {"train/loss": 1.5}, "joint")
    assert read_metrics(workdir) == []  # within the period: nothing uploaded yet
    writer.close()
    assert [(r["step"], r["train/loss"]) for r in read_metrics(workdir)] == [(1, 2.0), (2, 1.5)]
    (events,) = epath.Path(workdir, "tensorboard").glob("events.out.tfevents.*")
    assert b"train/loss" in events.read_bytes()

    # resumed from step 1's checkpoint: step 2 is redone, its old row dropped at once
    writer = MetricsWriter(workdir, resumed_step=1, upload_every_s=0)
    assert [r["step"] for r in read_metrics(workdir)] == [1]
    writer.write(2, {"train/loss": 1.25}, "joint")  # a period of 0: uploaded now
    assert [(r["step"], r["train/loss"]) for r in read_metrics(workdir)] == [(1, 2.0), (2, 1.25)]
    writer.close()
    assert len(list(epath.Path(workdir, "tensorboard").glob("events.out.tfevents.*"))) == 2


def test_commands_refuse_what_a_bucket_cannot_take_in_one_line(tiny_records, tmp_path, gcs_bucket):
    from _trained_run import run_module, write_config_file

    config_file = write_config_file(tmp_path / "tiny.py", tiny_records)
    done = run_module(
        "protomask_jax.train", f"--config={config_file}", "--workdir=gs://no-such-bucket/run"
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "bucket gs://no-such-bucket does not exist" in done.stderr.strip().splitlines()[-1]
    done = run_module("protomask_jax.predict", f"--workdir={gcs_bucket}/runs/x", str(tmp_path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert (
        "predictions are written to a local or mounted folder; give one with --out"
        in (done.stderr.strip().splitlines()[-1])
    )


def test_a_missing_bucket_or_another_store_is_refused_saying_what_to_do(tiny_records, gcs_bucket):
    config = tiny_config(tiny_records)
    with pytest.raises(base.UserError, match="bucket gs://no-such-bucket does not exist"):
        trainer.train_and_evaluate(config, "gs://no-such-bucket/runs/a")
    with pytest.raises(base.UserError, match="only gs:// buckets"):
        trainer.train_and_evaluate(config, "s3://somewhere/runs/a")
    base.as_path(f"{gcs_bucket}/runs/an_object").write_text("not a run")
    with pytest.raises(base.UserError, match="is an object, not a folder"):
        trainer.train_and_evaluate(config, f"{gcs_bucket}/runs/an_object")


def test_a_bucket_that_cannot_be_reached_is_refused_naming_credentials(
    tiny_records, gcs_bucket, monkeypatch
):
    from etils import epath

    def forbidden(self):  # what gcsfs raises for a 403 from the bucket
        raise PermissionError(f"{self}: 403 Forbidden")

    monkeypatch.setattr(type(epath.Path(gcs_bucket)), "exists", forbidden)
    with pytest.raises(base.UserError, match=r"cannot reach gs://protomask-test .*credentials"):
        trainer.train_and_evaluate(tiny_config(tiny_records), f"{gcs_bucket}/runs/b")
