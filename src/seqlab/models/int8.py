"""Int8 linear layers: the layer a quantized checkpoint holds, and how a freshly built model takes their layout.

    W[j, :] ~= scale[j] * Q[j, :],   scale[j] = max_i |W[j, i]| / 127,   Q = round(W / scale) in [-127, 127]
    y = x W^T + b = (x Q^T) * scale + b           (Q is cast to the activation dtype one layer at a time)

How decoding (`step`, through `bind` and `linear_fn`) multiplies, the layer's `decode` (DECODES):
    "dequant"  the forward's math: Q cast to fp32 per call, an fp32 matmul. Reads the int8 weight and writes and
               reads back an fp32 copy: no faster than the fp32 model.
    "dynamic"  int8 x int8 -> int32: each call quantizes its activations x (B, in) to uint8 with one affine scale
               per call (per token at batch 1), then fbgemm's int8 GEMM (torch.ops.quantized.linear_dynamic,
               full 8-bit range) reads the int8 weight as int8, and the result is rescaled to fp32
               (benchmarks/bench_quantized.py measures decode against fp32). Its logits differ from the forward's
               by the activations' rounding (the forward, prefill and training keep "dequant"); fp32 activations
               only; CPUs whose fbgemm saturates 16-bit sums (no VNNI) are refused when it is chosen
               (`check_dynamic`). The weights are packed for fbgemm once and kept on the layer until they change
               (`packed`). Uses torch's quantized-tensor API, which torch 2.13 marks deprecated.
               A head tied to the embedding (which the int8 scheme keeps fp32 for the lookup) is multiplied as int8
               too: `TiedHead` keeps an int8 copy of the embedding's rows (one scale per vocabulary row, made once
               and kept until the embedding changes), so a decode step reads no fp32 matrix of the model's size
               (for SmolLM2-135M the tied head is half of the weight bytes an int8 step would otherwise read).
How the output head is held (HEADS, the quantization's `head`):
    "int8"     (the default) an untied head is an Int8Linear like the blocks' layers; a tied head decodes through
               `TiedHead` under decode="dynamic".
    "fp32"     the head stays fp32 however the blocks decode (an untied head is not quantized; a tied head is x E^T
               in fp32): the logits lose no precision to the head, at the cost of reading its fp32 bytes per token
               (benchmarks/bench_quantized.py measures both on SmolLM2-135M).

`seqlab.load` calls `apply_layout` and `check_dtypes` for a checkpoint with a `quantization.json`;
`seqlab.interop.quantize` quantizes a trained model and saves it (what stays fp32, and why, is explained there).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.errors import InputError

SCHEMES = ("int8",)
DECODES = ("dequant", "dynamic")
HEADS = ("int8", "fp32")
FILE = "quantization.json"
# nn.Linear layers whose output feeds a recurrence's decay or step size: kept fp32.
KEEP_FP32 = ("dt_proj", "gk_down", "gk_up")


class Int8Linear(nn.Module):
    """A linear layer with an int8 weight (out, in) and fp32 per-output-channel scales (out,)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, decode: str = "dequant"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if decode not in DECODES:
            raise InputError(f"int8 decode {decode!r} is not supported; expected one of "
                             f"{', '.join(map(repr, DECODES))}")
        self.decode = decode
        self._packed: tuple[tuple, object] | None = None  # (the tensors' versions, fbgemm's packed weight)

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

    def step_fn(self):
        """What decoding calls on x (B, in) -> (B, out), by `decode`: the module itself ("dequant"), or the int8
        GEMM on the packed weight ("dynamic")."""
        if self.decode == "dequant":
            return self
        check_dynamic()
        if self.scale.dtype != torch.float32 or self.weight.device.type != "cpu":
            raise InputError(f"Int8Linear decode='dynamic' runs fp32 activations on the CPU; this layer holds "
                             f"{self.scale.dtype} scales on {self.weight.device}: use decode='dequant'")
        packed, linear = self.packed(), torch.ops.quantized.linear_dynamic
        return lambda x: linear(x, packed, False)  # reduce_range=False: the full 8-bit range (check_dynamic)

    def packed(self):
        """fbgemm's packed form of (Q, scale, bias), made on first use and again whenever one of them changed."""
        key = (self.weight._version, self.weight.data_ptr(), self.scale._version, self.scale.data_ptr(),
               None if self.bias is None else (self.bias._version, self.bias.data_ptr()))
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, _pack(self.weight, self.scale, self.bias))
        return self._packed[1]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"decode={self.decode}")


def check_decode(decode: str) -> str:
    """`decode` itself when it is one of DECODES and can run on this machine; an InputError otherwise."""
    if decode not in DECODES:
        raise InputError(f"int8 decode {decode!r} is not supported; expected one of {', '.join(map(repr, DECODES))}")
    if decode == "dynamic":
        check_dynamic()
    return decode


@functools.cache
def check_dynamic() -> None:
    """decode='dynamic' needs fbgemm (torch's x86 int8 engine) with exact int32 sums: run once, on the worst case
    for 16-bit saturation (uint8 255 times int8 127 in every pair), and compare with the exact product."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise InputError("int8 decode 'dynamic' needs torch's fbgemm engine (x86 CPUs); this torch has "
                         f"{torch.backends.quantized.supported_engines}: use decode='dequant'")
    q = torch.full((8, 256), 127, dtype=torch.int8)
    x = torch.full((1, 256), 3.0)
    x[0, 0] = 0.0  # the activation scale is max / 255: 3.0 is uint8 255
    y = torch.ops.quantized.linear_dynamic(x, _pack(q, torch.ones(8), None), False)
    if not torch.allclose(y, F.linear(x, q.float()), rtol=1e-5):
        raise InputError("int8 decode 'dynamic': this CPU's fbgemm saturates 16-bit sums (no VNNI), so its int8 "
                         "products would be wrong; use decode='dequant'")


def _pack(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """fbgemm's packed weight for int8 Q (out, in) with per-row scales (the int8 values are kept as they are)."""
    with warnings.catch_warnings():  # torch 2.13 marks quantized tensors deprecated; linear_dynamic still needs one
        warnings.simplefilter("ignore", UserWarning)
        qw = torch._make_per_channel_quantized_tensor(q.detach(), scale.detach().double(),
                                                      torch.zeros(q.shape[0], dtype=torch.long), 0)
    return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.detach().float())


class TiedHead:
    """decode='dynamic' for a head tied to the embedding (V, D): logits = x E^T as an int8 GEMM on E's rows quantized
    like an Int8Linear's weight (scale[v] = max |E[v, :]| / 127). Packed on first use, repacked when E changes."""

    def __init__(self):
        self._packed: tuple[tuple, object] | None = None

    def fn(self, embed: torch.Tensor):
        check_dynamic()
        key = (embed._version, embed.data_ptr(), tuple(embed.shape))
        if self._packed is None or self._packed[0] != key:
            w = embed.detach().float()
            scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (V,)
            q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
            self._packed = (key, _pack(q, scale, None))
        packed, linear = self._packed[1], torch.ops.quantized.linear_dynamic
        return lambda x: linear(x, packed, False)


def set_decode(model: nn.Module, decode: str) -> nn.Module:
    """Switch how every Int8Linear of `model` decodes (DECODES); returns the model. A decode plan built before keeps
    the old one: build a new one (generate does, per call)."""
    check_decode(decode)
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    if not layers:
        raise InputError("the model has no int8 layers: quantize it first (seqlab.interop.quantize.quantize)")
    for m in layers:
        m.decode = decode
    if getattr(model, "quantization", None) is not None:
        model.quantization = {**model.quantization, "decode": decode}  # type: ignore[assignment]
    return model


def check_head(head: str) -> str:
    """`head` itself when it is one of HEADS; an InputError otherwise."""
    if head not in HEADS:
        raise InputError(f"int8 head {head!r} is not supported; expected one of {', '.join(map(repr, HEADS))}")
    return head


def quantizable(model: nn.Module, head: str = "int8") -> list[str]:
    """Qualified names of the nn.Linear layers the int8 scheme quantizes (all but the recurrence ones, and the
    model's untied output head `head` when head="fp32")."""
    check_head(head)
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] not in KEEP_FP32
            and not (head == "fp32" and name == "head")]


def _swap(model: nn.Module, names: list[str], make: Any) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(getattr(parent, child)))


def apply_layout(model: nn.Module, spec: Any, where: str) -> nn.Module:
    """Give a freshly built model the structure `spec` (quantization.json) describes, ready for load_state_dict."""
    if not isinstance(spec, dict) or spec.get("scheme") not in SCHEMES or not isinstance(spec.get("layers"), list):
        raise InputError(f"{where}: {FILE} is corrupt: expected {{'scheme': 'int8', 'layers': [...]}}")
    decode = spec.get("decode", "dequant")  # files written before `decode` existed decoded with the forward's math
    if decode not in DECODES:  # whether it can run here is checked when decoding starts: the file loads anywhere
        raise InputError(f"{where}: {FILE} has decode {decode!r}; expected one of {', '.join(map(repr, DECODES))}")
    head = spec.get("head", "int8")  # files written before `head` existed held an int8 head
    if head not in HEADS:
        raise InputError(f"{where}: {FILE} has head {head!r}; expected one of {', '.join(map(repr, HEADS))}")
    modules = dict(model.named_modules())
    for name in spec["layers"]:
        if not isinstance(modules.get(name), nn.Linear):
            raise InputError(f"{where}: {FILE} names layer {name!r}, which is not a linear layer of this model")
    _swap(model, spec["layers"], lambda m: Int8Linear(m.in_features, m.out_features, m.bias is not None, decode))
    model.quantization = {"scheme": spec["scheme"], "layers": list(spec["layers"]),  # type: ignore[assignment]
                          "decode": decode, "head": head}
    return model


def check_dtypes(model: nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Stored tensors must have the dtype the model holds (an int8 weight stays int8; no silent cast)."""
    for name, want in model.state_dict().items():
        got = weights.get(name)
        if got is not None and got.dtype != want.dtype:
            raise InputError(f"{where}: tensor '{name}' has dtype {got.dtype} but the model expects {want.dtype}")
