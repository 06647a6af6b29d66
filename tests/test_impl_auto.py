"""impl="auto", mamba.impl's default: the numba kernel where the `kernels` extra imports and the tensors are CPU fp32,
the chunked form elsewhere (GPU, fp64, no numba), decided at every call; `seqlab.models.implementations` reports
what ran. Without numba (made unimportable as in tests/test_ops_kernels.py) auto runs chunked and an explicit
"kernel" stays an InputError; configs and checkpoints keep "auto"."""

import importlib.util
import json
import sys

import pytest
import torch
from helpers import assert_states_close, carried_run, rel_err, tiny
from test_ops_selective_scan import make_inputs

import seqlab
from seqlab.checkpoint import load_config, save
from seqlab.config import ModelConfig
from seqlab.errors import InputError
from seqlab.infer import profile
from seqlab.lab import runner
from seqlab.models import implementations
from seqlab.ops import selective_scan
from seqlab.ops.selective_scan import numba_version, resolve_impl
from seqlab.train.trainer import train

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                 reason="numba is not installed (pip install 'seqlab[kernels]'): no impl='kernel'")


@pytest.fixture
def no_numba(monkeypatch):
    """`import numba` fails from here to the end of the test, as if the extra were not installed."""
    monkeypatch.setitem(sys.modules, "numba", None)
    monkeypatch.delitem(sys.modules, "seqlab.ops.kernels", raising=False)


def count_kernel_calls(monkeypatch):
    """A list that grows by one at every call of the numba kernel."""
    import seqlab.ops.kernels as kernels
    calls, kernel = [], kernels.selective_scan_kernel

    def spy(*args):
        calls.append(args[0].shape)
        return kernel(*args)
    monkeypatch.setattr(kernels, "selective_scan_kernel", spy)
    return calls


@needs_numba
def test_the_rule_with_numba():
    """auto: kernel for CPU tensors that compute in fp32 (fp32, bf16, fp16); chunked on other devices and for
    fp64. Explicit implementations are left as they are."""
    assert resolve_impl("auto", "cpu") == resolve_impl("auto", torch.device("cpu"), torch.bfloat16) == "kernel"
    assert resolve_impl("auto", "cpu", torch.float16) == "kernel"
    assert resolve_impl("auto", "cpu", torch.float64) == "chunked"
    assert resolve_impl("auto", "cuda") == resolve_impl("auto", "meta") == "chunked"
    assert [resolve_impl(i, "cpu") for i in ("chunked", "ref", "kernel")] == ["chunked", "ref", "kernel"]
    assert numba_version() == __import__("numba").__version__


def test_default_config_is_auto_and_round_trips(tmp_path):
    """mamba.impl defaults to "auto"; the config and a checkpoint keep it (not what it resolved to), and a config
    saved with "chunked" (every checkpoint from before "auto") keeps "chunked"."""
    cfg = ModelConfig.from_dict({"mixer": "mamba", "vocab_size": 37, "d_model": 32, "n_layers": 1})
    assert cfg.mamba.impl == "auto" and cfg.to_dict()["mamba"]["impl"] == "auto"
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    old = {**cfg.to_dict(), "mamba": {**cfg.to_dict()["mamba"], "impl": "chunked"}}
    assert ModelConfig.from_dict(old).mamba.impl == "chunked"
    save(seqlab.build_model(cfg, seed=0), tmp_path / "ckpt")
    assert load_config(tmp_path / "ckpt").mamba.impl == "auto"
    with pytest.raises(InputError, match=r"'mamba.impl' = 'fast': expected one of auto, chunked, ref, kernel"):
        ModelConfig.from_dict({**cfg.to_dict(), "mamba": {"impl": "fast"}})


@needs_numba
def test_auto_model_runs_the_kernel_and_matches_chunked(monkeypatch):
    """A default (auto) Mamba model on the CPU calls the kernel in forward (training and no_grad prefill), and gives
    the chunked model's logits, carried state and gradients within test_ops_kernels.py's tolerance."""
    calls = count_kernel_calls(monkeypatch)
    auto, chunked = tiny("mamba"), tiny("mamba", mamba={"chunk_size": 8, "impl": "chunked"})
    assert auto.blocks[0].mixer.cfg.impl == "auto"
    assert implementations(auto) == {"mamba": "kernel", "numba": numba_version()}
    assert implementations(chunked)["mamba"] == "chunked"
    tokens = torch.randint(0, 37, (2, 21), generator=torch.Generator().manual_seed(5))
    (kern, kern_state, kern_grads), (fast, fast_state, fast_grads) = (carried_run(m, tokens) for m in (auto, chunked))
    assert len(calls) > 0
    torch.testing.assert_close(kern, fast, atol=1e-5, rtol=1e-5)
    assert_states_close(kern_state, fast_state, atol=1e-5)
    for n, g in fast_grads.items():
        assert rel_err(kern_grads[n], g) <= 1e-4, n
    n = len(calls)
    with torch.inference_mode():
        torch.testing.assert_close(auto(tokens)[0], chunked(tokens)[0], atol=1e-5, rtol=1e-5)
    assert len(calls) == n + auto.config.n_layers


@needs_numba
def test_auto_fp64_model_runs_chunked(monkeypatch):
    """fp64 weights: auto reports and runs the chunked form (no kernel call), equal to an explicit chunked model."""
    calls = count_kernel_calls(monkeypatch)
    auto = tiny("mamba").double()
    chunked = tiny("mamba", mamba={"chunk_size": 8, "impl": "chunked"}).double()
    assert implementations(auto)["mamba"] == "chunked"
    tokens = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(auto(tokens)[0], chunked(tokens)[0]) and calls == []


def test_auto_without_numba_runs_chunked(no_numba):
    """No numba: auto resolves to chunked, reports it, and the model trains exactly as an explicit chunked one."""
    assert numba_version() is None and resolve_impl("auto", "cpu") == "chunked"
    auto, chunked = tiny("mamba"), tiny("mamba", mamba={"chunk_size": 8, "impl": "chunked"})
    assert implementations(auto) == {"mamba": "chunked", "numba": "not installed"}
    tokens = torch.randint(0, 37, (2, 13), generator=torch.Generator().manual_seed(2))
    (a, a_state, a_grads), (c, c_state, c_grads) = (carried_run(m, tokens) for m in (auto, chunked))
    assert torch.equal(a, c)
    assert_states_close(a_state, c_state, atol=0)
    assert all(torch.equal(a_grads[n], g) for n, g in c_grads.items())
    x = make_inputs(1, 2, 3, 5, seed=0)
    torch.testing.assert_close(selective_scan(**x, impl="auto")[0], selective_scan(**x, impl="chunked")[0],
                               atol=0, rtol=0)


def test_explicit_kernel_without_numba_is_an_error(no_numba):
    """An explicit mamba.impl="kernel" never falls back: the forward raises the error that names the extra."""
    model = tiny("mamba", mamba={"impl": "kernel"})
    assert implementations(model)["mamba"] == "kernel"  # what it asks for; running it is the error
    with pytest.raises(InputError, match=r"impl='kernel' needs numba.*seqlab\[kernels\]"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_implementations_lists_every_mixer_with_an_impl():
    """One entry per mixer kind that has an `impl` option, hybrids included, plus numba; mixers without one
    (attention, gru) are not listed."""
    model = tiny(layers=("mamba", "gla", "attention", "gated_deltanet", "gru", "mamba"))
    report = implementations(model)
    assert set(report) == {"mamba", "gla", "gated_deltanet", "numba"}
    assert report["mamba"] == report["gla"] == report["gated_deltanet"] == ("kernel" if numba_version() else "chunked")
    assert report["numba"] == (numba_version() or "not installed")
    assert implementations(tiny("attention")) == {"numba": report["numba"]}


@pytest.mark.parametrize("without_numba", [False, True])
def test_result_files_record_numba_and_what_auto_runs(monkeypatch, without_numba):
    """The lab's and the profile's machine records say numba's version (or "not installed") and what
    mamba.impl="auto" runs on the CPU: the kernel with numba, chunked without."""
    if without_numba:
        monkeypatch.setitem(sys.modules, "numba", None)
        monkeypatch.delitem(sys.modules, "seqlab.ops.kernels", raising=False)
    elif numba_version() is None:
        pytest.skip("numba is not installed (pip install 'seqlab[kernels]')")
    want = ("not installed", "chunked") if without_numba else (numba_version(), "kernel")
    for record in (runner.machine(), profile.machine("cpu", 1)):
        assert (record["numba"], record["impl_auto"]) == want


def test_a_training_run_records_what_ran(tmp_path):
    """`seqlab.train` returns and writes (result.json) the implementations its model ran."""
    config = {"model": {"mixer": "mamba", "vocab_size": 16, "d_model": 16, "n_layers": 1},
              "task": {"name": "mqar", "vocab_size": 16, "seq_len": 16, "num_pairs": 2},
              "train": {"steps": 2, "batch_size": 2, "warmup_steps": 1, "log_every": 1, "eval_batches": 1}}
    result = train(config, out=tmp_path / "run", progress=False)
    want = {"mamba": "kernel" if numba_version() else "chunked", "numba": numba_version() or "not installed"}
    assert result["implementations"] == want
    assert json.loads((tmp_path / "run" / "result.json").read_text())["implementations"] == want
