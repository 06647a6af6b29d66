"""Text generation: prefill the prompt in one parallel call, then decode one token at a time from the state.

`generate` continues a (B, T) batch of equal-length prompts; `generate_batch` continues prompts of different
lengths. Both decode with `torch.inference_mode` from a preallocated state (see `seqlab.infer.decode`), and stop
at the end-of-sequence tokens of the model's tokenizer (`seqlab.data.tokenizer`; a byte model has none) unless
told not to (stop_at_eos=False).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from seqlab.data.tokenizer import tokenizer_of
from seqlab.errors import InputError
from seqlab.infer.decode import Sampler, as_prompt, reserve, sample_next  # noqa: F401  (re-exported)
from seqlab.infer.plan import DecodePlan
from seqlab.infer.stream import Stream
from seqlab.infer.traced import TracedPlan
from seqlab.models.size import check_decode_fits


@torch.inference_mode()
def generate(model: torch.nn.Module, prompt: torch.Tensor | Sequence[int], max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             use_cache: bool = True, plan: bool | TracedPlan = True, stop_at_eos: bool = True) -> torch.Tensor:
    """Continue `prompt` by `max_new_tokens` tokens. Returns (B, T + max_new_tokens) int64, prompt included.

    stop_at_eos: stop once every row has produced one of the tokenizer's end-of-sequence tokens (that token is
    kept; a row that ended earlier is filled with it), so the result may be shorter than T + max_new_tokens.

    use_cache=True prefills the prompt in one parallel call, reserves room in the KV caches for every new token,
    then decodes one token per step from the state (O(1) work per token for a recurrent model, nothing
    recomputed); use_cache=False re-runs the whole prefix for every token (the reference it must equal).
    plan=True runs those steps through a `seqlab.infer.plan.DecodePlan` where the model has one (same logits and
    states, a fraction of the per-token overhead on CPU); plan=False calls `model(token, state)` every step, so
    module hooks see every token; plan=TracedPlan(model, batch, cache_size) (`seqlab.infer.traced`, built once by
    the caller) runs them through the model's traced and frozen step (same greedy tokens, less overhead again, for
    a fixed batch and longest context).
    Sampling at position p draws from a generator seeded with (seed, p), so the same call gives the same tokens,
    and a `seqlab.Stream` with the same seed samples the same ones.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens = {max_new_tokens}: must be an integer >= 0")
    sampler = Sampler(temperature, top_k, top_p, seed)
    device = next(model.parameters()).device
    tokens = as_prompt(prompt, device)
    B, T = tokens.shape
    check_decode_fits(model, B, T + max_new_tokens, device, prefill=T)
    if isinstance(plan, TracedPlan):
        if not use_cache:
            raise InputError("plan=TracedPlan(...) decodes from a state: it needs use_cache=True")
        plan.check(model, B, T + max_new_tokens - 1)  # the last token is sampled, never fed
    out = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=device)  # filled in place, no concatenation
    out[:, :T] = tokens
    if max_new_tokens == 0:
        return out
    gen = None if sampler.greedy else torch.Generator(device=device)
    eos = torch.tensor(tokenizer_of(model).eos_ids if stop_at_eos else (), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    logits, state = model(tokens)
    if use_cache:
        if isinstance(plan, TracedPlan):
            step, state = plan, plan.start(state)
        else:
            state = reserve(model, state, max_new_tokens - 1)
            step = (DecodePlan.build(model) if plan else None) or model
    for p in range(T, T + max_new_tokens):
        out[:, p] = sampler(logits[:, -1], p, gen)
        if len(eos):
            out[:, p] = torch.where(done, out[:, p - 1], out[:, p])  # an ended row repeats its end token
            done |= torch.isin(out[:, p], eos)
            if bool(done.all()):
                return out[:, :p + 1]
        if p == T + max_new_tokens - 1:
            break
        if use_cache:
            logits, state = step(out[:, p:p + 1], state)
        else:
            logits, _ = model(out[:, :p + 1])
    return out


def generate_batch(model: torch.nn.Module, prompts: Sequence[torch.Tensor | Sequence[int]], max_new_tokens: int = 64,
                   temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   seed: int = 0, stop_at_eos: bool = True) -> list[torch.Tensor]:
    """Continue several prompts of different lengths in one batch. Returns one 1-D tensor per prompt: the prompt
    followed by its `max_new_tokens` new tokens, or fewer with stop_at_eos, up to and including its first
    end-of-sequence token. See `decode_prompts` for how the batch advances."""
    stream = Stream(model, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    rows, buf = _prompt_rows(prompts, max_new_tokens, stream._device, model)
    eos = set(tokenizer_of(model).eos_ids if stop_at_eos else ())
    ends = [len(r) + max_new_tokens for r in rows]  # where each row's output stops
    for p, tokens, new in decode_prompts(stream, prompts, max_new_tokens):
        buf[:, p] = tokens
        for i in new.nonzero().flatten().tolist():
            if int(tokens[i]) in eos and p < ends[i]:
                ends[i] = p + 1
        if eos and all(p + 1 >= e for e in ends):
            break
    return [buf[i, :ends[i]].clone() for i in range(len(rows))]


def decode_prompts(stream, prompts: Sequence[torch.Tensor | Sequence[int]],
                   max_new_tokens: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Feed prompts of different lengths to a fresh `seqlab.Stream` as one batch and decode `max_new_tokens` for
    each. Yields (position p, tokens at p (B,), new (B,) bool: True where the token is generated, not prompt).

    No padding enters any state: the batch advances in lockstep, one position per step. The first min(lengths)
    tokens of every prompt are prefilled in one parallel call; after that, a row whose prompt is not over yet is
    fed its next prompt token (the sampled one is dropped) while shorter prompts already generate. So each row
    sees exactly its own sequence, for every mixer, and greedy output equals generating each prompt alone; the
    price is that prompt tokens beyond the shortest prompt are fed one per step. Rows that are done keep
    decoding (their tokens are marked not new) until the longest one is.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens = {max_new_tokens}: must be an integer >= 0")
    if stream.state is not None:
        raise InputError("decode_prompts needs a fresh stream (nothing fed yet)")
    rows, buf = _prompt_rows(prompts, max_new_tokens, stream._device, stream.model)
    lengths = torch.tensor([len(r) for r in rows], device=buf.device)
    first, last = int(lengths.min()), buf.shape[1]  # positions [first, last) are decoded
    if max_new_tokens == 0:
        return
    stream.feed(buf[:, :first])
    stream.reserve(last - first - 1)
    for p in range(first, last):
        in_prompt = p < lengths  # (B,) rows still reading their prompt keep the prompt token
        buf[:, p] = torch.where(in_prompt, buf[:, p], stream.sample()[:, 0])
        yield p, buf[:, p], ~in_prompt & (p < lengths + max_new_tokens)
        if p < last - 1:
            stream.feed(buf[:, p:p + 1])


def _prompt_rows(prompts: Sequence[torch.Tensor | Sequence[int]], max_new_tokens: int, device: torch.device,
                 model: torch.nn.Module) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The prompts as 1-D tensors, and a (B, max length + max_new_tokens) buffer holding them left-aligned (after
    checking that it and `model`'s state for that length fit)."""
    if isinstance(prompts, torch.Tensor) or len(prompts) == 0:
        raise InputError("prompts must be a non-empty list of prompts (each a list of ids or a 1-D tensor)")
    rows = []
    for i, p in enumerate(prompts):
        t = as_prompt(p, device)
        if t.shape[0] != 1:
            raise InputError(f"prompt {i} has shape {tuple(t.shape)}: each prompt must be one sequence of ids")
        rows.append(t[0])
    check_decode_fits(model, len(rows), max(len(r) for r in rows) + max_new_tokens, device,
                      prefill=min(len(r) for r in rows))
    buf = torch.zeros(len(rows), max(len(r) for r in rows) + max_new_tokens, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        buf[i, :len(r)] = r
    return rows, buf
