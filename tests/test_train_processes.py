"""The trainer across processes: SIGKILL mid-run then --resume (bit-identical), and DDP through torchrun with
two gloo processes (equal to one process with the same global batch)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seqlab.checkpoint import read_tensors
from seqlab.train import train

SRC = str(Path(__file__).resolve().parents[1] / "src")
CONFIG = {
    "model": {"mixer": "gru", "vocab_size": 16, "d_model": 16, "n_layers": 1},
    "task": {"name": "mqar", "vocab_size": 16, "seq_len": 16, "num_pairs": 2},
    "train": {"steps": 60, "batch_size": 8, "warmup_steps": 2, "log_every": 1, "eval_batches": 1,
              "checkpoint_every": 5},
}


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = SRC + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"
    return e


def seqlab(*args):
    return [sys.executable, "-m", "seqlab", *args]


def write_config(tmp_path, config):
    path = tmp_path / "run.json"
    path.write_text(json.dumps(config))
    return path


def train_rows(out):
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines() if r.strip()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    cfg = write_config(tmp_path, CONFIG)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = ["train", "--config", str(cfg), "--no-progress", "--out"]
    subprocess.run(seqlab(*args, str(whole)), env=env(), check=True, capture_output=True)

    proc = subprocess.Popen(seqlab(*args, str(cut)), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        metrics = cut / "metrics.jsonl"
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if len(lines) >= 13:  # past the checkpoints at steps 5 and 10, somewhere in a later step
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert json.loads((cut / "checkpoint" / "trainer.json").read_text())["step"] < 60

    done = subprocess.run(seqlab(*args, str(cut), "--resume"), env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a, b = read_tensors(whole / "checkpoint"), read_tensors(cut / "checkpoint")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_rows(whole) == train_rows(cut)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_ddp_two_gloo_processes_equal_one_process(tmp_path):
    config = json.loads(json.dumps(CONFIG))
    config["train"].update(steps=3, checkpoint_every=0)
    config["task"] = {"name": "copy", "vocab_size": 16, "seq_len": 17}  # unequal mask counts across ranks
    cfg = write_config(tmp_path, config)
    args = ["train", "--config", str(cfg), "--no-progress", "--out"]
    train(config, out=tmp_path / "one", progress=False)  # in this process: the reference, one process
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "seqlab", *args, str(tmp_path / "two")]
    done = subprocess.run(torchrun, env=env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = read_tensors(tmp_path / "one" / "checkpoint"), read_tensors(tmp_path / "two" / "checkpoint")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    rows_one, rows_two = train_rows(tmp_path / "one"), train_rows(tmp_path / "two")
    assert len(rows_two) == len(rows_one)  # rank 0 alone logs
    for r1, r2 in zip(rows_one, rows_two):
        for key in ("loss", "eval_loss"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-5)


DISTILL_SCRIPT = """
import sys

import torch

import seqlab
from seqlab.config import TrainConfig
from seqlab.data import make_task
from seqlab.distill import DistillConfig, distill
from seqlab.train.distributed import launched_world, shutdown

teacher = seqlab.build_model(dict(mixer="attention", vocab_size=16, d_model=16, n_layers=2,
                                  attention={"n_heads": 2}, init_std=0.3), seed=1)
student = seqlab.build_model(dict(mixer="gru", vocab_size=16, d_model=8, n_layers=1), seed=0)
cfg = DistillConfig(ce_weight=0.5, hidden_weight=0.5, transfer=False,
                    train=TrainConfig(steps=3, batch_size=8, warmup_steps=1, eval_batches=1, log_every=1))
torch.manual_seed(0)  # the hidden projections' init: the same on every process
distill(teacher, student, make_task("copy", vocab_size=16, seq_len=17), cfg, progress=False,
        checkpoint_dir=sys.argv[1])
shutdown(launched_world())
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_ddp_distillation_equals_one_process(tmp_path):
    """Distillation trains through the same loop: under torchrun the student is DDP's, and the hidden
    projections (the loss's own parameters) get their gradients averaged too."""
    script = tmp_path / "distill_run.py"
    script.write_text(DISTILL_SCRIPT)
    for out, launcher in ((tmp_path / "one", [sys.executable]),
                          (tmp_path / "two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              "--nproc_per_node", "2"])):
        done = subprocess.run([*launcher, str(script), str(out)], env=env(), capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
    for name in ("model.safetensors", "trainer.safetensors"):
        a, b = read_tensors(tmp_path / "one" / "checkpoint", name), read_tensors(tmp_path / "two" / "checkpoint", name)
        keys = [k for k in a if not k.startswith("rng.")]
        assert keys and all(k in b for k in keys)
        for k in keys:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
