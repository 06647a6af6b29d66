"""Streams: feed tokens as they arrive, sample the next one, and pause or resume anywhere through a snapshot.

    stream = seqlab.Stream(model, temperature=0.0)
    logits = stream.feed([5, 17, 3])             # (1, 3, V): the prompt, in one parallel call
    token = stream.sample()                      # (1, 1): the next token, ready to feed back
    logits = stream.feed(token)                  # (1, 1, V): one O(1) step for a recurrent model
    logits = stream.feed("more text")            # text goes through the model's tokenizer (bytes if it has none)
    new = stream.generate(64)                    # (1, <= 64): stops at the tokenizer's end-of-sequence tokens
    blob = stream.snapshot()                     # bytes: store them, send them to another process
    later = seqlab.Stream.restore(model, blob)   # same state, same sampler: continues exactly as `stream` would

Snapshot format (version 1): one safetensors file, so loading it never runs code from it.
    tensors    "state.<path>" for every tensor of the model state (the KV caches' used entries, or the recurrent
               states), and "logits", the last position's logits (B, V), so a restored stream can sample at once
    metadata   "format": "seqlab-stream", "header": JSON with the format version, the model's config SHA-256 and a
               fingerprint of its weights, the state layout (state classes and tensor names), the position, the
               batch size, the sampler settings, and a SHA-256 of the tensors
len(blob) == state.nbytes + header_nbytes(blob): the state's bytes plus a header that does not grow with the
context (the safetensors JSON header, ~1 KB, and the logits row, B x V x 4 bytes for fp32). So a snapshot of a
recurrent model has the same size after 10 tokens as after 10 million; an attention snapshot grows with its cache.

`restore` checks, in order, that the blob is a readable snapshot of a version this seqlab reads, that its tensors
match their checksum, that it was taken with this model (same config, same weights), and that every state tensor
has the shape this model's state has; each failure is one `InputError`, never a crash or a silently wrong state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections.abc import Sequence
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from seqlab.data.tokenizer import Tokenizer, text_tokenizer, tokenizer_of
from seqlab.errors import InputError
from seqlab.infer.decode import Sampler, as_prompt, reserve
from seqlab.infer.plan import DecodePlan
from seqlab.models.size import check_decode_fits
from seqlab.models.state import ModelState, State

FORMAT = "seqlab-stream"
VERSION = 1


class Stream:
    """A model fed token by token, keeping its state between calls; one stream per conversation.

    temperature, top_k, top_p, seed: how `sample` picks tokens (greedy at temperature 0); the draw at position p
    depends on (seed, p) only. reserve: room for this many tokens in the KV caches after the first feed, so
    decoding up to that length never reallocates (caches grow by 25% when they fill up otherwise).

    One token at a time goes through the model's decode plan (`seqlab.infer.plan.DecodePlan`), built on first use
    and kept: it sees in-place weight updates, but a stream is bound to its model as it was (its device, its
    modules); after moving, quantizing or reloading the model with new tensors, start a new stream.
    """

    def __init__(self, model: torch.nn.Module, *, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int = 0, reserve: int = 0):
        self.model = model
        self.sampler = Sampler(temperature, top_k, top_p, seed)
        self.state: ModelState | None = None
        self.logits: torch.Tensor | None = None  # (B, V): the logits after the last token fed
        self._reserve = reserve
        self._device = next(model.parameters()).device
        self._generator = None if self.sampler.greedy else torch.Generator(device=self._device)
        self._plan: DecodePlan | torch.nn.Module | None = None  # the one-token step, built on first use

    @property
    def pos(self) -> int:
        """Tokens fed so far (per sequence)."""
        return self.state.pos if self.state is not None else 0

    @property
    def batch(self) -> int | None:
        return None if self.logits is None else self.logits.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of the model state (KV caches' used entries or recurrent states)."""
        return self.state.nbytes if self.state is not None else 0

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer (`seqlab.data.tokenizer`): how text is fed and generated tokens are read."""
        return tokenizer_of(self.model)

    def feed(self, tokens: torch.Tensor | Sequence[int] | str) -> torch.Tensor:
        """Consume tokens: a list of ids or a (T,) tensor (batch 1), or (B, T), or text (batch 1, encoded with
        the model's tokenizer; the BOS token first when the tokenizer asks for one and nothing was fed yet).
        Returns their logits (B, T, V)."""
        if isinstance(tokens, str):
            tok = text_tokenizer(self.model)
            tokens = tok.encode_prompt(tokens) if self.state is None else tok.encode(tokens)
        tokens = as_prompt(tokens, self._device)
        if self.batch is not None and tokens.shape[0] != self.batch:
            raise InputError(f"this stream holds {self.batch} sequences; got tokens of shape {tuple(tokens.shape)}: "
                             f"feed ({self.batch}, T) ids")
        with torch.inference_mode():
            step = self._step() if tokens.shape[1] == 1 and self.state is not None else self.model
            logits, state = step(tokens, self.state)
            if self.state is None and self._reserve > tokens.shape[1]:
                state = reserve(self.model, state, self._reserve - tokens.shape[1])
        self.state, self.logits = state, logits[:, -1]
        return logits

    def sample(self) -> torch.Tensor:
        """The next token of each sequence, (B, 1), from the last logits; the stream does not consume it."""
        if self.logits is None:
            raise InputError("nothing to sample from yet: feed the stream some tokens first")
        with torch.inference_mode():
            return self.sampler(self.logits, self.pos, self._generator)[:, None]

    def generate(self, n: int, stop_at_eos: bool = True) -> torch.Tensor:
        """Sample and feed up to n tokens, one at a time; returns them, (B, n) or fewer: with stop_at_eos, it
        stops once every row has produced one of the tokenizer's end-of-sequence tokens (fed like any token; a
        row that ended earlier repeats its end token)."""
        if not isinstance(n, int) or n < 0:
            raise InputError(f"n = {n}: must be an integer >= 0")
        if self.logits is None:
            raise InputError("nothing to sample from yet: feed the stream some tokens first")
        check_decode_fits(self.model, self.batch, self.pos + n, self._device)
        out = torch.empty(self.batch, n, dtype=torch.long, device=self._device)
        eos = torch.tensor(self.tokenizer.eos_ids if stop_at_eos else (), dtype=torch.long, device=self._device)
        done = torch.zeros(self.batch, 1, dtype=torch.bool, device=self._device)
        self.reserve(n)
        step = self._step()
        for i in range(n):
            token = self.sample()
            if len(eos):
                token = torch.where(done, out[:, i - 1:i], token) if i else token
                done |= torch.isin(token, eos)
            out[:, i:i + 1] = token
            with torch.inference_mode():
                logits, self.state = step(token, self.state)
            self.logits = logits[:, -1]
            if len(eos) and bool(done.all()):
                return out[:, :i + 1]
        return out

    def _step(self) -> DecodePlan | torch.nn.Module:
        """The model's decode plan (the per-token path `seqlab.generate` takes), or the model where it has none."""
        if self._plan is None:
            self._plan = DecodePlan.build(self.model) or self.model
        return self._plan

    def reserve(self, n: int) -> None:
        """Make room in the KV caches for n more tokens, so feeding them never reallocates."""
        if self.state is None:
            self._reserve = max(self._reserve, n)
        else:
            with torch.inference_mode():
                self.state = reserve(self.model, self.state, n)

    # ----------------------------------------------------------------------------------------------------------
    # snapshots

    def snapshot(self) -> bytes:
        """The whole stream (state, last logits, sampler, position) as bytes; see the module docstring."""
        tensors: dict[str, torch.Tensor] = {}
        layout = _encode(self.state, "state", tensors)
        if self.logits is not None:
            tensors["logits"] = self.logits
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        header = {
            "version": VERSION, "model": model_identity(self.model), "pos": self.pos, "batch": self.batch,
            "sampler": self.sampler.to_dict(), "layout": layout, "state_nbytes": self.nbytes,
            "tensors_sha256": _tensors_sha256(tensors),
        }
        # Padded to the width it would have with 19-digit numbers, so the header's size never depends on the
        # position (nor on any other count): a recurrent stream's snapshot has exactly the same size forever.
        text = json.dumps(header).ljust(len(json.dumps(_widest(header))))
        return save_safetensors(tensors, metadata={"format": FORMAT, "header": text})

    @classmethod
    def restore(cls, model: torch.nn.Module, blob: bytes | bytearray | memoryview) -> Stream:
        """A stream on `model` continuing exactly where the one that wrote `blob` was."""
        header, tensors = read_snapshot(blob)
        try:
            theirs, ours = header["model"], model_identity(model)
            if theirs["config_sha256"] != ours["config_sha256"]:
                raise InputError(f"snapshot was taken with a different model ({theirs['summary']}, config sha256 "
                                 f"{theirs['config_sha256'][:12]}) than this one ({ours['summary']}, config "
                                 f"sha256 {ours['config_sha256'][:12]}); restore it with the model it came from")
            if theirs["weights_fingerprint"] != ours["weights_fingerprint"]:
                raise InputError("snapshot was taken with a model of the same config but different weights; "
                                 "restore it with the model it came from")
            sampler = Sampler(**header["sampler"])
            used: set[str] = set()
            state = _decode(header["layout"], tensors, used)
            logits = tensors.get("logits")
            used.add("logits")
            if set(tensors) - used:
                raise InputError(f"tensor '{sorted(set(tensors) - used)[0]}' is not part of the state layout")
            pos, batch = header["pos"], header["batch"]
        except (KeyError, TypeError, AttributeError) as e:
            raise InputError(f"snapshot header is malformed: {type(e).__name__}: {e}") from None
        if state is not None and not isinstance(state, ModelState):
            raise InputError(f"snapshot state is a {type(state).__name__}, expected a ModelState")
        if (state is None) != (logits is None) or (state is not None and (state.pos != pos or logits.dim() != 2 or
                                                                          logits.shape[0] != batch)):
            raise InputError("snapshot header is malformed: its position, batch size and logits disagree")
        device = next(model.parameters()).device
        if state is not None:
            _check_fits(model, state, batch)
            state, logits = state.to(device), logits.to(device)
        stream = cls(model, **sampler.to_dict())
        stream.state, stream.logits = state, logits
        return stream


def read_snapshot(blob: bytes | bytearray | memoryview) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The header and tensors of a snapshot, after checking the format, the version and the tensors' checksum."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise InputError(f"a snapshot is bytes (from Stream.snapshot()), got {type(blob).__name__}")
    blob = bytes(blob)
    try:
        tensors = load_safetensors(blob)
        meta = _metadata(blob)
    except (SafetensorError, ValueError, UnicodeDecodeError, struct.error) as e:
        raise InputError(f"not a readable seqlab stream snapshot ({len(blob)} bytes; truncated or corrupt: "
                         f"{e})") from None
    if meta.get("format") != FORMAT or "header" not in meta:
        raise InputError(f"not a seqlab stream snapshot: its safetensors metadata has no '{FORMAT}' header")
    try:
        header = json.loads(meta["header"])
        version = header["version"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"snapshot header is malformed: {e}") from None
    if not isinstance(version, int) or version > VERSION:
        raise InputError(f"snapshot has format version {version}; this seqlab reads version {VERSION} and older")
    if header.get("tensors_sha256") != _tensors_sha256(tensors):
        raise InputError("snapshot is corrupt: its tensors do not match the SHA-256 recorded in its header")
    return header, tensors


def header_nbytes(blob: bytes) -> int:
    """Bytes of a snapshot that are not model state: the safetensors header (8 + its JSON) and the logits row."""
    tensors = load_safetensors(bytes(blob))
    logits = tensors.get("logits")
    return 8 + struct.unpack("<Q", blob[:8])[0] + (logits.numel() * logits.element_size() if logits is not None
                                                   else 0)


def model_identity(model: torch.nn.Module) -> dict[str, str]:
    """What a snapshot records about the model it came from: config hash, weights fingerprint, a summary."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        raise InputError(f"streams need a seqlab model (with a .config); got {type(model).__name__}")
    config_json = json.dumps(cfg.to_dict(), sort_keys=True)
    mixers = getattr(cfg, "layer_mixers", ())
    summary = (f"{len(mixers)} layers of {'+'.join(dict.fromkeys(mixers))}, d_model {getattr(cfg, 'd_model', '?')}, "
               f"vocab {getattr(cfg, 'vocab_size', '?')}")
    return {"config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
            "weights_fingerprint": weights_fingerprint(model), "summary": summary}


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module, samples: int = 32) -> str:
    """SHA-256 over every weight's name, shape and `samples` evenly spaced entries (as fp32): cheap (no pass over
    all weights), the same on any device, and different for any two differently trained or initialized models."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        idx = torch.linspace(0, max(flat.numel() - 1, 0), min(flat.numel(), samples), device=flat.device).long()
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# state trees <-> (JSON layout, named tensors)


def _state_classes() -> dict[str, type]:
    """The classes a snapshot may name: ModelState and every State subclass loaded in this process."""
    found, todo = {}, [State, ModelState]
    while todo:
        cls = todo.pop()
        found[f"{cls.__module__}.{cls.__qualname__}"] = cls
        todo.extend(cls.__subclasses__())
    return found


def _encode(node: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, torch.Tensor):
        tensors[path] = node
        return {"tensor": path}
    if isinstance(node, (tuple, list)):
        return {"tuple": [_encode(x, f"{path}.{i}", tensors) for i, x in enumerate(node)]}
    name = f"{type(node).__module__}.{type(node).__qualname__}"
    if dataclasses.is_dataclass(node) and name in _state_classes():
        return {"class": name, "fields": {
            f.name: _encode(getattr(node, f.name), f"{path}.{f.name}", tensors)
            for f in dataclasses.fields(node) if f.init and not f.metadata.get("transient")
        }}
    raise InputError(f"cannot snapshot a state holding a {type(node).__name__} (at {path}): states must be "
                     "ModelState / State dataclasses of tensors and numbers")


def _decode(node: Any, tensors: dict[str, torch.Tensor], used: set[str]) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, dict) and set(node) == {"tensor"}:
        if node["tensor"] not in tensors:
            raise InputError(f"snapshot layout names tensor '{node['tensor']}', which the snapshot does not hold")
        used.add(node["tensor"])
        return tensors[node["tensor"]]
    if isinstance(node, dict) and set(node) == {"tuple"} and isinstance(node["tuple"], list):
        return tuple(_decode(x, tensors, used) for x in node["tuple"])
    if isinstance(node, dict) and set(node) == {"class", "fields"} and isinstance(node["fields"], dict):
        cls = _state_classes().get(node["class"])
        if cls is None:
            raise InputError(f"snapshot holds a state of type '{node['class']}', which this seqlab does not know")
        try:
            return cls(**{k: _decode(v, tensors, used) for k, v in node["fields"].items()})
        except TypeError as e:
            raise InputError(f"snapshot state '{node['class']}' has fields this seqlab does not expect: {e}") from None
    raise InputError(f"snapshot layout is malformed near {str(node)[:80]!r}")


def _widest(node: Any) -> Any:
    """`node` with every integer replaced by a 19-digit one."""
    if isinstance(node, dict):
        return {k: _widest(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_widest(v) for v in node]
    return 10**18 if isinstance(node, int) and not isinstance(node, bool) else node


def _metadata(blob: bytes) -> dict[str, str]:
    n = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + n].decode("utf-8")).get("__metadata__") or {}


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _shapes(node: Any, path: str = "state") -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of a state tree by path: (shape, dtype)."""
    tensors: dict[str, torch.Tensor] = {}
    _encode(node, path, tensors)
    return {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}


@torch.inference_mode()
def _check_fits(model: torch.nn.Module, state: ModelState, batch: int) -> None:
    """Check `state` against the states this model makes: same tensors, dtypes and fixed sizes; sizes that grow
    with the context (a KV cache's length) at most the number of tokens seen."""
    tokens = torch.zeros(batch, 2, dtype=torch.long, device=next(model.parameters()).device)
    one, two = _shapes(model(tokens[:, :1])[1]), _shapes(model(tokens)[1])
    got = _shapes(state)
    if set(got) != set(one):
        missing = sorted(set(one) ^ set(got))[0]
        raise InputError(f"snapshot state does not fit this model: tensor '{missing}' is in one and not the other")
    for name, (shape, dtype) in got.items():
        (s1, d1), (s2, _) = one[name], two[name]
        ok = len(shape) == len(s1) and dtype == d1 and all(
            n == a if a == b else 0 <= n <= state.pos for n, a, b in zip(shape, s1, s2)
        )
        if not ok:
            raise InputError(f"snapshot state does not fit this model: tensor '{name}' is {dtype} {shape}, "
                             f"expected {d1} like {s1}")
    for i, layer in enumerate(state.layers):
        if getattr(layer, "pos", state.pos) != state.pos:
            raise InputError(f"snapshot state is inconsistent: layer {i} has seen {layer.pos} tokens, the model "
                             f"{state.pos}")
