"""The mamba and gla mixers built on the scan ops: published init, impl="ref" (the naive twins) against the chunked
scans, the O(1) step path, chunked prefill from a carried state (values and gradients), the output gate and per-head
norm, fp32 states under bf16 weights."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_states_close, carried_run, tiny

import seqlab
import seqlab.models.gla as gla_module
import seqlab.models.mamba as mamba_module

MIXERS = ("mamba", "gla")


def test_mamba_published_init():
    """A = -(1..N) per channel (S4D-real); dt = softplus(dt bias) log-uniform in [dt_min, dt_max]; D = 1."""
    model = seqlab.build_model(dict(mixer="mamba", vocab_size=11, d_model=64, n_layers=1,
                                    mamba={"d_state": 8, "dt_min": 0.002, "dt_max": 0.05}), seed=3)
    m = model.blocks[0].mixer  # the language model's own init ran first; the mixer's published init must win
    assert torch.equal(m.A_log, torch.log(torch.arange(1, 9, dtype=torch.float32)).repeat(128, 1))
    torch.testing.assert_close(-torch.exp(m.A_log), -torch.arange(1.0, 9.0).repeat(128, 1))
    assert torch.equal(m.D, torch.ones(128))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.002 * (1 - 1e-5) and dt.max() <= 0.05 * (1 + 1e-5)
    # log-uniform: log dt is spread over the whole range, about half of it below the geometric mean
    below = (dt < math.sqrt(0.002 * 0.05)).float().mean()
    assert 0.3 < below < 0.7 and dt.min() < 0.004 and dt.max() > 0.025
    assert m.dt_proj.weight.abs().max() <= m.dt_rank ** -0.5


@pytest.mark.parametrize("mixer", MIXERS)
def test_impl_ref_model_matches_the_chunked_model(mixer):
    """A model configured with impl="ref" runs the naive twins (what ONNX export traces): the same logits, final
    state and parameter gradients as the chunked scans, from a carried state too (fp64, so only rounding differs)."""
    cfg = {"chunk_size": 8} if mixer == "mamba" else {"n_heads": 2, "chunk_size": 8}
    models = [tiny(mixer, **{mixer: {**cfg, "impl": impl}}).double() for impl in ("chunked", "ref")]
    tokens = torch.randint(0, 37, (2, 21), generator=torch.Generator().manual_seed(5))
    results = [carried_run(model, tokens) for model in models]
    (fast, fast_state, fast_grads), (ref, ref_state, ref_grads) = results
    assert models[1].blocks[0].mixer.cfg.impl == "ref"
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-10)
    assert_states_close(fast_state, ref_state, atol=1e-10)
    for n, g in ref_grads.items():
        torch.testing.assert_close(fast_grads[n], g, atol=1e-10, rtol=1e-8, msg=n)


@pytest.mark.parametrize("mixer", MIXERS)
def test_decoding_takes_the_step_path_without_any_scan(mixer, monkeypatch):
    model = tiny(mixer)
    tokens = torch.randint(0, 37, (2, 12), generator=torch.Generator().manual_seed(0))
    full, _ = model(tokens)
    _, state = model(tokens[:, :11])

    def no_scan(*args, **kwargs):
        raise AssertionError("a single decoding step ran the scan")

    module, name = (mamba_module, "selective_scan") if mixer == "mamba" else (gla_module, "gla")
    monkeypatch.setattr(module, name, no_scan)
    last, _ = model(tokens[:, 11:], state)
    torch.testing.assert_close(last, full[:, 11:], atol=1e-4, rtol=0)
    with pytest.raises(AssertionError, match="ran the scan"):
        model(tokens[:, :2], state)  # two tokens are a chunk: the scan, which the patch forbids


@pytest.mark.parametrize("mixer", MIXERS)
def test_prefill_in_chunks_from_a_carried_state_equals_one_prefill(mixer):
    """Pieces of every kind (shorter than, equal to, longer than, and straddling the scan's chunk of 8)."""
    model = tiny(mixer)
    tokens = torch.randint(0, 37, (2, 61), generator=torch.Generator().manual_seed(1))
    full, full_state = model(tokens)
    state, outs = None, []
    for a, b in [(0, 5), (5, 13), (13, 21), (21, 48), (48, 49), (49, 61)]:
        logits, state = model(tokens[:, a:b], state)
        outs.append(logits)
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-4, rtol=0)
    assert_states_close(state, full_state)


@pytest.mark.parametrize("mixer", MIXERS)
def test_gradients_flow_through_a_carried_state(mixer):
    """Two chunked calls with the state carried between them give the gradients of one call (nothing detached):
    what truncated BPTT relies on when it does not detach."""
    model = tiny(mixer).train()
    tokens = torch.randint(0, 37, (2, 30), generator=torch.Generator().manual_seed(2))

    def grads(pieces):
        model.zero_grad()
        state, outs = None, []
        for a, b in pieces:
            logits, state = model(tokens[:, a:b], state)
            outs.append(logits)
        logits = torch.cat(outs, 1)
        loss = F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten())
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    one, two = grads([(0, 30)]), grads([(0, 17), (17, 30)])
    for n in one:
        torch.testing.assert_close(two[n], one[n], atol=1e-5, rtol=1e-4, msg=n)


def test_gla_output_gate_and_per_head_norm():
    model = tiny("gla")
    m = model.blocks[0].mixer
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        m.v_proj.weight.mul_(100.0)  # outputs well above the norm's eps
    y, _ = m(x)
    with torch.no_grad():
        m.v_proj.weight.mul_(7.0)  # the per-head RMSNorm cancels a scale of the values
    torch.testing.assert_close(m(x)[0], y, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        m.gate_proj.weight.zero_()  # silu(0) = 0: the output gate closes
    assert m(x)[0].abs().max() == 0


@pytest.mark.parametrize("mixer", MIXERS)
def test_bf16_weights_keep_fp32_states(mixer):
    model = tiny(mixer).to(torch.bfloat16)
    tokens = torch.randint(0, 37, (2, 10), generator=torch.Generator().manual_seed(4))
    logits, state = model(tokens)
    logits1, state1 = model(tokens[:, :1], state)  # and through the step path
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits1.float()).all()
    for s in (state, state1):
        recurrent = [s.layers[0].ssm] if mixer == "mamba" else [s.layers[0].S]
        assert all(t.dtype == torch.float32 for t in recurrent)
