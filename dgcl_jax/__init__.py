"""dgcl-jax: Density-Guided Contrastive Learning for semi-supervised semantic segmentation in JAX."""

__version__ = "0.1.0"
