"""The wheels the GPU benchmarks need on a host without a registry: build, install, check.

    python -m benchmarks.wheelhouse build     # CPU machine (make wheelhouse): fills .whl/
    python -m benchmarks.wheelhouse install   # GPU host (benchmarks/gpu.sh): offline, a no-op
                                              # when everything imports already
    python -m benchmarks.wheelhouse check     # CPU machine (make wheelhouse-check)

``benchmarks/wheelhouse.txt`` lists the distributions (names only). ``build`` downloads one
CPython 3.12 manylinux x86_64 wheel of each (``pip download --no-deps --only-binary=:all:``,
versions from ``constraints.txt`` where it pins them); a distribution published only as an
sdist (``promise``) is built into a wheel here, which is refused unless the wheel is pure
Python. The folder must stay under ``CARRY_LIMIT_BYTES``, what the device tool carries.

``install`` first imports ``REQUIRED_MODULES``; only if one fails does it run ``pip install
--no-index --find-links .whl --no-deps -r benchmarks/wheelhouse.txt``: no dependency
resolution, and a distribution already installed (at any version) is skipped, so jax, torch
and everything else on the host stay as they are.

``check`` is the proof that the list is complete: a fresh venv of ``--python`` (3.12) gets
jax, flax, optax, orbax-checkpoint and chex from the registry (what the GPU host has, minus
torch, which the JAX side does not import), then ``install`` from the wheelhouse, then runs
``benchmarks.end_to_end --shape micro`` there (records, host pipeline, training loop, step).

This module imports nothing outside the standard library (it runs before the wheels are in).
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = REPO_ROOT / "benchmarks" / "wheelhouse.txt"
CONSTRAINTS = REPO_ROOT / "constraints.txt"
WHEELHOUSE = REPO_ROOT / ".whl"
CARRY_LIMIT_BYTES = 64 * 2**20
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_28_x86_64")
# What gpu.sh's benchmarks import that the host may lack (end_to_end's path).
REQUIRED_MODULES = (
    "grain",
    "ml_collections",
    "tensorboardX",
    "google_crc32c",
    "tqdm",
    "PIL",
    "tensorflow_datasets.proto",  # the tf.train.Example proto of data/records.py
)
# What the check's venv starts with: the GPU host's JAX stack, in pyproject's ranges.
HOST_PACKAGES = ("jax>=0.10.2,<0.12", "flax", "optax", "orbax-checkpoint", "chex")


def requirement_names(path: Path = REQUIREMENTS) -> list[str]:
    """The distribution names of ``wheelhouse.txt`` (comments and blank lines skipped)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def _fail(message: str) -> None:
    """A mistake of the person running this: one line, exit code 2, no traceback."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def _pip(python: str | Path, *args: str) -> None:
    command = [str(python), "-m", "pip", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def build(wheelhouse: Path = WHEELHOUSE) -> int:
    """Fills ``wheelhouse`` with a Python 3.12 wheel of every listed distribution; returns
    its size in bytes."""
    wheelhouse.mkdir(parents=True, exist_ok=True)
    for stale in wheelhouse.glob("*.whl"):
        stale.unlink()
    platform_args = [arg for p in PLATFORMS for arg in ("--platform", p)]
    target = [
        "--python-version",
        PYTHON_VERSION,
        "--implementation",
        "cp",
        "--abi",
        f"cp{PYTHON_VERSION.replace('.', '')}",
        *platform_args,
    ]
    for name in requirement_names():
        try:
            _pip(
                sys.executable,
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                *target,
                "-c",
                str(CONSTRAINTS),
                "-d",
                str(wheelhouse),
                name,
            )
        except subprocess.CalledProcessError:
            # No wheel published: build one from the sdist, which must be pure Python to
            # serve Python 3.12 on another machine.
            _pip(sys.executable, "wheel", "--quiet", "--no-deps", "-w", str(wheelhouse), name)
    impure = [
        w.name
        for w in wheelhouse.glob("*.whl")
        if "-none-any" not in w.name and f"cp{PYTHON_VERSION.replace('.', '')}" not in w.name
    ]
    if impure:
        _fail(f"wheels for another Python than {PYTHON_VERSION}: {impure}")
    size = sum(w.stat().st_size for w in wheelhouse.glob("*.whl"))
    print(f"{wheelhouse}: {len(list(wheelhouse.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB")
    if size > CARRY_LIMIT_BYTES:
        _fail(
            f"{wheelhouse} holds {size / 2**20:.1f} MiB, over the {CARRY_LIMIT_BYTES / 2**20:.0f} "
            "MiB the device tool carries: trim benchmarks/wheelhouse.txt"
        )
    for wheel in wheelhouse.glob("*.whl"):
        zipfile.ZipFile(wheel).testzip()  # a truncated download fails here, not on the GPU
    return size


def missing_modules() -> list[str]:
    """The ``REQUIRED_MODULES`` that do not import here."""
    missing = []
    for module in REQUIRED_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    return missing


def install(wheelhouse: Path = WHEELHOUSE, python: str | Path = sys.executable) -> None:
    """Installs the missing distributions offline from ``wheelhouse`` (module docstring)."""
    if Path(python) == Path(sys.executable):
        missing = missing_modules()
        if not missing:
            print("wheelhouse: every module the benchmarks need imports; nothing to install")
            return
        print(f"wheelhouse: missing {missing}; installing from {wheelhouse}", flush=True)
    if not any(wheelhouse.glob("*.whl")):
        _fail(
            f"{wheelhouse} has no wheels: run `make wheelhouse` on a machine with a registry "
            "and carry .whl to this one"
        )
    _pip(
        python,
        "install",
        "--quiet",
        "--no-index",
        "--find-links",
        str(wheelhouse),
        "--no-deps",
        "-r",
        str(REQUIREMENTS),
    )


def check(python: str, wheelhouse: Path = WHEELHOUSE, keep: Path | None = None) -> None:
    """Builds a venv like the GPU host's JAX side, installs the wheelhouse into it and runs
    the end-to-end benchmark there (module docstring)."""
    try:
        version = subprocess.run(
            [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        version = None
    if version != PYTHON_VERSION:
        _fail(
            f"--python {python} is not a working Python {PYTHON_VERSION} (got {version}); pass "
            f"the path of one (make wheelhouse-check PYTHON312=/path/to/python{PYTHON_VERSION})"
        )
    venv = keep or Path(tempfile.mkdtemp(prefix="protomask_wheelhouse_check_"))
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    venv_python = venv / "bin" / "python"
    _pip(venv_python, "install", "--quiet", *HOST_PACKAGES)
    install(wheelhouse, venv_python)
    subprocess.run(
        [
            str(venv_python),
            "-c",
            "import sys, jax; from benchmarks import wheelhouse as w; "
            "print('python', sys.version.split()[0], 'jax', jax.__version__); "
            "missing = w.missing_modules(); print('missing modules:', missing); "
            "sys.exit(bool(missing))",
        ],
        check=True,
        cwd=REPO_ROOT,
    )
    out_dir = Path(tempfile.mkdtemp(prefix="protomask_wheelhouse_check_out_"))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run(
        [
            str(venv_python),
            "-m",
            "benchmarks.end_to_end",
            "--shape",
            "micro",
            "--out_dir",
            str(out_dir),
            # Fresh records: the export runs in the venv too, not a leftover of another run.
            "--data_dir",
            str(out_dir / "data"),
        ],
        check=True,
        cwd=REPO_ROOT,
        env=env,
    )
    print(f"wheelhouse check passed: {venv} ran benchmarks.end_to_end (JSON in {out_dir})")


def _default_python() -> str:
    """A pyenv-installed CPython 3.12 if there is one (as on the build machines), else the
    ``python3.12`` on the PATH."""
    found = sorted(Path.home().glob(f".pyenv/versions/{PYTHON_VERSION}.*/bin/python"))
    return str(found[-1]) if found else f"python{PYTHON_VERSION}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("build", "install", "check"))
    parser.add_argument("--wheelhouse", type=Path, default=WHEELHOUSE)
    parser.add_argument(
        "--python",
        default=_default_python(),
        help=f"check: the Python {PYTHON_VERSION} to build the venv from",
    )
    parser.add_argument("--venv", type=Path, default=None, help="check: keep the venv here")
    args = parser.parse_args(argv)
    if args.action == "build":
        build(args.wheelhouse)
    elif args.action == "install":
        install(args.wheelhouse)
    else:
        check(args.python, args.wheelhouse, args.venv)


if __name__ == "__main__":
    main()
