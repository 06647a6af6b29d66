"""The command line: --help everywhere, one-line errors with exit status 2, and real end-to-end runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import seqlab
from seqlab.cli import COMMANDS, build_parser, main
from seqlab.data import make_task
from seqlab.train import evaluate


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
    model = seqlab.load(out / "checkpoint")
    task = make_task("mqar", vocab_size=16, seq_len=16, num_pairs=2)
    assert metrics == evaluate(model, task, 2, 32, seed=1234)  # the defaults: --batch-size 32, --seed 1234

    assert main(["generate", str(out / "checkpoint"), "--tokens", "1,2,3", "--max-new-tokens", "5",
                 "--json"]) == 0
    gen = json.loads(capsys.readouterr().out)
    assert gen["prompt"] == [1, 2, 3]
    assert gen["generated"] == seqlab.generate(model, [1, 2, 3], max_new_tokens=5)[0, 3:].tolist()  # greedy
