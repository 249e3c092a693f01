"""DisCL in JAX/Flax: synthetic-to-real diffusion curricula for hard images."""

__version__ = "0.1.0"
