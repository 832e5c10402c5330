"""ldm-edge: latent diffusion models on edge devices, provably the same picture."""

__version__ = "0.1.0"
