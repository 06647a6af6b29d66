"""The lab report: a small document model rendered twice, to Markdown and to one self-contained HTML file.

Every number in the report is formatted from results.json, so `build_report(results, out)` (and the command
`seqlab report DIR`) rebuilds both files from the JSON alone. Figures are drawn from results.json too, into
`plots/`, and embedded in the HTML as base64 PNG, so the HTML reads offline with no other file.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    path: str  # relative to the run folder
    caption: str  # one sentence: what the figure shows and how to read it


@dataclass
class Section:
    title: str
    blocks: list[Any] = field(default_factory=list)  # str paragraphs, Tables and Figures

    def p(self, text: str) -> None:
        self.blocks.append(text)

    def table(self, headers: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(Table(headers, rows))

    def figure(self, path: str, caption: str) -> None:
        self.blocks.append(Figure(path, caption))


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def error_rows(cells: list[dict], width: int) -> list[list[str]]:
    """Table rows for failed cells: the cell name, then its error across the remaining columns."""
    return [[c["cell"], f"failed: {c['error']}"] + [""] * (width - 2) for c in cells if "error" in c]


def header_note(meta: dict) -> str:
    m = meta["machine"]
    return (f"Machine: {m['processor']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), device "
            f"{m['device']}, torch {m['torch']}, Python {m['python']}. Preset `{meta['preset']}`, seed "
            f"{meta['seed']}. Started {meta['started']}; the run took {meta.get('seconds', 0):.0f} s.")


def to_markdown(title: str, note: str, sections: list[Section]) -> str:
    out = [f"# {title}", "", note, ""]
    for s in sections:
        out += [f"## {s.title}", ""]
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


def to_html(title: str, note: str, sections: list[Section], root: Path) -> str:
    e = html.escape
    out = ["<!doctype html><html><head><meta charset='utf-8'>", f"<title>{e(title)}</title>",
           f"<style>{_STYLE}</style></head><body>", f"<h1>{e(title)}</h1>", f"<p class='note'>{e(note)}</p>"]
    for s in sections:
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


def build_report(results: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write report.md and report.html into `out` from `results` (the content of results.json) alone."""
    from seqlab.lab.sections import SECTIONS

    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    sections, glance = [], []
    for name, section in SECTIONS.items():
        if name in results.get("sections", {}):
            try:
                rendered = section.render(results["sections"][name], out)
                line = section.highlight(results["sections"][name]) if hasattr(section, "highlight") else None
            except Exception as e:  # one section's broken results must not cost the others their report
                rendered, line = Section(getattr(section, "TITLE", name)), None
                rendered.p(f"This section's report could not be drawn from results.json: {type(e).__name__}: {e}")
            sections.append(rendered)
            if line:
                glance.append(f"{rendered.title}: {line}")
    if glance:
        summary = Section("At a glance")
        for line in glance:
            summary.p(line)
        sections.insert(0, summary)
    title = f"seqlab lab report: preset {results['meta']['preset']}"
    note = header_note(results["meta"])
    md, page = out / "report.md", out / "report.html"
    md.write_text(to_markdown(title, note, sections))
    page.write_text(to_html(title, note, sections, out))
    return md, page


def rebuild(run_dir: str | Path) -> tuple[Path, Path]:
    """Rebuild the report of a finished lab run from its results.json (`seqlab report DIR`)."""
    from seqlab.errors import InputError

    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise InputError(f"'{run_dir}' has no results.json; expected a folder written by seqlab lab")
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"'{path}' is not valid JSON: {err}") from None
    return build_report(results, run_dir)
