"""The pieces of fast decoding that generation and streams share: the sampler and KV-cache reservation.

Decoding runs the model's step path (`logits, state = model(token, state)`) under `torch.inference_mode`, so no
autograd bookkeeping is kept and attention appends to a preallocated KV cache in place (see
`seqlab.models.attention.KVCache`). Nothing is recomputed: each step feeds only the newest token.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from seqlab.errors import InputError
from seqlab.models.state import ModelState


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
        ids = list(prompt)
        bad = next((t for t in ids if not isinstance(t, numbers.Integral) or isinstance(t, bool)
                    or not -2**63 <= t < 2**63), None)
        if bad is not None:
            raise InputError(f"prompt token {bad!r}: expected integer token ids")
        prompt = torch.tensor(ids, dtype=torch.long)
    if prompt.is_floating_point() or prompt.is_complex() or prompt.dtype == torch.bool:  # else truncated silently
        raise InputError(f"prompt must hold int64 token ids, got dtype {prompt.dtype}")
    if prompt.dim() == 1:
        prompt = prompt[None]
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise InputError(f"prompt must hold at least one token, as a list, a (T,) or a (B, T) tensor; got shape "
                         f"{tuple(prompt.shape)}")
    return prompt.to(device=device, dtype=torch.long)


@dataclass(frozen=True)
class Sampler:
    """How the next token is picked from logits: greedy at temperature 0, else sampled (top-k, then top-p).

    The randomness of the draw at position p depends on (seed, p) alone, not on how many draws came before, so a
    stream restored from a snapshot samples exactly what the original would have.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not (0 <= t < math.inf):
            raise InputError(f"temperature = {t!r}: must be a finite number >= 0 (0 means greedy)")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise InputError(f"top_k = {self.top_k}: must be an integer >= 1")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise InputError(f"top_p = {self.top_p}: must be in (0, 1]")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise InputError(f"seed = {self.seed}: must be an integer >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def __call__(self, logits: torch.Tensor, pos: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """The next token (B,) from logits (B, V), drawn for position `pos` (the number of tokens before it)."""
        if self.greedy:
            return logits.argmax(dim=-1)
        if generator is None:
            generator = torch.Generator(device=logits.device)
        generator.manual_seed(_mix(self.seed, pos))
        return sample_next(logits, self.temperature, self.top_k, self.top_p, generator)

    def to_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p, "seed": self.seed}


def _mix(seed: int, pos: int) -> int:
    """A 63-bit generator seed from (seed, position), well mixed in every bit (a CPU generator uses only the low
    32 bits of its seed)."""
    digest = hashlib.blake2b(f"{seed}:{pos}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def reserve(model: torch.nn.Module, state: ModelState | None, n: int) -> ModelState | None:
    """`state` with room for n more tokens in every KV cache, so decoding them never reallocates or copies.

    Layers whose mixer has no `reserve` (recurrent mixers: their state has a fixed size) are left as they are, and
    so are models without `blocks`.
    """
    blocks = getattr(model, "blocks", None)
    if state is None or n <= 0 or blocks is None or not isinstance(state, ModelState):
        return state
    layers = tuple(
        block.mixer.reserve(s, n) if s is not None and hasattr(block.mixer, "reserve") else s
        for block, s in zip(blocks, state.layers)
    )
    return ModelState(layers, state.pos)


def allocated_nbytes(state: ModelState | None) -> int:
    """Bytes allocated for a state, spare room of preallocated KV caches included (>= `state.nbytes`)."""
    if state is None:
        return 0
    return sum(getattr(s, "allocated_nbytes", s.nbytes) for s in state.layers if s is not None)
