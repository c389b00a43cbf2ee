"""Screenshot of TensorBoard showing a run's tracked rounds, for the README (docs/img/tensorboard-run.png).

TensorBoard itself is not one of raydc's dependencies (the tracker writes its files through tensorboardX, which
Ray installs), so this takes the `tensorboard` executable of any environment:

    python -m venv /tmp/tb && /tmp/tb/bin/pip install tensorboard
    python tools/tensorboard_screenshot.py --tensorboard /tmp/tb/bin/tensorboard \
        --logdir runs/demo-tracked/tensorboard --out docs/img/tensorboard-run.png

It starts TensorBoard on a free 127.0.0.1 port, waits until it serves the run, and has headless Chromium
(`make browser`) draw its time-series page; TensorBoard is stopped on the way out.
"""
from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_runs(url: str, timeout: float) -> str:
    """TensorBoard answers before it has read the event files: wait until its run list is not empty."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/data/runs", timeout=5) as r:
                last = r.read().decode()
            if last.strip() not in ("", "[]"):
                return last
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"TensorBoard at {url} listed no run within {timeout:.0f} s (last answer: {last!r})")


def page_url(url: str, tags: str) -> str:
    """The Scalars dashboard, unsmoothed, filtered to `tags` (it reads its state from the address's hash)."""
    from urllib.parse import quote

    return f"{url}/#scalars&_smoothingWeight=0&_ignoreYOutliers=false" + (f"&tagFilter={quote(tags)}" if tags else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensorboard", default=shutil.which("tensorboard"), help="the tensorboard executable")
    ap.add_argument("--logdir", required=True, help="a run's tensorboard directory, or a folder of runs")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--size", default="1400,1000", help="window width,height in pixels")
    ap.add_argument("--tags", default="", help="TensorBoard's tag filter, a regex (e.g. 'acc|nmi|loss')")
    ap.add_argument("--budget-ms", type=int, default=20000, help="Chromium's virtual time for the page to draw")
    args = ap.parse_args(argv)
    if not args.tensorboard:
        ap.error("no tensorboard executable: pip install tensorboard (any environment) and pass --tensorboard")
    browser = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                   None)
    if browser is None:
        ap.error("no headless Chromium: `make browser` installs Debian's chromium")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    tb = subprocess.Popen([args.tensorboard, "--logdir", args.logdir, "--host", "127.0.0.1", "--port", str(port),
                           "--reload_interval", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        print("runs:", wait_for_runs(url, 120))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="raydc-chromium-") as profile:
            subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                            "--no-first-run", f"--user-data-dir={profile}", "--hide-scrollbars",
                            f"--virtual-time-budget={args.budget_ms}", f"--window-size={args.size}",
                            f"--screenshot={args.out}", page_url(url, args.tags)],
                           check=True, capture_output=True, text=True, timeout=300)
    finally:
        tb.terminate()
        try:
            tb.wait(timeout=20)
        except subprocess.TimeoutExpired:
            tb.kill()
    if not args.out.exists() or args.out.stat().st_size < 5000:
        raise SystemExit(f"Chromium wrote no usable screenshot at {args.out}")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
