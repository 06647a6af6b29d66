"""The model contract (DESIGN.md) for every mixer and for hybrids: one call == chunks == token by token."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_states_close, tiny
from hypothesis import given
from hypothesis import strategies as st

import seqlab
from seqlab.config import MIXERS

ALL = seqlab.available_mixers()
HYBRIDS = [("lstm", "attention"), ("conv", "sliding_attention", "gru")]
if "mamba" in ALL:
    HYBRIDS.append(("mamba", "attention"))


def test_registry_matches_config_names():
    assert set(ALL) <= set(MIXERS)
    assert {"attention", "sliding_attention", "lstm", "gru", "conv"} <= set(ALL)


def run_in_pieces(model, tokens, cuts):
    """Feed tokens in the pieces that `cuts` delimits, carrying the state; return logits and final state."""
    state, outs, edges = None, [], [0, *cuts, tokens.shape[1]]
    for a, b in zip(edges, edges[1:]):
        logits, state = model(tokens[:, a:b], state)
        outs.append(logits)
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("layers", [(m, m) for m in ALL] + HYBRIDS, ids=lambda x: "+".join(x))
@given(batch=st.integers(1, 3), length=st.integers(1, 24), data=st.data())
def test_one_call_equals_chunks_equals_steps(layers, batch, length, data):
    model = tiny(layers=layers)
    tokens = torch.randint(0, 37, (batch, length), generator=torch.Generator().manual_seed(length))
    full, full_state = model(tokens)
    assert full.shape == (batch, length, 37)
    split = data.draw(st.integers(1, length - 1)) if length > 1 else None
    two, two_state = run_in_pieces(model, tokens, [split] if split else [])
    steps, step_state = run_in_pieces(model, tokens, list(range(1, length)))
    torch.testing.assert_close(two, full, atol=1e-4, rtol=0)
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=0)
    assert_states_close(two_state, full_state)
    assert_states_close(step_state, full_state)


@given(d_model=st.sampled_from([16, 24, 48]), n_layers=st.integers(1, 3), heads=st.sampled_from([1, 2, 4]),
       mixer=st.sampled_from(ALL))
def test_contract_over_model_sizes(d_model, n_layers, heads, mixer):
    model = tiny(mixer, d_model=d_model, n_layers=n_layers,
                 attention={"n_heads": heads, "n_kv_heads": 1, "window": 3})
    tokens = torch.randint(0, 37, (2, 9))
    full, full_state = model(tokens)
    steps, step_state = run_in_pieces(model, tokens, list(range(1, 9)))
    torch.testing.assert_close(steps, full, atol=1e-4, rtol=0)
    assert_states_close(step_state, full_state)


@pytest.mark.parametrize("layers", [(m, m) for m in ALL] + HYBRIDS, ids=lambda x: "+".join(x))
def test_cached_greedy_equals_uncached(layers):
    model = tiny(layers=layers)
    prompt = torch.randint(0, 37, (2, 6))
    cached = seqlab.generate(model, prompt, max_new_tokens=12, use_cache=True)
    uncached = seqlab.generate(model, prompt, max_new_tokens=12, use_cache=False)
    assert cached.shape == (2, 18)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("mixer", ALL)
def test_gradients_reach_every_parameter(mixer):
    model = tiny(mixer).train()
    tokens = torch.randint(0, 37, (2, 12))
    logits, _ = model(tokens)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def nbytes_after(model, T):
    _, state = model(torch.zeros(1, T, dtype=torch.long))
    return state.nbytes


def test_attention_cache_bytes_follow_the_formula():
    layers, kv_heads, head_dim = 3, 2, 8
    model = tiny("attention", n_layers=layers, attention={"n_heads": 4, "n_kv_heads": kv_heads})
    for T in (1, 7, 50, 130):
        assert nbytes_after(model, T) == 2 * layers * kv_heads * head_dim * T * 4


def test_sliding_attention_cache_stops_growing_at_the_window():
    model = tiny("sliding_attention", attention={"n_heads": 4, "window": 5})
    sizes = [nbytes_after(model, T) for T in (1, 3, 5, 6, 20, 100)]
    assert sizes[0] < sizes[1] < sizes[2]
    assert sizes[2] == sizes[3] == sizes[4] == sizes[5]  # bounded at W = 5 entries
    assert sizes[2] == 2 * 2 * 4 * 8 * 5 * 4


@pytest.mark.parametrize("mixer", [m for m in ALL if "attention" not in m])
def test_recurrent_state_is_constant_in_context(mixer):
    model = tiny(mixer)
    sizes = {nbytes_after(model, T) for T in (1, 10, 200)}
    assert len(sizes) == 1 and sizes.pop() > 0


def held_after(model, T):
    """Bytes of the storages the state's tensors keep alive (a view keeps its whole base tensor)."""
    _, state = model(torch.zeros(1, T, dtype=torch.long))
    return sum(t.untyped_storage().nbytes() for s in state.layers if s is not None for t in s.tensors().values())


@pytest.mark.parametrize("mixer", [m for m in ALL if m != "attention"])
def test_a_state_keeps_no_more_memory_alive_than_it_holds(mixer):
    """A state must not be a view into the chunk's activations: a conv window sliced from the padded input kept
    the whole (B, D, T) input alive, so a recurrent-depth model scoring 512 bits at r = 1024 kept one per step."""
    model = tiny(mixer, attention={"n_heads": 4, "window": 5})
    assert held_after(model, 10) == held_after(model, 400)


def test_sliding_window_really_limits_what_a_token_sees():
    model = tiny("sliding_attention", n_layers=1, attention={"n_heads": 4, "window": 3})
    a = torch.randint(0, 37, (1, 12))
    b = a.clone()
    b[0, 0:8] = (b[0, 0:8] + 1) % 37  # change only what lies beyond the window of the last token
    torch.testing.assert_close(model(a)[0][0, -1], model(b)[0][0, -1], atol=1e-6, rtol=0)
    b[0, 8] = (b[0, 8] + 1) % 37  # the oldest token inside the window does matter
    assert not torch.allclose(model(a)[0][0, -1], model(b)[0][0, -1], atol=1e-6)


def test_bad_tokens_and_states_raise_clear_errors():
    model = tiny("gru")
    with pytest.raises(seqlab.InputError, match="token id 37 is out of range"):
        model(torch.tensor([[1, 37]]))
    with pytest.raises(seqlab.InputError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(seqlab.InputError, match=r"\(batch, time\)"):
        model(torch.tensor([1, 2]))
    with pytest.raises(seqlab.InputError, match="int64"):
        model(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(seqlab.InputError, match="ModelState"):
        model(torch.tensor([[1, 2]]), state=(1, 2))


def test_seeded_build_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    a = seqlab.build_model(mixer="lstm", d_model=16, seed=3)
    after = torch.rand(1)
    b = seqlab.build_model(mixer="lstm", d_model=16, seed=3)
    assert torch.equal(before, after)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("arch", ["lm", "recurrent_depth"])
def test_init_schemes_set_the_weight_scales_they_name(arch):
    fields = dict(arch=arch, mixer="attention", vocab_size=64, d_model=64, tie_embeddings=False)
    gpt2 = seqlab.build_model(**fields, seed=0)
    torch_init = seqlab.build_model(**fields, init="torch", seed=0)
    assert gpt2.embed.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch_init.embed.weight.std().item() == pytest.approx(1.0, rel=0.1)  # nn.Embedding: N(0, 1)
    wq = next(m.wq for m in torch_init.modules() if hasattr(m, "wq"))
    bound = 1 / 64**0.5  # nn.Linear: uniform(+-1/sqrt(fan_in))
    assert wq.weight.abs().max().item() <= bound and wq.weight.abs().max().item() > 0.9 * bound
    assert torch_init.head.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.1)  # std of that uniform
