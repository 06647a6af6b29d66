"""Convert a pretrained Transformer into a hybrid or recurrent student, layer by layer (Mamba-in-Llama, LoLCATs).

    student, record = seqlab.convert(teacher, "3:1 gated_deltanet:attention")
    seqlab.save(student, "student/", json_files={"convert.json": record})
    result = attention_transfer(teacher, student, corpus_task, TrainConfig(steps=200))     # stage (a)

Plans (`parse_plan`; every form names one mixer per teacher layer):
    "3:1 gated_deltanet:attention"     the ratio form of `seqlab.config.layer_plan` (also "gla", "gla+attention")
    "gated_deltanet every4:attention"  every 4th layer (layers 4, 8, ... counted from 1) attention, the rest
                                       gated_deltanet: the same layers as "3:1 gated_deltanet:attention"
    "attention,gla,gla,attention"      an explicit comma list, one name per layer
Each entry is one of CONVERTIBLE: attention (the teacher's layer kept), sliding_attention (the same weights, a
window of `window` tokens), or a recurrent mixer: gla, gated_deltanet, deltanet, mamba2, mamba.

What each layer takes from the teacher's attention (W_Q, W_K, W_V, W_O; grouped K/V heads repeated for the query
heads of their group, as `seqlab.distill._expand_kv` does, so K and V below have H heads). The student's mixer
sections are sized from the teacher's attention (`student_config`) so that these maps are exact copies:
    attention, sliding_attention: every tensor copied.
    gla (n_heads H, key and value widths H hd): q_proj <- W_Q, k_proj <- W_K, v_proj <- W_V, out_proj <- W_O.
        Left at their init: the forget gate (gk_down, gk_up), the output gate (gate_proj), the per-head norm.
    gated_deltanet, deltanet (n_heads H, head_dim = v_head_dim = hd): q_proj <- W_Q, k_proj <- W_K, v_proj <- W_V,
        out_proj <- W_O; the short conv over [q, k, v] <- the identity filter (x_t passes unchanged). Left at their
        init: beta (b_proj), the output gate (g_proj), the per-head norm, and the decay (a_proj, A_log, dt_bias).
    mamba2 (expand H hd / D, head_dim hd, n_groups H, d_state hd: one B/C group per attention head): the x rows of
        in_proj <- W_V, the B rows <- W_K, the C rows <- W_Q (C plays the query, B the key, x the value:
        y_t = sum_s dt_s exp(A sum dt) (C_t . B_s) x_s is linear attention with a decay), out_proj <- W_O; the
        conv <- the identity filter, its bias zero. Left at their init: the gate rows z and the dt rows of
        in_proj, dt_bias, A_log, D and the norm weight. Needs H hd to be a multiple of d_model.
    mamba: `seqlab.distill`'s map (x branch <- W_V, out_proj <- W_O, B and C rows of x_proj from W_K[:N] and
        W_Q[:N] through the pseudo-inverse of the x branch, identity conv); the rest at Mamba's init.
None of the recurrent mixers rotates q and k (RoPE): that difference, the feature maps (SiLU after the conv, L2 norm
in the delta rule) and the gates are what stage (a) trains. Attention biases (Qwen-style) are not carried to a
recurrent mixer; the record's notes say so. Embeddings, positions, norms, MLPs and the head are copied.

The record (JSON, written beside config.json as convert.json by `seqlab convert`): the plan, and for every
tensor of the student {"status": "copied", "from": <teacher tensor>}, {"status": "mapped", "how": <the map>} or
{"status": "initialized"} (the student's own init), per layer ("layers") and for the rest ("model").

Stage (a), attention transfer (`AttentionTransferLoss`, `attention_transfer`): each replaced layer learns to
reproduce its teacher layer's attention output from the teacher's own input to that attention (the normed hidden
state), mean squared error summed over the layers, every layer from one teacher forward per batch; only the new
mixers train.

Stage (b), end-to-end distillation, is `seqlab.distill.distill` (KL to the teacher's next-token distributions,
optionally plus cross-entropy) on the converted student, training the new mixers only (what stage (a) leaves),
the new mixers and low-rank adapters on the linear layers kept from the teacher (`seqlab.models.lora`, merged into
the weights afterwards), or everything.

The whole recipe, `run_conversion(teacher, plan, task, Recipe(...), out=DIR)`: convert, evaluate the weight
transfer alone, run the stages in order (each on `fit`, with its own checkpoints for resume), evaluate after each,
count each stage's training FLOPs (`training_flops`), and write recipe, metrics and the student (`seqlab convert
--stages a,b`).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from seqlab.checkpoint import save, write_json
from seqlab.config import MIXERS, ModelConfig, Section, TrainConfig, check_types, choice, layer_plan, positive
from seqlab.data import Batch, Metrics, Task
from seqlab.distill import DistillConfig, _attention_weights, distill, read_as_teacher, transfer_weights
from seqlab.errors import InputError
from seqlab.models import ModelState, build_model
from seqlab.models.lora import add_lora, merge_lora
from seqlab.train import fit, task_batches
from seqlab.train.distributed import init_world
from seqlab.train.losses import Loss
from seqlab.train.resume import find_checkpoint
from seqlab.train.trainer import resolve_device

ATTENTION = ("attention", "sliding_attention")
RECURRENT = ("gla", "gated_deltanet", "deltanet", "mamba2", "mamba")
CONVERTIBLE = ATTENTION + RECURRENT
GRAMMAR = ("a layer spec ('gated_deltanet', '3:1 gated_deltanet:attention'), 'MIXER everyN:OTHER' (every Nth layer "
           "OTHER, e.g. 'gated_deltanet every4:attention') or a comma list with one name per layer "
           "('attention,gla,gla,attention')")
EVERY = re.compile(r"^(\w+) every(\d+):(\w+)$")


def parse_plan(plan: str | Sequence[str], n_layers: int) -> tuple[str, ...]:
    """The mixer of each of `n_layers` layers from a plan (see the module docstring); one InputError otherwise."""
    if isinstance(plan, str) and "," in plan:
        names = tuple(name.strip() for name in plan.split(","))
    elif isinstance(plan, str) and EVERY.match(plan.strip()):
        base, n, other = EVERY.match(plan.strip()).groups()
        if int(n) < 1 or int(n) > n_layers:
            raise InputError(f"plan {plan!r}: every{n} needs 1 <= {n} <= n_layers = {n_layers}")
        names = tuple(other if (i + 1) % int(n) == 0 else base for i in range(n_layers))
    elif isinstance(plan, str):
        names = layer_plan(plan, n_layers)  # its InputError names the bad spec
    elif isinstance(plan, (list, tuple)) and all(isinstance(name, str) for name in plan):
        names = tuple(plan)
    else:
        raise InputError(f"plan {plan!r}: expected {GRAMMAR}")
    if len(names) != n_layers:
        raise InputError(f"plan {plan!r} names {len(names)} layers; the teacher has n_layers = {n_layers}: "
                         f"expected {GRAMMAR}")
    for i, name in enumerate(names):
        if name not in CONVERTIBLE:
            known = "a mixer seqlab has, but no map from attention to it" if name in MIXERS else "not a mixer"
            raise InputError(f"plan {plan!r}: layer {i} is {name!r} ({known}); expected one of "
                             f"{', '.join(CONVERTIBLE)}")
    return names


def check_teacher(teacher: nn.Module) -> None:
    """InputError unless `teacher` is a plain language model whose every layer is attention."""
    cfg = getattr(teacher, "config", None)
    if not isinstance(cfg, ModelConfig) or cfg.arch != "lm":
        raise InputError(f"convert needs a Transformer language model (arch 'lm'); got "
                         f"{getattr(cfg, 'arch', type(teacher).__name__)!r}")
    others = sorted(set(cfg.layer_mixers) - {"attention"})
    if others:
        raise InputError(f"convert needs a teacher whose every layer is attention; this one has {others[0]!r} layers")


def student_config(teacher_cfg: ModelConfig, plan: Sequence[str], window: int | None = None) -> ModelConfig:
    """The teacher's config with `plan` as its layers and each recurrent mixer's section sized so that the
    attention weights map onto it as copies (see the module docstring)."""
    a = teacher_cfg.attention
    D, H, hd = teacher_cfg.d_model, a.n_heads, a.head_dim(teacher_cfg.d_model)
    width = H * hd  # the attention's query width: each head's q, k (K repeated) and v
    if "sliding_attention" in plan and window is None:
        raise InputError("the plan has sliding_attention layers: give their window (--window W, tokens)")
    changes: dict[str, Any] = {"layers": tuple(plan), "n_layers": len(plan)}
    if window is not None:
        changes["attention"] = {"window": window}
    if "gla" in plan:
        changes["gla"] = {"n_heads": H, "expand_k": width / D, "expand_v": width / D}
    if {"gated_deltanet", "deltanet"} & set(plan):
        changes["deltanet"] = {"n_heads": H, "n_v_heads": None, "head_dim": hd, "v_head_dim": hd}
    if "mamba2" in plan and width % D == 0:
        changes["mamba2"] = {"expand": width // D, "head_dim": hd, "n_groups": H, "d_state": hd}
    if "mamba" in plan and width > teacher_cfg.mamba.d_inner(D):
        changes["mamba"] = {"expand": -(-width // D)}
    return teacher_cfg.replace(**changes)


def _identity_conv(conv: nn.Conv1d) -> torch.Tensor:
    """A depthwise causal conv's weight (C, 1, k) that passes x_t unchanged (the last tap sees x_t)."""
    w = torch.zeros_like(conv.weight)
    w[:, 0, -1] = 1.0
    return w


def _map_to_deltanet(att: nn.Module, m: nn.Module, sp: str, tp: str, notes: list[str]) -> dict:
    w = _attention_weights(att)
    if (m.q_proj.weight.shape, m.v_proj.weight.shape, m.H, m.Hv) != (w["wq"].shape, w["wv"].shape, att.n_heads,
                                                                     att.n_heads):
        notes.append(f"{sp}: deltanet sizes do not match the attention's: left at its init")
        return {}
    rep = " (kv heads repeated)" if att.kv_heads != att.n_heads else ""
    new = {f"{sp}.{s}.weight": (w[t], f"{tp}.{t}.weight" + (rep if t in ("wk", "wv") else ""))
           for s, t in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"), ("out_proj", "wo"))}
    new[f"{sp}.conv.weight"] = (_identity_conv(m.conv), "identity filter (q, k, v pass the short conv unchanged)")
    if att.wq.bias is not None:
        notes.append(f"{sp}: the teacher's attention biases are not carried over (deltanet projections have none)")
    return new


def _map_to_mamba2(att: nn.Module, m: nn.Module, sp: str, tp: str, notes: list[str]) -> dict:
    w = _attention_weights(att)
    width = w["wq"].shape[0]
    if (m.d_inner, m.G, m.G * m.N, m.P) != (width, att.n_heads, width, att.head_dim):
        notes.append(f"{sp}: mamba2 d_inner {m.d_inner}, {m.G} groups of d_state {m.N} do not match the "
                     f"attention's width {width} in {att.n_heads} heads: left at its init")
        return {}
    in_proj = m.in_proj.weight.detach().clone()  # rows: z (d_inner), x (d_inner), B (G N), C (G N), dt (H)
    x0, b0, c0 = m.d_inner, 2 * m.d_inner, 2 * m.d_inner + width
    in_proj[x0:b0], in_proj[b0:c0], in_proj[c0:c0 + width] = w["wv"], w["wk"], w["wq"]
    rep = ", kv heads repeated" if att.kv_heads != att.n_heads else ""
    new = {f"{sp}.in_proj.weight": (in_proj, f"x rows <- {tp}.wv.weight, B rows <- {tp}.wk.weight, C rows <- "
                                             f"{tp}.wq.weight{rep}; z and dt rows initialized"),
           f"{sp}.out_proj.weight": (w["wo"], f"{tp}.wo.weight"),
           f"{sp}.conv.weight": (_identity_conv(m.conv), "identity filter (x, B, C pass the short conv unchanged)")}
    if m.conv.bias is not None:
        new[f"{sp}.conv.bias"] = (torch.zeros_like(m.conv.bias), "zeros (identity filter)")
    if att.wq.bias is not None or m.in_proj.bias is not None:
        notes.append(f"{sp}: projection biases are not mapped (the teacher's attention biases are not carried over)")
    return new


MAPS: dict[str, Callable[..., dict]] = {"gated_deltanet": _map_to_deltanet, "deltanet": _map_to_deltanet,
                                        "mamba2": _map_to_mamba2}


@torch.no_grad()
def convert(teacher: nn.Module, plan: str | Sequence[str], *, window: int | None = None,
            seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """A student built from `teacher` (a Transformer language model) with one mixer per layer by `plan`, its
    weights copied or mapped from the teacher's as the module docstring says (the rest from the student's own
    init, drawn with `seed`), and the record of what was done (JSON-ready). The student shares the teacher's
    tokenizer and is in eval mode on the CPU."""
    check_teacher(teacher)
    names = parse_plan(plan, teacher.config.n_layers)
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise InputError(f"window = {window!r}: expected a whole number of tokens >= 1")
    cfg = student_config(teacher.config, names, window)
    student = build_model(cfg, seed=seed)
    student.tokenizer = getattr(teacher, "tokenizer", None)
    moved = transfer_weights(teacher, student, list(range(len(names))))  # copies; attention -> gla, mamba maps
    notes = [n for n in moved.notes if not any(f"blocks.{i}.mixer:" in n and names[i] in MAPS
                                               for i in range(len(names)))]  # the "no map" notes MAPS answers
    sd = student.state_dict()
    for i, name in enumerate(names):
        if name in MAPS:
            prefix = f"blocks.{i}.mixer"  # the same in teacher and student: layer i becomes layer i
            for key, (value, how) in MAPS[name](teacher.blocks[i].mixer, student.blocks[i].mixer, prefix, prefix,
                                                notes).items():
                sd[key].copy_(value)
                moved.mapped[key] = how
                moved.fresh.remove(key)
    record = {"plan": list(names), "plan_spec": plan if isinstance(plan, str) else list(plan), "window": window,
              "seed": seed, "teacher": {"d_model": teacher.config.d_model, "n_layers": teacher.config.n_layers,
                                        "n_heads": teacher.config.attention.n_heads,
                                        "kv_heads": teacher.config.attention.kv_heads,
                                        "source": getattr(teacher, "gguf_source", {}).get("source")},
              "layers": [{"layer": i, "mixer": name, "tensors": {}} for i, name in enumerate(names)],
              "model": {}, "notes": notes,
              "fraction_transferred": moved.fraction_transferred(student)}
    for key in sd:
        status = ({"status": "copied", "from": moved.copied[key]} if key in moved.copied else
                  {"status": "mapped", "how": moved.mapped[key]} if key in moved.mapped else
                  {"status": "initialized"})
        if key.startswith("blocks."):
            record["layers"][int(key.split(".")[1])]["tensors"][key] = status
        else:
            record["model"][key] = status
    return student.eval(), record


# ---------------------------------------------------------------------------------------------------------------
# stage (a): attention transfer


def replaced_layers(student: nn.Module) -> list[int]:
    """The student's layers whose mixer is recurrent (what stage (a) trains)."""
    return [i for i, block in enumerate(student.blocks) if block.mixer_name in RECURRENT]


def set_trainable(student: nn.Module, which: str) -> None:
    """Choose what the next stage trains (`fit`'s optimizer takes only parameters with requires_grad): "mixers",
    the replaced layers' mixers, everything else frozen (stage (a), and stage (b) on the new mixers); or "all"."""
    if which not in ("mixers", "all"):
        raise InputError(f"trainable = {which!r}: expected 'mixers' (the replaced layers' mixers) or 'all'")
    student.requires_grad_(which == "all")
    for i in replaced_layers(student):
        student.blocks[i].mixer.requires_grad_(True)


def teacher_attention_io(teacher: nn.Module, tokens: torch.Tensor,
                         layers: Sequence[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (the input to its attention (B, T, D), i.e. the normed hidden state, and the attention's output
    (B, T, D))} from one teacher forward, caught by forward hooks on the mixers. The forward stops after the last
    of `layers`: the blocks after it and the head (a fifth of SmolLM2's forward) would change nothing caught."""
    caught: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [teacher.blocks[i].mixer.register_forward_hook(
        lambda _m, args, out, i=i: caught.__setitem__(i, (args[0], out[0]))) for i in layers]
    try:
        teacher.check_tokens(tokens)
        x = teacher.hidden(tokens)  # (B, T, D): the language model's forward, up to block max(layers)
        if teacher.pos_embed is not None:
            x = x + teacher.positions(0, tokens.shape[1])
        for block in teacher.blocks[:max(layers) + 1]:
            x, _ = block(x)
    finally:
        for hook in hooks:
            hook.remove()
    return caught


class AttentionTransferLoss(nn.Module):
    """Stage (a) as a `seqlab.train.fit` loss: for each replaced layer i of the student, the mean over features
    of (mixer_i(x_i) - attention_i(x_i))^2, x_i the teacher's input to its attention i, summed over the masked
    positions and over the layers; each layer's term is also a metric (`mse_<i>`).

    Constructing it freezes the student except the replaced layers' mixers (`requires_grad_`), so `fit`'s
    optimizer (which takes only trainable parameters) trains just those. The mixers are also registered here, as
    this loss's parameters: `fit` averages a loss's own gradients across processes itself, and the student's
    forward (where DistributedDataParallel would) never runs in this stage. The teacher is frozen and kept out of
    this module's parameters, state_dict, .to() and .train(); it must be on the training device.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module):
        super().__init__()
        check_teacher(teacher)
        if len(getattr(student, "blocks", ())) != len(teacher.blocks):
            raise InputError(f"the student has {len(student.blocks)} layers, the teacher {len(teacher.blocks)}: "
                             "attention transfer pairs layer i with layer i (build the student with convert)")
        self.layers = replaced_layers(student)
        if not self.layers:
            raise InputError("the student has no recurrent layer: attention transfer has nothing to train")
        object.__setattr__(self, "teacher", teacher.eval().requires_grad_(False))  # not a submodule: see above
        set_trainable(student, "mixers")
        self.mixers = nn.ModuleList(student.blocks[i].mixer for i in self.layers)

    def forward(self, model: nn.Module, batch: Batch, state: ModelState | None) -> Loss:
        with torch.no_grad():
            caught = teacher_attention_io(self.teacher, batch.inputs, self.layers)
        mask = batch.mask
        terms = {}
        for i, mixer in zip(self.layers, self.mixers):
            x, target = caught[i]
            y, _ = mixer(x)
            err = ((y.float() - target.float()) ** 2).mean(-1)  # (B, T)
            terms[f"mse_{i}"] = (err * mask).sum()
        total = torch.stack(list(terms.values())).sum()
        return Loss(total, None, {k: v.detach() for k, v in terms.items()})


def attention_transfer(teacher: nn.Module, student: nn.Module, task: Task, cfg: TrainConfig, *,
                       eval_task: Task | None = None, progress: bool = True,
                       log: Callable[[dict], None] | None = None, checkpoint_dir: str | Path | None = None,
                       resume_from: str | Path | None = None) -> dict[str, Any]:
    """Stage (a): train the student's replaced mixers on `AttentionTransferLoss` for cfg.steps steps with
    `seqlab.train.fit` (its batches, schedule, accumulation, non-finite guard, checkpoints and resume). Text tasks
    are read through the teacher's tokenizer. Leaves the student frozen except those mixers. Returns fit's result
    (the student's evaluation, the history with each layer's `mse_<i>`)."""
    loss = AttentionTransferLoss(teacher, student)
    task, eval_task = read_as_teacher(teacher, task), eval_task and read_as_teacher(teacher, eval_task)
    teacher.to(resolve_device(cfg.device, init_world(cfg.device)))
    return fit(student, task_batches(task, cfg), loss, cfg, progress=progress, desc="attention transfer", log=log,
               eval_task=eval_task, checkpoint_dir=checkpoint_dir, resume_from=resume_from)


# ---------------------------------------------------------------------------------------------------------------
# the stage runner: a recipe, stages (a) and (b) on fit, evaluation and compute


STAGES = ("a", "b")
TRAINS = ("mixers", "lora", "all")


def _stage_train(steps: int, lr: float, batch_size: int = 4) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 10), log_every=1,
                       eval_batches=1, checkpoint_every=50)


@dataclass(frozen=True)
class Recipe(Section):
    """How `run_conversion` trains a converted student. Stage (a) is attention transfer (`attention_transfer`),
    stage (b) end-to-end distillation (`seqlab.distill.distill`: temperature^2 KL(teacher || student) at
    `temperature`, plus `ce_weight` x cross-entropy on the data). Each stage has its own optimization (`a`, `b`:
    steps, lr, batch_size, grad_accum, precision, device, ...) and window length (`seq_len_a`, `seq_len_b`, tokens
    of the teacher's tokenizer). `train` says what stage (b) trains besides the new mixers: nothing ("mixers"),
    rank-`lora_rank` adapters (scale lora_alpha / rank) on every linear layer copied from the teacher, merged into
    the weights at the end ("lora"), or every parameter ("all"). Evaluation: bits per byte on the first
    `eval_windows` windows of `eval_seq_len` tokens of the held-out split, each from an empty state (a fixed slice,
    the same for every model)."""

    stages: tuple[str, ...] = ("a", "b")
    a: TrainConfig = field(default_factory=lambda: _stage_train(40, 1e-3))
    b: TrainConfig = field(default_factory=lambda: _stage_train(40, 3e-4))
    seq_len_a: int = 128
    seq_len_b: int = 128
    temperature: float = 1.0
    ce_weight: float = 0.0
    train: str = "mixers"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    window: int | None = None  # sliding_attention layers' window (tokens)
    seed: int = 0  # the student's own init (gates, decays) and the adapters' A
    eval_windows: int = 4
    eval_seq_len: int = 512

    def __post_init__(self) -> None:
        check_types(self, "recipe.")
        positive(self, "recipe.", "seq_len_a", "seq_len_b", "temperature", "lora_rank", "lora_alpha", "window",
                 "eval_windows", "eval_seq_len")
        choice("recipe.", "train", self.train, TRAINS)
        if self.ce_weight < 0:
            raise InputError(f"config field 'recipe.ce_weight' = {self.ce_weight!r}: must be >= 0")
        for i, stage in enumerate(self.stages):
            choice("recipe.", f"stages[{i}]", stage, STAGES)
        if len(set(self.stages)) != len(self.stages) or list(self.stages) != sorted(self.stages):
            raise InputError(f"config field 'recipe.stages' = {list(self.stages)}: expected 'a', 'b' or 'a', 'b' "
                             "in that order, each once")


RECIPES = {  # `seqlab convert --preset`: cpu sized for a 2-core machine (see the command's --help), gpu larger
    "cpu": Recipe(a=_stage_train(60, 1e-3), b=_stage_train(120, 3e-4), seq_len_a=128, seq_len_b=128),
    "gpu": Recipe(a=_stage_train(500, 1e-3, 16).replace(device="auto", precision="bf16", checkpoint_every=200),
                  b=_stage_train(2000, 1e-4, 16).replace(device="auto", precision="bf16", checkpoint_every=200),
                  seq_len_a=1024, seq_len_b=1024, eval_windows=64, eval_seq_len=1024),
}


def kept_linears(student: nn.Module) -> list[str]:
    """The linear layers the student took from the teacher unchanged: every MLP, and the attention layers' projections
    (what `train="lora"` adapts; the replaced mixers train in full)."""
    replaced = set(replaced_layers(student))
    return [name for name, m in student.named_modules()
            if type(m) is nn.Linear and name.startswith("blocks.")
            and (".mlp." in name or (".mixer." in name and int(name.split(".")[1]) not in replaced))]


def prepare_stage_b(student: nn.Module, recipe: Recipe) -> list[str]:
    """Set what stage (b) trains (see `Recipe.train`); returns the names of the adapters added (none unless lora)."""
    if recipe.train == "mixers" and not replaced_layers(student):
        raise InputError("stage (b) with train = 'mixers': the student has no recurrent layer, so nothing would "
                         "train; choose 'lora' or 'all'")
    if recipe.train == "lora":
        set_trainable(student, "mixers")
        return add_lora(student, kept_linears(student), recipe.lora_rank, recipe.lora_alpha, seed=recipe.seed)
    set_trainable(student, recipe.train)
    return []


def with_seq_len(task: Task, seq_len: int) -> Task:
    """A shallow copy of a corpus task reading windows of `seq_len` tokens (the data are shared)."""
    out = copy.copy(task)
    out.seq_len = seq_len
    return out


@torch.no_grad()
def slice_bits_per_byte(model: nn.Module, task: Task, windows: int, seq_len: int, progress: bool = False,
                        desc: str = "eval") -> dict[str, Any]:
    """Bits per byte (total nats / total UTF-8 bytes / ln 2) of the first `windows` consecutive windows of
    `seq_len` tokens of a corpus task's split, each read from an empty state: a fixed slice, the same text for every
    model with the same tokenizer. Also its tokens and bytes."""
    stream = task.stream(1, seq_len)
    if windows > len(stream):
        raise InputError(f"evaluation slice of {windows} windows of {seq_len} tokens: the split holds only "
                         f"{len(stream)}")
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    metrics = Metrics()
    for i in tqdm(range(windows), desc=desc, disable=not progress, leave=False):
        batch = stream.segment(i)
        metrics.update(model(batch.inputs.to(device))[0].float(), batch)
    model.train(was_training)
    out = metrics.compute()
    return {"bits_per_byte": out.get("bits_per_byte"), "loss": out["loss"], "tokens": windows * seq_len,
            "bytes": metrics.text_bytes, "windows": windows, "window_tokens": seq_len}


def _params(module: nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def _block_flops(block: nn.Module, seq_len: int) -> float:
    """Forward FLOPs per token of one block: 2 per weight (a multiply and an add), plus, for attention, the scores and
    the weighted sum, 2 x 2 x width per key seen, averaged over the window's positions (min(t + 1, W) keys at t)."""
    flops = 2.0 * _params(block)
    m = block.mixer
    if block.mixer_name in ATTENTION:
        w = m.window or seq_len
        keys = sum(min(t + 1, w) for t in range(seq_len)) / seq_len
        flops += 4.0 * keys * m.n_heads * m.head_dim
    return flops


def forward_flops(model: nn.Module, seq_len: int) -> float:
    """Forward FLOPs per token of a language model at windows of `seq_len`: its blocks and the head (2 per weight;
    the embedding is a lookup). Recurrent scans' own arithmetic and the norms are not counted."""
    head = model.embed.weight if model.config.tie_embeddings else model.head.weight
    return sum(_block_flops(b, seq_len) for b in model.blocks) + 2.0 * head.numel()


def training_flops(teacher: nn.Module, student: nn.Module, stage: str, seq_len: int) -> float:
    """Training FLOPs per token of one step, by the usual count (backward = 2 x forward: one pass for the
    activations' gradients, one for the weights'):
        scratch  3 F_s                                   (F: forward FLOPs per token, `forward_flops`)
        a        teacher blocks up to the last replaced layer (forward) + 3 x 2 x the replaced mixers' weights
        b        F_t + F_s (forward) + F_s (activation gradients) + 2 x the trainable weights (their gradients)
    The teacher's own pretraining is not counted: it is someone else's sunk cost."""
    if stage == "scratch":
        return 3.0 * forward_flops(student, seq_len)
    if stage == "a":
        layers = replaced_layers(student)
        prefix = sum(_block_flops(b, seq_len) for b in teacher.blocks[:max(layers) + 1])
        return prefix + 6.0 * sum(_params(student.blocks[i].mixer) for i in layers)
    if stage == "b":
        return forward_flops(teacher, seq_len) + 2.0 * forward_flops(student, seq_len) + 2.0 * _params(student, True)
    raise InputError(f"stage {stage!r}: expected 'a', 'b' or 'scratch'")


def _prepare_out(out: Path, recipe: Recipe, plan: Any, resume: bool) -> dict[str, Any]:
    """Check and start the run folder; returns the metrics already written there (on resume)."""
    resolved = {"plan": plan if isinstance(plan, str) else list(plan), "recipe": recipe.to_dict()}
    if resume:
        if not (out / "recipe.json").is_file():
            raise InputError(f"cannot resume: '{out}' holds no conversion run (no recipe.json); run without --resume")
        if json.loads((out / "recipe.json").read_text()) != json.loads(json.dumps(resolved)):
            raise InputError(f"cannot resume '{out}': its plan or recipe differs from this one (see its recipe.json)"
                             "; resume with the same flags, or choose another --out")
        path = out / "metrics.json"
        return json.loads(path.read_text()) if path.is_file() else {}
    if out.exists() and any(out.iterdir()):
        raise InputError(f"output folder '{out}' is not empty; pass --resume to continue the conversion run in it, "
                         "or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"cannot create output folder '{out}': {e.strerror}") from None
    write_json(out / "recipe.json", resolved)
    return {}


def run_conversion(teacher: nn.Module, plan: str | Sequence[str], task: Task, recipe: Recipe, *,
                   eval_task: Task | None = None, out: str | Path | None = None, resume: bool = False,
                   progress: bool = True, log: Callable[[dict], None] | None = None
                   ) -> tuple[nn.Module, dict[str, Any]]:
    """Convert `teacher` by `plan` and train the student through `recipe.stages`, each on `seqlab.train.fit`
    (batches, schedule, accumulation, non-finite guard, checkpoints and resume). `task` is the training text (read
    through the teacher's tokenizer), `eval_task` the held-out text (default `task`).

    Returns the student (adapters merged) and the metrics: the record of the conversion, the evaluation slice's
    bits per byte after the weight transfer alone ("transfer") and after each stage ("stages": history, fit's
    evaluation, the slice's bits per byte, seconds, trainable parameters, training FLOPs as `training_flops` counts
    them). With `out`, writes recipe.json (the plan and resolved recipe), metrics.json (after every stage),
    stage_<s>/checkpoint (what `resume=True` continues from) and student/ (the final checkpoint, plain
    safetensors, with convert.json and recipe.json beside config.json)."""
    student, record = convert(teacher, plan, window=recipe.window, seed=recipe.seed)
    task = read_as_teacher(teacher, task)
    eval_task = read_as_teacher(teacher, eval_task or task)
    out = Path(out) if out is not None else None
    before = _prepare_out(out, recipe, plan, resume) if out is not None else {}
    evaluate_slice = lambda model, desc: slice_bits_per_byte(  # noqa: E731
        model, eval_task, recipe.eval_windows, recipe.eval_seq_len, progress, desc)
    metrics: dict[str, Any] = {"plan": record["plan"], "recipe": recipe.to_dict(), "convert": record,
                               "transfer": before.get("transfer") or {"test": evaluate_slice(student, "eval transfer")},
                               "stages": {}}
    for stage in recipe.stages:
        cfg, seq_len = (recipe.a, recipe.seq_len_a) if stage == "a" else (recipe.b, recipe.seq_len_b)
        stage_task, stage_eval = with_seq_len(task, seq_len), with_seq_len(eval_task, seq_len)  # fit's own eval
        folder = out / f"stage_{stage}" if out is not None else None
        resume_from = None
        if resume and folder is not None and folder.is_dir():
            resume_from = find_checkpoint(folder)
        adapters: list[str] = []
        if stage == "a":
            result = attention_transfer(teacher, student, stage_task, cfg, eval_task=stage_eval, progress=progress,
                                        log=log, checkpoint_dir=folder, resume_from=resume_from)
        else:
            adapters = prepare_stage_b(student, recipe)
            dcfg = DistillConfig(temperature=recipe.temperature, ce_weight=recipe.ce_weight, train=cfg)
            result = distill(teacher, student, stage_task, dcfg, eval_task=stage_eval, progress=progress, log=log,
                             checkpoint_dir=folder, resume_from=resume_from)
        trainable = _params(student, trainable=True)
        flops = training_flops(teacher, student, stage, seq_len)
        merge_lora(student)
        done = before.get("stages", {}).get(stage, {})
        metrics["stages"][stage] = {
            "history": result["history"] or done.get("history", []), "eval": result["eval"],
            "steps": result["steps"], "skipped_steps": result["skipped_steps"],
            "seconds": done.get("seconds", result["seconds"]), "tokens": cfg.steps * cfg.batch_size * seq_len,
            "trainable_params": trainable, "lora_adapters": len(adapters), "flops_per_token": flops,
            "flops": flops * cfg.steps * cfg.batch_size * seq_len,
            "test": evaluate_slice(student, f"eval after stage {stage}")}
        if out is not None:
            write_json(out / "metrics.json", metrics)
    student.requires_grad_(True)
    if out is not None:
        save(student, out / "student", json_files={"convert.json": record, "recipe.json": recipe.to_dict()})
    return student.eval(), metrics
