"""The report as a document: Sections of paragraphs, figures and Tables, rendered twice —
``summary.md`` (Markdown) and ``index.html`` (one self-contained page, PNGs by relative link)."""

from __future__ import annotations

import html
from typing import NamedTuple


class Table(NamedTuple):
    """A table shown in both summary.md and index.html."""

    caption: str
    headers: list[str]
    rows: list[list[str]]


class Section(NamedTuple):
    """A heading with paragraphs, figures (PNG file name, caption) and tables."""

    title: str
    paragraphs: list[str]
    figures: list[tuple[str, str]]
    tables: list[Table]


# ---- Markdown --------------------------------------------------------------------------------


def render_markdown(title: str, sections: list[Section]) -> str:
    """summary.md: headings, paragraphs, image links and pipe tables."""
    parts = [f"# {title}\n"]
    for section in sections:
        parts.append(f"## {section.title}\n")
        parts += [f"{p}\n" for p in section.paragraphs]
        parts += [f"![{caption}]({name})\n" for name, caption in section.figures]
        for table in section.tables:
            parts.append(f"**{table.caption}**\n")
            parts.append(_markdown_table(table))
    return "\n".join(parts)


def _markdown_table(table: Table) -> str:
    def row(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    lines = [row(table.headers), "|" + "---|" * len(table.headers)] + [row(r) for r in table.rows]
    return "\n".join(lines) + "\n"


# ---- HTML ------------------------------------------------------------------------------------

_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1500px}"
        "img{max-width:100%;border:1px solid #ddd}"
        "table{border-collapse:collapse;margin:1em 0;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
        "td{white-space:nowrap}td:last-child{white-space:normal;min-width:14em}"  # names on one line
        "td:first-child,td:last-child{text-align:left}"
        "caption{text-align:left;font-weight:bold;padding:4px 0}")


def render_html(title: str, sections: list[Section]) -> str:
    """index.html: one self-contained page; PNGs by relative link."""
    e = html.escape
    body = [f"<h1>{e(title)}</h1>"]
    for section in sections:
        body.append(f"<h2>{e(section.title)}</h2>")
        body += [f"<p>{e(p)}</p>" for p in section.paragraphs]
        body += [f'<figure><a href="{e(name)}"><img src="{e(name)}" alt="{e(caption)}"></a>'
                 f"<figcaption>{e(caption)}</figcaption></figure>" for name, caption in section.figures]
        body += [_html_table(table) for table in section.tables]
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            f"<title>{e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _html_table(table: Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in table.headers)
    rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in table.rows)
    return f"<table><caption>{e(table.caption)}</caption><tr>{head}</tr>{rows}</table>"
