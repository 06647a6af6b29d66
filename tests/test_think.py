"""Test-time compute analysis and `seqlab think`: rows per r, adaptive exit, the plot, --json and bad input."""

from __future__ import annotations

import json

import pytest

import seqlab
from seqlab.analysis import parse_exit, parse_steps, scaling_curve
from seqlab.cli import main
from seqlab.data import make_task


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    model = seqlab.build_model({"arch": "recurrent_depth", "mixer": "conv", "vocab_size": 4, "d_model": 16,
                                "mlp": "gelu", "depth": {"core": 1, "mean_steps": 2}}, seed=0)
    return seqlab.save(model, tmp_path_factory.mktemp("think") / "ckpt")


def test_scaling_curve_rows(ckpt):
    model = seqlab.load(ckpt)
    curve = scaling_curve(model, make_task("prefix_parity", seq_len=8), [1, 3], ("latent", 0.5), batches=1,
                          batch_size=4)
    assert [r["steps"] for r in curve["fixed"]] == [1, 3] == [r["steps"] for r in curve["adaptive"]]
    assert [r["effective_depth"] for r in curve["fixed"]] == [3, 5]
    assert all(0 <= r["seq_accuracy"] <= r["accuracy"] <= 1 for r in curve["fixed"])
    assert 1 <= curve["adaptive"][1]["mean_steps_used"] <= 3
    assert curve["adaptive"][0]["mean_steps_used"] == 1
    assert curve["exit"] == {"criterion": "latent", "threshold": 0.5}


def test_think_command_json_and_plot(ckpt, tmp_path, capsys):
    plot = tmp_path / "think.png"
    assert main(["think", str(ckpt), "--task", "prefix_parity", "--set", "seq_len=6", "--steps", "1,2",
                 "--exit", "kl:1e-3", "--batches", "1", "--batch-size", "4", "--plot", str(plot), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["steps"] for r in result["fixed"]] == [1, 2]
    expected = scaling_curve(seqlab.load(ckpt), make_task("prefix_parity", seq_len=6), [1, 2], ("kl", 1e-3),
                             batches=1, batch_size=4, seed=1234)  # --seed's default
    def numbers(rows):  # everything but the clocks
        return [{k: v for k, v in row.items() if k not in ("cpu_s", "wall_s")} for row in rows]

    assert numbers(result["fixed"]) == numbers(expected["fixed"])
    assert numbers(result["adaptive"]) == numbers(expected["adaptive"])
    assert all(row["cpu_s"] >= 0 and row["wall_s"] >= 0 for row in result["fixed"])
    assert result["exit"] == {"criterion": "kl", "threshold": 1e-3} and len(result["adaptive"]) == 2
    assert plot.stat().st_size > 1000 and result["plot"] == str(plot)
    assert main(["think", str(ckpt), "--task", "prefix_parity", "--steps", "2", "--batches", "1"]) == 0
    assert "seq_acc" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--steps", "0,2"], "every step count must be >= 1"),
    (["--steps", "a"], "expected comma-separated integers"),
    (["--exit", "entropy:1"], "criterion 'entropy' does not exist"),
    (["--exit", "kl:x"], "threshold 'x' is not a number"),
    (["--batches", "0"], "--batches = 0: must be >= 1"),
])
def test_think_bad_flags_exit_2(ckpt, capsys, args, message):
    assert main(["think", str(ckpt), "--task", "prefix_parity", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_think_needs_a_recurrent_depth_checkpoint(tmp_path, capsys):
    path = seqlab.save(seqlab.build_model(mixer="gru", vocab_size=4, d_model=8), tmp_path / "lm")
    assert main(["think", str(path), "--task", "prefix_parity", "--steps", "1"]) == 2
    assert "needs a recurrent-depth model" in capsys.readouterr().err


def test_parsers():
    assert parse_steps("1, 2,8") == [1, 2, 8]
    assert parse_exit("kl") == ("kl", 1e-9) and parse_exit("latent") == ("latent", 3e-4)  # measured defaults
    assert parse_exit("latent:0.01") == ("latent", 0.01)
    assert parse_exit("none") is None and parse_exit(None) is None
