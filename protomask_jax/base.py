"""What every other module may import, and which imports none of them: the user-mistake error
type, the config keys that name files, and atomic writes.

``cli`` (flags, run config), ``checkpoint`` and ``data.records`` all need these; keeping them
here means none of those three has to import another to get them. Standard library only, so
the torch side and jax-free tools pay nothing for it.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

# String config keys that name files or folders: stored absolute, so a run is found from
# anywhere, and a relative and an absolute spelling of one file compare equal on resume.
PATH_KEYS = ("root", "records_dir", "tfds_data_dir", "pretrained", "import_protomask",
             "checkpoint", "model_config")  # fmt: skip
TMP_SUFFIX = ".tmp"  # every temporary file of an atomic write ends so (cleanups glob for it)
# URL schemes that records may be read from (through etils.epath, :func:`as_path`); such
# names are kept as given, never made absolute. A workdir may be local, mounted or ``gs://``.
REMOTE_SCHEMES = ("gs://", "s3://")


def is_remote(path: str | os.PathLike) -> bool:
    return str(path).startswith(REMOTE_SCHEMES)


def as_path(path: str | os.PathLike):
    """``pathlib.Path`` for a local name, ``etils.epath.Path`` for a ``gs://`` or ``s3://``
    URL (both offer ``/``, ``glob``, ``exists``, ``read_text``, ``write_text``, ``open``)."""
    if is_remote(path):
        from etils import epath

        return epath.Path(str(path))
    return Path(path)


class UserError(ValueError):
    """A mistake the user can fix; the message names the file, record or key and what to do."""


def unique_tmp(path: Path) -> Path:
    """A temporary name beside ``path`` that no other process or thread uses."""
    return path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}{TMP_SUFFIX}")


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """UTF-8 ``text`` through a temporary file and a rename; the temporary name is unique per
    process, so several export processes may write one file (the last rename wins). In a
    bucket an object appears whole when its upload completes, so it is written directly."""
    if is_remote(path):
        as_path(path).write_text(text, encoding="utf-8")
        return
    path = Path(path)
    tmp = unique_tmp(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def upload_tree(local: Path, remote) -> None:
    """Copies every file under ``local`` to the same names under ``remote`` (a bucket
    folder); each object appears whole once its upload completes."""
    for path in sorted(Path(local).rglob("*")):
        if path.is_file():
            as_path(remote).joinpath(*path.relative_to(local).parts).write_bytes(path.read_bytes())


def write_json_atomic(path: str | os.PathLike, payload: Any) -> None:
    """``payload`` as indented JSON, written as :func:`write_text_atomic` writes."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")
