"""Resume after the final checkpoint is exact, and no write leaves a window where something already written is
missing: `checkpoint/` always exists while it is replaced, and metrics.jsonl is never truncated before it is
rewritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import seqlab
from seqlab import checkpoint
from seqlab.train import train

TIMING = ("seconds", "tokens_per_s")


def config(arch: str) -> dict:
    model = {"mixer": "gru", "d_model": 16, "vocab_size": 16}
    if arch == "recurrent_depth":  # init_scale > 0: evaluation draws noise, so a repeated evaluation would differ
        model.update(arch="recurrent_depth", depth={"prelude": 1, "core": 1, "coda": 1, "mean_steps": 2.0,
                                                    "backprop_steps": 2, "init_scale": 1.0})
    else:
        model["n_layers"] = 1
    return {"model": model, "task": {"name": "mqar", "vocab_size": 16, "seq_len": 16, "num_pairs": 2},
            "train": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "eval_batches": 1, "log_every": 1,
                      "eval_every": 2, "checkpoint_every": 2}}


def rows(out: Path) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(r).items() if k != "tokens_per_s"} for r in lines if r.strip()]


def result(out: Path) -> dict:
    return {k: v for k, v in json.loads((out / "result.json").read_text()).items() if k not in TIMING}


@pytest.mark.parametrize("arch", ["lm", "recurrent_depth"])
def test_killed_after_the_final_checkpoint_then_resumed(tmp_path, monkeypatch, arch):
    cfg = config(arch)
    train(cfg, out=tmp_path / "whole", progress=False)

    real = Path.write_text

    def killed_before_result(self, text, *args, **kwargs):
        if "result.json" in self.name:
            raise KeyboardInterrupt  # SIGKILL after the final checkpoint, before result.json
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", killed_before_result)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out=tmp_path / "cut", progress=False)
    monkeypatch.setattr(Path, "write_text", real)
    assert not (tmp_path / "cut" / "result.json").exists()
    train(cfg, out=tmp_path / "cut", progress=False, resume=True)

    assert rows(tmp_path / "cut") == rows(tmp_path / "whole")  # no second final evaluation row
    assert result(tmp_path / "cut") == result(tmp_path / "whole")  # train_loss, eval (same noise), steps
    assert result(tmp_path / "cut")["train_loss"] is not None


def test_a_finished_run_without_result_json_resumes_to_the_same_result(tmp_path):
    out = tmp_path / "run"
    train(config("recurrent_depth"), out=out, progress=False)
    before_rows, before = rows(out), json.loads((out / "result.json").read_text())
    (out / "result.json").unlink()
    again = train(config("recurrent_depth"), out=out, progress=False, resume=True)
    assert rows(out) == before_rows
    assert json.loads((out / "result.json").read_text()) == before  # timing too: the run did not run again
    assert again["eval"] == before["eval"]


def test_metrics_are_never_truncated_before_they_are_rewritten(tmp_path, monkeypatch):
    cfg = config("lm")
    out = tmp_path / "run"
    train(cfg, out=out, progress=False)
    (out / "result.json").unlink()
    kept = (out / "metrics.jsonl").read_text()
    real = Path.write_text

    def killed_mid_write(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt  # SIGKILL halfway through writing

    monkeypatch.setattr(Path, "write_text", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out=out, progress=False, resume=True)
    monkeypatch.setattr(Path, "write_text", real)
    assert (out / "metrics.jsonl").read_text() == kept
    assert (out / "config.json").read_text().endswith("}\n")


def test_checkpoint_folder_never_missing_while_replaced(tmp_path, monkeypatch):
    model = seqlab.build_model(mixer="gru", d_model=8, n_layers=1, vocab_size=16)
    path = tmp_path / "checkpoint"
    seqlab.save(model, path)
    seen = []
    real = checkpoint.os.rename

    def watched(src, dst):
        real(src, dst)
        seen.append(path.is_dir())  # what a reader (seqlab eval) finds right after each rename

    monkeypatch.setattr(checkpoint.os, "rename", watched)
    seqlab.save(model, path)
    assert all(seen)
    assert seqlab.load(path) is not None
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def test_checkpoint_replacement_without_an_atomic_exchange(tmp_path, monkeypatch):
    """Where the system has no renameat2, the two-rename fallback still replaces the folder."""
    monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    path = tmp_path / "checkpoint"
    seqlab.save(seqlab.build_model(mixer="gru", d_model=8, n_layers=1, vocab_size=16), path)
    seqlab.save(seqlab.build_model(mixer="gru", d_model=8, n_layers=1, vocab_size=16, seed=1), path)
    assert seqlab.load(path) is not None
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]
