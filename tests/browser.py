"""Headless Chromium (Debian's `chromium` package, `make browser`) for the report tests: load a page, run its
script, read the DOM back, take a screenshot. Tests skip, saying why, where no Chromium is installed."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.conftest import REPO


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("no headless Chromium here: `make browser` (apt-get install chromium) to run the report's "
                "browser test")


def _run(url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="raydc-chromium-") as profile:
        # --no-sandbox: tests may run as root in a container, where Chromium's sandbox cannot start.
        budget = [] if any(a.startswith("--virtual-time-budget") for a in args) else ["--virtual-time-budget=10000"]
        cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", f"--user-data-dir={profile}", *budget, *args, url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)


def dump_dom(url: str, tries: int = 4) -> str:
    """The page's DOM after its script ran and every image decoded or failed (the page sets
    `body[data-images-done]`). Image decoding runs outside Chromium's virtual time, so on a loaded machine a
    dump can come first: it is taken again, with more time, until the page says it is done."""
    for attempt in range(tries):
        dom = _run(url, "--dump-dom", f"--virtual-time-budget={10000 * 2 ** attempt}").stdout
        if 'data-images-done="1"' in dom:
            break
    return dom


def screenshot(url: str, out: Path, size: str = "1280,1600") -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    _run(url, f"--screenshot={out}", f"--window-size={size}", "--hide-scrollbars")
    assert out.stat().st_size > 1000, "an empty screenshot"
    return out


def artifact_dir() -> Path:
    """Where tests keep what a person looks at afterwards ($RAYDC_TEST_ARTIFACTS, else test-artifacts/)."""
    return Path(os.environ.get("RAYDC_TEST_ARTIFACTS") or REPO / "test-artifacts")


def body_attrs(dom: str) -> dict[str, str]:
    m = re.search(r"<body([^>]*)>", dom)
    assert m, dom[:500]
    return dict(re.findall(r'([\w-]+)="([^"]*)"', m.group(1)))


def sections(dom: str) -> list[tuple[int, int]]:
    """(cluster, size) of every cluster section rendered."""
    return [(int(c), int(n)) for c, n in re.findall(r'data-cluster="(\d+)" data-size="(\d+)"', dom)]
