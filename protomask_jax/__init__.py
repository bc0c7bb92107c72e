"""protomask_jax: ProtoMask (segmentation-guided prototype learning) in JAX/Flax.

Importing the package imports neither jax nor torch; submodules import what they need.
"""

__version__ = "0.1.0"
