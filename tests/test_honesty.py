"""Honest reports: intervals, chance, seeds, flags on models that have not learned, no leader inside the noise, the
smoke-run banner."""

from __future__ import annotations

import json

import pytest

from seqlab.analysis.stats import chance_accuracy, eval_counts, learned, separated, spread, wilson
from seqlab.data import make_task
from seqlab.lab import LabConfig
from seqlab.lab.report import header_note
from seqlab.lab.runner import run_lab
from seqlab.lab.sections.quality import reading


def test_wilson_chance_spread_and_the_learned_flag():
    lo, hi = wilson(0.172, 64)
    assert lo < 0.172 < hi and hi - lo > 0.15  # 64 queries: a wide interval
    assert wilson(0.0, 100)[0] == 0.0 and wilson(1.0, 100)[1] == pytest.approx(1.0)
    assert chance_accuracy(make_task("mqar", vocab_size=16, seq_len=24, num_pairs=3)) == pytest.approx(1 / 3)
    assert chance_accuracy(make_task("induction", vocab_size=16, seq_len=16)) == pytest.approx(1 / 15)
    assert chance_accuracy(make_task("prefix_parity", seq_len=8)) == 0.5
    counts = eval_counts(make_task("induction", vocab_size=16, seq_len=16), 2, 8, seed=1)
    assert counts["queries"] == 16 and 0 < counts["order0_bits_per_token"] <= 4
    # the case: induction 0.172 over 64 queries, chance 1/15, has not learned; 0.9 has
    assert not learned(wilson(0.172, 64), 1 / 15) and learned(wilson(0.9, 64), 1 / 15)
    assert not learned(None, None, loss_nats=4.06 * 0.6931, order0_bits=4.2)  # bits near order-0
    assert spread([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 3}
    assert separated([0.1, 0.2], [0.3, 0.4]) and not separated([0.1, 0.35], [0.3, 0.4])


def cell(mixer, acc, lo, hi, ok=True):
    return {"mixer": mixer, "test": {"accuracy": acc}, "interval": [lo, hi], "learned": ok}


def test_readings_call_a_leader_only_beyond_the_noise():
    overlap = [cell("lstm", 0.62, 0.55, 0.69), cell("gru", 0.58, 0.51, 0.65), cell("conv", 0.1, 0.05, 0.15, False)]
    text = reading(overlap, "accuracy", "accuracy", True)
    assert "No leader" in text and "lstm, gru" in text and "not ranked: conv" in text and "leads" not in text
    clear = [cell("attention", 0.98, 0.95, 0.99), cell("gru", 0.58, 0.51, 0.65)]
    assert reading(clear, "accuracy", "accuracy", True).startswith("attention leads")
    none = [cell("lstm", 0.17, 0.1, 0.28, False)]
    assert "No model has learned" in reading(none, "accuracy", "accuracy", True)
    one_seed = [{"mixer": "a", "test": {"bits_per_byte": 2.0}}, {"mixer": "b", "test": {"bits_per_byte": 2.1}}]
    assert "not tested against noise" in reading(one_seed, "bits_per_byte", "bits per byte", False)


def test_smoke_banner_and_quality_seeds(tmp_path):
    meta = {"machine": {"processor": "x", "cpu_count": 2, "torch_threads": 1, "device": "cpu", "torch": "t",
                        "python": "p"}, "preset": "quick", "seed": 0, "started": "now", "seconds": 1.0}
    assert header_note(meta).startswith("SMOKE RUN")
    assert not header_note({**meta, "preset": "standard"}).startswith("SMOKE")
    cfg = LabConfig.from_dict({
        "name": "seeds", "seed": 0, "threads": 1, "sections": ["quality"],
        "quality": {"tasks": [{"name": "mqar", "vocab_size": 16, "seq_len": 16, "num_pairs": 2}],
                    "mixers": ["gru"], "model": {"n_layers": 1, "d_model": 8}, "seeds": 2, "eval_batches": 1,
                    "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "log_every": 1}}})
    run_lab(cfg, tmp_path / "run", progress=False)
    c = json.loads((tmp_path / "run" / "results.json").read_text())["sections"]["quality"]["cells"][0]
    assert c["seeds"] == [0, 1] and len(c["test_seeds"]) == 2 and c["queries"] == 2 * 4 * 2
    assert c["test"]["accuracy"] == pytest.approx(c["test_spread"]["accuracy"]["mean"])
    assert c["chance"] == 0.5 and c["learned"] is False
    assert "Wilson" in (tmp_path / "run" / "report.md").read_text()
