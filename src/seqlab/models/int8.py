"""Int8 linear layers: the layer a quantized checkpoint holds, and how a freshly built model takes their layout.

    W[j, :] ~= scale[j] * Q[j, :],   scale[j] = max_i |W[j, i]| / 127,   Q = round(W / scale) in [-127, 127]
    y = x W^T + b = (x Q^T) * scale + b           (Q is cast to the activation dtype one layer at a time)

`seqlab.load` calls `apply_layout` and `check_dtypes` for a checkpoint with a `quantization.json`;
`seqlab.interop.quantize` quantizes a trained model and saves it (what stays fp32, and why, is explained there).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.errors import InputError

SCHEMES = ("int8",)
FILE = "quantization.json"
# nn.Linear layers whose output feeds a recurrence's decay or step size: kept fp32.
KEEP_FP32 = ("dt_proj", "gk_down", "gk_up")


class Int8Linear(nn.Module):
    """A linear layer with an int8 weight (out, in) and fp32 per-output-channel scales (out,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q = cls(linear.in_features, linear.out_features, linear.bias is not None)
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        q.weight.copy_(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        q.scale.copy_(scale)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach().float())
        return q.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (..., in) -> (..., out)
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantizable(model: nn.Module) -> list[str]:
    """Qualified names of the nn.Linear layers the int8 scheme quantizes (all but the recurrence ones)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] not in KEEP_FP32]


def _swap(model: nn.Module, names: list[str], make: Any) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(getattr(parent, child)))


def apply_layout(model: nn.Module, spec: Any, where: str) -> nn.Module:
    """Give a freshly built model the structure `spec` (quantization.json) describes, ready for load_state_dict."""
    if not isinstance(spec, dict) or spec.get("scheme") not in SCHEMES or not isinstance(spec.get("layers"), list):
        raise InputError(f"{where}: {FILE} is corrupt: expected {{'scheme': 'int8', 'layers': [...]}}")
    modules = dict(model.named_modules())
    for name in spec["layers"]:
        if not isinstance(modules.get(name), nn.Linear):
            raise InputError(f"{where}: {FILE} names layer {name!r}, which is not a linear layer of this model")
    _swap(model, spec["layers"], lambda m: Int8Linear(m.in_features, m.out_features, m.bias is not None))
    model.quantization = {"scheme": spec["scheme"], "layers": list(spec["layers"])}  # type: ignore[assignment]
    return model


def check_dtypes(model: nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Stored tensors must have the dtype the model holds (an int8 weight stays int8; no silent cast)."""
    for name, want in model.state_dict().items():
        got = weights.get(name)
        if got is not None and got.dtype != want.dtype:
            raise InputError(f"{where}: tensor '{name}' has dtype {got.dtype} but the model expects {want.dtype}")
