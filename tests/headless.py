"""Headless Chromium for the tests that look at a page: load it, let its scripts run, read back what a probe
script wrote into the page.

The browser is the one the project's setup installs (``make browser``: Debian's chromium; or
``MECHINTRO_BROWSER``). A test that needs it fails when it is missing; it does not skip, so a setup that
lost the browser cannot pass unseen. The probe is plain JavaScript appended to the page; it writes one JSON
value into ``<pre id="mechintro-probe">``, which Chromium's ``--dump-dom`` prints once the page's virtual
time budget has run out.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

PROBE_ID = "mechintro-probe"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)
"""Flags for a closed network: without the background-networking ones Chromium keeps dialling out."""


def chromium() -> str:
    """The browser's path; an AssertionError saying how to install it when there is none."""
    from mechintro.plots.browser import browser_path, hint

    found = browser_path()
    assert found, f"no Chrome/Chromium for the browser tests: {hint()}"
    return found


def probe_page(
    url: str, *, width: int = 900, height: int = 2000, budget_ms: int = 15000, timeout_s: float = 180
) -> Any:
    """Load ``url`` at ``width`` x ``height`` px and return the JSON the page's probe wrote."""
    with tempfile.TemporaryDirectory(prefix="mechintro-chromium-") as profile:
        done = subprocess.run(
            [
                chromium(),
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--virtual-time-budget={budget_ms}",
                "--dump-dom",
                url,
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    found = re.search(rf'<pre id="{PROBE_ID}">(.*?)</pre>', done.stdout, re.S)
    assert found, f"the page's probe wrote nothing (chromium exit {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


def with_probe(page: Path, script: str) -> Path:
    """A copy of ``page`` beside it with ``script`` appended; ``script`` must call ``report(value)``."""
    text = page.read_text()
    runner = (
        "<script>\nfunction report(value) {\n"
        f'  const pre = document.createElement("pre"); pre.id = "{PROBE_ID}";\n'
        "  pre.textContent = JSON.stringify(value); document.body.appendChild(pre);\n}\n"
        f"{script}\n</script>\n"
    )
    at = text.rfind("</body>")
    out = page.with_name(f"{page.stem}.probed{page.suffix}")
    out.write_text(text[:at] + runner + text[at:] if at >= 0 else text + runner)
    return out
