"""`report/index.html`: one self-contained page to browse a run, every cluster of it, with no server and no
network (pictures and thumbnails are data: URIs, the script is inline).

The clusters are pages of `PAGE_SIZE`, largest first, rendered by a few lines of script from a JSON block, so
a run with 10,000 clusters opens as fast as one with 10 (the browser builds one page of DOM at a time). The
address says where the reader is (`#page=3`, `#cluster=17`), so a page can be linked and a test can open any
of them. Once every image of a page has decoded or failed to, `body[data-images-done]` is set and
`body[data-images-ok]` says how many decoded, out of `body[data-images]`: what the headless-browser test reads.

Thumbnails are capped in total (`THUMB_BUDGET`): every cluster shows its nearest images, fewer each when k is
large, so the file stays a few tens of MB at most.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

PAGE_SIZE = 50
THUMB_BUDGET = 10_000


@dataclass
class ClusterEntry:
    cluster: int
    size: int
    thumbs: list[str] = field(default_factory=list)   # data: URIs, nearest the centroid first
    paths: list[str | None] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    purity: str | None = None                          # "cat 80%" when the shards have labels


def thumbs_per_cluster(n_clusters: int, wanted: int) -> int:
    return max(1, min(wanted, THUMB_BUDGET // max(1, n_clusters)))


def image_uri(img: np.ndarray) -> str:
    """A uint8 HxW[xC] image as a data: URI (JPEG: a tenth of PNG's size for photos at thumbnail size)."""
    from PIL import Image

    a = np.asarray(img)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def file_uri(path: Path) -> str | None:
    if not path.is_file():
        return None
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(path.suffix.lower(), "image/png")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def write_index(report_dir: Path, *, title: str, config_text: str | None, pictures: list[Path],
                clusters: list[ClusterEntry], notes: list[str] = ()) -> Path:
    """Write `report_dir/index.html` (tmp then rename) and return its path."""
    clusters = sorted(clusters, key=lambda e: (-e.size, e.cluster))
    data = [{"c": e.cluster, "n": e.size, "t": e.thumbs, "p": e.paths, "i": e.ids, "u": e.purity} for e in clusters]
    figures = "".join(
        f'<figure class="pic"><img alt="{html.escape(p.stem)}" src="{uri}"><figcaption>{html.escape(p.name)}'
        f'</figcaption></figure>' for p in pictures if (uri := file_uri(p)))
    note_html = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    config = (f'<details><summary>config.yaml</summary><pre id="config">{html.escape(config_text)}</pre></details>'
              if config_text else "")
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    page = _TEMPLATE.format(title=html.escape(title), figures=figures, config=config, notes=note_html,
                            total=len(clusters), images=sum(e.size for e in clusters), page_size=PAGE_SIZE,
                            payload=payload)
    report_dir.mkdir(parents=True, exist_ok=True)
    final = report_dir / "index.html"
    tmp = final.with_name(f".index.html.tmp-{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, final)
    return final


_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.4em; }} .note {{ color: #a40; }}
.pics {{ display: flex; flex-wrap: wrap; gap: 1em; }} .pic img {{ max-width: 560px; }}
figure {{ margin: 0; }} figcaption {{ font-size: 0.75em; color: #555; word-break: break-all; }}
nav {{ position: sticky; top: 0; background: #fff; padding: 0.5em 0; border-bottom: 1px solid #ddd; }}
.cluster {{ border-bottom: 1px solid #eee; padding: 0.6em 0; }}
.cluster h3 {{ margin: 0 0 0.4em 0; font-size: 1em; }}
.thumbs {{ display: flex; flex-wrap: wrap; gap: 0.5em; }}
.thumb {{ width: 96px; }} .thumb img {{ width: 96px; height: 96px; object-fit: contain; background: #f4f4f4; }}
pre {{ background: #f7f7f7; padding: 0.8em; overflow: auto; }}
</style></head>
<body data-images="0" data-images-ok="0">
<h1>{title}</h1>
<p>{images} images in {total} clusters.</p>
{notes}
<div class="pics">{figures}</div>
{config}
<h2>Clusters (largest first)</h2>
<nav><button id="prev">&larr; previous</button>
 page <input id="page" type="number" min="1" value="1" style="width:5em"> of <span id="pages"></span>
 <button id="next">next &rarr;</button>
 &nbsp; go to cluster <input id="goto" type="number" min="0" style="width:6em"></nav>
<div id="clusters"></div>
<script type="application/json" id="data">{payload}</script>
<script>
(function () {{
  const data = JSON.parse(document.getElementById("data").textContent);
  const per = {page_size};
  const pages = Math.max(1, Math.ceil(data.length / per));
  const where = new Map(data.map((e, i) => [e.c, i]));
  document.getElementById("pages").textContent = pages;
  const esc = s => String(s).replace(/[&<>"]/g, ch => ({{"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}}[ch]));
  function show(page, focus) {{
    page = Math.min(Math.max(1, page), pages);
    document.getElementById("page").value = page;
    const html = data.slice((page - 1) * per, page * per).map(e => {{
      const thumbs = e.t.map((src, j) => `<figure class="thumb"><img src="${{src}}" alt="id ${{e.i[j]}}">` +
        `<figcaption>${{e.p[j] == null ? "id " + e.i[j] : esc(e.p[j])}}</figcaption></figure>`).join("");
      return `<section class="cluster" id="cluster-${{e.c}}" data-cluster="${{e.c}}" data-size="${{e.n}}">` +
        `<h3>cluster ${{e.c}} &middot; ${{e.n}} images${{e.u ? " &middot; " + esc(e.u) : ""}}</h3>` +
        `<div class="thumbs">${{thumbs}}</div></section>`;
    }}).join("");
    const box = document.getElementById("clusters");
    box.innerHTML = html;
    document.body.dataset.page = page;
    const imgs = Array.from(box.querySelectorAll("img"));
    document.body.dataset.images = imgs.length;
    document.body.dataset.imagesOk = 0;
    delete document.body.dataset.imagesDone;
    Promise.all(imgs.map(im => im.decode().then(() => 1, () => 0))).then(ok => {{
      document.body.dataset.imagesOk = ok.reduce((a, b) => a + b, 0);
      document.body.dataset.imagesDone = "1";
    }});
    if (focus != null) {{ const el = document.getElementById("cluster-" + focus); if (el) el.scrollIntoView(); }}
  }}
  function fromHash() {{
    const m = /cluster=(\\d+)/.exec(location.hash), p = /page=(\\d+)/.exec(location.hash);
    if (m && where.has(+m[1])) show(Math.floor(where.get(+m[1]) / per) + 1, +m[1]);
    else show(p ? +p[1] : 1);
  }}
  document.getElementById("prev").onclick = () => {{ location.hash = "page=" + (+document.body.dataset.page - 1); }};
  document.getElementById("next").onclick = () => {{ location.hash = "page=" + (+document.body.dataset.page + 1); }};
  document.getElementById("page").onchange = ev => {{ location.hash = "page=" + ev.target.value; }};
  document.getElementById("goto").onchange = ev => {{ location.hash = "cluster=" + ev.target.value; }};
  window.addEventListener("hashchange", fromHash);
  fromHash();
}})();
</script>
</body></html>
"""
