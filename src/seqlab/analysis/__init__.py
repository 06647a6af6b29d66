"""Analyses of trained models: test-time compute scaling (`thinking`), latent trajectories (`latents`) and
gradient flow over distance (`gradflow`)."""

from seqlab.analysis.gradflow import GradFlow, gradient_flow, gradient_flow_on_task, plot_gradient_flow
from seqlab.analysis.latents import PCA, Rules, analyze, capture, classify, fit_pca
from seqlab.analysis.thinking import evaluate_steps, parse_exit, parse_steps, plot_scaling, scaling_curve

__all__ = ["GradFlow", "PCA", "Rules", "analyze", "capture", "classify", "evaluate_steps", "fit_pca",
           "gradient_flow", "gradient_flow_on_task", "parse_exit", "parse_steps", "plot_gradient_flow",
           "plot_scaling", "scaling_curve"]
