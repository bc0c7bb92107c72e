r"""Prunes a finished run: ``python -m protomask_jax.prune --workdir W [--k 6 --threshold 3]
[--out DIR] [--checkpoint best|latest]``.

The run's checkpoint becomes the start of a new run in ``DIR`` (default ``W/pruned_k{k}_t{t}``)
whose config is the run's with ``train.prune`` enabled (``trainer.start_pruned_run``); training
it drops every prototype with fewer than t images of its class among its k nearest training
images, fine-tunes the last layer for ``train.prune.finetune_epochs`` keeping the best on
validation (docs/reference.md §5.5), and tests it (``DIR/results.json``); then ``evaluate``
writes ``DIR/eval.json``. ``W``'s own files are only read. A killed prune resumes when rerun.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from protomask_jax import base, cli, config_checks
from protomask_jax import evaluate as evaluate_lib


def pruned_config(config, k: int | None = None, threshold: int | None = None):
    """``config`` with pruning enabled at ``k`` and ``threshold`` (default: its own)."""
    config = config.copy_and_resolve_references()
    config.unlock()
    prune = config.train.prune
    prune.update(enabled=True, k=prune.k if k is None else k)
    prune.threshold = prune.threshold if threshold is None else threshold
    config.lock()
    config_checks.validate(config)
    if prune.finetune_epochs < 1:
        raise config_checks.ConfigError(
            "config.train.prune.finetune_epochs: pruning fine-tunes the last layer; set >= 1"
        )
    return config


def prune(
    config,
    workdir: str | Path,
    *,
    k: int | None = None,
    threshold: int | None = None,
    out_dir: str | Path | None = None,
    checkpoint: str = "best",
    progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """Prunes the run in ``workdir`` into ``out_dir``; returns that and its eval.json."""
    from protomask_jax import trainer

    config = pruned_config(config, k, threshold)
    prune = config.train.prune
    workdir = base.as_path(workdir)
    if not (workdir / "results.json").is_file():
        raise base.UserError(
            f"{workdir} holds no finished run (no results.json); finish its training first"
        )
    out_dir = base.as_path(out_dir or workdir / f"pruned_k{prune.k}_t{prune.threshold}")
    trainer.start_pruned_run(config, workdir, out_dir, checkpoint)
    origin = workdir if base.is_remote(workdir) else workdir.resolve()
    source = {"pruned_from": str(origin), "checkpoint": checkpoint}
    trainer.train_and_evaluate(config, out_dir, source=source)
    results = evaluate_lib.evaluate(
        config, out_dir, config_name=str(out_dir / cli.RUN_CONFIG), progress=progress
    )
    return out_dir, results


def _prune_tool(config, config_name: str) -> str:
    from absl import flags

    FLAGS = flags.FLAGS
    out_dir, results = prune(
        config,
        FLAGS.workdir,
        k=FLAGS.k,
        threshold=FLAGS.threshold,
        out_dir=FLAGS.out,
        checkpoint=FLAGS.checkpoint,
    )
    table = evaluate_lib.format_table(results)
    return f"{table}\n\npruned run: {out_dir} (eval.json, results.json, checkpoints)"


if __name__ == "__main__":
    from absl import flags

    cli.define_config_flag(
        cli.DEFAULT_CONFIG,
        "Leave out to use the run's own config; overrides such as "
        "--config.train.prune.finetune_epochs=N apply on top.",
    )
    flags.DEFINE_string("workdir", None, "The finished training run to prune (only read).")
    flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Checkpoint to prune.")
    flags.DEFINE_integer("k", None, "Nearest training images per prototype (default: the run's).")
    flags.DEFINE_integer(
        "threshold", None, "Prune a prototype with fewer own-class images among them."
    )
    flags.DEFINE_string("out", None, "Output run folder (default: WORKDIR/pruned_k{k}_t{t}).")
    cli.run(lambda argv: evaluate_lib.run_tool(argv, _prune_tool))
