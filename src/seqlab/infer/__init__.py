"""Inference: fast decoding (`decode`), per-token decode plans (`plan`), streams with snapshots (`stream`), and the
memory/latency profiler (`profile`, imported on demand: `from seqlab.infer.profile import run_profile`)."""

from seqlab.infer.decode import Sampler, allocated_nbytes, reserve
from seqlab.infer.plan import DecodePlan
from seqlab.infer.stream import Stream

__all__ = ["DecodePlan", "Sampler", "Stream", "allocated_nbytes", "reserve"]
