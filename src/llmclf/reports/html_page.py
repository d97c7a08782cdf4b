"""report.html: the report's blocks as one self-contained page (CSS inline, images as data URIs).

Laid out for any width and for print:
- the page never scrolls sideways, down to a 390 px phone: a table sits in its own box that scrolls
  (`.scroll`), long texts wrap, a text column keeps a readable minimum width, two plots share a row
  only where both fit;
- a plot is never shown so small that its smallest text falls under MIN_TEXT_PX: its image gets that
  minimum width (`--min`, from the text size the PNG was drawn with) and scrolls in its own box below it;
- printed, a heading stays with what follows it, and a table row, figure or verdict is not split across
  pages; the navigation is left out and nothing scrolls.

Every value from the run folder is escaped here; the page has no script and links only within itself.
"""

from __future__ import annotations

import base64
import html
from typing import Any, Protocol

from llmclf.reports.console import one_line


class Block(Protocol):
    """What is read of run_report.Block (not imported: run_report imports this module)."""

    kind: str
    text: str
    headers: list[str]
    rows: list[list[Any]]
    image: Any  # plots.Png | None
    half: bool


MIN_TEXT_PX = 9.0  # the smallest text in a plot, as displayed: below this it is unreadable

CSS = """
*,*::before,*::after{box-sizing:border-box}
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1050px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45;overflow-wrap:break-word}
h1{border-bottom:2px solid #ddd;padding-bottom:.3em;overflow-wrap:anywhere}
h2{margin-top:1.8em;border-bottom:1px solid #eee}
nav{display:flex;flex-wrap:wrap;gap:.2em 1em}
.verdict{font-size:1.1em;background:#f2f6fb;border-left:4px solid #2b6cb0;padding:.6em .9em;margin:1em 0}
.scroll{overflow-x:auto;max-width:100%;margin:.6em 0}
table{border-collapse:collapse}
th,td{border:1px solid #ccc;padding:.3em .6em;vertical-align:top;text-align:left}
th{background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.text{min-width:15em;max-width:560px;overflow-wrap:anywhere}
td:first-child:not(.num){min-width:9em}
.figures{display:flex;flex-wrap:wrap;gap:0 1.5em}
.figures figure{flex:1 1 420px;min-width:0}
figure{margin:.8em 0}
figcaption{font-size:.9em;color:#555;margin-bottom:.3em}
.plot{overflow-x:auto;max-width:100%}
.plot img{display:block;max-width:100%;height:auto;min-width:var(--min,0)}
pre{background:#f7f7f7;padding:1em;overflow-x:auto}
@media (max-width:600px){body{margin:1em auto;padding:0 .75em}th,td{padding:.25em .4em}}
@media print{
body{max-width:none;margin:0;padding:0;font-size:10.5pt}
nav{display:none}
h1,h2,h3,figcaption,h2+p{break-after:avoid;page-break-after:avoid}
.figures{display:block}
.figures figure{display:inline-block;width:48%;margin-right:1%;vertical-align:top}
tr,figure,img,.verdict{break-inside:avoid;page-break-inside:avoid}
thead{display:table-header-group}
.scroll,.plot{overflow:visible}
.plot img{min-width:0}
td.text{max-width:none}
pre{white-space:pre-wrap;overflow-wrap:anywhere}
a{color:inherit;text-decoration:none}
}
"""


def html_cell(value: Any, cell: Any = str) -> str:
    """A <td>: numbers right-aligned, long strings marked as text (a minimum width, wrapping)."""
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    kind = "num" if numeric else ("text" if isinstance(value, str) and len(value) > 60 else "")
    text = html.escape(one_line(cell(value)))
    return f'<td class="{kind}">{text}</td>' if kind else f"<td>{text}</td>"


def anchor(title: str) -> str:
    return title.lower().replace(" ", "-")


def _table(block: Block, cell: Any) -> str:
    head = "".join(f"<th>{html.escape(one_line(str(h)))}</th>" for h in block.headers)
    body = "".join("<tr>" + "".join(html_cell(c, cell) for c in row) + "</tr>" for row in block.rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _figure(block: Block) -> str:
    """The image in a box of its own that scrolls when the page is narrower than the image's minimum."""
    png = block.image
    assert png is not None
    data = base64.b64encode(png.data).decode("ascii")  # the bytes written, not read back
    caption = html.escape(one_line(block.text))
    style, text_px = "", png.text_px
    if text_px > 0 and png.width > 0:  # never below the width at which its smallest text is readable
        style = f' style="--min:{min(png.width, round(png.width * MIN_TEXT_PX / text_px))}px"'
    return (
        f'<figure><figcaption>{caption}</figcaption><div class="plot"><img alt="{caption}"{style} '
        f'width="{png.width}" height="{png.height}" data-text-px="{text_px:.1f}" '
        f'src="data:image/png;base64,{data}"></div></figure>'
    )


def render_html(blocks: list[Block], title: str, cell: Any = str) -> str:
    """One file, no reference to anything outside it. `cell` formats a table value as text."""
    headings = [b.text for b in blocks if b.kind == "heading"]
    nav = " ".join(f'<a href="#{anchor(h)}">{html.escape(h)}</a>' for h in headings)
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(one_line(title))}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(one_line(title))}</h1>",
    ]
    verdicts = [b for b in blocks if b.kind == "verdict"]
    out += [f'<p class="verdict">{html.escape(one_line(b.text))}</p>' for b in verdicts]
    out.append(f"<nav>{nav}</nav>")
    pair = False  # (no <section> around a heading's blocks: Chromium then splits a heading from them)
    for b in blocks:
        if pair and not (b.kind == "image" and b.half):
            out.append("</div>")
            pair = False
        if b.kind == "heading":
            out.append(f'<h2 id="{anchor(b.text)}">{html.escape(b.text)}</h2>')
        elif b.kind == "para":
            out.append(f"<p>{html.escape(one_line(b.text))}</p>")
        elif b.kind == "table":
            out.append(_table(b, cell))
        elif b.kind == "image" and b.image is not None:
            if b.half and not pair:
                out.append('<div class="figures">')
                pair = True
            out.append(_figure(b))
        elif b.kind == "pre":
            out.append(f"<pre>{html.escape(b.text)}</pre>")
    out += ["</div>" if pair else "", "</body></html>"]
    return "\n".join(line for line in out if line) + "\n"
