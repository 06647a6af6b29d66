"""The traced decode plan (`seqlab.infer.traced.TracedPlan`): its steps give the model's own logits (within 1e-4) for
every mixer and block variant, `generate` with it picks the eager plan's greedy tokens, and what it does not cover is
a clear InputError."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny

import seqlab
from seqlab.errors import InputError
from seqlab.infer.traced import TracedPlan, TracedState

VARIANTS = {
    "gpt2-like": dict(mixer="attention", position="learned", norm="layernorm", mlp="gelu_tanh", mlp_bias=True,
                      attention={"n_heads": 4, "bias": True}),
    "llama-like": dict(mixer="attention", attention={"n_heads": 4, "n_kv_heads": 2}, mlp="swiglu", norm="rmsnorm"),
    "hybrid": dict(layers=("mamba", "sliding_attention", "gla", "gru")),
}


def _model(name: str):
    if name in VARIANTS:
        fields = dict(VARIANTS[name])
        return tiny(fields.pop("mixer", None), layers=fields.pop("layers", None), **fields)
    return tiny(name)


@pytest.mark.parametrize("name", [*seqlab.available_mixers(), *VARIANTS])
def test_traced_steps_equal_the_model_and_generate_picks_the_same_tokens(name):
    model = _model(name)
    plan = TracedPlan(model, batch=2, cache_size=24)
    tokens = torch.randint(0, 37, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        _, ref_state = model(tokens[:, :6])
        state = plan.start(ref_state)
        for t in range(6, 16):  # past the sliding window (5)
            ref, ref_state = model(tokens[:, t:t + 1], ref_state)
            got, state = plan(tokens[:, t:t + 1], state)
            torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert state.pos == 16
    prompt = tokens[:, :5]
    eager = seqlab.generate(model, prompt, max_new_tokens=20, stop_at_eos=False)
    traced = seqlab.generate(model, prompt, max_new_tokens=20, stop_at_eos=False, plan=plan)
    assert torch.equal(traced, eager)


def test_what_a_traced_plan_does_not_cover_is_an_input_error():
    depth = seqlab.build_model(arch="recurrent_depth", vocab_size=37, d_model=32, seed=0)
    with pytest.raises(InputError, match="LanguageModel"):
        TracedPlan(depth)
    with pytest.raises(InputError, match="fp32"):
        TracedPlan(tiny("mamba").to(torch.float64))
    with pytest.raises(InputError, match="cache_size"):
        TracedPlan(tiny("mamba"), cache_size=0)
    with pytest.raises(InputError, match="max_positions"):
        TracedPlan(tiny("attention", position="learned", max_positions=16), cache_size=32)

    model = tiny("attention")
    plan = TracedPlan(model, batch=1, cache_size=12)
    prompt = torch.randint(0, 37, (1, 4), generator=torch.Generator().manual_seed(1))
    with pytest.raises(InputError, match="cache_size = 12"):
        seqlab.generate(model, prompt, max_new_tokens=10, plan=plan)  # 4 + 10 - 1 tokens fed > 12
    assert seqlab.generate(model, prompt, max_new_tokens=9, plan=plan, stop_at_eos=False).shape == (1, 13)
    with pytest.raises(InputError, match="batch 1"):
        seqlab.generate(model, prompt.repeat(2, 1), max_new_tokens=4, plan=plan)
    with pytest.raises(InputError, match="another model"):
        seqlab.generate(tiny("attention"), prompt, max_new_tokens=4, plan=plan)
    with pytest.raises(InputError, match="use_cache"):
        seqlab.generate(model, prompt, max_new_tokens=4, plan=plan, use_cache=False)
    with torch.inference_mode():
        _, state = model(prompt)
        state = plan.start(state)
        with pytest.raises(InputError, match="out of range"):
            plan(torch.tensor([[37]]), state)
        with pytest.raises(InputError, match=r"\(1, 1\)"):
            plan(torch.tensor([[1, 2]]), state)
        with pytest.raises(InputError, match="TracedState"):
            plan(torch.tensor([[1]]), model(prompt)[1])
        with pytest.raises(InputError, match="past"):
            plan(torch.tensor([[1]]), TracedState(state.tensors, 12))
