"""Latent trajectories of a recurrent-depth model: capture, PCA, and a rule-based trajectory classifier.

    cap = capture(model, tokens, steps=32)       # cap.trajectory (S + 1, B, T, D): s_0 .. s_S for every token
    pca = fit_pca(cap.trajectory.flatten(0, 2), k=6)    # one PCA over every step of every token
    z = pca.project(cap.trajectory)              # (S + 1, B, T, 6)
    c = classify(cap.trajectory.flatten(1, 2))   # one label per token: fixed_point, orbit, slider, other, undecided

Glossary
    S      steps: core iterations r; a trajectory holds S + 1 states s_0 .. s_S
    N      tokens analysed (batch rows x positions, flattened)
    D      d_model, the latent width
    s_i    the latent after step i, exactly what the coda would read if the loop stopped there (the model's
           `latent_norm` is applied inside each step); s_0 is the initial latent (zeros or noise)
    E      the trajectory's excursion: its largest distance from the tail's centre over s_1 .. s_S (s_0 may be zeros)
    R(k)   the lag profile over the orbit tail: mean ||s_i - s_{i-k}||

Every rule compares lengths of the same trajectory (scale-free: multiplying a trajectory by any factor keeps its
label), and reads displacements over many steps rather than single steps (noise averages out). The tail is the
last `tail` share of the steps; the orbit rule reads at least 2 * max_period + 1 steps. First match wins:
    orbit        the smallest p in 2 .. max_period with R(p) < orbit_ratio * max_{k < p} R(k) and R(2p) too (the
                 return seen twice). p is the period.
    slider       the tail's first half and second half displace the state the same way (cosine >= slide_cos), the
                 second about as far as the first (>= slide_keep times: a contraction slows down), and the tail's
                 net displacement exceeds 2 tol E.
    fixed_point  the tail's RMS distance from its centre is <= tol E. Steps to converge: one past the last state
                 farther than 2 tol E from that centre.
    undecided    more steps would tell: fewer than `hold` steps in the tail, a return seen only once (a period
                 longer than half the orbit tail), or a direction kept while slowing down (a contraction that has
                 not settled).
    other        none of the above (noise larger than the motion, or motion with no structure).
A rotation too slow to close within the tail, or a contraction slower than slide_keep per half tail, reads as a
slider. One absolute floor: motion smaller than `floor` (1e-5) of the state's norm is float32 rounding, never an
orbit or a slider (a converged latent jittering by one ulp would otherwise show a period-2 "orbit").
The generators `synthetic` (contraction, drift, rotation of any period, with noise) are what the tests and
benchmarks/bench_classifier.py tune and check the rules on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from seqlab.errors import InputError

LABELS = ("fixed_point", "orbit", "slider", "other", "undecided")


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
    """Thresholds of the classifier; see the module docstring for the rules that read them. Every threshold is a
    ratio of two lengths of the same trajectory, so the rules do not depend on the state's scale."""

    tol: float = 0.1  # fixed point: the tail's spread is at most this share of the trajectory's excursion
    hold: int = 8  # fewer steps than this in the tail: undecided (too short to tell anything)
    orbit_ratio: float = 0.25  # orbit: the return distance at the period / the largest distance at shorter lags
    slide_cos: float = 0.9  # slider: cosine between the tail's first-half and second-half displacements
    slide_keep: float = 0.75  # slider: the second half moves at least this share of the first (no decay)
    tail: float = 0.5  # share of the steps (from the end) the rules read; at least 2 * max_period + 1 steps
    max_period: int = 16  # the longest period looked for
    floor: float = 1e-5  # motion below this share of the state's norm is float32 rounding, not an orbit or a slide

    def __post_init__(self) -> None:
        for name in ("tol", "orbit_ratio", "slide_keep", "floor"):
            if not getattr(self, name) > 0:
                raise InputError(f"classifier rule {name} = {getattr(self, name)!r}: must be > 0")
        for name in ("hold", "max_period"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (2 if name == "max_period" else 1):
                raise InputError(f"classifier rule {name} = {getattr(self, name)!r}: must be an integer >= "
                                 f"{2 if name == 'max_period' else 1}")
        if not -1 <= self.slide_cos <= 1:
            raise InputError(f"classifier rule slide_cos = {self.slide_cos!r}: must be in [-1, 1]")
        if not 0 < self.tail <= 1:
            raise InputError(f"classifier rule tail = {self.tail!r}: must be in (0, 1]")

    def tail_steps(self, steps: int) -> int:
        """Steps in the tail of a trajectory of `steps` steps: the `tail` share, at least 2 * max_period + 1
        (a period seen twice), at most all of them."""
        return min(steps, max(math.ceil(self.tail * steps), 2 * self.max_period + 1))


@dataclass(frozen=True)
class Classification:
    """Per token (N of them): labels, converge_step (-1 unless fixed_point), period (0 unless orbit), the
    step sizes relative to the trajectory's excursion (S, N), the tail's half-displacement cosine (N,), and the
    relative distance to the final state ||s_i - s_S|| / mean ||s||, (S + 1, N)."""

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
    L = rules.tail_steps(S)  # steps in the tail; the tail holds L + 1 states
    x = traj[S - L :]  # (L + 1, N, D)
    rounding = rules.floor * traj[1:].norm(dim=-1).mean(0)  # (N,) motion below this is float rounding

    # orbit: lag profile R(k) = mean ||x_i - x_{i-k}||; the smallest p >= 2 whose return R(p) is small against
    # the largest R at shorter lags; seen twice (R(2p) small too) or else undecided
    lags = torch.stack([(x[k:] - x[:-k]).norm(dim=-1).mean(0) for k in range(1, L + 1)])  # (L, N): R(1) .. R(L)
    running_max = lags.cummax(0).values  # (L, N): max_{j <= k} R(j)
    period = torch.zeros(N, dtype=torch.long)
    seen_once = torch.zeros(N, dtype=torch.bool)
    for p in range(min(rules.max_period, L), 1, -1):  # descending: the smallest qualifying p is written last
        ref = running_max[p - 2]  # max over lags 1 .. p - 1
        back = lags[p - 1] < rules.orbit_ratio * ref
        twice = back & (lags[2 * p - 1] < rules.orbit_ratio * ref) if 2 * p <= L else torch.zeros_like(back)
        period = torch.where(twice, torch.full_like(period, p), period)
        seen_once = torch.where(back, ~twice, seen_once)
    moving = running_max[-1] > rounding  # an orbit must move by more than rounding
    orbit = (period > 0) & moving
    seen_once &= ~orbit & moving

    # slider and fixed point read the `tail` share of the steps (the orbit rule may need more)
    Lf = max(2, math.ceil(rules.tail * S))
    x = traj[S - Lf :]  # (Lf + 1, N, D)
    center = x.mean(0)
    excursion = (traj[1:] - center).norm(dim=-1).max(0).values.clamp_min(1e-300)
    spread = (x - center).norm(dim=-1).pow(2).mean(0).sqrt()

    # slider: the tail's two halves move the same way (a displacement over many steps averages the noise out),
    # and the second moves about as far as the first (a contraction slows down)
    h = Lf // 2
    first, second = x[h] - x[0], x[-1] - x[h]  # (N, D)
    cos = torch.nn.functional.cosine_similarity(first, second, dim=-1, eps=1e-300)  # (N,)
    keeps = second.norm(dim=-1) >= rules.slide_keep * first.norm(dim=-1)
    net = (x[-1] - x[0]).norm(dim=-1)
    moves = (net > 2 * rules.tol * excursion) & (net > rounding)  # beyond what a fixed point could drift
    slider = (cos >= rules.slide_cos) & keeps & moves
    step_size = (traj[1:] - traj[:-1]).norm(dim=-1) / excursion  # (S, N)

    # fixed point: the tail stays within tol of the trajectory's excursion around its centre
    fixed = spread <= rules.tol * excursion
    near = (traj - center).norm(dim=-1) <= 2 * rules.tol * excursion  # (S + 1, N)
    idx = torch.arange(S + 1)[:, None].expand(S + 1, N)
    last_far = torch.where(~near, idx, torch.full_like(idx, -1)).max(0).values  # (N,)
    converge = torch.where(fixed & ~orbit & ~slider, last_far + 1, torch.full_like(last_far, -1))
    # still contracting (the second half moved less than the first) or a period seen once: more steps would tell
    slowing = (cos >= rules.slide_cos) & ~keeps

    labels = []
    for i in range(N):
        if Lf < rules.hold:
            labels.append("undecided")
        elif orbit[i]:
            labels.append("orbit")
        elif slider[i]:
            labels.append("slider")
        elif fixed[i]:
            labels.append("fixed_point")
        elif seen_once[i] or slowing[i]:
            labels.append("undecided")
        else:
            labels.append("other")
    scale = traj.norm(dim=-1).mean(0).clamp_min(1e-12)
    dist_final = (traj - traj[-1]).norm(dim=-1) / scale  # (S + 1, N)
    if Lf < rules.hold:
        period, converge = torch.zeros_like(period), torch.full_like(converge, -1)
    return Classification(labels, converge, period, step_size.float(), cos.float(), dist_final.float())


# ---------------------------------------------------------------------------------------------------------------
# synthetic trajectories (the classifier's tests and benchmarks/bench_classifier.py)

KINDS = ("fixed_point", "slider", "orbit")


def synthetic(kind: str, steps: int, n: int = 64, d: int = 32, noise: float = 0.0, seed: int = 0,
              period: int | None = None) -> torch.Tensor:
    """n trajectories (steps + 1, n, d) of one kind around a random centre c of norm sqrt(d) (the latent's scale):

        fixed_point  s_i = c + lambda^i a, ||a|| = 0.5 sqrt(d), lambda ~ U(0.6, 0.9): a contraction
        slider       s_i = c + (i - steps / 2) v, ||v|| / sqrt(d) log-uniform in [0.002, 0.05]: a drift
        orbit        s_i = c + rho (cos(2 pi i / p + phi) u + sin(...) w), u, w orthonormal, rho / sqrt(d)
                     log-uniform in [0.01, 0.3], p = `period` or uniform in 2 .. 16: a rotation (p = 2: a 2-cycle)

    plus independent Gaussian noise of norm about `noise` x sqrt(d) per state (noise = 0.01: 1% of the norm)."""
    if kind not in KINDS:
        raise InputError(f"synthetic trajectory kind {kind!r} does not exist; expected one of {', '.join(KINDS)}")
    g = torch.Generator().manual_seed(seed)
    root = math.sqrt(d)

    def unit(*shape: int) -> torch.Tensor:
        v = torch.randn(*shape, d, generator=g, dtype=torch.float64)
        return v / v.norm(dim=-1, keepdim=True)

    def log_uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.exp(math.log(lo) + torch.rand(n, 1, generator=g, dtype=torch.float64) * math.log(hi / lo))

    c = root * unit(n)  # (n, d)
    i = torch.arange(steps + 1, dtype=torch.float64)[:, None, None]  # (S + 1, 1, 1)
    if kind == "fixed_point":
        lam = 0.6 + 0.3 * torch.rand(n, 1, generator=g, dtype=torch.float64)
        traj = c + lam**i * (0.5 * root * unit(n))
    elif kind == "slider":
        traj = c + (i - steps / 2) * (log_uniform(0.002, 0.05) * root * unit(n))
    else:
        u = unit(n)
        w = unit(n)
        w = w - (w * u).sum(-1, keepdim=True) * u
        w = w / w.norm(dim=-1, keepdim=True)
        p = torch.full((n, 1), float(period)) if period else torch.randint(2, 17, (n, 1), generator=g).double()
        theta = 2 * math.pi * i / p + 2 * math.pi * torch.rand(n, 1, generator=g, dtype=torch.float64)
        traj = c + log_uniform(0.01, 0.3) * root * (theta.cos() * u + theta.sin() * w)
    if noise > 0:
        traj = traj + noise * torch.randn(traj.shape, generator=g, dtype=torch.float64)  # norm ~ noise sqrt(d)
    return traj.float()


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
    ax.bar(list(shares), list(shares.values()),
           color=["tab:green", "tab:purple", "tab:orange", "tab:gray", "tab:olive"][: len(shares)])
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
