"""What every command line shares: config flags, the run's stored config, one-line errors.

Parsing (:func:`parse_flags`): a config file that is missing or fails to load, a misspelt
``--config.`` key (with the valid keys at that level) or a value of the wrong type ends in one
line and exit code 2. :func:`run` calls a tool's ``main`` and does the same for every
:class:`UserError` and for files the user named that cannot be read or written.

A run remembers its config: training writes ``WORKDIR/config.json`` (the resolved config with
absolute paths, the config file and the ``--config.`` overrides of the command). ``evaluate``,
``explain`` and ``predict`` start from it (:func:`run_config`): ``--config`` may be left out,
overrides apply on top, and a config file or override that disagrees with the run on what
defines the model is refused, naming the key. Jax-free, so the torch side uses it too.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_collections

from protomask_jax.base import PATH_KEYS, UserError, as_path, is_remote, write_json_atomic

RUN_CONFIG = "config.json"
DEFAULT_CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "common.py")
# What the restored parameters' shapes and meaning depend on.
MODEL_KEYS = (
    "dataset.num_classes",
    "dataset.multi_label",
    "model.backbone",
    "model.prototype_dim",
    "model.prototypes_per_class",
)


# ------------------------------------------------------------------------------- flags


def config_key_error(argv: list[str]) -> str | None:
    """The first ``--config.a.b=`` override whose key does not exist, with the keys valid at
    that level (ml_collections suggests only one close match)."""
    import runpy

    path, overrides = DEFAULT_CONFIG, []
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config."):
            overrides.append(arg[len("--config.") :].split("=", 1)[0])
    try:
        root = runpy.run_path(path.split(":", 1)[0])["get_config"]()
    except Exception:  # noqa: BLE001 - the file's own error is reported by the caller
        return None
    for dotted in overrides:
        node, prefix = root, "config"
        for key in dotted.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                return f"--config.{dotted}: {prefix} has no key {key!r}; valid keys: " + (
                    ", ".join(valid) + "." if valid else "none (it is a value, not a group)."
                )
            node, prefix = node[key], f"{prefix}.{key}"
    return None


def define_config_flag(default: str | None, help_text: str) -> None:
    """``--config``; with a default file, ml_collections applies the command line's overrides
    while defining the flag, so a misspelt key must be caught here."""
    from ml_collections import config_flags

    try:
        config_flags.DEFINE_config_file("config", default, help_text, lock_config=True)
    except Exception as e:  # noqa: BLE001 - ml_collections raises many kinds
        _fail(config_key_error(sys.argv[1:]) or _config_load_error(e, sys.argv))


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser (``app.run(..., flags_parser=parse_flags)``) with one-line errors."""
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
        config = flags.FLAGS.config if "config" in flags.FLAGS else None
        if config is not None:
            config.keys()  # a file that failed to load raises only on first use: name it here
    except Exception as e:  # noqa: BLE001 - absl and ml_collections raise many kinds
        _fail(config_key_error(argv[1:]) or _config_load_error(e, argv))
    return rest


def _config_load_error(error: Exception, argv: list[str]) -> str:
    text = " ".join(str(error).split())
    if "Failed loading config file" in text or isinstance(error, OSError | TypeError):
        path = next(
            (a.split("=", 1)[1] for a in argv if a.startswith("--config=")),
            next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), "?"),
        )
        file = path.split(":", 1)[0]
        if not Path(file).is_file():
            return f"--config {path}: no such config file (e.g. --config configs/demo.py)"
        return f"--config {path}: the config file failed to load: {text[-300:]}"
    return text


def run(main: Callable[[list[str]], Any], errors: tuple[type[BaseException], ...] = ()) -> None:
    """``app.run(main)`` where a user's mistake prints one line and exits 2."""
    from absl import app

    def guarded(argv: list[str]) -> None:
        try:
            result = main(argv)
        except app.UsageError as e:
            _fail(f"{e} (--help lists the flags)")
        except (UserError, FileNotFoundError, NotADirectoryError, PermissionError, *errors) as e:
            _fail(str(e))
        sys.exit(result or 0)

    app.run(guarded, flags_parser=parse_flags)


def config_source(config_flag) -> dict[str, Any]:
    """The config file and the ``--config.`` overrides of this command line."""
    from ml_collections import config_flags

    overrides = config_flags.get_override_values(config_flag)
    file_name = config_flags.get_config_filename(config_flag)
    return {
        "file": str(Path(file_name.split(":", 1)[0]).resolve()),
        "overrides": json.loads(json.dumps(overrides, default=str)),
    }


# -------------------------------------------------------------------------- run config


def absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with every non-empty path key made absolute (in place)."""
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            absolute_paths(value)
        elif key in PATH_KEYS and isinstance(value, str) and value and not is_remote(value):
            config[key] = os.path.abspath(os.path.expanduser(value))
    return config


def save_run_config(workdir: Path, config, source: Mapping[str, Any] | None) -> None:
    path = as_path(workdir) / RUN_CONFIG
    if source is None and path.is_file():  # a library call resuming a CLI run keeps its source
        source = json.loads(path.read_text()).get("source")
    payload = {"config": json.loads(config.to_json()), "source": dict(source or {})}
    write_json_atomic(path, payload)


def _stored(workdir: Path) -> tuple[dict, dict]:
    """The run's config dict and its source, from config.json (or a checkpoint's metadata)."""
    path = workdir / RUN_CONFIG
    if path.is_file():
        try:
            payload = json.loads(path.read_text())
            return payload["config"], payload.get("source") or {}
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(
                f"{path} is damaged ({e}); delete it to fall back to the checkpoint"
            ) from None
    checkpoints = workdir / "checkpoints"
    if not workdir.is_dir() or not checkpoints.is_dir():
        raise UserError(
            f"{workdir} holds no training run; train one first: python -m protomask_jax.train "
            f"--config <config> --workdir {workdir}"
        )
    from protomask_jax import checkpoint as ckpt

    manager = ckpt.manager(checkpoints, max_to_keep=None)
    step = manager.latest_step()
    if step is None:
        raise UserError(f"{checkpoints} holds no checkpoint; train first.")
    return ckpt.read_meta(manager, step)["config"], {}


def _merge(config: ml_collections.ConfigDict, values: Mapping[str, Any]) -> None:
    """Copies ``values`` into ``config`` where ``config`` has the key (newer code may have
    added keys a stored run lacks; keys it removed are ignored)."""
    for key, value in values.items():
        if key not in config:
            continue
        if isinstance(config[key], ml_collections.ConfigDict) and isinstance(value, Mapping):
            _merge(config[key], value)
        else:
            config[key] = tuple(value) if isinstance(config[key], tuple) else value


def _get(config, dotted: str):
    for key in dotted.split("."):
        config = config[key]
    return config


def run_config(workdir: str | Path, config_flag) -> ml_collections.ConfigDict:
    """The config of the run in ``workdir`` with this command's ``--config.`` overrides."""
    from ml_collections import config_flags

    from configs import common

    stored, source = _stored(as_path(workdir))
    config = common.get_base_config()
    _merge(config, stored)
    file_name = config_flags.get_config_filename(config_flag)
    overrides = config_flags.get_override_values(config_flag)
    given = config_flag.value
    named = Path(file_name).resolve() != Path(DEFAULT_CONFIG)
    # The training command's own overrides explain why the run differs from its config file.
    same_file = source.get("file") == str(Path(file_name.split(":", 1)[0]).resolve())
    explained = (source.get("overrides") or {}) if same_file else {}
    for key in MODEL_KEYS:
        here, there = _get(given, key), _get(config, key)
        explicit = key in overrides
        if here != there and (explicit or (named and key not in explained)):
            where = f"--config.{key}" if explicit else file_name
            raise UserError(
                f"{key} is {there!r} in the run, {here!r} here ({where}); the run's own config "
                f"is used when --config is left out (python -m ... --workdir {workdir})"
            )
    config.update_from_flattened_dict(dict(overrides))
    absolute_paths(config)
    config.lock()
    return config
