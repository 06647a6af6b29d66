"""Distillation: carry what a trained teacher knows into a student of any architecture (e.g. attention -> Mamba).

    student = seqlab.build_model(student_config, seed=0)
    moved = transfer_weights(teacher, student)            # copy what shapes allow; map attention onto the mixer
    result = distill(teacher, student, task, DistillConfig(temperature=2.0, ce_weight=0.5))

`distill` is `seqlab.train.fit` with `DistillLoss` as the loss: the same batches, schedule, clipping, gradient
accumulation, non-finite guard, DDP and bit-exact resume as `seqlab train`.

Losses, averaged over the positions whose target counts (the task's mask):
    kl      T^2 * KL(p_teacher || p_student), both at temperature T: p = softmax(logits / T) (Hinton et al. 2015;
            the T^2 keeps the gradient's scale independent of T)
    ce      the student's cross-entropy on the data targets (weight `ce_weight`, default 0: off)
    hidden  for each student block i and its teacher block j = layer_map[i]: mean squared error between
            P_i(student block output) and the teacher block output, P_i a learned linear map when the widths
            differ (weight `hidden_weight`, default 0: off; both models must be plain language models)

Weight transfer (`transfer_weights`), where shapes allow, student block i taking teacher block j = layer_map[i]
(evenly spaced, first and last included: 4 teacher blocks -> 2 student blocks takes blocks 0 and 3):
    embedding, final norm and head, and each block's norms and MLP: copied when the shapes are equal (a tied
        teacher's embedding also initializes an untied student's head);
    mixer, same kind (attention <-> sliding_attention, lstm <-> lstm, ...): every tensor of equal shape copied;
    attention -> gla (the linear-attention recipe): q_proj <- W_Q, k_proj <- W_K, v_proj <- W_V, out_proj <- W_O
        (grouped K/V heads repeated to the query heads); needs gla key and value widths = the attention width
        and the same head count. The forget gate, output gate and per-head norm keep their new init.
    attention -> mamba (the "Mamba in the Llama" / "Transformers to SSMs" recipe, in Mamba-1's layout): Mamba with
        A -> 0, dt -> 1 and no gate is linear attention y_t = sum_s (C_t . B_s) x_s, one query/key of size N shared
        by every channel. So: the x branch of in_proj <- W_V (first rows), out_proj <- W_O (first columns), the
        short conv <- the identity filter, and the B and C rows of x_proj <- W_K[:N] M^+ and W_Q[:N] M^+ where M is
        the x branch of in_proj, so that before the SiLU, B_t = W_K[:N] u_t and C_t = W_Q[:N] u_t (needs
        d_inner >= the attention width). The gate branch, dt, A and D keep Mamba's own init. With
        mamba.proj_bias, the x rows of in_proj's bias and out_proj's bias take W_V's and W_O's biases (zeros when
        the attention has none); a teacher's attention biases with no bias to go to are named in `notes`.
    anything else: the student's own new init. `Transfer` lists every tensor copied, mapped or left fresh.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seqlab.config import TrainConfig
from seqlab.data import Batch, Task, masked_cross_entropy
from seqlab.data.tokenizer import tokenizer_of
from seqlab.errors import InputError
from seqlab.infer.profile import measure_cell
from seqlab.models import ModelState, as_config, build_model
from seqlab.train import cross_entropy, evaluate, fit, task_batches
from seqlab.train.distributed import init_world
from seqlab.train.losses import Loss, unwrap
from seqlab.train.trainer import resolve_device

ATTENTION = ("attention", "sliding_attention")


@dataclass(frozen=True)
class DistillConfig:
    """The distillation losses and whether to transfer weights; `train` is the optimization (as for training)."""

    temperature: float = 2.0
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    hidden_weight: float = 0.0
    transfer: bool = True
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise InputError(f"distill temperature = {self.temperature!r}: must be > 0")
        for name in ("kl_weight", "ce_weight", "hidden_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise InputError(f"distill {name} = {value!r}: must be a number >= 0")
        if self.kl_weight == self.ce_weight == self.hidden_weight == 0:
            raise InputError("distill: kl_weight, ce_weight and hidden_weight are all 0; nothing to learn from")
        if self.train.stream:
            raise InputError("distill supports train.stream = false only (the teacher's state is not carried "
                             "across segments)")

    @classmethod
    def from_dict(cls, data: dict) -> DistillConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"unknown distill key '{unknown[0]}'; allowed keys: {', '.join(sorted(names))}")
        data = dict(data)
        if "train" in data:
            data["train"] = TrainConfig.from_dict(data["train"])
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_pair(teacher: nn.Module, student: nn.Module) -> None:
    """InputError unless teacher and student predict over the same vocabulary."""
    tv, sv = teacher.config.vocab_size, student.config.vocab_size
    if tv != sv:
        raise InputError(f"teacher vocab_size {tv} and student vocab_size {sv} differ: distillation compares "
                         "next-token distributions, so both must use the same vocabulary")


def layer_map(n_teacher: int, n_student: int) -> list[int]:
    """Teacher block for each student block: evenly spaced, first and last included (equal depth: identity)."""
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


# ---------------------------------------------------------------------------------------------------------------
# losses


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """T^2 * mean over masked positions of KL(softmax(teacher / T) || softmax(student / T)); logits (B, T, V)."""
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (B, T)
    mask = mask.to(kl.device)
    if not mask.any():
        return kl.sum() * 0.0
    return kl[mask].mean() * temperature**2


def block_outputs(model: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A plain language model's logits (B, T, V) and every block's output (B, T, D), from an empty state.

    The model runs its own forward (through its DistributedDataParallel wrapper, if it has one, so gradients are
    averaged); hooks on its blocks catch their outputs on the way."""
    inner = unwrap(model)
    if not isinstance(getattr(inner, "blocks", None), nn.ModuleList) or inner.config.arch != "lm":
        raise InputError(f"hidden-state alignment needs plain language models (arch 'lm'); got arch "
                         f"{inner.config.arch!r}")
    outs: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda _block, _args, out: outs.append(out[0])) for block in inner.blocks]
    try:
        logits, _ = model(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, outs


class HiddenAlignment(nn.Module):
    """One projection per student block onto its teacher block's width (identity when the widths match)."""

    def __init__(self, d_student: int, d_teacher: int, pairs: list[int]):
        super().__init__()
        self.pairs = pairs
        self.proj = nn.ModuleList(
            nn.Linear(d_student, d_teacher, bias=False) if d_student != d_teacher else nn.Identity() for _ in pairs)

    def forward(self, student_hs: list[torch.Tensor], teacher_hs: list[torch.Tensor],
                mask: torch.Tensor) -> torch.Tensor:
        mask = mask.to(student_hs[0].device)
        losses = []
        for proj, h, j in zip(self.proj, student_hs, self.pairs):
            err = ((proj(h).float() - teacher_hs[j].float()) ** 2).mean(-1)  # (B, T)
            losses.append(err[mask].mean() if mask.any() else err.sum() * 0.0)
        return torch.stack(losses).mean()


# ---------------------------------------------------------------------------------------------------------------
# weight transfer


@dataclass
class Transfer:
    """What `transfer_weights` did: copied {student tensor: teacher tensor} (identical values), mapped
    {student tensor: how} (set from teacher tensors by a documented map), fresh [student tensors left as built]
    and notes (why a mixer was not mapped)."""

    layer_map: list[int]
    copied: dict[str, str] = field(default_factory=dict)
    mapped: dict[str, str] = field(default_factory=dict)
    fresh: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fraction_transferred(self, student: nn.Module) -> float:
        """Share of the student's parameters in tensors copied or mapped (a mapped tensor counts whole, although
        parts of it, such as Mamba's gate rows of in_proj, keep their new init)."""
        sd = student.state_dict()
        moved = sum(sd[k].numel() for k in (*self.copied, *self.mapped))
        return moved / max(sum(v.numel() for v in sd.values()), 1)


def _expand_kv(w: torch.Tensor, kv_heads: int, n_heads: int) -> torch.Tensor:
    """(Hkv * hd, D) key or value projection -> (H * hd, D), each kv head repeated for its group of query heads."""
    if kv_heads == n_heads:
        return w
    hd = w.shape[0] // kv_heads
    return w.view(kv_heads, hd, -1).repeat_interleave(n_heads // kv_heads, dim=0).reshape(n_heads * hd, -1)


def _attention_weights(mixer: nn.Module) -> dict[str, torch.Tensor]:
    """W_Q, W_K, W_V (K and V expanded to every query head) and W_O of a seqlab attention mixer."""
    return {"wq": mixer.wq.weight, "wk": _expand_kv(mixer.wk.weight, mixer.kv_heads, mixer.n_heads),
            "wv": _expand_kv(mixer.wv.weight, mixer.kv_heads, mixer.n_heads), "wo": mixer.wo.weight}


def _map_attention_to_gla(att: nn.Module, gla: nn.Module, sp: str, tp: str, out: Transfer) -> dict:
    w = _attention_weights(att)
    width = w["wq"].shape[0]
    if gla.q_proj.weight.shape != w["wq"].shape or gla.v_proj.weight.shape != w["wv"].shape or gla.H != att.n_heads:
        out.notes.append(f"{sp}: gla key/value widths {gla.q_proj.weight.shape[0]}/{gla.v_proj.weight.shape[0]} "
                         f"and {gla.H} heads do not match the attention's {width} and {att.n_heads} heads: "
                         "left at its new init")
        return {}
    if att.wq.bias is not None:
        out.notes.append(f"{sp}: the teacher's attention biases are not carried over (gla projections have none)")
    new = {}
    for s_name, t_name in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("out_proj", "wo")):
        new[f"{sp}.{s_name}.weight"] = (w[t_name], f"{tp}.{t_name}.weight"
                                        + (" (kv heads repeated)" if t_name in ("wk", "wv") and
                                           att.kv_heads != att.n_heads else ""))
    return new


def _map_attention_to_mamba(att: nn.Module, mamba: nn.Module, sp: str, tp: str, out: Transfer) -> dict:
    w = _attention_weights(att)
    width, d_inner, N, R = w["wq"].shape[0], mamba.d_inner, mamba.N, mamba.dt_rank
    if d_inner < width or width < N:
        out.notes.append(f"{sp}: mamba d_inner {d_inner} < attention width {width} (or d_state {N} > width): "
                         "left at its new init")
        return {}
    in_proj = mamba.in_proj.weight.detach().clone()  # (2 d_inner, D): rows [0, d_inner) are the x branch
    in_proj[:width] = w["wv"]
    out_proj = mamba.out_proj.weight.detach().clone()  # (D, d_inner)
    out_proj[:, :width] = w["wo"]
    conv = torch.zeros_like(mamba.conv.weight)  # (d_inner, 1, k): the identity filter, y_t = x_t
    conv[:, 0, -1] = 1.0
    M_pinv = torch.linalg.pinv(in_proj[:d_inner].double())  # (D, d_inner): M^+ M = I when M has full column rank
    x_proj = mamba.x_proj.weight.detach().clone()  # (R + 2N, d_inner): dt, B, C rows
    x_proj[R : R + N] = (w["wk"][:N].double() @ M_pinv).to(x_proj.dtype)
    x_proj[R + N :] = (w["wq"][:N].double() @ M_pinv).to(x_proj.dtype)
    new = {
        f"{sp}.in_proj.weight": (in_proj, f"rows [0, {width}) <- {tp}.wv.weight (x branch); gate rows fresh"),
        f"{sp}.out_proj.weight": (out_proj, f"columns [0, {width}) <- {tp}.wo.weight"),
        f"{sp}.conv.weight": (conv, "identity filter (x_t passes the short conv unchanged)"),
        f"{sp}.x_proj.weight": (x_proj, f"B rows <- {tp}.wk.weight[:{N}] M^+, C rows <- {tp}.wq.weight[:{N}] M^+ "
                                        f"(M: the x branch of in_proj); dt rows fresh"),
    }
    if mamba.conv.bias is not None:  # mamba.conv_bias = false: no bias to clear
        new[f"{sp}.conv.bias"] = (torch.zeros_like(mamba.conv.bias), "zeros (identity filter)")
    t_bias = att.wq.bias is not None
    if mamba.in_proj.bias is not None:  # mamba.proj_bias = true: the value and output biases, or zeros
        in_bias = mamba.in_proj.bias.detach().clone()
        in_bias[:width] = _expand_kv(att.wv.bias[:, None], att.kv_heads, att.n_heads)[:, 0] if t_bias else 0
        out_bias = att.wo.bias.detach().clone() if t_bias else torch.zeros_like(mamba.out_proj.bias)
        new[f"{sp}.in_proj.bias"] = (in_bias, f"entries [0, {width}) <- {tp}.wv.bias" if t_bias else
                                     f"entries [0, {width}) zero (W_V has no bias); the rest fresh")
        new[f"{sp}.out_proj.bias"] = (out_bias, f"<- {tp}.wo.bias" if t_bias else "zeros (W_O has no bias)")
    elif t_bias:
        out.notes.append(f"{sp}: the teacher's attention biases are not carried over (mamba.proj_bias is false)")
    return new


@torch.no_grad()
def transfer_weights(teacher: nn.Module, student: nn.Module, mapping: list[int] | None = None) -> Transfer:
    """Initialize `student` from `teacher` where shapes allow (see the module docstring); returns what moved."""
    check_pair(teacher, student)
    t_blocks = getattr(teacher, "blocks", None)
    s_blocks = getattr(student, "blocks", None)
    has_blocks = isinstance(t_blocks, nn.ModuleList) and isinstance(s_blocks, nn.ModuleList)
    if mapping is None:
        mapping = layer_map(len(t_blocks), len(s_blocks)) if has_blocks else []
    if has_blocks and (len(mapping) != len(s_blocks) or any(not 0 <= j < len(t_blocks) for j in mapping)):
        raise InputError(f"layer map {mapping}: expected {len(s_blocks)} teacher block indices in "
                         f"[0, {len(t_blocks)})")
    out = Transfer(list(mapping))
    t_sd, s_sd = teacher.state_dict(), student.state_dict()
    new: dict[str, tuple[torch.Tensor, str]] = {}  # student tensor -> (value, how), for the mapped ones

    def teacher_key(key: str) -> str:
        if key.startswith("blocks.") and has_blocks:
            _, i, rest = key.split(".", 2)
            return f"blocks.{mapping[int(i)]}.{rest}"
        if key == "head.weight" and "head.weight" not in t_sd:
            return "embed.weight"  # a tied teacher's head is its embedding
        return key

    if has_blocks:
        for i, j in enumerate(mapping):
            sb, tb = s_blocks[i], t_blocks[j]
            sp, tp = f"blocks.{i}.mixer", f"blocks.{j}.mixer"
            same = sb.mixer_name == tb.mixer_name or {sb.mixer_name, tb.mixer_name} <= set(ATTENTION)
            if same:
                continue  # same kind: the generic copy below takes every tensor of equal shape
            if tb.mixer_name in ATTENTION and sb.mixer_name == "gla":
                new.update(_map_attention_to_gla(tb.mixer, sb.mixer, sp, tp, out))
            elif tb.mixer_name in ATTENTION and sb.mixer_name == "mamba":
                new.update(_map_attention_to_mamba(tb.mixer, sb.mixer, sp, tp, out))
            else:
                out.notes.append(f"{sp}: no map from the teacher's {tb.mixer_name} mixer to the student's "
                                 f"{sb.mixer_name} mixer: left at its new init")

    def mixer_of_other_kind(key: str) -> bool:
        if not (has_blocks and key.startswith("blocks.") and ".mixer." in key):
            return False
        i = int(key.split(".")[1])
        a, b = s_blocks[i].mixer_name, t_blocks[mapping[i]].mixer_name
        return not (a == b or {a, b} <= set(ATTENTION))

    for key, value in s_sd.items():
        if key in new:
            tensor, how = new[key]
            value.copy_(tensor)
            out.mapped[key] = how
            continue
        src = teacher_key(key)
        if not mixer_of_other_kind(key) and src in t_sd and t_sd[src].shape == value.shape:
            value.copy_(t_sd[src])
            out.copied[key] = src
        else:
            out.fresh.append(key)
    return out  # state_dict() tensors share storage with the parameters: the copies above are in place


# ---------------------------------------------------------------------------------------------------------------
# the objective, and the loop that trains on it


class DistillLoss(nn.Module):
    """The distillation objective for `seqlab.train.fit` (see `seqlab.train.losses` for the protocol):
    kl_weight * kl + ce_weight * ce + hidden_weight * hidden (the module docstring defines them), each summed
    over the masked positions, and logged as metrics.

    Its parameters are the hidden alignment's projections (none without hidden_weight), trained and saved with the
    student. The teacher is frozen: it is kept out of this module's parameters, state_dict, .to() and .train(),
    and must already be on the training device (`distill` puts it there).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: DistillConfig):
        super().__init__()
        check_pair(teacher, student)
        object.__setattr__(self, "teacher", teacher.eval())  # not registered as a submodule: see above
        self.temperature = cfg.temperature
        self.weights = {"kl": cfg.kl_weight, "ce": cfg.ce_weight, "hidden": cfg.hidden_weight}
        self.align = None
        if cfg.hidden_weight > 0:
            self.align = HiddenAlignment(student.config.d_model, teacher.config.d_model,
                                         layer_map(len(teacher.blocks), len(student.blocks)))

    def forward(self, model: nn.Module, batch: Batch, state: ModelState | None) -> Loss:
        counted = batch.mask.sum()
        with torch.no_grad():
            if self.align is not None:
                t_logits, t_hs = block_outputs(self.teacher, batch.inputs)
            else:
                t_logits, t_hs = self.teacher(batch.inputs)[0], None
        if self.align is not None:
            s_logits, s_hs = block_outputs(model, batch.inputs)
        else:
            s_logits, s_hs = model(batch.inputs)[0], None
        # each term: its mean over the masked positions times their count, i.e. the sum
        terms = {"kl": kd_loss(s_logits, t_logits, batch.mask, self.temperature) * counted}
        if self.weights["ce"] > 0:
            terms["ce"] = masked_cross_entropy(s_logits, batch) * counted
        if self.align is not None:
            terms["hidden"] = self.align(s_hs, t_hs, batch.mask) * counted
        total = sum(self.weights[k] * v for k, v in terms.items())
        return Loss(total, None, {k: v.detach() for k, v in terms.items()})


def distill(teacher: nn.Module, student: nn.Module, task: Task, cfg: DistillConfig, *,
            eval_task: Task | None = None, progress: bool = True, log: Callable[[dict], None] | None = None,
            checkpoint_dir: str | Path | None = None, resume_from: str | Path | None = None) -> dict[str, Any]:
    """Train `student` on the teacher's next-token distributions (and the data, and hidden states, as `cfg` says)
    for cfg.train.steps steps; the teacher is not changed.

    This is `seqlab.train.fit` with `DistillLoss`: batches, optimizer (AdamW, decay on matrices only), schedule
    (warmup + cosine), gradient accumulation, the non-finite guard, DDP, checkpoints and resume are exactly the
    trainer's for the same TrainConfig, so `fit` with `cross_entropy` on the same config is the from-scratch twin.
    Returns fit's result: the student's final evaluation on `eval_task` (default `task`) and the history, whose
    rows also hold the loss terms kl, ce and hidden (per masked position).
    """
    check_pair(teacher, student)
    task, eval_task = read_as_teacher(teacher, task), eval_task and read_as_teacher(teacher, eval_task)
    if task.vocab_size > student.config.vocab_size:
        raise InputError(f"task '{task.name}' needs vocab_size {task.vocab_size}; the models have vocab_size "
                         f"{student.config.vocab_size}")
    tc = cfg.train
    teacher.to(resolve_device(tc.device, init_world(tc.device)))
    return fit(student, task_batches(task, tc), DistillLoss(teacher, student, cfg), tc, progress=progress,
               desc="distill", log=log, eval_task=eval_task, checkpoint_dir=checkpoint_dir, resume_from=resume_from)


def read_as_teacher(teacher: nn.Module, task: Task) -> Task:
    """A text task (the corpus) read through the teacher's tokenizer (bytes when it has none): teacher and
    student share one vocabulary, so the student reads the teacher's tokens and is saved with its tokenizer."""
    return task.with_tokenizer(tokenizer_of(teacher)) if hasattr(task, "with_tokenizer") else task


# ---------------------------------------------------------------------------------------------------------------
# inference cost


def decode_cost(model: nn.Module, context: int, decode_steps: int = 64, short: int = 256, seed: int = 0) -> dict:
    """The student's inference advantage, from the profiler (`seqlab.infer.profile.measure_cell`, in this
    process, at batch 1): state bytes after `context` tokens and the median latency of one decode step there,
    plus the state bytes after min(`short`, context / 2) tokens: `constant_state` says whether they are equal.

    The profiler builds a fresh model from `model.config`: cost depends on the architecture, not on the weights.
    """

    def cell(n: int, steps: int) -> dict:
        spec = {"mixer": "+".join(dict.fromkeys(model.config.layer_mixers)), "model": model.config.to_dict(),
                "context": n, "batch": 1, "chunk": 512, "decode_steps": steps, "warmup": 4, "repeats": 1,
                "long_prefill_s": 0.0, "threads": None, "device": "cpu", "seed": seed}
        return measure_cell(spec)

    if context < 2:
        raise InputError(f"decode context = {context}: must be >= 2 (the state is compared with a shorter one)")
    short = max(1, min(short, context // 2))
    long = cell(context, decode_steps)
    brief = cell(short, 2)
    return {"context": context, "state_bytes": long["state_bytes"], "short_context": short,
            "state_bytes_short": brief["state_bytes"], "constant_state": long["state_bytes"] == brief["state_bytes"],
            "decode_ms": 1e3 * long["decode_latency_s"], "decode_ms_p10": 1e3 * long["decode_latency_p10_s"],
            "decode_ms_p90": 1e3 * long["decode_latency_p90_s"], "decode_steps": decode_steps,
            "prefill_tokens_per_s": long["prefill_tokens_per_s"]}


# ---------------------------------------------------------------------------------------------------------------
# quality


def quality(metrics: dict[str, float]) -> tuple[str, float, bool]:
    """(metric name, value, higher is better): bits per byte on byte-level data, else accuracy."""
    if "bits_per_byte" in metrics:
        return "bits_per_byte", metrics["bits_per_byte"], False
    return "accuracy", metrics["accuracy"], True


def better(a: dict[str, float], b: dict[str, float]) -> bool:
    """True when metrics `a` are strictly better than `b` by `quality`."""
    _, x, higher = quality(a)
    _, y, _ = quality(b)
    return x > y if higher else x < y


def retained(student: dict[str, float], teacher: dict[str, float]) -> float:
    """The fraction of the teacher's quality the student keeps: teacher bpb / student bpb, or student accuracy /
    teacher accuracy (1.0 = as good as the teacher)."""
    _, s, higher = quality(student)
    _, t, _ = quality(teacher)
    if higher:
        return s / t if t > 0 else float("nan")
    return t / s if s > 0 else float("nan")


# ---------------------------------------------------------------------------------------------------------------
# the whole comparison: teacher, distilled student, the same student from scratch


@dataclass
class Comparison:
    """What `distill_and_compare` returns: the report (JSON-ready) and the two trained students."""

    report: dict[str, Any]
    student: nn.Module
    scratch: nn.Module | None


def distill_and_compare(teacher: nn.Module, student_config: Any, task: Task, cfg: DistillConfig, *,
                        eval_task: Task | None = None, scratch: bool = True, context: int = 4096,
                        progress: bool = True) -> Comparison:
    """Distill a fresh student (built from `student_config` with seed cfg.train.seed, weights transferred when
    cfg.transfer), train its twin from scratch with the same TrainConfig (same batches, steps, optimizer), and
    evaluate the teacher, both students and their decoding cost at `context` tokens (0: skip) on `eval_task`."""
    tc = cfg.train
    task = read_as_teacher(teacher, task)
    eval_task = read_as_teacher(teacher, eval_task or task)
    student_config = as_config(student_config)
    student = build_model(student_config, seed=tc.seed)
    student.tokenizer = getattr(teacher, "tokenizer", None)
    check_pair(teacher, student)
    moved = transfer_weights(teacher, student) if cfg.transfer else None
    teacher_eval = evaluate(teacher, eval_task, tc.eval_batches, tc.batch_size, tc.seed + 1, precision=tc.precision)
    result = distill(teacher, student, task, cfg, eval_task=eval_task, progress=progress)
    twin = None
    scratch_result = None
    if scratch:
        twin = build_model(student_config, seed=tc.seed)
        twin.tokenizer = student.tokenizer
        scratch_result = fit(twin, task_batches(task, tc), cross_entropy, tc, progress=progress, desc="scratch",
                             eval_task=eval_task)
    metric, _, _ = quality(teacher_eval)

    costs: dict[str, dict] = {}  # decode cost per architecture: the distilled student and its twin share one

    def row(model: nn.Module, metrics: dict, extra: dict) -> dict:
        out = {"mixers": sorted(set(model.config.layer_mixers)), "arch": model.config.arch,
               "params": sum(p.numel() for p in model.parameters()), "eval": metrics,
               "retained": retained(metrics, teacher_eval), **extra}
        if context:
            key = json.dumps(model.config.to_dict(), sort_keys=True)
            if key not in costs:
                costs[key] = decode_cost(model, context)
            out["decode"] = costs[key]
        return out

    report = {
        "task": getattr(task, "name", "?"), "metric": metric, "context": context,
        "distill": {k: v for k, v in cfg.to_dict().items() if k != "train"}, "train": tc.to_dict(),
        "teacher": row(teacher, teacher_eval, {}),
        "distilled": row(student, result["eval"], {
            "seconds": result["seconds"], "history": result["history"],
            "transfer": None if moved is None else {**moved.to_dict(),
                                                    "fraction": moved.fraction_transferred(student)}}),
    }
    if scratch_result is not None:
        report["scratch"] = row(twin, scratch_result["eval"], {
            "seconds": scratch_result["seconds"],
            "history": [{"step": h["step"], "loss": h["loss"]} for h in scratch_result["history"]]})
    d, t = report["distilled"], report["teacher"]
    report["headline"] = {
        "retained": d["retained"],
        "scratch_retained": report["scratch"]["retained"] if "scratch" in report else None,
        "distilled_better_than_scratch": better(d["eval"], report["scratch"]["eval"]) if "scratch" in report
        else None,
        "within_10_percent": None if metric != "bits_per_byte" else
        d["eval"]["bits_per_byte"] <= 1.1 * t["eval"]["bits_per_byte"],
    }
    return Comparison(report, student, twin)
