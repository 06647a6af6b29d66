"""Text generation: prefill the prompt in one parallel call, then decode one token at a time from the state."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from seqlab.errors import InputError


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick the next token from logits (B, V): greedy at temperature 0, else sample (top-k, then nucleus top-p)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already reach top_p (the first token always stays)
        drop = (sorted_p.cumsum(dim=-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def as_prompt(prompt: torch.Tensor | Sequence[int], device: torch.device) -> torch.Tensor:
    """A (B, T) int64 tensor from a 2-D tensor, a 1-D tensor or a list of token ids."""
    if not isinstance(prompt, torch.Tensor):
        prompt = torch.tensor(list(prompt), dtype=torch.long)
    if prompt.dim() == 1:
        prompt = prompt[None]
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise InputError(f"prompt must hold at least one token, as a list, a (T,) or a (B, T) tensor; got shape "
                         f"{tuple(prompt.shape)}")
    return prompt.to(device=device, dtype=torch.long)


@torch.inference_mode()
def generate(model: torch.nn.Module, prompt: torch.Tensor | Sequence[int], max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int = 0,
             use_cache: bool = True) -> torch.Tensor:
    """Continue `prompt` by `max_new_tokens` tokens. Returns (B, T + max_new_tokens) int64, prompt included.

    use_cache=True decodes from the model's state (KV cache or recurrent state) in O(1) work per token for a
    recurrent model; use_cache=False re-runs the whole prefix for every token (the reference it must equal).
    Sampling draws from a generator seeded with `seed`, so the same call gives the same tokens.
    """
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens = {max_new_tokens}: must be >= 0")
    if temperature < 0:
        raise InputError(f"temperature = {temperature}: must be >= 0 (0 means greedy)")
    if top_k is not None and top_k < 1:
        raise InputError(f"top_k = {top_k}: must be >= 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InputError(f"top_p = {top_p}: must be in (0, 1]")
    device = next(model.parameters()).device
    tokens = as_prompt(prompt, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    if max_new_tokens == 0:
        return tokens
    logits, state = model(tokens)
    out = [tokens]
    for i in range(max_new_tokens):
        nxt = sample_next(logits[:, -1], temperature, top_k, top_p, gen)[:, None]  # (B, 1)
        out.append(nxt)
        if i == max_new_tokens - 1:
            break
        if use_cache:
            logits, state = model(nxt, state)
        else:
            logits, _ = model(torch.cat(out, dim=1))
    return torch.cat(out, dim=1)
