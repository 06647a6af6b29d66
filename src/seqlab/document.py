"""Reports: one small document model (sections of paragraphs, tables and figures), rendered to Markdown and to one
self-contained HTML file. The lab's report (`seqlab.lab.report`), `seqlab latents` and `seqlab distill` all write
through it.

Where every number comes from: a renderer reads its JSON results through `sourced(results, log)`, which hands out
the same dicts and lists but with numbers and strings that remember their path in the JSON. Formatting one of them
(`f"{x:.3f}"`, `str(x)`) appends a `Source` (path, scaling, format spec, the text printed) to `log`; a renderer
keeps the sources logged while it wrote a section in `Section.sources`, so a test can check each printed number
against the one field it came from. Scaling by a constant (`1000 * seconds`,
`bytes / 1024` in `fmt_bytes`) keeps the path; anything else (a sum of two fields) gives a plain number, which
such a test then finds unaccounted for.

This module is a leaf: it imports no lab section, model or command, so all of them can use it.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

# ---------------------------------------------------------------------------------------------------------------
# the document model


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    path: str  # relative to the report's folder
    caption: str  # one sentence: what the figure shows and how to read it


@dataclass
class Section:
    title: str  # "": no heading (a document of one untitled section)
    blocks: list[Any] = field(default_factory=list)  # str paragraphs, Tables and Figures
    sources: list[Source] = field(default_factory=list)  # the sourced values formatted while it was written

    def texts(self) -> list[str]:
        """Every text the section prints: paragraphs, table cells (headers too) and captions."""
        out: list[str] = []
        for b in self.blocks:
            out += (b.headers + [c for r in b.rows for c in r] if isinstance(b, Table) else
                    [b.caption] if isinstance(b, Figure) else [b])
        return out

    def p(self, text: str) -> None:
        self.blocks.append(_printed(text))

    def table(self, headers: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(Table([_printed(h) for h in headers], [[_printed(c) for c in r] for r in rows]))

    def figure(self, path: str, caption: str) -> None:
        self.blocks.append(Figure(path, _printed(caption)))


@dataclass
class Document:
    title: str
    note: str = ""  # a paragraph under the title (the machine, the settings)
    sections: list[Section] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)  # the sourced values formatted for title and note


def fmt_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (B, KiB, MiB, GiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def save_figure(fig: Any, path: Path, dpi: int = 100) -> None:
    """Lay out, write and close a matplotlib figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------
# renderers


def to_markdown(doc: Document) -> str:
    out = [f"# {doc.title}", ""] + ([doc.note, ""] if doc.note else [])
    for s in doc.sections:
        out += [f"## {s.title}", ""] if s.title else []
        for b in s.blocks:
            if isinstance(b, Table):
                out.append("| " + " | ".join(b.headers) + " |")
                out.append("|" + "---|" * len(b.headers))
                out += ["| " + " | ".join(r) + " |" for r in b.rows]
            elif isinstance(b, Figure):
                out += [f"![{b.caption}]({b.path})", "", f"*{b.caption}*"]
            else:
                out.append(b)
            out.append("")
    return "\n".join(out)


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:1em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}th{background:#f4f4f4;cursor:pointer}
td:first-child,th:first-child{text-align:left}
figure{margin:1.2em 0}img{max-width:100%}figcaption{color:#444;font-size:.92em}
.note{color:#555;font-size:.92em}
"""

_SORT = """
document.querySelectorAll('th').forEach(th => th.addEventListener('click', () => {
  const table = th.closest('table'), body = table.tBodies[0], i = [...th.parentNode.children].indexOf(th);
  const asc = th.dataset.asc !== '1'; th.dataset.asc = asc ? '1' : '0';
  const key = td => { const t = td.textContent.replace(/[, ]/g, ''); const n = parseFloat(t);
                      return isNaN(n) ? td.textContent : n; };
  [...body.rows].sort((a, b) => { const x = key(a.cells[i]), y = key(b.cells[i]);
    return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1); }).forEach(r => body.appendChild(r));
}));
window.addEventListener('load', () => {  // a self-check a browser (or a test) can read: images that decoded
  const imgs = [...document.images], ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.images = ok + '/' + imgs.length;
});
"""


def to_html(doc: Document, root: Path) -> str:
    """One HTML page with sortable tables; figures (paths relative to `root`) are embedded as base64 PNG, so the
    page reads offline with no other file."""
    e = html.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{e(doc.title)}</title>",
           f"<style>{_STYLE}</style></head><body>", f"<h1>{e(doc.title)}</h1>"]
    if doc.note:
        out.append(f"<p class='note'>{e(doc.note)}</p>")
    for s in doc.sections:
        if s.title:
            out.append(f"<h2>{e(s.title)}</h2>")
        for b in s.blocks:
            if isinstance(b, Table):
                out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.headers) + "</tr></thead>")
                out.append("<tbody>" + "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>"
                                               for r in b.rows) + "</tbody></table>")
            elif isinstance(b, Figure):
                data = base64.b64encode((root / b.path).read_bytes()).decode()
                out.append(f"<figure><img alt='{e(b.caption)}' src='data:image/png;base64,{data}'>"
                           f"<figcaption>{e(b.caption)}</figcaption></figure>")
            else:
                out.append(f"<p>{e(b)}</p>")
    out.append(f"<script>{_SORT}</script></body></html>")
    return "\n".join(out)


def write(doc: Document, out: Path, *, markdown: str = "report.md", page: str | None = "report.html"
          ) -> list[Path]:
    """Write the document as Markdown (and as HTML unless `page` is None) into folder `out`."""
    written = [out / markdown]
    written[0].write_text(to_markdown(doc))
    if page is not None:
        written.append(out / page)
        written[1].write_text(to_html(doc, out))
    return written


# ---------------------------------------------------------------------------------------------------------------
# where each printed number comes from


@dataclass(frozen=True)
class Source:
    """One formatted value: `text == format(scaled(value at path), spec)`."""

    path: tuple  # keys and indices from the top of the sourced JSON
    ops: tuple  # ("*", k) / ("/", k) scalings in order, ("len",) a list's length, ("key",) the last key itself
    spec: str
    text: str

    def expected(self, root: Any) -> str:
        """The text this source's field in `root` (the plain JSON) formats to."""
        value = root
        for k in self.path:
            value = value[k]
        for op in self.ops:
            if op[0] == "*":
                value = value * op[1]
            elif op[0] == "/":
                value = value / op[1]
            elif op[0] == "len":
                value = len(value)
            elif op[0] == "key":
                value = self.path[-1]
        return format(value, self.spec)


class _Sourced:
    """What sourced numbers and strings share: their path, scalings and the log their formatting goes to."""

    _path: tuple
    _ops: tuple
    _log: list

    def __format__(self, spec: str) -> str:
        text = self._plain().__format__(spec)
        self._log.append(Source(self._path, self._ops, spec, text))
        return text

    def __str__(self) -> str:
        return self.__format__("")

    def _plain(self) -> Any:
        raise NotImplementedError


class _Number(_Sourced):
    def _scaled(self, op: str, k: Any, value: Any) -> Any:
        if isinstance(k, (_Sourced, bool)) or not isinstance(k, (int, float)):
            return value  # two fields (or anything else) combined: a plain number, sourced no more
        return _leaf(value, self._path, self._ops + ((op, k),), self._log)

    def __mul__(self, k: Any) -> Any:
        return self._scaled("*", k, self._plain() * (k._plain() if isinstance(k, _Sourced) else k))

    __rmul__ = __mul__

    def __truediv__(self, k: Any) -> Any:
        return self._scaled("/", k, self._plain() / (k._plain() if isinstance(k, _Sourced) else k))


class _Int(_Number, int):
    def _plain(self) -> int:
        return int(self)


class _Float(_Number, float):
    def _plain(self) -> float:
        return float(self)


class _Str(_Sourced, str):
    def _plain(self) -> str:
        return str.__str__(self)


class _List(list):
    """A list that knows its path (for `count`)."""

    _path: tuple
    _log: list


def _leaf(value: Any, path: tuple, ops: tuple, log: list) -> Any:
    cls = _Float if isinstance(value, float) else _Int if isinstance(value, int) else _Str
    out = cls(value)
    out._path, out._ops, out._log = path, ops, log
    return out


def sourced(data: Any, log: list, path: tuple = ()) -> Any:
    """`data` (parsed JSON) with every number and string replaced by one that logs its formatting to `log`."""
    if isinstance(data, dict):
        return {_leaf(k, path + (k,), (("key",),), log): sourced(v, log, path + (k,)) for k, v in data.items()}
    if isinstance(data, list):
        out = _List(sourced(v, log, path + (i,)) for i, v in enumerate(data))
        out._path, out._log = path, log
        return out
    if isinstance(data, bool) or data is None or not isinstance(data, (int, float, str)):
        return data
    return _leaf(data, path, (), log)


def count(items: list) -> int:
    """len(items), sourced when `items` is a sourced list."""
    if isinstance(items, _List):
        return _leaf(len(items), items._path, (("len",),), items._log)
    return len(items)


def _printed(value: Any) -> Any:
    """A sourced value placed in a document as it is (a table cell, a paragraph) is printed whole: log it."""
    return str(value) if isinstance(value, _Sourced) else value
