"""Fast decoding: the preallocated KV cache, generate / generate_batch, and `seqlab generate --stream/--stats`."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import assert_states_close, tiny

import seqlab
from seqlab.cli import main
from seqlab.infer.decode import allocated_nbytes, reserve
from seqlab.infer.plan import DecodePlan

ALL = seqlab.available_mixers()


def feed(model, tokens, cuts, state=None):
    outs, edges = [], [0, *cuts, tokens.shape[1]]
    for a, b in zip(edges, edges[1:]):
        logits, state = model(tokens[:, a:b], state)
        outs.append(logits)
    return torch.cat(outs, dim=1), state


@pytest.mark.parametrize("mixer", ["attention", "sliding_attention"])
def test_preallocated_cache_equals_concatenation(mixer):
    model = tiny(mixer)  # window 5, so the sliding cache is compacted many times
    tokens = torch.randint(0, 37, (2, 90))
    cuts = [7, 8, 9, 30, *range(31, 90)]  # chunks, then one token at a time
    ref, ref_state = feed(model, tokens, cuts)  # a plain cache: concatenation, autograd on
    assert ref_state.layers[0].buffer is None
    with torch.inference_mode():
        head, state = feed(model, tokens[:, :30], [7, 8, 9])
        assert state.layers[0].buffer is None  # forward from no state makes a plain cache, grad mode or not
        grown, grown_state = feed(model, tokens[:, 30:], list(range(1, 60)), reserve(model, state, 1))
        steps, step_state = [], state  # Attention.step makes a buffer and grows it by 25% when full
        for t in range(30, 90):
            logits, step_state = model.step(tokens[:, t], step_state)
            steps.append(logits)
        reserved, reserved_state = feed(model, tokens[:, 9:], [1, 2, 3], reserve(model, model(tokens[:, :9])[1], 90))
    torch.testing.assert_close(torch.cat([head, grown], 1), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(steps, 1), ref[:, 30:], atol=1e-5, rtol=0)
    torch.testing.assert_close(reserved, ref[:, 9:], atol=1e-5, rtol=0)
    for s in (grown_state, step_state, reserved_state):
        assert_states_close(s, ref_state, atol=1e-5)
        assert s.layers[0].buffer is not None  # really the preallocated path


def test_cache_stays_a_value_when_branched():
    model = tiny("attention")
    with torch.inference_mode():
        _, s0 = model(torch.randint(0, 37, (1, 10)))
        s0 = reserve(model, s0, 8)
        la, sa = model(torch.tensor([[3]]), s0)  # writes in place after s0's entries
        kept = [t.clone() for t in sa.layers[0].tensors().values()]
        lb, sb = model(torch.tensor([[4]]), s0)  # branches from s0 again: must not overwrite sa
        lb2, _ = model(torch.tensor([[5]]), sa)
    for t, k in zip(sa.layers[0].tensors().values(), kept):
        assert torch.equal(t, k)
    ref_b, _ = model(torch.tensor([[4]]), s0.map(torch.clone))
    ref_b2, _ = model(torch.tensor([[5]]), sa.map(torch.clone))
    torch.testing.assert_close(lb, ref_b, atol=1e-6, rtol=0)
    torch.testing.assert_close(lb2, ref_b2, atol=1e-6, rtol=0)
    assert sa.layers[0].buffer is s0.layers[0].buffer and sb.layers[0].buffer is not s0.layers[0].buffer


def test_cache_bytes_report_used_entries_and_allocation_is_bounded():
    layers, kv_heads, head_dim = 2, 2, 8
    model = tiny("attention", attention={"n_heads": 4, "n_kv_heads": kv_heads})
    with torch.inference_mode():
        _, state = model(torch.randint(0, 37, (1, 20)))
        state = reserve(model, state, 30)
        buffers = {id(s.buffer) for s in state.layers}
        for t in range(30):
            _, state = model(torch.tensor([[t % 37]]), state)
            assert state.nbytes == 2 * layers * kv_heads * head_dim * (21 + t) * 4  # the formula, exactly
        assert {id(s.buffer) for s in state.layers} == buffers  # never reallocated within the reservation
        assert allocated_nbytes(state) == 2 * layers * kv_heads * head_dim * 50 * 4
        for _ in range(100):  # past the reservation: grows by 25% (at least 64 entries) at a time
            _, state = model(torch.tensor([[1]]), state)
        entry = 2 * layers * kv_heads * head_dim * 4
        assert state.nbytes <= allocated_nbytes(state) <= state.nbytes * 1.25 + entry * 65


def test_sliding_cache_allocation_stays_bounded():
    model = tiny("sliding_attention", attention={"n_heads": 4, "window": 5})
    with torch.inference_mode():
        _, state = model(torch.randint(0, 37, (1, 3)))
        for t in range(300):
            _, state = model(torch.tensor([[t % 37]]), state)
            assert state.layers[0].k.shape[2] == min(4 + t, 5)
            assert state.layers[0].capacity <= 5 + 64 + 1


@pytest.mark.parametrize("layers", [(m, m) for m in ALL] + [("gru", "attention")], ids="+".join)
def test_batch_of_different_lengths_equals_one_by_one(layers):
    model = tiny(layers=layers)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11], torch.tensor([12, 13])]
    outs = seqlab.generate_batch(model, prompts, max_new_tokens=7)
    for p, out in zip(prompts, outs):
        assert torch.equal(out, seqlab.generate(model, p, max_new_tokens=7)[0])


def test_sampling_is_seeded_and_matches_a_stream():
    model = tiny("gru")
    prompt = torch.randint(0, 37, (2, 5))
    a = seqlab.generate(model, prompt, 20, temperature=1.0, top_k=10, seed=3)
    assert torch.equal(a, seqlab.generate(model, prompt, 20, temperature=1.0, top_k=10, seed=3))
    assert not torch.equal(a, seqlab.generate(model, prompt, 20, temperature=1.0, top_k=10, seed=4))
    stream = seqlab.Stream(model, temperature=1.0, top_k=10, seed=3)
    stream.feed(prompt)
    assert torch.equal(stream.generate(20), a[:, 5:])


def test_generate_rejects_bad_arguments():
    model = tiny("gru")
    for kwargs, msg in [({"max_new_tokens": -1}, "max_new_tokens"), ({"temperature": -1}, "temperature"),
                        ({"top_k": 0}, "top_k"), ({"top_p": 1.5}, "top_p")]:
        with pytest.raises(seqlab.InputError, match=msg):
            seqlab.generate(model, [1, 2], **kwargs)
    with pytest.raises(seqlab.InputError, match="non-empty list"):
        seqlab.generate_batch(model, [])
    with pytest.raises(seqlab.InputError, match="at least one token"):
        seqlab.generate_batch(model, [[1], []])
    with pytest.raises(seqlab.InputError, match="token id 99"):
        seqlab.generate_batch(model, [[1], [99]])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "c"
    seqlab.save(tiny("attention"), path)
    return path


def test_cli_stream_prints_the_same_tokens(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "--tokens", "1,2,3", "--max-new-tokens", "9"]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", str(checkpoint), "--tokens", "1,2,3", "--max-new-tokens", "9", "--stream"]) == 0
    assert capsys.readouterr().out == plain
    expected = seqlab.generate(seqlab.load(checkpoint), [1, 2, 3], 9)[0, 3:].tolist()
    assert plain.strip() == ",".join(map(str, expected))


def test_cli_stats_and_batch_json(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "--tokens", "1,2,3", "--tokens", "4", "--max-new-tokens", "6",
                 "--stats", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["prompt"] for o in out["outputs"]] == [[1, 2, 3], [4]]
    assert all(len(o["generated"]) == 6 for o in out["outputs"])
    stats = out["stats"]
    assert stats["batch"] == 2 and stats["decode_tokens_per_s"] > 0 and stats["prefill_tokens"] == 2
    assert stats["decode_tokens"] + 1 == 2 * 6  # the first sample, right after prefill, counts as prefill
    assert stats["state_bytes"] == 2 * 2 * 4 * 8 * (3 + 6 - 1) * 2 * 4  # batch 2 x the formula at 8 tokens
    assert main(["generate", str(checkpoint), "--tokens", "1,2", "--max-new-tokens", "3", "--stats"]) == 0
    err = capsys.readouterr().err
    assert "tokens/s" in err and "state" in err


def test_cli_stream_takes_one_prompt(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "--tokens", "1", "--tokens", "2", "--stream"]) == 2
    assert "--stream" in capsys.readouterr().err


@pytest.mark.parametrize("plan", [False, True])
@pytest.mark.parametrize("mixer", ["attention", "mamba", "gru"])
def test_cached_generation_feeds_each_token_once_under_inference_mode(mixer, plan, monkeypatch):
    """No recomputation: one parallel call for the prompt, then one call per new token holding only that token,
    under inference mode, and the KV cache reserved once (never reallocated while decoding); through the model
    (plan=False) or through its decode plan, whose steps are recorded where they are made."""
    model = tiny(mixer)
    calls = []

    def record(module, args):
        tokens, state = args[0], args[1] if len(args) > 1 else None
        buffers = None if state is None else [getattr(s, "buffer", None) for s in state.layers]
        calls.append((tuple(tokens.shape), torch.is_inference_mode_enabled(), buffers))

    plan_call = DecodePlan.__call__
    monkeypatch.setattr(DecodePlan, "__call__", lambda self, *args: (record(None, args), plan_call(self, *args))[1])
    handle = model.register_forward_pre_hook(record)
    try:
        out = seqlab.generate(model, torch.randint(0, 37, (2, 6)), max_new_tokens=12, plan=plan)
    finally:
        handle.remove()
    assert out.shape == (2, 18)
    assert [c[0] for c in calls] == [(2, 6)] + [(2, 1)] * 11  # the last token is sampled, never fed
    assert all(c[1] for c in calls)
    if mixer == "attention":
        assert all(c[2] == calls[1][2] and c[2][0] is not None for c in calls[1:])  # one buffer for the whole run
    uncached = []
    handle = model.register_forward_pre_hook(lambda m, a: uncached.append(a[0].shape[1]))
    try:
        assert torch.equal(seqlab.generate(model, out[:, :6], max_new_tokens=12, use_cache=False), out)
    finally:
        handle.remove()
    assert uncached == list(range(6, 18))  # the reference re-runs the whole prefix every time
