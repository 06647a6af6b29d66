"""The lab: a tiny smoke run writes every report file; resume skips finished cells; a failing cell is recorded;
every number in the HTML report comes from results.json."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from seqlab.cli import main
from seqlab.document import to_html
from seqlab.lab import LabConfig, load_preset
from seqlab.lab.report import lab_document
from seqlab.lab.sections import SECTIONS

TINY_TRAIN = {"steps": 2, "batch_size": 4, "warmup_steps": 1, "log_every": 1, "eval_batches": 1}
TINY_LAB = {
    "name": "tiny",
    "seed": 0,
    "threads": 1,
    "sections": ["quality", "training", "inference", "thinking", "latents", "distill"],
    "quality": {
        "tasks": [{"name": "mqar", "vocab_size": 16, "seq_len": 16, "num_pairs": 2},
                  {"name": "induction", "vocab_size": 16, "seq_len": 12, "eval": {"seq_len": 24}}],
        "mixers": ["attention", "gru", "lstm+attention", "recurrent_depth:gru"],
        "model": {"n_layers": 2, "attention": {"n_heads": 2}},
        "depth": {"prelude": 1, "core": 1, "coda": 1, "mean_steps": 2, "backprop_steps": 1},
        "target_params": 4000,
        "train": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "log_every": 1},
        "eval_batches": 1,
        "frontier": {"task": {"name": "mqar", "vocab_size": 16, "seq_len": 16, "num_pairs": 2},
                     "mixers": ["attention", "gru"], "widths": [8, 12]},
    },
    "training": {"mixers": ["attention", "gru"], "seq_lens": [8, 16], "batch_size": 2, "steps": 1,
                 "model": {"n_layers": 1, "d_model": 16}, "fresh_process": False},
    "inference": {"mixers": ["attention", "gru"], "contexts": [8, 32], "params": 3000, "n_layers": 1,
                  "chunk": 16, "decode_steps": 2, "warmup": 1},
    "thinking": {"task": {"name": "prefix_parity", "seq_len": 6},
                 "model": {"arch": "recurrent_depth", "mixer": "gru", "d_model": 8,
                           "depth": {"prelude": 1, "core": 1, "coda": 1, "mean_steps": 2, "backprop_steps": 1}},
                 "train": TINY_TRAIN, "steps": [1, 3], "thresholds": [0.1, 0.001], "eval_batches": 1,
                 "eval_batch_size": 4},
    "latents": {"steps": 4, "rows": 2},
    "distill": {"task": {"name": "prefix_parity", "seq_len": 8},
                "teacher": {"mixer": "attention", "d_model": 8, "n_layers": 1, "attention": {"n_heads": 2}},
                "teacher_train": TINY_TRAIN, "students": ["gla"], "train": TINY_TRAIN, "context": 16},
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
    assert list(results["sections"]) == list(SECTIONS)
    for name, section in results["sections"].items():
        for c in section["cells"]:
            assert "error" not in c, (name, c["cell"], c.get("traceback"))
    quality = [c for c in results["sections"]["quality"]["cells"] if not c["spec"].get("frontier")]
    frontier = [c for c in results["sections"]["quality"]["cells"] if c["spec"].get("frontier")]
    assert [c["cell"] for c in frontier] == ["frontier/attention/d8", "frontier/attention/d12", "frontier/gru/d8",
                                             "frontier/gru/d12"]
    for c in frontier:  # attention's point is its KV cache after T = 16 tokens (2 layers, fp32); gru's is h
        kv = 2 * 2 * c["d_model"] * 16 * 4
        assert c["state_bytes"] == (kv if c["mixer"] == "attention" else 2 * c["d_model"] * 4)
        assert 0 <= c["interval"][0] <= c["test"]["accuracy"] <= c["interval"][1] <= 1
        assert c["queries"] == 1 * 4 * 2
    mixers = ("attention", "gru", "lstm+attention", "recurrent_depth:gru")
    assert [c["cell"] for c in quality] == [f"{t}/{m}" for t in ("mqar", "induction") for m in mixers]
    for c in quality:
        assert abs(c["params"] - 4000) / 4000 < 0.5  # matched parameter counts
        model = json.loads((lab_run / "cells" / "quality" / c["cell"] / "checkpoint" / "config.json").read_text())
        assert model["arch"] == ("recurrent_depth" if c["mixer"].startswith("recurrent_depth") else "lm")
        assert (lab_run / "cells" / "quality" / c["cell"] / "cell.json").is_file()
    induction = [c for c in quality if c["task"] == "induction"]
    assert all(c["train_seq_len"] == 12 and c["test_seq_len"] == 24 for c in induction)  # length extrapolation
    training = results["sections"]["training"]["cells"]
    assert {(c["mixer"], c["seq_len"]) for c in training} == {(m, T) for m in ("attention", "gru") for T in (8, 16)}
    assert all(c["tokens_per_s"] > 0 and c["peak_rss_bytes"] > 0 for c in training)
    for c in training:  # the cell's full model config, to reproduce the number alone
        job = json.loads((lab_run / "cells" / "training" / c["cell"] / "job.json").read_text())
        assert job["model_config"]["d_model"] == c["d_model"] and job["seq_len"] == c["seq_len"]

    inference = results["sections"]["inference"]
    state = {(c["mixer"], p["context"]): p["state_bytes"] for c in inference["cells"] for p in c["points"]}
    assert state[("attention", 32)] == 4 * state[("attention", 8)]  # the KV cache grows with the context
    assert state[("gru", 32)] == state[("gru", 8)]  # the recurrent state does not
    assert [x["mixer"] for x in inference["summary"]["crossover"]] == ["gru"]
    assert inference["summary"]["vs_attention_at_largest"]["gru"]["state_ratio"] == (
        state[("attention", 32)] / state[("gru", 32)])

    thinking = {c["cell"]: c for c in results["sections"]["thinking"]["cells"]}
    assert [r["steps"] for r in thinking["scaling"]["fixed"]] == [1, 3]
    assert all(r["mean_steps_used"] <= 3 for r in thinking["scaling"]["adaptive"])
    assert [s["threshold"] for s in thinking["scaling"]["exit_sweep"]] == [0.1, 0.001]
    assert (lab_run / "cells" / "thinking" / "train" / "checkpoint" / "model.safetensors").is_file()

    (latent,) = results["sections"]["latents"]["cells"]
    assert latent["model_source"] == "thinking/train"  # reuses the thinking section's model
    assert latent["summary"]["tokens"] == 2 * 6 and abs(sum(latent["summary"]["shares"].values()) - 1) < 1e-9
    assert latent["z_shape"] == [5, len(latent["chosen"]), 6] and len(latent["z"]) == 5 * len(latent["chosen"]) * 6

    distill = {c["cell"]: c for c in results["sections"]["distill"]["cells"]}
    assert list(distill) == ["teacher", "student-gla"]
    student = distill["student-gla"]
    assert student["teacher"]["retained"] == 1.0 and "scratch" in student and student["distilled"]["transfer"]
    assert student["gain"]["state_bytes_ratio"] == (student["teacher"]["decode"]["state_bytes"]
                                                     / student["distilled"]["decode"]["state_bytes"])
    for folder in ("student", "scratch"):
        assert (lab_run / "cells" / "distill" / "student-gla" / folder / "model.safetensors").is_file()

    meta = results["meta"]  # the run's CPU time and the load it ran beside, in results.json and the report's header
    assert 0 < meta["cpu_seconds"] and 0 < meta["seconds"]
    assert len(meta["load_average"]["start"]) == len(meta["load_average"]["end"]) == 3
    md = (lab_run / "report.md").read_text()
    assert f"{meta['cpu_seconds']:.0f} s of CPU time" in md
    assert f"load average {meta['load_average']['start'][0]:.1f} at its start" in md
    for title in ("Quality", "Training cost", "Inference", "Test-time compute", "Latent trajectories",
                  "Distillation"):
        assert f"## {title}" in md
    assert md.count("![") == (lab_run / "report.html").read_text().count("<img") >= 8


def numbers(text: str) -> list[str]:
    return re.findall(r"(?<![\w.])-?\d(?:[\d,]*\d)?(?:\.\d+)?", text)  # 1,234.5 whole; no trailing comma


def test_every_number_in_the_report_is_one_results_json_field_formatted(lab_run, tmp_path):
    """The renderer records, for each value it formats, the results.json field it read and the text it printed,
    section by section: each record must reproduce from the plain JSON, and every number a section prints (its
    paragraphs, table cells and captions) must be one of its own records (a number computed from two fields, or
    written into the code, is not)."""
    results = json.loads((lab_run / "results.json").read_text())
    doc = lab_document(results, tmp_path)
    assert to_html(doc, tmp_path) == (lab_run / "report.html").read_text()  # the document is the report
    checked = 0
    for texts, sources in [([doc.note], doc.sources)] + [(s.texts(), s.sources) for s in doc.sections]:
        for source in sources:
            assert source.expected(results) == source.text, source
        printed = Counter(n for source in sources for n in numbers(source.text))
        shown = Counter(n for text in texts for n in numbers(text))
        assert not shown - printed, (texts[0][:60], shown - printed)  # each number shown is a distinct record
        checked += sum(shown.values())
    assert checked > 200
    fields = {source.path for s in doc.sections for source in s.sources}
    assert ("sections", "inference", "cells", 0, "points", 1, "decode_latency_s") in fields  # scaled to ms
    assert ("sections", "quality", "cells", 0, "test", "accuracy") in fields


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
    rd = "mqar/recurrent_depth:gru"  # its training draws r from the global RNG: rerun alone, it must match
    before = json.loads((run / "cells" / "quality" / rd / "cell.json").read_text())
    (run / "cells" / "quality" / rd / "cell.json").unlink()  # as if killed during that cell
    calls = []
    quality = SECTIONS["quality"]
    real = quality.run
    monkeypatch.setattr(quality, "run", lambda cell, *a: calls.append(cell.id) or real(cell, *a))
    monkeypatch.setattr("seqlab.lab.runner.build_report", lambda results, out: None)  # tested elsewhere; slow
    assert main(["lab", "--out", str(run), "--resume", "--only", "quality", "--no-progress"]) == 0
    assert calls == [rd]
    results = json.loads((run / "results.json").read_text())
    assert len(results["sections"]["quality"]["cells"]) == 8 + 4  # 4 frontier cells
    again = json.loads((run / "cells" / "quality" / rd / "cell.json").read_text())
    assert again["test"] == before["test"] and again["loss_curve"] == before["loss_curve"]
    assert list(results["sections"]) == list(SECTIONS)  # a resumed --only run keeps the other sections
    first = json.loads((lab_run / "results.json").read_text())["meta"]  # the run's start stays the first part's
    assert results["meta"]["started"] == first["started"]
    assert results["meta"]["load_average"]["start"] == first["load_average"]["start"]
    assert results["meta"]["cpu_seconds"] > first["cpu_seconds"] and results["meta"]["seconds"] > first["seconds"]


def test_a_failing_cell_is_recorded_and_the_rest_goes_on(tmp_path, capsys, monkeypatch):
    quality = SECTIONS["quality"]
    real = quality.fit

    def flaky(*args, **kw):
        if kw.get("desc") == "mqar/gru":
            raise RuntimeError("injected failure")
        return real(*args, **kw)

    monkeypatch.setattr(quality, "fit", flaky)
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


def test_presets_load_and_cover_every_section():
    for name in ("quick", "standard", "full"):
        cfg = load_preset(name)
        assert isinstance(cfg, LabConfig) and cfg.name == name and list(cfg.sections) == list(SECTIONS)
        assert {"mamba", "gla", "recurrent_depth"} <= set(cfg.quality.mixers)
        assert any("+" in m for m in cfg.quality.mixers)  # a hybrid
        assert {"mqar", "induction", "copy", "corpus"} <= {t["name"] for t in cfg.quality.tasks}
        assert any("seq_len" in t.get("eval", {}) for t in cfg.quality.tasks if t["name"] == "induction")


def test_show_config_prints_an_editable_preset(tmp_path, capsys):
    assert main(["lab", "--preset", "standard", "--show-config"]) == 0
    path = tmp_path / "mine.json"
    path.write_text(capsys.readouterr().out)
    assert LabConfig.load(path) == load_preset("standard")


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium is not installed "
                    "(apt-get install chromium) — the HTML rendering check needs it")
def test_html_report_renders_in_headless_chromium(lab_run, tmp_path):
    flags = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--no-first-run", "--virtual-time-budget=5000", f"--user-data-dir={tmp_path / 'profile'}"]
    page = (lab_run / "report.html").as_uri()
    dom = subprocess.run(flags + ["--dump-dom", page], check=True, capture_output=True, text=True, timeout=120).stdout
    n = (lab_run / "report.html").read_text().count("<img")
    assert n >= 8 and dom.count("<img") == n
    assert f'data-images="{n}/{n}"' in dom  # every embedded image decoded (the page's own load-time check)
