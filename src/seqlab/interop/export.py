"""Export a language model to ONNX: the single-token step (state in, state out) and the prefill graph.

Both graphs have the same signature, so a runtime alternates between them freely:

    inputs    tokens (B, T) int64, pos (1,) int64 (tokens consumed so far), then the state: one input per state
              tensor, named `state.{layer}.{field}` (e.g. state.0.ssm, state.1.k)
    outputs   logits (B, T, V) and the state after the T tokens: `new_state.{layer}.{field}`, same shapes

`--mode step` fixes T = 1; `--mode prefill` fixes T = `length` (a prompt of n tokens: n // length prefill calls,
then n % length step calls). The batch B is dynamic in both. A fresh sequence starts from pos = 0 and an all-zero
state, which every mixer treats exactly as "no state".

Both graphs are `LanguageModel.step` traced token by token (T steps unrolled into the graph), with the weights
bound by `model.bind(portable=True)` (RMSNorm written out, which the exporter can translate): every mixer runs its
own `step`, so nothing of any mixer is re-implemented here. A state that grows with the context (attention's KV
cache) gets a fixed size instead: k, v (B, Hkv, S, hd), S slots, through the mixer's `step_slots`; the new key
of the token at position p is written at slot p (a scatter) and its query sees the slots <= p (and, for
sliding_attention, >= p - W). S is a dynamic axis like the batch: the runtime allocates the cache at the
longest context it will decode (`cache_size` is only the size traced with) and must keep pos + T <= S. Sliding
attention uses the same linear cache (so its memory grows with S; a ring buffer of W slots is not exported).

The graphs are written with torch's TorchScript-based ONNX exporter (opset 17), which exports a tiny model in about
a second (the dynamo exporter takes ~30 s); it needs the `onnx` package, and verifying needs `onnxruntime` (both
in the `onnx` extra: pip install 'seqlab[onnx]').
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seqlab.errors import InputError
from seqlab.models.attention import SlotCache
from seqlab.models.blocks import residual
from seqlab.models.int8 import Int8Linear
from seqlab.models.state import ModelState, State

MODES = ("step", "prefill")
OPSET = 17


class ExportGraph(nn.Module):
    """The model as a function of plain tensors: (tokens, pos, *state) -> (logits, *new_state); see the module doc.

    It binds the model's weights once (`model.bind(portable=True)`: norms in elementary ops) and runs
    `LanguageModel.step` for each of the T tokens, through every block's and mixer's own step; a mixer whose state
    grows with the context (`State.time_axis`, a KV cache) runs its fixed-size-cache step `step_slots` with the
    position as a tensor. Nothing of any mixer is re-implemented here.
    `layout` lists, per layer, the state's field names; `state_class` rebuilds a layer's state from its tensors.
    """

    def __init__(self, model: nn.Module, cache_size: int):
        super().__init__()
        cfg = getattr(model, "config", None)
        if cfg is None or cfg.arch != "lm" or not hasattr(model, "blocks"):
            raise InputError("ONNX export supports language models (arch 'lm'); recurrent-depth models iterate a "
                             "data-dependent number of times and are not exported")
        self.model = model
        self.cache_size = cache_size
        with torch.no_grad():
            probe = model(torch.zeros(1, 1, dtype=torch.long, device=_device(model)))[1]
        self.state_class = [_slots_class(s) for s in probe.layers]
        self.layout = [list(s.tensors()) for s in probe.layers]
        self._shapes = [{k: tuple(t.shape) for k, t in s.tensors().items()} for s in probe.layers]

    def zero_state(self, batch: int) -> list[torch.Tensor]:
        """The all-zero state (a fresh sequence) as the flat list of graph inputs, fp32."""
        out = []
        for cls, shapes in zip(self.state_class, self._shapes):
            for shape in shapes.values():
                shape = list(shape)
                if cls.time_axis is not None:
                    shape[cls.time_axis] = self.cache_size
                shape[cls.batch_axis] = batch
                out.append(torch.zeros(shape, device=_device(self.model)))
        return out

    def axes(self) -> list[dict[int, str]]:
        """Per flat state tensor, its dynamic axes: the batch, and the cache's slots for a growing state."""
        return [{cls.batch_axis: "batch", **({cls.time_axis: "cache"} if cls.time_axis is not None else {})}
                for cls, fields in zip(self.state_class, self.layout) for _ in fields]

    def names(self) -> tuple[list[str], list[str]]:
        ins = [f"state.{i}.{f}" for i, fields in enumerate(self.layout) for f in fields]
        return ["tokens", "pos", *ins], ["logits", *("new_" + n for n in ins)]

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, *state: torch.Tensor):
        m = self.model
        w = m.bind(portable=True)
        states, i = [], 0
        for cls, fields in zip(self.state_class, self.layout):
            states.append(cls(**dict(zip(fields, state[i:i + len(fields)]))))
            i += len(fields)
        growing = [(n, block.mixer, block.mixer.bind(portable=True)) for n, (block, cls) in
                   enumerate(zip(m.blocks, self.state_class)) if cls.time_axis is not None]
        logits = []
        for t in range(tokens.shape[1]):  # T steps, unrolled into the graph
            p = pos + t
            blocks = list(w.blocks)
            for n, mixer, mw in growing:  # the cache's step at the tensor position p
                blocks[n] = blocks[n]._replace(mixer=_slot_step(mixer, mw, p))
            x = w.embed[tokens[:, t]]  # (B, D)
            if w.pos_embed is not None:
                x = x + w.pos_embed[p]
            for n, (b, s) in enumerate(zip(blocks, states)):
                x, states[n] = residual(x, s, *b)
            logits.append(w.head(w.norm(x)))
        return (torch.stack(logits, 1), *(t for s in states for t in s.tensors().values()))


def _slots_class(state: State) -> type:
    """The class a layer's state has in the graph: a growing cache becomes the fixed-size `SlotCache`."""
    return SlotCache if type(state).time_axis is not None else type(state)


def _slot_step(mixer: nn.Module, w: Any, pos: torch.Tensor) -> Any:
    """A mixer's step on a fixed-size cache at the tensor position `pos` ((1,) tensor), weights `w` bound."""
    return lambda x, s: mixer.step_slots(x, s, pos, w)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


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
    if any(cls.time_axis is not None for cls in graph.state_class) and T > cache_size:
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
    for k, dims in enumerate(graph.axes()):
        axes[in_names[2 + k]] = axes[out_names[1 + k]] = dims
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
    has_cache = any(cls.time_axis is not None for cls in graph.state_class)
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
    """Largest difference between a PyTorch ModelState and the graph's flat state (a cache: the slots it holds,
    the last S positions before `pos`)."""
    worst, i = 0.0, 0
    for s in state.layers:
        axis = type(s).time_axis
        for t in s.tensors().values():
            got = torch.as_tensor(flat[i])
            i += 1
            if axis is not None:
                got = got.narrow(axis, state.pos - t.shape[axis], t.shape[axis])
            worst = max(worst, float((got - t.detach().cpu().float()).abs().max()))
    return worst
