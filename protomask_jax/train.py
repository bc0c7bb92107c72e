r"""Trains ProtoMask: ``python -m protomask_jax.train --config configs/cub.py --workdir DIR``.

Any config value can be overridden on the command line, e.g.
``--config.input.batch_size=32 --config.train.joint_epochs=50``; a misspelt key is refused
with the list of valid keys. Re-running the same command on the same workdir resumes from
its latest checkpoint. See ``trainer.train_and_evaluate`` for what is written.
"""

from __future__ import annotations

import json
import logging
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
    logging.getLogger().setLevel(logging.INFO)
    from protomask_jax import config_checks, trainer

    try:
        results = trainer.train_and_evaluate(
            _CONFIG.value, _WORKDIR.value, max_steps=_MAX_STEPS.value
        )
    except (config_checks.ConfigError, trainer.TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary(results))
    return 0


def summary(results: dict) -> str:
    """A short end-of-run report for a person."""
    if "stopped_at_step" in results:
        return f"stopped at step {results['stopped_at_step']}; run the same command to resume"
    lines = [
        "",
        "=" * 60,
        f"test accuracy: {results['test_accuracy']:.4f}"
        + (
            f" (best-on-validation checkpoint, step {results['best']['step']})"
            if "best" in results
            else " (final state)"
        ),
        f"final-state test accuracy: {results['final']['accuracy']:.4f}",
        f"validation accuracy (best per phase): {json.dumps(results['best_val_accuracy'])}",
        f"prototypes: {results['num_prototypes']}",
        f"training time: {results['train_time_s'] / 60:.1f} min",
        f"outputs: {results['workdir']} (results.json, metrics.jsonl, push.json, "
        "tensorboard/, checkpoints/)",
        "=" * 60,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
