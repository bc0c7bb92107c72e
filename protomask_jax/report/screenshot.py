r"""A PNG screenshot of a report page with headless Chromium (for docs and visual checks).

Command::

    python -m protomask_jax.report.screenshot workdirs/demo/report/index.html shot.png \
        [--width 1400] [--height 2000]

Chromium runs with a throw-away profile, no sandbox (root in containers), no GPU, and every
background network feature off, so it renders the local file and contacts nothing. On Debian
``apt-get install -y chromium`` provides it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_QUIET_FLAGS = (
    "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --hide-scrollbars "
    "--disable-background-networking --disable-component-update --disable-sync"
).split()


def find_chromium() -> str | None:
    """Path of a Chromium-family browser on ``PATH``, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(
    html_path: str | Path,
    png_path: str | Path,
    *,
    width: int = 1400,
    height: int = 2000,
    chromium: str | None = None,
    timeout_s: float = 120.0,
) -> Path:
    """Saves the top ``width x height`` CSS pixels of the page in a (default: the first found)
    Chromium. FileNotFoundError: no page or no browser; RuntimeError: the browser failed."""
    html_path = Path(html_path).resolve()
    png_path = Path(png_path).resolve()
    if not html_path.exists():
        raise FileNotFoundError(f"{html_path} does not exist; write the report first.")
    browser = chromium or find_chromium()
    if browser is None:
        raise FileNotFoundError(
            "no Chromium found on PATH (tried " + ", ".join(CHROMIUM_NAMES) + "); on Debian "
            "or Ubuntu: apt-get install -y chromium"
        )
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="protomask-chromium-") as profile:
        command = [
            browser,
            *_QUIET_FLAGS,
            f"--user-data-dir={profile}",
            f"--screenshot={png_path}",
            f"--window-size={width},{height}",
            html_path.as_uri(),
        ]
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    if completed.returncode != 0 or not png_path.exists():
        raise RuntimeError(
            f"{browser} exited with {completed.returncode} and "
            f"{'wrote' if png_path.exists() else 'did not write'} {png_path}:\n"
            + completed.stderr[-2000:]
        )
    return png_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html", help="the report page, e.g. workdirs/demo/report/index.html")
    parser.add_argument("png", help="the screenshot to write")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=2000)
    args = parser.parse_args(argv)
    try:
        path = screenshot(args.html, args.png, width=args.width, height=args.height)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"screenshot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
