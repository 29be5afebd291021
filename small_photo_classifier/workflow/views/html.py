"""The pieces report.html is made of: escaped text, numbers marked with the metrics.json
key they come from (the report test checks each against the file), embedded PNGs,
tables, the page."""

import base64
import html
import os
from typing import Iterable, List, Sequence

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:70em;color:#222;line-height:1.4}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ccc;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:left}th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.9em;color:#555}
code,pre{background:#f6f6f6;padding:.1em .3em}pre{padding:.6em;overflow-x:auto}
.note{color:#555}
"""


def esc(value) -> str:
    return html.escape(str(value))


def lookup(data: dict, key: str):
    """``data`` at a ``/``-separated key (None when any part is missing); a number
    indexes a list (``backbones/table/0/name``)."""
    for part in key.split("/"):
        if isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
            continue
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def number(data: dict, key: str, digits: int = 4) -> str:
    """The value at ``key`` formatted, marked with its key; a dash when absent."""
    value = lookup(data, key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "–"
    text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return f'<span data-metric="{esc(key)}">{text}</span>'


def image(path: str, caption: str) -> str:
    """A PNG embedded in the page (nothing when the file does not exist)."""
    if not path or not os.path.isfile(path):
        return ""
    with open(path, "rb") as f:
        data = base64.b64encode(f.read()).decode("ascii")
    return (f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """An HTML table; cells are HTML already (use `esc` for text)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def page(title: str, sections: List[str]) -> str:
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{_STYLE}</style></head><body>"
            f"<h1>{esc(title)}</h1>" + "".join(s for s in sections if s) + "</body></html>\n")
