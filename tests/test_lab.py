"""The lab: a tiny smoke run writes every report file; resume skips finished cells; a failing cell is recorded;
every number in the HTML report comes from results.json."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from seqlab.cli import main
from seqlab.lab import LabConfig, load_preset
from seqlab.lab.sections import SECTIONS

TINY_LAB = {
    "name": "tiny",
    "seed": 0,
    "sections": ["quality", "training"],
    "quality": {
        "tasks": [{"name": "mqar", "vocab_size": 16, "seq_len": 16, "num_pairs": 2},
                  {"name": "induction", "vocab_size": 16, "seq_len": 12, "eval": {"seq_len": 24}}],
        "mixers": ["attention", "gru", "lstm+attention"],
        "model": {"n_layers": 2, "attention": {"n_heads": 2}},
        "target_params": 4000,
        "train": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "log_every": 1},
        "eval_batches": 1,
    },
    "training": {"mixers": ["attention", "gru"], "seq_lens": [8, 16], "batch_size": 2, "steps": 1,
                 "model": {"n_layers": 1, "d_model": 16}},
}


def write_config(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "lab.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lab")
    assert main(["lab", "--config", str(write_config(tmp, TINY_LAB)), "--out", str(tmp / "run"),
                 "--no-progress"]) == 0
    return tmp / "run"


def test_smoke_run_writes_every_report_file_and_section(lab_run):
    for name in ("results.json", "report.md", "report.html", "lab_config.json"):
        assert (lab_run / name).is_file(), name
    results = json.loads((lab_run / "results.json").read_text())
    assert list(results["sections"]) == ["quality", "training"]
    quality = results["sections"]["quality"]["cells"]
    assert [c["cell"] for c in quality] == [f"{t}/{m}" for t in ("mqar", "induction")
                                            for m in ("attention", "gru", "lstm+attention")]
    for c in quality:
        assert "error" not in c, c.get("traceback")
        assert abs(c["params"] - 4000) / 4000 < 0.5  # matched parameter counts
        assert (lab_run / "cells" / "quality" / c["cell"] / "checkpoint" / "model.safetensors").is_file()
    induction = [c for c in quality if c["task"] == "induction"]
    assert all(c["train_seq_len"] == 12 and c["test_seq_len"] == 24 for c in induction)  # length extrapolation
    training = results["sections"]["training"]["cells"]
    assert {(c["mixer"], c["seq_len"]) for c in training} == {(m, T) for m in ("attention", "gru") for T in (8, 16)}
    assert all(c["tokens_per_s"] > 0 and c["peak_rss_bytes"] > 0 for c in training)
    md = (lab_run / "report.md").read_text()
    for section in ("## Quality", "## Training cost"):
        assert section in md


def numbers(text: str) -> list[str]:
    return re.findall(r"(?<![\w.])-?\d[\d,]*(?:\.\d+)?", text)


def test_every_number_in_the_html_tables_comes_from_results_json(lab_run):
    results = json.loads((lab_run / "results.json").read_text())
    values: list[float] = []

    def collect(x):
        if isinstance(x, bool):
            return
        if isinstance(x, (int, float)):
            values.append(float(x))
        elif isinstance(x, dict):
            for v in x.values():
                collect(v)
        elif isinstance(x, list):
            for v in x:
                collect(v)
        elif isinstance(x, str):
            values.extend(float(n.replace(",", "")) for n in numbers(x))

    collect(results)
    html = (lab_run / "report.html").read_text()
    cells = re.findall(r"<td>(.*?)</td>", html)
    assert cells
    derived = values + [v * 1000 for v in values] + [v / 1024 ** k for v in values for k in (1, 2, 3)]
    for cell in cells:
        for n in numbers(cell):
            x = float(n.replace(",", ""))
            decimals = len(n.split(".")[1]) if "." in n else 0
            assert any(abs(round(v, decimals) - x) <= 10 ** -decimals for v in derived), (cell, n)


def test_html_is_self_contained(lab_run):
    html = (lab_run / "report.html").read_text()
    srcs = re.findall(r"<img[^>]*src='([^']*)'", html)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<th>" in html and "addEventListener('click'" in html  # sortable tables


def test_report_rebuilds_from_results_json_alone(lab_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(lab_run / "results.json", copy / "results.json")
    assert main(["report", str(copy)]) == 0
    assert (copy / "report.md").read_text() == (lab_run / "report.md").read_text()
    assert (copy / "report.html").read_text() == (lab_run / "report.html").read_text()


def test_resume_skips_finished_cells_and_retries_failed_ones(lab_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(lab_run, run)
    (run / "cells" / "quality" / "mqar" / "gru" / "cell.json").unlink()  # as if killed during that cell
    calls = []
    quality = SECTIONS["quality"]
    real = quality.run
    monkeypatch.setattr(quality, "run", lambda cell, *a: calls.append(cell.id) or real(cell, *a))
    assert main(["lab", "--out", str(run), "--resume", "--only", "quality", "--no-progress"]) == 0
    assert calls == ["mqar/gru"]
    results = json.loads((run / "results.json").read_text())
    assert len(results["sections"]["quality"]["cells"]) == 6


def test_a_failing_cell_is_recorded_and_the_rest_goes_on(tmp_path, capsys, monkeypatch):
    import seqlab.train

    real = seqlab.train.fit

    def flaky(model, task, cfg, **kw):
        if kw.get("desc") == "mqar/gru":
            raise RuntimeError("injected failure")
        return real(model, task, cfg, **kw)

    monkeypatch.setattr(seqlab.train, "fit", flaky)
    cfg = {**TINY_LAB, "sections": ["quality"],
           "quality": {**TINY_LAB["quality"], "tasks": TINY_LAB["quality"]["tasks"][:1], "mixers": ["gru", "conv"]}}
    assert main(["lab", "--config", str(write_config(tmp_path, cfg)), "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "1 failed: mqar/gru: RuntimeError: injected failure" in out
    cells = json.loads((tmp_path / "r" / "results.json").read_text())["sections"]["quality"]["cells"]
    assert "error" in cells[0] and "error" not in cells[1]
    assert "failed: RuntimeError: injected failure" in (tmp_path / "r" / "report.md").read_text()


def test_bad_lab_input(tmp_path, capsys):
    cfg = write_config(tmp_path, {"quality": {"mixers": ["attention", "transformer"]}})
    assert main(["lab", "--config", str(cfg), "--out", str(tmp_path / "x")]) == 2
    assert "'quality.mixers[1]' = 'transformer'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    assert main(["lab", "--out", str(tmp_path / "full")]) == 2
    assert "is not empty; use --resume" in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"  # nothing already written is lost
    assert main(["lab", "--only", "nosuch", "--out", str(tmp_path / "y")]) == 2
    assert "--only 'nosuch': unknown section" in capsys.readouterr().err
    assert main(["lab", "--resume", "--out", str(tmp_path / "z")]) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "has no results.json" in capsys.readouterr().err


def test_presets_load():
    assert isinstance(load_preset("quick"), LabConfig)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium is not installed "
                    "(apt-get install chromium) — the HTML rendering check needs it")
def test_html_report_renders_in_headless_chromium(lab_run, tmp_path):
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                    "--window-size=1200,3000", (lab_run / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    assert shot.stat().st_size > 10_000
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                          "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile2'}",
                          "--dump-dom", (lab_run / "report.html").as_uri()],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    assert dom.count("<img") == (lab_run / "report.html").read_text().count("<img")
