"""The visual report: one self-contained HTML page of an evaluation (``report.html``).

Everything is inline: the plots and the example images are ``data:`` URIs, the style is
one ``<style>`` block, there is no script and no external reference, so the page opens
offline, from an e-mail attachment or a CI artefact. It shows the compatibility matrix
per direction (the same numbers as ``metrics.json``: every figure carries the JSON path
it comes from in ``data-key``), the backfill curves with their AUC per ordering, and a
few example queries with their top results under old→old, adapter→old and new→new.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .io import atomic_write_text
from .report import BACKFILLS, _fmt

HTML_FILE = "report.html"
THUMBNAIL = 96  # px, the longer side of an example image
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img.plot { max-width: 100%; border: 1px solid #eee; }
.example { margin-bottom: 1.2em; }
.hits { display: flex; gap: 0.4em; align-items: flex-start; margin: 0.2em 0; }
.hit { border: 3px solid #ddd; padding: 2px; max-width: 12em; font-size: 0.85em; }
.hit.relevant { border-color: #2a2; }
.cell-name { width: 9em; font-family: monospace; }
"""

ImageSource = Callable[[str], bytes | None]
"""Image id -> PNG bytes of a thumbnail (None when the id has no image to show)."""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def thumbnails(eval_set: Any) -> ImageSource:
    """Thumbnails of an evaluation set's images by id, as PNG bytes."""
    position = {str(identifier): index for index, identifier in enumerate(eval_set.ids)}

    def source(identifier: str) -> bytes | None:
        if identifier not in position:
            return None
        image = eval_set.load_images([position[identifier]])[0].convert("RGB")
        image.thumbnail((THUMBNAIL, THUMBNAIL))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    return source


def _number(value: Any, key: str, digits: int = 1) -> str:
    return f'<td data-key="{html.escape(key)}">{_fmt(value, digits)}</td>'


def _matrix(report: dict) -> list[str]:
    ks = [str(k) for k in report["ks"]]
    parts = []
    for direction in dict.fromkeys(cell["direction"] for cell in report["cells"]):
        parts += [f"<h3>{html.escape(direction)}</h3>", "<table><tr><th>cell</th><th>role</th>"
                  + "".join(f"<th>R@{k}</th>" for k in ks) + "".join(f"<th>gap@{k}</th>" for k in ks) + "</tr>"]
        for index, cell in enumerate(report["cells"]):
            if cell["direction"] != direction:
                continue
            gap = cell["gap_recovered"] or {}
            parts.append(f"<tr><td>{html.escape(cell['name'])}</td><td>{html.escape(cell['role'])}</td>"
                         + "".join(_number(cell["recall"][k], f"cells.{index}.recall.{k}") for k in ks)
                         + "".join(_number(gap.get(k), f"cells.{index}.gap_recovered.{k}", 2) for k in ks) + "</tr>")
        parts.append("</table>")
    return parts


def _backfill(report: dict) -> list[str]:
    parts = []
    for key, title in BACKFILLS.items():
        for direction, curve in (report.get(key) or {}).items():
            parts += [f"<h3>{html.escape(title)}, {html.escape(direction)}</h3>",
                      "<table><tr><th>ordering</th><th>merge</th>"
                      + "".join(f"<th>AUC R@{k}</th>" for k in next(iter(curve["orderings"].values()))["auc"])
                      + "</tr>"]
            for name, values in curve["orderings"].items():
                parts.append(f"<tr><td>{html.escape(name)}</td><td>{values['merge']}</td>"
                             + "".join(_number(v, f"{key}.{direction}.orderings.{name}.auc.{k}")
                                       for k, v in values["auc"].items()) + "</tr>")
            parts.append("</table>")
    return parts


def _item(identifier: str, text: str | None, images: ImageSource | None, relevant: bool | None = None) -> str:
    classes = "hit" + (" relevant" if relevant else "")
    png = None if text is not None or images is None else images(identifier)
    body = (f'<img alt="{html.escape(identifier)}" src="{_data_uri(png)}">' if png is not None
            else html.escape(text if text is not None else identifier))
    return f'<div class="{classes}" title="{html.escape(identifier)}">{body}</div>'


def _examples(report: dict, images: ImageSource | None) -> list[str]:
    parts = []
    for direction, entries in (report.get("examples") or {}).items():
        parts.append(f"<h3>{html.escape(direction)}</h3>")
        for entry in entries:
            query = entry["query"]
            parts.append('<div class="example"><div class="hits"><span class="cell-name">query</span>'
                         + _item(query["id"], query["text"], images) + "</div>")
            for name, hits in entry["hits"].items():
                parts.append(f'<div class="hits"><span class="cell-name">{html.escape(name)}</span>'
                             + "".join(_item(h["id"], h["text"], images, h["relevant"]) for h in hits) + "</div>")
            parts.append("</div>")
    return parts


def render_html(report: dict, plots: dict[str, Path], images: ImageSource | None = None) -> str:
    """The page as a string; ``plots`` maps a plot's kind to its PNG file (as :func:`xbt.report.write_report`
    returns them), ``images`` gives the example images (without it, example images show their ids)."""
    figures = [f'<h3>{html.escape(kind)}</h3><img class="plot" alt="{html.escape(kind)}" '
               f'src="{_data_uri(Path(path).read_bytes())}">'
               for kind, path in plots.items() if Path(path).suffix == ".png"]
    dataset = report.get("dataset", {})
    body = [f"<h1>xbt evaluation</h1><p>{html.escape(str(dataset.get('source', 'stored vectors')))}: "
            f"{dataset.get('images', '–')} images, {dataset.get('captions', '–')} captions; xbt "
            f"{html.escape(str(report.get('xbt_version')))}. A green frame marks a relevant result.</p>",
            "<h2>Compatibility matrix</h2>", *_matrix(report), "<h2>Plots</h2>", *figures,
            "<h2>Backfill</h2>", *_backfill(report), "<h2>Example queries</h2>", *_examples(report, images)]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>xbt evaluation</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_html(report: dict, output: str | Path, plots: dict[str, Path], images: ImageSource | None = None) -> Path:
    """Write ``report.html`` into ``output``; returns its path."""
    path = Path(output) / HTML_FILE
    atomic_write_text(path, render_html(report, plots, images))
    return path
