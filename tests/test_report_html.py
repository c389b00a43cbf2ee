"""report/index.html in a real headless browser: self-contained, every cluster reachable page by page, every
image decoded. (The run's own report is checked in tests/test_export.py, after a real run.)"""
from __future__ import annotations

import re

import numpy as np

from raydc.htmlreport import PAGE_SIZE, ClusterEntry, image_uri, write_index
from tests.browser import artifact_dir, body_attrs, dump_dom, screenshot, sections


def _entries(n: int) -> list[ClusterEntry]:
    rng = np.random.default_rng(0)
    out = []
    for c in range(n):
        imgs = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(2)]
        out.append(ClusterEntry(c, int(rng.integers(1, 1000)), [image_uri(i) for i in imgs],
                                [f"photos/<b>{c}</b>/a.jpg", None], [10 * c, 10 * c + 1]))
    return out


def test_every_cluster_is_on_some_page_with_its_images(tmp_path):
    n = 2 * PAGE_SIZE + 7
    entries = _entries(n)
    index = write_index(tmp_path / "report", title="run x", config_text="cluster:\n  k: 107\n", pictures=[],
                        clusters=entries)
    page = index.read_text()
    assert not re.search(r'(src|href)="(https?:)?//', page), "the page fetches nothing from a network"
    seen = []
    for p in (1, 2, 3):
        dom = dump_dom(f"{index.as_uri()}#page={p}")
        body = body_attrs(dom)
        assert body["data-page"] == str(p)
        assert body.get("data-images-done") == "1", body
        assert int(body["data-images"]) > 0 and body["data-images-ok"] == body["data-images"], body
        seen += sections(dom)
        assert "&lt;b&gt;" in dom  # paths are text, never markup
    assert sorted(seen) == sorted((e.cluster, e.size) for e in entries)  # every cluster once, with its size
    assert [s for _, s in seen] == sorted((e.size for e in entries), reverse=True)  # largest first
    target = entries[-1].cluster  # a link to one cluster opens its page
    assert (target, entries[-1].size) in sections(dump_dom(f"{index.as_uri()}#cluster={target}"))
    screenshot(index.as_uri(), artifact_dir() / "report-synthetic.png")
