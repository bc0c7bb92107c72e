r"""Trains ProtoMask: ``python -m protomask_jax.train --config configs/cub.py --workdir DIR``.

Override any value with ``--config.train.joint_epochs=50``; a misspelt key is refused with
the valid ones. The same command on the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/demo.py.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (created; resumed if it exists).")
_MAX_STEPS = flags.DEFINE_integer(
    "max_steps", None, "Stop after this global step (saving a checkpoint); rerun to resume."
)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config configs/demo.py")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required, e.g. --workdir workdirs/demo")
    from protomask_jax import cli, trainer
    from protomask_jax.logs import setup_cli_logging

    setup_cli_logging()
    config = cli.absolute_paths(_CONFIG.value)
    source = cli.config_source(flags.FLAGS["config"])
    try:
        results = trainer.train_and_evaluate(
            config, _WORKDIR.value, max_steps=_MAX_STEPS.value, source=source
        )
    except trainer.TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(results))
    return 0


def summary(results: dict) -> str:
    """A short end-of-run report for a person."""
    if "stopped_at_step" in results:
        return f"stopped at step {results['stopped_at_step']}; run the same command to resume"
    best = results.get("best")
    source = f"best-on-validation checkpoint, step {best['step']}" if best else "final state"
    return f"""
{"=" * 60}
test accuracy: {results["test_accuracy"]:.4f} ({source})
final-state test accuracy: {results["final"]["accuracy"]:.4f}
validation accuracy (best per phase): {json.dumps(results["best_val_accuracy"])}
prototypes: {results["num_prototypes"]}
bad records skipped: {json.dumps(results["skipped_records"])}
training time: {results["train_time_s"] / 60:.1f} min
outputs: {results["workdir"]} (results.json, metrics.jsonl, push.json, tensorboard/, checkpoints/)
{"=" * 60}"""


if __name__ == "__main__":
    from protomask_jax import cli

    cli.run(main)
