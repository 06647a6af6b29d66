"""The deltanet / gated_deltanet mixers: the published parameterization, the 3:1 gated_deltanet + attention hybrid
under the model contract, and layer-level parity with the Gated DeltaNet layers of transformers' OLMo-Hybrid and
Qwen3-Next (random weights copied into a seqlab mixer: one call, token by token, the recurrent state)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_states_close, tiny

import seqlab
from seqlab.config import layer_plan
from seqlab.errors import InputError
from seqlab.models import as_config, build_mixer

HYBRID = layer_plan("3:1 gated_deltanet:attention", 4)  # the hybrid grammar


def test_three_to_one_hybrid_one_call_equals_chunks_equals_steps():
    assert HYBRID == ("gated_deltanet", "gated_deltanet", "gated_deltanet", "attention")
    model = tiny(layers=HYBRID)
    tokens = torch.randint(0, 37, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, full_state = model(tokens)
        a, s = model(tokens[:, :7])
        b, two_state = model(tokens[:, 7:], s)
        state, steps = None, []
        for t in range(19):
            y, state = model(tokens[:, t:t + 1], state)
            steps.append(y)
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)
    assert_states_close(two_state, full_state)
    assert_states_close(state, full_state)
    prompt = tokens[:, :5]
    cached = seqlab.generate(model, prompt, max_new_tokens=8, use_cache=True)
    assert torch.equal(cached, seqlab.generate(model, prompt, max_new_tokens=8, use_cache=False))


def test_published_sizes_and_init():
    """Gated DeltaNet's defaults: dk = 0.75 d_model / H, dv = 2 dk; A = exp(A_log) in (0, 16); softplus(dt_bias)
    in [1e-3, 1e-1]; deltanet has no decay parameters."""
    cfg = as_config(mixer="gated_deltanet", d_model=64, deltanet={"n_heads": 4})
    m = build_mixer("gated_deltanet", cfg)
    assert (m.dk, m.dv, m.H, m.Hv) == (12, 24, 4, 4)
    A = torch.exp(m.A_log.detach())
    assert ((A > 0) & (A < 16)).all()
    dt = torch.nn.functional.softplus(m.dt_bias.detach())
    assert ((dt >= 1e-3 - 1e-7) & (dt <= 0.1 + 1e-7)).all()
    plain = build_mixer("deltanet", as_config(mixer="deltanet", d_model=64))
    assert not hasattr(plain, "A_log") and not hasattr(plain, "a_proj")
    assert sum(p.numel() for p in m.parameters()) - sum(p.numel() for p in plain.parameters()) == 4 * 64 + 8


def test_bad_config():
    with pytest.raises(InputError, match="deltanet.n_v_heads"):
        as_config(mixer="gated_deltanet", d_model=32, deltanet={"n_heads": 2, "n_v_heads": 3})
    with pytest.raises(InputError, match="deltanet.head_dim"):
        as_config(mixer="deltanet", d_model=4, deltanet={"n_heads": 4})


# ---------------------------------------------------------------------------------------------------------------
# parity with transformers (OLMo-Hybrid's GatedDeltaNet layer)


def olmo_layer(n_k_heads, n_v_heads, neg_eigval):
    pytest.importorskip("transformers")
    from transformers.models.olmo_hybrid import modeling_olmo_hybrid as olmo
    from transformers.models.olmo_hybrid.configuration_olmo_hybrid import OlmoHybridConfig

    cfg = OlmoHybridConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, linear_num_key_heads=n_k_heads,
                           linear_num_value_heads=n_v_heads, linear_key_head_dim=8, linear_value_head_dim=6,
                           linear_allow_neg_eigval=neg_eigval, layer_types=["linear_attention", "full_attention"],
                           pad_token_id=0, eos_token_id=1, bos_token_id=1)
    torch.manual_seed(0)
    layer = olmo.OlmoHybridGatedDeltaNet(cfg, 0).eval()
    with torch.no_grad():  # random weights everywhere, the norm's too, and A spread over its init range
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        layer.A_log.copy_(torch.log(torch.rand(n_v_heads) * 16))
        layer.dt_bias.copy_(torch.randn(n_v_heads))
    return cfg, layer


def seqlab_copy(layer, n_k_heads, n_v_heads, neg_eigval):
    cfg = as_config(mixer="gated_deltanet", d_model=32, deltanet={
        "n_heads": n_k_heads, "n_v_heads": n_v_heads, "head_dim": 8, "v_head_dim": 6, "conv_size": 4,
        "norm_eps": layer.o_norm.variance_epsilon, "allow_neg_eigval": neg_eigval, "chunk_size": 4})
    m = build_mixer("gated_deltanet", cfg).eval()
    names = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "a_proj": "a_proj", "b_proj": "b_proj",
             "g_proj": "g_proj", "out_proj": "o_proj", "conv": "conv1d", "norm": "o_norm"}
    with torch.no_grad():
        for ours, theirs in names.items():
            getattr(m, ours).weight.copy_(getattr(layer, theirs).weight)
        m.A_log.copy_(layer.A_log)
        m.dt_bias.copy_(layer.dt_bias)
    return m


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("n_k_heads, n_v_heads, neg_eigval", [(2, 2, True), (2, 4, True), (2, 2, False)])
def test_olmo_hybrid_gated_deltanet_layer_parity(n_k_heads, n_v_heads, neg_eigval):
    from transformers.cache_utils import DynamicCache

    hf_cfg, layer = olmo_layer(n_k_heads, n_v_heads, neg_eigval)
    m = seqlab_copy(layer, n_k_heads, n_v_heads, neg_eigval)
    x = torch.randn(2, 70, 32, generator=torch.Generator().manual_seed(1))  # past their chunk of 64
    with torch.no_grad():
        want = layer(x)
        got, _ = m(x)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        cache, state, hf_steps, our_steps = DynamicCache(config=hf_cfg), None, [], []
        for t in range(70):  # token by token: their recurrent path and cache, our step
            hf_steps.append(layer(x[:, t:t + 1], cache=cache))
            y, state = m(x[:, t:t + 1], state)
            our_steps.append(y)
        torch.testing.assert_close(torch.cat(our_steps, 1), want, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.cat(our_steps, 1), torch.cat(hf_steps, 1), atol=1e-4, rtol=0)
        hf_S = cache.get_recurrent_state(0, state_idx=0)
        torch.testing.assert_close(state.S, hf_S, atol=1e-4, rtol=0)
    assert math.isclose(m.norm.eps, 1e-5)


# ---------------------------------------------------------------------------------------------------------------
# parity with transformers (Qwen3-Next's GatedDeltaNet layer: the same math, fused and interleaved projections)


def qwen3_next_layer(n_k_heads, n_v_heads):
    pytest.importorskip("transformers")
    from transformers.models.qwen3_next import modeling_qwen3_next as qwen
    from transformers.models.qwen3_next.configuration_qwen3_next import Qwen3NextConfig

    cfg = Qwen3NextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, head_dim=16, linear_num_key_heads=n_k_heads,
                          linear_num_value_heads=n_v_heads, linear_key_head_dim=8, linear_value_head_dim=6,
                          layer_types=["linear_attention", "full_attention"], num_experts=2, num_experts_per_tok=1,
                          moe_intermediate_size=16, shared_expert_intermediate_size=16)
    torch.manual_seed(0)
    layer = qwen.Qwen3NextGatedDeltaNet(cfg, 0).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        layer.A_log.copy_(torch.log(torch.rand(n_v_heads) * 16))
        layer.dt_bias.copy_(torch.randn(n_v_heads))
    return cfg, layer


def seqlab_from_qwen3_next(layer, n_k_heads, n_v_heads):
    """in_proj_qkvz holds, per key head h, the rows [q_h, k_h, v and z of its Hv / H value heads]; in_proj_ba, per
    key head, [b, a] of its value heads. Regrouped into seqlab's separate projections (z is the output gate)."""
    cfg = as_config(mixer="gated_deltanet", d_model=32, deltanet={
        "n_heads": n_k_heads, "n_v_heads": n_v_heads, "head_dim": 8, "v_head_dim": 6,
        "norm_eps": layer.norm.variance_epsilon, "chunk_size": 4})
    m = build_mixer("gated_deltanet", cfg).eval()
    r, dk, dv = n_v_heads // n_k_heads, 8, 6
    qkvz = layer.in_proj_qkvz.weight.view(n_k_heads, 2 * dk + 2 * r * dv, 32)
    q, k, v, z = qkvz.split([dk, dk, r * dv, r * dv], dim=1)
    b, a = layer.in_proj_ba.weight.view(n_k_heads, 2 * r, 32).split([r, r], dim=1)
    with torch.no_grad():
        for ours, w in (("q_proj", q), ("k_proj", k), ("v_proj", v), ("g_proj", z), ("b_proj", b), ("a_proj", a)):
            getattr(m, ours).weight.copy_(w.reshape(-1, 32))
        for ours, theirs in (("conv", "conv1d"), ("norm", "norm"), ("out_proj", "out_proj")):
            getattr(m, ours).weight.copy_(getattr(layer, theirs).weight)
        m.A_log.copy_(layer.A_log)
        m.dt_bias.copy_(layer.dt_bias)
    return m


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("n_k_heads, n_v_heads", [(2, 2), (2, 4)])
def test_qwen3_next_gated_deltanet_layer_parity(n_k_heads, n_v_heads):
    from transformers.cache_utils import DynamicCache

    hf_cfg, layer = qwen3_next_layer(n_k_heads, n_v_heads)
    m = seqlab_from_qwen3_next(layer, n_k_heads, n_v_heads)
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = layer(x)
        got, _ = m(x)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        cache, state, hf_steps, our_steps = DynamicCache(config=hf_cfg), None, [], []
        for t in range(11):
            hf_steps.append(layer(x[:, t:t + 1], cache=cache))
            y, state = m(x[:, t:t + 1], state)
            our_steps.append(y)
        torch.testing.assert_close(torch.cat(our_steps, 1), want, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.cat(our_steps, 1), torch.cat(hf_steps, 1), atol=1e-4, rtol=0)
        torch.testing.assert_close(state.S, cache.get_recurrent_state(0, state_idx=0), atol=1e-4, rtol=0)
