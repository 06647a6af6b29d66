"""Latent trajectories of a recurrent-depth model: capture, PCA, and a rule-based trajectory classifier.

    cap = capture(model, tokens, steps=32)       # cap.trajectory (S + 1, B, T, D): s_0 .. s_S for every token
    pca = fit_pca(cap.trajectory.flatten(0, 2), k=6)    # one PCA over every step of every token
    z = pca.project(cap.trajectory)              # (S + 1, B, T, 6)
    c = classify(cap.trajectory.flatten(1, 2))   # one label per token: fixed_point, orbit, slider, other

Glossary
    S      steps: core iterations r; a trajectory holds S + 1 states s_0 .. s_S
    N      tokens analysed (batch rows x positions, flattened)
    D      d_model, the latent width
    s_i    the latent after step i, exactly what the coda would read if the loop stopped there (the model's
           `latent_norm` is applied inside each step); s_0 is the initial latent (zeros or noise)
    r_i    relative step size ||s_i - s_{i-1}|| / scale, i = 1 .. S, where scale is the token's mean ||s_i||
           (one number per token, so s_0 = 0 does not blow it up)

The classifier's rules (`Rules` holds the thresholds), tried in this order, first match wins:
    fixed_point  the step size falls below `tol` and stays there: r_i < tol for every i >= c, with at least
                 `hold` such steps at the end. Steps to converge: c - 1, the first step after which the state
                 moves by less than tol per step.
    orbit        the state returns close to an earlier state, far from its last step, with a measurable
                 period: over the tail (the last `tail` share of the steps), the smallest p >= 2 with
                 mean ||s_i - s_{i-p}|| < orbit_ratio * mean ||s_i - s_{i-1}||, searched up to half the tail
                 (so the loop is seen at least twice). p is the period.
    slider       successive steps keep one direction and do not vanish: over the tail, the mean cosine between
                 successive differences is >= slide_cos, the mean step is >= tol, and the steps of the tail's
                 second half are on average >= slide_keep times those of its first half (a slow contraction
                 along a line fails this).
    other        none of the above (e.g. noise, or a contraction that has not settled within S steps).
A rotation too slow to close within the tail is a slider by these rules: its period is not measurable there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from seqlab.errors import InputError

LABELS = ("fixed_point", "orbit", "slider", "other")


# ---------------------------------------------------------------------------------------------------------------
# capture


@dataclass(frozen=True)
class Capture:
    """What `capture` returns: trajectory (S + 1, B, T, D) float32, logits after S steps (B, T, V)."""

    trajectory: torch.Tensor
    logits: torch.Tensor


def is_recurrent_depth(model: torch.nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "arch", None) == "recurrent_depth" and hasattr(model, "think")


def check_recurrent_depth(model: torch.nn.Module, name: str = "the model") -> None:
    """InputError unless `model` is a recurrent-depth model (the only kind with latent steps to capture)."""
    if is_recurrent_depth(model):
        return
    cfg = getattr(model, "config", None)
    what = f"arch {cfg.arch!r}, mixer {cfg.mixer!r}" if cfg is not None else type(model).__name__
    raise InputError(f"{name} is not a recurrent-depth model ({what}): latent trajectories need "
                     "arch 'recurrent_depth', whose core iterates a latent state")


@torch.no_grad()
def capture(model: torch.nn.Module, tokens: torch.Tensor, steps: int, seed: int = 0) -> Capture:
    """Run `model` (recurrent depth) for exactly `steps` core iterations (no adaptive exit) and keep s_0 .. s_S.

    seed: the noise of s_0 when the model draws one (depth.init_scale > 0), so a capture is reproducible.
    """
    check_recurrent_depth(model)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps = {steps!r}: must be an integer >= 1")
    was_training = model.training
    model.eval()
    out = model.think(tokens, steps=steps, exit="none", trajectory=True,
                      generator=torch.Generator(tokens.device).manual_seed(seed))
    model.train(was_training)
    return Capture(out.trajectory.float(), out.logits.float())


# ---------------------------------------------------------------------------------------------------------------
# PCA


@dataclass(frozen=True)
class PCA:
    """A principal component analysis of rows x (N, D): x ~ mean + project(x) @ components.

    components (k, D) orthonormal rows; explained_variance (k,) the variance along each (1/N convention);
    total_variance the sum over all D directions. So the mean squared reconstruction error of the rows it was
    fitted on is exactly total_variance - explained_variance.sum().
    """

    mean: torch.Tensor  # (D,)
    components: torch.Tensor  # (k, D)
    explained_variance: torch.Tensor  # (k,)
    total_variance: float

    @property
    def explained_ratio(self) -> torch.Tensor:
        return self.explained_variance / max(self.total_variance, 1e-300)

    def project(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., k)
        return (x.to(self.mean.dtype) - self.mean) @ self.components.T

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:  # (..., k) -> (..., D)
        return self.mean + z.to(self.mean.dtype) @ self.components


def fit_pca(x: torch.Tensor, k: int) -> PCA:
    """PCA of rows x (N, D) by an SVD of the centred data, in float64; k is capped at min(N, D)."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise InputError(f"PCA needs a (rows, features) matrix with at least 2 rows, got {tuple(x.shape)}")
    x = x.double()
    mean = x.mean(0)
    xc = x - mean
    _, sv, vt = torch.linalg.svd(xc, full_matrices=False)  # sv (min(N, D),), vt (min(N, D), D)
    k = min(k, vt.shape[0])
    variance = sv**2 / x.shape[0]
    return PCA(mean, vt[:k], variance[:k], float(variance.sum()))


# ---------------------------------------------------------------------------------------------------------------
# the trajectory classifier


@dataclass(frozen=True)
class Rules:
    """Thresholds of the classifier; see the module docstring for the rules that read them."""

    tol: float = 1e-2  # relative step size below which a token counts as standing still
    hold: int = 3  # a fixed point needs at least this many still steps at the end
    orbit_ratio: float = 0.25  # return distance / step size below this: the state came back
    slide_cos: float = 0.9  # mean cosine of successive differences at least this: one direction
    slide_keep: float = 0.75  # a slider's later steps are at least this share of its earlier ones
    tail: float = 0.5  # share of the steps (from the end) that the orbit and slider rules read

    def __post_init__(self) -> None:
        for name in ("tol", "orbit_ratio", "slide_keep"):
            if not getattr(self, name) > 0:
                raise InputError(f"classifier rule {name} = {getattr(self, name)!r}: must be > 0")
        if not isinstance(self.hold, int) or self.hold < 1:
            raise InputError(f"classifier rule hold = {self.hold!r}: must be an integer >= 1")
        if not -1 <= self.slide_cos <= 1:
            raise InputError(f"classifier rule slide_cos = {self.slide_cos!r}: must be in [-1, 1]")
        if not 0 < self.tail <= 1:
            raise InputError(f"classifier rule tail = {self.tail!r}: must be in (0, 1]")


@dataclass(frozen=True)
class Classification:
    """Per token (N of them): labels, converge_step (-1 unless fixed_point), period (0 unless orbit), the
    relative step sizes r (S, N), the tail's mean successive cosine (N,), and the relative distance to the final
    state ||s_i - s_S|| / scale, (S + 1, N)."""

    labels: list[str]
    converge_step: torch.Tensor
    period: torch.Tensor
    step_size: torch.Tensor
    cosine: torch.Tensor
    distance_to_final: torch.Tensor

    def shares(self) -> dict[str, float]:
        n = max(len(self.labels), 1)
        return {label: sum(x == label for x in self.labels) / n for label in LABELS}


def classify(traj: torch.Tensor, rules: Rules | None = None) -> Classification:
    """Label each token's trajectory; traj (S + 1, N, D) with S >= 2 steps. Vectorized over tokens."""
    rules = rules or Rules()
    if traj.dim() != 3 or traj.shape[0] < 3:
        raise InputError(f"trajectories must be (steps + 1, tokens, D) with at least 2 steps, got "
                         f"{tuple(traj.shape)}")
    traj = traj.double()
    S, N = traj.shape[0] - 1, traj.shape[1]
    scale = traj.norm(dim=-1).mean(0).clamp_min(1e-12)  # (N,)
    diff = traj[1:] - traj[:-1]  # (S, N, D): d_i = s_i - s_{i-1}
    r = diff.norm(dim=-1) / scale  # (S, N)
    dist_final = (traj - traj[-1]).norm(dim=-1) / scale  # (S + 1, N)

    # fixed point: r_i < tol from step c on; c is one past the last step with r >= tol
    moving = r >= rules.tol  # (S, N)
    idx = torch.arange(1, S + 1)[:, None].expand(S, N)  # step numbers 1 .. S
    last_moving = torch.where(moving, idx, torch.zeros_like(idx)).max(0).values  # (N,), 0 if never moving
    still_at_end = S - last_moving  # steps at the end that stand still
    fixed = still_at_end >= min(rules.hold, S)
    converge = torch.where(fixed, last_moving, torch.full_like(last_moving, -1))  # c - 1 = last moving step

    # the tail: states t0 .. S
    t0 = min(int(S * (1 - rules.tail)), S - 2)
    tail = traj[t0:]  # (L, N, D)
    L = tail.shape[0]
    step = r[t0:].mean(0)  # (N,) mean relative step over the tail (steps t0 + 1 .. S)

    # orbit: the smallest period p in [2, L // 2] whose mean return distance is small against the step
    period = torch.zeros(N, dtype=torch.long)
    for p in range(L // 2, 1, -1):  # descending, so the smallest qualifying p is written last
        ret = (tail[p:] - tail[:-p]).norm(dim=-1).mean(0) / scale  # (N,)
        period = torch.where(ret < rules.orbit_ratio * step, torch.full_like(period, p), period)
    orbit = (period > 0) & (step >= rules.tol)

    # slider: consistent direction, non-vanishing steps
    d_tail = diff[t0:]  # (L - 1, N, D)
    cos = torch.nn.functional.cosine_similarity(d_tail[1:], d_tail[:-1], dim=-1, eps=1e-12).mean(0)  # (N,)
    r_tail = r[t0:]
    half = r_tail.shape[0] // 2
    keeps = r_tail[half:].mean(0) >= rules.slide_keep * r_tail[:half].mean(0)
    slider = (cos >= rules.slide_cos) & (step >= rules.tol) & keeps

    labels = []
    for i in range(N):
        if fixed[i]:
            labels.append("fixed_point")
        elif orbit[i]:
            labels.append("orbit")
        elif slider[i]:
            labels.append("slider")
        else:
            labels.append("other")
    period = torch.where(orbit & ~fixed, period, torch.zeros_like(period))
    return Classification(labels, converge, period, r.float(), cos.float(), dist_final.float())


# ---------------------------------------------------------------------------------------------------------------
# summaries


def spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman rank correlation of two 1-D samples (average ranks for ties); None with < 3 points or no spread."""
    a, b = a.double().flatten(), b.double().flatten()
    if a.numel() < 3:
        return None

    def ranks(x: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(x, stable=True)
        r = torch.empty_like(x)
        r[order] = torch.arange(x.numel(), dtype=x.dtype)
        for v in x.unique():  # average the ranks of tied values
            tied = x == v
            if tied.sum() > 1:
                r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return None if denom == 0 else float((ra * rb).sum().item() / denom)


def summarize(c: Classification, loss: torch.Tensor | None = None, counted: torch.Tensor | None = None) -> dict:
    """Class shares and counts, steps to converge, and (with per-token `loss` (N,) and a `counted` mask) the
    mean loss per class and the rank correlation of converge steps with loss among fixed points."""
    out: dict = {"tokens": len(c.labels), "shares": c.shares(),
                 "counts": {label: sum(x == label for x in c.labels) for label in LABELS}}
    conv = c.converge_step[c.converge_step >= 0].double()
    out["converge_steps"] = None if conv.numel() == 0 else {
        "mean": conv.mean().item(), "median": conv.median().item(), "min": int(conv.min()), "max": int(conv.max())}
    periods = c.period[c.period > 0]
    out["periods"] = {int(p): int((periods == p).sum()) for p in periods.unique()} if periods.numel() else {}
    if loss is not None:
        counted = counted if counted is not None else torch.ones_like(loss, dtype=torch.bool)
        labels = list(c.labels)
        by_class = {}
        for label in LABELS:
            sel = torch.tensor([x == label for x in labels], dtype=torch.bool) & counted
            by_class[label] = loss[sel].mean().item() if sel.any() else None
        out["loss_by_class"] = by_class
        sel = (c.converge_step >= 0) & counted
        out["spearman_converge_loss"] = spearman(c.converge_step[sel], loss[sel])
    return out


def rules_dict(rules: Rules) -> dict:
    return asdict(rules)


# ---------------------------------------------------------------------------------------------------------------
# plots (matplotlib, files only)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_pc_pairs(z: torch.Tensor, names: list[str], path, explained: list[float] | None = None):
    """Trajectories of chosen tokens in PC1-PC2, PC3-PC4, PC5-PC6; z (S + 1, n, k) projected states.

    A circle marks s_0, a star s_S; one colour per token (its name, e.g. "pos 7 'x' (orbit)", in the legend).
    """
    plt = _pyplot()
    pairs = [(i, i + 1) for i in range(0, min(z.shape[-1], 6) - 1, 2)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.6 * len(pairs), 4.3), squeeze=False)
    colors = plt.cm.tab10.colors
    for ax, (a, b) in zip(axes[0], pairs):
        for j, name in enumerate(names):
            c = colors[j % len(colors)]
            x, y = z[:, j, a].tolist(), z[:, j, b].tolist()
            ax.plot(x, y, "-", color=c, lw=1, alpha=0.8, label=name)
            ax.plot(x, y, ".", color=c, ms=3)
            ax.plot(x[0], y[0], "o", color=c, ms=6, mfc="none")
            ax.plot(x[-1], y[-1], "*", color=c, ms=10)
        ev = f" ({explained[a]:.0%}, {explained[b]:.0%} of variance)" if explained else ""
        ax.set_xlabel(f"PC{a + 1}")
        ax.set_ylabel(f"PC{b + 1}")
        ax.set_title(f"PC{a + 1}-PC{b + 1}{ev}", fontsize=9)
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_distance_to_final(dist: torch.Tensor, chosen: list[int], names: list[str], path):
    """||s_i - s_S|| / scale against step i: every token in grey, the chosen ones in colour; log y."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    steps = list(range(dist.shape[0] - 1))  # the final step is 0 by definition: left out of a log plot
    floor = 1e-6
    for i in range(min(dist.shape[1], 400)):
        ax.plot(steps, dist[:-1, i].clamp_min(floor).tolist(), color="0.75", lw=0.5, alpha=0.5)
    for j, (i, name) in enumerate(zip(chosen, names)):
        ax.plot(steps, dist[:-1, i].clamp_min(floor).tolist(), lw=1.5, label=name,
                color=plt.cm.tab10.colors[j % 10])
    ax.set_yscale("log")
    ax.set_xlabel("step i")
    ax.set_ylabel("||s_i - s_final|| / mean ||s||")
    ax.set_title("distance to the final state, per token")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_classes(summary: dict, converge: torch.Tensor, loss: torch.Tensor | None, path):
    """Left: the share of each class; right (with a loss): converge steps against per-token loss (fixed points)."""
    plt = _pyplot()
    has_loss = loss is not None and bool((converge >= 0).any())
    fig, axes = plt.subplots(1, 2 if has_loss else 1, figsize=(10 if has_loss else 5, 3.8), squeeze=False)
    ax = axes[0][0]
    shares = summary["shares"]
    ax.bar(list(shares), list(shares.values()), color=["tab:green", "tab:purple", "tab:orange", "tab:gray"])
    ax.set_ylim(0, 1)
    ax.set_ylabel("share of tokens")
    ax.set_title(f"trajectory classes ({summary['tokens']} tokens)")
    if has_loss:
        ax = axes[0][1]
        sel = converge >= 0
        ax.scatter(converge[sel].tolist(), loss[sel].tolist(), s=6, alpha=0.5)
        ax.set_xlabel("steps to converge (fixed points)")
        ax.set_ylabel("token loss (nats)")
        rho = summary.get("spearman_converge_loss")
        ax.set_title("convergence vs loss" + (f" (Spearman {rho:.2f})" if rho is not None else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------------
# the whole analysis of one batch


def token_name(token: int, byte_level: bool) -> str:
    if byte_level:
        ch = chr(token)
        return repr(ch) if ch.isprintable() else f"0x{token:02x}"
    return str(token)


def analyze(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, steps: int,
            *, rules: Rules | None = None, components: int = 6, chosen: list[int] | None = None,
            plots_dir=None, byte_level: bool = False, seed: int = 0) -> dict:
    """Capture, PCA, classify and summarize the trajectories of every token of one batch (B, T).

    chosen: positions in row 0 to plot (default: the first token of each class, then evenly spaced ones, up to 6).
    plots_dir: where the PNGs go (pcs.png, distance.png, classes.png); None: no plots.
    seed: the noise of s_0, for models that draw one.
    Returns a JSON-ready dict (see `seqlab latents --help` for what each field means).
    """
    rules = rules or Rules()
    if steps < 2:
        raise InputError(f"steps = {steps}: the trajectory classifier needs at least 2 steps")
    cap = capture(model, inputs, steps, seed)
    S, B, T, D = cap.trajectory.shape
    flat = cap.trajectory.reshape(S, B * T, D)  # tokens flattened row-major: index b * T + t
    pca = fit_pca(flat.reshape(-1, D), components)
    z = pca.project(flat)  # (S, N, k)
    recon_mse = ((pca.reconstruct(z) - flat.double()) ** 2).sum(-1).mean().item()
    c = classify(flat, rules)
    V = cap.logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(cap.logits.reshape(B * T, V), targets.reshape(-1).clamp(0, V - 1),
                                             reduction="none")  # (N,); only `counted` entries mean anything
    counted = mask.reshape(-1).bool()
    summary = summarize(c, loss, counted)

    if chosen is None:
        chosen = []
        for label in LABELS:
            first = next((t for t in range(T) if c.labels[t] == label), None)
            if first is not None:
                chosen.append(first)
        for t in torch.linspace(0, T - 1, 6).round().long().tolist():
            if len(chosen) < min(6, T) and t not in chosen:
                chosen.append(t)
        chosen.sort()
    for t in chosen:
        if not 0 <= t < T:
            raise InputError(f"token position {t} is out of range: the sequence has positions 0 .. {T - 1}")
    names = [f"pos {t} {token_name(int(inputs[0, t]), byte_level)} ({c.labels[t]})" for t in chosen]
    plots = {}
    if plots_dir is not None:
        plots_dir = Path(plots_dir)
        plots_dir.mkdir(parents=True, exist_ok=True)
        ratio = pca.explained_ratio.tolist()
        plots["pcs"] = plot_pc_pairs(z[:, chosen].float(), names, plots_dir / "pcs.png", ratio).name
        plots["distance"] = plot_distance_to_final(c.distance_to_final, chosen, names,
                                                   plots_dir / "distance.png").name
        plots["classes"] = plot_classes(summary, c.converge_step, loss, plots_dir / "classes.png").name

    per_token = []
    for i in range(B * T):
        b, t = divmod(i, T)
        per_token.append({
            "row": b, "pos": t, "token": int(inputs[b, t]), "label": c.labels[i],
            "converge_step": int(c.converge_step[i]), "period": int(c.period[i]),
            "final_step_size": float(c.step_size[-1, i]), "loss": float(loss[i]) if counted[i] else None,
        })
    return {
        "steps": steps, "rows": B, "positions": T, "d_model": D,
        "pca": {"components": pca.components.shape[0], "explained_ratio": pca.explained_ratio.tolist(),
                "explained_total": float(pca.explained_ratio.sum()), "total_variance": pca.total_variance,
                "reconstruction_mse": recon_mse,
                "residual_variance": pca.total_variance - float(pca.explained_variance.sum())},
        "rules": rules_dict(rules),
        "summary": summary,
        "mean_loss": float(loss[counted].mean()) if counted.any() else None,
        "chosen": [{"pos": t, "name": n} for t, n in zip(chosen, names)],
        "plots": plots,
        "tokens": per_token,
    }
