"""The browser plotly needs for static figures (kaleido renders PNG through Chrome or Chromium).

Nothing is downloaded at run time. Which browser is used:

* ``MECHINTRO_BROWSER=none`` hides any browser: figures are written as HTML only (CI uses this to check the
  degraded path on a machine that has a browser);
* ``MECHINTRO_BROWSER=/path/to/chrome`` uses that executable;
* otherwise the first Chrome/Chromium kaleido would find (``BROWSER_PATH``, ``PATH``, the usual install
paths).

Without a browser, :func:`mechintro.plots.save.save_figure` still writes the HTML and says once how to
get PNGs.
``python -m mechintro.plots.browser --install`` (``make browser``) installs Debian's ``chromium`` when run as
root
on
Debian, and otherwise prints what to do; it never fails the caller.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["ENV", "browser_path", "hint", "install", "png_available", "warn_once"]

ENV = "MECHINTRO_BROWSER"
"""Environment switch: ``none`` (no browser), a path, or unset (find one)."""

_warned: set[str] = set()


def browser_path() -> str | None:
    """The browser PNG export will use, or None (hidden with ``MECHINTRO_BROWSER=none``, or not installed)."""
    chosen = os.environ.get(ENV, "").strip()
    if chosen.lower() == "none":
        return None
    if chosen:
        return chosen if Path(chosen).is_file() and os.access(chosen, os.X_OK) else None
    try:
        from choreographer.browsers.chromium import Chromium
    except ImportError:  # kaleido's browser finder is not installed
        return None
    return Chromium.find_browser(skip_local=False)


def png_available() -> bool:
    """True when static figures (PNG, SVG, PDF) can be written."""
    return browser_path() is not None


def hint() -> str:
    """How to get a browser for PNG figures, for this machine."""
    if os.environ.get(ENV, "").strip().lower() == "none":
        return f"{ENV}=none hides the browser; unset it to write PNG figures"
    if os.environ.get(ENV, "").strip():
        return f"{ENV}={os.environ[ENV]!r} is not an executable; point it at Chrome or Chromium"
    if _can_apt():
        return "run `make browser` (installs Debian's chromium), or set MECHINTRO_BROWSER=/path/to/chrome"
    return (
        "install Chrome or Chromium (e.g. `sudo apt-get install chromium` on Debian/Ubuntu) or set "
        "MECHINTRO_BROWSER=/path/to/chrome"
    )


def warn_once(what: str) -> None:
    """Print, once per process, that ``what`` is written as HTML only, and how to get PNGs."""
    if "png" in _warned:
        return
    _warned.add("png")
    print(
        f"note: no browser for static figures, so {what} is written as HTML only; {hint()}", file=sys.stderr
    )


def _can_apt() -> bool:
    return sys.platform.startswith("linux") and shutil.which("apt-get") is not None and os.geteuid() == 0


def install(*, quiet: bool = False) -> int:
    """Find a browser, or install Debian's chromium as root; otherwise explain. Always returns 0."""
    say = (lambda _msg: None) if quiet else print
    if os.environ.get(ENV, "").strip().lower() == "none":
        say(f"{ENV}=none: figures will be HTML only; not looking for a browser")
        return 0
    found = browser_path()
    if found:
        say(f"browser for PNG figures: {found}")
        return 0
    if not _can_apt():
        say(f"no Chrome/Chromium found; figures will be HTML only. To get PNGs: {hint()}")
        return 0
    say("no Chrome/Chromium found: installing Debian's chromium (apt-get, as root)")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    ok = subprocess.run(cmd, env=env, check=False).returncode == 0
    if not ok:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=False)
        ok = subprocess.run(cmd, env=env, check=False).returncode == 0
    found = browser_path()
    say(
        f"browser for PNG figures: {found}"
        if found
        else "chromium could not be installed; figures will be HTML only"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mechintro.plots.browser", description=__doc__)
    parser.add_argument(
        "--install", action="store_true", help="install Debian's chromium when missing (root)"
    )
    args = parser.parse_args(argv)
    if args.install:
        return install()
    print(browser_path() or f"none ({hint()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
