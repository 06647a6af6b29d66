"""The lab report: every number comes from results.json, so `write_report(json.load(...), out)` rebuilds it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def quality_plot(cells: list[dict], path: Path) -> None:
    ok = [c for c in cells if "error" not in c]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = [c["mixer"] for c in ok]
    ax1.barh(names, [c["eval"]["accuracy"] for c in ok], color="tab:blue")
    ax1.set_xlim(0, 1)
    ax1.set_xlabel("accuracy at query positions")
    ax1.invert_yaxis()
    for c in ok:
        steps, losses = zip(*c["loss_curve"])
        ax2.plot(steps, losses, label=c["mixer"])
    ax2.set_xlabel("step")
    ax2.set_ylabel("training loss")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    meta, q = results["meta"], results["quality"]
    m = meta["machine"]
    task = ", ".join(f"{k}={v}" for k, v in q["task"].items())
    lines = [
        f"# seqlab lab report: preset `{meta['preset']}`",
        "",
        f"Machine: {m['processor']}, {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), torch {m['torch']}, "
        f"Python {m['python']}. Seed {meta['seed']}. Started {meta['started']}, took {meta['seconds']:.0f} s.",
        "",
        "## Quality",
        "",
        f"Task: {task}. Every model trained {q['train']['steps']} steps of batch {q['train']['batch_size']}"
        + (f", at about {q['target_params']:,} parameters each." if q["target_params"] else "."),
        f"State bytes: the model's KV cache or recurrent state after {q['state_context']:,} tokens (batch 1).",
        "",
        "| mixer | params | d_model | accuracy | seq. accuracy | eval loss | train tokens/s | state bytes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in q["cells"]:
        if "error" in c:
            lines.append(f"| {c['mixer']} | failed: {c['error']} | | | | | | |")
            continue
        e = c["eval"]
        lines.append(
            f"| {c['mixer']} | {c['params']:,} | {c['d_model']} | {e['accuracy']:.3f} | {e['seq_accuracy']:.3f} | "
            f"{e['loss']:.3f} | {c['train_tokens_per_s']:,.0f} | {_fmt_bytes(c['state_bytes'])} |"
        )
    if any("error" not in c for c in q["cells"]):
        quality_plot(q["cells"], out / "plots" / "quality.png")
        lines += ["", "![accuracy and training loss per mixer](plots/quality.png)", "",
                  "Left: accuracy at the query positions after training; right: the training loss."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
