"""The recurrent-depth latent reasoner: think longer by iterating a block in latent space (Geiping et al. 2025).

    e   = prelude(embed(tokens))                          (B, T, D)   once per token
    s_0 = 0, or truncated-normal noise (depth.init_scale), or the previous token's s_r (warm start)
    s_i = norm_s(core(adapter([s_{i-1}, e])))             i = 1 .. r  the input is re-injected every step
    p   = softmax(head(norm(coda(s_r))))                  (B, T, V)

Glossary
    P, C, D_   depth.prelude, depth.core, depth.coda: real blocks before, inside and after the loop
    r          steps: how many times the core runs (sampled in training, any number at inference)
    k          depth.backprop_steps: only the last k steps are differentiated (truncated backprop in depth)
    s_i        the latent state after step i, (B, T, D); norm_s keeps it on the sphere of radius sqrt(D)
    effective depth  P + r * C + D_ blocks

Every block is causal and its mixer comes from the registry, so the model is a language model like the others:
`logits, state = model(tokens, state)` holds the model contract (one call == chunks == token by token) for a
fixed r and a deterministic s_0. Its `ModelState.layers` is flat: P prelude states, then C core states per slot
(slot-major), then D_ coda states, then (warm start only) a `LatentState` with the last token's s_r.

Core states ("KV cache across iterations"): each step of the core sees a different input sequence, so each step
needs its own mixer state (an attention core: one KV cache per (step, layer), growing with r). With
`depth.kv_slots = N`, step i reads and writes slot i mod N instead: a slot starts every call from its state
before the call, and the last step that used it writes the new state, so for each past position the slot holds
what the latest step of its class computed (Huginn's cache sharing). Memory stops growing with r; the price is
that a token attends to past tokens as a later step saw them, so chunked and one-call outputs differ (exact when
N >= r). `state.nbytes` counts whatever the slots really hold.

Adaptive exit (inference): a token stops when its output distribution (`kl`: KL(p_i || p_{i-1}) through the
coda and head) or its latent (`latent`: ||s_i - s_{i-1}|| / ||s_i||) changes by less than a threshold. Its latent
is then frozen: every later step sees it unchanged, so what the outputs and states are does not depend on how the
work is scheduled. The scheduler ("wavefront") makes exited tokens stop costing core evaluations without changing
any number (up to float rounding between one call and chunks):

- the core is causal and an exited token's core input [s, e] is constant, so over a sequence's exited prefix
  (positions 0 .. q_b - 1 of sequence b) a step computes exactly what an earlier step with the same starting slot
  state computed. The scheduler keeps, per sequence and starting state, the core's layer states after the longest
  prefix that was already frozen when it was computed (at multiples of T // 16, so that sequences share chunk
  edges), and runs a step only from there: sequences with the same start as one batch, in chunks split where their
  exited prefixes end. Core token-evaluations per step: sum over sequences of T - p_b. The KL criterion's coda
  pass uses one such cache for the whole batch (the prefix exited in every sequence).
- steps whose slots start from the same state share one cache: a fresh chunk (no state: every slot starts empty)
  or kv_slots = 1. With a state and N > 1 slots, each slot class keeps its own cache (it helps from the second
  visit of the class on); with kv_slots unset and a state, every step starts from its own state, so prefill
  saves nothing there.
- one token at a time (decoding, warm start), the loop stops when the token has exited and every slot has been
  written (after step N at the earliest, with kv_slots = N; at step r without sharing, where the exit then saves
  only the KL criterion's coda passes). An exited token's slots hold what the latest step of each class computed
  for it, on its frozen latent: the Huginn sharing rule above, unchanged (an attention core's slot i mod N holds
  the key and value of the token as its last class-(i mod N) step saw it).

`Thought.core_evals` counts the core token-evaluations actually run and `core_flops_per_eval()` their matmul
FLOPs, so that a saving is measured in work, not in steps used (`think(..., schedule=False)` runs every position
on every step: the reference the scheduler must match, and the cost without it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.config import ModelConfig
from seqlab.errors import InputError
from seqlab.models.blocks import Block, make_norm
from seqlab.models.lm import LanguageModel, init_weights
from seqlab.models.state import ModelState, State, check_layer_state

EXITS = ("none", "kl", "latent")


@dataclass(frozen=True)
class LatentState(State):
    """Warm start: the final latent s_r of the last token seen, (B, 1, D)."""

    s: torch.Tensor


@dataclass(frozen=True)
class Thought:
    """What `RecurrentDepthModel.think` returns.

    logits      (B, T, V)
    state       the ModelState after the last token
    steps_used  (B, T) int64: the steps each token used (r for every token without adaptive exit)
    trajectory  (r + 1, B, T, D) float32: s_0, s_1, ..., s_r for every token, or None unless asked for.
                An exited token's latent stays frozen at its exit value for the later entries.
    core_evals  core token-evaluations run: one per (sequence, position, step) the core computed
    coda_evals  coda token-evaluations the KL criterion ran (0 for the other criteria)
    """

    logits: torch.Tensor
    state: ModelState
    steps_used: torch.Tensor
    trajectory: torch.Tensor | None = None
    core_evals: int = 0
    coda_evals: int = 0


def _select(state: State | None, index: torch.Tensor) -> State | None:
    """The sequences `index` of a layer state (along its batch axis); None stays None."""
    if state is None:
        return None
    axis = type(state).batch_axis
    return state.map(lambda t: t.index_select(axis, index))


def _join(states: list) -> State | None:
    """Layer states of several groups of sequences joined along the batch axis (a compact copy: no shared buffer)."""
    if states[0] is None:
        return None
    axis = type(states[0]).batch_axis
    first = states[0].map(lambda t: t)
    return dataclasses.replace(first, **{k: torch.cat([st.tensors()[k] for st in states], dim=axis)
                                         for k in first.tensors()})


def _run_blocks(blocks: nn.ModuleList, x: torch.Tensor, states: tuple) -> tuple[torch.Tensor, tuple]:
    new = []
    for block, s in zip(blocks, states):
        x, s = block(x, s)
        new.append(s)
    return x, tuple(new)


class RecurrentDepthModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.arch != "recurrent_depth":
            raise InputError(f"RecurrentDepthModel needs config arch 'recurrent_depth', got {cfg.arch!r}")
        self.config = cfg
        d = cfg.depth
        mixers = cfg.layer_mixers  # one per real block: prelude, then core, then coda
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.prelude = nn.ModuleList(Block(cfg, m) for m in mixers[: d.prelude])
        self.adapter = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)  # [s, e] -> core input
        self.core = nn.ModuleList(Block(cfg, m) for m in mixers[d.prelude : d.prelude + d.core])
        self.latent_norm = make_norm(cfg)  # norm_s
        self.coda = nn.ModuleList(Block(cfg, m) for m in mixers[d.prelude + d.core :])
        self.norm = make_norm(cfg)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As `LanguageModel`: `init_weights` (the config's `init` scheme; gpt2 scales output projections by
        1 / sqrt(2 * real blocks)), then each mixer's own init. Then two choices that make the loop trainable from
        the start:

        - the adapter starts as (s + e) / sqrt(2) (identity blocks [I, I] / sqrt(2)): a random N(0, init_std)
          adapter would shrink the re-injected input ~10x below the unit-scale block outputs, so that after a few
          steps the latent no longer says which token it belongs to;
        - the sandwich post-norms start at gain `depth.residual_gain` (< 1): every block then starts close to the
          identity instead of adding a unit-scale random term per block and per step.
        """
        init_weights(self, self.config)
        for block in (*self.prelude, *self.core, *self.coda):
            if hasattr(block.mixer, "reset_parameters"):
                block.mixer.reset_parameters()
            for norm in (block.post_norm1, block.post_norm2):
                if getattr(norm, "weight", None) is not None:  # sandwich norm on (Identity otherwise)
                    nn.init.constant_(norm.weight, self.config.depth.residual_gain)
        with torch.no_grad():
            eye = torch.eye(self.config.d_model)
            self.adapter.weight.copy_(torch.cat([eye, eye], dim=1) / math.sqrt(2))  # (D, 2D): (s + e) / sqrt 2

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n

    def effective_depth(self, steps: int) -> int:
        """Blocks a token passes through with r = steps: P + r * C + D_."""
        d = self.config.depth
        return d.prelude + steps * d.core + d.coda

    def n_slots(self, steps: int) -> int:
        """Core states per layer that a call with `steps` steps keeps."""
        slots = self.config.depth.kv_slots
        return steps if slots is None else min(steps, slots)

    # -----------------------------------------------------------------------------------------------------------
    # the r sampler (training)

    def sample_steps(self, generator: torch.Generator | None = None) -> tuple[int, int]:
        """Draw (r, n_nograd) for one training step: r steps, the first n_nograd of them without gradient.

        Uses `generator`, or the global torch RNG (which the trainer checkpoints) when None.
        """
        d = self.config.depth
        if d.sampler == "fixed":
            r = int(d.mean_steps)
            return r, max(0, r - d.backprop_steps)
        if d.sampler == "progressive":
            n = int(torch.randint(0, int(2 * (d.mean_steps - d.backprop_steps)) + 1, (), generator=generator))
            return n + d.backprop_steps, n
        mu = math.log(d.mean_steps) - d.sigma**2 / 2
        tau = torch.exp(mu + d.sigma * torch.randn((), generator=generator, dtype=torch.float64))
        r = int(torch.poisson(tau.reshape(1), generator=generator)) + 1
        return r, max(0, r - d.backprop_steps)

    # -----------------------------------------------------------------------------------------------------------
    # forward

    def forward(self, tokens: torch.Tensor, state: ModelState | None = None, *,
                steps: int | None = None) -> tuple[torch.Tensor, ModelState]:
        """tokens (B, T) int64 -> logits (B, T, V) and the state after the last token.

        steps: r. None: sampled (`sample_steps`) in training mode, `depth.test_steps` otherwise. The exit
        criterion and warm start come from the config; `think` takes them as arguments and says more.
        """
        out = self.think(tokens, state, steps=steps)
        return out.logits, out.state

    def think(self, tokens: torch.Tensor, state: ModelState | None = None, *, steps: int | None = None,
              exit: str | None = None, threshold: float | None = None, warm_start: bool | None = None,
              trajectory: bool = False, generator: torch.Generator | None = None, schedule: bool = True) -> Thought:
        """Run the model with r = `steps` core steps (the maximum with an exit criterion); see `Thought`.

        exit: "none", "kl" or "latent" (default `depth.exit`); threshold: default `depth.exit_threshold`.
        warm_start: default `depth.warm_start`; tokens are then processed one at a time, since each token's s_0
            is the previous token's s_r.
        trajectory: also return every s_i for every token.
        generator: the noise of s_0 (depth.init_scale > 0) and, in training mode with steps=None, the draw of r;
            None: the global torch RNG.
        schedule: with an exit criterion, skip the work of exited tokens (see the module docstring); False runs
            every position on every step until the loop stops (the same numbers, the cost without the scheduler).
        """
        d = self.config.depth
        LanguageModel.check_tokens(self, tokens)  # same checks and messages as every language model
        exit = d.exit if exit is None else exit
        threshold = d.exit_threshold if threshold is None else threshold
        warm_start = d.warm_start if warm_start is None else warm_start
        if exit not in EXITS:
            raise InputError(f"exit criterion {exit!r} does not exist; expected one of {', '.join(EXITS)}")
        if not isinstance(threshold, (int, float)) or threshold < 0:
            raise InputError(f"exit threshold {threshold!r}: must be a number >= 0")
        if steps is None:
            steps, n_nograd = self.sample_steps(generator) if self.training else (d.default_steps, None)
        else:
            n_nograd = None
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InputError(f"steps = {steps!r}: must be an integer >= 1 (the number of core iterations)")
        if n_nograd is None:
            n_nograd = max(0, steps - d.backprop_steps)
        parts = self._split_state(state, steps)
        if not warm_start:
            return self._think_chunk(tokens, parts, steps, n_nograd, exit, threshold, False, trajectory, generator,
                                     schedule)
        # Warm start: token by token, each starting from the previous token's final latent.
        outs = []
        for t in range(tokens.shape[1]):
            out = self._think_chunk(tokens[:, t : t + 1], parts, steps, n_nograd, exit, threshold, True, trajectory,
                                    generator, schedule)
            outs.append(out)
            parts = self._split_state(out.state, steps)
        return Thought(
            torch.cat([o.logits for o in outs], dim=1), outs[-1].state,
            torch.cat([o.steps_used for o in outs], dim=1),
            torch.cat([o.trajectory for o in outs], dim=2) if trajectory else None,
            sum(o.core_evals for o in outs), sum(o.coda_evals for o in outs),
        )

    def core_step(self, s: torch.Tensor, e: torch.Tensor, states: tuple) -> tuple[torch.Tensor, tuple]:
        """One step of the loop: s_i = norm_s(core(adapter([s_{i-1}, e]))); `states` are this step's core states."""
        x = self.adapter(torch.cat([s, e], dim=-1))  # (B, T, 2D) -> (B, T, D)
        x, states = _run_blocks(self.core, x, states)
        return self.latent_norm(x), states

    def initial_latent(self, e: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """s_0, shaped like e: zeros, or N(0, init_scale^2) truncated at +-2 init_scale."""
        scale = self.config.depth.init_scale
        s = torch.zeros_like(e)
        if scale > 0:
            nn.init.trunc_normal_(s, 0.0, scale, -2 * scale, 2 * scale, generator=generator)
        return s

    def logits(self, s: torch.Tensor, coda_states: tuple) -> tuple[torch.Tensor, tuple]:
        """The coda and head on latents s (B, T, D) -> logits (B, T, V) and the new coda states."""
        h, coda_states = _run_blocks(self.coda, s, coda_states)
        return self._project(h), coda_states

    def _project(self, h: torch.Tensor) -> torch.Tensor:
        """The final norm and the head: coda output (B, T, D) -> logits (B, T, V)."""
        h = self.norm(h)
        return self.head(h) if self.head is not None else F.linear(h, self.embed.weight)

    def core_flops_per_eval(self) -> int:
        """Matmul FLOPs of one core token-evaluation: 2 per weight of the adapter and the core blocks (an attention
        core's score and value products, which grow with the context, are not in it)."""
        weights = sum(p.numel() for m in (self.adapter, *self.core) for p in m.parameters() if p.dim() >= 2)
        return 2 * weights

    def _think_chunk(self, tokens: torch.Tensor, parts: tuple, steps: int, n_nograd: int, exit: str,
                     threshold: float, warm_start: bool, trajectory: bool,
                     generator: torch.Generator | None, schedule: bool) -> Thought:
        prelude_states, slots_before, coda_states, last, pos = parts
        B, T = tokens.shape
        e, prelude_states = _run_blocks(self.prelude, self.embed(tokens), prelude_states)  # (B, T, D)
        if warm_start and last is not None:
            s = last.s.to(e.dtype).expand_as(e)  # T == 1 here: the previous token's s_r
        else:
            s = self.initial_latent(e, generator)
        slots_after = list(slots_before)
        n_slots = len(slots_before)
        used = torch.full((B, T), steps, dtype=torch.long, device=tokens.device)
        done = torch.zeros(B, T, dtype=torch.bool, device=tokens.device)
        # The wavefront: per starting slot state, (p, core layer states after the frozen prefix [0, p)); one key
        # for every slot when all start empty (a fresh chunk), else one per slot class.
        fresh = all(st is None for slot in slots_before for st in slot)
        prefix: dict[int, list] = {}  # key -> per sequence: None or (p, its core layer states after [0, p))
        granule = max(1, T // 16)  # caches at multiples of this: at most 16 chunks per step and group
        coda_prefix = (0, coda_states)
        core_evals = coda_evals = 0
        signal = None
        if exit == "kl":
            signal, coda_prefix, n = self._kl_signal(s, coda_prefix, 0)
            coda_evals += B * n
        elif exit == "latent":
            signal = s.detach().float()
        path = [s] if trajectory else None  # every s_i, kept only when asked for: r copies of (B, T, D)
        for i in range(steps):
            c = i % n_slots
            key = 0 if fresh else c
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= n_nograd):
                if schedule and exit != "none":
                    exited = done.long().cumprod(1).sum(1).tolist()  # per sequence: positions < q_b all exited
                    cache = prefix.setdefault(key, [None] * B)
                    s_new, slots_after[c], n = self._core_rows(s, e, cache, exited, slots_before[c], granule)
                else:
                    s_new, slots_after[c], _ = self._core_from(s, e, 0, [], slots_before[c])
                    n = B * T
            core_evals += n
            if exit != "none":
                s_new = torch.where(done[..., None], s, s_new)  # exited tokens keep their latent
                if exit == "kl":
                    q = int(done.long().cumprod(1).sum(1).min()) if schedule else 0  # exited in every sequence
                    new_signal, coda_prefix, n = self._kl_signal(s_new, coda_prefix, q)
                    coda_evals += B * n
                else:
                    new_signal = s_new.detach().float()
                converged = self._change(exit, signal, new_signal) < threshold
                used = torch.where(converged & ~done, i + 1, used)
                done = done | converged
                signal = new_signal
            s = s_new
            if path is not None:
                path.append(s)
            if exit != "none" and bool(done.all()) and i + 1 >= n_slots:
                break  # every token has exited and every slot holds this chunk: the rest would change nothing
        logits, coda_states = self.logits(s, coda_states)
        layers = [*prelude_states, *(st for slot in slots_after for st in slot), *coda_states]
        if warm_start:
            layers.append(LatentState(s[:, -1:]))
        traj = None
        if path is not None:
            path += [s] * (steps + 1 - len(path))  # after an early stop the latents stay frozen
            traj = torch.stack(path).float()  # (r + 1, B, T, D)
        return Thought(logits, ModelState(tuple(layers), pos + T), used, traj, core_evals, coda_evals)

    def _core_rows(self, s: torch.Tensor, e: torch.Tensor, cache: list, exited: list[int], start: tuple,
                   granule: int) -> tuple[torch.Tensor, tuple, int]:
        """One core step of the wavefront, per sequence: sequence b starts at its cached prefix p_b (or at 0 from
        the slot's state `start`), sequences with the same start run as one batch, in chunks split where their
        exited prefixes end (rounded down to `granule`), and each sequence's cache moves to its own. Returns the
        new latents (B, T, D), the core's layer states after the chunk (batch order) and the token-evaluations
        run."""
        B, T, _ = s.shape
        groups: dict[int, list[int]] = {}
        for b in range(B):
            groups.setdefault(cache[b][0] if cache[b] is not None else 0, []).append(b)
        outs, ends, order, evals = [], [], [], 0
        for p, rows in groups.items():
            index = torch.tensor(rows, device=s.device)
            cut = {b: exited[b] // granule * granule for b in rows}  # where each sequence's cache moves to
            if p == 0:
                states = tuple(_select(st, index) for st in start)
            else:
                states = tuple(_join([cache[b][1][j] for b in rows]) for j in range(len(start)))
            out, end, at = self._core_from(s[index], e[index], p, list(cut.values()), states)
            evals += len(rows) * (T - p)
            for k, b in enumerate(rows):
                if cut[b] > p:
                    one = torch.tensor([k], device=s.device)
                    cache[b] = (cut[b], tuple(_select(st, one) for st in at[cut[b]]))
            outs.append(out)
            ends.append(end)
            order += rows
        back = torch.argsort(torch.tensor(order, device=s.device))  # group order -> batch order
        s_new = torch.cat(outs, dim=0)[back] if len(outs) > 1 else outs[0]
        end = tuple(_select(_join([g[j] for g in ends]), back) if len(ends) > 1 else ends[0][j]
                    for j in range(len(start)))
        return s_new, end, evals

    def _core_from(self, s: torch.Tensor, e: torch.Tensor, p: int, cuts: list[int],
                   states: tuple) -> tuple[torch.Tensor, tuple, dict[int, tuple]]:
        """One core step on positions [p, T), starting from `states` (the core's layer states after [0, p)), run in
        chunks split at `cuts` (positions in (p, T)). Returns the new latents (B, T, D) (positions < p keep s:
        they are exited), the layer states after the chunk, and {cut: the layer states after [0, cut)}."""
        T = s.shape[1]
        edges = [p, *sorted(c for c in set(cuts) if p < c < T), T]
        x = self.adapter(torch.cat([s[:, p:], e[:, p:]], dim=-1))  # (B, T - p, D)
        parts, at = [], {}
        for a, b in zip(edges, edges[1:]):
            if b > a:
                y, states = _run_blocks(self.core, x[:, a - p : b - p], states)
                parts.append(y)
                at[b] = states
        if not parts:  # every position was exited before p: nothing to compute
            return s, states, at
        out = self.latent_norm(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
        return (torch.cat([s[:, :p], out], dim=1) if p else out), states, at

    def _kl_signal(self, s: torch.Tensor, cache: tuple[int, tuple], q: int) -> tuple[torch.Tensor, tuple, int]:
        """Log-probabilities (B, T, V) for the KL criterion, through the coda from its layer states after the
        frozen prefix `cache` = (p, states), advanced to q: (log-probabilities, the new cache, positions run).
        Positions < q get zeros: they have exited, their signal is not read again."""
        p, states = cache
        q = max(q, p)
        B, T, _ = s.shape
        out = torch.zeros(B, T, self.config.vocab_size, dtype=torch.float32, device=s.device)
        with torch.no_grad():
            states_q = states
            if q > p:
                _, states_q = _run_blocks(self.coda, s[:, p:q], states)
            if q < T:
                h, _ = _run_blocks(self.coda, s[:, q:], states_q)
                out[:, q:] = torch.log_softmax(self._project(h).float(), dim=-1)
        return out, (q, states_q), T - p

    @staticmethod
    def _change(exit: str, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """(B, T): KL(p_new || p_old) (clamped at 0 against rounding), or ||s_new - s_old|| / ||s_new||."""
        if exit == "kl":
            return (new.exp() * (new - old)).sum(-1).clamp_min(0.0)
        return (new - old).norm(dim=-1) / new.norm(dim=-1).clamp_min(1e-12)

    # -----------------------------------------------------------------------------------------------------------
    # state layout

    def _split_state(self, state: ModelState | None, steps: int) -> tuple:
        """(prelude states, core states per slot, coda states, LatentState or None, pos)."""
        d = self.config.depth
        n_slots = self.n_slots(steps)
        if state is None:
            return ((None,) * d.prelude, [(None,) * d.core] * n_slots, (None,) * d.coda, None, 0)
        if not isinstance(state, ModelState):
            raise InputError(f"state must be the ModelState this model returned, got {type(state).__name__}")
        layers = state.layers
        latent = layers[-1] if layers and isinstance(layers[-1], LatentState) else None
        if latent is not None:
            layers = layers[:-1]
        core = layers[d.prelude : len(layers) - d.coda]
        if len(layers) < d.prelude + d.coda or len(core) != n_slots * d.core:
            have = (len(layers) - d.prelude - d.coda) / d.core
            raise InputError(
                f"this recurrent-depth state holds core states for {have:g} steps (slots) but the call uses "
                f"steps = {steps} ({n_slots} slots); continue a state with the same steps it was built with"
            )
        blocks = (*self.prelude, *(b for _ in range(n_slots) for b in self.core), *self.coda)
        for i, (block, s) in enumerate(zip(blocks, layers)):  # each layer's class and tensor shapes
            if s is not None:
                check_layer_state(block.mixer, s, None, self.embed.weight, f"state layer {i} ({block.mixer_name})")
        slots = [tuple(core[j * d.core : (j + 1) * d.core]) for j in range(n_slots)]
        return tuple(layers[: d.prelude]), slots, tuple(layers[len(layers) - d.coda :]), latent, state.pos
