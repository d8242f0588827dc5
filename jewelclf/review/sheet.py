"""``jewelclf review``'s contact sheet: one self-contained page of the suspected label errors.

Built from the pieces of ``similar --html`` (:mod:`jewelclf.search.html`): the same embedded
thumbnails and figure layout. Every string from the data (paths, labels, the run's name) is
HTML-escaped, so a file named ``<script>.jpg`` shows as text.
"""

from __future__ import annotations

import html
from typing import Any

from jewelclf.search.html import STYLE as _STYLE
from jewelclf.search.html import figure_html as _figure

SHEET_LIMIT = 500
"""Suspects shown with a thumbnail at most; ``label_issues.csv`` lists them all."""

_EXTRA_STYLE = ".given { color: #a00; } .suggested { color: #060; } .note { color: #555; }"


def _issue_caption(rank: int, issue: dict[str, Any]) -> str:
    return (f"#{rank} <span class='sim'>{issue['score']:.3f}</span> ({html.escape(issue['split'])})"
            f"<br>given <span class='given'>{html.escape(issue['given_label'])}</span>"
            f"<br>suggested <span class='suggested'>{html.escape(issue['suggested_label'])}</span>"
            f"<br>{html.escape(issue['path'])}")


def render_sheet(issues: list[dict[str, Any]], conflicts: list[dict[str, Any]],
                 summary: dict[str, Any], files: dict[str, str]) -> str:
    """The page: the suspects, most suspicious first, then the near-duplicate groups whose
    images carry different labels. ``files`` maps a run path (``splits.csv``) to its file."""
    esc = html.escape
    head = (f"<!doctype html><html><head><meta charset='utf-8'><title>jewelclf review</title>"
            f"<style>{_STYLE}{_EXTRA_STYLE}</style></head><body>")
    note = (f"<p class='note'>{summary['label_issues']} of {summary['reviewed']} "
            f"{esc('+'.join(summary['reviewed_splits']))} images, most suspicious first. Score: "
            f"the out-of-fold probability of the given label ({esc(summary['ranked_by'])}); "
            f"{summary['folds']}-fold {esc(summary['head'])} head on the stage-1 features "
            f"({esc(summary['features'])}).</p>")
    parts = [head, f"<h1>Likely label errors in {esc(str(summary['run']))}</h1>", note,
             "<div class='row'>"]
    for rank, issue in enumerate(issues[:SHEET_LIMIT], 1):
        parts.append(_figure(issue["file"], _issue_caption(rank, issue)))
    if not issues:
        parts.append("<p>no likely label errors</p>")
    parts.append("</div>")
    if len(issues) > SHEET_LIMIT:
        parts.append(f"<p class='note'>{len(issues) - SHEET_LIMIT} more in label_issues.csv</p>")
    parts.append(f"<h2>Near-duplicate images under different labels ({len(conflicts)})</h2>")
    for n, group in enumerate(conflicts, 1):
        parts.append(f"<h2>group {n}: {esc(group['kind'])}, labels "
                     f"{esc(', '.join(group['labels']))}</h2><div class='row'>")
        for f in group["files"]:
            caption = f"{esc(f['label'])} ({esc(str(f['split']))})<br>{esc(f['file'])}"
            parts.append(_figure(files.get(f["file"], ""), caption))
        parts.append("</div>")
    parts.append("</body></html>\n")
    return "".join(parts)
