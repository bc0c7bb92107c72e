"""A tiny trained run shared by the evaluate and explain tests, and an independent forward.

The run trains once per pytest session (about 15 s): its workdir lives at a fixed place under
the session's base temporary folder, so test modules that ask for it reuse it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from configs import demo
from protomask_jax import steps
from protomask_jax.data import pipeline
from protomask_jax.data import records as records_lib

CONFIG_FILE = """
from configs import demo


def get_config():
    config = demo.get_config()
    config.unlock()
    config.dataset.records_dir = {records_dir!r}
    config.dataset.num_classes = 4
    config.input.update(canvas_size=32, view_size=32, num_views=4, batch_size=8,
                        eval_batch_size=8)
    config.model.update(backbone="resnet_micro", prototype_dim=8, prototypes_per_class=2)
    config.train.update(joint_epochs=1, finetune_epochs=1, eval_every_epochs=1)
    config.lock()
    return config
"""


def tiny_config(records_dir: Path):
    """The demo config shrunk to the ``tiny_records`` fixture (4 classes, 64 px images)."""
    config = demo.get_config()
    config.unlock()
    config.dataset.records_dir = str(records_dir)
    config.dataset.num_classes = 4
    config.input.update(canvas_size=32, view_size=32, num_views=4, batch_size=8, eval_batch_size=8)
    config.model.update(backbone="resnet_micro", prototype_dim=8, prototypes_per_class=2)
    config.train.update(joint_epochs=1, finetune_epochs=1, eval_every_epochs=1)
    config.lock()
    return config


def write_config_file(path: Path, records_dir: Path) -> Path:
    """The same config as a file, for the command-line tools."""
    path.write_text(CONFIG_FILE.format(records_dir=str(records_dir)))
    return path


def trained_workdir(tmp_path_factory, records_dir: Path) -> Path:
    """A workdir of the tiny config trained through joint, push and fine-tune (cached)."""
    from protomask_jax import trainer

    workdir = tmp_path_factory.getbasetemp() / "explain_trained_run"
    if not (workdir / "results.json").exists():
        trainer.train_and_evaluate(tiny_config(records_dir), workdir)
    return workdir


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args`` from the repository on 8 fake CPU devices, output captured."""
    repo = Path(__file__).resolve().parents[1]
    env = dict(
        os.environ,
        PYTHONPATH=str(repo),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
    )
    command = [sys.executable, "-m", module, *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=repo, timeout=300)


def results_json(workdir: Path) -> dict:
    return json.loads((workdir / "results.json").read_text())


def independent_outputs(trained, record_set: pipeline.RecordSet) -> dict[str, np.ndarray]:
    """Logits, distances and winning views of every record, without the evaluation driver.

    Records are decoded one by one with ``pipeline.fit_record`` and the (unjitted) evaluation
    step runs eagerly on host copies of the parameters, as one batch: no grain stream, no
    sharding, no gathering, no filler rows.
    """
    examples, labels, ids = [], [], []
    for i in range(len(record_set)):
        record = records_lib.ImageRecord.from_bytes(record_set.reader[i])
        examples.append(pipeline.fit_record(record, trained.spec, f"record {i}"))
        labels.append(record.label)
        ids.append(record.image_id)
    batch = {key: np.stack([e[key] for e in examples]) for key in examples[0]}
    eval_step = steps.make_eval_step(trained.graphdef, trained.step_config)
    state = jax.device_get(trained.state)
    outputs = eval_step(state.params, state.batch_stats, state.constants, batch)
    return {
        "logits": np.asarray(outputs.logits),
        "min_distances": np.asarray(outputs.min_distances),
        "winning_view": np.asarray(outputs.winning_view),
        "num_masks": batch["num_masks"].astype(np.int64),
        "labels": np.asarray(labels, np.int64),
        "image_ids": np.asarray(ids, np.int64),
    }
