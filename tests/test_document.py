"""seqlab.document: one document rendered to Markdown and HTML, and values that remember their JSON field."""

from __future__ import annotations

import matplotlib.pyplot as plt

from seqlab.document import Document, Section, count, fmt_bytes, save_figure, sourced, to_html, to_markdown, write


def test_markdown_and_html_hold_the_same_blocks(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    (tmp_path / "plots").mkdir()
    save_figure(fig, tmp_path / "plots" / "f.png")
    sec = Section("Results")
    sec.p("A <paragraph> & more.")
    sec.table(["mixer", "loss"], [["gru", "0.123"]])
    sec.figure("plots/f.png", "Loss against steps.")
    doc = Document("Title", "A note.", [sec, Section("", ["untitled"])])
    md = to_markdown(doc)
    assert md.startswith("# Title\n\nA note.\n\n## Results\n\nA <paragraph> & more.\n\n| mixer | loss |\n|---|---|\n")
    assert "![Loss against steps.](plots/f.png)" in md and "\n\nuntitled\n" in md and md.count("## ") == 1
    page = to_html(doc, tmp_path)
    assert "<p>A &lt;paragraph&gt; &amp; more.</p>" in page and "<td>0.123</td>" in page
    assert "src='data:image/png;base64," in page  # self-contained
    md_path, html_path = write(doc, tmp_path)
    assert md_path.read_text() == md and html_path.read_text() == page
    assert write(doc, tmp_path / "plots", markdown="only.md", page=None) == [tmp_path / "plots" / "only.md"]


def test_fmt_bytes():
    assert [fmt_bytes(n) for n in (512, 1536, 3 * 2**20, 5 * 2**30, 2**42)] == [
        "512 B", "1.5 KiB", "3.0 MiB", "5.0 GiB", "4096.0 GiB"]


def test_sourced_values_log_their_field_and_scaling():
    results = {"cells": [{"latency_s": 0.00125, "params": 4000, "name": "gru"}], "sizes": [1, 2, 3]}
    log: list = []
    data = sourced(results, log)
    cell = data["cells"][0]
    text = (f"{cell['name']}: {cell['params']:,} parameters, {1000 * cell['latency_s']:.2f} ms, "
            f"{fmt_bytes(cell['params'])}, {count(data['sizes'])} sizes")
    assert text == "gru: 4,000 parameters, 1.25 ms, 3.9 KiB, 3 sizes"
    assert [(s.path, s.ops, s.text) for s in log] == [
        (("cells", 0, "name"), (), "gru"),
        (("cells", 0, "params"), (), "4,000"),
        (("cells", 0, "latency_s"), (("*", 1000),), "1.25"),
        (("cells", 0, "params"), (("/", 1024),), "3.9"),
        (("sizes",), (("len",),), "3")]
    assert all(s.expected(results) == s.text for s in log)
    log.clear()
    combined = cell["params"] * cell["latency_s"]  # two fields: a plain number, sourced no more
    assert type(combined) is float and f"{combined:.1f}" == "5.0" and log == []
    assert data == results and isinstance(data["cells"][0]["params"], int)  # the same values, still JSON


def test_a_sourced_value_placed_whole_is_logged():
    log: list = []
    data = sourced({"task": "mqar", "steps": 128}, log)
    sec = Section("s")
    sec.table(["task", "steps"], [[data["task"], str(data["steps"])]])
    assert sec.blocks[0].rows == [["mqar", "128"]] and [s.text for s in log] == ["128", "mqar"]  # str() first
    assert sec.texts() == ["task", "steps", "mqar", "128"]
