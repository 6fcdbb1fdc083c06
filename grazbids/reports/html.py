"""Self-contained HTML: images embedded as base64, inline CSS, no scripts, nothing fetched.

Every report is one file that can be mailed or archived on its own; links between
reports and to derivatives are relative paths inside the output folder.
"""
from __future__ import annotations

import base64
import html
import math
import numbers
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

from ..utils.atomic import write_text

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto;
       max-width: 1150px; padding: 0 1.5em 3em; color: #222; line-height: 1.45; }
header { border-bottom: 2px solid #444; margin-bottom: 1em; }
nav { font-size: 0.9em; margin: 0.4em 0 0.8em; }
nav a { margin-right: 1.2em; }
h1 { margin: 0.6em 0 0.2em; }
h2 { border-bottom: 1px solid #bbb; margin-top: 1.8em; }
h3 { margin-top: 1.4em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f0f0f0; }
div.scroll { overflow-x: auto; max-width: 100%; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 0.6em 0 1.2em; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { font-size: 0.85em; color: #555; margin-top: 0.3em; }
.note { font-size: 0.9em; color: #555; }
.warn { color: #a40000; font-weight: bold; }
.bar { display: inline-block; height: 0.8em; background: #c0392b; vertical-align: middle; }
ul.files { font-size: 0.85em; columns: 2; }
"""


def escape(value) -> str:
    return html.escape(str(value), quote=True)


def format_value(value, digits: int = 3) -> str:
    """Numbers with `digits` decimals (integers as such); NaN as n/a."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        if math.isnan(value):
            return "n/a"
        return f"{value:.{digits}f}"
    return str(value)


def png_img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{escape(alt)}">'


def figure(png: bytes, caption: str) -> str:
    return f"<figure>{png_img(png, caption)}<figcaption>{escape(caption)}</figcaption></figure>"


def heading(level: int, text: str, anchor: str | None = None) -> str:
    ident = f' id="{escape(anchor)}"' if anchor else ""
    return f"<h{level}{ident}>{escape(text)}</h{level}>"


def paragraph(text: str, css_class: str | None = None) -> str:
    cls = f' class="{css_class}"' if css_class else ""
    return f"<p{cls}>{escape(text)}</p>"


def link(href: str, text: str) -> str:
    return f'<a href="{escape(href)}">{escape(text)}</a>'


def relative_href(target: str | os.PathLike, report_dir: str | os.PathLike) -> str:
    """POSIX relative path from the report's folder to `target` (for href)."""
    return Path(os.path.relpath(os.path.abspath(target), os.path.abspath(report_dir))).as_posix()


def key_value_table(rows: Mapping[str, object] | Iterable[tuple[str, object]]) -> str:
    """Two-column table; values are escaped unless wrapped in `Raw`."""
    items = rows.items() if isinstance(rows, Mapping) else rows
    body = "".join(f"<tr><th>{escape(k)}</th><td>{v if isinstance(v, Raw) else escape(format_value(v))}</td></tr>"
                   for k, v in items)
    return f"<table>{body}</table>"


class Raw(str):
    """HTML that is inserted as is (already escaped or built here)."""


def _cell(value, tag: str = "td") -> str:
    if isinstance(value, Raw):
        return f"<{tag}>{value}</{tag}>"
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    cls = ' class="num"' if is_number else ""
    return f"<{tag}{cls}>{escape(format_value(value))}</{tag}>"


def data_table(frame: pd.DataFrame, links: Mapping[str, Mapping[str, str]] | None = None) -> str:
    """A DataFrame as a table; `links[column][value]` makes that cell a relative link."""
    links = links or {}
    head = "".join(f"<th>{escape(c)}</th>" for c in frame.columns)
    rows = []
    for record in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, record):
            href = links.get(column, {}).get(value) if isinstance(value, str) else None
            cells.append(_cell(Raw(link(href, value)) if href else _number(value)))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    # wide tables scroll inside the page instead of overflowing it
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>")


def _number(value):
    """numpy scalars as Python numbers, so that they are formatted as numbers."""
    return value.item() if hasattr(value, "item") else value


def probability_bar(probability: float) -> Raw:
    width = max(0.0, min(1.0, float(probability))) * 12
    return Raw(f'<span class="bar" style="width:{width:.2f}em"></span> {probability:.3f}')


def page(title: str, body: str, nav: Iterable[tuple[str, str]] = ()) -> str:
    nav_html = " ".join(link(href, text) for href, text in nav)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>{escape(title)}</h1><nav>{nav_html}</nav></header>\n{body}\n</body>\n</html>\n"
    )


def write_page(path: str | os.PathLike, title: str, body: str,
               nav: Iterable[tuple[str, str]] = ()) -> Path:
    """Write the page atomically (readers never see half a report)."""
    return write_text(path, page(title, body, nav))
