"""The command line: --help everywhere, one-line errors with exit status 2, and real end-to-end runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from seqlab.cli import COMMANDS, build_parser, main


def test_every_subcommand_has_help(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: seqlab " + name in capsys.readouterr().out


def test_top_level_help_lists_the_subcommands():
    text = build_parser().format_help()
    for name in COMMANDS:
        assert name in text


def run_cli(*args):
    """Run `python -m seqlab` in a subprocess, as a user would."""
    return subprocess.run([sys.executable, "-m", "seqlab", *args], capture_output=True, text=True, timeout=300)


def test_bad_config_value_is_one_line_and_status_2(tmp_path):
    r = run_cli("train", "--out", str(tmp_path / "o"), "--set", "model.d_model=-3", "--no-progress")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["seqlab: error: config field 'd_model' = -3: must be > 0"]
    assert "Traceback" not in r.stderr


def test_unknown_mixer_from_cli(capsys, tmp_path):
    assert main(["train", "--out", str(tmp_path / "o"), "--set", "model.mixer=rwkv"]) == 2
    assert "'mixer' = 'rwkv': expected one of" in capsys.readouterr().err


def test_missing_checkpoint_is_status_2(capsys, tmp_path):
    assert main(["generate", str(tmp_path / "none"), "--tokens", "1,2"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bad_tokens_flag(capsys, tmp_path):
    from helpers import tiny

    import seqlab

    seqlab.save(tiny("gru"), tmp_path / "c")
    assert main(["generate", str(tmp_path / "c"), "--tokens", "1,x"]) == 2
    assert "expected comma-separated integers" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "c"), "--tokens", "1,99"]) == 2
    assert "token id 99 is out of range" in capsys.readouterr().err


TINY_RUN = {
    "model": {"mixer": "gru", "d_model": 16, "n_layers": 1},
    "task": {"name": "mqar", "vocab_size": 16, "seq_len": 16, "num_pairs": 2},
    "train": {"steps": 6, "batch_size": 4, "warmup_steps": 1, "eval_batches": 1, "log_every": 2},
}


def test_train_then_eval_then_generate(tmp_path, capsys):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps(TINY_RUN))
    out = tmp_path / "out"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--set", "train.lr=0.01", "--json",
                 "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["eval"]) >= {"loss", "accuracy"}
    resolved = json.loads((out / "config.json").read_text())
    assert resolved["train"]["lr"] == 0.01 and resolved["model"]["mixer"] == "gru"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [2, 4, 6]  # steps completed

    assert main(["eval", str(out / "checkpoint"), "--task", "mqar", "--set", "vocab_size=16", "--set",
                 "seq_len=16", "--set", "num_pairs=2", "--batches", "2", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0.0 <= metrics["accuracy"] <= 1.0

    assert main(["generate", str(out / "checkpoint"), "--tokens", "1,2,3", "--max-new-tokens", "5",
                 "--json"]) == 0
    gen = json.loads(capsys.readouterr().out)
    assert gen["prompt"] == [1, 2, 3] and len(gen["generated"]) == 5


TINY_LAB = {
    "name": "tiny",
    "seed": 0,
    "quality": {
        "task": {"name": "mqar", "vocab_size": 16, "seq_len": 16, "num_pairs": 2},
        "mixers": ["attention", "gru", "lstm+attention"],
        "model": {"n_layers": 2, "attention": {"n_heads": 2}},
        "target_params": 4000,
        "train": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "log_every": 1},
        "eval_batches": 1,
        "state_context": 32,
    },
}


def test_lab_smoke(tmp_path, capsys):
    cfg = tmp_path / "lab.json"
    cfg.write_text(json.dumps(TINY_LAB))
    assert main(["lab", "--config", str(cfg), "--out", str(tmp_path / "lab"), "--json", "--no-progress"]) == 0
    results = json.loads(capsys.readouterr().out)
    cells = results["quality"]["cells"]
    assert [c["mixer"] for c in cells] == ["attention", "gru", "lstm+attention"]
    for c in cells:
        assert "error" not in c, c.get("traceback")
        assert abs(c["params"] - 4000) / 4000 < 0.5  # matched to the target
        assert (tmp_path / "lab" / "cells" / "quality" / c["mixer"] / "checkpoint" / "model.safetensors").exists()
    report = (tmp_path / "lab" / "report.md").read_text()
    assert (tmp_path / "lab" / "plots" / "quality.png").stat().st_size > 1000
    assert json.loads((tmp_path / "lab" / "results.json").read_text()) == results
    for c in cells:  # the report's numbers are results.json's numbers
        assert f"{c['eval']['accuracy']:.3f}" in report and f"{c['params']:,}" in report
    # attention's state grows with the context; the GRU's is fixed and smaller here
    by = {c["mixer"]: c for c in cells}
    assert by["attention"]["state_bytes"] > by["gru"]["state_bytes"]


def test_a_failing_lab_cell_is_recorded_and_the_rest_goes_on(tmp_path, capsys, monkeypatch):
    import seqlab.lab.runner as runner

    real = runner.fit

    def flaky(model, task, cfg, **kw):
        if kw.get("desc") == "gru":
            raise RuntimeError("injected failure")
        return real(model, task, cfg, **kw)

    monkeypatch.setattr(runner, "fit", flaky)
    cfg = tmp_path / "lab.json"
    cfg.write_text(json.dumps({**TINY_LAB, "quality": {**TINY_LAB["quality"], "mixers": ["gru", "attention"]}}))
    assert main(["lab", "--config", str(cfg), "--out", str(tmp_path / "lab"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "gru" in out and "failed: RuntimeError: injected failure" in out
    results = json.loads((tmp_path / "lab" / "results.json").read_text())
    assert "error" not in results["quality"]["cells"][1]


def test_unknown_preset_and_bad_lab_config(tmp_path, capsys):
    cfg = tmp_path / "lab.json"
    cfg.write_text(json.dumps({"quality": {"mixers": ["attention", "transformer"]}}))
    assert main(["lab", "--config", str(cfg), "--out", str(tmp_path / "x")]) == 2
    assert "'quality.mixers[1]' = 'transformer'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
