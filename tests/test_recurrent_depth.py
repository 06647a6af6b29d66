"""The recurrent-depth model: the model contract at fixed r, the loop by hand, the r sampler, truncated backprop in
depth, adaptive exit, KV slots, warm start, the trajectory, checkpoints and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_states_close

import seqlab
from seqlab.config import ModelConfig
from seqlab.models import RecurrentDepthModel
from seqlab.models.recurrent_depth import LatentState, _run_blocks

V = 37
CORES = seqlab.available_mixers()  # any mixer of the registry can be the core's


def rd(mixer: str = "conv", seed: int = 0, **depth) -> RecurrentDepthModel:
    """A tiny recurrent-depth model: 1 prelude, 2 core and 1 coda block of width 16."""
    fields = {"arch": "recurrent_depth", "mixer": mixer, "vocab_size": V, "d_model": 16, "mlp": "gelu",
              "attention": {"n_heads": 2}, "mamba": {"chunk_size": 4}, "gla": {"n_heads": 2, "chunk_size": 4},
              "depth": {"core": 2, "mean_steps": 3, "backprop_steps": 2, **depth}}
    return seqlab.build_model(fields, seed=seed).eval()


def tokens(B: int = 2, T: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def in_pieces(model, x, cuts, **kw):
    state, outs, edges = None, [], [0, *cuts, x.shape[1]]
    for a, b in zip(edges, edges[1:]):
        logits, state = model(x[:, a:b], state, **kw)
        outs.append(logits)
    return torch.cat(outs, dim=1), state


# ---------------------------------------------------------------------------------------------------------------
# the model contract


@pytest.mark.parametrize("mixer", CORES)
def test_one_call_equals_chunks_equals_steps_at_fixed_r(mixer):
    model, x = rd(mixer), tokens()
    full, full_state = model(x, steps=4)
    for cuts in ([4], list(range(1, x.shape[1]))):
        part, part_state = in_pieces(model, x, cuts, steps=4)
        torch.testing.assert_close(part, full, atol=1e-4, rtol=0)
        assert_states_close(part_state, full_state)


def test_hybrid_blocks_and_cached_greedy_generation():
    model = seqlab.build_model({"arch": "recurrent_depth", "layers": ["conv", "attention", "gru", "conv"],
                                "vocab_size": V, "d_model": 16, "attention": {"n_heads": 2},
                                "depth": {"core": 2, "test_steps": 3}}, seed=1).eval()
    assert [b.mixer_name for b in model.core] == ["attention", "gru"]
    prompt = tokens(2, 5)
    cached = seqlab.generate(model, prompt, max_new_tokens=6, use_cache=True)
    assert torch.equal(cached, seqlab.generate(model, prompt, max_new_tokens=6, use_cache=False))


def test_blocks_use_sandwich_norm_by_default_which_bounds_each_step():
    def core_growth(model):
        """max over tokens of rms(core(a)) - rms(a) for one step, with the core's weights blown up 100x."""
        with torch.no_grad():
            for p in model.core.parameters():
                if p.dim() >= 2:
                    p.mul_(100)
            e, _ = model.prelude[0](model.embed(tokens()))
            a = model.adapter(torch.cat([torch.randn_like(e), e], dim=-1))
            h, _ = _run_blocks(model.core, a, (None, None))
        return (h.pow(2).mean(-1).sqrt() - a.pow(2).mean(-1).sqrt()).max().item()

    model = rd("conv")
    assert all(isinstance(b.post_norm1, type(b.norm1)) for b in (*model.prelude, *model.core, *model.coda))
    # every block adds two unit-gain normalized terms: rms grows by at most 2 per block, whatever the weights
    assert core_growth(model) <= 2 * 2 + 1e-4
    plain = seqlab.build_model({**model.config.to_dict(), "sandwich_norm": False}, seed=0)
    assert isinstance(plain.core[0].post_norm1, torch.nn.Identity) and core_growth(plain) > 10


def test_init_adapter_sums_state_and_input_and_blocks_start_near_identity():
    model, x = rd("conv", residual_gain=0.25), tokens()
    e, _ = model.prelude[0](model.embed(x))
    s = torch.randn_like(e)
    torch.testing.assert_close(model.adapter(torch.cat([s, e], dim=-1)), (s + e) / math.sqrt(2), atol=1e-6, rtol=0)
    gains = [n.weight for b in (*model.prelude, *model.core, *model.coda) for n in (b.post_norm1, b.post_norm2)]
    assert all(torch.equal(g, torch.full_like(g, 0.25)) for g in gains)
    # after many steps at init the latent of a token still depends on that token's input
    with torch.no_grad():
        out = model.think(x, steps=16, trajectory=True)
        other = model.think(torch.where(x == 0, 1, 0), steps=16, trajectory=True)
    assert (out.trajectory[-1] - other.trajectory[-1]).norm(dim=-1).min() > 1.0
    with pytest.raises(seqlab.InputError, match="depth.residual_gain' = -1"):
        rd(residual_gain=-1)


def test_r_steps_equal_the_loop_unrolled_by_hand():
    model, x = rd("attention"), tokens()
    model.train()  # gradients too: with r == k nothing is truncated
    out = model.think(x, steps=2)
    e, _ = model.prelude[0](model.embed(x))
    s = torch.zeros_like(e)
    for _ in range(2):
        h = model.adapter(torch.cat([s, e], dim=-1))
        h, _ = model.core[0](h)
        h, _ = model.core[1](h)
        s = model.latent_norm(h)
    h, _ = model.coda[0](s)
    by_hand = torch.nn.functional.linear(model.norm(h), model.embed.weight)
    torch.testing.assert_close(out.logits, by_hand, atol=1e-6, rtol=0)
    g1 = torch.autograd.grad(out.logits.square().sum(), list(model.parameters()))
    g2 = torch.autograd.grad(by_hand.square().sum(), list(model.parameters()))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert model.effective_depth(2) == 1 + 2 * 2 + 1


def test_save_and_load_round_trip(tmp_path):
    model, x = rd("conv", kv_slots=2, init_scale=0.0), tokens()
    seqlab.save(model, tmp_path / "ckpt")
    loaded = seqlab.load(tmp_path / "ckpt").eval()
    assert isinstance(loaded, RecurrentDepthModel) and loaded.config == model.config
    torch.testing.assert_close(loaded(x, steps=5)[0], model(x, steps=5)[0], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# the r sampler


def draws(model, n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.tensor([model.sample_steps(g) for _ in range(n)], dtype=torch.float64)  # (n, 2): r, no-grad


def test_poisson_lognormal_sampler_matches_its_distribution():
    mean, sigma, k = 8.0, 0.5, 3
    r, nograd = draws(rd(mean_steps=mean, sigma=sigma, backprop_steps=k)).unbind(1)
    # r = Poisson(tau) + 1, tau ~ LogNormal(ln(mean) - sigma^2/2, sigma): E[r] = mean + 1,
    # Var[r] = E[tau] + Var[tau] = mean + mean^2 (exp(sigma^2) - 1)
    var = mean + mean**2 * (math.exp(sigma**2) - 1)
    assert abs(r.mean().item() - (mean + 1)) < 4 * math.sqrt(var / len(r))
    assert abs(r.var().item() / var - 1) < 0.12
    assert r.min() >= 1
    assert torch.equal(nograd, (r - k).clamp(min=0))
    assert not torch.equal(r, draws(rd(mean_steps=mean, sigma=sigma), seed=1)[:, 0])  # the seed matters


def test_progressive_and_fixed_samplers():
    r, nograd = draws(rd(sampler="progressive", mean_steps=6, backprop_steps=2), n=3000).unbind(1)
    assert torch.equal(r - nograd, torch.full_like(r, 2.0))  # always k steps with gradient
    assert set(nograd.long().tolist()) == set(range(0, 9))  # uniform on {0, ..., 2 (mean - k)}
    assert abs(r.mean().item() - 6) < 0.2
    assert set(map(tuple, draws(rd(sampler="fixed", mean_steps=5), n=10).long().tolist())) == {(5, 3)}


def test_training_mode_draws_r_and_eval_mode_uses_test_steps():
    model, x = rd("conv", mean_steps=4, test_steps=3), tokens()
    assert model.think(x).trajectory is None
    assert model.think(x, trajectory=True).trajectory.shape[0] == 3 + 1
    model.train()
    lengths = {model.think(x, trajectory=True, generator=torch.Generator().manual_seed(s)).trajectory.shape[0]
               for s in range(12)}
    assert len(lengths) > 2  # r varies from step to step


# ---------------------------------------------------------------------------------------------------------------
# truncated backpropagation in depth


def saved_bytes_and_nodes(model, x, steps):
    """Bytes of the tensors autograd saves for backward, and the nodes of the graph, for one forward."""
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model.think(x, steps=steps).logits.square().mean()
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(n for n, _ in node.next_functions)
    return saved, len(seen), loss


def test_only_the_last_k_steps_are_in_the_graph():
    model, x = rd("attention", backprop_steps=2).train(), tokens()
    base = saved_bytes_and_nodes(model, x, steps=2)
    for r in (3, 7):
        saved, nodes, loss = saved_bytes_and_nodes(model, x, steps=r)
        assert (saved, nodes) == base[:2]  # backward memory and graph do not grow with r - k
        grads = torch.autograd.grad(loss, list(model.parameters()))
        # the same loss by hand: r - k steps without gradient, then k with
        e, _ = model.prelude[0](model.embed(x))
        s = torch.zeros_like(e)
        with torch.no_grad():
            for _ in range(r - 2):
                s, _ = model.core_step(s, e, (None, None))
        for _ in range(2):
            s, _ = model.core_step(s, e, (None, None))
        ref = model.logits(s, (None,))[0].square().mean()
        torch.testing.assert_close(loss, ref, atol=1e-6, rtol=0)
        for a, b in zip(grads, torch.autograd.grad(ref, list(model.parameters()))):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_every_parameter_gets_a_gradient_in_training():
    model, x = rd("conv", mean_steps=4, backprop_steps=2).train(), tokens()
    model(x)[0].logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------------------------
# adaptive exit


def identity_core(model):
    """Make a step return its input's norm: adapter = [I, 0], core outputs zeroed (sandwich norm of 0 is 0)."""
    D = model.config.d_model
    with torch.no_grad():
        model.adapter.weight.copy_(torch.cat([torch.eye(D), torch.zeros(D, D)], dim=1))
        for name, p in model.core.named_parameters():
            if name.endswith(("out_proj.weight", "wo.weight", "w2.weight")):
                p.zero_()
    return model


@pytest.mark.parametrize("exit", ["kl", "latent"])
def test_adaptive_exit_bounds_early_stop_and_threshold_zero(exit):
    model, x = rd("attention"), tokens()
    for threshold in (1e-6, 1e-2, 1e3):
        used = model.think(x, steps=6, exit=exit, threshold=threshold).steps_used
        assert used.shape == x.shape and used.min() >= 1 and used.max() <= 6
    fixed = model.think(x, steps=6)
    zero = model.think(x, steps=6, exit=exit, threshold=0.0)
    assert torch.equal(zero.steps_used, torch.full_like(x, 6))
    torch.testing.assert_close(zero.logits, fixed.logits, atol=0, rtol=0)
    # a core that does nothing: every token stops at once (zero start) or after one more step (random start)
    still = identity_core(rd("attention"))
    assert still.think(x, steps=10, exit=exit).steps_used.max() == 1
    noisy = identity_core(rd("attention", init_scale=1.0))
    assert noisy.think(x, steps=10, exit=exit, generator=torch.Generator().manual_seed(0)).steps_used.max() <= 2


def test_exited_tokens_keep_their_latent():
    model, x = rd("conv"), tokens()
    out = model.think(x, steps=8, exit="latent", threshold=0.3, trajectory=True)
    assert 1 <= out.steps_used.min() < 8
    traj, used = out.trajectory, out.steps_used
    for b, t in [(0, 0), (1, 4)]:
        n = int(used[b, t])
        assert torch.equal(traj[n:, b, t], traj[n, b, t].expand_as(traj[n:, b, t]))


@pytest.mark.parametrize("mixer", ["conv", "attention", "gru"])
@pytest.mark.parametrize("kv_slots", [None, 2])
def test_scheduler_skips_exited_tokens_and_changes_no_number(mixer, kv_slots):
    model, x = rd(mixer, kv_slots=kv_slots), tokens(2, 12)
    fixed = model.think(x, steps=8)
    assert fixed.core_evals == 2 * 12 * 8 and fixed.coda_evals == 0  # one per (sequence, position, step)
    state = None
    for call in range(2):  # a fresh chunk, then a chunk continuing the state
        for exit, threshold in (("latent", 0.2), ("kl", 1e-3)):
            fast = model.think(x, state, steps=8, exit=exit, threshold=threshold)
            slow = model.think(x, state, steps=8, exit=exit, threshold=threshold, schedule=False)
            assert torch.equal(fast.steps_used, slow.steps_used)
            torch.testing.assert_close(fast.logits, slow.logits, atol=1e-5, rtol=0)
            assert_states_close(fast.state, slow.state, atol=1e-5)
            assert fast.core_evals <= slow.core_evals and fast.coda_evals <= slow.coda_evals
            if call == 0 and kv_slots is None:  # every step starts empty: the exited prefix is never rerun
                assert fast.core_evals < slow.core_evals
        state = fast.state


def test_scheduler_decoding_stops_each_token_after_its_exit_and_counts_flops():
    model, x = rd("attention", kv_slots=1), tokens(1, 6)
    out = model.think(x[:, :1], steps=12, exit="latent", threshold=0.2)
    assert out.core_evals == int(out.steps_used.sum()) < 12  # one token, one evaluation per step it used
    state = out.state
    for t in range(1, 6):  # token by token: each costs only the steps it used
        out = model.think(x[:, t : t + 1], state, steps=12, exit="latent", threshold=0.2)
        assert out.core_evals == int(out.steps_used.sum())
        state = out.state
    weights = sum(p.numel() for m in (model.adapter, *model.core) for p in m.parameters() if p.dim() >= 2)
    assert model.core_flops_per_eval() == 2 * weights


# ---------------------------------------------------------------------------------------------------------------
# KV cache across steps, warm start, trajectory


def test_kv_slot_sharing_bounds_cache_bytes_and_reports_them():
    x = tokens(1, 10)
    per_entry = 2 * 2 * 8 * 10 * 4  # k and v, 2 heads, head_dim 8, 10 positions, fp32
    for r in (1, 3, 6):
        plain, shared = rd("attention"), rd("attention", kv_slots=2)
        assert plain(x, steps=r)[1].nbytes == (1 + 2 * r + 1) * per_entry
        assert shared(x, steps=r)[1].nbytes == (1 + 2 * min(r, 2) + 1) * per_entry
    # with at least r slots, sharing changes nothing
    a, sa = rd("attention")(x, steps=3)
    b, sb = rd("attention", kv_slots=3)(x, steps=3)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert_states_close(sa, sb, atol=0)
    # with fewer slots, decoding continues from the shared slots
    model = rd("attention", kv_slots=2)
    logits, state = in_pieces(model, x, list(range(1, 10)), steps=5)
    assert logits.isfinite().all() and state.nbytes == (1 + 2 * 2 + 1) * per_entry


def test_warm_start_chains_latents_and_keeps_the_contract():
    model, x = rd("conv", warm_start=True), tokens(2, 6)
    out = model.think(x, steps=3, trajectory=True)
    assert isinstance(out.state.layers[-1], LatentState)
    torch.testing.assert_close(out.trajectory[0, :, 1:], out.trajectory[-1, :, :-1], atol=0, rtol=0)
    part, state = in_pieces(model, x, [2, 3], steps=3)
    torch.testing.assert_close(part, out.logits, atol=1e-5, rtol=0)
    assert_states_close(state, out.state, atol=1e-5)
    cold = model.think(x, steps=3, warm_start=False)
    assert not torch.allclose(cold.logits, out.logits)


def test_trajectory_holds_every_latent():
    model, x = rd("gru", init_scale=0.5), tokens()
    out = model.think(x, steps=5, trajectory=True, generator=torch.Generator().manual_seed(3))
    assert out.trajectory.shape == (6, 2, 9, 16) and out.trajectory.dtype == torch.float32
    assert out.trajectory[0].abs().max() <= 1.0 + 1e-6 and out.trajectory[0].abs().sum() > 0  # truncated noise
    torch.testing.assert_close(out.trajectory[1:].pow(2).mean(-1), torch.ones(5, 2, 9), atol=1e-3, rtol=0)
    torch.testing.assert_close(model.logits(out.trajectory[-1], (None,))[0], out.logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("exit", ["none", "latent"])
def test_without_a_trajectory_memory_does_not_grow_with_r(exit):
    """Without trajectory=True no step's latent outlives the next step: the live (B, T, D) tensors seen at the last
    core step are as many at r = 64 as at r = 4 (keeping every s_i made r = 1024 at 512 bits need 24 GB)."""
    import gc

    model, x = rd("conv"), tokens(B=3, T=11)
    seen: list[int] = []

    def count(*_):
        seen.append(sum(1 for o in gc.get_objects() if torch.is_tensor(o) and tuple(o.shape) == (3, 11, 16)))

    handle = model.latent_norm.register_forward_hook(count)
    try:
        with torch.no_grad():
            for r in (4, 64):
                seen.clear()
                model.think(x, steps=r, exit=exit, threshold=0.0)  # threshold 0: no token exits, every step runs
                assert len(seen) == r
                if r == 4:
                    few = seen[-1]
        assert seen[-1] <= few, (few, seen[-1])
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_gives_one_clear_error():
    model, x = rd("conv"), tokens()
    for steps in (0, -2, 1.5, True):
        with pytest.raises(seqlab.InputError, match=r"steps = .*must be an integer >= 1"):
            model.think(x, steps=steps)
    with pytest.raises(seqlab.InputError, match="exit criterion 'entropy' does not exist; expected one of none"):
        model.think(x, exit="entropy")
    with pytest.raises(seqlab.InputError, match="exit threshold -1"):
        model.think(x, exit="kl", threshold=-1)
    with pytest.raises(seqlab.InputError, match="'mixer' = 'transformer': expected one of"):
        rd("transformer")
    with pytest.raises(seqlab.InputError, match="token id 37 is out of range"):
        model(torch.tensor([[1, 37]]))
    _, state = model(x, steps=3)
    with pytest.raises(seqlab.InputError, match="core states for 3 steps .* steps = 4"):
        model(x, state, steps=4)
    with pytest.raises(seqlab.InputError, match="depth.sampler' = 'uniform'"):
        rd(sampler="uniform")
    with pytest.raises(seqlab.InputError, match="progressive sampler needs mean_steps >= depth.backprop_steps"):
        rd(sampler="progressive", mean_steps=1, backprop_steps=2)
    with pytest.raises(seqlab.InputError, match="'n_layers' = 2: arch recurrent_depth has .* = 4 blocks"):
        ModelConfig(arch="recurrent_depth")
