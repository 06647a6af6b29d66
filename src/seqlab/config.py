"""Frozen, validated configuration dataclasses, loaded from and saved to JSON.

This module imports no models. Each mixer family has its own small config section (`attention`, `rnn`, `conv`,
`mamba`, `gla`, ...) nested in `ModelConfig`, so a JSON file reads like

    {"mixer": "mamba", "d_model": 128, "n_layers": 4, "mamba": {"d_state": 16, "expand": 2}}

A section's dataclass lives in its mixer's own file (`seqlab.models.mamba.MambaConfig`), which registers the mixer's
name and section here when it is imported (`seqlab.models.registry.register_mixer`); importing `seqlab` imports
every mixer, so a config always knows them all. Adding a mixer touches no line of this module.

Every value is checked when the object is built; a bad value raises one `InputError` (a `ValueError`) that names
the field, the value and what is allowed. Derived sizes are properties, never stored twice.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqlab.errors import InputError

ARCHS = ("lm", "recurrent_depth")
FLOAT32_MAX = 3.4028234663852886e38  # a float field's largest magnitude: its value meets fp32 tensors
MAX_LAYERS = 100_000  # far beyond any model; a config claiming more is a typo, refused before a tuple of them

# Every mixer name a config may use, in the order the mixers registered (`register_mixer_config`), and the option
# section of each mixer family by its key in a config ("attention" for attention and sliding_attention, ...).
MIXERS: list[str] = []
SECTIONS: dict[str, type] = {}


def register_mixer_config(name: str, section: str | None = None, cls: type | None = None) -> None:
    """Make mixer `name` valid in configs, with its option section `section` (a frozen `Section` dataclass `cls`,
    shared by the mixers that name the same section). Called by `seqlab.models.registry.register_mixer`."""
    if name in MIXERS:
        raise ValueError(f"mixer name {name!r} is registered twice")
    if section is not None:
        if section in SECTIONS and SECTIONS[section] is not cls:
            raise ValueError(f"config section {section!r} is registered twice with different classes")
        if section in {f.name for f in dataclasses.fields(ModelConfig)}:
            raise ValueError(f"config section {section!r} would shadow the ModelConfig field of that name")
        SECTIONS[section] = cls
    MIXERS.append(name)


# ---------------------------------------------------------------------------------------------------------------
# validation helpers


def _type_ok(value: Any, hint: Any) -> bool:
    """True when `value` fits the (simple) type hint: int, float, bool, str, tuple[X, ...], X | None, dataclass."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is tuple:
        (item, _) = typing.get_args(hint)
        return isinstance(value, tuple) and all(_type_ok(v, item) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    return getattr(hint, "__name__", str(hint))


def check_types(obj: Any, prefix: str) -> None:
    """Every field of dataclass `obj` has its annotated type, and every float is finite and within float32's range
    (JSON's NaN and Infinity parse, and would train to nan weights; 1e300 overflows the fp32 tensors it meets);
    else one InputError naming `prefix` + the field."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _type_ok(value, hints[f.name]):
            raise InputError(
                f"config field '{prefix}{f.name}' = {value!r}: expected {_type_name(hints[f.name])}"
            )
        if isinstance(value, float) and not abs(value) <= FLOAT32_MAX:  # NaN fails every comparison
            raise InputError(f"config field '{prefix}{f.name}' = {value!r}: expected a finite number "
                             f"(|value| <= {FLOAT32_MAX:.4g}, the float32 range it is used in)")


def positive(obj: Any, prefix: str, *names: str) -> None:
    """Each named field of `obj` is None or > 0 (and finite: NaN compares false with everything)."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise InputError(f"config field '{prefix}{name}' = {value!r}: must be > 0")


def choice(prefix: str, name: str, value: Any, allowed: Any) -> None:
    """`value` is one of `allowed`."""
    if value not in allowed:
        raise InputError(f"config field '{prefix}{name}' = {value!r}: expected one of {', '.join(allowed)}")


def _from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a JSON-like dict: unknown keys are errors, lists become tuples, sections recurse."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise InputError(f"config section '{prefix.rstrip('.') or cls.__name__}' must be an object, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(
            f"unknown config key '{prefix}{unknown[0]}'; allowed keys: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if isinstance(hint, type) and issubclass(hint, Section):
            value = hint.parse(value if value is not None else {}, f"{prefix}{key}.")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def _json_value(value: Any) -> Any:
    if isinstance(value, Section):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    return value


def read_json(path: str | Path, what: str = "config file") -> Any:
    """The parsed JSON file at `path`; a missing file or invalid JSON is one InputError naming `what` and the path."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} '{path}' does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{what} '{path}' is not UTF-8 text (byte {e.start}): expected a JSON file") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{what} '{path}' is not valid JSON: {e}") from None
    except RecursionError:
        raise InputError(f"{what} '{path}' is nested too deeply to be a config") from None


class Section:
    """Mixin: JSON round trip for every config dataclass (a model's mixer sections subclass it too)."""

    @classmethod
    def from_dict(cls, data: dict) -> Any:
        return cls.parse(data, "")

    @classmethod
    def parse(cls, data: Any, prefix: str) -> Any:
        """Build from a JSON-like dict; `prefix` (e.g. "model.") is where the section sits, for error messages."""
        return _from_dict(cls, data, prefix)

    def to_dict(self) -> dict:
        return {f.name: _json_value(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore

    @classmethod
    def load(cls, path: str | Path) -> Any:
        return cls.from_dict(read_json(path))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


# ---------------------------------------------------------------------------------------------------------------
# recurrent depth (an architecture, not a mixer)


@dataclass(frozen=True)
class RecurrentDepthConfig(Section):
    """`arch="recurrent_depth"`: prelude -> core iterated r times (input re-injected) -> coda (Geiping et al. 2025).

    Training draws r per step (`sampler`): poisson_lognormal: tau ~ LogNormal(ln(mean_steps) - sigma^2/2, sigma),
    r = Poisson(tau) + 1 (so E[r] = mean_steps + 1); progressive: n ~ Uniform{0, ..., floor(2 (mean_steps - k))}
    steps without gradient, then k with (E[r] = mean_steps); fixed: r = mean_steps. Only the last k =
    backprop_steps iterations are differentiated. See `seqlab.models.recurrent_depth`.
    """

    prelude: int = 1  # blocks before the loop
    core: int = 2  # blocks iterated r times
    coda: int = 1  # blocks after the loop
    sampler: str = "poisson_lognormal"  # poisson_lognormal | progressive | fixed
    mean_steps: float = 8.0
    sigma: float = 0.5
    backprop_steps: int = 8  # k: truncated backpropagation in depth
    init_scale: float = 0.0  # s_0 ~ truncated normal with this std; 0: s_0 = 0 (deterministic)
    test_steps: int | None = None  # r at inference (the maximum under adaptive exit); None: round(mean_steps)
    exit: str = "none"  # none | kl | latent: per-token adaptive exit at inference
    exit_threshold: float = 5e-4
    kv_slots: int | None = None  # None: one core state per iteration; N: iteration i reuses slot i mod N
    warm_start: bool = False  # a token's s_0 is the previous token's final latent ("continuous thought")
    residual_gain: float = 0.2  # initial gain of the blocks' sandwich post-norms: blocks start near the identity

    def __post_init__(self) -> None:
        check_types(self, "depth.")
        positive(self, "depth.", "core", "mean_steps", "sigma", "backprop_steps", "test_steps", "kv_slots")
        choice("depth.", "sampler", self.sampler, ("poisson_lognormal", "progressive", "fixed"))
        choice("depth.", "exit", self.exit, ("none", "kl", "latent"))
        for name in ("prelude", "coda", "init_scale", "exit_threshold", "residual_gain"):
            if getattr(self, name) < 0:
                raise InputError(f"config field 'depth.{name}' = {getattr(self, name)!r}: must be >= 0")
        if self.sampler == "fixed" and (self.mean_steps != int(self.mean_steps)):
            raise InputError(f"config field 'depth.mean_steps' = {self.mean_steps}: the fixed sampler needs a whole "
                             "number of steps")
        if self.sampler == "progressive" and self.mean_steps < self.backprop_steps:
            raise InputError(f"config field 'depth.mean_steps' = {self.mean_steps}: the progressive sampler needs "
                             f"mean_steps >= depth.backprop_steps = {self.backprop_steps}")

    @property
    def n_layers(self) -> int:
        """Real (distinct) blocks: prelude + core + coda."""
        return self.prelude + self.core + self.coda

    @property
    def default_steps(self) -> int:
        return self.test_steps or max(1, round(self.mean_steps))


# ---------------------------------------------------------------------------------------------------------------
# layer specs: which mixer each layer of a hybrid gets


def layer_plan(spec: str, n_layers: int) -> tuple[str, ...]:
    """The mixer of each of `n_layers` layers, from a layer spec (the profiler's and the lab's mixer entries):

        "gru"                      every layer gru
        "lstm+attention"           the names cycle over the layers: lstm, attention, lstm, attention, ...
                                   (every name must be reached: "lstm+gru+attention" needs n_layers >= 3)
        "3:1 mamba:attention"      ratio form: 3 mamba layers then 1 attention layer, the pattern repeated
                                   (8 layers: mamba x3, attention, mamba x3, attention); truncated at n_layers

    One InputError names the bad spec and what was expected.
    """
    expected = (f"expected a mixer name ({', '.join(MIXERS)}), names joined by '+' (e.g. 'lstm+attention'), or "
                "counts and names joined by ':' (e.g. '3:1 mamba:attention')")
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"layer spec {spec!r}: {expected}")
    if not isinstance(n_layers, int) or n_layers < 1:
        raise InputError(f"layer spec {spec!r} for n_layers = {n_layers!r}: n_layers must be an integer >= 1")
    words = spec.split()
    if len(words) == 2:  # ratio form
        counts, names = words[0].split(":"), words[1].split(":")
        if len(counts) != len(names) or not all(c.isdigit() and int(c) >= 1 for c in counts):
            raise InputError(f"layer spec {spec!r}: the ratio form needs one count >= 1 per name, e.g. "
                             f"'3:1 mamba:attention'; {expected}")
        pattern = [name for c, name in zip(counts, names) for _ in range(int(c))]
    elif len(words) == 1:
        names = pattern = spec.split("+")
    else:
        raise InputError(f"layer spec {spec!r}: {expected}")
    for name in names:
        if name not in MIXERS:
            raise InputError(f"layer spec {spec!r}: mixer {name!r} is not available; {expected}")
    layers = tuple(pattern[i % len(pattern)] for i in range(n_layers))
    missing = [name for name in names if name not in layers]
    if missing:  # a pattern that the depth truncates before a named mixer is met is a mistake, in either form
        raise InputError(f"layer spec {spec!r} with n_layers = {n_layers} never reaches mixer {missing[0]!r}: the "
                         f"pattern has {len(pattern)} layers; use more layers or a shorter pattern")
    return layers


# ---------------------------------------------------------------------------------------------------------------
# the model


@dataclass(frozen=True)
class ModelConfig(Section):
    """A language model: embedding -> n_layers residual blocks (mixer + MLP) -> norm -> head.

    `mixer` names the mixer of every layer; `layers` (a list of mixer names, one per layer) overrides it and makes a
    hybrid, e.g. `layers=("mamba", "mamba", "attention")`. Each mixer family's options are a section, read as an
    attribute (`cfg.mamba.d_state`) and written as a key of its own in JSON; `sections` holds them all (defaults
    for those not given), keyed by section name. Build from JSON-like dicts with `ModelConfig.from_dict`, change
    with `cfg.replace(d_model=256, mamba={"d_state": 8})`.
    """

    arch: str = "lm"
    mixer: str = "attention"
    layers: tuple[str, ...] | None = None
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    mlp: str = "swiglu"  # swiglu | gelu | gelu_tanh (GPT-2's tanh approximation) | none
    d_ff: int | None = None  # None: 4 * d_model for gelu, the 2/3 of that rounded up to 8 for swiglu
    mlp_bias: bool = False  # biases on the MLP's linear layers (GPT-2)
    position: str = "rope"  # rope (rotary, inside attention) | learned (an absolute table added to the embedding)
    max_positions: int = 1024  # position="learned": rows of the table, the longest context the model accepts
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    sandwich_norm: bool = False  # also normalize the mixer and MLP outputs (keeps iterated latents bounded)
    tie_embeddings: bool = True
    init: str = "gpt2"  # gpt2: N(0, init_std) linear and embedding weights | torch: PyTorch's own defaults
    init_std: float = 0.02
    depth: RecurrentDepthConfig = field(default_factory=RecurrentDepthConfig)  # arch="recurrent_depth" only
    sections: dict = field(default_factory=dict, hash=False)  # mixer option sections by name (see the class doc)

    def __post_init__(self) -> None:
        sections = {}
        for key, value in self.sections.items():
            if key not in SECTIONS:
                raise InputError(f"unknown config section '{key}'; mixer sections: {', '.join(SECTIONS)}")
            sections[key] = SECTIONS[key].parse(value, f"{key}.") if isinstance(value, dict) else value
        for key, cls in SECTIONS.items():
            if not isinstance(sections.setdefault(key, cls()), cls):
                raise InputError(f"config section '{key}' must be a {cls.__name__} or an object, got "
                                 f"{type(sections[key]).__name__}")
        object.__setattr__(self, "sections", sections)
        check_types(self, "")
        choice("", "arch", self.arch, ARCHS)
        if self.arch == "recurrent_depth" and self.n_layers != self.depth.n_layers:
            raise InputError(
                f"config field 'n_layers' = {self.n_layers}: arch recurrent_depth has depth.prelude + depth.core + "
                f"depth.coda = {self.depth.n_layers} blocks; set n_layers = {self.depth.n_layers} or leave it out"
            )
        choice("", "mixer", self.mixer, MIXERS)
        positive(self, "", "vocab_size", "d_model", "n_layers", "d_ff", "norm_eps", "init_std")
        if self.n_layers > MAX_LAYERS:  # checked before anything lists the layers (`layer_mixers`)
            what = "depth.prelude + depth.core + depth.coda" if self.arch == "recurrent_depth" else "'n_layers'"
            raise InputError(f"config field {what} = {self.n_layers}: at most {MAX_LAYERS:,} layers")
        choice("", "init", self.init, ("gpt2", "torch"))
        choice("", "mlp", self.mlp, ("swiglu", "gelu", "gelu_tanh", "none"))
        choice("", "position", self.position, ("rope", "learned"))
        positive(self, "", "max_positions")
        if self.position == "learned" and self.arch != "lm":
            raise InputError(f"config field 'position' = 'learned': only arch lm has a learned position table, "
                             f"got arch {self.arch!r}")
        choice("", "norm", self.norm, ("rmsnorm", "layernorm"))
        if self.layers is not None:
            if len(self.layers) != self.n_layers:
                raise InputError(
                    f"config field 'layers' has {len(self.layers)} entries but n_layers = {self.n_layers}; "
                    "give one mixer name per layer"
                )
            for i, name in enumerate(self.layers):
                choice("", f"layers[{i}]", name, MIXERS)
        for section in sections.values():  # checks that need the model's sizes (a section's own are done)
            check = getattr(section, "check_model", None)
            if check is not None:
                check(self)

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections")  # a mixer section: cfg.mamba, cfg.attention, ...
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"'ModelConfig' has no field or mixer section {name!r}")

    # derived sizes
    @property
    def layer_mixers(self) -> tuple[str, ...]:
        return self.layers if self.layers is not None else (self.mixer,) * self.n_layers

    @property
    def ff_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":
            return 8 * math.ceil(8 * self.d_model / 3 / 8)
        return 4 * self.d_model

    def to_dict(self) -> dict:
        out = {f.name: _json_value(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "sections"}
        return {**out, **{key: section.to_dict() for key, section in self.sections.items()}}

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with `changes`: fields, and mixer sections given as objects or as dicts of their fields to change
        (`cfg.replace(attention={"window": 8})` keeps the other attention fields)."""
        sections = dict(self.sections)
        for key in [k for k in changes if k in SECTIONS]:
            value = changes.pop(key)
            sections[key] = dataclasses.replace(sections[key], **value) if isinstance(value, dict) else value
        return dataclasses.replace(self, sections=sections, **changes)

    @classmethod
    def parse(cls, data: Any, prefix: str) -> ModelConfig:
        if not isinstance(data, dict):
            return _from_dict(cls, data, prefix)  # the error for a non-object
        # Convenience: a `layers` list alone fixes the depth.
        if isinstance(data.get("layers"), (list, tuple)) and "n_layers" not in data:
            data = {**data, "n_layers": len(data["layers"])}
        # Recurrent depth: the depth section fixes the block count, and sandwich norms are on unless turned off.
        if data.get("arch") == "recurrent_depth":
            depth = _from_dict(RecurrentDepthConfig, data.get("depth") or {}, f"{prefix}depth.")
            data = {"n_layers": depth.n_layers, "sandwich_norm": True, **data}
        fields = {f.name for f in dataclasses.fields(cls)} - {"sections"}
        unknown = sorted(set(data) - fields - set(SECTIONS))
        if unknown:
            raise InputError(f"unknown config key '{prefix}{unknown[0]}'; allowed keys: "
                             f"{', '.join(sorted(fields | set(SECTIONS)))}")
        sections = {}
        for key in [k for k in data if k in SECTIONS]:
            value = data[key]
            sections[key] = SECTIONS[key].parse(value if value is not None else {}, f"{prefix}{key}.")
        return _from_dict(cls, {**{k: v for k, v in data.items() if k in fields}, "sections": sections}, prefix)


# ---------------------------------------------------------------------------------------------------------------
# training


@dataclass(frozen=True)
class TrainConfig(Section):
    """Optimization: AdamW (decay on >= 2-D weights only), linear warmup then cosine decay to min_lr_ratio * lr."""

    steps: int = 200
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 0  # 0: evaluate at the end only
    eval_batches: int = 8
    log_every: int = 10
    grad_accum: int = 1  # micro-batches per step; batch_size is the whole step's (all micro-batches and ranks)
    precision: str = "fp32"  # fp32 | bf16 (autocast; weights, optimizer state and recurrent states stay fp32)
    stream: bool = False  # train on consecutive segments of a streaming task (corpus), not random windows
    carry_state: bool = True  # with stream: carry the detached state across segments (truncated BPTT)
    kv_window: int | None = None  # attention with carry_state: cached positions kept (None: one segment)
    checkpoint_every: int = 100  # steps between checkpoints, so a killed run resumes (0: at the end only)
    max_nonfinite: int = 10  # stop after this many steps in a row with a non-finite loss or gradient
    device: str = "cpu"  # cpu | cuda | auto

    def __post_init__(self) -> None:
        check_types(self, "train.")
        positive(self, "train.", "steps", "batch_size", "lr", "eval_batches", "log_every", "grad_accum",
                  "kv_window", "max_nonfinite")
        choice("train.", "precision", self.precision, ("fp32", "bf16"))
        choice("train.", "device", self.device, ("cpu", "cuda", "auto"))
        for name in ("warmup_steps", "weight_decay", "grad_clip", "eval_every", "min_lr_ratio",
                     "checkpoint_every"):
            if getattr(self, name) < 0:
                raise InputError(f"config field 'train.{name}' = {getattr(self, name)!r}: must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise InputError(f"config field 'train.{name}' = {getattr(self, name)!r}: must be in [0, 1)")


@dataclass(frozen=True)
class RunConfig(Section):
    """What `seqlab train --config FILE` reads: a model, a task (name + parameters) and the optimization."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: dict = field(default_factory=lambda: {"name": "mqar"})
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_task: dict | None = None  # task parameters that differ for evaluation, e.g. {"seq_len": 256}

    def __post_init__(self) -> None:
        check_types(self, "")
        if not isinstance(self.task.get("name"), str):
            raise InputError(f"config field 'task.name' = {self.task.get('name')!r}: expected a task name")
