"""Weight-only int8 quantization: linear layers stored as int8 with one fp32 scale per output channel.

    W[j, :] ~= scale[j] * Q[j, :],   scale[j] = max_i |W[j, i]| / 127,   Q = round(W / scale) in [-127, 127]
    y = x W^T + b = (x Q^T) * scale + b           (Q is cast to the activation dtype one layer at a time)

What stays fp32, because small errors there compound over time (the recurrence) rather than once per token:
  - every recurrence parameter: Mamba's A_log, D and dt_proj (the step size delta), GLA's forget-gate projections
    (gk_down, gk_up), the LSTM/GRU cells (their gates are the recurrence), convolution kernels;
  - norms, biases and the embedding (tied to the output head when tie_embeddings; an untied head is quantized; a
    tied head decodes through an int8 copy of the embedding's rows under decode="dynamic", `seqlab.models.int8`;
    head="fp32" keeps either kind of head fp32);
  - every state: activations and states are never quantized (weight-only).

Decoding (the one-token `step`) multiplies either as the forward does (decode="dequant", the default) or with
int8 matrix products, activations quantized per call on the fly (decode="dynamic"); `seqlab.models.int8` explains
both, benchmarks/bench_quantized.py measures them.

A quantized checkpoint is an ordinary seqlab checkpoint folder whose model.safetensors holds `<layer>.weight` as
int8 and `<layer>.scale` as fp32, plus `quantization.json` naming the scheme, the layers and the decode; `seqlab.load`
rebuilds the model with `Int8Linear` in those places (no pickle, as always). Its state_dict is exactly what is stored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from seqlab.checkpoint import save
from seqlab.errors import InputError
from seqlab.models.int8 import (  # noqa: F401  (re-exported: Int8Linear, apply_layout ... were defined here)
    DECODES,
    FILE,
    HEADS,
    KEEP_FP32,
    SCHEMES,
    Int8Linear,
    _swap,
    apply_layout,
    check_decode,
    check_dtypes,
    check_head,
    quantizable,
    set_decode,
)


def quantize(model: nn.Module, scheme: str = "int8", decode: str = "dequant", head: str = "int8") -> nn.Module:
    """Quantize `model` in place (its quantizable linear layers become Int8Linear, decoding by `decode`, one of
    DECODES; the output head int8 or kept fp32 by `head`, one of HEADS) and return it."""
    if scheme not in SCHEMES:
        raise InputError(f"quantization scheme {scheme!r} is not supported; expected one of {', '.join(SCHEMES)}")
    check_decode(decode)
    check_head(head)
    if any(isinstance(m, Int8Linear) for m in model.modules()):
        raise InputError("the model is already quantized")
    with torch.no_grad():
        _swap(model, quantizable(model, head), Int8Linear.from_linear)
    layers = [name for name, m in model.named_modules() if isinstance(m, Int8Linear)]
    model.quantization = {"scheme": scheme, "layers": layers, "head": head}  # type: ignore[assignment]
    return set_decode(model, decode)


def save_quantized(model: nn.Module, out: str | Path, **kwargs: Any) -> Path:
    spec = getattr(model, "quantization", None)
    if spec is None:
        raise InputError("the model is not quantized: call seqlab.interop.quantize.quantize(model) first")
    json_files = {**kwargs.pop("json_files", {}), FILE: spec}
    return save(model, out, json_files=json_files, **kwargs)


def linear_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the quantizable linear layers' weights: as fp32, and as held now (int8 + scales once quantized)."""
    fp32 = held = 0
    plain = set(quantizable(model))
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear):
            fp32 += m.weight.numel() * 4
            held += m.weight.numel() + m.scale.numel() * 4
        elif name in plain:
            fp32 += m.weight.numel() * 4
            held += m.weight.numel() * 4
    return {"fp32": fp32, "held": held}
