"""What a converted student keeps and saves, measured beside its teacher and baselines (`benchmarks/bench_convert.py`
and the lab's distill section use these).

    gap_closed(scratch, student, teacher)      (scratch - student) / (scratch - teacher), in bits per byte
    decode_speed(model, context, steps)        greedy decode tokens/s and state bytes after `context` tokens
    long_bits_per_byte(model, task, ...)       bits per byte before and after a position (past a RoPE context)
    continuations(model, prompts, n)           greedy continuations of text prompts
    scratch_baseline(student, task, p, flops)  the student's architecture from scratch at a matched FLOP budget
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seqlab.config import TrainConfig
from seqlab.convert import slice_bits_per_byte, training_flops, with_seq_len
from seqlab.generate import generate
from seqlab.infer import reserve
from seqlab.infer.plan import time_decode
from seqlab.models import ModelState, build_model
from seqlab.models.attention import KVCache
from seqlab.train import cross_entropy, fit, task_batches


def gap_closed(scratch: float | None, student: float, teacher: float) -> float | None:
    """(scratch - student) / (scratch - teacher): 1 = as good as the teacher, 0 = no better than scratch."""
    if scratch is None or not math.isfinite(scratch) or scratch == teacher:
        return None
    return (scratch - student) / (scratch - teacher)


@torch.inference_mode()
def decode_speed(model, context: int, steps: int, warmup: int = 2, seed: int = 0) -> dict:
    """Greedy decode steps (batch 1) after `context` tokens: attention caches hold random keys and values (the
    cost of attending does not depend on them), recurrent states come from an 8-token prompt (fixed size)."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    logits, state = model(torch.randint(17, model.config.vocab_size, (1, 8), generator=gen).to(device))
    layers = []
    for block, s in zip(model.blocks, state.layers):
        if isinstance(s, KVCache):
            m = block.mixer
            n = context if m.window is None else min(context, m.window)
            k = torch.randn(1, m.kv_heads, n, m.head_dim, generator=gen).to(device)
            s = KVCache(k, torch.randn(1, m.kv_heads, n, m.head_dim, generator=gen).to(device), context)
        layers.append(s)
    state = reserve(model, ModelState(tuple(layers), context), warmup + steps)
    state_bytes = state.nbytes
    timer, _, _ = time_decode(model, logits, state, steps, warmup)
    return {"context": context, "state_bytes": state_bytes, "tokens_per_s": 1 / timer.median_wall,
            "ms_per_token": 1e3 * timer.median_wall, "cpu_ms_per_token": 1e3 * timer.median_cpu, "steps": steps}


@torch.inference_mode()
def long_bits_per_byte(model, task, total: int, boundary: int, chunk: int) -> dict:
    """Bits per byte of the first `total` tokens of the split (its files concatenated), fed `chunk` tokens at a time
    with the state carried, before and after position `boundary`."""
    data, nbytes = torch.from_numpy(task.data[:total + 1]), torch.from_numpy(task.nbytes[1:total + 1])
    device = next(model.parameters()).device
    nats, state = [], None
    for start in range(0, total, chunk):
        ids = data[start:min(start + chunk, total) + 1]
        logits, state = model(ids[None, :-1].to(device), state)
        nats.append(F.cross_entropy(logits[0].float(), ids[1:].to(device), reduction="none").cpu())
    nats = torch.cat(nats)
    out = {"tokens": total, "boundary": boundary, "chunk": chunk}
    for name, sl in (("before", slice(0, boundary)), ("after", slice(boundary, total))):
        out[f"bits_per_byte_{name}"] = float(nats[sl].sum() / nbytes[sl].sum() / math.log(2))
        out[f"bytes_{name}"] = int(nbytes[sl].sum())
    return out


@torch.inference_mode()
def continuations(model, prompts: tuple[str, ...], new_tokens: int) -> list[dict]:
    tok = model.tokenizer
    rows = []
    for text in prompts:
        ids = tok.encode(text)
        out = generate(model, ids, new_tokens, temperature=0.0, stop_at_eos=False)[0].tolist()
        rows.append({"prompt": text, "continuation": tok.decode(out[len(ids):])})
    return rows


def scratch_baseline(student, task, p: dict, flops: float, eval_task, progress: bool) -> dict:
    """The student's architecture from a random init, cross-entropy for the steps that match `flops`."""
    per_step = training_flops(student, student, "scratch", p["seq_len"]) * p["batch"] * p["seq_len"]
    steps = max(1, round(flops / per_step))
    cfg = TrainConfig(steps=steps, batch_size=p["batch"], lr=p["lr_scratch"], warmup_steps=max(1, steps // 10),
                      log_every=1, eval_batches=1, checkpoint_every=0, device=p["device"], precision=p["precision"])
    model = build_model(student.config, seed=0)
    model.tokenizer = student.tokenizer
    result = fit(model, task_batches(with_seq_len(task, p["seq_len"]), cfg), cross_entropy, cfg, progress=progress,
                 desc="scratch", eval_task=eval_task)
    test = slice_bits_per_byte(model, eval_task, p["eval_windows"], p["eval_seq_len"], progress, "eval scratch")
    return {"steps": steps, "flops": per_step * steps, "flops_per_step": per_step, "seconds": result["seconds"],
            "lr": p["lr_scratch"], "history": [{"step": h["step"], "loss": h["loss"]} for h in result["history"]],
            "test": test}
