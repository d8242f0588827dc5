"""``jewelclf similar --html``: one self-contained page of thumbnails, query then its matches.

Thumbnails are small JPEGs embedded as ``data:`` URIs, so the page can be mailed or opened on
another machine; a file that cannot be read gets a grey placeholder instead of breaking it.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from jewelclf.errors import JewelclfError
from jewelclf.search.query import SimilarReport

THUMB_SIDE = 160

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.05em; margin: 1.6em 0 .4em; }
.row { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
figure { margin: 0; width: 168px; font-size: .8em; }
figure.query { border-right: 3px solid #888; padding-right: 10px; }
img, .missing { width: 160px; height: 160px; object-fit: contain; background: #f4f4f4;
  border: 1px solid #ddd; display: block; }
figcaption { word-break: break-all; } .sim { font-weight: bold; } .err { color: #a00; }
"""


def thumbnail_uri(path: str, side: int = THUMB_SIDE) -> str | None:
    """A ``data:image/jpeg`` URI of the image at ``path`` fitted into ``side`` px, or None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.seek(0)
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(background, im).convert("RGB")
            im.thumbnail((side, side))
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=80)
    except Exception:  # noqa: BLE001  unreadable or vanished: the page shows a placeholder
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def figure_html(path: str, caption: str, cls: str = "") -> str:
    """One ``<figure>``: the thumbnail of ``path`` (or a grey placeholder) over ``caption``."""
    uri = thumbnail_uri(path)
    img = (f'<img src="{uri}" alt="{html.escape(Path(path).name)}">' if uri
           else '<div class="missing"></div>')
    return f'<figure class="{cls}">{img}<figcaption>{caption}</figcaption></figure>'


def render_html(report: SimilarReport) -> str:
    """The whole page of ``report``: per query, its thumbnail then its matches'."""
    parts = [(f"<!doctype html><html><head><meta charset='utf-8'><title>jewelclf similar</title>"
              f"<style>{STYLE}</style></head><body>"),
             f"<h1>Most similar items in {html.escape(report.index)} (k={report.k})</h1>"]
    for q in report.queries:
        title = html.escape(q.query)
        if q.predicted_label is not None:
            title += f" &mdash; predicted {html.escape(q.predicted_label)} {q.predicted_score:.3f}"
        if q.restricted_to:
            title += f", {html.escape(q.restricted_to)} items only"
        parts.append(f"<h2>{title}</h2><div class='row'>")
        parts.append(figure_html(q.query, "query", "query"))
        for r in q.results:
            caption = (f"#{r['rank']} <span class='sim'>{r['similarity']:.3f}</span><br>"
                       f"{html.escape(r['label'])}<br>{html.escape(r['item'])}")
            parts.append(figure_html(r["file"], caption))
        if not q.results:
            parts.append("<p>no items</p>")
        parts.append("</div>")
    for e in report.errors:
        parts.append(f"<p class='err'>{html.escape(e['query'])}: {html.escape(e['error'])}</p>")
    parts.append("</body></html>\n")
    return "".join(parts)


def check_html_path(path: Path, index_dir: Path, overwrite: bool = False) -> Path:
    """Refuse an ``--html`` path inside the index folder (even with ``overwrite``), a folder, or
    an existing file without ``overwrite``. Links are followed, so no link leads into the index."""
    path = Path(path)
    index_root = Path(index_dir).resolve()
    target = path.resolve()
    if target == index_root or index_root in target.parents:
        raise JewelclfError(f"--html '{path}' is inside the index folder '{index_dir}'; write the "
                            f"page somewhere else, e.g. --html similar.html")
    if path.is_dir():
        raise JewelclfError(f"--html '{path}' is a folder; give a file path, e.g. "
                            f"--html {path / 'similar.html'}")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise JewelclfError(f"--html '{path}' already exists; pass --overwrite to replace it, "
                            f"or choose another file")
    return path


def write_html(report: SimilarReport, path: Path, overwrite: bool = False) -> Path:
    """Write the page of ``report`` to ``path`` atomically, checked by :func:`check_html_path`
    (again: the file may have appeared during the search)."""
    from jewelclf.fsio import atomic_write_text

    path = check_html_path(path, Path(report.index), overwrite)
    atomic_write_text(path, render_html(report))
    return path
