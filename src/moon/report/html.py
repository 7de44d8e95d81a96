"""Small HTML builders for the report: escaped text, tables with right-aligned numbers, notes,
and images embedded as data URIs, so the report is one file that opens anywhere."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

from PIL import Image, ImageOps

from moon.io.images import decode

THUMB_SIDE = 96  # gallery thumbnails: small enough to keep the file light, large enough to recognise a product
THUMB_QUALITY = 85

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; vertical-align: top; }
th { background: #f4f4f4; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ci { color: #777; font-size: .85em; }
.note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .4em .8em; }
.real { background: #e8f4fd; border-left: 4px solid #1e88e5; padding: .4em .8em; font-weight: bold; }
.query { display: flex; gap: .6em; align-items: flex-start; margin: .8em 0; }
.query figure { margin: 0; text-align: center; font-size: .75em; width: 104px; }
.query figure img { border: 4px solid transparent; }
.query figure.photo img { border-color: #999; }
.query figure.hit img { border-color: #2e7d32; }
.query figure.hit figcaption { color: #2e7d32; font-weight: bold; }
.query figure.bought { margin-left: 1.5em; }
.query figure.bought img { border: 4px dashed #bbb; }
"""


@dataclass
class Section:
    """One <h2> section of the report and the headline numbers it adds to metrics.json."""

    id: str
    title: str
    body: str
    metrics: dict = field(default_factory=dict)

    def html(self) -> str:
        return f'<section>\n<h2 id="{self.id}">{escape(self.title)}</h2>\n{self.body}\n</section>'


def text(value: object) -> str:
    return escape(str(value))


def note(message: str) -> str:
    """A short note for a missing piece, e.g. 'not run yet: run `moon pairs`'; backticks become <code>."""
    parts = escape(message).split("`")
    return '<p class="note">' + "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts)) + "</p>"


def not_run(what: str, command: str) -> str:
    return note(f"{what}: not run yet: run `{command}`")


def number(value: object, digits: int = 3) -> str:
    """Ints with thousands separators; floats to `digits` decimals, fewer as they grow (a rate, a duration)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return text(value)
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.{digits}f}"


def value_with_ci(value: float, ci: Sequence[float] | None) -> str:
    shown = number(value)
    return f'{shown} <span class="ci">[{number(ci[0])}, {number(ci[1])}]</span>' if ci else shown


def table(columns: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An HTML table; numbers (and `Html.num` cells) are right-aligned, other strings escaped."""
    head = "".join(f"<th>{text(c)}</th>" for c in columns)
    body = "\n".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}\n</table>"


class Html(str):
    """Markup to put in a table cell as is; `Html.num` cells are right-aligned like numbers."""

    numeric = False

    @classmethod
    def num(cls, markup: str) -> Html:
        cell = cls(markup)
        cell.numeric = True
        return cell


def _cell(value: object) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f'<td class="num">{number(value)}</td>'
    if isinstance(value, Html):
        return f'<td class="num">{value}</td>' if value.numeric else f"<td>{value}</td>"
    return f"<td>{text(value)}</td>"


def img(data: bytes, mime: str, width: int, height: int, alt: str, kind: str) -> str:
    """An <img> with the bytes inline; `kind` (plot, thumb) lets a reader (or a test) tell them apart."""
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return f'<img src="{uri}" width="{width}" height="{height}" alt="{text(alt)}" data-kind="{kind}">'


def thumbnail(image: bytes, alt: str) -> str:
    """An image re-encoded as a small JPEG (longest side THUMB_SIDE) and embedded."""
    small = ImageOps.contain(decode(image), (THUMB_SIDE, THUMB_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=THUMB_QUALITY)
    return img(buffer.getvalue(), "image/jpeg", small.width, small.height, alt, "thumb")


def page(title: str, header: str, sections: Sequence[Section]) -> str:
    nav = " · ".join(f'<a href="#{s.id}">{text(s.title)}</a>' for s in sections)
    body = "\n".join(s.html() for s in sections)
    return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{text(title)}</title>\n'
            f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{text(title)}</h1>\n{header}\n<nav>{nav}</nav>\n"
            f"{body}\n</body>\n</html>\n")
