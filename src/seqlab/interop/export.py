"""Export a language model to ONNX: the single-token step (state in, state out) and the prefill graph.

Both graphs have the same signature, so a runtime alternates between them freely:

    inputs    tokens (B, T) int64, pos (1,) int64 (tokens consumed so far), then the state: one input per state
              tensor, named `state.{layer}.{field}` (e.g. state.0.ssm, state.1.k)
    outputs   logits (B, T, V) and the state after the T tokens: `new_state.{layer}.{field}`, same shapes

`--mode step` fixes T = 1; `--mode prefill` fixes T = `length` (a prompt of n tokens: n // length prefill calls,
then n % length step calls). The batch B is dynamic in both. A fresh sequence starts from pos = 0 and an all-zero
state, which every mixer treats exactly as "no state".

Attention gets a fixed-size cache: k, v (B, Hkv, S, hd), S slots; the T new keys are written at
positions pos .. pos + T - 1 (a scatter) and a query at position p sees the slots <= p (and, for
sliding_attention, >= p - W). S is a dynamic axis like the batch: the runtime allocates the cache at the
longest context it will decode (`cache_size` is only the size traced with) and must keep pos + T <= S. Sliding
attention uses the same linear cache (so its memory grows with S; a ring buffer of W slots is not exported).

Every other mixer's step is its own forward from `seqlab.models` (conv window, LSTM/GRU cells, Mamba's and GLA's
O(1) updates), so nothing is re-implemented for them. In the prefill graph, Mamba's and GLA's scans run their
sequential reference form (`impl="ref"`, unrolled over the graph's T steps): the chunked forms use ops the
exporter cannot translate.

The graphs are written with torch's TorchScript-based ONNX exporter (opset 17), which exports a tiny model in about
a second (the dynamo exporter takes ~30 s); it needs the `onnx` package, and verifying needs `onnxruntime` (both
in the `onnx` extra: pip install 'seqlab[onnx]').
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seqlab.errors import InputError
from seqlab.interop.quantize import Int8Linear
from seqlab.models.state import ModelState

MODES = ("step", "prefill")
OPSET = 17
_ATTENTION = ("attention", "sliding_attention")


def _rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (B, H, T, hd) at absolute `positions` (T,), "rotate half" layout as in
    `seqlab.models.blocks.Rotary` (which takes a Python int start; here the start is a graph input)."""
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (T, hd/2)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(x.dtype)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def attend_fixed_cache(attn: nn.Module, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`seqlab.models.attention.Attention` on x (B, T, D) with a fixed-size cache k, v (B, Hkv, S, hd) whose slot
    i holds position i; `pos` (1,) is the position of x's first token. Returns y (B, T, D) and the new cache."""
    B, T, _ = x.shape
    H, Hkv, hd = attn.n_heads, attn.kv_heads, attn.head_dim
    S = k_cache.shape[2]
    positions = pos + torch.arange(T, device=x.device)  # (T,)
    q = attn.wq(x).view(B, T, H, hd).transpose(1, 2)  # (B, H, T, hd)
    k = attn.wk(x).view(B, T, Hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
    v = attn.wv(x).view(B, T, Hkv, hd).transpose(1, 2)
    if attn.rotary is not None:
        q, k = _rotate(q, positions, attn.rotary.inv_freq), _rotate(k, positions, attn.rotary.inv_freq)
    index = positions.view(1, 1, T, 1).expand(B, Hkv, T, hd)
    k_cache = k_cache.scatter(2, index, k)  # slot pos + t <- new key t
    v_cache = v_cache.scatter(2, index, v)
    slots = torch.arange(S, device=x.device)[None, :]  # (1, S)
    visible = slots <= positions[:, None]  # (T, S): causal, and never an unwritten slot
    if attn.window is not None:
        visible = visible & (positions[:, None] - slots <= attn.window)
    G = H // Hkv  # query heads per key/value head
    qg = q.reshape(B, Hkv, G * T, hd)  # (B, Hkv, G*T, hd): heads h = g_kv * G + j
    scores = qg @ k_cache.transpose(-1, -2) / math.sqrt(hd)  # (B, Hkv, G*T, S)
    scores = scores.view(B, Hkv, G, T, S).masked_fill(~visible, float("-inf"))
    y = (scores.softmax(dim=-1).view(B, Hkv, G * T, S) @ v_cache).view(B, H, T, hd)
    return attn.wo(y.transpose(1, 2).reshape(B, T, H * hd)), k_cache, v_cache


class _RMSNorm(nn.Module):
    """nn.RMSNorm written out (x * rsqrt(mean(x^2) + eps) * w), which the TorchScript exporter can translate."""

    def __init__(self, norm: nn.RMSNorm):
        super().__init__()
        self.weight, self.eps = norm.weight, norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _exportable(model: nn.Module) -> nn.Module:
    """A copy of `model` (sharing its weights) with every nn.RMSNorm replaced by `_RMSNorm` and every scan set to
    impl="ref" (traced, it unrolls over the graph's T steps)."""
    model = copy.copy(model)
    model._modules = dict(model._modules)
    if dataclasses.is_dataclass(getattr(model, "cfg", None)) and hasattr(model.cfg, "impl"):
        model.cfg = dataclasses.replace(model.cfg, impl="ref")
    for name, child in list(model._modules.items()):
        if isinstance(child, nn.RMSNorm):
            model._modules[name] = _RMSNorm(child)
        elif child is not None:
            model._modules[name] = _exportable(child)
    return model


class ExportGraph(nn.Module):
    """The model as a function of plain tensors: (tokens, pos, *state) -> (logits, *new_state); see the module doc.

    `layout` lists, per layer, the state's field names; `state_class` rebuilds a mixer's state from its tensors.
    """

    def __init__(self, model: nn.Module, cache_size: int):
        super().__init__()
        cfg = getattr(model, "config", None)
        if cfg is None or cfg.arch != "lm" or not hasattr(model, "blocks"):
            raise InputError("ONNX export supports language models (arch 'lm'); recurrent-depth models iterate a "
                             "data-dependent number of times and are not exported")
        self.model = _exportable(model)
        self.cache_size = cache_size
        with torch.no_grad():
            probe = model(torch.zeros(1, 1, dtype=torch.long, device=_device(model)))[1]
        self.state_class = [type(s) for s in probe.layers]
        self.layout = [list(s.tensors()) for s in probe.layers]
        self._shapes = [{k: tuple(t.shape) for k, t in s.tensors().items()} for s in probe.layers]

    def zero_state(self, batch: int) -> list[torch.Tensor]:
        """The all-zero state (a fresh sequence) as the flat list of graph inputs, fp32."""
        out = []
        for name, shapes in zip(self.model.config.layer_mixers, self._shapes):
            for shape in shapes.values():
                shape = list(shape)
                if name in _ATTENTION:
                    shape[2] = self.cache_size
                shape[_batch_axis(name)] = batch
                out.append(torch.zeros(shape, device=_device(self.model)))
        return out

    def names(self) -> tuple[list[str], list[str]]:
        ins = [f"state.{i}.{f}" for i, fields in enumerate(self.layout) for f in fields]
        return ["tokens", "pos", *ins], ["logits", *("new_" + n for n in ins)]

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, *state: torch.Tensor):
        m = self.model
        T = tokens.shape[1]
        x = m.embed(tokens)  # (B, T, D)
        if m.pos_embed is not None:
            x = x + m.pos_embed(pos + torch.arange(T, device=tokens.device))
        new_state: list[torch.Tensor] = []
        i = 0
        for block, cls, fields in zip(m.blocks, self.state_class, self.layout):
            tensors = state[i:i + len(fields)]
            i += len(fields)
            h = block.norm1(x)
            if block.mixer_name in _ATTENTION:
                h, k, v = attend_fixed_cache(block.mixer, h, tensors[0], tensors[1], pos)
                new_state += [k, v]
            else:
                h, s = block.mixer(h, cls(**dict(zip(fields, tensors))))
                new_state += list(s.tensors().values())
            x = x + block.post_norm1(h)  # the rest of `Block.forward`
            if block.mlp is not None:
                x = x + block.post_norm2(block.mlp(block.norm2(x)))
        return (m.logits(m.norm(x)), *new_state)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batch_axis(mixer: str) -> int:
    return 1 if mixer in ("lstm", "gru") else 0  # torch.nn.LSTM/GRU lay their state out as (1, B, Dh)


def export_onnx(model: nn.Module, out: str | Path, *, mode: str = "step", length: int = 64,
                cache_size: int = 1024, batch: int = 2) -> dict[str, Any]:
    """Write the `mode` graph of `model` (see the module doc) to `out`; returns a description (names, shapes).

    length: T of the prefill graph; cache_size: S, attention's cache slots, and batch: the sizes traced with
    (both axes are dynamic in the exported graph).
    """
    if mode not in MODES:
        raise InputError(f"mode {mode!r} is not supported; expected one of {', '.join(MODES)}")
    for name, value in (("length", length), ("cache_size", cache_size), ("batch", batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InputError(f"{name} = {value!r}: must be a positive integer")
    T = 1 if mode == "step" else length
    graph = ExportGraph(model.eval(), cache_size)
    if any(m in _ATTENTION for m in model.config.layer_mixers) and T > cache_size:
        raise InputError(f"length = {T} is larger than cache_size = {cache_size}: the prefill chunk must fit the "
                         "attention cache")
    try:
        import onnx  # noqa: F401  (torch's exporter serializes through it)
    except ImportError:
        raise InputError("ONNX export needs the onnx package: pip install 'seqlab[onnx]'") from None
    device = _device(model)
    tokens = torch.zeros(batch, T, dtype=torch.long, device=device)
    pos = torch.zeros(1, dtype=torch.long, device=device)
    state = graph.zero_state(batch)
    in_names, out_names = graph.names()
    axes: dict[str, dict[int, str]] = {"tokens": {0: "batch"}, "logits": {0: "batch"}}
    k = 0
    for name, fields in zip(model.config.layer_mixers, graph.layout):
        for _ in fields:
            dims = {_batch_axis(name): "batch", **({2: "cache"} if name in _ATTENTION else {})}
            axes[in_names[2 + k]] = axes[out_names[1 + k]] = dims
            k += 1
    # int8 weights (seqlab quantize) stay int8 in the file: constant folding would store Cast(weight) as fp32
    quantized = any(isinstance(m, Int8Linear) for m in model.modules())
    out = Path(out)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        try:
            torch.onnx.export(graph, (tokens, pos, *state), str(out), input_names=in_names, output_names=out_names,
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False,
                              do_constant_folding=not quantized)
        except TypeError as e:  # a torch without the TorchScript exporter
            raise InputError(f"this torch ({torch.__version__}) cannot export with the TorchScript exporter: {e}") \
                from None
    shapes = {n: [axes[n].get(d, size) for d, size in enumerate(t.shape)]
              for n, t in zip(in_names[2:], state)}
    info = {"mode": mode, "length": T, "cache_size": cache_size, "inputs": in_names, "outputs": out_names,
            "state_shapes": shapes, "config": model.config.to_dict()}
    _add_metadata(out, info)
    return info


def _add_metadata(path: Path, info: dict) -> None:
    """Record the graph's description in the ONNX file (metadata_props "seqlab")."""
    import onnx

    proto = onnx.load(str(path))
    entry = proto.metadata_props.add()
    entry.key, entry.value = "seqlab", json.dumps(info)
    onnx.save(proto, str(path))


# ---------------------------------------------------------------------------------------------------------------
# running and verifying with onnxruntime


def onnx_session(path: str | Path, threads: int | None = None):
    """An onnxruntime CPU session for an exported graph; a clear error when onnxruntime is missing."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise InputError("onnxruntime is not installed: pip install 'seqlab[onnx]'") from None
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_session(session, tokens: torch.Tensor, pos: int, state: list) -> tuple[Any, list]:
    """One call of an exported graph: numpy logits and the new state (a list of numpy arrays)."""
    import numpy as np

    wanted = {i.name for i in session.get_inputs()}  # an input the graph never reads (pos) is pruned
    names = [o.name.removeprefix("new_") for o in session.get_outputs()[1:]]
    feeds = {"tokens": tokens.cpu().numpy().astype(np.int64), "pos": np.array([pos], dtype=np.int64)}
    feeds.update({n: (s.cpu().numpy() if isinstance(s, torch.Tensor) else s) for n, s in zip(names, state)})
    logits, *new_state = session.run(None, {k: v for k, v in feeds.items() if k in wanted})
    return logits, new_state


def verify_onnx(model: nn.Module, path: str | Path, info: dict, *, batch: int = 3, cache_size: int | None = None,
                seed: int = 0) -> dict:
    """Run the exported graph in onnxruntime and the model in PyTorch on the same random tokens, from a fresh
    state and then from the state they reached (batch differs from the traced one, to check it is dynamic).
    cache_size: attention's cache slots for the check (default: the traced size). Returns the largest absolute
    differences of the logits and of the states."""
    session = onnx_session(path)
    cache_size = cache_size or info["cache_size"]
    graph = ExportGraph(model.eval(), cache_size)
    T, V = info["length"], model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    ort_state: list = graph.zero_state(batch)
    torch_state: ModelState | None = None
    pos, logit_diff, state_diff = 0, 0.0, 0.0
    has_cache = any(m in _ATTENTION for m in model.config.layer_mixers)
    calls = 2 if not has_cache or 2 * T <= cache_size else 1  # the second call continues from a state
    for _ in range(calls):
        tokens = torch.randint(0, V, (batch, T), generator=g)
        logits, ort_state = run_session(session, tokens, pos, ort_state)
        with torch.no_grad():
            ref, torch_state = model(tokens.to(_device(model)), torch_state)
        logit_diff = max(logit_diff, float(abs(logits - ref.cpu().numpy()).max()))
        state_diff = max(state_diff, _state_diff(model, torch_state, ort_state))
        pos += T
    return {"max_abs_diff_logits": logit_diff, "max_abs_diff_state": state_diff, "batch": batch, "calls": calls}


def _state_diff(model: nn.Module, state: ModelState, flat: list) -> float:
    """Largest difference between a PyTorch ModelState and the graph's flat state (attention: the used slots)."""
    worst, i = 0.0, 0
    for name, s in zip(model.config.layer_mixers, state.layers):
        for t in s.tensors().values():
            got = torch.as_tensor(flat[i])
            i += 1
            if name in _ATTENTION:
                got = got[:, :, :t.shape[2]] if name == "attention" else got[:, :, state.pos - t.shape[2]:state.pos]
            worst = max(worst, float((got - t.detach().cpu().float()).abs().max()))
    return worst
