"""Analyses of trained models: test-time compute scaling (`thinking`)."""

from seqlab.analysis.thinking import evaluate_steps, parse_exit, parse_steps, plot_scaling, scaling_curve

__all__ = ["evaluate_steps", "parse_exit", "parse_steps", "plot_scaling", "scaling_curve"]
